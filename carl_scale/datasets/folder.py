"""A folder of the user's own videos -> shards, through :func:`~carl_scale.datasets.parallel.write_split`
like every dataset."""

from __future__ import annotations

import csv
import logging
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import numpy as np

from carl_scale.data.codec import decode_rgb
from carl_scale.data.manifest import read_manifest
from carl_scale.datasets.encode import check_source_options, constant_rate_picks, frame_timing
from carl_scale.datasets.parallel import SkipInput, add_warnings, labels_digest, write_options, write_split
from carl_scale.datasets.writer import TAR_MEMBER_MAX, VideoRecord, check_split_name, sample_key

log = logging.getLogger("carl_scale.data")

VIDEO_EXTENSIONS = {".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif", ".flv", ".wmv",
                    ".3gp", ".ts", ".mts", ".m2ts", ".vob", ".asf", ".f4v"}
# files of other extensions under --src are not read, and said so (a label file or a note is expected there)
_NOT_VIDEOS = {".txt", ".npy", ".csv", ".json", ".md", ".pkl", ".mat", ".jpg", ".jpeg", ".png"}


@dataclass
class FolderOptions:
    labels_csv: str | None = None  # columns: video (path relative to src, or stem), label[, split]
    frame_labels: str | None = None  # directory of <stem>.txt (one int per frame) or <stem>.npy
    # more per-frame label sets, name -> directory of the same layout (FineGym: {"gym288": ...}
    # beside Gym99 as frame_labels); a video without a file gets -1 for that set
    extra_frame_labels: dict[str, str] = field(default_factory=dict)
    split: str = "train"  # split of videos the CSV does not assign
    val_fraction: float = 0.0  # move this fraction (hash of the name) of unassigned videos to val
    transcode: bool = False  # re-encode (always done for payload=jpeg)
    short_side: int | None = None  # resize so the short side is this (implies transcode)

    def __post_init__(self) -> None:  # refused before anything is written
        check_split_name(self.split)
        if self.labels_csv is not None and not Path(self.labels_csv).is_file():
            raise FileNotFoundError(f"--labels {self.labels_csv} does not exist (a CSV with columns video, label "
                                    f"and optionally split)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        check_source_options(short_side=self.short_side)
        if any(not k for k in self.extra_frame_labels):
            raise ValueError("--extra-frame-labels takes NAME=DIR with a NAME, e.g. gym288=gym288_labels/")
        for flag, d in (("--frame-labels", self.frame_labels),
                        *((f"--extra-frame-labels {k}", v) for k, v in self.extra_frame_labels.items())):
            if d == "":  # (Path("") is the current directory: every video would be unlabelled, unsaid)
                raise ValueError(f"{flag} is empty: name the directory of <video stem>.txt or .npy files, or "
                                 f"leave the flag out")
            if d is not None and not Path(d).is_dir():
                raise FileNotFoundError(f"{flag} {d} is not a directory (of <video stem>.txt or .npy files)")


def _read_labels_csv(path: str) -> tuple[dict[str, tuple[str, str | None]], list[str]]:
    """{video: (label, split or None)} and, per row that is overridden, a warning; a later row for
    the same video wins (and is reported)."""
    rows: dict[str, tuple[str, str | None]] = {}
    warnings: list[str] = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"video", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: needs a header with columns 'video' and 'label' (optional 'split'), "
                                 f"got {reader.fieldnames}")
            for line, r in enumerate(reader, start=2):
                video = (r["video"] or "").strip()
                row = ((r["label"] or "").strip(), (r.get("split") or "").strip() or None)
                if video in rows and rows[video] != row:
                    warnings.append(f"{path}:{line}: {video!r} is listed again; this row ({row[0]}) replaces the "
                                    f"earlier one ({rows[video][0]})")
                rows[video] = row
    except UnicodeDecodeError as exn:
        raise ValueError(f"{path} is not UTF-8 text ({exn}): save it as UTF-8") from None
    return rows, warnings


def _as_int(label: str) -> int | None:
    """A label written as an integer ("3", "-1", or "3.0" as a spreadsheet exports it), else None."""
    try:
        value = float(label)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _class_names(used: list[str], where: str | None) -> list[str]:
    """Sorted class names of the labels videos actually have; [] when they are all integers
    (used as they are). A blank label is none (the video is unlabelled, -1); integers mixed with
    names are refused (sorted as text, "10" would come before "2")."""
    names = sorted({n for n in used if n})
    ints = [n for n in names if _as_int(n) is not None]
    if ints and len(ints) < len(names):
        other = next(n for n in names if _as_int(n) is None)
        raise ValueError(f"{where}: the labels mix integers ({ints[0]!r}) and names ({other!r}): use one or the "
                         f"other (integers are used as class indices, names are sorted into them)")
    return [] if ints else names


