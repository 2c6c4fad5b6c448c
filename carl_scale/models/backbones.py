"""Per-frame 2-D backbones, split into stages so that the lower ones can be frozen.

Frozen stages are really frozen: no gradients, and kept in eval mode (BatchNorm statistics do
not move) whatever mode the model is in. They run under ``no_grad`` in chunks of frames.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from carl_scale.models.weights import CheckpointError, load_tensors


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _BasicBlock(nn.Module):
    """ResNet's two-conv residual block (projection shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.short = nn.Identity() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.body[-1].weight)  # each block starts as the identity: trains faster from scratch
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.short(x))


def debug_cnn_stages(width: int = 32) -> tuple[list[nn.Module], int]:
    """A narrow ResNet-18 layout (stem + 4 stages of 2 basic blocks, widths w..8w) for 64 px frames.

    Measured (supervised frame labels, 200 steps from scratch): it fitted them clearly faster than
    the plain 8-conv stack used before (train accuracy 0.46 vs 0.30) at about twice the step time."""
    w = [width, width, 2 * width, 4 * width, 8 * width]
    stem = nn.Sequential(*_conv_bn(3, w[0], 2), nn.MaxPool2d(3, 2, 1))  # 64 px -> 16 px
    stages = [nn.Sequential(_BasicBlock(w[i], w[i + 1], 1 if i == 0 else 2), _BasicBlock(w[i + 1], w[i + 1], 1))
              for i in range(4)]
    stages[0] = nn.Sequential(stem, *stages[0])
    return stages, w[-1]


def resnet50_stages() -> tuple[list[nn.Module], int]:
    from torchvision.models import resnet50

    r = resnet50(weights=None)  # never downloads; weights come from a local file
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
    return [stem, r.layer1, r.layer2, r.layer3, r.layer4], 2048


_PREFIXES = ("module.", "online_network.encoder.", "online_network.net.", "online_network.", "encoder.",
             "backbone.", "net.")


