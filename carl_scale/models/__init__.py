"""The frame-level video encoder (FVE) and its named flavors."""

from carl_scale.models.config import ModelConfig
from carl_scale.models.flavors import FLAVORS, build_model, load_model, model_config
from carl_scale.models.fve import FrameVideoEncoder

__all__ = ["FLAVORS", "ModelConfig", "FrameVideoEncoder", "build_model", "load_model", "model_config"]
