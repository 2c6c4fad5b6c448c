"""Typed configuration of the data side of a run: the views, the loader, and the synthetic set.

Each is a :class:`~carl_scale.config.Config`: validated when built, flags declared on the fields.
A resolved run config is a tree of these, saved as JSON next to every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from carl_scale.config import Config, param, refuse


@dataclass(frozen=True)
class TemporalConfig(Config):
    """Two clips of random length in [T, alpha*T] with >= beta overlap, T frames from each.

    Paper §3.2 and Table 13. ``sampling="random"`` draws T sorted distinct frames from each clip,
    ``"even"`` takes T evenly spaced ones. Videos shorter than T are handled by ``short_video``:
    ``"subsample"`` takes a random subset of about S / r of its frames per view (r uniform in
    [1, alpha], as the published code's time augmentation) and pads with masked (invalid) slots,
    ``"mask"`` keeps every frame once in both views and pads the same way, ``"repeat"`` adds
    T - S random repeats of its frames (sorted), so some frames appear twice and every slot is valid.
    """

    num_frames: int = param(80, flag="--frames", ge=1, help="T, frames per view")
    alpha: float = param(1.5, flag="--alpha", ge=1, help="maximum clip length as a multiple of T")
    beta: float = param(0.2, flag="--beta", ge=0, le=1,
                        help="minimum overlap of the two clips, as a fraction of the shorter one")
    sampling: Literal["random", "even"] = param("random", flag="--sampling", help="frames drawn from each clip")
    short_video: Literal["subsample", "mask", "repeat"] = param(
        "subsample", flag="--short-video",
        help="videos shorter than T: a random subset of their frames per view, or all of them in both views, "
             "padded with masked slots; or all of them plus repeats")


def _check_pair(where: str, pair: tuple[float, float], lo: float, hi: float | None) -> None:
    a, b = pair
    if not (a > lo and a <= b and (hi is None or b <= hi)):
        refuse(where, f"must be two numbers {lo:g} < a <= b{f' <= {hi:g}' if hi is not None else ''}, got {pair}")


@dataclass(frozen=True)
class SpatialConfig(Config):
    """SimCLR-style augmentation drawn once per view: the published code's crop, flip, jitter and
    grayscale values; SimCLR's blur (p 0.5 on its own, one pass), where the published code blurs
    only inside its jitter, four times over (README, Views). ``image_size`` is the model's (set
    from it in a run config)."""

    image_size: int = param(224, ge=16)
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = param(0.5, ge=0, le=1)
    jitter_p: float = param(0.8, ge=0, le=1)
    brightness: float = param(0.8, ge=0)
    contrast: float = param(0.8, ge=0)
    saturation: float = param(0.8, ge=0)
    hue: float = param(0.2, ge=0, le=0.5)
    grayscale_p: float = param(0.2, ge=0, le=1)
    blur_p: float = param(0.5, flag="--blur-p", ge=0, le=1,
                          help="probability of Gaussian blur per view (0 for FineGym, as the published code)")
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def check(self) -> None:
        _check_pair("SpatialConfig.crop_scale", self.crop_scale, 0.0, 1.0)
        _check_pair("SpatialConfig.crop_ratio", self.crop_ratio, 0.0, None)
        _check_pair("SpatialConfig.blur_sigma", self.blur_sigma, 0.0, None)
        if not all(s > 0 for s in self.std):
            refuse("SpatialConfig.std", f"must be > 0 per channel, got {self.std}")

    @classmethod
    def light(cls, **kw) -> "SpatialConfig":
        """Milder colour jitter, no grayscale or blur, for models trained from scratch for minutes
        (measured: under the published strengths the old plain debug CNN did not fit supervised
        frame labels at all in 600 steps; without augmentation it began to within 200)."""
        return cls(**{**dict(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, grayscale_p=0.0, blur_p=0.0),
                      **kw})


# nvJPEG's share for the GPU's hardware JPEG decoder. All of it, by measurement on an H200
# (bench.data, 340 x 256 jpeg frames): 35.0k sampled frames/s and a loader of 41.4 batches/s,
# against 29.2k and 34.3 at DALI's default 0.65 (which decodes the rest's Huffman stage on host threads)
NVJPEG_HW_LOAD = 1.0


@dataclass(frozen=True)
class LoaderConfig(Config):
    """Where the training shards are and how they are streamed. The seed comes from the run
    (:class:`~carl_scale.data.reader.VideoLoader` takes it), the device from where it runs."""

    shards: str | list[str] = param("", flag="--shards", empty=True,  # "": none yet (a run refuses it)
                                    help="shard directory (with shards.json), brace pattern or .txt list")
    batch_size: int = param(4, flag="--batch-size", ge=1, help="videos per rank per micro step")
    num_workers: int = param(2, flag="--workers", ge=0, help="DataLoader worker processes per rank")
    shuffle_buffer: int = param(64, flag="--shuffle-buffer", ge=0, help="samples in the shuffle buffer (0: none)")
    resampled: bool = param(False, flag="--resampled", help="draw shards with replacement (an endless stream)")
    epoch_samples: int | None = param(None, flag="--epoch-samples", ge=1,
                                      help="samples per rank per epoch (needed without shards.json)")
    decoder: Literal["auto", "dali", "pyav"] = param("auto", flag="--decoder", help="video decoder")
    cpu_decode_share: float = param(
        0.0, flag="--cpu-decode-share", ge=0, le=1,
        help="with a GPU decoder: the share of the videos that the workers decode on the CPU (PyAV) while the "
             "GPU decodes the rest, adding the CPU's frames/s to the GPU's (0: the GPU decodes all)")
    nvjpeg_hw_load: float = param(
        NVJPEG_HW_LOAD, flag="--nvjpeg-hw-load", ge=0, le=1,
        help="jpeg payload on a GPU: the share of a batch's frames for the GPU's hardware JPEG decoder (A100, "
             "H100, H200; none elsewhere), the rest for nvJPEG on the CUDA cores (DALI's own default: 0.65)")
    nvjpeg_huffman: Literal["cpu", "gpu"] = param(
        "cpu", flag="--nvjpeg-huffman",
        help="jpeg payload on a GPU: where nvJPEG on the CUDA cores does the Huffman stage of frames under "
             "1 MPixel: cpu (DALI's default: the decoder's host threads) or gpu")
    # None (auto), by measurement on an H200 (bench.data, 340 x 256, T = 80, batch 2): two threads
    # took the jpeg loader from 34.3 to 52.8 batches/s and the VP9 one from 9.9 to 17.6; four
    # gained nothing more (49.5 and 16.0)
    finish_threads: int | None = param(
        None, flag="--finish-threads", ge=1, le=16,
        help="with a GPU decoder: threads that decode and augment batches side by side (batch k in thread k mod N), "
             "each with its own DALI pipelines and CUDA stream: for a decoder bound by each video's latency "
             "(NVDEC) or by host work (nvJPEG's Huffman stage); the decoders' host threads are split between "
             "them, and each thread adds a batch or two in flight on the GPU (default: 2 where a GPU decodes, "
             "else 1)")
    # auto: "process" where a GPU decodes in the training process, by measurement on an H200
    # (bench.e2e, r50, T = 80, batch 2, jpeg shards, compiled step): trained from shards the step
    # ran 57.5 samples/s against 44.8 in threads, and kept 0.96 of its speed with the loader
    # running alongside against 0.77 (carl_scale.data.finish_process says why); with CUDA graphs
    # the two were even (79.9 and 82.4). Elsewhere there is nothing to finish in the training process
    finish_in: Literal["auto", "thread", "process"] = param(
        "auto", flag="--finish-in",
        help="with a GPU decoder: where batches are decoded and augmented, in background threads of the training "
             "process (sharing its interpreter lock with the step) or in a process of its own that hands them "
             "over through CUDA IPC (the same batches either way; auto: process where a GPU decodes)")
    per_label: int = param(0, flag="--per-label", ge=0,
                           help="batches of groups of this many videos of one label (weak supervision; 0: off)")
    temporal: TemporalConfig = param(default_factory=TemporalConfig)
    spatial: SpatialConfig = param(default_factory=SpatialConfig)

    def check(self) -> None:
        if self.per_label == 1 or (self.per_label and self.batch_size % self.per_label):
            refuse("--per-label", f"must be 0 (off) or >= 2 and divide --batch-size ({self.batch_size}), "
                                  f"got {self.per_label}")


# The synthetic set's actions and their phases, in label order (the renderer draws them).
SYNTHETIC_ACTIONS: dict[str, tuple[str, ...]] = {
    "arm_raise": ("raise", "hold_up", "lower"),
    "squat": ("go_down", "hold_low", "stand_up"),
    "side_bend": ("lean_left", "swing_right", "return"),
    "kick": ("chamber", "extend", "retract", "put_down"),
    "wave": ("raise_arm", "wave", "lower_arm"),
    "toe_touch": ("arms_up", "bend_down", "rise", "arms_down"),
}


@dataclass(frozen=True)
class SyntheticConfig(Config):
    """What the synthetic phase-video set looks like (:mod:`carl_scale.datasets.synthetic` renders
    it). Defaults: 5 actions, 3-4 phases, 60-400 frames."""

    num_actions: int = param(5, ge=1, le=len(SYNTHETIC_ACTIONS))
    train_videos: int = param(120, ge=1)
    val_videos: int = param(40, ge=0)
    min_frames: int = param(60, ge=8)
    max_frames: int = param(400, ge=8, le=20_000)  # (11 min at 30 fps: a synthetic video needs no more)
    height: int = param(128, ge=32)
    width: int = param(128, ge=32)
    fps: float = param(30.0, gt=0)
    max_idle: float = param(0.25, ge=0, lt=0.5)  # idle (unlabelled) lead-in and tail, each up to this fraction
    # "low": one grey figure on a dark flat background, fixed size and place (what the debug model
    # learns from scratch in minutes on a CPU); "high": every video draws its own background,
    # colours, size, position, mirroring, shake and noise (a harder set for bigger models).
    nuisance: Literal["low", "high"] = "low"
    # "none": the backgrounds above (a few KiB a JPEG frame at 340x256); "natural": a textured
    # background with a natural image's spectrum and a slow camera pan, so that frames cost what
    # camera footage costs to store and decode as JPEG frames (22-25 KiB at 340x256, quality 90).
    # The video payload's pan, whole pixels under 1 px a frame, is still far less motion than real
    # footage's (0.8-1.0 KiB a VP9 frame): its rows stay optimistic. For measuring data paths, not
    # for learning: the pan tells the time within a video.
    texture: Literal["none", "natural"] = "none"
    seed: int = param(0, ge=0, le=2**32 - 1)  # (NumPy's generators take no negative seed)

    def check(self) -> None:
        if self.min_frames > self.max_frames:
            refuse("SyntheticConfig.min_frames", f"({self.min_frames}) must be <= max_frames ({self.max_frames})")
        # the shortest action left between the idle lead-in and tail, at any length the set draws,
        # holds 2 frames of each of its phases
        action = min(n - 2 * max(0, math.ceil(n * self.max_idle) - 1) for n in range(self.min_frames, self.max_frames + 1))
        phases = max(len(SYNTHETIC_ACTIONS[a]) for a in self.action_names)
        if action < 2 * phases:
            refuse("SyntheticConfig.min_frames", f"({self.min_frames}) leaves as few as {action} frames between idle spans of "
                   f"up to max_idle {self.max_idle}: at least {2 * phases} are needed (2 per phase); raise it")

    @property
    def action_names(self) -> tuple[str, ...]:
        return tuple(SYNTHETIC_ACTIONS)[: self.num_actions]

    def phase_names(self) -> dict[str, list[str]]:
        return {a: list(SYNTHETIC_ACTIONS[a]) for a in self.action_names}
