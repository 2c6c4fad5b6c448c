"""CARL self-supervised pretraining (SCL), DeepSpeed data parallel.

The embedded default (no --shards): writes the synthetic phase-video shards to data/synthetic once,
trains the ``debug`` flavor on the CPU for a few minutes and prints how its embeddings compare
with a randomly initialised model's on the synthetic validation set::

    deepspeed launch/pretrain_k400.py                  # all local GPUs, or the CPU with gloo
    python launch/pretrain_k400.py                     # one process
    deepspeed --num_gpus 2 launch/pretrain_k400.py     # two processes (also on a CPU machine)

Real data::

    deepspeed launch/pretrain_k400.py --shards 'k400/train-{000000..000999}.tar' --flavor r50 \\
        --pretrained byol_r50.pth --frames 80 --batch-size 4 --steps 300000 --epoch-samples 60000

A tiny smoke run::

    python launch/pretrain_k400.py --steps 4 --synthetic-videos 8 --frames 8 --batch-size 2 --no-eval

Resume an interrupted run: add ``--resume latest`` (same --run-dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from carl_scale.config import LoaderConfig, SpatialConfig, TemporalConfig  # noqa: E402
from carl_scale.data.synthetic import SyntheticConfig  # noqa: E402
from carl_scale.models import FLAVORS, model_config  # noqa: E402
from carl_scale.models.flavors import model_config_from_dict  # noqa: E402
from carl_scale.train.config import (CheckpointConfig, LossConfig, OptimConfig, ParallelConfig,  # noqa: E402
                                     RunConfig)


def parse(argv: list[str] | None = None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed launcher
    g = p.add_argument_group("data")
    g.add_argument("--shards", help="shard directory (with shards.json) or brace pattern; default: synthetic")
    g.add_argument("--epoch-samples", type=int, help="samples per rank per epoch (needed without shards.json)")
    g.add_argument("--frames", type=int, default=None, help="T, frames per view (default: 8 debug, 80 r50)")
    g.add_argument("--alpha", type=float, default=None,
                   help="max clip length / T (default: 1.5 as the paper; debug: 50, clips up to the whole video)")
    g.add_argument("--beta", type=float, default=0.2)
    g.add_argument("--sampling", choices=["random", "even"], default="random")
    g.add_argument("--batch-size", type=int, default=None, help="videos per rank per micro step (default: 16 debug, "
                   "4 r50)")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--decoder", choices=["auto", "dali", "pyav"], default="auto")
    g.add_argument("--resampled", action="store_true")
    g.add_argument("--no-blur", action="store_true", help="no Gaussian blur (the published FineGym setting)")
    g.add_argument("--augment", choices=["paper", "light"], default=None,
                   help="spatial augmentation strengths (default: paper; debug: light)")
    g.add_argument("--data-dir", default="data/synthetic", help="where the synthetic default shards live")
    g.add_argument("--synthetic-videos", type=int, help="train videos of the synthetic default (val: a third)")
    g = p.add_argument_group("model")
    g.add_argument("--flavor", choices=sorted(FLAVORS), default="debug")
    g.add_argument("--pretrained", help="local ResNet-50 weights (torchvision state dict or BYOL checkpoint)")
    g.add_argument("--init-from", help="a step_NNNNNN checkpoint directory: start from its model (and its model "
                   "config), e.g. to fine-tune a Kinetics-400 model on a target dataset")
    g.add_argument("--image-size", type=int)
    g.add_argument("--layers", type=int, help="transformer layers")
    g.add_argument("--train-stages", type=int, help="backbone stages trained, from the top")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 400 debug, 100000 r50)")
    g.add_argument("--lr", type=float, default=None, help="default: 1e-4 (r50), 3e-4 (debug, random init)")
    g.add_argument("--weight-decay", type=float, default=1e-5)
    g.add_argument("--optimizer", choices=["adam", "adamw"], default="adam")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--tau", type=float, default=0.1)
    g.add_argument("--sigma2", type=float, default=10.0)
    g.add_argument("--grad-clip", type=float, default=10.0)
    g = p.add_argument_group("parallelism")
    g.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2])
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, help="checked against batch x accum x world size")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default="runs/pretrain")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    g.add_argument("--resume", help="'latest' or a step_NNNNNN directory")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--no-eval", action="store_true", help="skip the end-of-run evaluation")
    a = p.parse_args(argv)

    overrides = {k: v for k, v in dict(pretrained=a.pretrained, image_size=a.image_size, num_layers=a.layers,
                                       train_last_stages=a.train_stages).items() if v is not None}
    if a.init_from:  # the model is the checkpoint's, whatever --flavor says
        meta = Path(a.init_from) / "meta.json"
        if not meta.exists():
            raise SystemExit(f"--init-from {a.init_from}: no meta.json there; name a step_NNNNNN checkpoint directory")
        model = model_config_from_dict(json.loads(meta.read_text())["config"]["model"],
                                       **{"pretrained": None, **overrides})
    else:
        model = model_config(a.flavor, **overrides)
    debug = model.flavor == "debug"
    # The debug defaults are what learns from scratch on 2 CPU cores in minutes (closing note of
    # issue 3): many videos per step, few frames spread over the whole video, light augmentation.
    frames = a.frames or (8 if debug else 80)
    alpha = a.alpha or (50.0 if debug else 1.5)
    light = (a.augment or ("light" if debug else "paper")) == "light"
    spatial = (SpatialConfig.light if light else SpatialConfig)(image_size=model.image_size)
    if a.no_blur:
        spatial.blur_p = 0.0
    data = LoaderConfig(shards=a.shards or "", batch_size=a.batch_size or (16 if debug else 4), num_workers=a.workers,
                        resampled=a.resampled, epoch_samples=a.epoch_samples, seed=a.seed, decoder=a.decoder,
                        temporal=TemporalConfig(num_frames=frames, alpha=alpha, beta=a.beta, sampling=a.sampling),
                        spatial=spatial)
    synthetic = None
    if not a.shards:
        synthetic = SyntheticConfig()
        if a.synthetic_videos:
            synthetic = dataclasses.replace(synthetic, train_videos=a.synthetic_videos,
                                            val_videos=max(synthetic.num_actions, a.synthetic_videos // 3))
    return RunConfig(
        run_dir=a.run_dir, steps=a.steps or (400 if debug else 100_000), seed=a.seed, log_every=a.log_every,
        evaluate=not a.no_eval, model=model, data=data, loss=LossConfig(tau=a.tau, sigma2=a.sigma2),
        optim=OptimConfig(name=a.optimizer, lr=a.lr or (3e-4 if debug else 1e-4), weight_decay=a.weight_decay,
                          warmup_steps=a.warmup_steps, grad_clip=a.grad_clip),
        parallel=ParallelConfig(zero_stage=a.zero_stage, grad_accum=a.grad_accum,
                                global_batch_size=a.global_batch_size, precision=a.precision),
        checkpoint=CheckpointConfig(every_steps=a.checkpoint_every, keep=a.keep, resume=a.resume),
        synthetic=synthetic, synthetic_dir=a.data_dir, init_from=a.init_from)


def main(argv: list[str] | None = None) -> dict:
    from carl_scale.train.trainer import run

    return run(parse(argv))


if __name__ == "__main__":
    main()
