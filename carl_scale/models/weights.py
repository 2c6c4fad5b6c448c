"""Weights and checkpoint files: the one place that reads them, for training (``--resume``,
``--init-from``, ``--pretrained``) and evaluation alike, and never runs what a file holds.

A checkpoint directory (``runs/<name>/checkpoints/step_NNNNNN/``) holds ``meta.json`` (step,
resolved run config, git revision), ``model.pt`` (the frame-level video encoder's state dict in
float32, whatever precision trained it) and the training state (DeepSpeed's files, per-rank
``client_rank{r}.pt``). Every torch file is read by :func:`load_tensors`: ``weights_only=True``,
so a file from someone else may hold tensors and plain data, never code. Checkpoints written
before ``model.pt`` existed are read from DeepSpeed's ``mp_rank_00_model_states.pt``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch

META_FILE = "meta.json"
MODEL_FILE = "model.pt"
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
PREFIX = "model."  # the encoder's keys inside DeepSpeed's module (the objective holds it as .model)
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file and what to do."""


# -- reading torch files -------------------------------------------------------------------------
def _refused_because(exn: Exception) -> str:
    """The line of a load error that says what is wrong (for a refused object: which one)."""
    lines = [ln.strip() for ln in str(exn).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln]
    return (named or lines or [type(exn).__name__])[0][:240]


