"""Launched by test_train.py under the real launcher (``deepspeed --num_gpus 2 tests/dist_check.py``):
runs the real pretraining entry point's config and Trainer, records what each rank saw, and
writes per-rank evidence (video ids, a digest of the weights) for the test to compare.

    deepspeed --num_gpus 2 tests/dist_check.py OUT.json -- <pretrain_k400.py flags>
    python tests/dist_check.py OUT.json --nan-at 3 -- <flags>      # a NaN loss at step 3
    deepspeed --num_gpus 2 tests/dist_check.py OUT.json --no-room-rank 1 -- <flags>  # rank 1's disk full
    deepspeed --num_gpus 2 tests/dist_check.py OUT.json --fail-save-rank 1 -- <flags>  # a write in DeepSpeed's save fails
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from carl_scale.train.engine import process_group, rng_scope  # noqa: E402
from carl_scale.train.trainer import Trainer  # noqa: E402
from launch.pretrain_k400 import parse  # noqa: E402


class RecordingTrainer(Trainer):
    nan_at: int | None = None

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.seen: list[str] = []

    def train_step(self, batch):
        self.seen += batch.video_ids
        if self.nan_at is not None and self.step + 1 == self.nan_at:
            batch.views = batch.views * float("nan")
        return super().train_step(batch)


def main() -> None:
    args = sys.argv[1:]
    args = [a for a in args if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    out = args[0]
    sep = args.index("--")
    opts, flags = args[1:sep], args[sep + 1:]
    if "--nan-at" in opts:
        RecordingTrainer.nan_at = int(opts[opts.index("--nan-at") + 1])
    no_room = "--no-room-rank" in opts and int(opts[opts.index("--no-room-rank") + 1])
    fail_save = "--fail-save-rank" in opts and int(opts[opts.index("--fail-save-rank") + 1])
    cfg, _ = parse(flags)
    with process_group() as (rank, world, device), rng_scope(cfg.seed):
        trainer = RecordingTrainer(cfg, rank=rank, world=world, device=device)
        error = None
        if no_room is not False and rank == no_room:  # this rank's file system has no space left
            from carl_scale.train import checkpoint

            checkpoint.free_bytes = lambda path: 0
        if fail_save is not False and rank == fail_save:  # a write inside DeepSpeed's save finds its disk full
            def full(state_dict, path):
                torch.save(state_dict, "/dev/full")  # (torch's own error: a RuntimeError not naming the write)

            trainer.engine.checkpoint_engine.save = full
        try:
            trainer.fit()
        except FloatingPointError as exn:
            error = str(exn)
        except ValueError as exn:  # (CheckpointError, OtherRankFailed)
            if no_room is False and fail_save is False:
                raise
            error = f"{type(exn).__name__}: {exn}"

        def digest(tensors) -> str:
            h = hashlib.sha256()
            for name, t in sorted(tensors):
                h.update(name.encode())
                h.update(t.detach().float().cpu().numpy().tobytes())
            return h.hexdigest()

        module = trainer.engine.module
        mine = {"rank": trainer.rank, "seen": trainer.seen, "params": digest(module.named_parameters()),
                "buffers": digest(module.named_buffers()), "error": error, "step": trainer.step,
                "skipped_summed": trainer.skipped_samples(), "skipped_mine": trainer.loader.skipped}
        gathered = [None] * trainer.world
        dist.all_gather_object(gathered, mine)
        if trainer.rank == 0:
            Path(out).write_text(json.dumps(gathered))
        del trainer


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