def _frame_labels(directory: str | None, stem: str) -> np.ndarray | None:
    if directory is None:
        return None
    d = Path(directory)
    if (d / f"{stem}.npy").exists():
        return np.load(d / f"{stem}.npy", allow_pickle=False).reshape(-1)  # (the writer checks they are indices)
    if (d / f"{stem}.txt").exists():
        tokens = (d / f"{stem}.txt").read_text().split()
        bad = [t for t in tokens if not t.lstrip("-").isdigit()]
        if bad:
            raise ValueError(f"{d / (stem + '.txt')} has a token that is not an integer: {bad[0]!r}")
        return np.array(tokens, dtype=np.int64)
    return None


def _decode_file(path: Path, short_side: int | None,
                 transcode: bool) -> tuple[np.ndarray, int, float, str, np.ndarray | None, int]:
    """A file decoded: its frames as RGB (every one when ``transcode``; else the first only, for
    its size: a long file stored as is is never held in memory), how many there are, its rate, its
    codec, for a resampled file which source frame each output frame is (None: every frame once),
    and the number of source frames. A variable-frame-rate file is refused when it is to be stored
    as is (its frames could not be found by timestamp) and resampled to its nominal rate when it
    is transcoded; its per-frame labels are resampled alike."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream (is it a video file?)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 30.0)
        listed = int(stream.frames or 0)  # what the container's index says (0: it does not say)
        frames, pts = [], []
        buf = None  # the frames, when the container says how many: filled in place, never stacked (2x)
        most = 1 << 62  # frames that fit in half the memory available when decoding began
        for frame in container.decode(stream):  # every frame decoded: an unreadable file is found here
            if transcode or not frames:
                rgb = decode_rgb(frame, short_side)
                if transcode and not pts:
                    most = _frames_that_fit(rgb)
                    if listed:  # in one array: twice that at most (a variable-rate clip's resampled copy)
                        buf = np.empty((_check_fits(listed + max(2, listed // 100), most, 2, rgb, short_side),
                                        *rgb.shape), rgb.dtype)
                if buf is not None and len(pts) < len(buf):
                    buf[len(pts)] = rgb
                else:  # (no count listed, or more than listed: in a list, then stacked, then maybe resampled)
                    _check_fits(len(pts) + 1, most, 3, rgb, short_side, more=True)
                    frames.append(rgb)
            pts.append(frame.pts)
        codec, tb = stream.codec_context.name, float(stream.time_base or 0)
    if buf is not None:
        frames = buf[:min(len(pts), len(buf))] if not frames else np.concatenate([buf, np.stack(frames)])
    if not len(frames):
        raise ValueError("no decodable frames")
    # a truncated fast-start MP4 decodes its head without an error; a whole file may decode a frame
    # or two fewer than its container lists (edit lists, encoder priming), which is no loss
    if listed and len(pts) < listed - max(2, listed // 100):
        raise ValueError(f"decoded {len(pts)} of the {listed} frames its container lists (truncated?)")
    step, vfr = frame_timing([p for p in pts if p is not None]) if None not in pts and tb else (0.0, False)
    picks = None
    if vfr:
        if not transcode:
            raise SkipInput("variable frame rate: its frames cannot be found by timestamp when stored as is; "
                            "rerun with --transcode to resample it to a constant rate")
        if step > 0:
            fps = 1.0 / (step * tb)
            picks = constant_rate_picks(np.asarray(pts) * tb, fps)
            frames = np.asarray(frames)[picks]
        # else most timestamps repeat (a median step of 0): they cannot place the frames, which are
        # kept in decoding order at the container's nominal rate
    return np.asarray(frames), len(pts) if picks is None else len(picks), fps, codec, picks, len(pts)


def _available_memory() -> int | None:
    """Bytes the kernel says a process can still take without swapping (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _frames_that_fit(first: np.ndarray) -> int:
    """How many frames like ``first`` fit in half the memory available now (no limit where the
    system does not say)."""
    free = _available_memory()
    return (free // 2) // max(1, first.nbytes) if free is not None else 1 << 62


def _check_fits(frames: int, most: int, copies: int, first: np.ndarray, short_side: int | None, *,
                more: bool = False) -> int:
    """``frames`` when ``copies`` of them (the decoding's peak) fit in ``most`` frames, else
    :class:`SkipInput` (``more``: ``frames`` is a count so far): a long video decoded whole would
    get this process killed by the kernel, in every rerun at the same video, naming none."""
    if frames * copies <= most:
        return frames
    h, w = first.shape[:2]
    size = (f"its {frames} frames at {w}x{h} ({frames * first.nbytes / 2**30:.1f} GiB" if not more else
            f"its frames at {w}x{h} (over {frames * first.nbytes / 2**30:.1f} GiB in {frames}")
    raise SkipInput(f"decoded, {size}, up to {copies}x that while it is stacked and resampled) would take more than "
                    f"half of the memory available: cut it into shorter clips"
                    + ("" if short_side is not None and short_side <= 256 else ", or give a smaller --short-side")
                    + " (fewer --workers leave each more)")


def file_record(path: Path, video_id: str, label: int, phases: np.ndarray | None,
                extra: dict[str, np.ndarray | None], *, short_side: int | None, transcode: bool, source: str,
                label_slack: int = 0) -> VideoRecord:
    """One video file and its labels as a :class:`VideoRecord`: decoded (to count its frames and
    check it), then stored as is or re-encoded (``transcode``). Per-frame labels follow a
    variable-rate file's resampling; label sets whose length differs from the decoded frame count
    by at most ``label_slack`` are cut, or padded with -1 (a container's frame count and its
    decode can differ by a frame or two), larger differences skip the video."""
    size = path.stat().st_size
    if not transcode and size > TAR_MEMBER_MAX:  # (before decoding it, or reading it whole)
        raise SkipInput(f"{size / 2**30:.1f} GiB, over the tar format's {TAR_MEMBER_MAX / 2**30:.0f} GiB a member: "
                        f"store it smaller (--transcode, --short-side) or cut it into clips")
    frames, n, fps, codec, picks, source_frames = _decode_file(path, short_side, transcode)

    def fit(lab, length: int):
        if lab is None or len(lab) == length or abs(len(lab) - length) > label_slack:
            return lab
        return lab[:length] if len(lab) > length else np.concatenate([lab, np.full(length - len(lab), -1, lab.dtype)])
    given = [("phase", phases), *extra.items()]
    if picks is not None:  # labels name source frames: fitted to them, then they follow the resampling
        def follow(lab):
            lab = fit(lab, source_frames)
            return lab[picks] if lab is not None and len(lab) == source_frames else lab  # (others: refused below)
        phases, extra = follow(phases), {k: follow(v) for k, v in extra.items()}
    adjusted = {name: len(lab) for name, lab in given if lab is not None and len(lab) != (n if picks is None
                                                                                          else source_frames)}
    phases, extra = fit(phases, n), {k: fit(v, n) for k, v in extra.items()}
    bad = [f"{len(lab)} {name} frame labels" for name, lab in [("phase", phases), *extra.items()]
           if lab is not None and len(lab) != n]
    if bad:
        raise SkipInput(f"{', '.join(bad)} for {n} frames")
    # every video carries every named set, so readers never guess
    extra = {name: np.full(n, -1) if lab is None else lab for name, lab in extra.items()}
    notes = {"source": source, **({"label_lengths_fitted": adjusted} if adjusted else {})}
    if transcode:
        return VideoRecord(video_id, frames, fps, label, phases, frame_labels=extra, extra=notes)
    return VideoRecord(video_id, None, fps, label, phases, encoded=path.read_bytes(), num_frames=n,
                       height=frames.shape[1], width=frames.shape[2], codec=codec, frame_labels=extra, extra=notes)


def _video_id(rel: str) -> str:
    return rel.rsplit(".", 1)[0].replace("/", "__")


def write_folder_shards(src: str | Path, out_dir: str | Path, opts: FolderOptions | None = None, **write) -> dict:
    """Every video file under ``src`` (any codec PyAV reads) into shards (``write``: the keyword
    arguments of :func:`~carl_scale.datasets.parallel.write_options`). Unreadable videos (and
    those that decode to fewer frames than their container lists), label files that do not fit,
    and a second file whose name makes the same video id are skipped and listed in the manifest,
    never fatal. Label-CSV rows that replace another, match no video or match two files are
    warned about and listed under ``label_warnings``; the class list holds the labels in use."""
    opts = opts or FolderOptions()
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} {'is a file' if src.exists() else 'does not exist'}: pass the folder "
                                f"that holds your videos (searched with its subfolders)")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) under {src}")
    rows, warnings = _read_labels_csv(opts.labels_csv) if opts.labels_csv else ({}, [])
    other = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() not in VIDEO_EXTENSIONS | _NOT_VIDEOS)
    if other:  # never silently left out: a video of an extension not listed here would be
        warnings.append(f"{len(other)} file(s) under --src with an extension not read as video were left out, e.g. "
                        f"{other[0]!r} (read: {', '.join(sorted(VIDEO_EXTENSIONS))})")
    by_stem: dict[str, list[str]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(str(p.relative_to(src)))
    matched: dict[Path, str] = {}  # file -> the CSV row key that labels it
    for p in files:
        rel = str(p.relative_to(src))
        key = rel if rel in rows else p.stem if p.stem in rows else None
        if key is not None:
            matched[p] = key
    for key in sorted(set(rows) - set(matched.values())):
        warnings.append(f"{opts.labels_csv}: {key!r} matches no video under {src}; its label is not used")
    for key in sorted(k for k in set(matched.values()) if k in by_stem and len(by_stem[k]) > 1):
        warnings.append(f"{opts.labels_csv}: {key!r} matches {len(by_stem[key])} files ({', '.join(by_stem[key])}); "
                        f"each gets its label {rows[key][0]!r}")
    if opts.frame_labels is not None or opts.extra_frame_labels:
        for stem, rels in sorted(by_stem.items()):
            if len(rels) > 1:
                warnings.append(f"{', '.join(rels)} share the stem {stem!r}, so they share its per-frame label files")
    for flag, d in (("--frame-labels", opts.frame_labels),
                    *((f"--extra-frame-labels {k}", v) for k, v in opts.extra_frame_labels.items())):
        have = {p.stem for p in Path(d).iterdir() if p.suffix in (".txt", ".npy")} if d is not None else None
        lacking = sorted(p.stem for p in files if have is not None and p.stem not in have)
        if lacking:  # (those videos' frames are all unlabelled, -1)
            warnings.append(f"{flag} {d}: {len(lacking)} of {len(files)} videos have no label file there, e.g. "
                            f"{lacking[0]!r} (its frames get -1)")
    for w in warnings:
        log.warning("%s", w)
    names = _class_names([rows[k][0] for k in matched.values()], opts.labels_csv)
    by_split: dict[str, list[Path]] = {}
    for p in files:
        rel = str(p.relative_to(src))
        row = rows[matched[p]] if p in matched else None
        split = row[1] if row and row[1] else opts.split
        if not (row and row[1]) and opts.val_fraction > 0 and \
                zlib.crc32(os.fsencode(rel)) % 1000 < opts.val_fraction * 1000:
            split = "val"
        try:
            check_split_name(split)
        except ValueError as exn:
            raise ValueError(f"{opts.labels_csv if row and row[1] else '--split'}: {exn} (for {rel!r})") from None
        by_split.setdefault(split, []).append(p)
    # one video id per file across every split: a second file whose name gives the same id is skipped
    owner: dict[str, str] = {}
    for p in files:
        owner.setdefault(sample_key(_video_id(str(p.relative_to(src)))), str(p.relative_to(src)))
    wopts = write_options(**write)
    transcode = opts.transcode or opts.short_side is not None or wopts.payload == "jpeg"
    label_names = {"actions": names} if names else {}

    def load(p: Path) -> VideoRecord:
        rel = str(p.relative_to(src))
        vid = _video_id(rel)
        if owner[sample_key(vid)] != rel:
            raise SkipInput(f"its video id {sample_key(vid)!r} is already {owner[sample_key(vid)]!r}'s; "
                            f"rename one of the two files")
        row = rows[matched[p]] if p in matched else None
        label = -1 if row is None or not row[0] else (names.index(row[0]) if names else _as_int(row[0]))
        phases = _frame_labels(opts.frame_labels, p.stem)
        extra = {name: _frame_labels(d, p.stem) for name, d in opts.extra_frame_labels.items()}
        return file_record(p, vid, label, phases, extra, short_side=opts.short_side, transcode=transcode, source=rel)

    for split, paths in sorted(by_split.items()):
        entry = write_split(out_dir, split, paths, load, dataset=src.resolve().name, opts=wopts, label_names=label_names,
                            describe=lambda p: str(p.relative_to(src)),
                            settings={**asdict(opts), "labels": label_names, "rows": rows},
                            labels=labels_digest(*(Path(d) / f"{p.stem}{ext}" for p in paths for ext in (".npy", ".txt")
                                                   for d in (opts.frame_labels, *opts.extra_frame_labels.values())
                                                   if d is not None)))  # (the files this split reads)
        if entry["skipped"]:
            log.warning("%s: skipped %d of %d videos (listed in shards.json)", split, len(entry["skipped"]), len(paths))
    kept = sorted(set(read_manifest(out_dir)["splits"]) - set(by_split)) if wopts.overwrite else []
    if kept:  # (--overwrite replaces the splits this command writes: e.g. a val split of an earlier --val-fraction)
        warnings.append(f"--overwrite kept split(s) {', '.join(map(repr, kept))} of an earlier command, which this "
                        f"one did not write: remove them from {out_dir} if they are stale (their videos may now be "
                        f"in {', '.join(map(repr, sorted(by_split)))} too)")
        log.warning("%s", warnings[-1])
    return add_warnings(out_dir, warnings, sorted(by_split))
