"""Checkpoints of the published CARL code (github.com/minghchen/CARL_code) as carl_scale checkpoints.

    carl-scale import-carl scl_transformer_action_logs/checkpoints/checkpoint_epoch_00299.pth \\
        --config configs/scl_transformer_action_config.yml --out runs/carl_pennaction

What a published checkpoint is: a ``torch.save`` of ``{"epoch", "model_state" (the state dict of
its ``TransformerModel``), "optimizer_state", "cfg"}``, ``cfg`` being its EasyDict config with the
command line (an ``argparse.Namespace``) inside. It is read with ``torch.load(weights_only=True)``:
the two config classes are admitted as inert stand-ins that rebuild plain dicts (no code of
``easydict`` or anything else runs); any other object is refused.

The published model and ours, name by name (``r50`` flavors are the same architecture):

=================================================  ==============================================
published ``TransformerModel``                     carl_scale ``FrameVideoEncoder``
=================================================  ==============================================
``backbone.{0,1}`` (conv1, bn1), ``.4-.7``         ``backbone.frozen.0.{0,1}``, stages 1-4
(layer1-4); ``res_finetune`` (the stages trained)  (frozen or trainable by ``BASE_MODEL.LAYER``)
``embed.fc_layers.{1,2,5,6}``                      ``frame_head.{1,2,5,6}``
``embed.video_emb``                                ``frame_head.8``
``...enc_layers.i.self_att.linear_{Q,K,V}2d``      ``transformer.blocks.i.attn.qkv`` (rows Q, K, V)
``...enc_layers.i.self_att.linear_d2Q``            ``transformer.blocks.i.attn.proj``
``...enc_layers.i.res_layer{0,1}.norm``            ``transformer.blocks.i.{attn,ffn}_norm``
``...enc_layers.i.feed_forward.fc{1,2}``           ``transformer.blocks.i.fc{1,2}``
``embed.embedding_layer``                          ``embed``
``ssl_projection.net.{0,1,3}``                     ``projection.{0,1,3}``
=================================================  ==============================================

Every tensor is placed or the import stops with the list of those that were not (nothing is
written then). The published ``classification`` algorithm's ``classifier`` (a per-frame head
outside the encoder) is the one part left out, and said so.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from carl_scale.config import ConfigError, from_dict, to_dict
from carl_scale.models.config import ModelConfig
from carl_scale.models.flavors import build_model
from carl_scale.models.weights import META_FILE, CheckpointError, load_tensors, save_weights

# The published defaults (its utils/config.py) for what the import reads. Its loader replaces a
# whole top-level section with the YAML's; a key missing there falls back to these here.
PUBLISHED_DEFAULTS = {
    "DATASETS": ["pouring"], "IMAGE_SIZE": 224, "TRAINING_ALGO": "scl", "PATH_TO_DATASET": "pouring",
    "TRAIN": {"NUM_FRAMES": 240, "BATCH_SIZE": 1},
    "MODEL": {"EMBEDDER_TYPE": "transformer", "PROJECTION": True, "PROJECTION_SIZE": 128, "L2_NORMALIZE": True,
              "BASE_MODEL": {"NETWORK": "Resnet50_byol", "LAYER": 3, "FRAMES_PER_BATCH": 40},
              "EMBEDDER_MODEL": {"HIDDEN_SIZE": 256, "D_FF": 1024, "NUM_HEADS": 8, "NUM_LAYERS": 3,
                                 "FC_LAYERS": [[256, True], [256, True]], "CAPACITY_SCALAR": 2,
                                 "EMBEDDING_SIZE": 128, "FC_DROPOUT_RATE": 0.1}},
    "SCL": {"LABEL_VARIENCE": 10.0, "SOFTMAX_TEMPERATURE": 0.1},
}
_RESNET_CHILDREN = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
_STAGE = {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}
_RECIPE_OF = {"penn_action": "pennaction", "pennaction": "pennaction", "pouring": "pouring",
              "finegym": "finegym", "kinetics400": "k400"}


class _ConfigRecord:
    """Stands in for ``easydict.EasyDict`` and ``argparse.Namespace`` while a published checkpoint
    is unpickled: it becomes an OrderedDict (items and attributes), nothing else runs."""

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


def _plain(obj):
    if isinstance(obj, OrderedDict):
        items = dict(obj) or dict(vars(obj))  # a dict's items, or a Namespace's attributes
        return {k: _plain(v) for k, v in items.items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def read_published_checkpoint(path: str | Path) -> dict:
    """``{"epoch", "model_state", "cfg" (plain dicts, or None)}`` of a published checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: name a checkpoint_epoch_NNNNN.pth file of the published "
                                f"CARL code (its checkpoints/ folder)")
    raw = load_tensors(path, allow=[(_ConfigRecord, "easydict.EasyDict"), (_ConfigRecord, "argparse.Namespace")])
    if not isinstance(raw, dict) or not isinstance(raw.get("model_state"), dict):
        keys = sorted(map(str, raw)) if isinstance(raw, dict) else []
        what = (f"a dict of {len(keys)} keys: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
                if isinstance(raw, dict) else type(raw).__name__)
        raise CheckpointError(f"{path} is not a published CARL checkpoint: no model_state (it holds {what})")
    state = dict(raw["model_state"])
    odd = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None or not state:
        raise CheckpointError(f"{path} is not a published CARL checkpoint: its model_state "
                              + ("is empty" if odd is None else f"holds {odd!r}: {type(state[odd]).__name__}, "
                                 f"not a name and a tensor"))
    if all(k.startswith("module.") for k in state):  # saved from the DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return {"epoch": raw.get("epoch"), "model_state": state, "cfg": _plain(raw.get("cfg"))}


