"""Transfer evaluation of a pretrained checkpoint: the protocol of each dataset (paper §4.2,
REFERENCE_NOTES "Evaluation protocol"), a results table shaped like the paper's, and pictures.

Library code: the entry point is ``launch/transfer_eval.sh <dataset> [checkpoint]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from carl_scale.data.config import SpatialConfig
from carl_scale.data.manifest import PUBLISHED_ORDER, read_manifest, write_command
from carl_scale.eval.embed import PartialEmbeddings, VideoEmbeddings, extract_embeddings
from carl_scale.eval.metrics import (CLASSIFIERS, _labelled, average_precision_at_k, kendalls_tau, linear_probe_frame_classification,
                                     one_shot_phase_classification, phase_classification, phase_progression,
                                     temporal_clustering_rand_index, training_subset)
from carl_scale.models.weights import latest_in

log = logging.getLogger("carl_scale.eval")


@dataclass(frozen=True)
class Protocol:
    shards: str  # default shard directory
    make: str  # the command that writes those shards
    per_action: bool  # PennAction: every metric per action class, then averaged over classes
    tau_stride: int = 1
    # fractions of the training videos the classifiers see: max(1, ⌊f·N⌋) of them, the first ones
    # as the published evaluation takes them, or a seeded random draw (metrics.training_subset)
    fractions: tuple[float, ...] = (0.1, 0.5, 1.0)
    subset: str = "first"
    # the phase classifier: "svm" as the paper's text (and TCC), "logistic" as the published code
    classifier: str = "svm"
    # FineGym: a linear layer on frames instead of the phase metrics, one per (column, label set,
    # classes: the layer's outputs, as the published probe's, whichever classes the data holds), at
    # each fraction (Table 14 shows FineGym99 at 10/50/100%; Table 5 both sets at 100%)
    linear_probe: tuple[tuple[str, str, int], ...] = ()


PROTOCOLS = {
    "pennaction": Protocol("data/pennaction", write_command("pennaction", "data/pennaction"), per_action=True,
                           tau_stride=2),
    # FineGym's subsets are a seeded draw where the shards are not in the published lists' order
    # (shards.finegym writes events sorted by video: "the first 10%" would be the alphabetically
    # first competitions, a clustered subset of Table 14's); from shards.carl, the first ones
    "finegym": Protocol("data/finegym", write_command("finegym", "data/finegym"), per_action=False,
                        linear_probe=(("FineGym99", "phase", 99), ("FineGym288", "gym288", 288)), subset="random"),
    "pouring": Protocol("data/pouring", write_command("pouring", "data/pouring"), per_action=False, tau_stride=5),
    "synthetic": Protocol("data/synthetic", write_command("synthetic", "data/synthetic"), per_action=True),
}


def latest_checkpoint(run_dir: str | Path = "runs/pretrain") -> Path:
    root = Path(run_dir) / "checkpoints"
    latest = latest_in(root)  # (what `latest` names; without one, the newest intact checkpoint)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint under {root}: pretrain first (deepspeed launch/pretrain_k400.py "
                                f"--run-dir {run_dir}) or name a step_NNNNNN directory")
    return latest


def _phase_metrics(train: VideoEmbeddings, val: VideoEmbeddings, p: Protocol, device: str) -> dict[str, float]:
    """Every phase metric of one group of videos (one action class, or the whole dataset), on each
    video's labelled frames only, as the published evaluation cuts them before any metric. A group
    without training videos gets the metrics that need none (τ, AP@K, clustering), NaN for the rest."""
    train, val = train.labelled_only(), val.labelled_only()
    out = {}
    for f, acc in phase_classification(train.embeddings, train.phase_labels, val.embeddings, val.phase_labels,
                                       classifier=p.classifier, fractions=p.fractions,
                                       subset=p.subset).items():
        out[f"classification@{f:g}"] = acc
    out["progression"] = phase_progression(train.embeddings, train.phase_labels, val.embeddings,
                                           val.phase_labels)["r2"] if train.video_ids else float("nan")
    out["kendall_tau"] = kendalls_tau(val.embeddings, stride=p.tau_stride, device=device)["tau"]
    for k, v in average_precision_at_k(val.embeddings, val.phase_labels, val.action_labels,
                                       stride=p.tau_stride, device=device).items():
        out[f"AP@{k}"] = v
    out["one_shot"] = one_shot_phase_classification(train.embeddings, train.phase_labels, train.action_labels,
                                                    val.embeddings, val.phase_labels, val.action_labels,
                                                    device=device)["accuracy"]
    out["clustering_rand_index"] = temporal_clustering_rand_index(val.embeddings, val.phase_labels)["rand_index"]
    return out


def _nanmean(values: list[float]) -> float:
    """Mean over the classes that have the metric (NaN where none has it, without a warning)."""
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def _counted(values: list[float]) -> int:
    return sum(not np.isnan(v) for v in values)


def run_protocol(train: VideoEmbeddings, val: VideoEmbeddings, p: Protocol, device: str = "cpu") -> dict:
    """{"mean": {metric: value}, "per_action": {action: {metric: value}}} for one model."""
    if p.linear_probe:
        mean = {}
        for column, labels, classes in p.linear_probe:
            # the class set's own events: one shard set holds the events of both sets' lists, where
            # the published code prepares one dataset per set (every event of it has labelled frames)
            own = train.subset([i for i, lab in enumerate(train.labels(labels)) if (np.asarray(lab) >= 0).any()])
            for f in p.fractions:
                # at least one batch of 10 videos, as the published probe takes
                sub = own.subset(training_subset(len(own.video_ids), f, pick=p.subset, minimum=10))
                res = linear_probe_frame_classification(sub.embeddings, sub.labels(labels), val.embeddings,
                                                        val.labels(labels), num_classes=classes, device=device)
                key = column if f == 1.0 else f"{column}@{f:g}"
                mean.update({key: res["accuracy"], f"{key} mean class": res["mean_class_accuracy"]})
        return {"mean": mean, "per_action": {}, "classes": {}}
    if not p.per_action:
        return {"mean": _phase_metrics(train, val, p, device), "per_action": {}, "classes": {}}
    per_action = {}
    tb, vb = train.by_action(), val.by_action()
    for a, vidx in sorted(vb.items()):  # an action without training videos still has τ, AP@K, clustering
        per_action[int(a)] = _phase_metrics(train.subset(tb.get(a, [])), val.subset(vidx), p, device)
    keys = next(iter(per_action.values())).keys() if per_action else []
    mean = {k: _nanmean([r[k] for r in per_action.values()]) for k in keys}
    # how many action classes each mean is over (a class without the metric is left out of it)
    classes = {k: _counted([r[k] for r in per_action.values()]) for k in keys}
    return {"mean": mean, "per_action": per_action, "classes": classes}


# The paper's tables, as (title, [(column, metric key, scale)]): scale 100 for the numbers the
# paper prints as percentages. Columns whose metric a protocol does not produce are left out.
_FR = [(f"Classification {f:.0%}", f"classification@{f:g}", 100) for f in (0.1, 0.5, 1.0)]
PAPER_TABLES = [
    ("Phase classification, progression, Kendall's τ (Tables 1 and 6)",
     _FR + [("Progress", "progression", 1), ("τ", "kendall_tau", 1)]),
    ("Fine-grained frame retrieval (Table 2)", [(f"AP@{k}", f"AP@{k}", 100) for k in (5, 10, 15)]),
    ("One-shot classification and clustering (Table 3)",
     [("One-shot Acc", "one_shot", 100), ("Rand Index", "clustering_rand_index", 1)]),
    ("Fine-grained action classification (Table 5)",
     [(c, c, 100) for c in ("FineGym99", "FineGym288", "FineGym99 mean class", "FineGym288 mean class")]),
    ("FineGym99 with 10%, 50%, 100% of the labelled training videos (Table 14)",
     [(f"{f:.0%}", "FineGym99" if f == 1.0 else f"FineGym99@{f:g}", 100) for f in (0.1, 0.5, 1.0)]),
]


def _notes(results: dict[str, dict], p: Protocol) -> str:
    """What a reader of the tables must know: which classifier, and means over fewer classes."""
    lines = []
    if not p.linear_probe:
        how = ("SVM (sklearn SVC defaults, as the paper describes)" if p.classifier == "svm"
               else "logistic regression (as the published evaluation code)")
        which = "the first videos" if p.subset == "first" else "a seeded draw of the videos"
        lines.append(f"Phase classification: {how}, trained on {which} of the training split; every metric "
                     f"on the labelled frames of each video.")
    for name, r in results.items():
        total = len(r["per_action"])
        fewer = {k: n for k, n in r.get("classes", {}).items() if n < total}
        if fewer:
            title = {key: column for _, columns in PAPER_TABLES for column, key, _ in columns}
            lines.append(f"{name}: " + ", ".join(f"{title.get(k, k)} is the mean of {n} of the {total} action "
                                                  f"classes" for k, n in fewer.items())
                         + " (the others have no training videos, or too few frames or videos for it).")
    return "".join("\n\n" + line for line in lines)


def _strict_json(x):
    """``x`` with every NaN or infinity (a metric with nothing to score) as null: strict JSON
    readers refuse the bare ``NaN`` Python writes."""
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def _frame_label_sets(shards: str) -> set[str]:
    """The per-frame label sets beside ``phase`` that both the train and the val split's videos
    carry: each split's first sample's metadata (a writer gives every video of a split the same sets)."""
    import tarfile

    from carl_scale.data.manifest import resolve_shards

    found = []
    for split in ("train", "val"):
        have: set[str] = set()
        for url in resolve_shards(shards, split)[0][:1]:
            try:
                with tarfile.open(url) as tar:
                    member = next((m for m in tar if m.name.endswith(".json")), None)
                    if member is not None:
                        have = set(json.load(tar.extractfile(member)).get("frame_labels") or {})
            except (tarfile.TarError, ValueError) as exn:  # (its first sample's metadata: unreadable)
                raise ValueError(f"{url} is unreadable ({type(exn).__name__}: {exn}): write the shards again") from None
        found.append(have)
    return found[0] & found[1]


def _check_label_sets(p: Protocol, shards: str) -> None:
    """Refuse a linear probe whose per-frame label set the shards do not have, naming the flag that
    writes it, before any video is embedded."""
    if not p.linear_probe:
        return
    have = _frame_label_sets(shards)
    missing = [name for _, name, _ in p.linear_probe if name != "phase" and name not in have]
    if missing:
        raise ValueError(f"{shards} has no per-frame label set {', '.join(repr(m) for m in missing)} (it has: "
                         f"phase{''.join(', ' + k for k in sorted(have))}): write the shards with "
                         f"--extra-frame-labels {missing[0]}=DIR (shards.folder), or with shards.finegym")


def _table(rows: dict[str, dict[str, float]], columns: list[tuple[str, str, int]], first: str = "model") -> str:
    lines = [f"| {first} | " + " | ".join(c for c, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[k] * sc:.2f}" if sc != 1 else f"{r[k]:.3f}" for _, k, sc in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_tables(results: dict[str, dict], action_names: list[str] | None = None) -> str:
    """The results as the paper prints them (percentages where it uses them), one table per paper
    table the protocol fills, then, for per-action protocols, every metric per action class."""
    keys = set(next(iter(results.values()))["mean"])
    parts = []
    for title, columns in PAPER_TABLES:
        cols = [c for c in columns if c[1] in keys]
        if cols:
            parts.append(f"### {title}\n\n" + _table({n: r["mean"] for n, r in results.items()}, cols))
    per_action_cols = [c for _, columns in PAPER_TABLES for c in columns if c[1] in keys]
    for name, r in results.items():
        if r["per_action"]:
            rows = {(action_names[int(a)] if action_names and 0 <= int(a) < len(action_names) else str(a)): v
                    for a, v in r["per_action"].items()}
            parts.append(f"### {name}: per action class (the rows above average these)\n\n"
                         + _table(rows, per_action_cols, first="action"))
    return "\n\n".join(parts)


def _video_thumbnails(shards: str, split: str, ids: set[str], cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Thumbnails of the videos ``ids``, decoding only those not already in ``cache`` (shared by
    the models of one evaluation, whose pictures mostly show the same videos)."""
    from carl_scale.data.decoders import make_decoder
    from carl_scale.data.manifest import manifest_codec, resolve_shards
    from carl_scale.data.whole_video import iter_whole_videos
    from carl_scale.eval.pictures import thumbnails

    missing = ids - cache.keys()
    if missing:
        _, manifest = resolve_shards(shards, split)
        dec = make_decoder("auto", codec=manifest_codec(manifest), device="cpu")  # numpy frames for matplotlib
        # damaged samples were skipped (and reported) when embedding: pass over them here too
        for meta, frames in iter_whole_videos(shards, dec, split, only=missing, on_error=lambda what, exn: None):
            cache[meta["video_id"]] = thumbnails(np.asarray(frames))
            missing.discard(meta["video_id"])
            if not missing:
                break
    return {k: cache[k] for k in ids if k in cache}


