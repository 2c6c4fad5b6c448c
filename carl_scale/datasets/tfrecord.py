"""TCC's TFRecords -> shards, without TensorFlow: the Pouring set (and any dataset TCC ships the
same way) comes only as ``tf.train.SequenceExample`` records.

A TFRecord file is a run of records: ``uint64 length``, ``uint32 masked CRC-32C of the length``,
``data``, ``uint32 masked CRC-32C of the data`` (little endian). The length's checksum is
verified (a truncated or misaligned file stops with its offset named, keeping the records
before); the data's is not (pure Python CRC-32C runs at ~10 MB/s): damage that breaks the
protobuf, a JPEG or the frame/label count skips that record, counted, but damage inside JPEG
data that still decodes would go unnoticed. The record is a protobuf ``SequenceExample``, read here from the wire format:
``context`` (field 1, a ``Features`` map) and ``feature_lists`` (field 2, a ``FeatureLists``
map); a ``Feature`` holds a ``bytes_list`` (1), ``float_list`` (2) or ``int64_list`` (3).

TCC's layout (its ``dataset_preparation`` code): context ``name`` (bytes), ``len``, ``label``
(int64); sequence ``video`` (one JPEG per frame) and ``frame_labels`` (one int64 per frame).
Files are ``<dataset>_<split>-K-of-N.tfrecord``.
"""

from __future__ import annotations

import io
import logging
import re
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from carl_scale.data.manifest import PUBLISHED_ORDER
from carl_scale.datasets.encode import check_source_options
from carl_scale.datasets.parallel import SkipInput, annotate, write_options, write_split
from carl_scale.datasets.writer import VideoRecord

log = logging.getLogger("carl_scale.data")


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record_spans(path: str | Path) -> tuple[list[tuple[int, int]], str | None]:
    """``(offset, length)`` of each record's data in one TFRecord file, read from the headers
    alone (seeking over the data), and the error that stopped the scan (None: the whole file)."""
    spans: list[tuple[int, int]] = []
    size = Path(path).stat().st_size
    if size == 0:  # a download that failed, most likely: counted, never dropped silently
        return spans, f"{path}: empty file (0 bytes); download it again"
    with open(path, "rb") as f:
        while header := f.read(12):
            start = f.tell() - len(header)
            if len(header) < 12:
                return spans, f"{path}: truncated record header at byte {start}"
            length, crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != crc:
                return spans, f"{path}: bad length checksum at byte {start} (not a TFRecord file, or damaged)"
            if start + 12 + length + 4 > size:
                return spans, f"{path}: truncated record at byte {start}"
            spans.append((start + 12, length))
            f.seek(length + 4, 1)
    return spans, None


