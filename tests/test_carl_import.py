"""Checkpoints of the published CARL code: a model with the published parameter names and shapes
(written here from reading its models/transformer.py), saved in its checkpoint format, imported,
and checked tensor by tensor and against a reference forward written from the published code."""

from __future__ import annotations

import argparse
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carl_scale.carl_code import import_carl, read_published_checkpoint
from carl_scale.models.weights import CheckpointError

YAML = """
TRAIN:
  NUM_FRAMES: 80
IMAGE_SIZE: 64
DATASETS: [baseball_pitch]
PATH_TO_DATASET: 'penn_action'
MODEL:
  BASE_MODEL: {LAYER: 3, NETWORK: Resnet50_byol, FRAMES_PER_BATCH: 40}
  EMBEDDER_MODEL:
    HIDDEN_SIZE: 256
    D_FF: 1024
    NUM_HEADS: 8
    NUM_LAYERS: 3
    CAPACITY_SCALAR: 2
    FC_LAYERS:
    - &id003 [256, true]
    - *id003
    EMBEDDING_SIZE: 128
    FC_DROPOUT_RATE: 0.1
  EMBEDDER_TYPE: transformer
  PROJECTION: true
  PROJECTION_SIZE: 128
SCL: {LABEL_VARIENCE: 10.0, SOFTMAX_TEMPERATURE: 0.1}
"""
LAYERS, WIDTH, HEADS, FFN, EMB = 3, 256, 8, 1024, 128


def published_state_dict(seed: int = 0, layer: int = 3, projection: bool = True) -> dict[str, torch.Tensor]:
    """The published TransformerModel's state dict at the YAML above: names and shapes as its code
    builds them (ResNet-50 children[:-3] as ``backbone``, layer4 as ``res_finetune``; ``embed``
    with fc_layers [Dropout, Linear, BN, ReLU] x 2, video_emb, video_encoder.enc_layers with
    separate Q/K/V linears, embedding_layer; ``ssl_projection.net``), random values."""
    from torchvision.models import resnet50

    g = torch.Generator().manual_seed(seed)
    sd = {}
    # LAYER 3: children[:-3] frozen, layer4 itself fine-tuned; LAYER 2: children[:-4] frozen,
    # Sequential(layer3, layer4) fine-tuned
    children = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"][: 7 if layer == 3 else 6]
    tuned = ["layer4"] if layer == 3 else ["layer3", "layer4"]
    for k, v in resnet50(weights=None).state_dict().items():
        top, rest = k.split(".", 1)
        if top in children:
            sd[f"backbone.{children.index(top)}.{rest}"] = v
        elif top in tuned:
            sd[f"res_finetune.{rest}" if layer == 3 else f"res_finetune.{tuned.index(top)}.{rest}"] = v

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def linear(name, cin, cout):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd(cout, cin, scale=1 / math.sqrt(cin)), rnd(cout)

    def bn(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + rnd(c), rnd(c)
        sd[f"{name}.running_mean"], sd[f"{name}.running_var"] = rnd(c), 1 + rnd(c).abs()
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    linear("embed.fc_layers.1", 2048, 512), bn("embed.fc_layers.2", 512)
    linear("embed.fc_layers.5", 512, 512), bn("embed.fc_layers.6", 512)
    linear("embed.video_emb", 512, WIDTH)
    for i in range(LAYERS):
        p = f"embed.video_encoder.enc_layers.{i}"
        for n in ("res_layer0", "res_layer1"):
            sd[f"{p}.{n}.norm.weight"], sd[f"{p}.{n}.norm.bias"] = 1 + rnd(WIDTH), rnd(WIDTH)
        for n in ("linear_Q2d", "linear_K2d", "linear_V2d", "linear_d2Q"):
            linear(f"{p}.self_att.{n}", WIDTH, WIDTH)
        linear(f"{p}.feed_forward.fc1", WIDTH, FFN), linear(f"{p}.feed_forward.fc2", FFN, WIDTH)
    linear("embed.embedding_layer", WIDTH, EMB)
    if projection:
        linear("ssl_projection.net.0", EMB, 128), bn("ssl_projection.net.1", 128)
        linear("ssl_projection.net.3", 128, EMB)
    return sd


def _easydict_module():
    """A stand-in ``easydict`` (the published config class is an EasyDict), so that the saved
    checkpoint names ``easydict.EasyDict`` exactly as the published one does."""
    mod = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, d=None):
            super().__init__()
            for k, v in (d or {}).items():
                setattr(self, k, v)

        def __setattr__(self, k, v):
            v = EasyDict(v) if isinstance(v, dict) and not isinstance(v, EasyDict) else v
            super().__setattr__(k, v)
            self[k] = v

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    mod.EasyDict = EasyDict
    return mod


