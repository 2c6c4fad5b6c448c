"""The published CARL code's pre-processed datasets -> shards, without preparing them again.

What the published code (github.com/minghchen/CARL_code) keeps on disk, per dataset folder:

* PennAction: ``train.pkl`` and ``val.pkl``, each a pair ``(videos, action_to_indices)``; Pouring:
  ``train.pkl``, ``val.pkl`` (``test.pkl`` if made), each a list of videos. A video is a dict
  ``{"id", "name", "video_file", "frame_label", "seq_len"}`` (PennAction adds ``action_label``,
  an index into the 13 actions), ``video_file`` relative to the folder (``videos/<name>.mp4``,
  25 fps H.264 written from TCC's TFRecords), ``frame_label`` a tensor of per-frame phases.
* FineGym: ``gym99_train_<version>.pkl``, ``gym99_val.pkl``, ``gym288_train_<version>.pkl``
  (``gym288_val.pkl`` if made), ``additional_<version>.pkl``: lists of events ``{"id", "name"
  (the event id), "video_file" (``processed_videos/<event>.mp4``, 640x360 at 25 fps),
  "seq_len", "frame_label" (float tensor, -1 = no element), "event_label" (1..10)}``.

Here, as the other converters write them: PennAction with action labels and its 13 action names,
FineGym with Gym99 labels as ``phase_labels`` and Gym288 as ``frame_labels["gym288"]`` (joined by
event; an event one list lacks gets -1 there) and the event class (``event_label - 1``) as the
action, the additional FineGym list as split ``additional`` (its labels as ``phase_labels``).
Videos are stored as they are (no re-encode) unless ``transcode``/``short_side``/the jpeg payload
asks for it. A label list whose length differs from the decoded frame count by at most
max(2, 1%) frames is cut or padded with -1 (noted in the sample's metadata); beyond that, or
with a missing video file, the video is skipped and listed in shards.json.

Pickles are read by :func:`~carl_scale.datasets.safe_pickle.load_data_pickle`: data only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carl_scale.datasets.encode import check_source_options
from carl_scale.datasets.finegym import EVENT_NAMES
from carl_scale.datasets.folder import file_record
from carl_scale.data.manifest import PUBLISHED_ORDER
from carl_scale.datasets.parallel import SkipInput, annotate, labels_digest, write_options, write_split
from carl_scale.datasets.pennaction import ACTIONS
from carl_scale.datasets.safe_pickle import load_data_pickle
from carl_scale.datasets.writer import VideoRecord

log = logging.getLogger("carl_scale.data")

KINDS = ("pennaction", "pouring", "finegym")
_GYM = re.compile(r"^gym(99|288)_(train|val)(?:_(v[\d.]+))?\.pkl$")
_ADDITIONAL = re.compile(r"^additional(?:_v[\d.]+)?\.pkl$")
LAYOUT = ("a folder of the published CARL code's pre-processed dataset: train.pkl and val.pkl next to the "
          "videos/ they list (PennAction, Pouring), or gym99_train_<version>.pkl, gym99_val.pkl, ... next to "
          "processed_videos/ (FineGym)")


@dataclass
class CarlDataOptions:
    dataset: str | None = None  # pennaction | pouring | finegym; None: recognised from the files
    transcode: bool = False
    short_side: int | None = None
    limit: int | None = None  # at most this many videos per split (a quick look)

    def __post_init__(self) -> None:  # refused before anything is read or written (as the CLI's flags)
        if self.dataset is not None and self.dataset not in KINDS:
            raise ValueError(f"--dataset must be one of {', '.join(KINDS)} (or left out), got {self.dataset!r}")
        check_source_options(short_side=self.short_side, limit=self.limit)


def _as_int_array(v: Any, what: str) -> np.ndarray:
    if hasattr(v, "numpy"):  # a torch tensor
        v = v.numpy()
    arr = np.asarray(v)
    if arr.dtype.kind not in "iuf" or arr.ndim != 1:
        raise SkipInput(f"{what} is not a 1-D array of numbers ({arr.dtype}, {arr.ndim}-D)")
    return arr.astype(np.int64)


def _videos_of(data: Any, path: Path, kind: str) -> list[dict]:
    """The list of video dicts a published pickle holds (PennAction's is the pair's first item)."""
    if kind == "pennaction":
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], list)):
            raise ValueError(f"{path} is not a PennAction list of the published layout: expected a pair (videos, "
                             f"action_to_indices), got {type(data).__name__}")
        videos, by_action = data
        # older lists lack action_label: action_to_indices says it (entry i holds the ids of action i)
        try:
            owner = {i: a for a, ids in enumerate(by_action or []) for i in ids}
        except TypeError:
            raise ValueError(f"{path}: its action_to_indices (the pair's second item) is not a list of id lists; "
                             f"write the list again with the published code") from None
        return [{**v, "action_label": v.get("action_label", owner.get(v.get("id"), -1))}
                if isinstance(v, dict) else v for v in videos]
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a {kind} list of the published layout: expected a list of videos, got "
                         f"{type(data).__name__}")
    return data


def detect(src: Path, train_list: Any = None) -> str:
    """Which published dataset ``src`` holds: FineGym by its list names, else PennAction (its
    train.pkl is a pair) or Pouring (a list); ``train_list``: train.pkl's data if already read."""
    names = {p.name for p in src.iterdir()} if src.is_dir() else set()
    if any(_GYM.match(n) for n in names):
        return "finegym"
    if "train.pkl" in names:
        data = load_data_pickle(src / "train.pkl") if train_list is None else train_list
        return "pennaction" if isinstance(data, tuple) else "pouring"
    raise FileNotFoundError(f"{src} is not {LAYOUT}")


