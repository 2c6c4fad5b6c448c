"""PennAction -> shards, as the CARL code prepares it (so numbers compare with the paper's).

What the download holds: ``Penn_Action/frames/NNNN/NNNNNN.jpg`` (every frame of sequence NNNN)
and ``Penn_Action/labels/NNNN.mat`` (``action``, ``nframes``, ``train``, poses, boxes). Phase labels
are not part of it: the CARL code reads per-frame phase labels from a separate folder,
``<split>/<action>/<NNNN>.npy`` (one int per frame; split ``train`` or ``val``), which also decides
the split — not the ``.mat`` train flag. This module follows it:

* the 13 actions without repetition (``strum_guitar`` and ``jump_rope`` are left out), action
  label = index in :data:`ACTIONS`, taken from the ``.mat`` (or the label folder's name);
* a sequence without a label file is not part of the benchmark and is not written;
* when frame and label counts differ, the longer one is resampled to the shorter's length at
  ``floor(j * long / short)`` (as the CARL code does);
* frames squashed to 224x224 (aspect not kept), as the CARL code stores them;
* video ids ``NNNN_<action>`` (e.g. ``0001_baseball_pitch``); a sequence labelled twice is
  written once (the first label file, train before val) and the clash listed.

The CARL code's split has 1140 train / 966 val videos (:data:`CARL_SPLIT`, per action): a split
written with other counts, in total or per action, is warned about and the difference kept in
``shards.json`` (``warnings``), not fatal. A phase label beyond its action's phases skips the video.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from carl_scale.data.manifest import read_manifest
from carl_scale.datasets.encode import check_frame_size, check_source_options
from carl_scale.datasets.parallel import SkipInput, add_warnings, labels_digest, write_options, write_split
from carl_scale.datasets.writer import VideoRecord

log = logging.getLogger("carl_scale.data")

ACTIONS = ["baseball_pitch", "baseball_swing", "bench_press", "bowl", "clean_and_jerk", "golf_swing",
           "jumping_jacks", "pushup", "pullup", "situp", "squat", "tennis_forehand", "tennis_serve"]
# the label folders may use TCC's spellings
_ALIASES = {"bowling": "bowl", "pushups": "pushup", "pullups": "pullup", "squats": "squat", "situps": "situp"}
# The CARL code's split (its datasets/dataset_splits.py): videos per action (train, val), and how
# many phases each action's labels have (0 .. n-1; its phase classifiers have that many outputs)
CARL_SPLIT = {"baseball_pitch": (103, 63), "baseball_swing": (113, 57), "bench_press": (69, 71), "bowl": (134, 85),
              "clean_and_jerk": (40, 42), "golf_swing": (87, 77), "jumping_jacks": (56, 56), "pushup": (102, 106),
              "pullup": (98, 101), "situp": (50, 50), "squat": (111, 115), "tennis_forehand": (79, 74),
              "tennis_serve": (98, 69)}
PHASES = {"baseball_pitch": 4, "baseball_swing": 3, "bench_press": 2, "bowl": 3, "clean_and_jerk": 6,
          "golf_swing": 3, "jumping_jacks": 4, "pushup": 2, "pullup": 2, "situp": 2, "squat": 4,
          "tennis_forehand": 3, "tennis_serve": 4}
EXPECTED = {split: sum(n[k] for n in CARL_SPLIT.values()) for k, split in enumerate(("train", "val"))}  # 1140, 966
DOWNLOAD = ("PennAction from its project page (Penn_Action/frames, Penn_Action/labels); the phase labels are the "
            "per-frame label files the CARL code's README links (<split>/<action>/<NNNN>.npy)")


@dataclass
class PennActionOptions:
    fps: float = 30.0  # metadata only: the protocol works on frame indices
    # the CARL code squashes every frame to 224x224 (aspect not kept): the default, for numbers
    # that compare with the paper's; None keeps the aspect (then ``short_side``, or as downloaded)
    square: int | None = 224
    short_side: int | None = None
    limit: int | None = None  # at most this many videos per split (a quick look)

    def __post_init__(self) -> None:  # refused before anything is written
        check_source_options(fps=self.fps, short_side=self.short_side, limit=self.limit, square=self.square)


def read_phase_labels(path: Path) -> np.ndarray:
    return np.load(path).astype(np.int64).reshape(-1)


def match_lengths(frames: list[Path], labels: np.ndarray) -> tuple[list[Path], np.ndarray]:
    """The CARL code's fix for a frame/label count mismatch: resample the longer to the shorter."""
    n, m = len(frames), len(labels)
    if n > m:
        frames = [frames[j * n // m] for j in range(m)]
    elif m > n:
        labels = labels[[j * m // n for j in range(n)]]
    return frames, labels


def _action_of(root: Path, seq: str, folder: str) -> str:
    """The sequence's action as the CARL code names it: from its ``.mat``, else the label folder."""
    mat = root / "labels" / f"{seq}.mat"
    if mat.exists():
        from scipy.io import loadmat

        folder = str(loadmat(mat, variable_names=["action"])["action"][0])
    return _ALIASES.get(folder, folder)


def _linear_resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear from the 4 nearest pixels, no antialiasing: what OpenCV's ``cv2.resize`` (its
    default INTER_LINEAR), which the CARL code's preparation calls, does (to rounding); PIL's
    bilinear filter smooths over more pixels when shrinking."""
    import torch

    x = torch.as_tensor(np.array(frame, dtype=np.float32)).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return y[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _load_frames(paths: list[Path], square: int | None, short_side: int | None) -> np.ndarray:
    frames = []
    for p in paths:
        with Image.open(p) as im:
            frame = np.asarray(im.convert("RGB"))
        if square:  # the CARL code's preparation: every frame squashed to square x square
            frame = _linear_resize(frame, square, square)
        elif short_side:
            s = short_side / min(frame.shape[:2])
            frame = _linear_resize(frame, 2 * round(frame.shape[0] * s / 2), 2 * round(frame.shape[1] * s / 2))
        frames.append(frame)
    return np.stack(frames)


def write_pennaction_shards(root: str | Path, phase_labels: str | Path, out_dir: str | Path,
                            opts: PennActionOptions | None = None, **write) -> dict:
    """Write the train and val splits (see the module docstring); returns the manifest."""
    opts = opts or PennActionOptions()
    wopts = write_options(**write)
    if opts.square and wopts.payload == "video":  # refused before anything is written, not video by video
        check_frame_size(wopts.encode.codec, opts.square, opts.square)
    root, phase_labels = Path(root), Path(phase_labels)
    if not (root / "frames").is_dir():
        raise FileNotFoundError(f"{root / 'frames'} is missing: --root must be the Penn_Action folder of the "
                                f"download (frames/NNNN/*.jpg, labels/NNNN.mat). Get {DOWNLOAD}.")
    splits = [d.name for d in sorted(phase_labels.iterdir()) if d.is_dir()] if phase_labels.is_dir() else []
    if not {"train", "val"} <= set(splits):
        raise FileNotFoundError(f"{phase_labels} needs train/ and val/ folders of <action>/<NNNN>.npy phase label "
                                f"files (found: {splits or 'nothing'}). Get {DOWNLOAD}.")
    # one label file per sequence: <split>/<action>/<NNNN>.npy; a sequence labelled twice (two
    # splits, two action folders) is written once, from the first file, and the clash reported
    first: dict[str, Path] = {}
    listed: dict[str, list[tuple[Path, str | None]]] = {"train": [], "val": []}
    for split in ("train", "val"):
        for f in sorted((phase_labels / split).rglob("*.npy")):
            if not re.fullmatch(r"\d{4}", f.stem[:4]):
                continue
            clash = f"{f.stem[:4]} is also labelled by {first[f.stem[:4]]}" if f.stem[:4] in first else None
            first.setdefault(f.stem[:4], f)
            listed[split].append((f, clash))
    def load(item: tuple[Path, str | None]) -> VideoRecord:
        f, clash = item
        seq = f.stem[:4]
        if clash:
            raise SkipInput(clash)
        action = _action_of(root, seq, f.parent.name)
        if action not in ACTIONS:
            raise SkipInput(f"action {action!r} is not one of the 13 evaluated")
        frame_paths = sorted((root / "frames" / seq).glob("*.jpg"))
        if not frame_paths:
            raise SkipInput(f"no frames in {root / 'frames' / seq}")
        frame_paths, labels = match_lengths(frame_paths, read_phase_labels(f))
        if len(labels) and labels.max() >= PHASES[action]:  # (below -1 the writer refuses)
            folder = _ALIASES.get(f.parent.name, f.parent.name)
            raise SkipInput(f"phase label {labels.max()} in {f.name}: {action} has {PHASES[action]} phases "
                            f"(0-{PHASES[action] - 1}) in the CARL code's labels" +
                            (f"; the file is in the {f.parent.name} folder (labels of another action?)"
                             if folder != action else ""))
        frames = _load_frames(frame_paths, opts.square, opts.short_side)
        return VideoRecord(f"{seq}_{action}", frames, opts.fps, ACTIONS.index(action), labels,
                           extra={"source": f"frames/{seq}"})

    for split in ("train", "val"):
        entry = write_split(out_dir, split, listed[split][: opts.limit], load, dataset="pennaction",
                            opts=wopts, label_names={"actions": ACTIONS},
                            describe=lambda item: str(item[0].relative_to(phase_labels)), settings=asdict(opts),
                            labels=labels_digest(*(f for f, _ in listed[split]),  # (the files this split reads)
                                                 *(root / "labels" / f"{f.stem[:4]}.mat" for f, _ in listed[split])))
        if opts.limit is None:
            add_warnings(out_dir, split_differences(split, entry), [split])
    return read_manifest(out_dir)


def split_differences(split: str, entry: dict) -> list[str]:
    """How a written split differs from the CARL code's, in total and per action (a label folder
    misfiled between actions keeps the total), each said in one line and logged."""
    col = ("train", "val").index(split)
    said = []
    if entry["samples"] != EXPECTED[split]:
        said.append(f"pennaction {split}: {entry['samples']} videos written; the CARL code's split has "
                    f"{EXPECTED[split]} ({len(entry['skipped'])} skipped, listed in shards.json)")
    written = entry.get("videos_per_action")
    if written is not None:
        off = [f"{a} {written.get(a, 0)} (CARL: {n[col]})" for a, n in CARL_SPLIT.items() if written.get(a, 0) != n[col]]
        if off:
            said.append(f"pennaction {split}: videos per action differ from the CARL code's split: {', '.join(off)}")
    for line in said:
        log.warning("%s", line)
    return said