def load_tensors(path: str | Path, *, allow: list | tuple = (), map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with the classes in ``allow`` (plain records some
    files hold) as the only objects besides tensors and plain data; a damaged file, or one that
    holds anything else, is a :class:`CheckpointError` naming the file and the reason."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exn:
        raise CheckpointError(f"{path} cannot be loaded ({type(exn).__name__}: {_refused_because(exn)}): it is "
                              f"damaged, or holds objects other than weights and training state, which are never "
                              f"run") from None


# -- checkpoint directories ----------------------------------------------------------------------
def latest_name(root: Path) -> str | None:
    """The checkpoint ``root/latest`` names; None without one, or when it names no step (empty
    after a machine crash: callers then take the newest intact checkpoint, as if it were missing)."""
    try:
        name = (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_DIR.match(name) else None


def latest_in(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names (whether or not it is there: a caller's error then
    names it); where it names none the newest intact checkpoint under ``root`` (each one's files
    read to check); None if there is none."""
    name = latest_name(root)
    return root / name if name is not None else intact_before(root, None)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, also when named by its run's ``checkpoints/latest`` pointer file or
    by the run directory itself (:func:`latest_in`)."""
    p = Path(path)
    if p.is_file() and p.name == "latest":
        return latest_in(p.parent) or p.parent / p.read_text().strip()
    if (p / "checkpoints" / "latest").is_file() or checkpoints(p / "checkpoints"):
        return latest_in(p / "checkpoints") or p
    return p


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def checkpoints(root: Path) -> dict[int, Path]:
    """{step: directory} of the complete checkpoints directly under ``root``."""
    out = {}
    for p in root.glob("step_*") if root.is_dir() else []:
        s = step_of(p)
        if s is not None and p.is_dir() and (p / META_FILE).exists():
            out[s] = p
    return out


def is_intact(path: Path) -> bool:
    """meta.json parses, every rank's client file is there, and every torch file's archive checks
    out (a CRC over every member; nothing is unpickled)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        if not isinstance(meta, dict):  # (valid JSON, not ours: a list, a number)
            return False
        world = int(meta.get("world_size", 1))
        if not all((path / f"client_rank{r}.pt").is_file() for r in range(world)):
            return False
        for f in path.glob("*.pt"):
            with zipfile.ZipFile(f) as z:
                if z.testzip() is not None:
                    return False
        return True
    except (OSError, ValueError, TypeError, zipfile.BadZipFile):  # (TypeError: a world_size of null, a list)
        return False


def intact_before(root: Path, step: int | None) -> Path | None:
    """The newest checkpoint under ``root`` before ``step`` (any, if None) whose files are whole."""
    for s, path in sorted(checkpoints(root).items(), reverse=True):
        if (step is None or s < step) and is_intact(path):
            return path
    return None


def intact_hint(checkpoint: Path) -> str:
    """", the newest intact checkpoint before it: ..." for an error about ``checkpoint``."""
    ok = intact_before(checkpoint.parent, step_of(checkpoint))
    return f". The newest intact checkpoint before it: {ok} (--resume {ok})" if ok else ""


def read_meta(checkpoint: str | Path) -> dict:
    """A checkpoint directory's ``meta.json``, or an error that names the file and what to do."""
    checkpoint = resolve_checkpoint(checkpoint)
    path = checkpoint / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory: {path} is missing. Name a "
                                f"runs/<name>/checkpoints/step_NNNNNN directory")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exn:
        raise CheckpointError(f"{path} is damaged (not JSON: {exn}){intact_hint(checkpoint)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or \
            not isinstance(meta["config"].get("model"), dict):
        raise CheckpointError(f"{path} has no config.model: not a carl_scale checkpoint")
    return meta


# -- the encoder's weights -----------------------------------------------------------------------
def save_weights(model: torch.nn.Module, directory: str | Path) -> Path:
    """``model``'s state dict as float32 CPU tensors in ``directory/model.pt`` (written to a
    temporary name first, so the file is whole or absent)."""
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
             for k, v in model.state_dict().items()}
    path = Path(directory) / MODEL_FILE
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read_weights(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the encoder's state dict, its model config dict) of a checkpoint directory."""
    checkpoint = resolve_checkpoint(checkpoint)
    cfg = read_meta(checkpoint)["config"]["model"]
    try:
        if (checkpoint / MODEL_FILE).is_file():
            return _tensors(load_tensors(checkpoint / MODEL_FILE), checkpoint / MODEL_FILE), cfg
        if not (checkpoint / DEEPSPEED_MODEL_FILE).is_file():
            raise CheckpointError(f"{checkpoint} has no weights ({MODEL_FILE}): the checkpoint is incomplete")
        # written before model.pt existed
        held = load_tensors(checkpoint / DEEPSPEED_MODEL_FILE)
        module = _tensors(held.get("module", {}) if isinstance(held, dict) else held, checkpoint / DEEPSPEED_MODEL_FILE)
    except CheckpointError as exn:
        raise CheckpointError(f"{exn}{intact_hint(checkpoint)}") from None
    state = {k[len(PREFIX):]: v for k, v in module.items() if k.startswith(PREFIX)}
    low = sorted({str(v.dtype) for v in state.values() if v.dtype in (torch.bfloat16, torch.float16)})
    if low:  # DeepSpeed kept the module in bf16 then; its fp32 master weights are not in this file
        warnings.warn(f"{checkpoint} was written by an older carl_scale with {'/'.join(low)} weights (no "
                      f"{MODEL_FILE}); it is evaluated at that precision", stacklevel=2)
    return state, cfg


def _tensors(state, path: Path) -> dict[str, torch.Tensor]:
    """``state`` if it is a state dict (names to tensors), else an error naming the file."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} holds {type(state).__name__}, not a state dict of tensors: it is not a "
                              f"carl_scale checkpoint's weights")
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, *,
                 new: tuple[str, ...] = ()) -> None:
    """Put ``state`` into ``model``, or say plainly why it does not fit (nothing is loaded then).
    Parameters whose names start with one of ``new`` may be missing from ``state`` (a part this
    run adds, e.g. the weakly supervised class token); they keep their initial values."""
    from carl_scale.models.transformer import upgrade_legacy_keys

    state = upgrade_legacy_keys(state)  # written with nn.TransformerEncoder (before November 2026)
    ours = model.state_dict()
    missing = sorted(k for k in ours.keys() - state.keys() if not k.startswith(new or ("\0",)))
    unexpected = sorted(state.keys() - ours.keys())
    reshaped = sorted(k for k in ours.keys() & state.keys() if ours[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{source}: the checkpoint's weights do not fit the model its meta.json describes ({len(missing)} "
            f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape; e.g. "
            f"{(missing + unexpected + reshaped)[:3]}). The usual cause: an older carl_scale wrote it with "
            f"another architecture for this flavor (the 'debug' backbone became a narrow ResNet-18 in "
            f"November 2026). Retrain it, or evaluate it with the carl_scale version that wrote it.")
    model.load_state_dict(state, strict=not new)
