"""A procedurally rendered phase-video dataset shaped like PennAction and Pouring.

Each action class is an ordered sequence of K key poses of a stick figure; phase k is the motion
from key pose k to key pose k+1 (a "hold" phase keeps moving a little so that it is never a frozen
image); a random idle lead-in and tail (labelled -1) surround the action. Every video draws its own speed (random
phase durations, 60-400 frames in all), so a good frame representation has to encode *where in the
action* a frame is — the property CARL's evaluations measure. ``nuisance="high"`` also gives every
video its own background colour and gradient, figure colour, size and position, mirroring, camera
shake and pixel noise; ``"low"`` (the default, what the CPU demo learns from) keeps one style.
``texture="natural"`` puts the figure in front of a textured scene the camera slowly pans over, so
that the frames cost what camera footage costs to store and decode (for the data benchmarks).

Everything is a pure function of ``(seed, split, index)``: the same config renders the same
pixels on every machine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from carl_scale.data.config import SYNTHETIC_ACTIONS, SyntheticConfig
from carl_scale.data.manifest import read_manifest
from carl_scale.datasets.encode import check_frame_size
from carl_scale.datasets.parallel import PROGRESS_DIR, write_options, write_split
from carl_scale.datasets.writer import VideoRecord

# Joint angles, radians. Shoulders/hips: 0 = limb straight down, pi = straight up, measured
# outwards from the body. Elbows/knees: bend relative to the parent limb. ``lean``: torso
# rotation (positive leans to the figure's left). ``drop``: hips lowered, in leg lengths.
_JOINTS = ("lean", "drop", "l_sh", "r_sh", "l_el", "r_el", "l_hip", "r_hip", "l_kn", "r_kn")
_NEUTRAL = dict(lean=0.0, drop=0.0, l_sh=0.25, r_sh=0.25, l_el=0.0, r_el=0.0,
                l_hip=0.08, r_hip=0.08, l_kn=0.0, r_kn=0.0)


def _pose(**kw: float) -> np.ndarray:
    p = dict(_NEUTRAL)
    p.update(kw)
    return np.array([p[j] for j in _JOINTS], dtype=np.float64)


N = _pose()
_NEUTRAL_POSE = N
_SWAY = _pose(lean=1.0, drop=0.0, l_sh=1.0, r_sh=1.0, l_hip=0.0, r_hip=0.0) - _pose(lean=0.0, drop=0.0, l_sh=0.0,
                                                                                     r_sh=0.0, l_hip=0.0, r_hip=0.0)


def _bump(**kw: float) -> np.ndarray:
    return np.array([kw.get(j, 0.0) for j in _JOINTS], dtype=np.float64)


_UP = _pose(l_sh=3.0, r_sh=3.0)
_LOW = _pose(drop=0.45, l_hip=0.9, r_hip=0.9, l_kn=-1.6, r_kn=-1.6, l_sh=1.5, r_sh=1.5)
_KICK = dict(r_hip=1.4, r_kn=-2.2, l_sh=0.9, r_sh=0.9)
_BEND = _pose(drop=0.25, l_sh=0.2, r_sh=0.2, l_hip=0.3, r_hip=0.3, l_kn=-0.6, r_kn=-0.6)
# name -> (key poses (K+1), index of a phase that "holds" with a wiggle or -1,
#          {phase: joint-angle bump added along the phase, peaking mid-way}); the phase names
# are the config's (SYNTHETIC_ACTIONS), K of them per action.
# The bumps make a phase's path differ from the reverse of another's (raising straight-armed,
# lowering with bent elbows), so that, as in real actions, most phases are told apart by pose
# and not only by when they happen.
ACTIONS: dict[str, tuple[tuple[np.ndarray, ...], int, dict[int, np.ndarray]]] = {
    "arm_raise": ((N, _UP, _UP, N), 1, {2: _bump(l_el=1.8, r_el=1.8)}),
    "squat": ((N, _LOW, _LOW, N), 1, {2: _bump(l_sh=1.4, r_sh=1.4)}),
    "side_bend": ((N, _pose(lean=0.5, l_sh=0.6, r_sh=2.6), _pose(lean=-0.5, l_sh=2.6, r_sh=0.6), N), -1,
                  {0: _bump(l_el=1.2, r_el=1.2), 2: _bump(l_kn=-0.7, r_kn=-0.7, drop=0.15)}),
    "kick": ((N, _pose(**_KICK), _pose(**{**_KICK, "r_hip": 1.5, "r_kn": 0.0}), _pose(**_KICK), N), -1,
             {2: _bump(l_sh=1.2, r_sh=1.2), 3: _bump(l_el=1.5, r_el=1.5)}),
    "wave": ((N, _pose(r_sh=2.4, r_el=1.0), _pose(r_sh=2.4, r_el=1.0), N), 1,
             {2: _bump(l_sh=1.2, l_el=1.0)}),
    "toe_touch": ((N, _UP, _BEND, _UP, N), -1,
                  {2: _bump(l_kn=-0.8, r_kn=-0.8, drop=0.2), 3: _bump(l_el=1.6, r_el=1.6)}),
}


@dataclass
class SyntheticVideo:
    video_id: str
    frames: np.ndarray  # (S, H, W, 3) uint8
    action_label: int
    phase_labels: np.ndarray  # (S,) int
    fps: float


_SPLITS = {"train": 0, "val": 1}


def num_videos(cfg: SyntheticConfig, split: str) -> int:
    return {"train": cfg.train_videos, "val": cfg.val_videos}[split]


def iter_videos(cfg: SyntheticConfig, split: str) -> Iterator[SyntheticVideo]:
    for i in range(num_videos(cfg, split)):
        yield render_video(cfg, split, i)


def _phase_durations(rng: np.random.Generator, total: int, k: int) -> np.ndarray:
    """Random, uneven phase lengths summing to ``total``, each at least 2 frames."""
    w = rng.uniform(0.25, 1.75, size=k)
    d = np.maximum(2, np.floor(w / w.sum() * total)).astype(int)
    d[np.argmax(d)] += total - d.sum()
    if d.min() < 2:  # a short action (the minimum lifted too many phases): 2 each, the rest by weight
        d = 2 + np.floor(w / w.sum() * (total - 2 * k)).astype(int)
        d[np.argmax(d)] += total - d.sum()
    return d


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3 - 2 * t)


def _pose_track(rng: np.random.Generator, action: str, durations: np.ndarray) -> np.ndarray:
    """(S, n_joints) joint angles over time, with per-video speed profile inside each phase."""
    keys, hold, bumps = ACTIONS[action]
    out = []
    for k, d in enumerate(durations):
        t = (np.arange(d) + 0.5) / d
        # A random monotone warp so that speed also varies within a phase.
        gamma = rng.uniform(0.7, 1.4)
        s = _smoothstep(t**gamma)[:, None]
        seg = keys[k][None] * (1 - s) + keys[k + 1][None] * s
        if k in bumps:
            seg = seg + np.sin(math.pi * s) * bumps[k][None]
        if k == hold:  # keep a hold phase alive: a small oscillation of the relevant limbs
            cycles = rng.uniform(1.5, 3.0)
            wig = 0.35 * np.sin(2 * math.pi * cycles * t)
            j = _JOINTS.index("r_el") if action == "wave" else _JOINTS.index("l_el")
            seg[:, j] += wig
            if action != "wave":
                seg[:, _JOINTS.index("r_el")] -= wig
        out.append(seg)
    return np.concatenate(out, axis=0)


def _skeleton(p: np.ndarray) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Forward kinematics in figure units (height ~1, y up, hip centre at origin)."""
    lean, drop, l_sh, r_sh, l_el, r_el, l_hip, r_hip, l_kn, r_kn = p
    thigh, shin, torso, upper, fore = 0.24, 0.24, 0.36, 0.17, 0.16
    hip = np.array([0.0, -drop * (thigh + shin)])
    up = np.array([-math.sin(lean), math.cos(lean)])
    neck = hip + torso * up
    head = neck + 0.11 * up
    segs = [(hip, neck)]

    def limb(root, base_dir, ang, bend, side, l1, l2):
        # side=-1 for the figure's left (drawn on the image left before mirroring)
        a = base_dir + side * ang
        mid = root + l1 * np.array([math.sin(a), -math.cos(a)])
        b = a + side * bend
        end = mid + l2 * np.array([math.sin(b), -math.cos(b)])
        return [(root, mid), (mid, end)]

    shoulder = neck - 0.02 * up
    segs += limb(shoulder, -lean, l_sh, l_el, -1, upper, fore)
    segs += limb(shoulder, -lean, r_sh, r_el, +1, upper, fore)
    segs += limb(hip, 0.0, l_hip, l_kn, -1, thigh, shin)
    segs += limb(hip, 0.0, r_hip, r_kn, +1, thigh, shin)
    return segs, head


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A random colour with low-frequency structure (flat, gradient, blobs, soft wide stripes).

    No fine, high-contrast texture: a small CNN trained from scratch for a few minutes cannot
    learn to ignore checkerboard edges that look just like limbs (measured: it learned nothing),
    and real videos put the actor in front of a scene, not inside a pattern of the same contrast."""
    c1 = rng.uniform(0, 255, 3)
    c2 = np.clip(c1 + rng.uniform(-45, 45, 3), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # flat
        m = np.zeros((h, w), np.float32)
    elif kind == 1:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * math.pi)
        m = (xx * math.cos(a) + yy * math.sin(a)) / max(h, w)
        m = (m - m.min()) / max(1e-6, float(m.max() - m.min()))
    elif kind == 2:  # wide, soft stripes
        a, period = rng.uniform(0, math.pi), rng.uniform(0.5, 1.0) * max(h, w)
        m = 0.5 + 0.5 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period)
    else:  # smooth blobs
        m = np.zeros((h, w), np.float32)
        for _ in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.15, 0.3) * max(h, w)
            m += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        m = np.clip(m, 0, 1)
    bg = c1[None, None] * (1 - m[..., None]) + c2[None, None] * m[..., None]
    return bg.astype(np.uint8), (c1 + c2) / 2


# The natural texture's spectrum: amplitude ~ 1/f^1.3 (photos measured here: about 1/f^1.2-1.5
# below a quarter of the sampling rate), rolled off above like a camera lens, at a contrast that
# makes 340x256 frames 22-25 KiB as JPEG at quality 90, where photos resized to that size take 19-43
# KiB (scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg: 30, 19, 22).
_TEXTURE_SLOPE, _TEXTURE_ROLLOFF, _TEXTURE_CONTRAST = 1.3, 0.3, 36.0


def _natural_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) zero-mean float32 texture with a natural image's falloff of detail with scale,
    mostly in brightness (colours vary less than light in real scenes)."""
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])  # cycles per pixel
    amplitude = np.maximum(f, 1.0 / max(h, w)) ** -_TEXTURE_SLOPE * np.exp(-((f / _TEXTURE_ROLLOFF) ** 2))
    amplitude[0, 0] = 0.0
    noise = rng.normal(size=(3, 2) + f.shape)
    planes = np.fft.irfft2((noise[:, 0] + 1j * noise[:, 1]) * amplitude, s=(h, w))  # (3, h, w)
    texture = 0.8 * planes[:1] + 0.45 * planes  # a shared brightness plane and a little per colour
    texture = np.moveaxis(texture, 0, -1)
    return (texture * (_TEXTURE_CONTRAST / max(1e-9, float(texture.std())))).astype(np.float32)


