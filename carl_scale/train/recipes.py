"""Named recipes: complete run configs, each citing where its settings come from, and the one way
a command line (or a sweep trial) changes them.

    cfg = configure(recipe("finegym"), {"data.temporal.num_frames": 32})   # FineGym at T = 32
    cfg = configure(load_run_config("runs/x/config.json"), {"loss.tau": 0.2})

"Paper" is Chen et al., TPAMI (``shared/paper``), §4.3 "Implementation details" unless a section
or table is named. "Published config" is the CARL code's ``configs/scl_transformer_*.yml``.
The paper's batch of 4 videos was spread over 4 GPUs (1 each, TRAIN.BATCH_SIZE 1 in the published
configs); here ``--batch-size`` is per rank, so the recipes' 4 is the paper's step on one GPU
(on N GPUs pass ``--batch-size 1`` with N = 4 for the paper's exact batch). Epochs are passes over
the data, turned into optimizer steps from the data's size when the run starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from carl_scale.config import ConfigError, from_dict, iter_flags, refuse, to_dict
from carl_scale.data.config import LoaderConfig, SpatialConfig, SyntheticConfig, TemporalConfig
from carl_scale.data.manifest import read_manifest
from carl_scale.losses.config import LossConfig
from carl_scale.models.flavors import model_config, model_config_from_dict
from carl_scale.train.config import CheckpointConfig, OptimConfig, RunConfig


def debug() -> RunConfig:
    """The embedded default: the synthetic phase-video set, the ``debug`` flavor, 400 steps on two
    CPU cores in a few minutes. Departs from the paper where a measurement said so (closing note of
    issue 3: with the paper's T = 32-80, α = 1.5, batch 4 and full augmentation the model ended
    below its random initialisation): many videos per step (16) of few frames (T = 8) spread over
    the whole video (α = 50), lr 3e-4 from random weights, light colour augmentation."""
    return RunConfig(
        run_dir="runs/pretrain", steps=400, epochs=None, model=model_config("debug"),
        data=LoaderConfig(shards="data/synthetic", batch_size=16, num_workers=2,
                          temporal=TemporalConfig(num_frames=8, alpha=50.0, beta=0.2),
                          spatial=SpatialConfig.light()),
        loss=LossConfig(tau=0.1, sigma2=10.0), optim=OptimConfig(lr=3e-4, weight_decay=1e-5, grad_clip=10.0),
        checkpoint=CheckpointConfig(every_steps=100, keep=3), synthetic=SyntheticConfig())


def _paper(name: str, flavor: str, shards: str, frames: int, epochs: float, **model: Any) -> RunConfig:
    """What every paper recipe shares: ResNet-50 (BYOL weights via --pretrained; conv1..layer3
    frozen) + transformer, Adam lr 1e-4 with weight decay 1e-5 and cosine decay, τ 0.1, σ² 10,
    α 1.5, β 20%, random sampling, the SimCLR augmentations with blur, 4 videos per step
    (8 views), gradient clipping at 10 (published config)."""
    return RunConfig(
        run_dir=f"runs/{name}", steps=None, epochs=epochs, model=model_config(flavor, **model),
        data=LoaderConfig(shards=shards, batch_size=4, num_workers=4,
                          temporal=TemporalConfig(num_frames=frames, alpha=1.5, beta=0.2, sampling="random"),
                          spatial=SpatialConfig()),
        loss=LossConfig(tau=0.1, sigma2=10.0), optim=OptimConfig(lr=1e-4, weight_decay=1e-5, grad_clip=10.0),
        checkpoint=CheckpointConfig(every_steps=1000, keep=3))


def pennaction() -> RunConfig:
    """PennAction: T = 80 "because of shorter videos", 3-layer transformer, 300 epochs (paper)."""
    return _paper("pennaction", "r50", "data/pennaction", frames=80, epochs=300)


def finegym() -> RunConfig:
    """FineGym: T = 240 (paper; Table 14: 41.75 FineGym99 at T = 240 vs 34.02 at 80), 3 layers,
    300 epochs, no Gaussian blur (published FineGym config)."""
    cfg = _paper("finegym", "r50", "data/finegym", frames=240, epochs=300)
    return configure(cfg, {"data.spatial.blur_p": 0.0})


def pouring() -> RunConfig:
    """Pouring: T = 240 (paper), a 2-layer transformer (published Pouring config), 300 epochs
    (paper; the published Pouring config runs 500)."""
    return _paper("pouring", "r50_pouring", "data/pouring", frames=240, epochs=300)


def k400() -> RunConfig:
    """Kinetics-400 pretraining (paper §4.5.9, Table 15; settings from the published K400 config):
    T = 80, 2 videos per GPU, 10 epochs, a 2-layer transformer, SCL's denominators over the whole
    batch (its ``NEGATIVE_TYPE: batch_noself``, the only published config with it: on Kinetics'
    unrelated videos another video's frames are safe negatives). The end-of-run evaluation reads
    PennAction's validation videos, the paper's transfer target (skipped if they are absent)."""
    cfg = _paper("k400", "r50", "data/k400", frames=80, epochs=10, num_layers=2)
    return configure(cfg, {"data.batch_size": 2, "eval.shards": "data/pennaction", "loss.scl_negatives": "batch"})


RECIPES: dict[str, Callable[[], RunConfig]] = {"debug": debug, "pennaction": pennaction, "finegym": finegym,
                                               "pouring": pouring, "k400": k400}


def recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r} is not a recipe; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()


def load_run_config(path: str | Path) -> RunConfig:
    """A saved run config: a run's ``config.json``, a checkpoint's ``meta.json`` (both keep it under
    ``"config"``) or a bare config dict (a sweep's ``best_config.json``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file (a run's config.json, a checkpoint's meta.json, "
                          f"or a sweep's best_config.json)")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exn:
        raise ConfigError(f"--config {path}: not valid JSON ({exn})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object with the run config's sections")
    # a run's length is one of steps and epochs: a file that gives one means the other unset (a
    # missing key takes its default, which for steps is a number: "both given", said of a file
    # that gave one)
    for given, other in (("epochs", "steps"), ("steps", "epochs")):
        if data.get(given) is not None and other not in data:
            data = {**data, other: None}
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exn:
        raise ConfigError(f"--config {path}: {exn}") from None


def _set(d: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for k in parents:
        if not isinstance(d.get(k), dict):
            raise ConfigError(f"no config section {path.rsplit('.', 1)[0]!r} to set {path!r} in")
        d = d[k]
    d[leaf] = value


def _video_classes(d: dict) -> int | None:
    """How many video-level classes the run's data has: the synthetic set's actions, or the
    action names a shard directory's shards.json lists; None when the data does not say."""
    if d["synthetic"] is not None:
        return int(d["synthetic"]["num_actions"])
    shards = d["data"]["shards"]
    if isinstance(shards, str) and Path(shards).is_dir():
        names = ((read_manifest(shards) or {}).get("label_names") or {}).get("actions")
        if names:
            return len(names)
    return None


def resume_hint(overrides: Mapping[str, Any], d: Mapping[str, Any], weak: bool) -> str:
    """What to say when --init-from's checkpoint is unreadable in a run that resumes (pruned since,
    most often): the resume does not need it (its own checkpoint holds every weight), its saved
    config does."""
    if not overrides.get("checkpoint.resume"):
        return ""
    run_dir = overrides.get("run_dir") or (d["run_dir"] + ("_weak" if weak and d["loss"]["name"] != "weak" else ""))
    return (f". A resumed run needs no --init-from (its checkpoint holds every weight): resume it with "
            f"--config {Path(run_dir) / 'config.json'} --resume {overrides['checkpoint.resume']}")


def configure(base: RunConfig, overrides: Mapping[str, Any] | None = None, *, flavor: str | None = None,
              augment: str | None = None, synthetic_videos: int | None = None,
              data_dir: str | None = None, weak: bool = False) -> RunConfig:
    """``base`` changed as a command line asks, returning a new, validated config (``base`` is not
    changed). In this order: ``flavor`` replaces the model, or the model of the checkpoint that
    ``overrides["init_from"]`` names (its config, without --pretrained: the checkpoint has every
    weight); ``augment`` ("paper"/"light") the augmentation strengths; ``data_dir`` moves the
    synthetic set; ``synthetic_videos`` sizes it (val: a third, at least one per action); ``weak``
    turns on weak supervision (paper §3.5: the weak objective, a class token for the data's video
    classes, batches of same-label pairs, and ``<run_dir>_weak``); then each dotted-path override.
    Giving ``data.shards`` drops the synthetic set; ``steps`` and ``epochs`` replace each other."""
    overrides = dict(overrides or {})
    d = to_dict(base)
    if overrides.get("init_from"):  # its checkpoint's model and weights: these would be dropped unread
        if flavor is not None:
            refuse("--flavor", "is the model --init-from's checkpoint sets (its config): drop --flavor")
        if overrides.get("model.pretrained") is not None:
            refuse("--pretrained", "would be overwritten by --init-from's weights, every one: drop --pretrained")
    if flavor is not None:
        d["model"] = to_dict(model_config(flavor))
    if overrides.get("init_from"):
        from carl_scale.models.weights import read_meta, resolve_checkpoint

        try:  # the checkpoint itself, not a pointer that moves ('checkpoints/latest', a run directory)
            overrides["init_from"] = str(resolve_checkpoint(overrides["init_from"]))
            saved = read_meta(overrides["init_from"])["config"]["model"]
            d["model"] = to_dict(model_config_from_dict(saved, pretrained=None))  # every weight is in it
        except (OSError, ValueError) as exn:
            raise ConfigError(f"--init-from: {exn}{resume_hint(overrides, d, weak)}") from None
    if augment is not None:
        presets = {"paper": SpatialConfig, "light": SpatialConfig.light}
        if augment not in presets:
            refuse("--augment", f"must be one of {', '.join(presets)}, got {augment!r}")
        d["data"]["spatial"] = to_dict(presets[augment]())
    if "data.shards" in overrides:
        if not overrides["data.shards"]:
            refuse("--shards", "is empty: give a shard directory, brace pattern or .txt list")
        d["synthetic"] = None
    if data_dir is not None:
        if not data_dir:
            refuse("--data-dir", "is empty: give the directory the synthetic set is written to")
        if d["synthetic"] is None:
            refuse("--data-dir", "is where the synthetic set is written, and this run has none: use --shards")
        d["data"]["shards"] = data_dir
    if synthetic_videos is not None:
        if d["synthetic"] is None:
            refuse("--synthetic-videos", "sizes the synthetic set, and this run has none (it reads --shards)")
        if synthetic_videos < 1:
            refuse("--synthetic-videos", f"must be >= 1, got {synthetic_videos}")
        n_actions = d["synthetic"]["num_actions"]
        d["synthetic"].update(train_videos=synthetic_videos, val_videos=max(n_actions, synthetic_videos // 3))
    if weak:
        already = d["loss"]["name"] == "weak"  # (a weak run's own config: its run_dir is the weak one)
        d["loss"]["name"] = "weak"
        d["loss"]["scl_negatives"] = "video"  # the weak objective's negatives are Eq. 3's
        d["model"]["class_token"] = True
        if not d["data"]["per_label"]:
            d["data"]["per_label"] = 2
        if "run_dir" not in overrides and not already:
            d["run_dir"] = d["run_dir"] + "_weak"  # beside the self-supervised run it usually starts from
    if "steps" in overrides and "epochs" in overrides:
        refuse("--steps/--epochs", "are both given: a run's length is one of them")
    if "steps" in overrides:
        d["epochs"] = None
    if "epochs" in overrides:
        d["steps"] = None
    for path, value in overrides.items():
        _set(d, path, value)
    if d["loss"]["name"] != "weak":  # never silently ignored
        weak_only = [path for path in overrides if path in WEAK_ONLY]
        if weak_only:
            flags = {f.path: f.flag for f in iter_flags(RunConfig)}
            refuse(flags[weak_only[0]], "sets the weakly supervised objective, and this run trains SCL: add --weak "
                                        "(or --loss weak), or drop the flag")
    if "model.num_classes" in overrides and not d["model"]["class_token"]:
        refuse("--num-classes", "sizes the class token's classifier, and this model has no class token: add --weak, "
                                "or drop the flag")
    if weak and "model.num_classes" not in overrides:  # the classes of the data this run reads
        classes = _video_classes(d)
        if classes is None:
            refuse("--weak", f"needs video-level labels, and {d['data']['shards']} does not say which classes it has "
                             f"(no label_names in shards.json): write the shards with --labels, or give "
                             f"--num-classes N")
        d["model"]["num_classes"] = classes
    if overrides.get("init_from"):
        _check_fits_init(d["model"], saved, overrides["init_from"])
    return from_dict(RunConfig, d)


# The loss fields only the weak objective reads (LossConfig): given for an SCL run, refused.
WEAK_ONLY = ("loss.pcl_weight", "loss.eps1", "loss.eps2", "loss.ce_weight", "loss.view_ensemble", "loss.pcl_grid",
             "loss.pcl_cost", "loss.class_negatives", "loss.gather_negatives")

# The model fields that shape its weights: a run from --init-from must keep the checkpoint's.
SHAPE_FIELDS = {"backbone": "model.backbone", "head_width": "model.head_width", "width": "model.width",
                "num_layers": "--layers", "num_heads": "model.num_heads", "ffn_width": "model.ffn_width",
                "embed_dim": "model.embed_dim", "proj_dim": "model.proj_dim", "pos_encoding": "model.pos_encoding",
                "final_norm": "model.final_norm"}


def _check_fits_init(model: dict, saved: dict, init_from: str) -> None:
    """Refuse, now, a model the checkpoint's weights cannot fill: a shape flag given with
    --init-from, or a class-token classifier for another number of video classes (a class token
    the checkpoint lacks is new, and starts fresh)."""
    for field, flag in SHAPE_FIELDS.items():
        if field in saved and model.get(field) != saved[field]:
            refuse(flag, f"is {model.get(field)!r}, but --init-from {init_from} was trained with {saved[field]!r}: "
                         f"drop the flag, or start without --init-from")
    if saved.get("class_token") and model.get("class_token") and model.get("num_classes") != saved.get("num_classes"):
        refuse("--num-classes", f"is {model.get('num_classes')} (this data's video classes), but --init-from "
                                f"{init_from} was trained with {saved.get('num_classes')}: start from a checkpoint "
                                f"without a class token (self-supervised), or give --num-classes "
                                f"{saved.get('num_classes')} if the labels are the same classes")
