"""The frame-level video encoder: shapes, frozen stages, any length, weights from a local file."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch

from carl_scale.models import FLAVORS, build_model, model_config
from carl_scale.models.backbones import Backbone


def test_flavors_registry():
    assert {"debug", "r50"} <= set(FLAVORS)
    r50 = model_config("r50")
    assert (r50.backbone, r50.train_last_stages, r50.width, r50.num_layers, r50.num_heads, r50.embed_dim) == \
        ("resnet50", 1, 256, 3, 8, 128)
    assert model_config("r50", num_layers=2).num_layers == 2
    with pytest.raises(KeyError, match="unknown flavor"):
        model_config("nope")


def test_shapes_masks_and_class_token():
    torch.manual_seed(0)
    m = build_model(model_config("debug", class_token=True, num_classes=5))
    x = torch.randn(3, 10, 3, 64, 64)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    out = m(x, mask)
    assert out["embeddings"].shape == (3, 10, 64) and out["logits"].shape == (3, 5)
    assert m.project(out["embeddings"]).shape == (3, 10, 64)
    # padded frames do not influence valid ones (eval mode: no dropout, fixed BN)
    m.eval()
    a = m(x, mask)["embeddings"][1, :7]
    x2 = x.clone()
    x2[1, 7:] = torch.randn_like(x2[1, 7:]) * 10
    torch.testing.assert_close(m(x2, mask)["embeddings"][1, :7], a, atol=1e-5, rtol=1e-5)


def test_a_readout_class_token_leaves_the_frame_embeddings_as_they_were():
    """``class_token_attention="readout"``: the class token reads the frames and no frame attends
    to it, so a warm start's frame embeddings are exactly preserved, padding included, while the
    classifier's gradient still reaches the frame encoder. "both" (the default, and what a saved
    class-token config without the field had) lets frames see the token."""
    from carl_scale.config import to_dict
    from carl_scale.models.flavors import model_config_from_dict

    torch.manual_seed(0)
    plain = build_model(model_config("debug", image_size=32)).eval()
    x = torch.randn(2, 7, 3, 32, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    want = plain(x, mask)["embeddings"]
    for attention, same in (("both", False), ("readout", True)):
        m = build_model(model_config("debug", image_size=32, class_token=True, num_classes=3,
                                     class_token_attention=attention))
        m.load_state_dict(plain.state_dict(), strict=False)
        m.eval()
        got = m(x, mask)["embeddings"]
        assert torch.allclose(got[mask], want[mask], atol=1e-5) == same, attention
    m.train()  # the readout one
    torch.nn.functional.cross_entropy(m(x, mask)["logits"], torch.tensor([0, 2])).backward()
    assert m.transformer.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert sum(float(q.grad.abs().sum()) for q in m.frame_head.parameters() if q.grad is not None) > 0  # the frames
    saved = to_dict(model_config("debug", class_token=True, num_classes=3))
    del saved["class_token_attention"]
    assert model_config_from_dict(saved).class_token_attention == "both"


def test_padded_frames_never_enter_batchnorm_statistics():
    """Training mode: what a padded slot holds changes neither the BatchNorm running statistics of
    the backbone, frame head and projection head, nor the batch statistics valid frames see."""
    x = torch.randn(2, 6, 3, 32, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False

    def step(frames):
        torch.manual_seed(0)
        m = build_model(model_config("debug", image_size=32, dropout=0.0)).train()
        out = m(frames, mask)
        z = m.project(out["embeddings"], mask)
        stats = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
        return stats, z[mask], out["embeddings"][mask]

    garbage = x.clone()
    garbage[0, 4:] = 1e3
    (s1, z1, e1), (s2, z2, e2) = step(x), step(garbage)
    assert len(s1) > 10 and all(torch.equal(s1[k], s2[k]) for k in s1)
    torch.testing.assert_close(z1, z2)
    torch.testing.assert_close(e1, e2)
    # and the statistics are those of the valid frames alone
    torch.manual_seed(0)
    m = build_model(model_config("debug", image_size=32, dropout=0.0)).train()
    m(torch.cat([x[0, :4], x[1]])[None])
    assert all(torch.allclose(m.state_dict()[k], s1[k]) for k in s1 if "frame_head" in k or "backbone" in k)


@pytest.mark.parametrize("dim", [1, 2])
def test_row_masked_batchnorm_is_batchnorm_on_the_marked_rows(dim):
    """masked_norm's BatchNorm, every row in at a fixed shape, against a plain BatchNorm run on the
    marked rows alone: outputs of the marked rows, running statistics and every gradient (input,
    weight, bias); the unmarked rows (here inf, NaN and huge) change none of them. bf16 input (as
    under autocast) gets float32 statistics and a bf16 output."""
    from carl_scale.models.masked_norm import make_row_maskable

    torch.manual_seed(0)
    cls = torch.nn.BatchNorm1d if dim == 1 else torch.nn.BatchNorm2d
    ref = cls(5, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
    masked = copy.deepcopy(ref)
    (bn,) = make_row_maskable(masked)
    assert bn is masked and isinstance(bn, cls) and list(bn.state_dict()) == list(ref.state_dict())
    x = torch.randn(7, 5, *([3, 4] if dim == 2 else [])) * 2 + 1
    rows = torch.tensor([True, False, True, True, False, True, True])
    x[1], x[4] = float("inf"), float("nan")
    xr, xm = x[rows].clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    for _ in range(2):  # (running statistics after two updates)
        want = ref(xr)
        masked.carl_rows = rows
        got = masked(xm)
        masked.carl_rows = None
    (want * g[rows]).sum().backward()
    (torch.where(rows.view(-1, *[1] * (x.dim() - 1)), got, 0.0) * g).sum().backward()
    torch.testing.assert_close(got[rows], want)
    torch.testing.assert_close(xm.grad[rows], xr.grad)
    assert torch.equal(xm.grad[~rows], torch.zeros_like(xm.grad[~rows]))
    for a, b in ((masked.weight.grad, ref.weight.grad), (masked.bias.grad, ref.bias.grad),
                 (masked.running_mean, ref.running_mean), (masked.running_var, ref.running_var)):
        torch.testing.assert_close(a, b)
    assert int(masked.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    half = copy.deepcopy(masked)  # (a training-mode call moves the running statistics again)
    half.carl_rows = rows
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out[rows]).all()
    masked.eval()  # eval mode: the running statistics, row by row, whatever the mask
    torch.testing.assert_close(masked(x[rows]), ref.eval()(x[rows]))


def test_a_compiled_step_on_padded_batches_is_one_graph_without_breaks():
    """--compile objective on padded batches (short videos): fixed shapes through the encoder (the
    row-masked BatchNorms, no branch on the mask), so one graph for padded batches and one for
    unpadded ones, however many valid frames each has, and no graph break; the loss is the eager
    step's."""
    import dataclasses

    from carl_scale.bench.step import synthetic_batch
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.engine import build_engine, process_group

    small = {"data.batch_size": 2, "data.temporal.num_frames": 8, "model.image_size": 32,
             "model.train_last_stages": 1, "model.dropout": 0.0}
    losses = {}
    with process_group() as (_, world, device):
        base = synthetic_batch(2, 8, 32, device)
        for how in ("off", "objective"):
            torch.manual_seed(0)
            cfg = configure(recipe("debug"), {**small, "parallel.compile": how})
            engine, _ = build_engine(cfg, build_model(cfg.model), total_steps=1, world=world, bf16=False)
            engine.train()  # (batch statistics in the trained BatchNorms: the masked ones)
            torch._dynamo.utils.counters.clear()
            losses[how] = []
            for valid in (8, 6, 3, 8, 5):
                mask = base.mask.clone()
                mask[1, :, valid:] = False
                batch = dataclasses.replace(base, mask=mask, padded=valid < 8)
                with torch.no_grad():
                    losses[how].append(engine(batch)["loss"])
            if how == "objective":
                breaks = torch._dynamo.utils.counters["graph_break"]
                assert not breaks, dict(breaks)
                assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(torch.stack(losses["objective"]), torch.stack(losses["off"]), rtol=1e-4, atol=1e-5)
    del engine
    gc.collect()  # (the compiled engines' cyclic garbage, freed in a later test's forked child, crashed it)


