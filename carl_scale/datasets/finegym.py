"""FineGym -> shards: one sample per event, every frame labelled with its Gym99 element class
(``phase_labels``) and its Gym288 class (``frame_labels["gym288"]``), so one shard set serves
both of the paper's FineGym columns (Table 3).

What the official annotation files hold (FineGym project page, "download"):

* ``finegym_annotation_info_<version>.json``: ``{youtube_id: {"E_XXXXXX_YYYYYY": event}}``, the
  event key holding its start and end in whole seconds; ``event["event"]`` is the event class,
  ``event["timestamps"] = [[start, end]]`` in seconds of the YouTube video, and
  ``event["segments"]`` (null for men's events) ``{"A_ZZZZ_WWWW": {"stages": n, "timestamps":
  [[s, e], ...]}}``, one pair per stage (vault has 3), in seconds from the event's start;
* ``gym{99,288}_{train_element_<version>,val_element}.txt``: lines
  ``<youtube_id>_E_XXXXXX_YYYYYY_A_ZZZZ_WWWW <class>``.

What a sample is, as the CARL code prepares FineGym (so numbers compare with the paper's):
events with at least one element labelled in the split's file (of either class set), resampled
to 25 fps; an element's class covers frames ``int(s * fps) .. int(e * fps)`` of its *last* stage
(only a vault's third stage is labelled), a later element overwrites an overlapping earlier one,
every other frame is -1. Two differences: the CARL code cuts events with ``ffmpeg -ss`` and stream
copy, which starts at the keyframe before the event; here the cut starts at the event's start.
And it prepares one dataset per class set (the events of that set's lists); here one shard set
holds the events of both, each labelled in both sets (-1 where a set's lists lack the event): the
transfer probe of each set trains on its own events only, pretraining sees them all.

Videos: ``<youtube_id>_E_XXXXXX_YYYYYY.<ext>`` (an event already cut out, time 0 = its start)
or ``<youtube_id>.<ext>`` (the whole YouTube video; the event is cut out of it), anywhere
under ``videos``. An event with neither, or an unreadable file, is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from carl_scale.data.codec import decode_rgb
from carl_scale.data.manifest import read_manifest
from carl_scale.datasets.encode import check_source_options
from carl_scale.datasets.folder import VIDEO_EXTENSIONS
from carl_scale.datasets.parallel import SkipInput, labels_digest, write_options, write_split
from carl_scale.datasets.writer import VideoRecord

log = logging.getLogger("carl_scale.data")

CLASS_SETS = ("gym99", "gym288")
# event classes 1-4 are the women's apparatus (1 = vault: the only 3-stage event); the men's
# events (5-10) have no element annotations, so they never become samples
EVENT_NAMES = ["VT", "FX", "BB", "UB", "men_5", "men_6", "men_7", "men_8", "men_9", "men_10"]
DOWNLOAD = "https://sdolivia.github.io/FineGym/ (section 'Download')"
_ELEMENT_ID = re.compile(r"^(?P<yt>.+)_(?P<event>E_\d{6}_\d{6})_(?P<seg>A_\d{4}_\d{4})$")


@dataclass
class FineGymOptions:
    version: str = "v1.1"  # of the annotation JSON and the train split files (CARL used v1.0)
    fps: float = 25.0
    short_side: int | None = 360  # the CARL code's 640x360; None keeps the source size
    limit: int | None = None  # at most this many events per split (a quick look)

    def __post_init__(self) -> None:  # refused before anything is written, as the other converters' options
        check_source_options(fps=self.fps, short_side=self.short_side, limit=self.limit)


def split_files(annotations: Path, version: str) -> dict[str, dict[str, Path]]:
    return {split: {cs: annotations / (f"{cs}_train_element_{version}.txt" if split == "train"
                                       else f"{cs}_val_element.txt") for cs in CLASS_SETS}
            for split in ("train", "val")}


def read_element_labels(path: Path) -> dict[tuple[str, str, str], int]:
    """``{(youtube_id, event_key, segment_key): class}`` from one split file."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        m = _ELEMENT_ID.match(parts[0]) if len(parts) == 2 else None
        cls = int(parts[1]) if m is not None and parts[1].isdigit() else -1
        top = 98 if path.name.startswith("gym99") else 287 if path.name.startswith("gym288") else None
        if m is None or cls < 0 or (top is not None and cls > top):
            raise ValueError(f"{path}:{n}: expected '<youtube_id>_E_XXXXXX_YYYYYY_A_ZZZZ_WWWW <class>'"
                             f"{f' with a class in 0..{top}' if top is not None else ''}, got {line!r}")
        out[(m["yt"], m["event"], m["seg"])] = cls
    return out