def read_published_config(path: str | Path | None, saved: dict | None = None) -> dict:
    """The published config a model was trained with: the YAML file (merged over the published
    defaults as its loader does), else the one saved in the checkpoint."""
    if path is None and saved is None:
        raise ValueError("this checkpoint holds no config: give the YAML it was trained with (--config "
                         "configs/scl_transformer_..._config.yml of the published code)")
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--config {p} not found: the published code's YAML (configs/*.yml)")
        try:
            given = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exn:
            raise ValueError(f"--config {p} is not valid YAML: {str(exn).splitlines()[0]}") from None
        if not isinstance(given, dict):
            raise ValueError(f"--config {p} is not a published CARL config (a YAML mapping of sections)")
    else:
        given = saved
        if not isinstance(given, dict):
            raise ValueError(f"the config this checkpoint holds is a {type(given).__name__}, not the published "
                             f"config's mapping: give the YAML it was trained with (--config configs/*.yml)")
    return _merge(PUBLISHED_DEFAULTS, given)


def _merge(defaults: dict, given: dict) -> dict:
    out = copy.deepcopy(defaults)
    for k, v in given.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config_from_published(cfg: dict) -> ModelConfig:
    """Our ModelConfig of a published config (refusing what our FVE does not build)."""
    m, e = cfg["MODEL"], cfg["MODEL"]["EMBEDDER_MODEL"]
    if m["EMBEDDER_TYPE"] != "transformer":
        raise ValueError(f"MODEL.EMBEDDER_TYPE is {m['EMBEDDER_TYPE']!r}: only the published transformer model "
                         f"(the CARL FVE) can be imported, not its convolutional embedder")
    widths = [int(c) * int(e["CAPACITY_SCALAR"]) for c, *_ in e["FC_LAYERS"]]
    if len(widths) != 2 or widths[0] != widths[1]:
        raise ValueError(f"MODEL.EMBEDDER_MODEL.FC_LAYERS x CAPACITY_SCALAR gives widths {widths}: carl_scale's "
                         f"frame head has two layers of one width")
    if int(e["NUM_LAYERS"]) < 1:
        raise ValueError("MODEL.EMBEDDER_MODEL.NUM_LAYERS is 0 (no transformer): carl_scale's FVE has at least one")
    if m["PROJECTION"] and int(m["PROJECTION_SIZE"]) != int(e["EMBEDDING_SIZE"]):
        raise ValueError(f"MODEL.PROJECTION_SIZE {m['PROJECTION_SIZE']} != EMBEDDING_SIZE {e['EMBEDDING_SIZE']}: "
                         f"the published projection head is E->P->E, carl_scale's E->E->P; they agree only at P = E")
    layer = int(m["BASE_MODEL"]["LAYER"])
    return ModelConfig(
        flavor="r50", backbone="resnet50", train_last_stages={3: 1, 2: 2}.get(layer, 0),
        image_size=int(cfg["IMAGE_SIZE"]), head_width=widths[0], width=int(e["HIDDEN_SIZE"]),
        num_layers=int(e["NUM_LAYERS"]), num_heads=int(e["NUM_HEADS"]), ffn_width=int(e["D_FF"]),
        dropout=float(e["FC_DROPOUT_RATE"]), embed_dim=int(e["EMBEDDING_SIZE"]),
        proj_dim=int(e["EMBEDDING_SIZE"]), train_frames=int(cfg["TRAIN"]["NUM_FRAMES"]),
        backbone_chunk=int(m["BASE_MODEL"]["FRAMES_PER_BATCH"]))


