"""The registry of named model flavors, :func:`build_model` and :func:`load_model`.

A flavor is a function returning a :class:`~carl_scale.models.config.ModelConfig`; variants
derive from a base with ``dataclasses.replace``. Tests and the CPU demo use ``debug``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable

import torch

from carl_scale.config import from_dict
from carl_scale.models.config import ModelConfig
from carl_scale.models.fve import FrameVideoEncoder
from carl_scale.models.weights import META_FILE, CheckpointError, load_weights, read_weights, resolve_checkpoint


def r50() -> ModelConfig:
    """The paper's FVE: ResNet-50 (conv1..layer3 frozen), 3-layer 256-wide transformer, 128-d."""
    return ModelConfig(flavor="r50", backbone="resnet50", train_last_stages=1, image_size=224, head_width=512,
                       width=256, num_layers=3, num_heads=8, ffn_width=1024, embed_dim=128, proj_dim=128,
                       train_frames=80, backbone_chunk=40)


def r50_pouring() -> ModelConfig:
    """Pouring uses a 2-layer transformer and T = 240."""
    return dataclasses.replace(r50(), flavor="r50_pouring", num_layers=2, train_frames=240)


def debug() -> ModelConfig:
    """A narrow ResNet-18 layout at 64 px that trains on two CPU cores in minutes."""
    return ModelConfig()


FLAVORS: dict[str, Callable[[], ModelConfig]] = {"debug": debug, "r50": r50, "r50_pouring": r50_pouring}


def model_config(flavor: str, **overrides) -> ModelConfig:
    if flavor not in FLAVORS:
        raise KeyError(f"unknown flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
    return dataclasses.replace(FLAVORS[flavor](), **overrides)


def model_config_from_dict(saved: dict, **overrides) -> ModelConfig:
    """The ModelConfig a run saved (config.json / checkpoint meta.json), then ``overrides``. A key
    this version does not know is refused (a ConfigError naming it): building the model without
    that setting would be another architecture than the one that was trained."""
    return from_dict(ModelConfig, {**saved, **overrides}, "model")


def build_model(cfg: ModelConfig, *, weights_follow: bool = False) -> FrameVideoEncoder:
    """The encoder of ``cfg``. ``weights_follow``: every weight is about to be loaded from a
    checkpoint, so the ResNet-50's "starts from random weights" warning would mislead."""
    if not weights_follow:
        return FrameVideoEncoder(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ResNet-50 backbone starts from random weights")
        return FrameVideoEncoder(cfg)


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> FrameVideoEncoder:
    """The evaluation-ready encoder of a checkpoint directory (or of a run directory's, or its
    ``checkpoints/latest``): built from its meta.json's model config, its float32 weights loaded
    (:mod:`carl_scale.models.weights`), in eval mode on ``device``."""
    state, cfg = read_weights(checkpoint)
    try:
        model_cfg = model_config_from_dict(cfg, pretrained=None)  # the checkpoint has every weight
    except ValueError as exn:  # (ConfigError: a key or value this version does not know)
        raise CheckpointError(f"{resolve_checkpoint(checkpoint) / META_FILE}: {exn}. It was written by another "
                              f"carl_scale version: read it with that version") from None
    model = build_model(model_cfg, weights_follow=True)
    load_weights(model, state, checkpoint)
    return model.to(device).eval()