def save_published(path, state, yaml_text=YAML, with_cfg=True, extra=None):
    """torch.save in the published format: epoch, model_state, optimizer_state, cfg (an EasyDict
    holding the command line as an argparse.Namespace)."""
    import yaml

    mod = _easydict_module()
    before = sys.modules.get("easydict")
    sys.modules["easydict"] = mod
    try:
        cfg = mod.EasyDict(yaml.safe_load(yaml_text))
        cfg.args = argparse.Namespace(workdir="/home/x/datasets", local_rank=0, cfg_file="c.yml")
        opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
               "param_groups": [{"lr": 1e-4, "params": [0]}]}
        torch.save({"epoch": 299, "model_state": state, "optimizer_state": opt,
                    **({"cfg": cfg} if with_cfg else {}), **(extra or {})}, path)
    finally:
        if before is None:
            del sys.modules["easydict"]
        else:
            sys.modules["easydict"] = before


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("carl")
    state = published_state_dict()
    save_published(root / "checkpoint_epoch_00299.pth", state)
    (root / "config.yml").write_text(YAML)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random ResNet-50 weights" while the model is built
        summary = import_carl(root / "checkpoint_epoch_00299.pth", root / "config.yml", root / "out")
    return root, state, summary


def test_every_published_tensor_arrives(imported):
    from carl_scale import load_model

    root, state, summary = imported
    assert summary["tensors"] == len(state) - LAYERS * (6 - 2)  # per layer Q, K, V weights and biases -> one qkv pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(root / "out")
    ours = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 27_388_608
    mapping = {"backbone.0.": "backbone.frozen.0.0.", "backbone.1.": "backbone.frozen.0.1.",
               "backbone.4.": "backbone.frozen.1.", "backbone.5.": "backbone.frozen.2.",
               "backbone.6.": "backbone.frozen.3.", "res_finetune.": "backbone.trainable.0.",
               "embed.fc_layers.": "frame_head.", "embed.video_emb.": "frame_head.8.",
               "embed.embedding_layer.": "embed.", "ssl_projection.net.": "projection."}
    seen = set()
    for k, v in state.items():
        enc = k.startswith("embed.video_encoder.")
        if enc:
            i = int(k.split(".")[3])
            name = k.split(".", 4)[4]
            blk = f"transformer.blocks.{i}."
            if "linear_" in name and "d2Q" not in name:
                part = "QKV".index(name.split("linear_")[1][0])
                rows = slice(part * WIDTH, (part + 1) * WIDTH)
                target = blk + "attn.qkv." + name.rsplit(".", 1)[1]
                assert torch.equal(ours[target][rows], v), k
                seen.add(target)
                continue
            target = blk + {"res_layer0.norm": "attn_norm", "res_layer1.norm": "ffn_norm",
                            "self_att.linear_d2Q": "attn.proj", "feed_forward.fc1": "fc1",
                            "feed_forward.fc2": "fc2"}[name.rsplit(".", 1)[0]] + "." + name.rsplit(".", 1)[1]
        else:
            pre = next(p for p in mapping if k.startswith(p))
            target = mapping[pre] + k[len(pre):]
        assert torch.equal(ours[target], v.to(ours[target].dtype)), k
        seen.add(target)
    assert seen == set(ours)  # every tensor of ours came from the checkpoint


