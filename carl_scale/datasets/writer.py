"""The one shard writer every dataset goes through.

A sample is one video:

* ``<key>.json``    metadata: video_id, dataset, fps, num_frames, height, width, action_label,
  phase_labels (per frame, -1 = unlabelled), frame_labels (more named per-frame label sets, e.g.
  FineGym's ``{"gym288": [...]}`` beside its Gym99 phase_labels), payload, codec, ...
* ``<key>.nframes`` the frame count as 4 little-endian bytes (int32), so DALI's webdataset reader
  can read it directly (``dtypes=INT32``)
* ``<key>.video``   the encoded video (container bytes), for ``payload="video"``; or
* ``<key>.jpgs`` + ``<key>.jpgofs`` every frame as JPEG, concatenated, and the int64 offset
  table (S+1 entries), for ``payload="jpeg"``

Shards are written to ``<name>.tar.partial`` and renamed when finished, so a shard on disk is
always complete. Each finished shard gets a DALI index (``wds2idx``). ``shards.json`` in the output
directory lists every split's shards, sample counts, label names and how many inputs were skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from av.codec.codec import UnknownCodecError

from carl_scale.data.manifest import MANIFEST
from carl_scale.durable import durable_replace
from carl_scale.datasets.encode import EncodeOptions, encode_jpeg_frames, encode_video

Payload = Literal["video", "jpeg"]


class SkipInput(Exception):
    """An input that cannot become a video (missing file, label mismatch, frames that cannot be
    encoded as asked): skipped and listed in the manifest with this message, never fatal. Raised by
    a converter's ``load`` and by :meth:`SlotWriter.write`."""


@dataclass
class VideoRecord:
    """What a dataset hands the writer for one video."""

    video_id: str
    frames: np.ndarray | None  # (S, H, W, 3) uint8, or None when ``encoded`` is given
    fps: float
    action_label: int = -1
    phase_labels: np.ndarray | None = None  # (S,), -1 = unlabelled; None: all -1
    encoded: bytes | None = None  # already-encoded video to store as is (payload="video" only)
    num_frames: int | None = None  # required with ``encoded``
    height: int | None = None
    width: int | None = None
    codec: str | None = None
    frame_labels: dict[str, np.ndarray] = field(default_factory=dict)  # more per-frame label sets, by name
    extra: dict[str, Any] = field(default_factory=dict)


# A ustar member name without a "/" holds 100 bytes: the key, a dot and the longest extension
# ("nframes"). A longer id keeps its start and gets a digest of the whole id (its JSON keeps the id).
MAX_KEY = 100 - len(".nframes")


def sample_key(video_id: str) -> str:
    """A tar-safe key: webdataset splits a name at its first dot, so dots must go; an id too long
    for a tar member name is cut and made unique again with a digest of the whole id."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", video_id)
    if len(key) > MAX_KEY:
        digest = hashlib.sha256(video_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        key = key[: MAX_KEY - len(digest) - 1] + "_" + digest
    return key


def write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    durable_replace(tmp, out_dir / MANIFEST)


def build_dali_index(tar_path: str | Path, idx_path: str | Path) -> None:
    """Write the DALI webdataset index of a finished shard with DALI's own ``wds2idx``."""
    from wds2idx import IndexCreator  # ships with nvidia-dali

    tmp = str(idx_path) + ".partial"
    with IndexCreator(str(tar_path), tmp, verbose=False) as creator:
        creator.create_index()
    durable_replace(tmp, idx_path)