def _class_index(v: Any, key: str, where: str, minus: int = 0) -> tuple[int, str | None]:
    """(a list entry's class index from ``key`` less ``minus``, -1 where absent; the reason it is
    not one, for the load to skip that video with, instead of the whole list failing)."""
    x = v.get(key) if isinstance(v, dict) else None
    if x is None and isinstance(v, dict) and key not in v:
        return -1, None
    try:
        if not isinstance(x, bool) and float(x) == int(x):
            return int(x) - minus, None
    except (TypeError, ValueError, OverflowError):
        pass
    return -1, f"{where}: {key} {x!r} is not a class index"


def _entry(v: Any, where: str) -> dict:
    """One video of a list, checked: video_file, name, frame labels."""
    if not isinstance(v, dict):
        raise SkipInput(f"{where}: a {type(v).__name__}, not a video dict")
    missing = [k for k in ("video_file", "frame_label") if k not in v]
    if missing:
        raise SkipInput(f"{where}: no {', '.join(missing)}")
    name = str(v.get("name") or Path(str(v["video_file"])).stem)
    return {"video_file": str(v["video_file"]), "name": name, "seq_len": v.get("seq_len"),
            "labels": _as_int_array(v["frame_label"], f"{where} frame_label")}


def read_lists(src: Path, kind: str | None) -> tuple[str, dict[str, list[dict]]]:
    """(the dataset, {split: [{"raw", "where", "action", "sets"?}]}) of a published folder; with
    ``kind`` None the dataset is recognised from the files (each pickle is read once)."""
    out: dict[str, list[dict]] = {}
    finegym = any(_GYM.match(p.name) for p in src.iterdir())
    loaded = {} if finegym or kind == "finegym" else \
        {split: load_data_pickle(src / f"{split}.pkl") for split in ("train", "val", "test")
         if (src / f"{split}.pkl").is_file()}
    kind = kind or detect(src, loaded.get("train"))
    if kind in ("pennaction", "pouring"):
        for split, data in loaded.items():
            raw = _videos_of(data, src / f"{split}.pkl", kind)
            out[split] = [{"raw": v, "where": f"{split}.pkl[{i}]",
                           **dict(zip(("action", "bad_action"), _class_index(v, "action_label", f"{split}.pkl[{i}]")))}
                          for i, v in enumerate(raw)]
        if "train" not in out:
            raise FileNotFoundError(f"{src / 'train.pkl'} is missing: --src must be {LAYOUT}")
        return kind, out
    lists: dict[str, dict[str, tuple[str, list]]] = {}
    for p in sorted(src.iterdir()):
        m, extra = _GYM.match(p.name), _ADDITIONAL.match(p.name)
        if not (m or extra):
            continue
        split, cs = (m[2], f"gym{m[1]}") if m else ("additional", "gym99")
        if cs in lists.get(split, {}):
            raise ValueError(f"{src} holds two {split} lists of {cs} ({lists[split][cs][0]} and {p.name}), e.g. two "
                             f"annotation versions: keep the one to convert")
        lists.setdefault(split, {})[cs] = (p.name, _videos_of(load_data_pickle(p), p, kind))
    for split, sets in lists.items():
        events: dict[str, dict] = {}
        for cs, (fname, videos) in sets.items():  # one entry per event, its list item of each class set
            for i, v in enumerate(videos):
                key = str(v.get("name") or v.get("video_file")) if isinstance(v, dict) else f"{fname}[{i}]"
                action, bad = _class_index(v, "event_label", f"{fname}[{i}]", minus=1)  # (events count from 1)
                e = events.setdefault(key, {"raw": v, "where": f"{fname}[{i}]", "sets": {}, "action": action,
                                            "bad_action": bad})
                if cs in e["sets"]:  # (its labels would otherwise replace the first's, beside the first's video)
                    log.warning("%s: %s names event %r again (first %s): the first is kept", src, f"{fname}[{i}]", key,
                                e["sets"][cs][1])
                    continue
                e["sets"][cs] = (v, f"{fname}[{i}]")
        out[split] = list(events.values())
    if not out:
        raise FileNotFoundError(f"{src} holds no {kind or 'finegym'} lists (gym99_<split>*.pkl ...): --src must be "
                                f"{LAYOUT}")
    return kind, out


