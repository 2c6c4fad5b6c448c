"""What only a GPU can check: DALI's GPU decoding against its CPU decoding, bf16 SCL against fp32,
the trainer's step against the published step on the same inputs, and a short r50 run from shards.
Skipped without CUDA (CI has none); ``scripts/device/gpu_check.sh`` runs them on a lent GPU, those
marked ``dali`` once DALI's tree has arrived there (its first call carries only the core tree)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY

from carl_scale.datasets.synthetic import write_synthetic_shards

from carl_scale.config import to_dict
from carl_scale.data.decoders import DaliDecoder, EncodedVideo
from carl_scale.data.manifest import resolve_shards
from carl_scale.data.reader import parse_meta
from carl_scale.losses import sequence_contrastive_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _videos(shards, n: int = 4) -> list[EncodedVideo]:
    import webdataset as wds

    urls, _ = resolve_shards(str(shards), "train")
    out = []
    for s in wds.tarfile_to_samples()([dict(url=u) for u in urls]):
        out.append(EncodedVideo.from_sample(s, parse_meta(s)))
        if len(out) == n:
            break
    return out


# NVDEC decodes nothing under 128 x 128 (the suite's shared fixtures are 64 x 64): the synthetic
# default size, for what must reach NVDEC.
NVDEC_SIZE = dataclasses.replace(TINY, height=128, width=160)


@pytest.fixture(scope="module")
def vp9_128_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("vp9_128")
    write_synthetic_shards(out, NVDEC_SIZE, payload="video", max_samples=2, progress=False)
    return out


@pytest.fixture(scope="module")
def jpeg_128_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("jpeg_128")
    write_synthetic_shards(out, NVDEC_SIZE, payload="jpeg", max_samples=2, progress=False)
    return out


def _same_frames(cpu, gpu) -> None:
    for c, g in zip(cpu, gpu):
        assert torch.is_tensor(g) and g.is_cuda
        diff = np.abs(np.asarray(c).astype(np.int16) - g.cpu().numpy().astype(np.int16))
        assert diff.shape == np.asarray(c).shape and diff.mean() < 1.0 and np.percentile(diff, 99) <= 4


@pytest.mark.dali
@pytest.mark.parametrize("fixture", ["vp9_128_shards", "jpeg_128_shards", "vp9_shards"])
def test_gpu_and_cpu_decoding_give_the_same_frames(request, fixture):
    """NVDEC / nvJPEG against DALI's CPU decoders; 64 x 64 video (under NVDEC's minimum) goes
    through the CPU fallback and still comes back as CUDA tensors."""
    videos = _videos(request.getfixturevalue(fixture))
    idx = [np.sort(np.random.default_rng(i).choice(v.num_frames, 12, replace=False)) for i, v in enumerate(videos)]
    cpu = DaliDecoder("cpu").decode(videos, idx)
    _same_frames(cpu, DaliDecoder("cuda", device_id=torch.cuda.current_device()).decode(videos, idx))
    if videos[0].kind == "jpeg":  # every nvJPEG setting --nvjpeg-hw-load / --nvjpeg-huffman choose
        for hw_load, huffman in ((1.0, "cpu"), (0.0, "gpu"), (0.0, "cpu")):
            dec = DaliDecoder("cuda", device_id=torch.cuda.current_device(), jpeg_hw_load=hw_load,
                              jpeg_huffman=huffman)
            _same_frames(cpu, dec.decode(videos, idx))


def test_bf16_scl_matches_fp32_within_a_stated_tolerance():
    """Projections rounded to bf16 (what the model's bf16 autocast hands the loss) change SCL by
    less than 1%: the loss itself always runs in fp32 (losses.scl.full_precision)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    z1, z2 = (torch.randn(4, 80, 128, device="cuda", generator=g) for _ in range(2))
    s = torch.sort(torch.randint(0, 300, (2, 4, 80), device="cuda", generator=g), dim=-1).values
    ref = sequence_contrastive_loss(z1, z2, s[0], s[1])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = sequence_contrastive_loss(z1.bfloat16(), z2.bfloat16(), s[0], s[1])
    assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 0.01 * ref.item()


def test_the_trainer_step_computes_the_published_steps_loss_on_the_same_inputs():
    """Same weights, same batch: the trainer's objective (bf16 autocast) and the published step
    (fp16 autocast, 40-frame trunk blocks, its SCL) agree on the loss up to the known relation
    published = ours / 2 - entropy of the targets, within 2% (two low precisions)."""
    from carl_scale.bench.published import published_forward, published_scl
    from carl_scale.bench.step import synthetic_batch
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model
    from carl_scale.train.recipes import configure, recipe

    cfg = configure(recipe("debug"), {"data.batch_size": 2, "data.temporal.num_frames": 80}, flavor="r50")
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda().eval()  # eval: dropout off, BatchNorm fixed, so both see one function
    batch = synthetic_batch(2, 80, cfg.model.image_size, torch.device("cuda"))
    with torch.no_grad():
        ours = build_objective(model, cfg.loss, autocast=torch.bfloat16)(batch)["loss"].item()
        with torch.autocast("cuda", dtype=torch.float16):
            z = published_forward(model, batch.views, batch.mask)
        pub = published_scl(z.float(), batch.timestamps, batch.mask, tau=cfg.loss.tau, sigma2=cfg.loss.sigma2).item()
    s = batch.timestamps.double()
    d2 = (s[:, :, :, None] - s[:, [1, 0], None, :]) ** 2
    w = torch.softmax(-d2 / (2 * cfg.loss.sigma2), dim=-1)
    entropy = -(w * torch.log(w.clamp_min(1e-300))).sum(-1).mean().item()
    assert pub == pytest.approx(ours / 2 - entropy, rel=0.02)


def test_cudnns_fused_frozen_stages_compute_what_the_stages_compute():
    """--fuse-frozen on a GPU: cuDNN's fused conv+bias(+add)+ReLU calls on the folded weights
    against the r50 frozen stages as modules, bf16 autocast, channels_last and not: relative error
    within bf16's (2%), and the cuDNN calls really made; in channels_last (the GPU default) all of
    them accepted (no fallback to conv2d). NCHW may fall back where cuDNN has no fused engine."""
    from carl_scale.models import fused_trunk
    from carl_scale.models.backbones import Backbone

    fused_trunk._REFUSED.clear()
    torch.manual_seed(0)
    bb = Backbone("resnet50", 1).cuda()
    for m in bb.frozen.modules():  # statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(16, 3, 224, 224, device="cuda")
    calls = []
    fused = bb.use_fused_frozen().fused
    real = torch.cudnn_convolution_relu
    torch.cudnn_convolution_relu = lambda *a: (calls.append(1), real(*a))[1]
    refused = {}
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            ref = bb.frozen(x).float()
            for layout in (torch.contiguous_format, torch.channels_last):
                if layout == torch.channels_last:
                    bb.use_channels_last()
                fused_trunk._REFUSED.clear()
                out = fused(x.contiguous(memory_format=layout), layout).float()
                assert (out - ref).norm() / ref.norm() < 0.02, layout
                refused[str(layout)] = sorted(map(str, fused_trunk._REFUSED))
    finally:
        torch.cudnn_convolution_relu = real
    assert len(calls) >= 2 * 20 and not refused["torch.channels_last"], refused  # (NCHW's, if any, shown here)


def test_the_batched_colour_augmentation_on_the_gpu_equals_the_per_view_one_on_the_cpu():
    """The GPU collate's photometric_batch against apply_photometric view by view on the CPU, at
    the training size (4 views x 16 frames x 224 px): float rounding only (cuBLAS, cuDNN)."""
    from carl_scale.data.config import SpatialConfig
    from carl_scale.data.spatial import apply_photometric, draw_view_params, photometric_batch

    cfg = SpatialConfig(image_size=224, blur_p=0.5, grayscale_p=0.3)
    rng = np.random.default_rng(0)
    for _ in range(3):
        params = [draw_view_params(256, 340, cfg, rng) for _ in range(4)]
        frames = torch.from_numpy(rng.integers(0, 256, (4, 16, 3, 224, 224), dtype=np.uint8))
        ref = torch.stack([apply_photometric(frames[i], p, cfg) for i, p in enumerate(params)])
        got = photometric_batch(frames.cuda(), params, cfg).cpu()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_the_collates_crops_on_the_gpu_equal_the_cpus_within_a_grey_level():
    """The GPU collate's crops (torchvision's resized crop and flip, view by view, on the GPU) at the
    training size against the CPU workers' (its uint8 kernel rounds differently, by a grey level)."""
    from carl_scale.data.config import SpatialConfig
    from carl_scale.data.spatial import crop_views, draw_view_params

    cfg = SpatialConfig(image_size=224)
    rng = np.random.default_rng(0)
    videos = [torch.from_numpy(rng.integers(0, 256, (32, h, w, 3), dtype=np.uint8))
              for h, w in ((256, 340), (240, 320), (256, 340))]
    pairs = [tuple(draw_view_params(v.shape[1], v.shape[2], cfg, rng) for _ in range(2)) for v in videos]
    on_gpu = crop_views([v.cuda() for v in videos], pairs, 224)
    for got, ref in zip(on_gpu, crop_views(videos, pairs, 224)):
        assert got.is_cuda and got.shape == ref.shape == (2, 16, 3, 224, 224)
        assert (got.cpu().int() - ref.int()).abs().max() <= 1


@pytest.mark.parametrize("speed", [{"parallel.compile": "off", "parallel.fuse_frozen": "off"},
                                   {"parallel.compile": "off", "parallel.fuse_frozen": "on"}, {},
                                   # the k400 recipe's negatives, eager: their mask once cost 2 syncs a step
                                   {"parallel.compile": "off", "loss.scl_negatives": "batch"}])
def test_the_trainer_step_never_waits_for_the_gpu(speed):
    """CUDA's own detection (sync debug mode "error") around the trainer's r50 step with the GPU
    defaults (bf16, channels_last, fused AdamW, no ZeRO, bf16 views, chunked frozen stages, fused
    frozen stages, the compiled objective), and eager with and without the fused stages: forward,
    flag, backward, clip, update queue without one host-device synchronization after the first
    (warm-up, compiling) step."""
    from carl_scale.bench.step import synthetic_batch
    from carl_scale.models import build_model
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.models import fused_trunk
    from carl_scale.train.engine import build_engine, engine_step, process_group

    fused_trunk._REFUSED.clear()
    cfg = configure(recipe("debug"), {"data.batch_size": 2, "data.temporal.num_frames": 16,
                                      "parallel.trunk_chunk": 40, **speed}, flavor="r50")
    with process_group() as (_, world, device):
        engine, _ = build_engine(cfg, build_model(cfg.model).to(device), total_steps=10, world=world, bf16=True)
        batch = synthetic_batch(2, 16, cfg.model.image_size, device, views_dtype=torch.bfloat16)
        engine_step(engine, batch, device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                engine_step(engine, batch, device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert not fused_trunk._REFUSED  # (no error taken for cuDNN's refusal and hidden)


@pytest.mark.dali
def test_the_gpu_loader_with_a_cpu_decoded_share_gives_the_batches_of_the_gpu_alone(jpeg_128_shards):
    """--cpu-decode-share 0.5 on a GPU: half of the videos decoded by PyAV in the workers, half by
    nvJPEG; the same videos and views as nvJPEG alone, up to the decoders' rounding."""
    from carl_scale.data.config import LoaderConfig, SpatialConfig, TemporalConfig
    from carl_scale.data.reader import VideoLoader

    def batches(share: float) -> list:
        cfg = LoaderConfig(shards=str(jpeg_128_shards), batch_size=2, num_workers=2, shuffle_buffer=4,
                           cpu_decode_share=share, finish_in="thread", temporal=TemporalConfig(num_frames=8),
                           spatial=SpatialConfig(image_size=64))
        loader = VideoLoader(cfg, device="cuda:0")
        assert (share > 0) == ("by PyAV in the workers" in loader.describe())
        out = [b for _, b in zip(range(3), loader)]
        loader.close()
        return out

    gpu, split = batches(0.0), batches(0.5)
    assert [b.video_ids for b in gpu] == [b.video_ids for b in split]
    for a, b in zip(gpu, split):
        assert b.views.is_cuda and (b.views - a.views).abs().mean() < 0.05


def test_finish_ahead_hands_over_each_lanes_cuda_work_finished_and_its_memory_kept():
    """finish_ahead's lanes on CUDA streams: the consumer's stream waits for each lane's work (a
    result read at once is the finished one, though the lane's stream is still sleeping when it
    is handed over), and the consumer's reads keep the result's memory from the lane's next
    allocation (record_stream): a long read queued on the consumer's stream still sees ``i``."""
    import dataclasses as dc

    from carl_scale.data.prefetch import finish_ahead

    @dc.dataclass
    class Out:
        x: torch.Tensor

    n = 1 << 22

    def lane(i: int) -> Out:
        torch.cuda._sleep(50_000_000)  # ~25-50 ms of GPU time on the lane's stream, before the fill
        return Out(torch.full((n,), float(i), device="cuda"))

    dev = torch.device("cuda", torch.cuda.current_device())
    sums = []
    for i, out in finish_ahead(range(12), [lane, lane, lane], 2, dev):
        assert out.x[0].item() == i  # waits on the consumer's stream only
        torch.cuda._sleep(200_000_000)  # longer than a lane: the read below runs after their next fills
        sums.append(out.x.sum())
        del out
    torch.cuda.synchronize()
    assert [int(s.item()) for s in sums] == [i * n for i in range(12)]


@pytest.mark.dali
@pytest.mark.parametrize("fixture", ["vp9_128_shards", "jpeg_128_shards"])
def test_the_gpu_loader_in_three_finishing_threads_gives_the_batches_of_one(request, fixture):
    """--finish-threads 3 on a GPU: three threads, each with its own DALI pipelines and CUDA
    stream, hand over the batches of one thread in the same order: NVDEC's frames exactly, the
    jpeg ones up to nvJPEG's rounding (its hardware and CUDA decoders share each batch)."""
    from carl_scale.data.config import LoaderConfig, SpatialConfig, TemporalConfig
    from carl_scale.data.reader import VideoLoader

    def batches(threads: int) -> list:
        cfg = LoaderConfig(shards=str(request.getfixturevalue(fixture)), batch_size=2, num_workers=2,
                           shuffle_buffer=4, finish_threads=threads, finish_in="thread",  # (its decoders here)
                           temporal=TemporalConfig(num_frames=8),
                           spatial=SpatialConfig(image_size=64))
        loader = VideoLoader(cfg, device="cuda:0")
        out = [b for _, b in zip(range(6), loader)]
        assert len({id(d) for d in loader.decoders}) == threads
        loader.close()
        return out

    one, three = batches(1), batches(3)
    assert [b.video_ids for b in one] == [b.video_ids for b in three]
    for a, b in zip(one, three):
        assert b.views.is_cuda and torch.equal(a.mask, b.mask)
        if fixture.startswith("vp9"):
            torch.testing.assert_close(b.views, a.views, rtol=0, atol=1e-5)
        else:
            assert (b.views - a.views).abs().mean() < 0.05


@pytest.mark.dali
@pytest.mark.parametrize("fixture", ["vp9_128_shards", "jpeg_128_shards"])
def test_batches_finished_in_a_process_of_their_own_are_the_threads_batches_in_this_processs_memory(request, fixture):
    """--finish-in process on a GPU: the child decodes and augments with DALI mixed and hands each
    batch over through CUDA IPC; the training process gets the batches of the threaded loader,
    in order, as its own CUDA tensors: still intact after the child is gone, and read on a
    stream of this process while the child goes on finishing the next ones."""
    from carl_scale.data.config import LoaderConfig, SpatialConfig, TemporalConfig
    from carl_scale.data.reader import VideoLoader

    def loader(where: str) -> VideoLoader:
        cfg = LoaderConfig(shards=str(request.getfixturevalue(fixture)), batch_size=2, num_workers=2,
                           shuffle_buffer=4, finish_in=where, temporal=TemporalConfig(num_frames=8),
                           spatial=SpatialConfig(image_size=64))
        return VideoLoader(cfg, device="cuda:0")

    threads = loader("thread")
    one = [b for _, b in zip(range(6), threads)]
    threads.close()
    auto = loader("auto")  # (the default: a process where a GPU decodes)
    assert auto.finish_process and "(--finish-in auto)" in auto.describe()
    auto.close()
    proc = loader("process")
    assert "CUDA IPC" in proc.describe()
    got, sums = [], []
    for _, b in zip(range(6), proc):
        torch.cuda._sleep(50_000_000)  # the step's stream busy while the child finishes the next batches
        sums.append(b.views.float().sum())
        got.append(b)
    child = proc._process._proc
    proc.close()  # the child gone: the views must be this process's copies
    # stopped mid-pass with batches sent and not received: it exits cleanly, not aborted by the
    # CUDA IPC limbo's teardown (as it was on the H200 before it left through os._exit)
    assert not child.is_alive() and child.exitcode == 0
    assert [b.video_ids for b in got] == [b.video_ids for b in one]
    for a, b, s in zip(one, got, sums):
        assert b.views.is_cuda and b.mask.is_cuda and torch.equal(a.mask, b.mask)
        torch.testing.assert_close(b.views.float().sum(), s)
        if fixture.startswith("vp9"):
            torch.testing.assert_close(b.views, a.views, rtol=0, atol=1e-5)
        else:  # (nvJPEG's hardware and CUDA decoders split a batch as they go)
            assert (b.views - a.views).abs().mean() < 0.05


@pytest.mark.dali
def test_a_corrupt_video_decoded_on_the_gpu_is_counted_and_stood_in_for(vp9_128_shards, tmp_path):
    """NVDEC given a truncated and a garbage video in the finishing step: counted, each one's
    place taken by the good video, the epoch kept (the CPU test runs the same with DALI's CPU
    decoder); the decoder goes on decoding afterwards."""
    from loader_helpers import corrupt_shard

    from carl_scale.data.config import LoaderConfig, SpatialConfig, TemporalConfig
    from carl_scale.data.manifest import read_manifest
    from carl_scale.data.reader import VideoLoader

    train = read_manifest(vp9_128_shards)["splits"]["train"]["shards"]
    good_key = corrupt_shard(vp9_128_shards / train[0]["path"], tmp_path / "bad-000000.tar")
    cfg = LoaderConfig(shards=[str(tmp_path / "bad-000000.tar")], batch_size=2, num_workers=0, shuffle_buffer=0,
                       epoch_samples=4, temporal=TemporalConfig(num_frames=8), spatial=SpatialConfig(image_size=64))
    loader = VideoLoader(cfg, device="cuda:0")
    assert loader.decoder.device == "cuda"
    batches = list(loader)
    assert [b.video_ids for b in batches] == [[good_key, good_key]] * 2 and loader.skipped == 5
    assert all(b.views.is_cuda and torch.isfinite(b.views).all() for b in batches)
    loader.close()


@pytest.mark.slow
@pytest.mark.dali
def test_a_20_step_r50_run_from_shards_on_the_gpu(vp9_128_shards, tmp_path):
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.trainer import run

    cfg = configure(recipe("debug"), {"data.shards": str(vp9_128_shards), "run_dir": str(tmp_path / "run"),
                                      "steps": 20, "data.batch_size": 2, "data.temporal.num_frames": 16,
                                      "data.num_workers": 2, "eval.enabled": False}, flavor="r50")
    summary = run(cfg)
    assert summary["steps"] == 20 and np.isfinite(summary["final_loss"]) and summary["samples_per_s"] > 0
    assert (tmp_path / "run/checkpoints/step_000020/model.pt").exists()
    assert to_dict(cfg)["model"]["flavor"] == "r50"


def test_the_step_on_a_high_priority_stream_trains_as_the_default_one(vp9_128_shards, tmp_path):
    """--step-priority high: the same steps on a stream of their own, ordered after the weights'
    set-up and before what follows (the checkpoint, the summary)."""
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.trainer import run

    losses = {}
    for priority in ("default", "high"):
        cfg = configure(recipe("debug"), {"data.shards": str(vp9_128_shards), "run_dir": str(tmp_path / priority),
                                          "steps": 4, "data.batch_size": 2, "data.temporal.num_frames": 8,
                                          "data.num_workers": 1, "eval.enabled": False, "log_every": 1,
                                          "data.decoder": "pyav",  # (no DALI in the first device call)
                                          "parallel.step_priority": priority})
        losses[priority] = run(cfg)["final_loss"]
        assert (tmp_path / priority / "checkpoints/step_000004/model.pt").exists()
    assert np.isfinite(losses["high"]) and abs(losses["high"] - losses["default"]) <= 1e-3 * abs(losses["default"])


# last of the file (pytest runs in file order): its three r50 compiles take the longest, so a
# gpu_check stage cut by its time limit loses this one rather than the quick checks above
def test_the_compiled_channels_last_step_computes_the_eager_steps_loss():
    """--compile trunk, --compile objective, --fuse-frozen and the GPU defaults (channels_last,
    cudnn.benchmark, both of those) against the eager, contiguous step: same weights, same batch,
    eval mode; the loss within bf16 rounding (1%). The GPU defaults' backward too (the compiled
    backward graph, channels_last gradients): the trained weights' gradients against the eager
    step's, cosine > 0.99 and norms within 2% (bf16 autocast in both; only two of the six
    configurations, each backward compile costs the lent GPU's minutes)."""
    from carl_scale.bench.step import synthetic_batch
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.engine import apply_speedups

    over = {"data.batch_size": 2, "data.temporal.num_frames": 32}
    eager = {"parallel.compile": "off", "parallel.fuse_frozen": "off"}
    batch = synthetic_batch(2, 32, 224, torch.device("cuda"))
    losses, grad_sets = [], []
    for extra in ({**eager, "parallel.channels_last": "off"}, {**eager, "parallel.compile": "trunk"},
                  {**eager, "parallel.compile": "objective"}, {**eager, "parallel.fuse_frozen": "on"},
                  {**eager, "parallel.fuse_frozen": "on", "parallel.channels_last": "off"},
                  {}):  # the GPU defaults: channels_last, the fused frozen stages, the compiled objective
        cfg = configure(recipe("debug"), {**over, **extra}, flavor="r50")
        torch.manual_seed(0)
        model = build_model(cfg.model).cuda().eval()
        objective = build_objective(model, cfg.loss, autocast=torch.bfloat16)
        apply_speedups(model, cfg, objective)
        if not extra or not losses:  # the eager contiguous step (first) and the GPU defaults (last): backward too
            loss = objective(batch)["loss"]
            loss.backward()
            grad_sets.append(torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None]))
            losses.append(loss.item())
        else:
            with torch.no_grad():
                losses.append(objective(batch)["loss"].item())
    assert all(loss == pytest.approx(losses[0], rel=0.01) for loss in losses[1:]), losses
    eager_grads, default_grads = grad_sets
    cosine = torch.nn.functional.cosine_similarity(eager_grads, default_grads, dim=0).item()
    assert eager_grads.numel() == default_grads.numel() and cosine > 0.99, cosine
    assert default_grads.norm().item() == pytest.approx(eager_grads.norm().item(), rel=0.02)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_compiled_step_with_cuda_graphs_on_padded_batches_computes_the_eager_steps_loss_and_gradients(precision):
    """Videos shorter than a view (Kinetics at T = 240 has them) make padded batches, whose trained
    BatchNorms take statistics over the marked rows at a fixed shape (masked_norm.py): on the CPU
    that path compiles to 2 graphs and no break (tests/test_model.py); here Inductor's CUDA code
    and CUDA graphs (--compile-mode reduce-overhead) run it, padded and unpadded batches in turn
    (graphs recorded, then replayed). Training mode (the masked statistics), no dropout, float32,
    the same weights: each loss and the trained weights' gradients against the eager step's, in
    float32 and under bf16 autocast with bf16 views (as a GPU run trains: masked_norm.py's casts)."""
    from carl_scale.bench.step import synthetic_batch
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.engine import apply_speedups

    t = 16
    torch._dynamo.utils.counters.clear()
    over = {"data.batch_size": 2, "data.temporal.num_frames": t, "model.image_size": 64, "model.dropout": 0.0}
    bf16 = precision == "bf16"
    base = synthetic_batch(2, t, 64, torch.device("cuda"), views_dtype=torch.bfloat16 if bf16 else torch.float32)
    tol = {"loss": 2e-2, "cosine": 0.99, "norm": 0.05} if bf16 else {"loss": 1e-3, "cosine": 0.999, "norm": 0.01}
    steps = {}
    for how in ({"parallel.compile": "off"}, {"parallel.compile": "objective", "parallel.compile_mode": "reduce-overhead"}):
        cfg = configure(recipe("debug"), {**over, **how})
        torch.manual_seed(0)
        model = build_model(cfg.model).cuda().train()
        objective = build_objective(model, cfg.loss, autocast=torch.bfloat16 if bf16 else None)
        apply_speedups(model, cfg, objective)
        steps[how["parallel.compile"]] = []
        for valid in (t, 12, 5, t, 9, 12):
            mask = base.mask.clone()
            mask[1, :, valid:] = False
            batch = dataclasses.replace(base, mask=mask, padded=valid < t)
            torch.compiler.cudagraph_mark_step_begin()  # (as engine_step: a new step, graph outputs may be reused)
            model.zero_grad(set_to_none=True)
            loss = objective(batch)["loss"]
            loss.backward()
            grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
            steps[how["parallel.compile"]].append((loss.item(), grads.float().clone()))
    # the graphs ran: Inductor falls back to plain compiled code with only a log line when it cannot
    # record one (an input mutated, a CPU tensor), which would pass the checks below untested
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], dict(torch._dynamo.utils.counters["inductor"])
    for k, ((eager_loss, eager_grads), (loss, grads)) in enumerate(zip(steps["off"], steps["objective"])):
        assert loss == pytest.approx(eager_loss, rel=tol["loss"]), (k, loss, eager_loss)
        cosine = torch.nn.functional.cosine_similarity(eager_grads, grads, dim=0).item()
        assert grads.numel() == eager_grads.numel() and cosine > tol["cosine"], (k, cosine)
        assert grads.norm().item() == pytest.approx(eager_grads.norm().item(), rel=tol["norm"]), k
