"""How often the paired contrastive loss's correspondences are right, on real training batches.

    python -m carl_scale.bench.pcl_quality --checkpoint runs/pretrain/checkpoints/latest --shards data/synthetic

A checkpoint and shards with phase labels (synthetic, PennAction, Pouring, FineGym): the
checkpoint's own recipe draws ``--batches`` weak-supervision batches (same-label pairs, both
augmented views, the run's T), the model embeds them (in eval mode, without gradient),
and for each correspondence cost (``views``: the paper's four view pairs; ``joint``: both views as
one sequence, :func:`carl_scale.losses.pcl.joint_view_projections`) and each ε1 it reports, over
the same-label pairs' cells whose two frames both have a phase:

* *positive precision*: the share of PCL positives whose two frames are in the same phase;
* *rows with a positive*: the share of anchor frames that get any positive (the others add no PCL);
* *same-phase cells made negatives*: how much of what should be pulled together is pushed apart.

Two references: a relative-position guess (frame s of n matched to the partner frame nearest
s/n), and DTW on the *whole*, unaugmented validation videos embedded as the evaluation does (the
path's phase precision: what the representation itself knows, without the views' sampling).

On the synthetic set it also prints the one-shot phase accuracy (the split of
:func:`carl_scale.eval.quick.validation_objective`) of the model and of the *true* joint angles,
alone and with the frame's progress through the video appended (scaled to 0..3, about the spread
of one joint angle, so that neither part dominates the distance): the ceiling a representation of
one frame's pose reaches, and what mixing in "when" does to it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

PROGRESS_SCALE = 3.0  # progress 0..1 stretched to about one joint angle's range (radians)


def _phase_grid(batch, grids, v: int) -> np.ndarray:
    """The phase of each frame of ``grids[v]`` (-9 where no view sampled it)."""
    seen = dict(zip(batch.timestamps[v].reshape(-1).tolist(), batch.phase_labels[v].reshape(-1).tolist()))
    return np.array([seen.get(int(g), -9) for g in grids[v]])


def batch_counts(model, batch, eps1_list, eps2: float, grid: str = "views") -> dict[tuple[str, float], np.ndarray]:
    """{(cost, ε1): counts [positives, right positives, rows, rows with a positive, same-phase
    cells, of them negatives, relative-position right, relative-position total]}."""
    from carl_scale.losses.pcl import _grid, joint_view_projections, pair_correspondences

    b, _, t = batch.views.shape[:3]
    with torch.no_grad():
        m = batch.mask.flatten(0, 1)
        out = model(batch.views.flatten(0, 1), m)
        z = model.project(out["embeddings"], m).view(b, 2, t, -1)
        joint = joint_view_projections(model, out["features"], batch.timestamps, batch.mask, batch.num_frames)
    lab = batch.action_labels.tolist()
    pairs = [(a, c) for a in range(b) for c in range(a + 1, b) if lab[a] >= 0 and lab[a] == lab[c]]
    grids = [_grid(batch.timestamps[a], batch.mask[a], int(batch.num_frames[a]), grid) for a in range(b)]
    phases = [_phase_grid(batch, grids, v) for v in range(b)]
    counts = {}
    for eps1 in eps1_list:
        e2 = max(eps1, eps2)
        for cost in ("views", "joint"):
            if cost == "views":
                found = pair_correspondences(z, batch.timestamps, batch.mask, grids, pairs, positive_pct=eps1,
                                             protect_pct=e2)
            else:
                jz, jts, jm = joint
                found = pair_correspondences(jz[:, None], jts[:, None], jm[:, None], grids, pairs, positive_pct=eps1,
                                             protect_pct=e2)
            c = np.zeros(8)
            for (a, v), (pos, neg) in zip(pairs, found):
                known = (phases[a][:, None] >= 0) & (phases[v][None, :] >= 0)
                same = (phases[a][:, None] == phases[v][None, :]) & known
                p, n = pos.cpu().numpy() & known, neg.cpu().numpy() & known
                rows = known.any(1)
                c[:6] += [p.sum(), (p & same).sum(), rows.sum(), (p.any(1) & rows).sum(), same.sum(), (n & same).sum()]
                ga = grids[a].numpy() / int(batch.num_frames[a])
                gv = grids[v].numpy() / int(batch.num_frames[v])
                guess = np.abs(ga[:, None] - gv[None, :]).argmin(1)
                ok = known[np.arange(len(guess)), guess]
                c[6:] += [(same[np.arange(len(guess)), guess] & ok).sum(), ok.sum()]
            counts[(cost, eps1)] = c
    return counts


def whole_video_precision(model, shards: str, spatial, limit: int | None = None) -> float:
    """Phase precision of the DTW path between every two validation videos of an action, on
    whole unaugmented videos embedded as the evaluation does."""
    from carl_scale.eval.alignment import align
    from carl_scale.eval.quick import extract_embeddings

    ve = extract_embeddings(model, shards, "val", spatial=spatial, device="cpu", limit=limit)
    right = total = 0
    for _, idx in sorted(ve.by_action().items()):
        g = ve.subset(idx)
        for i in range(len(idx)):
            for j in range(i + 1, len(idx)):
                _, path = align(g.embeddings[i], g.embeddings[j])
                la, lb = np.asarray(g.phase_labels[i])[path[:, 0]], np.asarray(g.phase_labels[j])[path[:, 1]]
                known = (la >= 0) & (lb >= 0)
                right += int((la == lb)[known].sum())
                total += int(known.sum())
    return right / max(1, total)


def synthetic_one_shot_ceiling(manifest: dict) -> dict[str, float]:
    """One-shot accuracy on the synthetic val set from the true poses, with the evaluation's split
    (each action's even-numbered videos labelled, the odd ones classified)."""
    from carl_scale.config import from_dict
    from carl_scale.data.config import SyntheticConfig
    from carl_scale.datasets.synthetic import true_poses
    from carl_scale.eval.metrics import one_shot_phase_classification

    cfg = from_dict(SyntheticConfig, manifest["synthetic_config"])
    videos = [true_poses(cfg, "val", i) for i in range(cfg.val_videos)]
    actions = np.array([v[2] for v in videos])
    features = {"true pose": [v[0] for v in videos],
                "true pose + progress": [np.concatenate([v[0], PROGRESS_SCALE * np.linspace(0, 1, len(v[0]))[:, None]], 1)
                                         for v in videos]}
    out = {}
    for name, feats in features.items():
        accs = []
        for a in np.unique(actions):
            idx = np.flatnonzero(actions == a)
            if len(idx) < 2:
                continue
            pool, query = idx[0::2], idx[1::2]
            accs.append(one_shot_phase_classification(
                [feats[i] for i in pool], [videos[i][1] for i in pool], actions[pool],
                [feats[i] for i in query], [videos[i][1] for i in query], actions[query], device="cpu")["accuracy"])
        kept = [x for x in accs if not np.isnan(x)]  # as validation_objective: actions it cannot score drop out
        out[name] = float(np.mean(kept)) if kept else float("nan")
    return out


def main(argv: list[str] | None = None) -> None:
    from carl_scale.config import ConfigError
    from carl_scale.data.manifest import read_manifest
    from carl_scale.data.reader import VideoLoader
    from carl_scale.eval.quick import validation_objective
    from carl_scale.models.weights import CheckpointError
    from carl_scale.models import load_model
    from carl_scale.models.weights import resolve_checkpoint
    from carl_scale.tables import table
    from carl_scale.train.recipes import configure, load_run_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (or a run's checkpoints/latest)")
    p.add_argument("--shards", required=True, help="shard directory with phase labels and a val split")
    p.add_argument("--batches", type=int, default=6, help="training batches to draw (default 6)")
    p.add_argument("--eps1", type=float, nargs="+", default=[5.0, 15.0], help="ε1 percentages to try")
    p.add_argument("--eps2", type=float, default=10.0, help="ε2 percentage (raised to ε1 where smaller)")
    p.add_argument("--val-videos", type=int, default=None, help="validation videos for the whole-video reference")
    a = p.parse_args(argv)
    if a.batches < 1:
        raise SystemExit(f"--batches must be >= 1, got {a.batches}")
    for flag, values in (("--eps1", a.eps1), ("--eps2", [a.eps2])):
        if not all(0 < v <= 100 for v in values):
            raise SystemExit(f"{flag} must be in (0, 100], got {' '.join(f'{v:g}' for v in values)}")
    os.environ.setdefault("CARL_SCALE_NO_PROGRESS", "1")
    ckpt = resolve_checkpoint(a.checkpoint)
    if not (ckpt / "meta.json").is_file():
        raise SystemExit(f"--checkpoint {a.checkpoint}: no meta.json in {ckpt} (a checkpoint directory or "
                         f"a run's checkpoints/latest)")
    manifest = read_manifest(a.shards) if Path(a.shards).is_dir() else None
    if manifest is None:
        raise SystemExit(f"--shards {a.shards}: not a shard directory with shards.json (e.g. data/synthetic)")
    if not {"train", "val"} <= set(manifest.get("splits", {})):
        raise SystemExit(f"--shards {a.shards}: needs a train and a val split, has {sorted(manifest.get('splits', {}))}")
    try:
        cfg = configure(load_run_config(ckpt / "meta.json"),
                        {"init_from": str(ckpt), "data.shards": a.shards, "data.num_workers": 0,
                         "eval.enabled": False, "run_dir": "/nonexistent/pcl_quality",
                         # a GPU run's data path settings: the CPU loader here decodes in the process
                         "data.finish_threads": 1, "data.cpu_decode_share": 0.0}, weak=True)
    except ConfigError as exn:
        raise SystemExit(str(exn)) from None
    try:
        model = load_model(ckpt).eval()
        loader = VideoLoader(cfg.data, rank=0, world_size=1, seed=cfg.seed, device="cpu")
    except (CheckpointError, ValueError) as exn:
        raise SystemExit(str(exn)) from None
    total: dict = {}
    try:
        for i, batch in enumerate(loader):
            if i >= a.batches:
                break
            for k, c in batch_counts(model, batch, a.eps1, a.eps2).items():
                total[k] = total.get(k, 0) + c
    finally:
        loader.close()
    if not total or next(iter(total.values()))[2] == 0:
        raise SystemExit(f"--shards {a.shards}: no same-label pair with phase-labelled frames in {a.batches} "
                         f"batches; the benchmark needs videos with action and phase labels")
    rows = []
    for (cost, eps1), c in sorted(total.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append((cost, f"{eps1:g}", f"{c[1] / max(1, c[0]):.3f}", f"{c[3] / max(1, c[2]):.3f}",
                     f"{c[5] / max(1, c[4]):.3f}"))
    guess = next(iter(total.values()))
    whole = whole_video_precision(model, a.shards, cfg.data.spatial, a.val_videos)
    print(f"PCL correspondences against phase labels: {ckpt}, {a.batches} batches of {cfg.data.batch_size}, "
          f"T = {cfg.data.temporal.num_frames}, ε2 {a.eps2:g}%\n"
          + table(rows, ("cost", "ε1 %", "positive precision", "rows with a positive", "same-phase cells negative")))
    print(f"\nreferences: relative-position guess {guess[6] / max(1, guess[7]):.3f}; DTW path on whole "
          f"unaugmented validation videos {whole:.3f}")
    if manifest.get("synthetic_config"):
        ceiling = synthetic_one_shot_ceiling(manifest)
        ours = validation_objective(model, a.shards, cfg.data.spatial, "cpu", "one_shot")
        print("one-shot phase accuracy (validation split): this model {:.3f}; {}".format(
            ours, "; ".join(f"{k} {v:.3f}" for k, v in ceiling.items())))


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.pcl_quality", main)