def check_split_name(split: str) -> None:
    """A split names files (``<split>-000000.tar``): letters, digits and underscores only."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split name must be letters, digits and underscores, got {split!r}")


def _class_indices(values, what: str) -> np.ndarray:
    """Labels as int64 class indices, -1 meaning unlabelled; anything else (a fraction, NaN, a
    negative index below -1) is refused, where a cast would have truncated or kept it."""
    a = np.asarray(values)
    if a.size and a.dtype.kind not in "iub":
        if a.dtype.kind != "f" or not np.all(np.isfinite(a) & (a == np.round(a))):
            raise ValueError(f"{what} must be whole numbers (class indices, -1: unlabelled), e.g. got "
                             f"{a.reshape(-1)[0]!r}")
    a = a.astype(np.int64)
    if a.size and a.min() < -1:
        raise ValueError(f"{what} must be class indices >= 0, or -1 for unlabelled; got {a.min()}")
    return a


# A member's size in a USTAR header (the shards' format): 11 octal digits, 8 GiB - 1 byte. A larger
# video is its input's fault (skipped and counted), not a reason to stop the whole write.
TAR_MEMBER_MAX = 8**11 - 1


class SlotWriter:
    """Writes one slot of a split: the videos of inputs ``[slot * max_samples, (slot + 1) *
    max_samples)`` into ``<split>-<slot:06d>.tar``, continued in ``<split>-<slot:06d>_<part:02d>.tar``
    when ``max_bytes`` fills a shard. A slot's shards depend only on its inputs, so the same inputs
    give the same shards whichever worker writes them (see :mod:`carl_scale.datasets.parallel`)."""

    def __init__(self, out_dir: str | Path, split: str, slot: int, *, dataset: str, payload: Payload = "video",
                 encode: EncodeOptions | None = None, max_bytes: int = 1 << 30) -> None:
        if payload not in ("video", "jpeg"):
            raise ValueError(f"payload must be 'video' or 'jpeg', got {payload!r}")
        check_split_name(split)
        self.out_dir = Path(out_dir)
        self.split, self.slot, self.dataset, self.payload = split, slot, dataset, payload
        self.encode = encode or EncodeOptions()
        self.max_bytes = max_bytes
        self._shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._tar_path: Path | None = None
        self._count = self._bytes = 0
        self.keys: list[str] = []  # in order, for the record
        self._key_set: set[str] = set()  # (the duplicate check: a list scan was quadratic in a slot's size)
        self.frames = 0
        self.actions: dict[str, int] = {}  # videos written per action label (JSON keys: its index as text)
        self.codecs: set[str] = set()
        self.skipped: list[dict] = []

    # -- writing -------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        part = len(self._shards)
        name = f"{self.split}-{self.slot:06d}" + (f"_{part:02d}" if part else "") + ".tar"
        self._tar_path = self.out_dir / (name + ".partial")
        self._tar = tarfile.open(self._tar_path, "w", format=tarfile.USTAR_FORMAT)
        self._count = self._bytes = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self._tar_path.with_suffix("")  # strip ".partial"
        durable_replace(self._tar_path, final)
        idx = final.with_suffix(".idx")
        build_dali_index(final, idx)
        self._shards.append({"path": final.name, "index": idx.name, "samples": self._count,
                             "bytes": final.stat().st_size})
        self._tar = None

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # reproducible shards
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, rec: VideoRecord) -> None:
        """Encode (if needed) and append one video. A record that cannot be encoded as asked or
        does not add up (odd frame sizes for 4:2:0, label counts, a repeated id: a ValueError)
        raises :class:`SkipInput` before anything of it is in the shard; anything else (a missing
        encoder, a shard that cannot be written) propagates and stops the write."""
        try:
            key, fields, n = self._sample(rec)
        except UnknownCodecError:  # the machine lacks the encoder: every input would fail, so stop
            raise
        except ValueError as exn:  # this input's frames, labels or id do not fit: skip it
            raise SkipInput(f"{type(exn).__name__}: {exn}") from exn
        size = sum(len(v) for v in fields.values())
        if self._tar is not None and self._bytes + size > self.max_bytes:
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        for ext, data in fields.items():
            self._add_member(f"{key}.{ext}", data)
        self.keys.append(key)
        self._key_set.add(key)
        self.frames += n
        label = str(int(rec.action_label))
        self.actions[label] = self.actions.get(label, 0) + 1
        self._count += 1
        self._bytes += size

    def _sample(self, rec: VideoRecord) -> tuple[str, dict[str, bytes], int]:
        """The tar members of one video: (key, {extension: bytes}, frame count)."""
        key = sample_key(rec.video_id)
        if key in self._key_set:
            raise ValueError(f"duplicate video_id {rec.video_id!r} (key {key!r}) in split {self.split!r}")
        if rec.frames is None and None in (rec.num_frames, rec.height, rec.width):
            raise ValueError("a pre-encoded record needs num_frames, height and width")
        n = rec.num_frames if rec.frames is None else len(rec.frames)
        if n < 1:  # (nothing to sample views from or to embed: the loader and the evaluation would fail on it)
            raise ValueError(f"{rec.video_id}: no frames")
        h = rec.height if rec.frames is None else rec.frames.shape[1]
        w = rec.width if rec.frames is None else rec.frames.shape[2]
        phases = (np.full(n, -1, np.int64) if rec.phase_labels is None
                  else _class_indices(rec.phase_labels, f"{rec.video_id}: phase labels"))
        if len(phases) != n:
            raise ValueError(f"{rec.video_id}: {len(phases)} phase labels for {n} frames")
        _class_indices([rec.action_label], f"{rec.video_id}: its action label")
        frame_labels = {name: _class_indices(lab, f"{rec.video_id}: {name!r} frame labels").reshape(-1)
                        for name, lab in rec.frame_labels.items()}
        for name, lab in frame_labels.items():
            if len(lab) != n:
                raise ValueError(f"{rec.video_id}: {len(lab)} {name!r} frame labels for {n} frames")
        fields = self._payload_fields(rec)  # (after the labels: a record refused for them is not encoded)
        meta = {
            "video_id": rec.video_id, "dataset": self.dataset, "split": self.split,
            "fps": float(rec.fps), "num_frames": int(n), "height": int(h), "width": int(w),
            "action_label": int(rec.action_label), "phase_labels": phases.tolist(),
            **({"frame_labels": {k: v.tolist() for k, v in frame_labels.items()}} if frame_labels else {}),
            "payload": self.payload,
            "codec": "jpeg" if self.payload == "jpeg" else (rec.codec or self.encode.codec),
            **rec.extra,
        }
        fields["json"] = json.dumps(meta).encode()
        fields["nframes"] = np.int32(n).tobytes()
        big = max(fields, key=lambda ext: len(fields[ext]))
        if len(fields[big]) > TAR_MEMBER_MAX:  # tarfile would stop the whole write, naming no video
            raise ValueError(f"{rec.video_id}: its {big!r} payload is {len(fields[big]) / 2**30:.1f} GiB, over the "
                             f"tar format's {TAR_MEMBER_MAX / 2**30:.0f} GiB a member: store it smaller "
                             f"(--transcode, --short-side) or cut it into clips")
        self.codecs.add(meta["codec"])
        return key, fields, int(n)

    def _payload_fields(self, rec: VideoRecord) -> dict[str, bytes]:
        if self.payload == "video":
            if rec.encoded is not None:
                if rec.num_frames is None or rec.height is None or rec.width is None:
                    raise ValueError("a pre-encoded record needs num_frames, height and width")
                return {"video": rec.encoded}
            return {"video": encode_video(rec.frames, rec.fps, self.encode)}
        if rec.frames is None:
            raise ValueError("payload='jpeg' needs decoded frames")
        blob, offsets = encode_jpeg_frames(rec.frames, self.encode.jpeg_quality)
        return {"jpgs": blob, "jpgofs": offsets.astype("<i8").tobytes()}

    def skip(self, source: str, reason: str) -> None:
        """Record an input that could not be written (counted in the manifest, never silent)."""
        self.skipped.append({"source": source, "reason": reason})

    def close(self) -> dict:
        """Finish the last shard; returns the slot's record (its shards, skipped inputs, keys, frames,
        videos per action label)."""
        self._close_shard()
        return {"shards": self._shards, "skipped": self.skipped, "keys": self.keys, "frames": self.frames,
                "codecs": sorted(self.codecs), "actions": dict(self.actions)}

    def abort(self) -> None:
        """Stop without finishing: the open shard stays ``.partial``, which nothing reads."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
