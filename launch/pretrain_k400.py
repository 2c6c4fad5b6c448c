"""CARL pretraining (SCL), DeepSpeed data parallel, from a named recipe.

The embedded default (``--recipe debug``): writes the synthetic phase-video shards to data/synthetic
once, trains the ``debug`` flavor on the CPU for a few minutes and prints how its embeddings
compare with a randomly initialised model's on the synthetic validation videos::

    deepspeed launch/pretrain_k400.py                  # all local GPUs, or the CPU with gloo
    python launch/pretrain_k400.py                     # one process
    deepspeed --num_gpus 2 launch/pretrain_k400.py     # two processes (also on a CPU machine)

The paper's recipes (pennaction, finegym, pouring, k400; carl_scale/train/recipes.py cites each
setting); every other flag changes one field of the recipe::

    deepspeed launch/pretrain_k400.py --recipe k400 --shards data/k400 --epoch-samples 60000 \\
        --pretrained byol_r50.pth
    deepspeed launch/pretrain_k400.py --recipe finegym --pretrained byol_r50.pth --frames 160
    python launch/pretrain_k400.py --recipe finegym --print-config      # the resolved config as JSON

A saved config (a run's config.json, a checkpoint's meta.json, a sweep's best_config.json)::

    python launch/pretrain_k400.py --config runs/sweep/default/best_config.json --steps 2000

A tiny smoke run::

    python launch/pretrain_k400.py --steps 4 --synthetic-videos 8 --frames 8 --batch-size 2 --no-eval \
        --data-dir data/synthetic_smoke --run-dir runs/smoke

Weak supervision with the video labels, from the self-supervised run (paper §3.5; run dir
runs/pretrain_weak)::

    deepspeed launch/pretrain_k400.py --init-from runs/pretrain/checkpoints/latest --weak

Resume an interrupted run: add ``--resume latest`` (same --run-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from carl_scale.config import ConfigError, add_flags, given_flags, iter_flags, to_dict  # noqa: E402
from carl_scale.errors import run_cli  # noqa: E402
from carl_scale.data.manifest import plain_local_path, write_command  # noqa: E402
from carl_scale.hooks import Hook  # noqa: E402
from carl_scale.models.flavors import FLAVORS  # noqa: E402
from carl_scale.models.weights import read_meta  # noqa: E402
from carl_scale.train.config import RunConfig  # noqa: E402
from carl_scale.train.recipes import RECIPES, configure, load_run_config, recipe, resume_hint  # noqa: E402

_GROUPS = {"data": "data", "model": "model", "loss": "objective", "optim": "optimisation",
           "parallel": "parallelism", "checkpoint": "checkpoints", "eval": "end-of-run evaluation"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed launcher
    g = p.add_argument_group("what to run")
    g.add_argument("--recipe", choices=sorted(RECIPES), help="a named, complete config (default: debug)")
    g.add_argument("--config", help="start from a saved config instead of a recipe (JSON)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    g.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    g.add_argument("--flavor", choices=sorted(FLAVORS), help="replace the recipe's model by this flavor")
    g.add_argument("--augment", choices=["paper", "light"], help="augmentation strengths: the paper's or light")
    g.add_argument("--no-blur", action="store_true", help="no Gaussian blur (--blur-p 0; the FineGym setting)")
    g.add_argument("--data-dir", help="where the synthetic set is written (default: data/synthetic)")
    g.add_argument("--synthetic-videos", type=int, help="train videos of the synthetic set (val: a third, at least "
                                                        "one per action)")
    g.add_argument("--weak", action="store_true",
                   help="weak supervision with the video labels (paper §3.5): --loss weak, a class token, "
                        "--per-label 2, run dir <run_dir>_weak; start it from a self-supervised --init-from")
    add_flags(p, RunConfig, _GROUPS, shown=recipe("debug"), label="debug recipe")
    return p


def parse(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """The run config the command line asks for, validated (a bad value raises ConfigError naming
    its flag): the recipe or saved config, then every given flag."""
    args = parser().parse_args(argv)
    if args.recipe and args.config:
        raise ConfigError("--recipe and --config both name a starting config; give one")
    if args.flavor not in (None, "debug") and args.recipe is None and args.config is None:
        raise ConfigError(f"--flavor {args.flavor} without --recipe would train it with the debug recipe's "
                          f"settings (T 8, α 50, lr 3e-4); name the recipe: --recipe "
                          f"{'|'.join(r for r in RECIPES if r != 'debug')}")
    base = load_run_config(args.config) if args.config else recipe("debug" if args.recipe is None else args.recipe)
    overrides = given_flags(args, RunConfig)
    if overrides.get("init_from") and args.recipe is None and args.config is None:
        try:
            flavor = read_meta(overrides["init_from"])["config"]["model"].get("flavor")
        except (OSError, ValueError) as exn:
            raise ConfigError(f"--init-from: {exn}{resume_hint(overrides, to_dict(base), args.weak)}") from None
        if flavor != "debug":
            raise ConfigError(f"--init-from a {flavor} checkpoint without --recipe or --config would train it with "
                              f"the debug recipe's settings; add --config {Path(overrides['init_from']) / 'meta.json'} "
                              f"(its own) or --recipe NAME")
    if args.no_blur:
        overrides["data.spatial.blur_p"] = 0.0
    cfg = configure(base, overrides, flavor=args.flavor, augment=args.augment,
                    synthetic_videos=args.synthetic_videos, data_dir=args.data_dir, weak=args.weak)
    if cfg.loss.name == "weak":  # weak settings this run would ignore: refused, never silently dropped
        flag = {f.path: f.flag for f in iter_flags(RunConfig)}
        unused = [k for k in ("loss.eps1", "loss.eps2", "loss.pcl_grid", "loss.pcl_cost", "loss.view_ensemble")
                  if k in overrides] if cfg.loss.pcl_weight == 0 else []
        if unused:
            raise ConfigError(f"{flag[unused[0]]} sets the paired contrastive loss, and --lambda is 0 (no PCL): "
                              f"drop the flag, or give --lambda > 0")
        if "loss.gather_negatives" in overrides and not cfg.loss.class_negatives:
            raise ConfigError("--gather-negatives gathers Eq. 3's other-class negatives, and --no-class-negatives "
                              "leaves them out: drop one of the two")
    if overrides.get("eval.shards") is not None and not cfg.eval.enabled:
        raise ConfigError("--val-shards names the end-of-run evaluation's videos, and --no-eval skips it: drop one")
    if overrides.get("eval.shards") is not None and cfg.eval.enabled:  # named: not skipped at the end, refused now
        from carl_scale.eval.quick import end_of_run_shards

        shards, why = end_of_run_shards(cfg.data.shards, cfg.eval.shards, None)
        if shards is None:
            raise ConfigError(f"{why}: name a shard directory with a val split, or drop --val-shards")
    return cfg, args


class WriteSyntheticShards(Hook):
    """Rank 0 writes the synthetic shards once (reused while the config matches) before anyone
    reads them."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def on_start(self, rank: int, world_size: int) -> None:
        from carl_scale.datasets.synthetic import ensure_synthetic_shards
        from carl_scale.tables import progress_wanted

        if rank == 0:
            ensure_synthetic_shards(self.cfg.data.shards, self.cfg.synthetic,
                                    progress=progress_wanted())


