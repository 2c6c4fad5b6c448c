"""SCL against a per-frame loop written straight from the paper's Eq. 1-2."""

from __future__ import annotations

import math

import pytest
import torch

from carl_scale.losses import sequence_contrastive_loss


def naive_scl(z1, z2, s1, s2, tau, sigma2, m1, m2):
    """Loops over videos, reference frames and the other view's frames, in float64."""
    per_video = []
    for b in range(z1.shape[0]):
        total, defined = 0.0, True
        for za, zb, sa, sb, ma, mb in ((z1[b], z2[b], s1[b], s2[b], m1[b], m2[b]),
                                       (z2[b], z1[b], s2[b], s1[b], m2[b], m1[b])):
            valid_i = [i for i in range(len(za)) if ma[i]]
            valid_j = [j for j in range(len(zb)) if mb[j]]
            if not valid_i or not valid_j:
                defined = False
                break
            view_loss = 0.0
            for i in valid_i:
                g = [math.exp(-((sa[i] - sb[j]).item() ** 2) / (2 * sigma2)) / math.sqrt(2 * math.pi * sigma2)
                     for j in valid_j]
                sims = [torch.dot(za[i], zb[j]) / (za[i].norm() * zb[j].norm()) / tau for j in valid_j]
                denom = sum(torch.exp(s) for s in sims)
                view_loss = view_loss - sum((g[k] / sum(g)) * torch.log(torch.exp(sims[k]) / denom)
                                            for k in range(len(valid_j)))
            total = total + view_loss / len(valid_i)
        if defined:
            per_video.append(total)
    return sum(per_video) / len(per_video)


def _inputs(b, t1, t2, d, seed, masked=False):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, t1, d, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(b, t2, d, generator=g, dtype=torch.float64, requires_grad=True)
    s1 = torch.sort(torch.randint(0, 60, (b, t1), generator=g), dim=1).values.double()
    s2 = torch.sort(torch.randint(0, 60, (b, t2), generator=g), dim=1).values.double()
    m1 = torch.ones(b, t1, dtype=torch.bool)
    m2 = torch.ones(b, t2, dtype=torch.bool)
    if masked:
        m1[:, -2:] = False
        m2[0, :3] = False
    return z1, z2, s1, s2, m1, m2


@pytest.mark.parametrize("b,t1,t2,masked,tau,sigma2", [
    (1, 5, 5, False, 0.1, 10.0),
    (3, 6, 4, False, 0.5, 3.0),
    (2, 7, 9, True, 0.1, 10.0),
    (4, 5, 5, True, 1.0, 50.0),
])
def test_values_and_gradients_match_naive(b, t1, t2, masked, tau, sigma2):
    z1, z2, s1, s2, m1, m2 = _inputs(b, t1, t2, 6, seed=b * 100 + t1, masked=masked)
    fast = sequence_contrastive_loss(z1, z2, s1, s2, tau=tau, sigma2=sigma2, mask1=m1, mask2=m2)
    g_fast = torch.autograd.grad(fast, (z1, z2))
    ref = naive_scl(z1, z2, s1, s2, tau, sigma2, m1, m2)
    g_ref = torch.autograd.grad(ref, (z1, z2))
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9)
    for a, r in zip(g_fast, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)


def test_masked_frames_do_not_matter():
    z1, z2, s1, s2, m1, m2 = _inputs(2, 6, 6, 4, seed=1, masked=True)
    base = sequence_contrastive_loss(z1, z2, s1, s2, mask1=m1, mask2=m2)
    z1b, z2b = z1.detach().clone(), z2.detach().clone()
    z1b[~m1] = 1e3 * torch.randn_like(z1b[~m1])
    z2b[~m2] = -7.0
    s1b = s1.clone()
    s1b[~m1] = 12345.0
    torch.testing.assert_close(sequence_contrastive_loss(z1b, z2b, s1b, s2, mask1=m1, mask2=m2), base.detach())


def test_stable_at_small_tau_and_fully_masked_rows():
    z1, z2, s1, s2, m1, m2 = _inputs(3, 8, 8, 16, seed=2)
    z1, z2 = z1.float(), z2.float()
    loss = sequence_contrastive_loss(z1 * 1e4, z2, s1, s2, tau=1e-4)
    assert torch.isfinite(loss)
    m2 = m2.clone()
    m2[1] = False  # video 1 has no valid frame in view 2: left out, no NaN
    z1 = z1.detach().requires_grad_()
    loss = sequence_contrastive_loss(z1, z2, s1, s2, mask1=m1, mask2=m2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and z1.grad[1].abs().sum() == 0
    ref = sequence_contrastive_loss(z1[[0, 2]], z2[[0, 2]], s1[[0, 2]], s2[[0, 2]])
    torch.testing.assert_close(loss, ref)
    all_masked = sequence_contrastive_loss(z1, z2, s1, s2, mask1=torch.zeros_like(m1))
    assert all_masked.item() == 0.0 and all_masked.requires_grad


def test_aligned_views_score_lower_than_shuffled():
    """The loss rewards embeddings that follow the timeline."""
    t = 20
    s = torch.arange(t).double()[None]
    pos = torch.stack([torch.cos(s / 6), torch.sin(s / 6)], -1)  # smooth in time
    aligned = sequence_contrastive_loss(pos, pos, s, s, tau=0.1, sigma2=4.0)
    shuffled = sequence_contrastive_loss(pos, pos[:, torch.randperm(t)], s, s, tau=0.1, sigma2=4.0)
    assert aligned < shuffled


def test_bf16_inputs_are_computed_in_float32():
    z1, z2, s1, s2, _, _ = _inputs(2, 5, 5, 8, seed=3)
    ref = sequence_contrastive_loss(z1.float(), z2.float(), s1, s2)
    low = sequence_contrastive_loss(z1.bfloat16(), z2.bfloat16(), s1, s2)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2)