def _published_head_reference(state, pooled: np.ndarray, train_len: int) -> np.ndarray:
    """The published forward after the backbone, in float64 NumPy, from its code's equations:
    fc_layers (BN in eval), video_emb, + PE (linspace stretch when S != train_len), pre-norm
    encoder layers with separate Q/K/V, embedding_layer."""
    w = {k: v.double().numpy() for k, v in state.items()}

    def lin(name, x):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def bn(name, x):
        return (x - w[f"{name}.running_mean"]) / np.sqrt(w[f"{name}.running_var"] + 1e-5) * w[f"{name}.weight"] \
            + w[f"{name}.bias"]

    def ln(name, x):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

    x = np.maximum(bn("embed.fc_layers.2", lin("embed.fc_layers.1", pooled)), 0)
    x = np.maximum(bn("embed.fc_layers.6", lin("embed.fc_layers.5", x)), 0)
    x = lin("embed.video_emb", x)
    s = x.shape[0]
    pos = np.arange(s) if s == train_len else np.linspace(0, train_len - 1, num=s)
    pe = np.zeros((s, WIDTH))
    for i, p in enumerate(pos):
        for c in range(WIDTH):
            pe[i, c] = math.sin(p / 10000 ** (c / WIDTH)) if c % 2 == 0 else math.cos(p / 10000 ** (c / WIDTH))
    x = x + pe
    dk = WIDTH // HEADS
    for i in range(LAYERS):
        p = f"embed.video_encoder.enc_layers.{i}"
        h = ln(f"{p}.res_layer0.norm", x)
        q, k, v = (lin(f"{p}.self_att.linear_{n}2d", h) for n in "QKV")
        heads = []
        for j in range(HEADS):
            sl = slice(j * dk, (j + 1) * dk)
            a = q[:, sl] @ k[:, sl].T / np.sqrt(dk)
            a = np.exp(a - a.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v[:, sl])
        x = x + lin(f"{p}.self_att.linear_d2Q", np.concatenate(heads, axis=1))
        h = ln(f"{p}.res_layer1.norm", x)
        x = x + lin(f"{p}.feed_forward.fc2", np.maximum(lin(f"{p}.feed_forward.fc1", h), 0))
    return lin("embed.embedding_layer", x)


