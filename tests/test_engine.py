"""The trainer's engine and its one step (carl_scale/train/engine.py): the schedule, DeepSpeed's
config, the speed switches against the default path, bf16 views, clipping, the step's host reads,
the on-device non-finite skip, and the objective's forward on fake CUDA tensors."""

from __future__ import annotations

import pytest
import torch

from carl_scale.config import ConfigError
from carl_scale.train.config import ParallelConfig, RunConfig
from carl_scale.train.engine import deepspeed_config, lr_lambda
from carl_scale.train.recipes import configure


def test_lr_schedule_is_warmup_then_cosine():
    assert lr_lambda(0, 100, 10, 0.0) == pytest.approx(1 / 11)
    assert lr_lambda(9, 100, 10, 0.0) == pytest.approx(10 / 11)  # below the peak: it comes once, at step 10
    assert lr_lambda(10, 100, 10, 0.0) == pytest.approx(1.0) and lr_lambda(11, 100, 10, 0.0) < 1.0
    assert lr_lambda(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_lambda(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_lambda(0, 100, 0, 0.0) == pytest.approx(1.0)


def test_global_batch_size_is_checked_with_a_clear_error():
    cfg = RunConfig(parallel=ParallelConfig(grad_accum=2, global_batch_size=16))
    cfg = configure(cfg, {"data.batch_size": 4})
    with pytest.raises(ValueError, match=r"--batch-size 4 x --grad-accum 2 x world size 3 = 24"):
        deepspeed_config(cfg, world=3)
    assert deepspeed_config(cfg, world=2)["train_batch_size"] == 16
    with pytest.raises(ConfigError, match=r"--global-batch-size \(12\) must be a multiple of --batch-size"):
        configure(cfg, {"parallel.global_batch_size": 12})
    # bf16 is autocast around fp32 weights: the engine itself never holds low-precision weights
    assert deepspeed_config(configure(cfg, {"parallel.precision": "bf16"}), world=2)["bf16"] == {"enabled": False}


@pytest.mark.parametrize("switch", [{"parallel.channels_last": "on"}, {"parallel.compile": "trunk"},
                                    {"parallel.compile": "objective"}, {"parallel.trunk_chunk": 5},
                                    {"parallel.fuse_frozen": "on"},
                                    {"parallel.fuse_frozen": "on", "parallel.compile": "objective"},
                                    {"parallel.fuse_frozen": "on", "parallel.compile": "trunk"}])
def test_speed_switches_change_neither_the_loss_nor_the_gradients_nor_the_state_dict(switch):
    """--channels-last on, --compile trunk / objective, --trunk-chunk and --fuse-frozen (a GPU run's levers)
    compute the step the default CPU path computes: same loss and gradients to float32 rounding,
    same state-dict keys (checkpoints stay interchangeable)."""
    from carl_scale.bench.step import synthetic_batch
    from carl_scale.models import build_model
    from carl_scale.train.recipes import recipe
    from carl_scale.train.engine import build_engine, process_group, resolve_speedups

    # three frozen stages: what --trunk-chunk and --fuse-frozen act on (the debug recipe trains all four)
    small = {"data.batch_size": 2, "data.temporal.num_frames": 8, "model.image_size": 32, "model.train_last_stages": 1}
    cfg = configure(recipe("debug"), small)
    fast = configure(recipe("debug"), {**small, **switch})
    results = []
    with process_group() as (_, world, device):
        batch = synthetic_batch(2, 8, 32, device)
        for c in (cfg, fast):
            torch.manual_seed(0)
            engine, _ = build_engine(c, build_model(c.model), total_steps=1, world=world, bf16=False)
            assert len(engine.module.model.backbone.frozen) == 3
            assert (engine.module.model.backbone.fused is not None) == resolve_speedups(c, device)[1]
            torch._dynamo.utils.counters.clear()
            engine.eval()
            loss = engine(batch)["loss"]
            engine.backward(loss)
            grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None}
            results.append((loss.detach(), grads, list(engine.module.model.state_dict())))
    if resolve_speedups(fast, device)[2] != "off":  # one graph per compiled part, none broken
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    (l0, g0, k0), (l1, g1, k1) = results
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6) and k0 == k1 and g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-5), n