def _published_resnet_children(layer: int) -> tuple[list[str], list[str]]:
    """The torchvision ResNet children that the published ``backbone`` and ``res_finetune`` hold."""
    if layer == 3:
        return _RESNET_CHILDREN[:7], ["layer4"]
    if layer == 2:
        return _RESNET_CHILDREN[:6], ["layer3", "layer4"]
    return _RESNET_CHILDREN, []


def _our_name(key: str, cfg: ModelConfig, layer: int) -> str | None:
    """Where a published (non-attention) tensor goes in our state dict; None: nowhere."""
    frozen_children, tuned = _published_resnet_children(layer)
    k = 5 - cfg.train_last_stages  # our frozen stages: the stem and the layers below the trained ones
    if m := re.match(r"backbone\.(\d+)\.(.+)$", key):
        idx = int(m[1])
        child = frozen_children[idx] if idx < len(frozen_children) else None
        rest = m[2]
    elif m := re.match(r"res_finetune\.(.+)$", key):
        if len(tuned) == 1:  # the stage itself
            child, rest = tuned[0], m[1]
        else:
            sub = re.match(r"(\d+)\.(.+)$", m[1])
            if not sub or int(sub[1]) >= len(tuned):
                return None
            child, rest = tuned[int(sub[1])], sub[2]
    else:
        for pat, repl in ((r"embed\.fc_layers\.([1256])\.(.+)$", r"frame_head.\1.\2"),
                          (r"embed\.video_emb\.(.+)$", r"frame_head.8.\1"),
                          (r"embed\.embedding_layer\.(.+)$", r"embed.\1"),
                          (r"ssl_projection\.net\.([013])\.(.+)$", r"projection.\1.\2"),
                          (r"embed\.video_encoder\.enc_layers\.(\d+)\.self_att\.linear_d2Q\.(.+)$",
                           r"transformer.blocks.\1.attn.proj.\2"),
                          (r"embed\.video_encoder\.enc_layers\.(\d+)\.res_layer0\.norm\.(.+)$",
                           r"transformer.blocks.\1.attn_norm.\2"),
                          (r"embed\.video_encoder\.enc_layers\.(\d+)\.res_layer1\.norm\.(.+)$",
                           r"transformer.blocks.\1.ffn_norm.\2"),
                          (r"embed\.video_encoder\.enc_layers\.(\d+)\.feed_forward\.(fc[12])\.(.+)$",
                           r"transformer.blocks.\1.\2.\3")):
            if re.match(pat, key):
                return re.sub(pat, repl, key)
        return None
    if child not in _STAGE:
        return None
    stage = _STAGE[child]
    where = f"frozen.{stage}" if stage < k else f"trainable.{stage - k}"
    if stage == 0:
        where += ".0" if child == "conv1" else ".1"
    return f"backbone.{where}.{rest}"