def test_frozen_stages_get_no_grad_and_keep_bn_statistics():
    torch.manual_seed(0)
    m = build_model(model_config("debug", train_last_stages=1))
    m.train()
    frozen = m.backbone.frozen
    assert len(frozen) == 3 and not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training and m.backbone.trainable.training
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    out = m(torch.randn(2, 6, 3, 64, 64))["embeddings"]
    m.project(out).sum().backward()
    after = frozen.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # running_mean/var/num_batches too
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None for p in m.backbone.trainable.parameters())


def test_any_video_length_and_chunking_is_exact():
    torch.manual_seed(0)
    m = build_model(model_config("debug", backbone_chunk=7)).eval()
    for s in (1, 5, 32, 91):
        e = m.embed_video(torch.randn(s, 3, 64, 64))
        assert e.shape == (s, 64)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(s))
    video = torch.randn(50, 3, 64, 64)
    whole = torch.nn.functional.normalize(m(video[None])["embeddings"][0], dim=-1)
    torch.testing.assert_close(m.embed_video(video), whole, atol=1e-5, rtol=1e-5)
    # positions of a longer video are stretched onto the training range
    pos = m.default_positions(1, 91, "cpu")
    assert pos[0, 0] == 0 and pos[0, -1] == 31.0


def test_resnet50_weights_from_local_file(tmp_path):
    from torchvision.models import resnet50

    ref = resnet50(weights=None)
    plain = tmp_path / "r50.pth"
    torch.save(ref.state_dict(), plain)
    # sthalles/PyTorch-BYOL's file: the ResNet as a Sequential of its children (0 conv1, 1 bn1, 4-7
    # layer1-4, no fc) under encoder., beside its projection head ("projetion", sic)
    numbered = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    byol = tmp_path / "byol.pth"
    torch.save({"online_network_state_dict": {
        **{f"encoder.{numbered[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in ref.state_dict().items()
           if not k.startswith("fc.")},
        "projetion.net.0.weight": torch.zeros(512, 2048), "projetion.net.0.bias": torch.zeros(512)}}, byol)
    # a state dict saved without BatchNorm's num_batches_tracked (torchvision's own older files)
    untracked = tmp_path / "untracked.pth"
    torch.save({k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}, untracked)
    # the published code's BYOL file: {"model": module.encoder.* and the momentum copy module.encoder_k.*}
    published = tmp_path / "published_byol.pth"
    torch.save({"model": {**{f"module.encoder.{k}": v for k, v in ref.state_dict().items()},
                          **{f"module.encoder_k.{k}": v * 0 for k, v in ref.state_dict().items()}}}, published)
    for path in (plain, byol, published, untracked):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "random weights" warning when a file is given
            bb = Backbone("resnet50", 1, str(path))
        torch.testing.assert_close(bb.frozen[0][0].weight, ref.conv1.weight)
        torch.testing.assert_close(bb.trainable[0][0].conv1.weight, ref.layer4[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="not found"):
        Backbone("resnet50", 1, str(tmp_path / "missing.pth"))
    with pytest.warns(UserWarning, match="random weights"):
        Backbone("resnet50", 1, None)
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a ResNet-50"):
        Backbone("resnet50", 1, str(tmp_path / "bad.pth"))


def test_r50_has_the_published_parameter_count():
    """27,388,608 = the published TransformerModel at its PennAction config (ResNet-50 with layer4
    trained, 3 layers, projection head); 18,845,312 of them trained."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random ResNet-50 weights
        m = build_model(model_config("r50"))
    assert sum(p.numel() for p in m.parameters()) == 27_388_608
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 18_845_312


def test_checkpoints_of_the_nn_transformer_encoder_era_compute_what_they_did():
    """Checkpoints written before the encoder became the published one (nn.TransformerEncoder,
    sines/cosines in halves, a final LayerNorm) load by name, keep their parameter order (which
    DeepSpeed's optimizer state follows) and compute the same as the old module."""
    import math

    from carl_scale.models.flavors import model_config_from_dict
    from carl_scale.models.transformer import upgrade_legacy_keys
    from carl_scale.config import to_dict

    saved = to_dict(model_config("debug"))
    del saved["pos_encoding"], saved["final_norm"]  # what an old meta.json holds
    cfg = model_config_from_dict(saved)
    assert (cfg.pos_encoding, cfg.final_norm) == ("halves", True)
    torch.manual_seed(0)
    old = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(cfg.width, cfg.num_heads, cfg.ffn_width, 0.0, batch_first=True,
                                         norm_first=True),
        cfg.num_layers, norm=torch.nn.LayerNorm(cfg.width), enable_nested_tensor=False).eval()
    for p in old.parameters():  # not the default init, so that biases and norms matter too
        torch.nn.init.normal_(p, std=0.2)
    new = build_model(cfg).eval()
    old_names = [f"transformer.{k}" for k, _ in old.named_parameters()]
    renamed = list(upgrade_legacy_keys({k: 0 for k in old_names}))
    assert renamed == [k for k, _ in new.named_parameters() if k.startswith("transformer.")]
    state = new.state_dict()
    state.update(upgrade_legacy_keys({f"transformer.{k}": v for k, v in old.state_dict().items()}))
    new.load_state_dict(state)

    feats = torch.randn(2, 9, cfg.width)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    pos = torch.arange(9.0)
    half = cfg.width // 2
    ang = pos[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    pe = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    want = old(feats + pe, src_key_padding_mask=~mask)
    got = new.transformer(feats, pos.expand(2, 9), mask)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_fused_attention_equals_the_published_explicit_softmax():
    """Our encoder (packed QKV through scaled_dot_product_attention) computes what the published
    code's explicit per-head softmax over three Q/K/V linears computes, padded keys included."""
    from carl_scale.bench.published import published_encoder

    torch.manual_seed(0)
    m = build_model(model_config("debug")).eval()
    # 11 frames: positions stretched onto the training range; train_frames: the table's own positions
    for frames in (11, m.cfg.train_frames):
        feats = torch.randn(2, frames, m.cfg.width)
        keep = torch.ones(2, frames, dtype=torch.bool)
        keep[0, 8:] = False
        with torch.no_grad():
            ours = m.encode_sequence(feats, keep)["embeddings"]
            ref = published_encoder(m, feats, keep)
        torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_resuming_an_old_run_with_todays_architecture_is_refused(tmp_path):
    """An old run's meta.json has no pos_encoding/final_norm: resuming it with a config that builds
    the published architecture would silently change what its weights compute, so it is refused
    (its own --config meta.json restores the old architecture and resumes)."""
    from carl_scale.config import ConfigError, to_dict
    from carl_scale.train import checkpoint as ckpt
    from carl_scale.train.recipes import load_run_config, recipe

    now = to_dict(recipe("debug"))
    old = {**now, "model": {k: v for k, v in now["model"].items() if k not in ("pos_encoding", "final_norm")}}
    with pytest.raises(ConfigError, match="pos_encoding halves .now interleaved."):
        ckpt.check_resume(tmp_path, {"config": old, "world_size": 1}, now, 1)
    (tmp_path / "meta.json").write_text(__import__("json").dumps({"config": old}))
    own = to_dict(load_run_config(str(tmp_path / "meta.json")))
    ckpt.check_resume(tmp_path, {"config": old, "world_size": 1}, own, 1)  # its own config: accepted
    assert (own["model"]["pos_encoding"], own["model"]["final_norm"]) == ("halves", True)


def test_trunk_chunks_are_equal_calls_written_into_one_buffer():
    """--trunk-chunk N: ceil(n / N) calls of the frozen stages of equal size (within one frame, so
    no small remainder call), each written into one output buffer; the same values as one call,
    also in channels_last."""
    torch.manual_seed(0)
    m = build_model(model_config("debug", train_last_stages=1)).train()
    sizes = []
    m.backbone.frozen.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    frames = torch.randn(22, 3, 32, 32)
    whole = m.backbone(frames)
    for chunk, calls in ((22, [22]), (100, [22]), (8, [7, 7, 8]), (11, [11, 11]), (1, [1] * 22)):
        sizes.clear()
        torch.testing.assert_close(m.backbone(frames, chunk), whole, atol=1e-5, rtol=1e-5)
        assert sizes == calls, (chunk, sizes)
    m.backbone.use_channels_last()
    out = m.backbone(frames, 8)
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in m.backbone.parameters() if p.dim() == 4)


@pytest.mark.filterwarnings("ignore:ResNet-50 backbone starts from random weights")
@pytest.mark.parametrize("kind", ["debug", "r50"])
def test_fused_frozen_stages_compute_what_the_stages_compute_and_refold_after_a_load(kind):
    """--fuse-frozen on: BatchNorm folded into each convolution, the add and ReLU after it, equal
    to the frozen stages (float32, NCHW and channels_last), close under bf16 autocast; new weights
    (a load writes them in place) are folded again; the state dict is unchanged."""
    from carl_scale.models.backbones import Backbone

    torch.manual_seed(0)
    bb = Backbone("debug_cnn" if kind == "debug" else "resnet50", 1)
    for m in bb.frozen.modules():  # BatchNorms with statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(3, 3, 64 if kind == "debug" else 96, 64 if kind == "debug" else 96)
    keys = list(bb.state_dict())

    def close(a, b):  # float32 rounding of the folded weights, accumulated over up to 40 convolutions
        assert (a - b).norm() / b.norm() < 1e-5 and (a - b).abs().max() < 1e-3 * b.abs().max()

    with torch.no_grad():
        ref = bb.frozen(x)
        fused = bb.use_fused_frozen().fused
        close(fused(x), ref)
        assert list(bb.state_dict()) == keys
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fused(x)
        assert low.dtype == torch.bfloat16
        assert (low.float() - ref).norm() / ref.norm() < 0.03
        bb.use_channels_last()
        cl = x.contiguous(memory_format=torch.channels_last)
        out = fused(cl, torch.channels_last)
        close(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last)
        other = {k: v * 1.1 if v.is_floating_point() else v for k, v in bb.frozen.state_dict().items()}
        bb.frozen.load_state_dict(other)
        close(fused(x), bb.frozen(x))
        # through the backbone, in chunks
        bb.eval()
        close(bb(x, chunk=2), Backbone.forward(_unfused(bb), x, chunk=2))


def _unfused(bb):
    import copy

    plain = copy.copy(bb)
    plain.fused = None
    return plain


@pytest.mark.parametrize("refusal", ["cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",  # building the graph failed
                                     "GET was unable to find an engine to execute this computation",
                                     "FIND was unable to find an engine to execute this computation"])  # benchmark
def test_fused_frozen_stages_fall_back_where_cudnn_refuses_to_fuse(monkeypatch, refusal):
    """cuDNN's fused calls are known to refuse some dtype/layout combinations (PyTorch words it in
    the three ways above): each refused convolution then runs as conv2d + add + ReLU (same values),
    with one warning, and is not tried again; any other error is raised."""
    from carl_scale.models import fused_trunk
    from carl_scale.models.backbones import Backbone

    torch.manual_seed(0)
    bb = Backbone("debug_cnn", 1)
    x = torch.randn(2, 3, 64, 64)
    fused = bb.use_fused_frozen().fused
    with torch.no_grad():
        ref = fused(x)
        tried = []

        def refuse(*a):
            tried.append(1)
            raise RuntimeError(refusal)

        monkeypatch.setattr(torch, "cudnn_convolution_relu", refuse)
        monkeypatch.setattr(torch, "cudnn_convolution_add_relu", refuse)
        monkeypatch.setattr(fused_trunk, "_REFUSED", set())
        fused.cudnn = True
        with pytest.warns(UserWarning, match="cuDNN refused a fused convolution") as caught:
            torch.testing.assert_close(fused(x), ref)
        assert len(caught) == 1 and refusal in str(caught[0].message)
        n = len(tried)
        torch.testing.assert_close(fused(x), ref)
        assert n > 5 and len(tried) == n  # refused once each, then not tried again
        fused_trunk._REFUSED.clear()  # any other error (out of memory, a sync trap) stays an error

        def fail(*a):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(torch, "cudnn_convolution_relu", fail)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            fused(x)
        assert not fused_trunk._REFUSED


def test_fuse_frozen_refuses_modules_it_does_not_know():
    from carl_scale.models.fused_trunk import fuse_stages

    with pytest.raises(ValueError, match="--fuse-frozen: cannot fuse a GELU"):
        fuse_stages(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GELU()))
    with pytest.raises(ValueError, match="folds only zero-padded convolutions"):
        fuse_stages(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, affine=False)))
    with pytest.raises(ValueError, match="folds only zero-padded convolutions"):
        fuse_stages(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                                        torch.nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="without a BatchNorm2d"):
        fuse_stages(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
