"""The short evaluation printed at the end of pretraining, on validation videos only.

Per action class (PennAction-style): phase classification accuracy of a logistic regression on
frozen embeddings, scored by k-fold cross-validation over the class's validation videos (fitted on
the other folds' videos, so no training video is read), and Kendall's τ over the validation
videos; averaged over classes; for each model given and for position-only features. The full
protocol (classifiers fitted on the training split) is ``launch/transfer_eval.sh``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from carl_scale.data.config import SpatialConfig
from carl_scale.eval.embed import VideoEmbeddings, extract_embeddings
from carl_scale.eval.metrics import kendalls_tau, phase_classification
from carl_scale.hooks import Hook
from carl_scale.models import ModelConfig, build_model
from carl_scale.tables import table

log = logging.getLogger("carl_scale.eval")


def position_embeddings(ve: VideoEmbeddings, dim: int = 16) -> VideoEmbeddings:
    """Features that know only where a frame is in its video (sin/cos of the relative position):
    the baseline every frame representation has to beat, since phases follow each other in time.
    A transformer with positional encodings gets this much at random initialisation."""
    f = np.arange(1, dim // 2 + 1)
    embs = [np.concatenate([np.sin(np.linspace(0, 1, len(e))[:, None] * f * np.pi),
                            np.cos(np.linspace(0, 1, len(e))[:, None] * f * np.pi)], axis=1) for e in ve.embeddings]
    return dataclasses.replace(ve, embeddings=embs, fingerprint="")


def cross_validated_phase_accuracy(ve: VideoEmbeddings, folds: int = 4) -> float:
    """Frame accuracy of logistic regression over ``ve``'s labelled frames, each video predicted
    by a classifier fitted on the other folds' videos (videos dealt round-robin into ``folds``).
    NaN with fewer than two videos."""
    n = len(ve.video_ids)
    if n < 2:
        return float("nan")
    k = min(folds, n)
    correct = total = 0.0
    for j in range(k):
        test = list(range(j, n, k))
        fit = [i for i in range(n) if i % k != j]
        held = ve.subset(test)
        frames = sum(int((p >= 0).sum()) for p in held.phase_labels)
        if not frames:
            continue
        train = ve.subset(fit)
        acc = phase_classification(train.embeddings, train.phase_labels, held.embeddings, held.phase_labels,
                                   classifier="logistic", fractions=(1.0,))[1.0]
        if not np.isnan(acc):
            correct += acc * frames
            total += frames
    return correct / total if total else float("nan")


def quick_eval(models: dict, shards, spatial: SpatialConfig, device, *, folds: int = 4,
               skipped: list[str] | None = None, embedded_out: dict | None = None) -> dict[str, dict]:
    """{model name: {"phase_acc", "kendall_tau"}} on the validation videos of ``shards`` (the
    ``val`` split of a shard directory, or every video of a shard pattern or list), with
    ``position_only`` features as the first row. Unreadable samples are left out and added to
    ``skipped``; ``embedded_out`` receives each model's :class:`VideoEmbeddings`."""
    embedded = {name: extract_embeddings(model, shards, "val", spatial=spatial, device=str(device))
                for name, model in models.items()}
    if skipped is not None:
        skipped += next(iter(embedded.values())).skipped
    embedded = {"position_only": position_embeddings(next(iter(embedded.values()))), **embedded}
    if embedded_out is not None:
        embedded_out.update(embedded)
    out = {}
    for name, ve in embedded.items():
        bad = ve.nonfinite()
        if bad:
            out[name] = {"phase_acc": float("nan"), "kendall_tau": float("nan")}
            log.warning("%s: %d of %d validation videos have non-finite embeddings (e.g. %s): its weights are not "
                        "finite, so it is not scored", name, len(bad), len(ve.video_ids), bad[0])
            continue
        accs, taus = [], []
        for action, vidx in sorted(ve.by_action().items()):
            group = ve.subset(vidx)
            accs.append(cross_validated_phase_accuracy(group, folds))
            # τ over the labelled frames, as the transfer protocol (and the published code) cut them, at
            # stride 1 (the protocols take every 2nd frame on PennAction, every 5th on Pouring: a
            # quick check's numbers, not the protocol's)
            if len(vidx) > 1:
                taus.append(kendalls_tau(group.labelled_only().embeddings)["tau"])
        out[name] = {"phase_acc": float(np.nanmean(accs)) if not np.all(np.isnan(accs)) else float("nan"),
                     "kendall_tau": float(np.nanmean(taus)) if taus else float("nan")}
    return out


