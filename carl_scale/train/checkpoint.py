"""Training checkpoints: ``<run>/checkpoints/step_000500/`` with DeepSpeed's model/optimizer/scheduler
state, the encoder's float32 weights (``model.pt``, :mod:`carl_scale.models.weights`, what
evaluation and ``--init-from`` read), a per-rank ``client_rank{r}.pt`` (RNG and data-pipeline
state) and ``meta.json`` (step, resolved config, git revision).

Written under ``step_000500.partial`` and renamed when every rank is done, then ``latest`` is
replaced atomically: a crash mid-save leaves the previous checkpoint as the newest complete one.
Nothing a user may need is deleted: pruning removes only older checkpoints of the run's own past
(never the one ``latest`` names), and resuming from an older step moves the newer checkpoints
aside into ``abandoned_after_step_NNNNNN/`` instead of overwriting them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from carl_scale.models.weights import META_FILE, save_weights

_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def checkpoints(root: Path) -> dict[int, Path]:
    """{step: directory} of the complete checkpoints directly under ``root``."""
    out = {}
    for p in root.glob("step_*") if root.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / META_FILE).exists():
            out[int(m.group(1))] = p
    return out


def latest_name(root: Path) -> str | None:
    latest = root / "latest"
    return latest.read_text().strip() if latest.exists() else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest checkpoints (by step; 0 keeps all), never the one
    ``latest`` names. Returns what was removed."""
    if keep <= 0:
        return []
    protected = latest_name(root)
    found = checkpoints(root)
    gone = [found[s] for s in sorted(found)[:-keep] if found[s].name != protected]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def set_aside_newer(root: Path, step: int) -> Path | None:
    """Resuming at ``step`` abandons the checkpoints after it (they belong to a future this run
    will rewrite): move them into ``abandoned_after_step_NNNNNN/`` (never deleted, never pruned,
    never overwritten by the new ones). Returns that folder, or None if nothing was newer."""
    newer = [p for s, p in sorted(checkpoints(root).items()) if s > step]
    if not newer:
        return None
    dest = root / f"abandoned_after_{tag(step)}"
    n = 1
    while dest.exists():
        n += 1
        dest = root / f"abandoned_after_{tag(step)}_{n}"
    dest.mkdir()
    for p in newer:
        os.replace(p, dest / p.name)
    return dest


def save(engine, model: torch.nn.Module, root: Path, step: int, client: dict, meta: dict, keep: int) -> Path:
    """Save on every rank (DeepSpeed shards optimizer state under ZeRO); rank 0 adds the float32
    weights and meta.json, publishes the directory, points ``latest`` at it and prunes."""
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
        save_weights(model, root / partial)
        (root / partial / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if final.exists():  # the same step again (a rerun of the last step): the new one replaces it
            shutil.rmtree(final)
        os.replace(root / partial, final)
        tmp = root / "latest.partial"
        tmp.write_text(tag(step) + "\n")
        os.replace(tmp, root / "latest")
        prune(root, keep)
    _barrier()
    return final


def find(root: Path, resume: str) -> Path | None:
    """The checkpoint directory ``resume`` names: "latest" (None if there is none yet) or a path."""
    if resume == "latest":
        name = latest_name(root)
        if name is None:
            return None
        path = root / name
    else:
        path = Path(resume)
        if not path.is_absolute() and not path.exists():
            path = root / resume
    if not (path / META_FILE).exists():
        raise FileNotFoundError(f"no complete checkpoint at {path} (expected {path / META_FILE}); "
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
    meta = json.loads((path / META_FILE).read_text())
    return client, meta