def save_pictures(name: str, train: VideoEmbeddings, val: VideoEmbeddings, shards: str, out: Path,
                  frame_cache: dict[str, np.ndarray] | None = None) -> list[Path]:
    """For the first validation action with two videos: DTW alignment of two of its videos with
    aligned frames, the top-5 retrieval of a mid-video frame, and a predicted-vs-true phase
    timeline (logistic regression on that action's training videos)."""
    from sklearn.linear_model import LogisticRegression

    from carl_scale.eval.alignment import save_alignment_figure
    from carl_scale.eval.pictures import nearest_frames, save_phase_timeline, save_retrieval_figure

    # videos whose embeddings are finite (a NaN one has no alignment path: the DTW refuses it)
    finite = {i for i, e in enumerate(val.embeddings) if np.isfinite(e).all()}
    groups = [[i for i in v if i in finite] for v in val.by_action().values()]
    groups = [v for v in groups if len(v) >= 2]
    if not groups:
        return []
    a, b, *rest = groups[0]
    others = [b, *rest]
    q = int(np.flatnonzero(val.phase_labels[a] >= 0).mean()) if (val.phase_labels[a] >= 0).any() else 0
    hits = nearest_frames(val.embeddings[a][q], [val.embeddings[i] for i in others])
    # decode only the videos the pictures show (an action may have dozens of long ones)
    frames = _video_thumbnails(shards, "val", {val.video_ids[i] for i in (a, b, *(others[v] for v, _, _ in hits))},
                               {} if frame_cache is None else frame_cache)
    ida, idb = val.video_ids[a], val.video_ids[b]
    paths = [save_alignment_figure(val.embeddings[a], val.embeddings[b], out / f"{name}_alignment.png",
                                   frames_a=frames.get(ida), frames_b=frames.get(idb), names=(ida, idb))]
    if ida in frames and all(val.video_ids[others[v]] in frames for v, _, _ in hits):
        paths.append(save_retrieval_figure(
            frames[ida][q], [frames[val.video_ids[others[v]]][f] for v, f, _ in hits],
            [f"{val.video_ids[others[v]]}:{f} ({val.phase_labels[others[v]][f]})" for v, f, _ in hits],
            out / f"{name}_retrieval.png", query_caption=f"{ida}:{q} ({val.phase_labels[a][q]})"))
    train_idx = train.by_action().get(int(val.action_labels[a]), [])
    sub = train.subset(train_idx)
    x, y = _labelled(sub.embeddings, sub.phase_labels) if train_idx else (None, None)
    if y is not None and len(np.unique(y)) > 1:
        pred = LogisticRegression(max_iter=2000).fit(x, y).predict(val.embeddings[a])
        paths.append(save_phase_timeline(val.phase_labels[a], pred, out / f"{name}_phases.png",
                                         title=f"{name}, {ida} (val)"))
    return paths