def write_carl_shards(src: str | Path, out_dir: str | Path, opts: CarlDataOptions | None = None, **write) -> dict:
    """Every split of a published dataset folder into shards (``write``: the keyword arguments of
    :func:`~carl_scale.datasets.parallel.write_options`); returns the manifest."""
    opts = opts or CarlDataOptions()
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a directory: it must be {LAYOUT}")
    if opts.dataset is not None and opts.dataset not in KINDS:
        raise ValueError(f"--dataset must be one of {', '.join(KINDS)}, got {opts.dataset!r}")
    kind, splits = read_lists(src, opts.dataset)
    wopts = write_options(**write)
    transcode = opts.transcode or opts.short_side is not None or wopts.payload == "jpeg"
    label_names = {"pennaction": {"actions": ACTIONS},
                   "finegym": {"actions": EVENT_NAMES, "phase_labels": "Gym99 element classes (0-98)"},
                   "pouring": {}}[kind]
    # Gym288 only where the folder has its lists (they exist "if made"): a split without them
    # must not carry an all-unlabelled set that a Gym288 probe would take for labels
    with288 = {split for split, items in splits.items() if any("gym288" in item.get("sets", {}) for item in items)}
    # (only the probe's splits: the published folder's "additional" list has no Gym288 list, by design)
    if kind == "finegym" and with288 and not {"train", "val"} & set(splits) <= with288:
        log.warning("finegym: Gym288 lists for %s only, not %s: a Gym288 probe needs them for train and val",
                    ", ".join(sorted(with288)), ", ".join(sorted(({"train", "val"} & set(splits)) - with288)))
    if with288:
        label_names["frame_labels"] = {"gym288": "Gym288 element classes (0-287)"}
    for split, items in splits.items():
        for item in items:
            item["with288"] = split in with288

    def load(item: dict) -> VideoRecord:
        if item.get("bad_action"):
            raise SkipInput(item["bad_action"])
        e = _entry(item["raw"], item["where"])
        extra = {}
        if kind == "finegym":
            sets = {cs: _entry(v, where)["labels"] for cs, (v, where) in item["sets"].items()}
            e["labels"] = sets.get("gym99")
            # (an event missing from its split's Gym288 list: -1 for that set, as before)
            extra = {"gym288": sets.get("gym288")} if item["with288"] else {}
        # a list names files of its own folder only (absolute, lexically: a videos/ symlink to another
        # disk is fine; relative, --src . would let ../ through)
        path = Path(os.path.abspath(src / e["video_file"]))
        if not path.is_relative_to(os.path.abspath(src)):
            raise SkipInput(f"video_file {e['video_file']!r} of {item['where']} is outside {src}")
        if not path.is_file():
            raise SkipInput(f"{src / e['video_file']} not found (video_file of {item['where']})")
        n = max(len(x) for x in [e["labels"], *extra.values()] if x is not None)
        return file_record(path, e["name"], item["action"], e["labels"], extra, short_side=opts.short_side,
                           transcode=transcode, source=e["video_file"], label_slack=max(2, n // 100))

    for split, items in sorted(splits.items()):
        entry = write_split(out_dir, split, items[: opts.limit], load, dataset=kind, opts=wopts,
                            label_names=label_names, describe=lambda item: item["where"],
                            settings={**asdict(opts), "dataset": kind, "source": "carl_code"},
                            labels=labels_digest(*sorted({src / where.split("[")[0] for item in items for where in
                                                          [item["where"], *(w for _, w in item.get("sets", {}).values())]})))
        if entry["skipped"]:
            log.warning("%s %s: skipped %d of %d videos (listed in shards.json)", kind, split, len(entry["skipped"]),
                        len(items))
    return annotate(out_dir, video_order=PUBLISHED_ORDER)  # (each list's own order)