def test_shape_errors_are_clear():
    z = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="timestamps"):
        sequence_contrastive_loss(z, z, torch.zeros(2, 4), torch.zeros(2, 5))


def test_the_published_formulation_is_half_of_ours_less_the_target_entropy():
    """The benchmark's reference step computes SCL as the published code does (one (2BT)^2 matrix,
    KL to the targets): with every frame valid it equals ours / 2 minus the targets' mean entropy
    (up to its 1e-6 inside the log), and its gradients are half of ours."""
    from carl_scale.bench.published import published_scl

    g = torch.Generator().manual_seed(3)
    b, t, d, tau, sigma2 = 3, 8, 16, 0.1, 10.0
    u = torch.randn(b, 2, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    steps = torch.sort(torch.randint(0, 40, (b, 2, t), generator=g), dim=-1).values
    z = torch.nn.functional.normalize(u, dim=-1)
    valid = torch.ones(b, 2, t, dtype=torch.bool)
    pub = published_scl(z, steps, valid, tau=tau, sigma2=sigma2, eps=0.0)
    (g_pub,) = torch.autograd.grad(pub, u, retain_graph=True)
    ours = sequence_contrastive_loss(z[:, 0], z[:, 1], steps[:, 0], steps[:, 1], tau=tau, sigma2=sigma2)
    (g_ours,) = torch.autograd.grad(ours, u, retain_graph=True)
    d2 = (steps[:, :, :, None] - steps[:, [1, 0], None, :]).double() ** 2  # each frame against the other view
    w = torch.softmax(-d2 / (2 * sigma2), dim=-1)
    entropy = -(w * torch.log(w)).sum(-1).mean()
    assert pub.item() == pytest.approx(ours.item() / 2 - entropy.item(), rel=1e-9)
    assert (g_pub - g_ours / 2).abs().max() < 1e-9 * g_ours.abs().max(), (g_pub - g_ours / 2).abs().max()
    # the published 1e-6 inside the log moves it by a few 1e-4 (p of far frames is ~1e-4)
    assert published_scl(z, steps, valid, tau=tau, sigma2=sigma2).item() == pytest.approx(pub.item(), rel=1e-3)


def test_the_published_loop_form_computes_the_vectorised_published_loss():
    """The step's SCL, written as the published code runs it (per-video loops filling the weight
    and target blocks, its seq_lens arithmetic), gives the vectorised reference's loss and
    gradients, with padded frames in some views."""
    from carl_scale.bench.published import published_scl, published_scl_loop

    g = torch.Generator().manual_seed(5)
    b, t, d, tau, sigma2 = 3, 7, 16, 0.1, 10.0
    u = torch.randn(b, 2, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    steps = torch.sort(torch.randint(0, 50, (b, 2, t), generator=g), dim=-1).values
    lengths = torch.tensor([50, 61, 97])  # (not powers of two: s / L * L rounds)
    valid = torch.ones(b, 2, t, dtype=torch.bool)
    valid[0, 1, 5:] = False
    valid[2, 0, 3:] = False
    z = torch.nn.functional.normalize(u, dim=-1)
    ref = published_scl(z, steps, valid, tau=tau, sigma2=sigma2)
    (g_ref,) = torch.autograd.grad(ref, u, retain_graph=True)
    loop = published_scl_loop(z, steps, valid, lengths, tau=tau, sigma2=sigma2)
    (g_loop,) = torch.autograd.grad(loop, u)
    assert loop.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_loop, g_ref, rtol=1e-9, atol=1e-12)


def _naive_batch_scl(z, s, m, tau, sigma2):
    """Batch negatives, by hand: each valid frame of view a of video v against every valid frame
    of the batch except its own view's; numerator and Gaussian over v's other view."""
    videos, _, frames, _ = z.shape
    unit = torch.nn.functional.normalize(z, dim=-1)
    per_video = []
    for v in range(videos):
        total, defined = 0.0, True
        for a in (0, 1):
            rows = [i for i in range(frames) if m[v, a, i]]
            cols = [j for j in range(frames) if m[v, 1 - a, j]]
            if not rows or not cols:
                defined = False
                break
            others = [(w, b, j) for w in range(videos) for b in (0, 1) for j in range(frames)
                      if m[w, b, j] and not (w == v and b == a)]
            part = 0.0
            for i in rows:
                denom = sum(torch.exp(torch.dot(unit[v, a, i], unit[w, b, j]) / tau) for w, b, j in others)
                g = [math.exp(-((s[v, a, i] - s[v, 1 - a, j]).item() ** 2) / (2 * sigma2)) for j in cols]
                part = part - sum(g[k] / sum(g) * torch.log(torch.exp(torch.dot(unit[v, a, i], unit[v, 1 - a, j]) / tau)
                                                           / denom) for k, j in enumerate(cols))
            total = total + part / len(rows)
        if defined:
            per_video.append(total)
    return sum(per_video) / len(per_video)


def test_batch_negatives_match_a_naive_loop_and_the_published_batch_noself():
    """``negatives="batch"`` (the published K400 config's batch_noself): every frame of the batch
    but a frame's own view in its denominator. Against a loop by hand (with padded frames), and the
    published formulation's relation to ours (half, less the targets' entropy) with every frame valid."""
    from carl_scale.bench.published import published_scl, published_scl_loop

    g = torch.Generator().manual_seed(7)
    b, t, d, tau, sigma2 = 3, 5, 8, 0.1, 10.0
    u = torch.randn(b, 2, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    steps = torch.sort(torch.randint(0, 30, (b, 2, t), generator=g), dim=-1).values
    mask = torch.ones(b, 2, t, dtype=torch.bool)
    mask[1, 0, 3:] = False
    mask[2, 1, 4:] = False
    ours = sequence_contrastive_loss(u[:, 0], u[:, 1], steps[:, 0], steps[:, 1], tau=tau, sigma2=sigma2,
                                     mask1=mask[:, 0], mask2=mask[:, 1], negatives="batch")
    ref = _naive_batch_scl(u, steps, mask, tau, sigma2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    (g_ours,) = torch.autograd.grad(ours, u)
    (g_ref,) = torch.autograd.grad(_naive_batch_scl(u, steps, mask, tau, sigma2), u)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)
    # one video: nothing else in the batch, the per-video loss
    one = dict(tau=tau, sigma2=sigma2)
    assert sequence_contrastive_loss(u[:1, 0], u[:1, 1], steps[:1, 0], steps[:1, 1], negatives="batch", **one).item() \
        == pytest.approx(sequence_contrastive_loss(u[:1, 0], u[:1, 1], steps[:1, 0], steps[:1, 1], **one).item())
    # the published batch_noself, vectorised and as its loops run it
    z = torch.nn.functional.normalize(u, dim=-1)
    valid = torch.ones(b, 2, t, dtype=torch.bool)
    pub = published_scl(z, steps, valid, tau=tau, sigma2=sigma2, eps=0.0, negatives="batch")
    full = sequence_contrastive_loss(z[:, 0], z[:, 1], steps[:, 0], steps[:, 1], negatives="batch", **one)
    d2 = (steps[:, :, :, None] - steps[:, [1, 0], None, :]).double() ** 2
    w = torch.softmax(-d2 / (2 * sigma2), dim=-1)
    entropy = -(w * torch.log(w)).sum(-1).mean()
    assert pub.item() == pytest.approx(full.item() / 2 - entropy.item(), rel=1e-9)
    loop = published_scl_loop(z, steps, mask, torch.tensor([30, 30, 30]), negatives="batch", **one)
    assert loop.item() == pytest.approx(published_scl(z, steps, mask, negatives="batch", **one).item(), rel=1e-12)
    with pytest.raises(ValueError, match="negatives must be one of"):
        sequence_contrastive_loss(u[:, 0], u[:, 1], steps[:, 0], steps[:, 1], negatives="all")


@pytest.mark.parametrize("loss", ["scl video", "scl batch", "weak"])
def test_the_losses_never_copy_a_value_from_host_memory_on_a_gpu(loss):
    """On fake CUDA tensors (no GPU needed): no operation of the loss's forward takes a CPU tensor
    beside the GPU ones (the backward needs a real device). Such an argument (``x[idx] = False``
    makes one) is copied from host memory inside the operation, a host-device synchronisation every
    step: CUDA's sync detection counted two a step on an H200 in the batch negatives' mask."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from carl_scale.bench.step import HostValueCopies
    from carl_scale.losses.weak_scl import weak_sequence_contrastive_loss

    with FakeTensorMode(allow_non_fake_inputs=True):
        z1, z2 = (torch.randn(3, 5, 8, device="cuda") for _ in range(2))
        s = torch.arange(5, device="cuda").float().expand(3, 5)
        with HostValueCopies() as copies:
            if loss == "weak":
                out = weak_sequence_contrastive_loss(z1, z2, s, s, torch.tensor([0, 1, 0], device="cuda"))
            else:
                out = sequence_contrastive_loss(z1, z2, s, s, negatives=loss.split()[1])
    assert out.device.type == "cuda" and copies.ops == [], copies.ops