def training_videos(dataset: str, shards: str, subset: str | None) -> str:
    """Which 10% / 50% of the training videos the classifiers see: ``subset``, or where None
    "first" for shards in the published lists' order (``video_order`` in shards.json: the paper's
    subsets), else the protocol's own. Pouring shards in another order are warned about."""
    order = (read_manifest(shards) or {}).get("video_order")
    if subset is None:
        subset = "first" if order == PUBLISHED_ORDER else PROTOCOLS[dataset].subset
    if dataset == "pouring" and subset == "first" and order != PUBLISHED_ORDER:
        log.warning("%s: Pouring shards written before 2026-11-28 hold the records file by file, not in the "
                    "published lists' order: their first 10%%/50%% are not the published subsets (rewrite them "
                    "with python -m shards.pouring ... --overwrite)", shards)
    return subset


def check_transfer(dataset: str, shards: str | None = None, subset: str | None = None,
                   classifier: str = "svm") -> tuple[Protocol, str]:
    """The dataset's protocol with these settings and its shard directory, or the one-line error
    that refuses them: before anything is fine-tuned or embedded. ``subset`` None: "first" where
    the shards keep the published lists' order (``video_order`` in shards.json), else the
    protocol's own."""
    if dataset not in PROTOCOLS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(PROTOCOLS)}")
    if subset not in ("first", "random", None):
        raise ValueError(f"--subset must be 'first' (the published evaluation's) or 'random', got {subset!r}")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    if classifier != "svm" and PROTOCOLS[dataset].linear_probe:
        raise ValueError(f"--classifier {classifier}: {dataset}'s protocol has no phase classifier (its frame labels "
                         f"go to the published linear probe); leave --classifier out")
    shards = PROTOCOLS[dataset].shards if shards is None else shards
    if not (Path(shards) / "shards.json").exists():
        raise FileNotFoundError(f"no {dataset} shards at {shards} (no shards.json). Make them with:\n  "
                                f"{PROTOCOLS[dataset].make}\nor pass --shards DIR")
    p = dataclasses.replace(PROTOCOLS[dataset], subset=training_videos(dataset, shards, subset), classifier=classifier)
    _check_label_sets(p, shards)  # before the (long) embedding of both splits
    return p, shards


