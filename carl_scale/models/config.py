"""The model's config: what a checkpoint's ``meta.json`` stores under ``config.model``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carl_scale.config import Config, param, refuse


@dataclass(frozen=True)
class ModelConfig(Config):
    flavor: str = "debug"  # the named flavor it started from (carl_scale.models.flavors)
    backbone: Literal["resnet50", "debug_cnn"] = "debug_cnn"
    pretrained: str | None = param(None, flag="--pretrained",
                                   help="local ResNet-50 weights (torchvision state dict or BYOL checkpoint)")
    train_last_stages: int = param(4, flag="--train-stages", ge=0, le=5,
                                   help="backbone stages trained, counted from the top (r50: 1 = layer4)")
    image_size: int = param(64, flag="--image-size", ge=16, help="frame size the model sees (pixels, square)")
    head_width: int = param(128, ge=1)  # per-frame head: 2 x [Dropout, Linear, BN, ReLU]
    width: int = param(64, ge=2)  # transformer width (the paper's 256)
    num_layers: int = param(2, flag="--layers", ge=1, help="transformer layers")
    num_heads: int = param(4, ge=1)
    ffn_width: int = param(128, ge=1)
    dropout: float = param(0.1, ge=0, lt=1)
    embed_dim: int = param(64, ge=1)  # frame embedding used by evaluation (the paper's 128)
    proj_dim: int = param(64, ge=1)  # projection head output, used by the loss only
    # T of training: evaluation stretches the positions of longer videos onto [0, T). Set from
    # the run's --frames (a run config derives it), so it is always the T the model trained with.
    train_frames: int = param(32, ge=1)
    backbone_chunk: int = param(64, ge=1)  # frames per chunk through the backbone at evaluation
    # the published architecture (off: what carl_scale checkpoints written before November 2026
    # hold, see carl_scale/models/transformer.py; a saved config without these keys is one of those)
    pos_encoding: Literal["interleaved", "halves"] = "interleaved"
    final_norm: bool = False  # a LayerNorm after the last transformer block (the published model has none)
    class_token: bool = False  # weak supervision: a class token and a video-level classifier
    # "both": ordinary self-attention among all tokens; "readout": the class token attends to the
    # frames and no frame attends to it, so the frame embeddings stay the function of the frames
    # that self-supervised training learnt (a warm start is exactly preserved at step 0). Measured
    # on the synthetic set: no better (README, weak supervision), so not the default
    class_token_attention: Literal["both", "readout"] = param(
        "both", flag="--class-token-attention",
        help="both: full self-attention; readout: frames never attend to the class token (it only reads them)")
    num_classes: int = param(0, flag="--num-classes", ge=0, help="video classes of the class token's classifier")

    @staticmethod
    def upgrade_saved(saved: dict) -> dict:
        """A model config that carl_scale saved (every field written, ``flavor`` and
        ``train_frames`` among them) before ``pos_encoding``/``final_norm`` existed describes the
        architecture carl_scale had then: sines and cosines in halves and a final LayerNorm. A
        config written by hand with a few fields is not one of those and takes today's defaults. A
        saved class token without ``class_token_attention`` attended both ways ("both")."""
        if not {"flavor", "train_frames", "dropout"} <= saved.keys():
            return saved
        out = dict(saved)
        if "pos_encoding" not in saved and "final_norm" not in saved:
            out.update(pos_encoding="halves", final_norm=True)
        if saved.get("class_token") and "class_token_attention" not in saved:
            out["class_token_attention"] = "both"  # written out, so that resuming it as "readout" is refused
        return out

    def check(self) -> None:
        if self.width % 2 or self.width % self.num_heads:
            refuse("ModelConfig.width", f"({self.width}) must be even and divisible by num_heads ({self.num_heads})")
        if self.class_token and self.num_classes < 1:
            refuse("--num-classes", "must be >= 1 for the class token's video classifier")
        if self.pretrained is not None and self.backbone != "resnet50":
            refuse("--pretrained", f"loads ResNet-50 weights; the {self.flavor!r} flavor has a {self.backbone} backbone")