def event_frame_labels(event: dict, labels: dict[str, int], num_frames: int, fps: float) -> np.ndarray:
    """Per-frame classes of one event: ``labels`` maps its segment keys to classes."""
    out = np.full(num_frames, -1, np.int64)
    for seg_key, seg in (event.get("segments") or {}).items():  # JSON order: later ones overwrite
        if seg_key in labels:
            s, e = seg["timestamps"][-1]  # the last stage only
            out[int(s * fps): int(e * fps) + 1] = labels[seg_key]
    return out


_EPS = 1e-6  # seconds: far below any time base, far above float error in t0 + k / fps


def decode_span(path: Path, start: float | None, end: float | None, fps: float,
                short_side: int | None) -> np.ndarray:
    """Frames of ``path`` from ``start`` to ``end`` seconds (None: from the first / to the last
    frame) resampled to ``fps``: output frame k is the source frame on screen at ``start + k/fps``
    (times within a microsecond count as equal, so 25 -> 25 fps keeps every frame once). Seeks to
    the keyframe before ``start``, so cutting an event out of an hour-long video decodes only a
    little more than the event."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        base = stream.start_time or 0
        # FFmpeg's AVI demuxer labels the frames after a seek one frame late: decode AVIs from the start
        if start and "avi" not in container.format.name.split(","):
            container.seek(base + int(start / stream.time_base), stream=stream)
        t0, step = start or 0.0, 1.0 / fps
        src_step = 1.0 / float(stream.average_rate or stream.guessed_rate or fps)
        duration = float(stream.duration * stream.time_base) + src_step if stream.duration else None
        limit = float("inf") if end is None else end - _EPS  # output times must lie before this
        # one buffer, sized by the span (capped by the stream, so a bad ``end`` can't blow it up),
        # doubled if that was short: no list of frames plus a stacked copy
        known = [x for x in (end, duration) if x is not None]
        size = max(1, int(np.ceil((min(known) - t0) * fps)) + 1) if known else 256
        out: np.ndarray | None = None
        k, cur, cur_rgb, t_last = 0, None, None, None

        def emit() -> None:
            nonlocal out, cur_rgb, k
            if cur_rgb is None:  # convert a source frame once, however many outputs show it
                cur_rgb = decode_rgb(cur, short_side)
            if out is None:
                out = np.empty((size, *cur_rgb.shape), np.uint8)
            elif k == len(out):
                out = np.concatenate([out, np.empty_like(out)])
            out[k] = cur_rgb
            k += 1

        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float((frame.pts - base) * stream.time_base)
            while t0 + k * step < t - _EPS and t0 + k * step < limit:  # output k comes before this frame
                if cur is None:  # nothing on screen yet at the first output time: show this frame
                    cur, cur_rgb = frame, None
                emit()
            if t0 + k * step >= limit:
                break
            if cur is not frame:
                cur, cur_rgb = frame, None
            t_last = t
        # the last source frame stays on screen for one source frame period (or to ``end``)
        stop = -1.0 if t_last is None else min(t_last + src_step - _EPS, limit)
        while cur is not None and t0 + k * step < stop:
            emit()
    if k == 0:
        raise ValueError(f"no frames between {start} and {end} s (the video is {t_last} s long)")
    return out[:k] if k > len(out) // 2 else out[:k].copy()  # a copy frees a mostly unused buffer


def _find_videos(videos: Path) -> dict[str, Path]:
    """Video id (file stem) -> file below ``videos``; of two files with one stem (a re-download
    beside the first, an .mkv and an .mp4) the first in path order, with a warning naming both."""
    found: dict[str, Path] = {}
    for p in sorted(videos.rglob("*")):
        if p.suffix.lower() in VIDEO_EXTENSIONS:
            if p.stem in found:
                log.warning("finegym: %s and %s are both video %r: %s is used", found[p.stem], p, p.stem, found[p.stem])
                continue
            found[p.stem] = p
    return found


def write_finegym_shards(videos: str | Path, annotations: str | Path, out_dir: str | Path,
                         opts: FineGymOptions | None = None, **write) -> dict:
    """Write the train and val events (see the module docstring); returns the manifest."""
    opts = opts or FineGymOptions()
    videos, annotations = Path(videos), Path(annotations)
    info_path = annotations / f"finegym_annotation_info_{opts.version}.json"
    files = split_files(annotations, opts.version)
    for path in [info_path] + [p for s in files.values() for p in s.values()]:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: download FineGym's annotations ({opts.version}) from "
                                    f"{DOWNLOAD} into {annotations}, or pass --version to match the files you have")
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos {videos} is not a directory of FineGym videos (<youtube_id>.mp4 or "
                                f"event clips <youtube_id>_E_XXXXXX_YYYYYY.mp4)")
    try:
        info = json.loads(info_path.read_text())
    except ValueError as exn:  # (UnicodeDecodeError too)
        raise ValueError(f"{info_path} is not readable JSON ({exn}): download it again from {DOWNLOAD}") from None
    found = _find_videos(videos)
    label_names = {"actions": EVENT_NAMES, "phase_labels": "Gym99 element classes (0-98)",
                   "frame_labels": {"gym288": "Gym288 element classes (0-287)"}}
    # every split's lists read (and refused) before the first shard is written
    split_events = {}
    for split, paths in files.items():
        by_event: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
        for cs, path in paths.items():
            for (yt, ev, seg), cls in read_element_labels(path).items():
                by_event.setdefault((yt, ev), {c: {} for c in CLASS_SETS})[cs][seg] = cls
        if not by_event:
            raise ValueError(f"the {split} element lists ({', '.join(p.name for p in paths.values())}) list no "
                             f"element: download them again from {DOWNLOAD}")
        split_events[split] = by_event
    for split, by_event in split_events.items():
        events = sorted(by_event)[: opts.limit]

        def load(key: tuple[str, str], by_event=by_event) -> VideoRecord:
            yt, ev = key
            event_id = f"{yt}_{ev}"
            event = info.get(yt, {}).get(ev)
            if event is None:
                raise SkipInput(f"not in {info_path.name}")
            if event_id in found:
                path, start, end = found[event_id], None, None
            elif yt in found:
                path, (start, end) = found[yt], event["timestamps"][0]
            else:
                raise SkipInput(f"no video {event_id}.* or {yt}.* under {videos}")
            frames = decode_span(path, start, end, opts.fps, opts.short_side)
            labels = {cs: event_frame_labels(event, by_event[(yt, ev)][cs], len(frames), opts.fps)
                      for cs in CLASS_SETS}
            return VideoRecord(event_id, frames, opts.fps, int(event["event"]) - 1, labels["gym99"],
                               frame_labels={"gym288": labels["gym288"]},
                               extra={"source": str(path.relative_to(videos)), "event_start": start})

        entry = write_split(out_dir, split, events, load, dataset="finegym", opts=write_options(**write),
                            label_names=label_names, describe=lambda key: f"{key[0]}_{key[1]}",
                            settings=asdict(opts),
                            labels=labels_digest(info_path, *files[split].values()))  # (what this split reads)
        if entry["skipped"]:
            log.warning("finegym %s: skipped %d of %d events (listed in shards.json)", split, len(entry["skipped"]),
                        len(events))
    return read_manifest(out_dir)