def hooks_for(cfg: RunConfig) -> list:
    """The synthetic data (when the run has it) and the end-of-run evaluation (when enabled and
    validation videos exist, never the training stream; otherwise one line says why not)."""
    from carl_scale.eval.quick import EndOfRunEvaluation, end_of_run_shards

    hooks: list = [WriteSyntheticShards(cfg)] if cfg.synthetic is not None else []
    if cfg.eval.enabled:
        shards, why = end_of_run_shards(cfg.data.shards, cfg.eval.shards,
                                        cfg.synthetic.val_videos if cfg.synthetic else None)
        if shards is None:
            if os.environ.get("RANK", "0") == "0":  # one line, not one per rank
                print(f"end-of-run evaluation skipped: {why}", flush=True)
        else:
            hooks.append(EndOfRunEvaluation(shards, cfg.model, cfg.data.spatial, cfg.seed))
    return hooks


def main(argv: list[str] | None = None) -> dict | None:
    cfg, args = parse(argv)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2, sort_keys=True))
        return None
    shards = cfg.data.shards
    # (a --config may leave the shards to a flag: refused once the flags are applied, before any process starts)
    if cfg.synthetic is None and (not shards or isinstance(shards, (list, tuple)) and not all(str(u).strip()
                                                                                              for u in shards)):
        raise ConfigError(f"--shards: no training data ({shards!r}{' has an empty entry' if shards else ''}): give "
                          f"a shard directory, brace pattern or .txt list, or a recipe with the embedded synthetic "
                          f"set (--recipe debug)")
    if cfg.synthetic is None and plain_local_path(shards) and not Path(shards).exists():  # the usual first mistake
        of = f" of the {args.recipe} recipe" if args.recipe else ""
        raise ConfigError(f"--shards {shards}: no such directory (the training data{of}). Write it first: "
                          f"{write_command('folder' if args.recipe is None else args.recipe, shards)}")
    from carl_scale.train.trainer import run

    return run(cfg, hooks_for(cfg))


if __name__ == "__main__":
    run_cli("pretrain_k400.py", main)