def _camera_pan(rng: np.random.Generator, total: int, margin: int) -> np.ndarray:
    """(total, 2) smooth (y, x) offsets within +-margin: a slow sweep of the view over the scene."""
    t = np.arange(total)[:, None]
    period = rng.uniform(1.0, 3.0, size=2) * max(total, 2)
    return margin * np.sin(2 * math.pi * t / period + rng.uniform(0, 2 * math.pi, size=2))


_LUMA = np.array([0.299, 0.587, 0.114])


def _figure_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> tuple[int, int, int]:
    # Far enough from the background in colour *and* in brightness, so that the figure stays
    # visible after the grayscale and colour-jitter augmentations.
    for _ in range(100):
        c = rng.uniform(0, 255, 3)
        if np.abs(c - bg_mean).sum() > 180 and abs(float((c - bg_mean) @ _LUMA)) > 70:
            break
    else:
        c = np.full(3, 0.0 if float(bg_mean @ _LUMA) > 127 else 255.0)
    return tuple(int(v) for v in c)


def _video_rng(cfg: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    """The generator every draw of video ``index`` of ``split`` comes from."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return np.random.default_rng([cfg.seed, _SPLITS[split], index])


def _poses_and_phases(cfg: SyntheticConfig, rng: np.random.Generator, action: str) -> tuple[np.ndarray, np.ndarray]:
    """A video's joint angles (S, n_joints) and phase labels (S,); the first draws from ``rng``."""
    phase_names = SYNTHETIC_ACTIONS[action]
    total = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    # Idle standing before and after the action (unlabelled, -1), so that a frame's position in
    # the video says little about its phase: only the pose does.
    lead, trail = (int(x) for x in np.floor(total * rng.uniform(0.0, cfg.max_idle, size=2)))
    durations = _phase_durations(rng, total - lead - trail, len(phase_names))
    poses = _pose_track(rng, action, durations)
    sway = 0.05 * np.sin(np.linspace(0, rng.uniform(2, 6), lead + trail))[:, None]
    idle = np.tile(_NEUTRAL_POSE, (lead + trail, 1)) + sway * _SWAY
    poses = np.concatenate([idle[:lead], poses, idle[lead:]], axis=0)
    phase_labels = np.concatenate([np.full(lead, -1), np.repeat(np.arange(len(phase_names)), durations),
                                   np.full(trail, -1)])
    return poses, phase_labels


def true_poses(cfg: SyntheticConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """What video ``index`` of ``split`` shows, without rendering it: its joint angles (S, n_joints),
    phase labels (S,) and action label: the ground truth a frame representation can at best recover."""
    rng = _video_rng(cfg, split, index)
    action_label = index % cfg.num_actions
    return (*_poses_and_phases(cfg, rng, cfg.action_names[action_label]), action_label)


def render_video(cfg: SyntheticConfig, split: str, index: int) -> SyntheticVideo:
    """Render video ``index`` of ``split``; a pure function of the config, split and index."""
    rng = _video_rng(cfg, split, index)
    h, w = cfg.height, cfg.width
    action_label = index % cfg.num_actions
    poses, phase_labels = _poses_and_phases(cfg, rng, cfg.action_names[action_label])
    total = len(poses)

    margin = max(4, h // 16)
    bg, bg_mean = _background(rng, h + 2 * margin, w + 2 * margin)
    colour = _figure_colour(rng, bg_mean)
    scale = rng.uniform(0.45, 0.7) * h  # pixels per figure unit
    cx = rng.uniform(0.38, 0.62) * w + margin
    cy = rng.uniform(0.5, 0.62) * h + margin
    mirror = rng.random() < 0.5
    thickness = max(2, int(round(scale * rng.uniform(0.07, 0.1))))
    noise_sigma = rng.uniform(0.0, 8.0)
    # Camera jitter: independent small shakes of the crop window. Not a slow drift: a drifting
    # textured background would tell the time within a video, a shortcut SCL happily learns
    # instead of the pose (measured: it made trained embeddings worse than random ones).
    amp = rng.uniform(0, min(margin, max(1, h // 48)))
    jitter = np.clip(rng.normal(0, amp, size=(total, 2)), -margin, margin).round().astype(int)
    if cfg.nuisance == "low":
        # Measured (300 SCL steps, debug flavor): on "high" a from-scratch CNN learns no pose at
        # all from 120 videos (frame-feature probe at chance), on "low" it does (probe 0.72 at init -> 0.82).
        bg = np.full_like(bg, 100 if cfg.texture == "natural" else 30)  # (a texture needs room both ways)
        colour, scale, cx, cy, mirror = (230, 230, 230), 0.6 * h, 0.5 * w + margin, 0.56 * h + margin, False
        thickness, noise_sigma = max(2, int(round(scale * 0.08))), 0.0
        jitter[:] = 0
    if cfg.texture == "natural":  # drawn apart, so the other settings render the pixels they always did
        extra = np.random.default_rng([cfg.seed, _SPLITS[split], index, 1])
        bg = np.clip(bg + _natural_texture(extra, *bg.shape[:2]), 0, 255).astype(np.uint8)
        jitter = np.clip(jitter + _camera_pan(extra, total, margin), -margin, margin).round().astype(int)

    frames = np.empty((total, h, w, 3), np.uint8)
    for t in range(total):
        canvas = Image.fromarray(bg)
        draw = ImageDraw.Draw(canvas)
        segs, head = _skeleton(poses[t])

        def px(p):
            x = -p[0] if mirror else p[0]
            return (cx + x * scale, cy - p[1] * scale)

        for a, b in segs:
            draw.line([px(a), px(b)], fill=colour, width=thickness, joint="curve")
        hx, hy = px(head)
        r = 0.08 * scale
        draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=colour)
        oy, ox = margin + jitter[t, 0], margin + jitter[t, 1]
        frame = np.asarray(canvas)[oy : oy + h, ox : ox + w]
        if noise_sigma > 0.5:
            frame = np.clip(frame + rng.normal(0, noise_sigma, frame.shape), 0, 255).astype(np.uint8)
        frames[t] = frame
    return SyntheticVideo(
        video_id=f"synthetic_{split}_{index:06d}",
        frames=frames,
        action_label=action_label,
        phase_labels=phase_labels.astype(np.int64),
        fps=cfg.fps,
    )


# -- shards -------------------------------------------------------------------------------------
def write_synthetic_shards(out_dir: str | Path, cfg: SyntheticConfig | None = None, **write) -> dict:
    """Render and write the train and val splits; returns the manifest. ``write``: the keyword
    arguments of :func:`~carl_scale.datasets.parallel.write_options`. By default each split gets
    ~16 shards, so that 16 ranks x workers can split it by shard."""
    cfg = cfg or SyntheticConfig()
    first = write_options(**write)
    if first.payload == "video":  # refused before anything is written, not video by video
        check_frame_size(first.encode.codec, cfg.height, cfg.width)
    labels = {"actions": list(cfg.action_names), "phases": cfg.phase_names()}
    for split in ("train", "val"):
        if not num_videos(cfg, split):  # (val_videos 0: a train split only)
            continue
        opts = write_options(**write, default_max_samples=max(1, -(-num_videos(cfg, split) // 16)))

        def load(index: int, split: str = split) -> VideoRecord:
            v = render_video(cfg, split, index)
            return VideoRecord(v.video_id, v.frames, v.fps, v.action_label, v.phase_labels)

        write_split(out_dir, split, range(num_videos(cfg, split)), load, dataset="synthetic", opts=opts,
                    label_names=labels, describe=lambda i, split=split: f"{split}/{i}",
                    extra={"synthetic_config": dataclasses.asdict(cfg)})
    return read_manifest(out_dir)


# Settings added to SyntheticConfig after sets were written, with what such sets hold: a manifest
# without one was rendered as that value gives. Only these: any other missing field (nuisance, say:
# the sets written before it had today's "high" look) makes the set another config's.
ADDED_SINCE = {"texture": "none"}


def _made_from(saved) -> dict | None:
    """The config a manifest's ``synthetic_config`` names, as a dict comparable with ``asdict(cfg)``."""
    return {**ADDED_SINCE, **saved} if isinstance(saved, dict) else None


def ensure_synthetic_shards(out_dir: str | Path, cfg: SyntheticConfig | None = None, **kw) -> dict:
    """The embedded default: write the synthetic shards once; reuse them when the manifest says
    they were made from the same config. A different config is an error, not an overwrite."""
    cfg = cfg or SyntheticConfig()
    manifest = read_manifest(out_dir)
    wanted = {split for split in ("train", "val") if num_videos(cfg, split)}
    if manifest is not None and wanted <= set(manifest.get("splits", {})):
        if _made_from(manifest.get("synthetic_config")) == dataclasses.asdict(cfg):
            return manifest
        raise FileExistsError(f"{out_dir} holds shards of another dataset or synthetic config (other flags, or "
                              f"an older carl_scale: the default set changed to nuisance='low'); remove it "
                              f"(rm -r {out_dir}) or choose another --data-dir")
    # a default set interrupted while it was written resumes; shard files that no write of ours
    # planned are someone's: never replaced
    if manifest is None and not (Path(out_dir) / PROGRESS_DIR).is_dir():
        theirs = sorted(p.name for split in ("train", "val") for p in Path(out_dir).glob(f"{split}-*"))
        if theirs:
            raise FileExistsError(f"{out_dir} holds {len(theirs)} shard files (e.g. {theirs[0]}) that no synthetic "
                                  f"write made, and no shards.json: move them, or choose another --data-dir")
    return write_synthetic_shards(out_dir, cfg, **kw)
