"""Kinetics-400 as it is distributed -> shards.

Input: the official annotation CSVs (columns ``label, youtube_id, time_start, time_end, split``,
sometimes ``is_cc``; a CSV without a ``split`` column takes it from its file name: ``train.csv``,
``validate.csv``/``val.csv``, ``test.csv``) and a directory holding the clips, named
``<youtube_id>_<start:06d>_<end:06d>.<ext>``, found wherever they are below it (``<split>/<class
name>/`` folders, renamed folders, or flat).

* Class index = the label's position in the sorted list of every label in the annotations (the
  usual K400 order), so indices never depend on which clips are present; the names go to the
  manifest's ``label_names["actions"]``. Each split of the CSVs becomes a split of the output.
* A few percent of K400 is always missing or broken. Missing clips and clips that cannot be read
  (zero bytes, no moov atom, cut short, no video stream) are skipped and listed in the manifest
  with their reason; :func:`summary_rows` counts them per split and reason.
* Default: the original bytes are stored (H.264 for GPU decoding); the frame count comes from the
  container's packets (demuxing, no decoding to RGB: 18x faster, the README's table). ``transcode``
  re-encodes (short side, codec, GOP) for CPU-decodable or faster-seeking shards.
* Variable frame rate: a stored clip's frames are found by ``pts x rate``, which is only right at a
  constant rate, so a VFR clip is refused (reason ``variable frame rate``) when stored as is, and
  resampled to its nominal rate (that of its median frame interval; each output frame is the last
  source frame shown at its time, so no frame is dropped where the clip runs at that rate and
  frames repeat where it runs slower) when transcoded.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np

from carl_scale.data.codec import decode_rgb
from carl_scale.datasets.encode import check_source_options, constant_rate_picks, frame_timing
from carl_scale.datasets.parallel import SkipInput, add_warnings, not_the_input, write_options, write_split
from carl_scale.datasets.writer import VideoRecord

log = logging.getLogger("carl_scale.data")

SPLITS = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test"}
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
SKIP_KINDS = ("missing", "unreadable", "variable frame rate")  # the reasons' first words


class Clip(NamedTuple):
    """One annotation row: what a clip should be (its file is looked up when it is written)."""

    clip_id: str  # <youtube_id>_<start:06d>_<end:06d>
    label: str  # class name ("" for an unlabelled test row)
    split: str


@dataclass(frozen=True)
class Kinetics400Options:
    transcode: bool = False  # re-encode with the writer's codec/GOP (always done for payload=jpeg)
    short_side: int | None = None  # resize so the short side is this (implies transcode)
    limit: int | None = None  # at most this many clips per split (a trial run)

    def __post_init__(self) -> None:  # refused before anything is written
        check_source_options(short_side=self.short_side, limit=self.limit)


def clip_id(youtube_id: str, start: float, end: float) -> str:
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}"


def read_annotations(paths: list[str | Path]) -> tuple[list[Clip], list[str], list[str]]:
    """The clips of every CSV (a clip listed twice is kept once), the sorted class names, and
    warnings about repeated or unsplit rows."""
    clips: dict[tuple[str, str], Clip] = {}
    warnings: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"--annotations {path} does not exist: give the Kinetics-400 CSVs "
                                    f"(train.csv, validate.csv, test.csv)")
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                cols = set(reader.fieldnames or [])
                if not {"youtube_id", "time_start", "time_end"} <= cols:
                    raise ValueError(f"{path}: needs the columns youtube_id, time_start, time_end (and label, split); "
                                     f"got {sorted(cols)}")
                default = SPLITS.get(path.stem.lower().split("_")[-1]) or SPLITS.get(path.stem.lower())
                if "split" not in cols and default is None:
                    raise ValueError(f"{path}: no 'split' column, and its name does not say the split (train.csv, "
                                     f"validate.csv, test.csv)")
                for line, row in enumerate(reader, start=2):
                    given = (row.get("split") or "").strip().lower()
                    split = SPLITS.get(given) if given else default  # an unknown value is refused, not guessed
                    if split is None:
                        raise ValueError(f"{path}:{line}: unknown split {row.get('split')!r} (expected one of "
                                         f"{sorted(set(SPLITS))})")
                    try:
                        cid = clip_id(row["youtube_id"].strip(), row["time_start"], row["time_end"])
                    except (ValueError, TypeError, OverflowError, AttributeError):  # (a short row: None fields)
                        raise ValueError(f"{path}:{line}: youtube_id, time_start and time_end must be given, the "
                                         f"times as finite numbers: {row}") from None
                    clip = Clip(cid, (row.get("label") or "").strip(), split)
                    if (cid, split) in clips and clips[(cid, split)] != clip:
                        warnings.append(f"{path}:{line}: {cid} is listed again with label {clip.label!r}; kept "
                                        f"{clips[(cid, split)].label!r}")
                    clips.setdefault((cid, split), clip)
        except UnicodeDecodeError as exn:
            raise ValueError(f"{path} is not UTF-8 text ({exn}): save it as UTF-8") from None
    names = sorted({c.label for c in clips.values() if c.label})
    splits_of: dict[str, list[str]] = {}
    for cid, split in clips:
        splits_of.setdefault(cid, []).append(split)
    both = sorted(cid for cid, splits in splits_of.items() if len(splits) > 1)
    if both:  # (the official lists never do: a validation video trained on would inflate its scores)
        warnings.append(f"{len(both)} clip(s) are listed in more than one split and written into each, e.g. {both[0]} "
                        f"({', '.join(sorted(splits_of[both[0]]))}): check the annotation CSVs")
    return list(clips.values()), names, warnings


def find_clips(videos: str | Path) -> tuple[dict[str, Path], list[str]]:
    """Clip id -> file, wherever it is below ``videos``; a second file with the same id is
    reported and not used."""
    videos = Path(videos)
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos {videos} is not a directory of Kinetics-400 clips")
    found: dict[str, Path] = {}
    warnings: list[str] = []
    for p in sorted(videos.rglob("*")):
        if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file():
            if p.stem in found:
                warnings.append(f"{p} has the same clip id as {found[p.stem]}; using the latter")
                continue
            found[p.stem] = p
    return found, warnings


class ProbeResult(NamedTuple):
    num_frames: int
    fps: float
    height: int
    width: int
    codec: str
    variable_rate: bool


def probe(path: Path) -> ProbeResult:
    """What a clip holds, from its container and packets (no decoding beyond the first frame);
    raises for a clip that cannot be read or is cut short."""
    if path.stat().st_size == 0:
        raise ValueError("zero bytes")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        listed = int(stream.frames or 0)
        # (a packet marked discard, from an edit list of a stream-copy cut, is decoded but never shown)
        pts = [p.pts for p in container.demux(stream) if p.size > 0 and p.pts is not None and not p.is_discard]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        tb = float(stream.time_base)
        codec, height, width = stream.codec_context.name, stream.codec_context.height, stream.codec_context.width
    if not pts:
        raise ValueError("no video packets")
    if listed and len(pts) < listed - max(2, listed // 100):
        raise ValueError(f"{len(pts)} of the {listed} frames its container lists (cut short)")
    with av.open(str(path)) as container:  # the first frame decodes: the codec is one we can read
        next(container.decode(video=0))
    step, vfr = frame_timing(pts)
    if vfr or rate <= 0:  # the nominal rate: a VFR clip is resampled to it, no frame of it dropped
        rate = 1.0 / (step * tb) if step else 25.0
    return ProbeResult(len(pts), rate, height, width, codec, vfr)


def decode_constant_rate(path: Path, fps: float, short_side: int | None) -> np.ndarray:
    """Every frame, resampled to a constant ``fps``: output frame k is the last source frame
    shown at time k / fps (for a constant-rate clip, each source frame once)."""
    times, frames = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            times.append(float(frame.pts * stream.time_base))
            frames.append(decode_rgb(frame, short_side))
    if not frames:
        raise ValueError("no decodable frames")
    # Into one array, each source frame let go after its last use: a list plus a stacked copy of a
    # 10 s 720p clip is 1.7 GB per writer process (7 GB at 1080p60)
    picks = constant_rate_picks(np.asarray(times), fps)
    last_use = {int(i): k for k, i in enumerate(picks)}
    out = np.empty((len(picks), *frames[0].shape), np.uint8)
    for i in range(len(frames)):
        if i not in last_use:
            frames[i] = None
    for k, i in enumerate(picks):
        out[k] = frames[i]
        if last_use[int(i)] == k:
            frames[i] = None
    return out


def write_kinetics400_shards(annotations: list[str | Path], videos: str | Path, out_dir: str | Path,
                             opts: Kinetics400Options | None = None, **write) -> dict:
    """Write every split of the annotations (see the module docstring); returns the manifest.
    ``write``: the keyword arguments of :func:`~carl_scale.datasets.parallel.write_options`."""
    opts = opts or Kinetics400Options()
    clips, names, warnings = read_annotations(annotations)
    if not clips:
        raise ValueError(f"--annotations {' '.join(map(str, annotations))}: no clips listed (a header only?)")
    found, more = find_clips(videos)
    for w in warnings + more:
        log.warning("%s", w)
    wopts = write_options(**write)
    transcode = opts.transcode or opts.short_side is not None or wopts.payload == "jpeg"
    index = {name: i for i, name in enumerate(names)}
    videos = Path(videos)

    def load(clip: Clip) -> VideoRecord:
        path = found.get(clip.clip_id)
        if path is None:
            raise SkipInput(f"missing: no file {clip.clip_id}.* under {videos} (once it is there, rerun with "
                            f"--retry-skipped to add it)")
        try:
            info = probe(path)
        except Exception as exn:
            if not_the_input(exn):  # (the write stops: a skip would never be tried again)
                raise
            raise SkipInput(f"unreadable: {type(exn).__name__}: {exn}") from None
        label = index.get(clip.label, -1)
        extra = {"source": str(path.relative_to(videos)), "label_name": clip.label}
        if not transcode:
            if info.variable_rate:
                raise SkipInput("variable frame rate: its frames cannot be found by timestamp when stored as is; "
                                "rerun with --transcode to resample it to a constant rate")
            return VideoRecord(clip.clip_id, None, info.fps, label, encoded=path.read_bytes(),
                               num_frames=info.num_frames, height=info.height, width=info.width, codec=info.codec,
                               extra=extra)
        try:
            frames = decode_constant_rate(path, info.fps, opts.short_side)
        except Exception as exn:
            if not_the_input(exn):
                raise
            raise SkipInput(f"unreadable: {type(exn).__name__}: {exn}") from None
        return VideoRecord(clip.clip_id, frames, info.fps, label,
                           extra={**extra, "resampled_from_variable_rate": info.variable_rate})

    by_split: dict[str, list[Clip]] = {}
    for clip in clips:
        by_split.setdefault(clip.split, []).append(clip)
    for split, items in sorted(by_split.items()):
        items = sorted(items)[: opts.limit]
        write_split(out_dir, split, items, load, dataset="kinetics400", opts=wopts, label_names={"actions": names},
                    describe=lambda c: c.clip_id,  # the plan covers each clip's label too: a fixed CSV is no resume
                    settings={**asdict(opts), "labels": names, "clip_labels": [c.label for c in items]})
    return add_warnings(out_dir, warnings + more, sorted(by_split))


def skip_kind(reason: str) -> str:
    """What a skip's reason has in common with others of its kind (no clip id or path): "missing",
    "unreadable: <error class>", "variable frame rate", or the reason's first words."""
    head = reason.split(":")
    if head[0] == "unreadable" and len(head) > 1:
        return f"unreadable: {head[1].strip()}"
    return next((k for k in SKIP_KINDS if reason.startswith(k)), head[0][:60])


def summary_rows(manifest: dict) -> list[dict]:
    """Per split: videos written, missing, unreadable, other skips, frames and bytes."""
    rows = []
    for name, s in sorted(manifest["splits"].items()):
        kinds = [next((k for k in SKIP_KINDS if sk["reason"].startswith(k)), "other") for sk in s["skipped"]]
        rows.append({"split": name, "written": s["samples"], **{k: kinds.count(k) for k in (*SKIP_KINDS, "other")},
                     "frames": s.get("frames", 0), "GiB": sum(x["bytes"] for x in s["shards"]) / 2**30})
    return rows