# A BYOL file of sthalles/PyTorch-BYOL (``online_network_state_dict``) keeps the ResNet as a
# Sequential of its children without the classifier: 0 conv1, 1 bn1, (2 relu, 3 maxpool,) 4-7 layer1-4.
_NUMBERED = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def check_pretrained_file(path: str) -> None:
    """Refuse a --pretrained path that is not a file, naming it and the fix (before a run writes
    anything: the launcher checks it first)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"pretrained weights {path} not found. Pass --pretrained with a local file: a torchvision "
            f"ResNet-50 state dict (torch.save(model.state_dict(), 'r50.pth')) or a BYOL checkpoint; "
            f"or leave it out to start from random weights. Nothing is downloaded.")


def _resnet_state_dict(path: str) -> dict[str, torch.Tensor]:
    check_pretrained_file(path)
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(64)
    if not zipfile.is_zipfile(p) and head[:1] != b"\x80":  # neither torch's zip format nor a pickle
        text = head and all(32 <= c < 127 or c in (9, 10, 13) for c in head)
        raise ValueError(f"--pretrained {path} is {'a text file' if text else 'not a torch file'}, not weights: pass "
                         f"a torch.save'd ResNet-50 state dict or BYOL checkpoint")
    try:
        sd = load_tensors(p)  # weights_only: a download can hold tensors, never code
    except CheckpointError as exn:
        raise ValueError(f"--pretrained: {exn}") from None
    for key in ("state_dict", "model", "online_network_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"--pretrained {path} holds {type(sd).__name__}, not a state dict of tensors "
                         f"(a ResNet-50 state dict or a BYOL checkpoint)")
    out = {}
    for k, v in sd.items():
        if k.startswith(("encoder_k.", "module.encoder_k.")) or "target_network" in k:
            continue  # a momentum encoder's copy (the published code's BYOL file holds encoder_k too)
        stripped = True
        while stripped:  # every wrapper's prefix, however nested (module.encoder.conv1.weight)
            stripped = False
            for pre in _PREFIXES:
                if k.startswith(pre) and not k[len(pre):].startswith(("weight", "bias")):
                    k, stripped = k[len(pre):], True
                    break
        head, _, rest = k.partition(".")
        if head in _NUMBERED and rest:  # (no torchvision key starts with a number)
            k = f"{_NUMBERED[head]}.{rest}"
        if not k.startswith(("fc.", "projection", "projetion", "predictor")):  # (projetion: sic, PyTorch-BYOL's)
            out[k] = v
    return out


class Backbone(nn.Module):
    def __init__(self, kind: str, train_last_stages: int, pretrained: str | None = None):
        super().__init__()
        stages, self.out_channels = resnet50_stages() if kind == "resnet50" else debug_cnn_stages()
        if not 0 <= train_last_stages <= len(stages):
            raise ValueError(f"train_last_stages must be in 0..{len(stages)} for {kind}, got {train_last_stages}")
        if kind == "resnet50":
            self._load(stages, pretrained)
        elif pretrained:
            raise ValueError("pretrained weights are for the resnet50 backbone, not debug_cnn")
        k = len(stages) - train_last_stages
        self.frozen = nn.Sequential(*stages[:k])
        self.trainable = nn.Sequential(*stages[k:])
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.frozen.eval()
        self.channels_last = False  # set by use_channels_last(); inputs then follow the weights
        self.fused = None  # set by use_fused_frozen(): the frozen stages' fused program

    def use_channels_last(self) -> "Backbone":
        """Weights and inputs in channels_last (NHWC) memory format: cuDNN's fast path for bf16
        convolutions. The values, the state dict's keys and shapes are unchanged."""
        # what Module.to(memory_format=...) does to plain tensors (set .data of the 4-D weights),
        # written out so it also works on fake tensors (carl_scale.bench.memory), which it would swap
        for p in self.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def use_fused_frozen(self) -> "Backbone":
        """Run the frozen stages with their BatchNorms folded into the convolutions, and on a GPU
        as cuDNN's fused convolution + bias (+ add) + ReLU calls
        (:mod:`carl_scale.models.fused_trunk`). Weights and state dict are unchanged."""
        from carl_scale.models.fused_trunk import FusedStages

        self.fused = FusedStages(self.frozen) if len(self.frozen) else None
        return self

    @staticmethod
    def _load(stages: list[nn.Module], pretrained: str | None) -> None:
        if pretrained is None:
            warnings.warn("ResNet-50 backbone starts from random weights (no --pretrained file given); the "
                          "paper starts from BYOL/ImageNet weights", stacklevel=3)
            return
        names = ["stem", "layer1", "layer2", "layer3", "layer4"]
        holder = nn.Module()
        for n, s in zip(names, stages):
            holder.add_module(n, s)
        remap = {"conv1.": "stem.0.", "bn1.": "stem.1."}
        sd = {}
        for k, v in _resnet_state_dict(pretrained).items():
            for a, b in remap.items():
                if k.startswith(a):
                    k = b + k[len(a):]
            sd[k] = v
        own = holder.state_dict()
        for k in own:  # files saved without BatchNorm's step counters load as torch's own strict load does
            if k.endswith("num_batches_tracked") and k not in sd:
                sd[k] = own[k]
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        reshaped = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
        if missing or unexpected or reshaped:  # (ResNet-18/34, a wide ResNet or ResNeXt: shapes differ)
            raise ValueError(f"{pretrained} is not a ResNet-50 state dict: {len(missing)} missing keys "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                             f"{len(reshaped)} of another shape (e.g. {reshaped[:3]})")
        holder.load_state_dict(sd)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        self.frozen.eval()  # BatchNorm statistics of frozen stages never move
        return self

    def forward(self, frames: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, h, w). ``chunk`` bounds the frames per forward of the frozen
        stages (and of the trainable ones when no gradient is needed): the N frames go in
        ``ceil(N / chunk)`` calls of equal size (within one frame), so no call is a small remainder."""
        n = frames.shape[0]
        calls = 1 if not chunk else max(1, -(-n // chunk))
        bounds = [n * i // calls for i in range(calls + 1)]
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if not len(self.frozen):
            x = frames.contiguous(memory_format=layout)
        else:
            with torch.no_grad():
                # each call's frames converted on their own (not a copy of the whole input) and each
                # output written into one buffer (not kept for a torch.cat: twice the stages' output)
                x = None
                for a, b in zip(bounds, bounds[1:]):
                    part = frames[a:b].contiguous(memory_format=layout)
                    y = self.fused(part, layout, check=a == 0) if self.fused is not None else self.frozen(part)
                    del part  # (with one call in channels_last: a copy of the whole input)
                    if calls == 1:
                        x = y
                        break
                    if x is None:
                        x = torch.empty((n, *y.shape[1:]), dtype=y.dtype, device=y.device, memory_format=layout)
                    x[a:b] = y
                    del y
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.trainable.parameters()):
            return self.trainable(x)
        if calls == 1 or self.trainable.training:  # (training: its BatchNorms take the whole batch's statistics)
            return self.trainable(x)
        return torch.cat([self.trainable(x[a:b]) for a, b in zip(bounds, bounds[1:])])