def test_bf16_views_give_the_step_the_same_values_as_float32_views():
    """A bf16 run's loader delivers bf16 views (half the memory): under bf16 autocast the trunk's
    first convolution casts float32 views to exactly those values, so loss and gradients are
    identical, bit for bit (here with the CPU's bf16 autocast)."""
    from carl_scale.bench.step import synthetic_batch
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model
    from carl_scale.train.recipes import recipe

    cfg = configure(recipe("debug"), {"data.batch_size": 2, "data.temporal.num_frames": 8, "model.image_size": 32,
                                      "model.train_last_stages": 1})  # frozen stages in 3 chunks, as r50's
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        objective = build_objective(build_model(cfg.model), cfg.loss, autocast=torch.bfloat16, trunk_chunk=11).train()
        loss = objective(synthetic_batch(2, 8, 32, torch.device("cpu"), views_dtype=dtype))["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in objective.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and len(g0) == len(g1) > 10
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_channels_last_with_zero_is_refused_when_the_config_is_built():
    """ZeRO 1/2 keep weights as views of a flat buffer, which a channels_last copy would leave
    (DeepSpeed then fails on the first backward: seen on the CPU)."""
    from carl_scale.train.recipes import recipe

    with pytest.raises(ConfigError, match="--channels-last"):
        configure(recipe("debug"), {"parallel.channels_last": "on", "parallel.zero_stage": 1})
    with pytest.raises(ConfigError, match="--compile-mode.*needs --compile auto, trunk or objective"):
        configure(recipe("debug"), {"parallel.compile_mode": "reduce-overhead", "parallel.compile": "off"})
    with pytest.raises(ConfigError, match="--compile-mode.*goes with --compile objective"):
        configure(recipe("debug"), {"parallel.compile_mode": "reduce-overhead", "parallel.compile": "trunk"})

    configure(recipe("debug"), {"parallel.channels_last": "on", "parallel.zero_stage": 0})


def test_the_speedups_auto_values_resolve_per_device_and_zero_stage():
    """auto: channels_last, the fused frozen stages and the compiled objective on a GPU (each
    measured faster there: BENCHMARKS.md), none on the CPU; ZeRO keeps the weights contiguous and
    the step eager (untested compiled), as does the weak objective."""
    from carl_scale.train.recipes import recipe
    from carl_scale.train.engine import resolve_speedups

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cfg = configure(recipe("debug"), {})
    assert (cfg.parallel.channels_last, cfg.parallel.fuse_frozen, cfg.parallel.compile) == ("auto", "auto", "auto")
    assert resolve_speedups(cfg, cpu) == (False, False, "off")
    assert resolve_speedups(cfg, gpu) == (True, True, "objective")
    zero = configure(recipe("debug"), {"parallel.zero_stage": 1})
    assert resolve_speedups(zero, gpu) == (False, True, "off")
    weak = configure(recipe("debug"), {}, weak=True)  # (compiled: measured for SCL only)
    assert weak.loss.name == "weak" and resolve_speedups(weak, gpu) == (True, True, "off")
    given = configure(recipe("debug"), {"parallel.compile": "trunk", "parallel.fuse_frozen": "on"})
    assert resolve_speedups(given, cpu) == (False, True, "trunk")


def test_the_trainer_clips_the_global_gradient_norm_as_written():
    """Without ZeRO, engine_step clips with torch's fused clip_grad_norm_ instead of DeepSpeed's:
    the gradients the optimizer steps with are the hand-clipped ones, g x max_norm / (||g|| + 1e-6)."""
    from carl_scale.bench.step import synthetic_batch
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model
    from carl_scale.train.recipes import recipe
    from carl_scale.train.engine import build_engine, engine_step, process_group

    cfg = configure(recipe("debug"), {"data.batch_size": 2, "data.temporal.num_frames": 8, "model.image_size": 32,
                                      "optim.grad_clip": 0.01})
    stepped = {}
    with process_group() as (_, world, device):
        batch = synthetic_batch(2, 8, 32, device)
        torch.manual_seed(0)
        ref = build_model(cfg.model).eval()
        torch.manual_seed(0)
        engine, _ = build_engine(cfg, build_model(cfg.model), total_steps=10, world=world, bf16=False)
        engine.eval()
        step = engine.step

        def spy():
            stepped.update({n: p.grad.clone() for n, p in engine.module.model.named_parameters() if p.grad is not None})
            step()

        engine.step = spy
        engine_step(engine, batch, device)
    build_objective(ref, cfg.loss)(batch)["loss"].backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    assert norm > 10 * cfg.optim.grad_clip and stepped.keys() == grads.keys()
    for n, g in grads.items():
        assert torch.allclose(stepped[n], g * (cfg.optim.grad_clip / (norm + 1e-6)).float(), rtol=1e-4, atol=1e-9), n


class _HostReads:
    """Records every read of a tensor's value by the host (``.item()``, ``bool()``, ...): on a GPU
    each one waits for all queued work."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")

    def __enter__(self):
        self.calls, self.saved = [], {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n in self.NAMES:
            def read(t, *a, _n=n, **k):
                self.calls.append(_n)
                return self.saved[_n](t, *a, **k)
            setattr(torch.Tensor, n, read)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def _debug_engine(**overrides):
    from carl_scale.models import build_model
    from carl_scale.train.recipes import recipe
    from carl_scale.train.engine import build_engine

    cfg = configure(recipe("debug"), {"data.batch_size": 2, "data.temporal.num_frames": 8, "model.image_size": 32,
                                      **overrides})
    torch.manual_seed(0)
    return build_engine(cfg, build_model(cfg.model), total_steps=10, world=1, bf16=False)[0]


def test_a_training_step_without_zero_never_waits_for_the_device():
    """The trainer's step (forward, finiteness flag, backward, clipping, update) reads no tensor
    back to the host, and DeepSpeed's throughput timer, which synchronizes the device twice a
    step, is off; the GPU test checks the same with CUDA's own sync detection."""
    from carl_scale.bench.step import synthetic_batch
    from carl_scale.train.engine import engine_step, process_group

    with process_group() as (_, _, device):
        engine = _debug_engine()
        batch = synthetic_batch(2, 8, 32, device)
        engine_step(engine, batch, device)
        with _HostReads() as reads:
            engine_step(engine, batch, device)
        assert reads.calls == [] and engine.carl_skip_on_device
        assert not engine.tput_timer.config.enabled
        # ZeRO steps through DeepSpeed's own optimizer: the flag is read before backward there
        zero = _debug_engine(**{"parallel.zero_stage": 1})
        assert not zero.carl_skip_on_device


@pytest.mark.parametrize("accum, where", [(1, "loss"), (2, "loss"), (1, "gradient"), (1, "gradient, no clipping")])
def test_a_non_finite_step_is_skipped_on_the_device(accum, where):
    """A NaN loss (in any micro-step of an update), or a finite loss whose gradient overflows
    (with --grad-clip 0 too, where no clipping computes the norm), leaves the weights and the
    optimizer's state as they were (the learning-rate schedule still advances: the run stops at
    its next read-back), and the next finite update trains again."""
    import dataclasses

    from carl_scale.bench.step import synthetic_batch
    from carl_scale.train.engine import engine_step, process_group

    def state(engine):
        opt = engine.optimizer
        return [p.detach().clone() for p in engine.module.parameters()] + \
            [t.clone() for s in opt.state.values() for t in s.values()]

    with process_group() as (_, _, device):
        good = synthetic_batch(2, 8, 32, device)
        bad = dataclasses.replace(good, views=good.views * float("nan"))
        engine = _debug_engine(**{"parallel.grad_accum": accum,
                                  **({"optim.grad_clip": 0.0} if where.endswith("no clipping") else {})})
        for _ in range(accum):
            engine_step(engine, good, device)
        before = state(engine)
        if where.startswith("gradient"):
            hook = engine.module.model.embed.weight.register_hook(lambda g: g * float("inf"))
            out, flag = engine_step(engine, good, device)
            hook.remove()
            assert torch.isfinite(out["loss"]) and float(flag) == 1.0
        else:
            flags = [engine_step(engine, b, device)[1] for b in ([bad] if accum == 1 else [good, bad])]
            assert [float(f) for f in flags] == ([1.0] if accum == 1 else [0.0, 1.0])
        after = state(engine)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        for _ in range(accum):
            engine_step(engine, good, device)
        assert not all(torch.equal(a, b) for a, b in zip(after, state(engine)))


def test_a_checkpoint_of_a_non_fused_optimizer_resumes_fused():
    """Loading an optimizer state replaces the groups' settings: a checkpoint from before the
    optimizer was fused would make it refuse the device-side skip. keep_fused restores it, and the
    loaded state trains on exactly as the non-fused optimizer would have."""
    import copy

    from carl_scale.train.engine import keep_fused

    torch.manual_seed(0)
    w = torch.randn(5, 3)
    old = torch.optim.AdamW([torch.nn.Parameter(w.clone())], lr=0.1)  # not fused: the format written before
    for _ in range(2):
        old.param_groups[0]["params"][0].grad = torch.randn(5, 3)
        old.step()
    p = torch.nn.Parameter(old.param_groups[0]["params"][0].detach().clone())
    new = torch.optim.AdamW([p], lr=0.1, fused=True)
    new.load_state_dict(copy.deepcopy(old.state_dict()))  # a copy: loading may share the state's tensors
    keep_fused(new)
    assert new.param_groups[0]["fused"] and new.state[p]["step"].dtype == torch.float32
    grad = torch.randn(5, 3)
    p.grad = grad.clone()
    new.found_inf = torch.zeros(())
    new.step()
    old.param_groups[0]["params"][0].grad = grad.clone()
    old.step()
    torch.testing.assert_close(p.detach(), old.param_groups[0]["params"][0].detach())


@pytest.mark.parametrize("saved_layout, now_layout", [(torch.contiguous_format, torch.channels_last),
                                                      (torch.channels_last, torch.contiguous_format)])
def test_a_resumed_fused_optimizer_keeps_its_moments_in_the_weights_layout(saved_layout, now_layout):
    """A run saved with one memory layout of its convolution weights and resumed with the other
    (a CPU run resumed on a GPU, where channels_last is on): the fused kernel reads weights and
    moments as flat memory, so keep_fused puts the moments in the weights' layout; the step then
    equals the uninterrupted one (without it, elements off by up to ~0.2)."""
    import copy

    from carl_scale.train.engine import keep_fused

    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    first = torch.nn.Parameter(w.clone().contiguous(memory_format=saved_layout))
    old = torch.optim.AdamW([first], lr=0.1, fused=True)
    for _ in range(2):
        first.grad = torch.randn(4, 3, 3, 3).contiguous(memory_format=saved_layout)
        old.step()
    p = torch.nn.Parameter(first.detach().clone().contiguous(memory_format=now_layout))
    new = torch.optim.AdamW([p], lr=0.1, fused=True)
    new.load_state_dict(copy.deepcopy(old.state_dict()))
    keep_fused(new)
    assert all(new.state[p][k].stride() == p.stride() for k in ("exp_avg", "exp_avg_sq"))
    grad = torch.randn(4, 3, 3, 3)
    p.grad = grad.clone().contiguous(memory_format=now_layout)
    new.step()
    first.grad = grad.clone().contiguous(memory_format=saved_layout)
    old.step()
    torch.testing.assert_close(p.detach(), first.detach())


@pytest.mark.parametrize("over", [{}, {"loss.scl_negatives": "batch"}, {"parallel.trunk_chunk": 4}])
def test_the_objectives_forward_never_copies_a_value_from_host_memory_on_a_gpu(over):
    """The model and the loss on fake CUDA tensors (no GPU needed): no operation takes a CPU tensor
    beside the GPU ones, which would be copied from host memory inside it, a host-device
    synchronisation every step (an indexed assignment of a Python value makes one: the H200
    counted two a step in the batch negatives' mask). The backward needs a real device: the GPU
    test runs the whole step under CUDA's sync detection."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from carl_scale.bench.step import HostValueCopies, synthetic_batch
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model
    from carl_scale.train.recipes import recipe

    cfg = configure(recipe("debug"), {"data.batch_size": 2, "data.temporal.num_frames": 8, "model.image_size": 32,
                                      **over})
    model = build_model(cfg.model)
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (autocast: "CUDA is not available", here)
        objective = build_objective(model.to("cuda"), cfg.loss, autocast=torch.bfloat16,
                                    trunk_chunk=cfg.parallel.trunk_chunk)
        batch = synthetic_batch(2, 8, 32, torch.device("cpu")).to(torch.device("cuda"))
        with HostValueCopies() as copies:
            out = objective(batch)
    assert out["loss"].device.type == "cuda" and copies.ops == [], copies.ops


def test_a_slurm_step_of_several_tasks_without_rank_is_refused(monkeypatch):
    """``srun -n 4 python launch/pretrain_k400.py`` without RANK/WORLD_SIZE: each task would make a
    one-process group and train alone into the same run directory."""
    from carl_scale.train.engine import process_group

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(ValueError, match=r"started as 4 tasks of a SLURM step without RANK and WORLD_SIZE: .*Export "
                                         r"RANK=\$SLURM_PROCID"):
        with process_group():
            pass
    # a batch script's one process (SLURM_NTASKS is the allocation's, SLURM_PROCID 0, no step): a plain run
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with process_group() as (rank, world, _):
        assert (rank, world) == (0, 1)


def test_the_ranks_per_node_come_from_torchrun_or_the_deepspeed_launcher(monkeypatch):
    from carl_scale.data.decoders import local_ranks

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "8")  # the deepspeed launcher's (it sets no LOCAL_WORLD_SIZE)
    assert local_ranks() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_ranks() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_SIZE")
    assert local_ranks() == 1
