"""Checkpoints: ``<run>/checkpoints/step_000500/`` with DeepSpeed's model/optimizer/scheduler
state, a per-rank ``client_rank{r}.pt`` (RNG and data-pipeline state) and ``meta.json`` (step,
resolved config, git revision). Written under ``step_000500.partial`` and renamed when every
rank is done, then ``latest`` is replaced atomically: a crash mid-save leaves the previous
checkpoint as the newest complete one."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag(step: int) -> str:
    return f"step_{step:06d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, root: Path, step: int, client: dict, meta: dict, keep: int) -> Path:
    """Save on every rank (DeepSpeed shards optimizer state under ZeRO)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    partial = tag(step) + ".partial"
    if rank == 0 and (root / partial).exists():
        shutil.rmtree(root / partial)
    _barrier()
    engine.save_checkpoint(str(root), tag=partial, save_latest=False)
    torch.save(client, root / partial / f"client_rank{rank}.pt")
    _barrier()
    final = root / tag(step)
    if rank == 0:
        (root / partial / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / partial, final)
        tmp = root / "latest.partial"
        tmp.write_text(tag(step) + "\n")
        os.replace(tmp, root / "latest")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def find(root: Path, resume: str) -> Path | None:
    """The checkpoint directory ``resume`` names: "latest" (None if there is none yet) or a path."""
    if resume == "latest":
        latest = root / "latest"
        if not latest.exists():
            return None
        path = root / latest.read_text().strip()
    else:
        path = Path(resume)
        if not path.is_absolute() and not path.exists():
            path = root / resume
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"no complete checkpoint at {path} (expected {path / 'meta.json'}); "
                                f"use --resume latest or a step_NNNNNN directory under {root}")
    return path


def load(engine, path: Path) -> tuple[dict, dict]:
    """Restore model, optimizer and scheduler into ``engine``; returns (client state, meta)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    client_file = path / f"client_rank{rank}.pt"
    if not client_file.exists():
        raise FileNotFoundError(f"{client_file} is missing: was the checkpoint written with another world size?")
    client = torch.load(client_file, map_location="cpu", weights_only=False)
    meta = json.loads((path / "meta.json").read_text())
    return client, meta


def model_state(path: str | Path) -> tuple[dict, dict]:
    """(FVE state dict, model config dict) of a checkpoint directory, for evaluation or for
    starting another run from its weights (``--init-from``): no optimizer, step or data state."""
    path = Path(path)
    weights = path / "mp_rank_00_model_states.pt"
    if not (path / "meta.json").exists() or not weights.exists():
        raise FileNotFoundError(f"{path} is not a complete pretraining checkpoint (needs meta.json and "
                                f"mp_rank_00_model_states.pt); see runs/<name>/checkpoints/")
    cfg = json.loads((path / "meta.json").read_text())["config"]["model"]
    state = torch.load(weights, map_location="cpu", weights_only=False)["module"]
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, cfg


def load_model_weights(model: torch.nn.Module, path: str | Path, state: dict | None = None) -> None:
    """Put a checkpoint's FVE weights (``state``, or read from ``path``) into ``model``, or say
    plainly why they do not fit."""
    state = model_state(path)[0] if state is None else state
    ours = model.state_dict()
    missing, unexpected = sorted(ours.keys() - state.keys()), sorted(state.keys() - ours.keys())
    reshaped = sorted(k for k in ours.keys() & state.keys() if ours[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise RuntimeError(
            f"{path}: the checkpoint's weights do not fit the model its meta.json describes ({len(missing)} "
            f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape; e.g. "
            f"{(missing + unexpected + reshaped)[:3]}). The usual cause: an older carl_scale wrote it with "
            f"another architecture for this flavor (the 'debug' backbone became a narrow ResNet-18 in "
            f"November 2026). Retrain it, or evaluate it with the carl_scale version that wrote it.")
    model.load_state_dict(state)