def map_published_state(state: dict[str, torch.Tensor], model: torch.nn.Module, layer: int,
                        source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(a state dict for ``model``, notes) from a published ``model_state``; every tensor placed,
    or a CheckpointError listing what was not."""
    cfg, ours = model.cfg, model.state_dict()
    out, unplaced, notes = {}, [], []
    qkv: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # block -> weight|bias -> Q|K|V
    dropped = sorted(k for k in state if k.startswith("classifier."))
    if dropped:
        notes.append(f"left out: {', '.join(dropped)} (the published 'classification' algorithm's frame "
                     f"classifier, not part of the encoder)")
    for key, value in state.items():
        if key in dropped:
            continue
        if m := re.match(r"embed\.video_encoder\.enc_layers\.(\d+)\.self_att\.linear_([QKV])2d\.(weight|bias)$", key):
            qkv.setdefault(m[1], {}).setdefault(m[3], {})[m[2]] = value
            continue
        name = _our_name(key, cfg, layer)
        if name is None:
            unplaced.append(key)
        else:
            out[name] = value
    for block, parts in qkv.items():
        for kind, qkv_parts in parts.items():
            if set(qkv_parts) != {"Q", "K", "V"}:
                unplaced += [f"embed.video_encoder.enc_layers.{block}.self_att.linear_{p}2d.{kind}" for p in qkv_parts]
                continue
            out[f"transformer.blocks.{block}.attn.qkv.{kind}"] = torch.cat([qkv_parts[p] for p in "QKV"])
    if not any(k.startswith("ssl_projection.") for k in state):
        notes.append("the checkpoint has no projection head (trained with MODEL.PROJECTION false): ours starts "
                     "fresh; it is used only by further training, never by evaluation")
        out.update({k: v for k, v in ours.items() if k.startswith("projection.")})
    missing = sorted(ours.keys() - out.keys())
    unexpected = sorted(out.keys() - ours.keys())
    reshaped = sorted(f"{k} {tuple(out[k].shape)} vs {tuple(ours[k].shape)}" for k in ours.keys() & out.keys()
                      if out[k].shape != ours[k].shape)
    if unplaced or missing or unexpected or reshaped:
        parts = [f"{len(v)} {what}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}"
                 for what, v in (("published tensors with no place in carl_scale's model", unplaced),
                                 ("of carl_scale's tensors not in the checkpoint", missing),
                                 ("placed under names the model does not have", unexpected),
                                 ("of another shape (published vs ours)", reshaped)) if v]
        raise CheckpointError(f"{source} does not map onto carl_scale's FVE for its config; nothing was written. "
                              + "; ".join(parts))
    dtypes = {out[k].dtype for k in out if out[k].is_floating_point()}
    return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in out.items()}, notes + (
        [f"weights stored as {sorted(map(str, dtypes))[0]}: converted to float32"] if dtypes - {torch.float32} else [])


def _run_config(pub: dict, model: ModelConfig, source: str = "the config") -> tuple[Any, str, list[str]]:
    """(the carl_scale run config an imported checkpoint's meta.json holds, its recipe, notes): the
    recipe of the data it was trained on, with its model, T, τ and σ²."""
    from carl_scale.train.config import RunConfig
    from carl_scale.train.recipes import recipe

    # the training script makes PATH_TO_DATASET absolute and drops kinetics400 from DATASETS before
    # a checkpoint saves them: the folder's name is what is left to go by then
    names = [str(d).lower() for d in pub.get("DATASETS") or []] + [Path(str(pub.get("PATH_TO_DATASET", ""))).name.lower()]
    name = next((_RECIPE_OF[n] for n in names if n in _RECIPE_OF), None)
    notes = [] if name is not None else [
        f"its training data ({', '.join(n for n in names if n)}) is none carl_scale has a recipe for: meta.json "
        f"records the pennaction recipe's training settings (they matter only to fine-tuning with --config)"]
    d = to_dict(recipe(name or "pennaction"))
    d["model"] = to_dict(model)
    d["data"]["temporal"]["num_frames"] = model.train_frames
    try:
        d["loss"]["tau"] = float(pub["SCL"]["SOFTMAX_TEMPERATURE"])
        d["loss"]["sigma2"] = float(pub["SCL"]["LABEL_VARIENCE"])
    except (TypeError, KeyError, ValueError) as exn:
        raise ValueError(f"{source} is not a published CARL config: its SCL section has no SOFTMAX_TEMPERATURE and "
                         f"LABEL_VARIENCE numbers ({type(exn).__name__}: {exn})") from None
    algo = str(pub.get("TRAINING_ALGO", "scl")).lower()
    if algo != "scl":
        notes.append(f"it was trained with {algo.upper()} (TRAINING_ALGO), not SCL: meta.json's SCL settings "
                     f"(τ, σ²) are the config's SCL section, which that training did not use")
    if name is not None and not any(n in _RECIPE_OF for n in names[:-1]):
        notes.append(f"its recipe ({name}) is read from its data folder's name, the only trace its saved config "
                     f"keeps (a Kinetics-400 pretraining saves PennAction's): give --config with the YAML it was "
                     f"trained with if that is wrong")
    return from_dict(RunConfig, d), name or "pennaction", notes


def _model_config(pub: dict, source: str) -> ModelConfig:
    """:func:`model_config_from_published`, a section or entry of the wrong shape (``MODEL: null``,
    ``FC_LAYERS: [256, 256]``) named in one line instead of a TypeError deep inside."""
    try:
        return model_config_from_published(pub)
    except (TypeError, KeyError, AttributeError) as exn:
        raise ValueError(f"{source} is not a published CARL config: its MODEL section has an entry of another "
                         f"shape than the published code's ({type(exn).__name__}: {exn}); compare it with "
                         f"configs/scl_transformer_*_config.yml of the published code") from None


_COMPARED = ("image_size", "train_last_stages", "head_width", "width", "num_layers", "num_heads", "ffn_width",
             "embed_dim", "train_frames")


def import_carl(checkpoint: str | Path, config: str | Path | None, out: str | Path, *,
                overwrite: bool = False) -> dict:
    """Write ``out`` as a carl_scale checkpoint directory (``meta.json`` + ``model.pt``) holding a
    published checkpoint's encoder. Returns a summary (what was read, written and noted)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; name a directory (it gets meta.json and model.pt)")
    held = [p.name for p in out.iterdir() if p.name == "checkpoints" or p.name.startswith(("step_", "client_rank",
                                                                                          "mp_rank_", "zero_pp_"))] \
        if out.is_dir() else []
    if held:  # a run directory or a training checkpoint: readers would load those, not the imported weights
        raise FileExistsError(f"--out {out} holds a training run's files ({', '.join(sorted(held)[:3])}), which "
                              f"readers of {out} would load instead of the imported weights, even with --overwrite: "
                              f"choose another directory")
    if out.exists() and any(out.iterdir()) and not overwrite:  # (after the refusal --overwrite cannot lift)
        raise FileExistsError(f"--out {out} is not empty; choose another directory or pass --overwrite")
    pub_ckpt = read_published_checkpoint(checkpoint)
    pub = read_published_config(config, pub_ckpt["cfg"])
    source = f"--config {config}" if config is not None else f"the config saved in {checkpoint}"
    model_cfg = _model_config(pub, source)
    if config is not None and isinstance(pub_ckpt["cfg"], dict):  # both: they must describe one model
        saved = _model_config(read_published_config(None, pub_ckpt["cfg"]), f"the config saved in {checkpoint}")
        differ = [f"{k} {getattr(model_cfg, k)} (YAML) vs {getattr(saved, k)} (checkpoint)"
                  for k in _COMPARED if getattr(model_cfg, k) != getattr(saved, k)]
        if differ:
            raise ConfigError(f"--config {config} describes another model than the one {checkpoint} was trained as: "
                              f"{'; '.join(differ)}. Give the YAML it was trained with, or leave --config out to use "
                              f"the config saved in the checkpoint")
    model = build_model(model_cfg, weights_follow=True)
    state, notes = map_published_state(pub_ckpt["model_state"], model, int(pub["MODEL"]["BASE_MODEL"]["LAYER"]),
                                       str(checkpoint))
    run_cfg, recipe_name, more = _run_config(pub, model_cfg, source)
    notes += more
    if not (pub.get("MODEL") or {}).get("L2_NORMALIZE", True):
        notes.append("it was evaluated without L2-normalising its embeddings (MODEL.L2_NORMALIZE false); carl_scale's "
                     "evaluation always normalises them")
    model.load_state_dict(state)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # with --overwrite: no meta.json beside weights it does not describe
    save_weights(model, out)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    meta = {"step": 0, "total_steps": 0, "world_size": 1, "config": to_dict(run_cfg),
            "imported_from": {"file": str(checkpoint.resolve()), "sha256": digest, "epoch": pub_ckpt["epoch"],
                              "config": None if config is None else str(Path(config).resolve()),
                              "recipe": recipe_name, "notes": notes},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = out / (META_FILE + ".partial")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_FILE)  # last: the directory is a checkpoint once its weights are whole
    return {"out": out, "epoch": pub_ckpt["epoch"], "tensors": len(state), "recipe": recipe_name, "notes": notes,
            "model": model_cfg}