OBJECTIVES = ("phase_acc", "kendall_tau", "one_shot")


def validation_objective(model, shards, spatial: SpatialConfig, device, objective: str = "phase_acc", *,
                         limit: int | None = None, folds: int = 4) -> float:
    """One number for a sweep, from validation videos only (about ``limit`` of the val split: an
    equal share, at least 2, of each action the manifest names, or of the first ``limit // 2``
    actions met where it names more; the first videos of each in shard order. A split written
    class by class would otherwise give its first class only. Without a manifest: the first
    ``limit``), per action class and averaged: ``phase_acc`` (cross-validated, as :func:`quick_eval`),
    ``kendall_tau``, or ``one_shot`` (each action's even-numbered videos are the labelled pool,
    the odd ones are classified; :func:`one_shot_phase_classification`)."""
    from carl_scale.eval.metrics import one_shot_phase_classification

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    from carl_scale.data.manifest import resolve_shards

    actions = len(((resolve_shards(shards, "val")[1] or {}).get("label_names") or {}).get("actions") or [])
    per_action = None
    if limit is not None and actions:  # the first min(actions, limit // 2) actions met, limit // that many videos each
        actions = min(actions, max(1, limit // 2))
        per_action = max(2, limit // actions)
        limit = actions * per_action
    ve = extract_embeddings(model, shards, "val", spatial=spatial, device=str(device), limit=limit,
                            per_action=per_action, max_actions=actions if per_action else None)
    bad = ve.nonfinite()
    if bad:  # (no score: a NaN frame would win every search, or fail the classifier mid-sweep)
        log.warning("%d of %d validation videos have non-finite embeddings (e.g. %s): the weights are not finite, "
                    "the objective is NaN", len(bad), len(ve.video_ids), bad[0])
        return float("nan")
    scores = []
    for _, vidx in sorted(ve.by_action().items()):
        group = ve.subset(vidx)
        if objective == "phase_acc":
            scores.append(cross_validated_phase_accuracy(group, folds))
        elif len(vidx) < 2:
            continue
        elif objective == "kendall_tau":
            scores.append(kendalls_tau(group.labelled_only().embeddings)["tau"])
        else:
            pool, query = group.subset(list(range(0, len(vidx), 2))), group.subset(list(range(1, len(vidx), 2)))
            scores.append(one_shot_phase_classification(pool.embeddings, pool.phase_labels, pool.action_labels,
                                                        query.embeddings, query.phase_labels, query.action_labels,
                                                        device=str(device))["accuracy"])
    kept = [x for x in scores if not np.isnan(x)]
    return float(np.mean(kept)) if kept else float("nan")


def end_of_run_shards(train_shards, val_shards: str | None, synthetic_val_videos: int | None
                      ) -> tuple[str | None, str]:
    """Where the end-of-run evaluation finds validation videos, never in the training stream:
    ``val_shards`` if given, else the ``val`` split of the training shard directory. Returns
    (shards or None, why it is skipped)."""
    from carl_scale.data.manifest import read_manifest, resolve_shards

    if val_shards is not None:
        if "{" not in val_shards and not Path(val_shards).exists():
            return None, f"--val-shards {val_shards} does not exist"
        if Path(val_shards).is_dir() and "val" not in (read_manifest(val_shards) or {}).get("splits", {}):
            return None, f"--val-shards {val_shards} is not a shard directory with a val split (shards.json)"
        try:  # (a pattern or list may name training shards too)
            shared = sorted({os.path.realpath(u) for u in resolve_shards(val_shards, "val")[0]}
                            & {os.path.realpath(u) for u in resolve_shards(train_shards, "train")[0]})
        except (OSError, ValueError):  # (not written yet, or unreadable: the run itself says so)
            shared = []
        if shared:
            return None, (f"--val-shards {val_shards} names {len(shared)} of the training shards (e.g. {shared[0]}): "
                          f"the evaluation would score videos the model trained on")
        return val_shards, ""
    if synthetic_val_videos is not None:  # the synthetic set, written before training starts
        return (train_shards, "") if synthetic_val_videos > 0 else (None, "the synthetic set has no val videos")
    if not isinstance(train_shards, str) or not Path(train_shards).is_dir():
        return None, ("--shards is a shard pattern or list, not a directory with a val split; pass --val-shards "
                      "DIR to evaluate")
    manifest = read_manifest(train_shards)
    if manifest is None or "val" not in manifest.get("splits", {}):
        return None, f"{train_shards} has no val split; pass --val-shards DIR to evaluate"
    return train_shards, ""


# what a newcomer reading the table asks first (README, "Status": why tau cannot separate the rows)
TAU_NOTE = ("(phase accuracy is what training learned; Kendall's tau is high for any encoder here, position_only "
            "features included, since frame positions alone keep a video's order: a trained encoder may trade a "
            "little of it for pose)")


class EndOfRunEvaluation(Hook):
    """After the last step, rank 0 evaluates the trained encoder against the same flavor at its
    random initial weights (``seed``) on ``shards``' validation videos, prints the table and
    returns it as ``{"eval": ...}``; the other ranks wait."""

    def __init__(self, shards, model_cfg: ModelConfig, spatial: SpatialConfig, seed: int, folds: int = 4):
        self.shards, self.model_cfg, self.spatial, self.seed, self.folds = shards, model_cfg, spatial, seed, folds
        self._drawn: list[str] = []  # the pictures rank 0's evaluation drew

    def on_end(self, ctx) -> dict:
        result, skipped, error = {}, [], None
        # The other ranks wait on a gloo group of their own, with a long timeout: an evaluation
        # longer than the training group's (DeepSpeed's 10 minutes) would kill them mid-wait.
        wait = dist.new_group(backend="gloo", timeout=timedelta(hours=24)) \
            if dist.is_initialized() and dist.get_world_size() > 1 else None
        if ctx.rank == 0:
            try:
                result = self._evaluate(ctx, skipped)
            except BaseException as exn:  # raised below, once the others know
                error = exn
        if wait is not None:
            failed = torch.tensor([float(error is not None)])
            dist.broadcast(failed, src=0, group=wait)
            dist.destroy_process_group(wait)
            if failed.item() and error is None:
                raise ValueError("the end-of-run evaluation failed on rank 0 (its message is there); the trained "
                                 "checkpoints are saved: evaluate them with launch/transfer_eval.sh")
        if error is not None:
            raise error
        out = {"eval": result, "eval_skipped_samples": len(skipped)}
        if result:  # rank 0's (the trainer shows them in TensorBoard beside the evaluation's numbers)
            out["pictures"] = self._drawn
        return out

    def _evaluate(self, ctx, skipped: list) -> dict:
        """Rank 0: the trained encoder and a randomly initialised one on the validation videos; the
        table printed and returned."""
        torch.manual_seed(self.seed)
        cfg = self.model_cfg
        if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
            # a resumed run need not have its start file any more (every weight is in its
            # checkpoint): the baseline's trunk then starts from random weights too, and says so
            print(f"end-of-run baseline: {cfg.pretrained} is gone, its trunk starts from random weights",
                  flush=True)
            cfg = dataclasses.replace(cfg, pretrained=None)
        random_init = build_model(cfg, weights_follow=cfg is not self.model_cfg).to(ctx.device)
        embedded: dict = {}
        result = quick_eval({"random_init": random_init, "trained": ctx.model}, self.shards, self.spatial,
                            ctx.device, folds=self.folds, skipped=skipped, embedded_out=embedded)
        keys = list(next(iter(result.values())).keys())
        print(f"\nvalidation videos of {self.shards} (phase accuracy: {self.folds}-fold cross-validation per action)\n"
              + table([(name, *(f"{v[k]:.4f}" for k in keys)) for name, v in result.items()], ("model", *keys)),
              flush=True)
        if "kendall_tau" in keys:
            print(TAU_NOTE, flush=True)
        if skipped:
            print(f"skipped {len(skipped)} unreadable validation sample(s): {skipped[:3]}", flush=True)
        self._drawn = self._pictures(ctx, embedded["trained"])
        return result

    def _pictures(self, ctx, val: VideoEmbeddings) -> list[str]:
        """The trained encoder's alignment of two validation videos of one action (similarity
        heatmap, DTW path, aligned frames) and a frame's nearest neighbours in the others, into
        ``run_dir/pictures``; their paths. A picture that cannot be drawn costs the picture, never
        the run's summary."""
        try:
            from carl_scale.eval.transfer import save_pictures

            out = Path(ctx.run_dir) / "pictures"
            out.mkdir(parents=True, exist_ok=True)
            no_train = VideoEmbeddings([], [], [], np.zeros(0, np.int64))  # (no phase timeline: no classifier here)
            paths = [str(p) for p in save_pictures("trained", no_train, val, self.shards, out)]
        except Exception as exn:  # noqa: BLE001
            print(f"warning: end-of-run pictures not drawn: {type(exn).__name__}: {exn}", file=sys.stderr, flush=True)
            return []
        if paths:
            print("pictures: " + ", ".join(paths), flush=True)
        return paths
