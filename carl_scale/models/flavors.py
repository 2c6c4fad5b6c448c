"""Model configuration and the registry of named flavors.

A flavor is a function returning a :class:`ModelConfig`; variants derive from a base with
``dataclasses.replace``. Tests and the CPU demo use ``debug``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal


@dataclass
class ModelConfig:
    flavor: str = "debug"
    backbone: Literal["resnet50", "debug_cnn"] = "debug_cnn"
    pretrained: str | None = None  # local file: torchvision ResNet-50 state dict or BYOL checkpoint
    train_last_stages: int = 4  # backbone stages trained, counted from the top (r50: 1 = layer4)
    image_size: int = 64
    head_width: int = 128  # per-frame head: 2 x [Dropout, Linear, BN, ReLU]
    width: int = 64  # transformer width (the paper's 256)
    num_layers: int = 2
    num_heads: int = 4
    ffn_width: int = 128
    dropout: float = 0.1
    embed_dim: int = 64  # frame embedding used by evaluation (the paper's 128)
    proj_dim: int = 64  # projection head output, used by the loss only
    train_frames: int = 32  # T: evaluation stretches positions of longer videos onto [0, T)
    backbone_chunk: int = 64  # frames per chunk through the backbone at evaluation
    class_token: bool = False  # weak supervision: a class token and a video-level classifier
    num_classes: int = 0


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
    """The ModelConfig a run saved (config.json / checkpoint meta.json), keys it does not know
    ignored, then ``overrides``."""
    known = {f.name: saved[f.name] for f in dataclasses.fields(ModelConfig) if f.name in saved}
    return dataclasses.replace(ModelConfig(**known), **overrides)


def build_model(cfg: ModelConfig):
    from carl_scale.models.fve import FrameVideoEncoder

    return FrameVideoEncoder(cfg)