def test_our_fve_computes_the_published_forward(imported):
    """Random weights, a sequence of 50 frames for a model trained at T = 80 (the positional stretch):
    our FVE's embeddings equal a float64 reference of the published forward, the backbone run by
    torchvision's ResNet-50 with the published backbone/res_finetune weights."""
    from torchvision.models import resnet50

    from carl_scale import load_model

    root, state, _ = imported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(root / "out")
    ref_net = resnet50(weights=None).eval()
    children = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    tv = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            idx, rest = k.split(".", 2)[1:]
            tv[f"{children[int(idx)]}.{rest}"] = v
        elif k.startswith("res_finetune."):
            tv[f"layer4.{k[len('res_finetune.'):]}"] = v
    ref_net.load_state_dict(tv, strict=False)  # fc is not part of it
    torch.manual_seed(0)
    frames = torch.randn(1, 50, 3, 64, 64)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(ref_net.children())[:-2])
        pooled = F.adaptive_max_pool2d(trunk(frames[0]), 1).flatten(1).double().numpy()
        got = model(frames)["embeddings"][0].double().numpy()
    want = _published_head_reference(state, pooled, train_len=80)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_identity_like_weights_give_the_positional_encoding_by_hand(tmp_path):
    """Frame features zeroed, every residual branch's output layer zeroed, the embedding layer the
    first 128 channels: the embeddings are the published encoding itself, at the stretched
    positions linspace(0, 79, 30) — checked against sin/cos written out here."""
    from carl_scale import load_model

    sd = published_state_dict(1)
    sd["embed.video_emb.weight"].zero_(), sd["embed.video_emb.bias"].zero_()
    for i in range(LAYERS):
        for n in ("self_att.linear_d2Q", "feed_forward.fc2"):
            sd[f"embed.video_encoder.enc_layers.{i}.{n}.weight"].zero_()
            sd[f"embed.video_encoder.enc_layers.{i}.{n}.bias"].zero_()
    sd["embed.embedding_layer.weight"] = torch.eye(EMB, WIDTH)
    sd["embed.embedding_layer.bias"] = torch.zeros(EMB)
    save_published(tmp_path / "c.pth", sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_carl(tmp_path / "c.pth", None, tmp_path / "out")  # the config saved in the checkpoint
        model = load_model(tmp_path / "out")
    with torch.no_grad():
        emb = model(torch.randn(1, 30, 3, 64, 64))["embeddings"][0]
    for s in (0, 1, 17, 29):
        p = s * 79 / 29
        for c in (0, 1, 2, 3, 100, 127):
            want = math.sin(p / 10000 ** (c / 256)) if c % 2 == 0 else math.cos(p / 10000 ** (c / 256))
            assert abs(emb[s, c].item() - want) < 1e-6, (s, c)


def test_what_does_not_map_is_listed_and_nothing_is_written(tmp_path):
    sd = published_state_dict()
    del sd["embed.video_encoder.enc_layers.2.self_att.linear_K2d.weight"]
    sd["embed.extra_head.weight"] = torch.zeros(3)
    sd["embed.embedding_layer.weight"] = torch.zeros(64, WIDTH)
    save_published(tmp_path / "c.pth", sd)
    with pytest.raises(CheckpointError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_carl(tmp_path / "c.pth", None, tmp_path / "out")
    msg = str(e.value)
    assert "embed.extra_head.weight" in msg and "linear_Q2d.weight" in msg and "embed.weight (64, 256) vs (128, 256)" in msg
    assert "transformer.blocks.2.attn.qkv.weight" in msg and not (tmp_path / "out").exists()


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import os

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo never > pwned.txt",))

    save_published(tmp_path / "c.pth", published_state_dict(), extra={"hook": RunsCode()})
    with pytest.raises(CheckpointError, match="system"):
        read_published_checkpoint(tmp_path / "c.pth")
    assert not (tmp_path / "pwned.txt").exists()


def test_the_yaml_must_describe_the_checkpoint(tmp_path):
    from carl_scale.config import ConfigError

    save_published(tmp_path / "c.pth", published_state_dict())
    (tmp_path / "other.yml").write_text(YAML.replace("NUM_LAYERS: 3", "NUM_LAYERS: 2"))
    with pytest.raises(ConfigError, match="num_layers 2 .YAML. vs 3 .checkpoint."):
        import_carl(tmp_path / "c.pth", tmp_path / "other.yml", tmp_path / "out")
    save_published(tmp_path / "bare.pth", published_state_dict(), with_cfg=False)
    with pytest.raises(ValueError, match="holds no config"):
        import_carl(tmp_path / "bare.pth", None, tmp_path / "out")
    (tmp_path / "conv.yml").write_text(YAML.replace("EMBEDDER_TYPE: transformer", "EMBEDDER_TYPE: conv"))
    with pytest.raises(ValueError, match="only the published transformer model"):
        import_carl(tmp_path / "bare.pth", tmp_path / "conv.yml", tmp_path / "out")
    # entries of another shape: one line naming the file, not a TypeError from inside
    (tmp_path / "null.yml").write_text("MODEL: null\n")
    flat = YAML.replace("- &id003 [256, true]\n    - *id003", "- 256\n    - 256")
    assert flat != YAML
    (tmp_path / "flat.yml").write_text(flat)  # FC_LAYERS of numbers, not [width, batch norm] pairs
    for name in ("null.yml", "flat.yml"):
        with pytest.raises(ValueError, match=rf"--config .*{name} is not a published CARL config: its MODEL section"):
            import_carl(tmp_path / "bare.pth", tmp_path / name, tmp_path / "out")
    no_scl = YAML.replace("SCL: {LABEL_VARIENCE: 10.0, SOFTMAX_TEMPERATURE: 0.1}", "SCL: null")
    assert no_scl != YAML
    (tmp_path / "scl.yml").write_text(no_scl)
    with pytest.raises(ValueError, match=r"--config .*scl.yml is not a published CARL config: its SCL section"):
        import_carl(tmp_path / "bare.pth", tmp_path / "scl.yml", tmp_path / "out")
    # a file that is a dict but no published checkpoint: its first keys, not hundreds of them
    torch.save({**{f"k{i:03d}": torch.zeros(1) for i in range(300)}, 7: torch.zeros(1)}, tmp_path / "many.pth")
    with pytest.raises(CheckpointError, match=r"a dict of 301 keys: 7, k000, .*, \.\.\.\)$"):
        read_published_checkpoint(tmp_path / "many.pth")
    # damaged in ways that were tracebacks: a model_state holding a non-tensor, a saved config that is no mapping
    torch.save({"model_state": {"embed.w": torch.zeros(1), "odd": [1, 2]}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"its model_state holds 'odd': list, not a name and a tensor"):
        read_published_checkpoint(tmp_path / "odd.pth")
    from carl_scale.carl_code import read_published_config

    with pytest.raises(ValueError, match="the config this checkpoint holds is a list"):
        read_published_config(None, [1, 2])


def test_import_into_a_run_directory_is_refused_even_with_overwrite(tmp_path):
    save_published(tmp_path / "c.pth", published_state_dict())
    run = tmp_path / "run"
    (run / "checkpoints/step_000004").mkdir(parents=True)
    (run / "checkpoints/latest").write_text("step_000004")
    with pytest.raises(FileExistsError, match="holds a training run's files \\(checkpoints\\)"):
        import_carl(tmp_path / "c.pth", None, run, overwrite=True)
    # without --overwrite too: the refusal --overwrite cannot lift comes first, not "pass --overwrite"
    with pytest.raises(FileExistsError, match="holds a training run's files"):
        import_carl(tmp_path / "c.pth", None, run)
    assert not (run / "model.pt").exists()


def test_the_imported_directory_serves_embed_and_init_from(imported, tmp_path):
    """What the issue asks of the directory: `carl-scale embed` reads it, and `--init-from` (with
    its meta.json as the config) builds the published model's config around it."""
    from carl_scale.cli import main
    from carl_scale.config import to_dict
    from carl_scale.datasets.encode import EncodeOptions, encode_video
    from launch.pretrain_k400 import parse

    root, _, summary = imported
    frames = (np.random.default_rng(0).random((12, 48, 64, 3)) * 255).astype(np.uint8)
    (tmp_path / "clip.webm").write_bytes(encode_video(frames, 25.0, EncodeOptions(codec="vp9")))
    main(["embed", str(tmp_path / "clip.webm"), "--checkpoint", str(root / "out"), "--out", str(tmp_path / "embs"),
          "--device", "cpu"])
    emb = np.load(tmp_path / "embs" / "clip.npy")
    assert emb.shape == (12, 128) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    cfg, _ = parse(["--config", str(root / "out" / "meta.json"), "--init-from", str(root / "out"), "--steps", "1"])
    assert to_dict(cfg.model) == to_dict(summary["model"]) and cfg.init_from == str(root / "out")
    assert (cfg.loss.tau, cfg.loss.sigma2, cfg.data.temporal.num_frames) == (0.1, 10.0, 80)


def test_layer2_without_projection_saved_from_ddp(tmp_path):
    """BASE_MODEL.LAYER 2 (layer3 and layer4 fine-tuned, res_finetune.0/.1), a model trained without
    a projection head, keys saved with DDP's ``module.`` prefix: imported, every tensor in place,
    the fresh projection head said so."""
    from carl_scale import load_model

    sd = published_state_dict(2, layer=2, projection=False)
    save_published(tmp_path / "c.pth", {f"module.{k}": v for k, v in sd.items()},
                   YAML.replace("LAYER: 3", "LAYER: 2").replace("PROJECTION: true", "PROJECTION: false"))
    summary = import_carl(tmp_path / "c.pth", None, tmp_path / "out")
    assert summary["model"].train_last_stages == 2 and any("no projection head" in n for n in summary["notes"])
    ours = load_model(tmp_path / "out").state_dict()
    assert torch.equal(ours["backbone.trainable.0.0.conv1.weight"], sd["res_finetune.0.0.conv1.weight"])  # layer3
    assert torch.equal(ours["backbone.trainable.1.2.bn3.running_var"], sd["res_finetune.1.2.bn3.running_var"])
    assert torch.equal(ours["backbone.frozen.2.3.conv2.weight"], sd["backbone.5.3.conv2.weight"])  # layer2
    assert torch.equal(ours["frame_head.8.bias"], sd["embed.video_emb.bias"])
