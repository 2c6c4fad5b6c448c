"""Transfer evaluation of a pretrained checkpoint on a dataset's shards (paper §4.2).

    launch/transfer_eval.sh synthetic                       # newest checkpoint of runs/pretrain
    launch/transfer_eval.sh pennaction runs/k400/checkpoints/step_100000
    launch/transfer_eval.sh pouring --shards data/pouring --out runs/transfer
    launch/transfer_eval.sh pennaction runs/k400/checkpoints/step_100000 --finetune-steps 5000   # Table 15
    python launch/transfer_eval.py synthetic --run-dir runs/pretrain --random-baseline --classifier logistic

Writes runs/transfer/<dataset>/results.md and results.json (every metric, per action class where
the protocol has them), the embeddings (.npz) and pictures per model (alignment, retrieval, phase timeline).
A rerun reuses saved embeddings whose fingerprint (weights, shards, view) matches; --recompute forces it.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def finetune(ckpt: Path, shards: str, run_dir: Path, steps: int, extra: list[str]) -> Path:
    """SCL on the target's training shards from ``ckpt``'s weights with the settings it was trained
    with (its meta.json; ``extra`` flags change them), a fresh optimizer and schedule, the
    pretraining entry point in its own process; returns the new checkpoint.
    Rerunning resumes an interrupted fine-tuning instead of starting over."""
    import subprocess

    from carl_scale.eval.transfer import latest_checkpoint
    from carl_scale.models.weights import read_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(ckpt)  # a run directory or checkpoints/latest: the step it names
    # the checkpoint's own recipe (its saved config), on the target's data, from its weights; SCL
    # even after weak supervision (the source's video classes are not the target's)
    weak = read_meta(ckpt)["config"].get("loss", {}).get("name") == "weak"
    cmd = [sys.executable, str(Path(__file__).with_name("pretrain_k400.py")), "--config", str(ckpt / "meta.json"),
           "--shards", shards, "--init-from", str(ckpt), "--steps", str(steps), "--run-dir", str(run_dir),
           "--resume", "latest", "--no-eval", *(["--loss", "scl", "--per-label", "0"] if weak else []), *extra]
    print("fine-tuning:", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:  # it said why, in one line, above
        raise ValueError(f"fine-tuning {ckpt} stopped (its message is above); fix that, then rerun this command: "
                         f"it continues from the last fine-tuning checkpoint in {run_dir}")
    return latest_checkpoint(run_dir)


def main(argv: list[str] | None = None) -> dict:
    from carl_scale.errors import nonempty
    from carl_scale.eval.transfer import PROTOCOLS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("dataset", choices=sorted(PROTOCOLS))
    p.add_argument("checkpoint", nargs="?", help="a step_NNNNNN directory (default: the newest under --run-dir)")
    p.add_argument("--run-dir", default="runs/pretrain", type=nonempty, help="pretraining run whose newest checkpoint is used")
    p.add_argument("--shards", type=nonempty, help="the dataset's shard directory (default: data/<dataset>)")
    p.add_argument("--out", default="runs/transfer", type=nonempty)
    p.add_argument("--random-baseline", action="store_true",
                   help="also evaluate the same flavor at random weights, its trunk too (the end-of-run table's "
                        "random_init keeps the --pretrained trunk the run started from)")
    p.add_argument("--recompute", action="store_true",
                   help="re-embed even when the saved embeddings match the weights and shards")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--subset", choices=["first", "random"], default=None,
                   help="which 10%%/50%% of the training videos the classifiers see: the first ones, as the "
                        "published evaluation (comparable with the paper), or a seeded random draw; default: "
                        "first, random for finegym (the published lists' order there is arbitrary, ours sorted)")
    p.add_argument("--classifier", choices=["svm", "logistic"], default="svm",
                   help="phase classifier: svm (sklearn SVC defaults, as the paper describes) or logistic (the "
                        "published evaluation code's logistic regression)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="first fine-tune the checkpoint with SCL on the dataset's train split for this many steps")
    p.add_argument("--finetune-args", default="", help="more flags for launch/pretrain_k400.py, e.g. '--lr 1e-5'")
    a = p.parse_args(argv)
    if a.finetune_steps < 0:
        p.error(f"--finetune-steps must be >= 0 (0: evaluate the checkpoint as it is), got {a.finetune_steps}")
    if a.finetune_args and not a.finetune_steps:
        p.error("--finetune-args only applies to a fine-tuning: give --finetune-steps N too")
    # what the fine-tuning's own command sets: given again, the later flag would win, and the
    # evaluation read another run than the one it trained
    taken = {"--steps": "--finetune-steps", "--epochs": "--finetune-steps", "--run-dir": "--out",
             "--init-from": "the checkpoint argument", "--config": "the checkpoint argument",
             "--resume": "a rerun (it resumes by itself)", "--shards": "--shards"}
    never = ("--print-config", "--help", "-h")  # (they make the fine-tuning train nothing)
    try:  # (the fine-tuning's parser takes no abbreviations: "--init" is no --init-from behind this check)
        words = shlex.split(a.finetune_args)
    except ValueError as exn:
        p.error(f"--finetune-args {a.finetune_args!r}: {exn}")
    if any(w.split("=")[0] in never for w in words):
        p.error(f"--finetune-args {next(w for w in words if w.split('=')[0] in never)}: not for a fine-tuning run "
                f"(it would train nothing)")
    clash = [w.split("=")[0] for w in words if w.split("=")[0] in taken]
    if clash:
        p.error(f"--finetune-args {clash[0]}: the fine-tuning sets it; use {taken[clash[0]]} instead")

    import torch

    from carl_scale.eval.embed import default_device, trained_view
    from carl_scale.eval.transfer import check_transfer, latest_checkpoint, transfer_eval
    from carl_scale.models import load_model
    from carl_scale.models import build_model
    from carl_scale.models.weights import read_meta, resolve_checkpoint

    device = default_device(a.device)
    # the step directory itself, not a pointer that moves on (checkpoints/latest, a run directory):
    # the fine-tuning run below is keyed by it
    if a.checkpoint == "":
        p.error("the checkpoint argument is empty: give a step_NNNNNN directory or a run directory, or leave it "
                "out for the newest under --run-dir")
    ckpt = resolve_checkpoint(Path(a.checkpoint) if a.checkpoint is not None else latest_checkpoint(a.run_dir))
    read_meta(ckpt)  # a checkpoint that is not there, named first
    _, shards = check_transfer(a.dataset, a.shards, a.subset, a.classifier)  # refused before any fine-tuning
    source = str(ckpt)
    if a.finetune_steps:
        # one fine-tuning run per (source checkpoint, shards, steps, flags): a rerun resumes it,
        # another checkpoint, data or setting never picks it up by mistake
        key = hashlib.sha1(f"{ckpt.resolve()}|{Path(shards).resolve()}|{a.finetune_steps}|{a.finetune_args}"
                           .encode()).hexdigest()[:10]
        ckpt = finetune(ckpt, shards, Path(a.out) / a.dataset / f"finetune_{key}", a.finetune_steps,
                        shlex.split(a.finetune_args))
        source = f"{ckpt}, fine-tuned for {a.finetune_steps} steps from {source}"
    models = {"pretrained": load_model(ckpt, device)}
    if a.random_baseline:
        torch.manual_seed(0)
        models = {"random_init": build_model(models["pretrained"].cfg).to(device).eval(), **models}
    res = transfer_eval(a.dataset, models, shards=shards, out_dir=a.out, device=device, spatial=trained_view(ckpt),
                       reuse_embeddings=not a.recompute, subset=a.subset, classifier=a.classifier,
                       source=f"pretrained = {source}" + (", random_init = the same flavor at random weights"
                                                          if a.random_baseline else ""))
    print(f"checkpoint {ckpt}\n\n{res['table']}\n\nwritten to {res['out_dir']}/")
    return res


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("transfer_eval", main)
