"""A shard's samples from its index, their payloads read only when used.

A resumed epoch deals its first samples again to reach the batch it stopped at (the shuffle
buffer and the dealing are functions of the stream, so the stream is replayed), but decodes none
of them. Through WebDataset that replay still reads every byte of the tar up to the resume point:
late in a Kinetics-400 epoch, hundreds of GB per node, minutes to tens of minutes on network
storage. The DALI index each finished shard has (``train-000000.idx``, written by the shard
writer with DALI's ``wds2idx``) lists every sample's members with their offsets and sizes, so the
replay needs only the index (and the metadata, where batches group videos by label); a sample's
payload is read the first time it is used, when the sample is dealt. The shuffle buffer then holds
no payload either (64 Kinetics videos as JPEG frames are ~400 MB per worker), and a JPEG payload is
read only as far as the views' frames need (:meth:`LazySample.read_ranges`, used by
``carl_scale.data.stream.sampled_jpegs``: about half a Kinetics clip's bytes at T = 80, simulated with
the ``k400`` recipe's sampling).

The samples are WebDataset's, the same keys in the same order, for a shard whose index agrees
with what WebDataset's grouping makes of it (checked while parsing: one key per line, each
member's suffix the one WebDataset would give, no member WebDataset would skip, every member right
after the one before, all data inside the file, the first and last members' tar headers as
indexed and the archive's end after the last; and as each sample is read, the headers of its
members). Where it cannot be trusted (no index, a URL that is not a local file, names WebDataset
reads otherwise, a tar shorter than its index says) :func:`indexed_samples` returns None and the
caller reads the tar with WebDataset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

INDEX_VERSION = "v1.2"  # (DALI's wds2idx: "ext offset size name" per member, one sample a line)
# WebDataset's own rules: a member's key and suffix (tariterators.base_plus_ext), and the names it skips
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_SKIPPED = re.compile(r"__[^/]*__($|/)")


SMALL = 1 << 16  # members up to this size (metadata, frame offsets) are read apart from the payload
MERGE_GAP = 1 << 20  # wanted byte ranges of a member closer than this are read in one (fewer, larger reads)
HEADER = 512  # a tar member's header, just before its data


def header_member(block: bytes) -> tuple[str, int] | None:
    """(name, size) a 512-byte ustar/GNU tar header gives; None for anything else."""
    if len(block) != HEADER:
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    try:
        return name.decode("utf-8"), int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except (UnicodeDecodeError, ValueError):
        return None


def read_at(fd: int, offset: int, size: int) -> bytes:
    """Exactly ``size`` bytes at ``offset`` (unbuffered: a file object's buffer would read a whole
    file-system block, megabytes on Lustre or GPFS, for each small read); fewer where the file ends."""
    parts, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class LazySample(dict):
    """A WebDataset sample whose member fields hold nothing until one of them is used. A small
    member (the JSON metadata: all a label-grouped replay reads) brings the sample's small members
    in one read; a large one (the video or JPEG payload), :meth:`load`, or anything that walks,
    compares or changes the fields (``items()``, ``dict(sample)``, ``==``, ``pop``) brings
    everything still unread: no placeholder is ever handed out."""

    __slots__ = ("_path", "_pending")

    def __init__(self, path: str, key: str, url: str, members: dict[str, tuple[int, int, str]]):
        super().__init__(__key__=key, __url__=url)
        for suffix in members:
            dict.__setitem__(self, suffix, None)
        self._path, self._pending = path, dict(members)  # suffix -> (data offset, size, member name), until read

    @property
    def loaded(self) -> bool:
        return not self._pending

    def load(self, names: list[str] | None = None) -> None:
        """Read ``names`` (default: every member not read yet): one read of the span they cover,
        or one each where a large member lies between them. Each read starts at the tar header of
        its first member; every member's header (in the span read) must name the member and size the
        index does: an index older than its tar (a shard written again, its index not yet) is an
        error, not another video's bytes."""
        wanted = {n: self._pending[n] for n in (self._pending if names is None else names) if n in self._pending}
        if not wanted:
            return
        start = min(o for o, _, _ in wanted.values())
        end = max(o + s for o, s, _ in wanted.values())
        spans = [(start, end)] if end - start <= sum(s for _, s, _ in wanted.values()) + SMALL else \
            [(o, o + s) for o, s, _ in wanted.values()]
        fd = os.open(self._path, os.O_RDONLY)
        try:
            for a, b in spans:
                data = read_at(fd, a - HEADER, b - a + HEADER)
                if len(data) != b - a + HEADER:
                    raise OSError(f"{self._path}: {b - a + HEADER} bytes expected at offset {a - HEADER} (a member's "
                                  f"header and data), {len(data)} read (the shard changed after its index was written)")
                for suffix, (offset, size, member) in list(wanted.items()):
                    if not (a <= offset and offset + size <= b):
                        continue
                    # (data starts at a - HEADER: a member's header at offset - HEADER is data[offset - a:])
                    self._check_header(data[offset - a: offset - a + HEADER], offset, size, member)
                    dict.__setitem__(self, suffix, data[HEADER + offset - a: HEADER + offset - a + size])
                    del self._pending[suffix]
        finally:
            os.close(fd)

    def _check_header(self, block: bytes, offset: int, size: int, member: str) -> None:
        if header_member(block) != (member, size):
            raise OSError(f"{self._path}: the tar holds no {member!r} of {size} bytes at offset {offset}, where its "
                          f"index ({index_path(self._path).name}) says: an index older than its shard? (the shard "
                          f"writer's --overwrite writes both again)")

    def unread(self) -> list[str]:
        """The members not read yet."""
        return list(self._pending)

    def unread_size(self, name: str) -> int | None:
        """The size of member ``name`` if it is not read yet, else None."""
        return self._pending[name][1] if name in self._pending else None

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Bytes ``[start, end)`` of member ``name`` (not read yet, and left unread as a field) for
        each of ``ranges`` (sorted, within the member): its header checked (read with the first
        ranges when they start within :data:`SMALL` of it), ranges closer than :data:`MERGE_GAP`
        read in one. What a
        view's sampled JPEG frames need of a payload."""
        offset, size, member = self._pending[name]
        if any(not 0 <= a <= b <= size for a, b in ranges) or any(b > c for (_, b), (c, _) in zip(ranges, ranges[1:])):
            raise ValueError(f"{self._path}: byte ranges outside member {member!r} ({size} bytes) or not sorted")
        wanted = [(-HEADER, 0)] + list(ranges)  # the member's header first: read with the first frames when close
        out: list[bytes] = []
        fd = os.open(self._path, os.O_RDONLY)
        try:
            i = 0
            while i < len(wanted):
                j = i
                # (the header joins the frames only when they start near it: bytes over a round trip)
                while j + 1 < len(wanted) and wanted[j + 1][0] - wanted[j][1] <= (SMALL if j == 0 else MERGE_GAP):
                    j += 1
                a, b = wanted[i][0], wanted[j][1]
                data = read_at(fd, offset + a, b - a)
                if len(data) != b - a:
                    raise OSError(f"{self._path}: {b - a} bytes expected at offset {offset + a}, {len(data)} read "
                                  f"(the shard changed after its index was written)")
                out += [data[x - a: y - a] for x, y in wanted[i: j + 1]]
                if i == 0:
                    self._check_header(out[0], offset, size, member)
                i = j + 1
        finally:
            os.close(fd)
        return out[1:]

    def __getitem__(self, name: str) -> Any:
        if name in self._pending:
            small = self._pending[name][1] <= SMALL
            self.load([n for n, (_, s, _) in self._pending.items() if s <= SMALL] if small else None)
        return dict.__getitem__(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    # Whatever walks the fields reads them first: a dict's own views, copies and comparisons (CPython's
    # fast paths for an unchanged __iter__) would hand out the placeholders.
    def values(self):
        self.load()
        return dict.values(self)

    def items(self):
        self.load()
        return dict.items(self)

    def __iter__(self):
        self.load()
        return dict.__iter__(self)

    def copy(self) -> dict:
        self.load()
        return dict(dict.items(self))

    def __eq__(self, other: object) -> bool:
        self.load()
        if isinstance(other, LazySample):
            other.load()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # (as a dict's)

    def pop(self, name: str, *default: Any) -> Any:
        self.load()
        return dict.pop(self, name, *default)

    def popitem(self) -> tuple[str, Any]:
        self.load()
        return dict.popitem(self)

    def setdefault(self, name: str, default: Any = None) -> Any:
        self.load()
        return dict.setdefault(self, name, default)


def index_path(url: str) -> Path:
    """Where the shard writer puts the index of ``url`` (``train-000000.tar`` -> ``train-000000.idx``)."""
    return Path(url).with_suffix(".idx")


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def _blocks(size: int) -> int:
    """Bytes a member's data takes in a tar: whole 512-byte blocks."""
    return -(-size // HEADER) * HEADER


def indexed_samples(url: str) -> list[LazySample] | None:
    """The samples of shard ``url`` from its index, payloads unread; None where the index cannot
    stand in for reading the tar (see the module's docstring)."""
    if "://" in url or url.startswith("pipe:") or not os.path.isfile(url):
        return None
    try:
        lines = index_path(url).read_text().splitlines()
        size = os.path.getsize(url)
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) < 2:  # (an index of no sample beside a tar: the tar says what it holds)
        return None
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or _number(head[1]) != len(lines) - 1:
        return None
    samples: list[LazySample] = []
    previous, expected = None, HEADER  # where the next member's data must start
    for line in lines[1:]:
        parts = line.split()
        if not parts or len(parts) % 4:  # (a name with a space: not one this format can hold)
            return None
        key, members = None, {}
        for i in range(0, len(parts), 4):
            _, offset, length, name = parts[i: i + 4]
            offset, length, match = _number(offset), _number(length), _KEY_SUFFIX.match(name)
            if match is None or _SKIPPED.match(name) or offset is None or length is None:
                return None
            suffix = match.group(2).lower()
            if (key is not None and match.group(1) != key) or suffix in members:
                return None
            # Every member header to header, nothing between (no member the index left out, no
            # long-name or pax header WebDataset would read otherwise), all inside the file.
            if offset != expected or offset + length > size:
                return None
            expected = offset + _blocks(length) + HEADER
            key = match.group(1)
            members[suffix] = (offset, length, name)
        if key == previous:  # (WebDataset would merge the two lines)
            return None
        previous = key
        samples.append(LazySample(url, key, url, members))
    # The first and last members' headers name what the index does (an index older than a shard
    # written again names other members, or the same at other offsets), and the archive ends after
    # the last (a tar longer than its index holds samples it does not list): else the tar is read.
    first = min(samples[0]._pending.values())
    last = max(samples[-1]._pending.values())
    try:
        fd = os.open(url, os.O_RDONLY)
        try:
            ok = header_member(read_at(fd, first[0] - HEADER, HEADER)) == (first[2], first[1]) and \
                header_member(read_at(fd, last[0] - HEADER, HEADER)) == (last[2], last[1]) and \
                read_at(fd, last[0] + _blocks(last[1]), HEADER) == bytes(HEADER)
        finally:
            os.close(fd)
    except OSError:
        return None
    return samples if ok else None


def samples_of(urls: list[str], read_tar) -> Iterator[dict]:
    """The samples of ``urls`` in order: from each shard's index where it can stand in for the tar,
    else from ``read_tar([url])`` (WebDataset's reader, with its error handler)."""
    for url in urls:
        indexed = indexed_samples(url)
        if indexed is None:
            yield from read_tar([url])
        else:
            yield from indexed