def keep_earlier_results(out: Path, source: str | None, **setting) -> Path | None:
    """Move the results in ``out`` of other models (another checkpoint, a fine-tuning, another
    baseline: ``source`` differs, or is unknown) or of another ``setting`` (shards, subset,
    classifier: as ``results.json`` records them) to ``out/earlier/<their time>/`` before they are
    written over: evaluating two checkpoints one after the other keeps both tables and pictures.
    The same models evaluated the same way again replace their results. Returns where they went."""
    old = out / "results.json"
    if not old.is_file():
        return None
    try:
        written = json.loads(old.read_text())
    except (OSError, ValueError):  # unreadable: kept aside as well, never lost
        written = {}
    if source is not None and written.get("source") == source and all(written.get(k) == v for k, v in setting.items()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
    dest, n = out / "earlier" / stamp, 1
    while dest.exists():  # (two evaluations within a second)
        n += 1
        dest = out / "earlier" / f"{stamp}_{n}"
    dest.mkdir(parents=True)
    pictures = [Path(x).name for v in (written.get("pictures") or {}).values() for x in v]
    for name in ["results.md", "results.json", *pictures]:
        if (out / name).is_file():
            (out / name).rename(dest / name)
    print(f"the earlier results in {out} (of {written.get('source') or 'models not named'}) are kept in {dest}")
    return dest


def transfer_eval(dataset: str, models: dict[str, torch.nn.Module], *, shards: str | None = None,
                  out_dir: str | Path = "runs/transfer", device: str = "cpu", image_size: int | None = None,
                  reuse_embeddings: bool = True, subset: str | None = None, classifier: str = "svm",
                  source: str | None = None, spatial: SpatialConfig | None = None) -> dict:
    """Embed the train and val splits with each model (saved as ``.npz`` under ``out_dir``; a
    rerun with the same weights and shards loads them instead, unless ``reuse_embeddings`` is
    off), run the dataset's protocol, write ``results.md`` / ``results.json`` (with ``source``:
    which checkpoint, how it was made) and the pictures of :func:`save_pictures` for each model.
    The results of other models there are moved aside first (:func:`keep_earlier_results`).
    ``spatial``: the evaluation view's normalisation and crop ratios (the defaults if None; a
    checkpoint's own: :func:`~carl_scale.eval.embed.trained_view`)."""
    p, shards = check_transfer(dataset, shards, subset, classifier)
    if not models:
        raise ValueError("no model to evaluate: give transfer_eval at least one {name: model}")
    out = Path(out_dir) / dataset
    out.mkdir(parents=True, exist_ok=True)
    results, frame_cache, pictures, t0 = {}, {}, {}, time.time()
    skipped: dict[str, list[str]] = {"train": [], "val": []}
    for name, model in models.items():
        embs = {}
        for split in ("train", "val"):
            npz = out / f"{name}_{split}.npz"
            if not reuse_embeddings:  # (an interrupted extraction's parts too: everything embedded again)
                npz.unlink(missing_ok=True)
                PartialEmbeddings(npz, "").remove()
            embs[split] = e = extract_embeddings(model, shards, split, image_size=image_size, spatial=spatial,
                                                 device=device, cache=npz)
            skipped[split] += [s for s in e.skipped if s not in skipped[split]]  # (each model's, once)
            if not e.video_ids:
                raise ValueError(f"no {split} video of {shards} could be read ({len(e.skipped)} skipped as unreadable, "
                                 f"e.g. {e.skipped[0] if e.skipped else 'none listed'}): write the shards again")
            bad = e.nonfinite()
            if bad:
                raise ValueError(f"{name}: {len(bad)} of {len(e.video_ids)} {split} videos have non-finite embeddings "
                                 f"(e.g. {bad[0]}): its weights are not finite; evaluate an earlier checkpoint")
        results[name] = run_protocol(embs["train"], embs["val"], p, device=device)
        if len(results) == 1:  # before the first file is written: an evaluation that failed before moves nothing
            keep_earlier_results(out, source, shards=str(shards), subset=p.subset,
                                 classifier=None if p.linear_probe else p.classifier)
        try:  # (a picture that cannot be drawn costs its picture, not the numbers computed)
            pictures[name] = [str(x) for x in save_pictures(name, embs["train"], embs["val"], shards, out, frame_cache)]
            if not pictures[name]:
                print(f"{name}: no pictures (no action has two validation videos with finite embeddings)")
        except Exception as exn:  # noqa: BLE001
            pictures[name] = []
            print(f"warning: {name}: pictures not drawn: {type(exn).__name__}: {exn}", file=sys.stderr)
    manifest = json.loads((Path(shards) / "shards.json").read_text())
    actions = (manifest.get("label_names") or {}).get("actions")
    table = markdown_tables(results, actions if isinstance(actions, list) else None) + _notes(results, p)
    if any(skipped.values()):  # damaged samples were left out: say so beside the numbers
        table += ("\n\nSkipped as unreadable (listed in results.json): "
                  + ", ".join(f"{len(v)} {split}" for split, v in skipped.items()) + " sample(s).")
    drawn = [x for v in pictures.values() for x in v]
    if drawn:
        table += "\n\nPictures: " + ", ".join(Path(x).name for x in drawn) + "."
    of = f"\n\nModels: {source}." if source else ""
    (out / "results.md").write_text(f"# Transfer evaluation: {dataset} ({shards})\n\n{table}{of}\n")
    (out / "results.json").write_text(json.dumps(_strict_json({
        "dataset": dataset, "shards": str(shards), "source": source, "results": results, "skipped": skipped,
        "subset": p.subset, "classifier": None if p.linear_probe else p.classifier, "pictures": pictures,
        "seconds": time.time() - t0}),
        indent=2, allow_nan=False))
    return {"table": table, "results": results, "out_dir": str(out)}
