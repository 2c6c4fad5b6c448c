"""Model weights in checkpoint directories: written by training, read by training (``--init-from``)
and by evaluation through this one module, with one safe loader.

A checkpoint directory (``runs/<name>/checkpoints/step_NNNNNN/``) holds ``meta.json`` (step,
resolved run config, git revision) and ``model.pt``: the frame-level video encoder's state dict in
float32 whatever precision trained it, read with ``torch.load(weights_only=True)``: a file from
someone else can hold tensors, never code. Checkpoints written before ``model.pt`` existed are
read from DeepSpeed's ``mp_rank_00_model_states.pt``, with ``weights_only=True`` too.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from carl_scale.models.flavors import build_model, model_config_from_dict
from carl_scale.models.fve import FrameVideoEncoder

META_FILE = "meta.json"
MODEL_FILE = "model.pt"
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
PREFIX = "model."  # the encoder's keys inside DeepSpeed's module (the objective wraps it as .model)


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


def read_meta(checkpoint: str | Path) -> dict:
    """A checkpoint directory's ``meta.json``, or an error that names the file and what to do."""
    path = Path(checkpoint) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory: {path} is missing. Name a "
                                f"runs/<name>/checkpoints/step_NNNNNN directory")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}): the checkpoint is damaged; use an earlier "
                         f"step_NNNNNN beside it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}).get("model"), dict):
        raise ValueError(f"{path} has no config.model: not a carl_scale checkpoint")
    return meta


def _load_tensors(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:  # truncated, not a torch file, or objects that are not plain tensors
        raise ValueError(f"{path} cannot be read as weights ({type(exn).__name__}: {str(exn).splitlines()[0]}). "
                         f"It is damaged, or holds more than tensors (only weights are loaded, never code); "
                         f"use an earlier step_NNNNNN beside it") from None


def read_weights(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the encoder's state dict, its model config dict) of a checkpoint directory."""
    checkpoint = Path(checkpoint)
    cfg = read_meta(checkpoint)["config"]["model"]
    if (checkpoint / MODEL_FILE).is_file():
        return _load_tensors(checkpoint / MODEL_FILE), cfg
    if (checkpoint / DEEPSPEED_MODEL_FILE).is_file():  # written before model.pt existed
        module = _load_tensors(checkpoint / DEEPSPEED_MODEL_FILE).get("module", {})
        state = {k[len(PREFIX):]: v for k, v in module.items() if k.startswith(PREFIX)}
        low = sorted({str(v.dtype) for v in state.values() if v.dtype in (torch.bfloat16, torch.float16)})
        if low:  # DeepSpeed kept the module in bf16 then; its fp32 master weights are not in this file
            warnings.warn(f"{checkpoint} was written by an older carl_scale with {'/'.join(low)} weights (no "
                          f"{MODEL_FILE}); it is evaluated at that precision", stacklevel=2)
        return state, cfg
    raise FileNotFoundError(f"{checkpoint} has no weights ({MODEL_FILE}); the checkpoint is incomplete, use an "
                            f"earlier step_NNNNNN beside it")


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Put ``state`` into ``model``, or say plainly why it does not fit (nothing is loaded then)."""
    ours = model.state_dict()
    missing, unexpected = sorted(ours.keys() - state.keys()), sorted(state.keys() - ours.keys())
    reshaped = sorted(k for k in ours.keys() & state.keys() if ours[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise RuntimeError(
            f"{source}: the checkpoint's weights do not fit the model its meta.json describes ({len(missing)} "
            f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape; e.g. "
            f"{(missing + unexpected + reshaped)[:3]}). The usual cause: an older carl_scale wrote it with "
            f"another architecture for this flavor (the 'debug' backbone became a narrow ResNet-18 in "
            f"November 2026). Retrain it, or evaluate it with the carl_scale version that wrote it.")
    model.load_state_dict(state)


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> FrameVideoEncoder:
    """The evaluation-ready encoder of a checkpoint directory: built from its meta.json's model
    config, its float32 weights loaded, in eval mode on ``device``."""
    state, cfg = read_weights(checkpoint)
    model = build_model(model_config_from_dict(cfg, pretrained=None))  # the checkpoint holds every weight
    load_weights(model, state, checkpoint)
    return model.to(device).eval()