def read_record(path: str | Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def iter_records(path: str | Path) -> Iterator[bytes]:
    """The records of one TFRecord file (a damaged one raises after the records before it)."""
    spans, error = record_spans(path)
    for offset, length in spans:
        yield read_record(path, offset, length)
    if error is not None:
        raise ValueError(error)


# -- protobuf wire format ------------------------------------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a serialized message, in order."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_feature(buf: bytes) -> list:
    """A ``tf.train.Feature``: its list of bytes, floats or ints (packed or not)."""
    out: list = []
    for kind, _, lst in _fields(buf):
        for _, wire, v in _fields(lst):
            if kind == 1:
                out.append(bytes(v))
            elif kind == 2:
                out.extend(struct.unpack(f"<{len(v) // 4}f", v) if wire == 2 else struct.unpack("<f", v))
            elif kind == 3:
                if wire == 2:  # packed
                    i = 0
                    while i < len(v):
                        x, i = _varint(v, i)
                        out.append(_signed64(x))
                else:
                    out.append(_signed64(v))
    return out


def _map_entries(buf: bytes) -> Iterator[tuple[str, bytes]]:
    for _, _, entry in _fields(buf):  # field 1: map<string, value> entries
        key, value = "", b""
        for number, _, v in _fields(entry):
            if number == 1:
                key = bytes(v).decode()
            elif number == 2:
                value = v
        yield key, value


def parse_sequence_example(buf: bytes) -> tuple[dict[str, list], dict[str, list[list]]]:
    """``(context, feature_lists)`` of a serialized ``tf.train.SequenceExample``."""
    context, lists = {}, {}
    for number, _, v in _fields(buf):
        if number == 1:
            context.update({k: parse_feature(f) for k, f in _map_entries(v)})
        elif number == 2:
            for k, fl in _map_entries(v):
                lists[k] = [parse_feature(f) for _, _, f in _fields(fl)]
    return context, lists


# -- shards --------------------------------------------------------------------------------------


def _record_to_video(path: Path, offset: int, length: int, where: str, fps: float) -> VideoRecord:
    ctx, lists = parse_sequence_example(read_record(path, offset, length))
    if not lists.get("video"):
        raise ValueError("no frames ('video' feature list empty or missing)")
    frames = np.stack([np.asarray(Image.open(io.BytesIO(f[0])).convert("RGB")) for f in lists["video"]])
    labels = (np.array([f[0] if f else -1 for f in lists["frame_labels"]], np.int64)
              if "frame_labels" in lists else None)
    if ctx.get("len") and int(ctx["len"][0]) != len(frames):  # (the published loader asserts it too)
        raise ValueError(f"the record says {int(ctx['len'][0])} frames, it holds {len(frames)}")
    name = ctx["name"][0].decode() if ctx.get("name") else where
    label = int(ctx["label"][0]) if ctx.get("label") else -1
    return VideoRecord(name, frames, fps, label, labels, extra={"source": where})


def write_tfrecord_shards(src: str | Path, out_dir: str | Path, dataset: str, *, fps: float = 25.0, **write) -> dict:
    """Every ``<dataset>_<split>-K-of-N.tfrecord`` file in the folder ``src`` (not its subfolders)
    into one split each of shards (``write``: the keyword arguments of
    :func:`~carl_scale.datasets.parallel.write_options`). One input per record, found by scanning
    the record headers; a file cut short keeps the records before the damage and lists the rest
    as one skipped input."""
    check_source_options(fps=fps)  # (metadata only, but a stream's timing is read from it)
    src = Path(src)
    pattern = re.compile(rf"{re.escape(dataset)}_(train|val|test)(?:-(\d+)-of-(\d+))?\.tfrecords?")
    files: dict[str, list[Path]] = {}
    parts: dict[tuple[str, int], set[int]] = {}
    for p in sorted(src.iterdir()) if src.is_dir() else []:
        if m := pattern.fullmatch(p.name):
            files.setdefault(m[1], []).append(p)
            if m[2] is not None:
                parts.setdefault((m[1], int(m[3])), set()).add(int(m[2]))
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} does not exist: pass the folder that holds the {dataset}_<train|val|test>"
                                f"-K-of-N.tfrecord files (docs/datasets.md says where they come from)")
    if not files:
        raise FileNotFoundError(f"no {dataset}_<train|val|test>-K-of-N.tfrecord files in {src} (it holds "
                                f"{sum(1 for _ in src.iterdir())} other entries): pass the folder that holds them")
    for (split, n), found in sorted(parts.items()):  # a part not downloaded: refused before writing
        if found != set(range(n)):  # (parts count from 0: -0-of-2 and -2-of-2 still lack -1-of-2)
            raise FileNotFoundError(f"{src}: {dataset}_{split} has parts K = {', '.join(map(str, sorted(found)))} of "
                                    f"-K-of-{n} (K = 0..{n - 1}); download the missing ones, or move the split's "
                                    f"files aside to write the others")

    def load(item: tuple) -> VideoRecord:
        path, offset, length, where = item
        if offset < 0:  # the damage a scan stopped at
            raise SkipInput(where)
        return _record_to_video(path, offset, length, where, fps)

    for split, paths in sorted(files.items()):
        per_file = []
        for path in paths:
            spans, error = record_spans(path)
            per_file.append([(path, off, n, f"{path.name}#{i}") for i, (off, n) in enumerate(spans)])
            if error is not None:
                log.warning("stopping at %s", error)
                per_file[-1].append((path, -1, 0, error))
        # The published lists read the files with tf.data's parallel reads: one record of each file
        # in turn (file 0's first, file 1's first, file 0's second, ...). Written in that order, the
        # evaluation's "first N videos" (its 10% and 50% subsets) are the published ones
        items = [file[i] for i in range(max(map(len, per_file), default=0)) for file in per_file if i < len(file)]
        write_split(out_dir, split, items, load, dataset=dataset, opts=write_options(**write),
                    describe=lambda item: item[3] if item[1] >= 0 else item[0].name, settings={"fps": fps})
    return annotate(out_dir, video_order=PUBLISHED_ORDER)
