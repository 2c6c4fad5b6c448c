"""Weak supervision (paper §3.5): Eq. 3 and Eq. 4 against loops written from the paper, their
properties, the correspondences on a time-warped copy, and Eq. 3 across two real gloo processes."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carl_scale.data.config import TemporalConfig
from carl_scale.data.temporal import sample_temporal_views
from carl_scale.losses import paired_contrastive_loss, sequence_contrastive_loss, weak_sequence_contrastive_loss
from carl_scale.losses.pcl import pair_correspondences
from conftest import free_port

TAU, SIGMA2 = 0.1, 10.0


def naive_weak_scl(z1, z2, s1, s2, labels, m1, m2):
    """Eq. 3 frame by frame in float64: numerator and prior over the video's own other view, the
    denominator over Ω_a = its other view plus the other view of every other-label video."""
    z1, z2 = F.normalize(z1.double(), dim=-1), F.normalize(z2.double(), dim=-1)
    b = z1.shape[0]
    per_video = []
    for a in range(b):
        total = 0.0
        for za, zb, sa, sb, ma, mb in ((z1, z2, s1, s2, m1, m2), (z2, z1, s2, s1, m2, m1)):
            rows = [i for i in range(za.shape[1]) if ma[a, i]]
            omega = [(a, j) for j in range(zb.shape[1]) if mb[a, j]]
            omega += [(c, j) for c in range(b) if labels[c] != labels[a] and labels[c] >= 0 and labels[a] >= 0
                      for j in range(zb.shape[1]) if mb[c, j]]
            own = [j for j in range(zb.shape[1]) if mb[a, j]]
            loss = 0.0
            for i in rows:
                g = torch.tensor([math.exp(-float(sa[a, i] - sb[a, j]) ** 2 / (2 * SIGMA2)) for j in own])
                w = g / g.sum()
                den = torch.logsumexp(torch.stack([za[a, i] @ zb[c, j] / TAU for c, j in omega]), 0)
                loss += float(-sum(w[k] * (za[a, i] @ zb[a, j] / TAU - den) for k, j in enumerate(own)))
            total += loss / len(rows)
        per_video.append(total)
    return float(np.mean(per_video))


def _batch(b=4, t=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)
    s1 = torch.sort(torch.randint(0, 30, (b, t), generator=g), dim=1).values
    s2 = torch.sort(torch.randint(0, 30, (b, t), generator=g), dim=1).values
    m1, m2 = torch.ones(b, t, dtype=torch.bool), torch.ones(b, t, dtype=torch.bool)
    m1[0, -2:] = False  # a short video: padded slots
    m2[2, -1] = False
    return z1, z2, s1, s2, m1, m2


def test_weak_scl_is_eq3_and_equals_scl_with_one_label():
    z1, z2, s1, s2, m1, m2 = _batch()
    for labels in ([0, 1, 0, 2], [0, 0, 0, 0], [1, -1, 1, 3]):
        lab = torch.tensor(labels)
        got = weak_sequence_contrastive_loss(z1, z2, s1, s2, lab, tau=TAU, sigma2=SIGMA2, mask1=m1, mask2=m2)
        assert float(got) == pytest.approx(naive_weak_scl(z1, z2, s1, s2, labels, m1, m2), rel=1e-5), labels
    same = weak_sequence_contrastive_loss(z1, z2, s1, s2, torch.zeros(4, dtype=torch.long), tau=TAU, sigma2=SIGMA2,
                                          mask1=m1, mask2=m2)
    scl = sequence_contrastive_loss(z1, z2, s1, s2, tau=TAU, sigma2=SIGMA2, mask1=m1, mask2=m2)
    torch.testing.assert_close(same, scl)


def test_other_classes_only_add_negatives_and_same_class_videos_change_nothing():
    z1, z2, s1, s2, m1, m2 = _batch(b=4)
    kw = dict(tau=TAU, sigma2=SIGMA2)
    losses = [float(weak_sequence_contrastive_loss(z1, z2, s1, s2, torch.tensor(lab), **kw))
              for lab in ([0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 2, 0], [0, 1, 2, 3])]
    assert losses == sorted(losses) and losses[0] < losses[-1]  # grows as other-class videos join
    # video 0 alone, and beside a video of its own class: the same loss for it
    alone = weak_sequence_contrastive_loss(z1[:1], z2[:1], s1[:1], s2[:1], torch.tensor([5]), **kw)
    other = weak_sequence_contrastive_loss(z1[1:2], z2[1:2], s1[1:2], s2[1:2], torch.tensor([5]), **kw)
    pair = weak_sequence_contrastive_loss(z1[:2], z2[:2], s1[:2], s2[:2], torch.tensor([5, 5]), **kw)
    assert float(pair) == pytest.approx((float(alone) + float(other)) / 2, rel=1e-6)


# -- the paired contrastive loss ---------------------------------------------------------------
def _curve(t: np.ndarray, d: int = 16) -> np.ndarray:
    """A smooth path on the sphere that never comes back: frame t's 'pose'."""
    f = np.linspace(0.5, 3.0, d // 2)
    x = np.concatenate([np.sin(np.outer(t / 120.0, f) * np.pi), np.cos(np.outer(t / 120.0, f) * np.pi)], 1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _warped_pair(t: int = 40, seed: int = 0):
    """Video a (120 frames) and a time-warped copy b (150 frames, frame j shows a's w(j)), two
    sampled views each, as the loader draws them."""
    n, m = 120, 150
    warp = lambda j: n * (np.asarray(j) / m) ** 1.3  # noqa: E731
    rng = np.random.default_rng(seed)
    cfg = TemporalConfig(num_frames=t, alpha=1.5, beta=0.2)
    va, vb = sample_temporal_views(n, cfg, rng), sample_temporal_views(m, cfg, rng)
    za = _curve(va.timestamps.astype(float).ravel()).reshape(2, t, -1)
    zb = _curve(warp(vb.timestamps.astype(float).ravel())).reshape(2, t, -1)
    z = torch.from_numpy(np.stack([za, zb])).float()  # (2, 2, T, D)
    ts = torch.from_numpy(np.stack([va.timestamps, vb.timestamps]))
    mask = torch.from_numpy(np.stack([va.mask, vb.mask]))
    return z, ts, mask, torch.tensor([n, m]), warp


@pytest.mark.parametrize("grid", ["views", "full"])
def test_pcl_positives_fall_on_the_true_correspondence_of_a_time_warped_copy(grid):
    z, ts, mask, n, warp = _warped_pair()
    grids = [torch.unique(ts[k][mask[k]]) if grid == "views" else torch.arange(int(n[k])) for k in range(2)]
    (pos, neg), = pair_correspondences(F.normalize(z, dim=-1), ts, mask, grids, [(0, 1)])
    r, c = torch.nonzero(pos, as_tuple=True)
    s_a, s_b = grids[0][r].numpy(), grids[1][c].numpy()
    err = np.abs(warp(s_b) - s_a)  # a's frame s corresponds to b's frame j where w(j) = s
    assert len(err) >= 10 and np.median(err) <= 1.0 and np.mean(err <= 2.0) >= 0.9, (grid, np.percentile(err, [50, 90]))
    assert not (pos & neg).any() and neg.float().mean() > 0.5  # most cells are negatives, none both


def naive_pcl(z, ts, mask, pairs_pos_neg, grids):
    """Eq. 4 by loops, given each ordered pair's positives and negatives on the grids."""
    zn = F.normalize(z.double(), dim=-1)
    b = z.shape[0]
    out = [0.0] * b
    for (a, c), (pos, neg) in pairs_pos_neg.items():
        for v in range(2):
            terms, n_rows = 0.0, 0
            for i in range(z.shape[2]):
                if not mask[a, v, i]:
                    continue
                n_rows += 1
                r = int((grids[a] == ts[a, v, i]).nonzero()[0])
                cand = [(u, j) for u in range(2) for j in range(z.shape[2]) if mask[c, u, j]]
                col = {(u, j): int((grids[c] == ts[c, u, j]).nonzero()[0]) for u, j in cand}
                negs = [zn[a, v, i] @ zn[c, u, j] / TAU for u, j in cand if neg[r, col[u, j]]]
                for u, j in cand:
                    if pos[r, col[u, j]]:
                        l_pos = zn[a, v, i] @ zn[c, u, j] / TAU
                        terms -= float(l_pos - torch.logsumexp(torch.stack([l_pos, *negs]), 0))
            out[a] += terms / n_rows
    return out


def test_pcl_is_eq4_on_the_correspondences_and_needs_a_same_class_partner():
    z, ts, mask, n, _ = _warped_pair(t=12, seed=1)
    z = z + 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    z3 = torch.cat([z, z[:1]])  # a third video: a's class too, another draw of its pixels
    ts3, mask3, n3 = torch.cat([ts, ts[:1]]), torch.cat([mask, mask[:1]]), torch.cat([n, n[:1]])
    labels = torch.tensor([4, 4, 4])
    zn = F.normalize(z3, dim=-1)
    pairs = [(0, 1), (0, 2), (1, 2)]
    # the paper's full grid and one view pair (Table 12's "w.o. view ensemble") too, against the loops
    for grid, ensemble in (("full", True), ("views", False)):
        got, _ = paired_contrastive_loss(z3, ts3, mask3, labels, n3, tau=TAU, grid=grid, view_ensemble=ensemble)
        grids = [torch.unique(ts3[k][mask3[k]]) if grid == "views" else torch.arange(int(n3[k])) for k in range(3)]
        found = pair_correspondences(zn, ts3, mask3, grids, pairs, view_ensemble=ensemble)
        both = {}
        for (a, c), (pos, neg) in zip(pairs, found):
            both[(a, c)], both[(c, a)] = (pos, neg), (pos.T, neg.T)
        assert sum(int(pos.sum()) for pos, _ in found) > 0, (grid, ensemble)  # something to compare
        np.testing.assert_allclose(got.detach().numpy(), naive_pcl(z3, ts3, mask3, both, grids), rtol=1e-4,
                                   err_msg=f"{grid}, view ensemble {ensemble}")
    got, stats = paired_contrastive_loss(z3, ts3, mask3, labels, n3, tau=TAU)
    grids = [torch.unique(ts3[k][mask3[k]]) for k in range(3)]
    found = pair_correspondences(zn, ts3, mask3, grids, pairs)
    both = {}
    for (a, c), (pos, neg) in zip(pairs, found):
        both[(a, c)], both[(c, a)] = (pos, neg), (pos.T, neg.T)
    ref = naive_pcl(z3, ts3, mask3, both, grids)
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-4)
    # a and its copy pull together; b's views cover other moments of the action than a's (frames
    # 20-32 of a against a's 80-105), so DTW keeps no correspondence with it: PCL 0, as it should
    assert stats["pairs"] == 3 and got[0] > 0 and got[2] > 0 and got[1] == 0
    alone, _ = paired_contrastive_loss(z3, ts3, mask3, torch.tensor([1, 2, -1]), n3)  # no partner: 0, with a graph
    assert float(alone.abs().sum()) == 0.0


def test_a_view_without_frames_leaves_the_pair_its_other_views_and_equal_costs_stay_positives():
    """A view with no valid frame (a sampler that left one empty): the cost averages the views that
    have frames instead of failing to interpolate from none; a video with none has no partner's
    correspondences. And k equal smallest costs (collapsed embeddings) give ε equal to that cost,
    not one ulp below it, so the path's cells stay positives."""
    from carl_scale.ops.correspondence import dtw_correspondences, mean_of_smallest

    z, ts, mask, n, _ = _warped_pair(t=12, seed=1)
    # video a and another draw of its pixels (their views on the same moments: correspondences)
    z = torch.cat([z[:1], z[:1] + 0.05 * torch.randn(z[:1].shape, generator=torch.Generator().manual_seed(0))])
    ts, mask, n = torch.cat([ts[:1], ts[:1]]), torch.cat([mask[:1], mask[:1]]), torch.cat([n[:1], n[:1]])
    one_view = mask.clone()
    one_view[1, 1] = False
    loss, stats = paired_contrastive_loss(z, ts, one_view, torch.tensor([3, 3]), n, tau=TAU)
    assert torch.isfinite(loss).all() and loss[0] > 0 and stats["positives"] > 0
    none = mask.clone()
    none[1] = False
    loss, stats = paired_contrastive_loss(z, ts, none, torch.tensor([3, 3]), n, tau=TAU)
    assert float(loss.abs().sum()) == 0.0 and stats["positives"] == 0
    cost = np.full((20, 20), 0.3)  # every cell the same: NumPy's mean of the 20 smallest is 0.29999999999999993
    assert mean_of_smallest(cost, 5.0) == 0.3
    pos, neg = dtw_correspondences(cost)
    assert pos.sum() >= 7 and not neg.any()  # the whole path, and nothing above ε2


def test_weak_scl_refuses_timestamps_or_masks_of_another_shape():
    z1, z2, s1, s2, m1, m2 = _batch()
    with pytest.raises(ValueError, match=r"s1 is \(4, 1\), its view \(4, 6\)"):
        weak_sequence_contrastive_loss(z1, z2, s1[:, :1], s2, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask2 is \(4, 5\)"):
        weak_sequence_contrastive_loss(z1, z2, s1, s2, torch.zeros(4, dtype=torch.long), mask2=m2[:, :5])


def test_pcl_gradient_reaches_the_embeddings_not_the_alignment():
    z, ts, mask, n, _ = _warped_pair(t=12, seed=2)
    z = z.clone().requires_grad_(True)
    loss, _ = paired_contrastive_loss(z, ts, mask, torch.tensor([0, 0]), n)
    loss.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# -- across ranks ------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, out: str, undefined: bool = False) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    z1, z2, s1, s2, m1, m2 = _batch(b=4, seed=3)
    if undefined:
        m1[1] = False  # video 1 (rank 0's) has an empty view: rank 0 has 1 defined video, rank 1 has 2
    labels = torch.tensor([0, 1, 0, 2])
    part = slice(2 * rank, 2 * rank + 2)
    a, b = z1[part].clone().requires_grad_(True), z2[part].clone().requires_grad_(True)
    loss = weak_sequence_contrastive_loss(a, b, s1[part], s2[part], labels[part], tau=TAU, sigma2=SIGMA2,
                                          mask1=m1[part], mask2=m2[part], gather=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "g1": a.grad, "g2": b.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("undefined", [False, True])
def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(tmp_path, undefined):
    """Also when the ranks have unequal numbers of defined videos (the mean is over all of them,
    not each rank's over its own)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    sys.path.insert(0, str(Path(__file__).parent))
    mp.start_processes(_rank_main, args=(2, free_port(), out, undefined), nprocs=2, start_method="spawn")
    z1, z2, s1, s2, m1, m2 = _batch(b=4, seed=3)
    if undefined:
        m1[1] = False
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    whole = weak_sequence_contrastive_loss(a, b, s1, s2, torch.tensor([0, 1, 0, 2]), tau=TAU, sigma2=SIGMA2,
                                           mask1=m1, mask2=m2)
    whole.backward()
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    # each rank's loss is the mean over its 2 videos, against all 4: their mean is the whole batch's
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole.detach())
    # the gathered frames carry gradient: rank r holds d(L_0 + L_1)/dz_r = 2 dL/dz_r, data parallelism
    # averages the two ranks' parameter gradients, so the update is the one process's
    torch.testing.assert_close(torch.cat([ranks[0]["g1"], ranks[1]["g1"]]) / 2, a.grad)
    torch.testing.assert_close(torch.cat([ranks[0]["g2"], ranks[1]["g2"]]) / 2, b.grad)


def test_the_weak_objective_trains_every_part_it_adds():
    """The weak objective on a real encoder: finite terms, two same-class pairs, and gradients in
    the class token and its classifier as well as the encoder."""
    from carl_scale.data.reader import VideoBatch
    from carl_scale.losses.config import LossConfig
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model, model_config

    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, class_token=True, num_classes=3, train_frames=6))
    objective = build_objective(model, LossConfig(name="weak"))
    b, t = 4, 6
    ts = torch.sort(torch.randint(0, 40, (b, 2, t)), dim=-1).values
    batch = VideoBatch(views=torch.randn(b, 2, t, 3, 32, 32), timestamps=ts, mask=torch.ones(b, 2, t, dtype=torch.bool),
                       action_labels=torch.tensor([0, 0, 2, 2]), phase_labels=torch.full((b, 2, t), -1),
                       num_frames=torch.full((b,), 40), video_ids=[str(i) for i in range(b)])
    out = objective(batch)
    assert all(torch.isfinite(v) for v in out.values()) and out["pairs"] == 2 and out["ce"] > 0
    out["loss"].backward()
    assert model.cls_token.grad.abs().sum() > 0 and model.classifier.weight.grad.abs().sum() > 0
    assert model.embed.weight.grad.abs().sum() > 0
    # λ = 0: no PCL computed (no DTW), the same loss without it, the pairs still counted
    model.eval()  # (dropout off: both forwards the same)
    with torch.no_grad():
        full, no_pcl = (build_objective(model, LossConfig(name="weak", pcl_weight=w))(batch) for w in (1.0, 0.0))
    assert no_pcl["pcl"] == 0 and no_pcl["pairs"] == 2 and full["pcl"] > 0
    torch.testing.assert_close(no_pcl["loss"], full["scl"] + LossConfig().ce_weight * full["ce"])
    # the terms' weights as written: scl + λ pcl + ce_weight ce (λ and the weight not 0 or 1)
    with torch.no_grad():
        some = build_objective(model, LossConfig(name="weak", pcl_weight=0.3, ce_weight=0.7))(batch)
    torch.testing.assert_close(some["pcl"], full["pcl"])
    torch.testing.assert_close(some["loss"], full["scl"] + 0.3 * full["pcl"] + 0.7 * full["ce"])


def _encoder_batch(b: int = 4, t: int = 6):
    """A batch for the debug encoder at 32 px: two same-class pairs (labels 0, 0, 2, 2)."""
    from carl_scale.data.reader import VideoBatch

    return VideoBatch(views=torch.randn(b, 2, t, 3, 32, 32),
                      timestamps=torch.sort(torch.randint(0, 40, (b, 2, t)), dim=-1).values,
                      mask=torch.ones(b, 2, t, dtype=torch.bool), action_labels=torch.tensor([0, 0, 2, 2]),
                      phase_labels=torch.full((b, 2, t), -1), num_frames=torch.full((b,), 40),
                      video_ids=[str(i) for i in range(b)])


def test_losses_stay_full_precision_under_bf16_autocast_and_the_weak_objective_runs_in_it():
    """bf16 training runs the objective under autocast: the losses must not compute their
    similarities in bf16, and the DTW must get costs it can read."""
    from carl_scale.losses.config import LossConfig
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model, model_config

    z1, z2, s1, s2, m1, m2 = _batch()
    labels = torch.tensor([0, 1, 0, 2])
    plain = (sequence_contrastive_loss(z1, z2, s1, s2), weak_sequence_contrastive_loss(z1, z2, s1, s2, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = (sequence_contrastive_loss(z1, z2, s1, s2), weak_sequence_contrastive_loss(z1, z2, s1, s2, labels))
    for a, b in zip(plain, cast):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, class_token=True, num_classes=3, train_frames=6))
    objective = build_objective(model, LossConfig(name="weak"), autocast=torch.bfloat16)
    batch = _encoder_batch()
    out = objective(batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"]) and out["pairs"] == 2


def test_joint_cost_runs_both_views_as_one_sequence_at_their_progress_and_leaves_the_model_as_it_was():
    """``--pcl-cost joint``: each video's frame features of both views, sorted by timestamp (padding
    last), through the temporal encoder and projection at s (T-1)/(n-1), in eval mode and without
    gradient; the model comes back in training mode with its BatchNorm statistics untouched."""
    from carl_scale.losses.pcl import joint_view_projections
    from carl_scale.models import build_model, model_config

    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=6)).train()
    b, t, n = 2, 6, torch.tensor([40, 25])
    ts = torch.stack([torch.randperm(int(k))[: 2 * t].view(2, t) for k in n])
    mask = torch.ones(b, 2, t, dtype=torch.bool)
    mask[1, 0, -2:] = False  # a short view: two padded slots
    feats = torch.randn(2 * b, t, model.cfg.width, requires_grad=True)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    z, jts, jm = joint_view_projections(model, feats, ts, mask, n)
    assert model.training and all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert not z.requires_grad and z.shape == (b, 2 * t, model.cfg.proj_dim)
    model.eval()
    for v in range(b):
        valid = mask[v].reshape(-1)
        assert jm[v].sum() == valid.sum() and not jm[v, int(valid.sum()):].any()  # padding last
        order = torch.argsort(ts[v].reshape(-1)[valid])
        assert torch.equal(jts[v][jm[v]], ts[v].reshape(-1)[valid][order])
        f = feats.detach().view(b, 2 * t, -1)[v][valid][order]
        pos = jts[v][jm[v]].double() / (int(n[v]) - 1) * (t - 1)
        ref = model.project(model.encode_sequence(f[None], None, pos[None])["embeddings"])[0]
        torch.testing.assert_close(z[v][jm[v]], ref)


def test_the_weak_objective_with_the_joint_cost_trains_and_refuses_one_view_pair(monkeypatch):
    from carl_scale.config import ConfigError
    from carl_scale.losses import objective as objective_module
    from carl_scale.losses.config import LossConfig
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model, model_config

    calls = []

    def recorded(*args, **kw):
        calls.append(args[0])
        return joint_view_projections(*args, **kw)

    from carl_scale.losses.pcl import joint_view_projections
    monkeypatch.setattr(objective_module, "joint_view_projections", recorded)
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, class_token=True, num_classes=3, train_frames=6))
    batch = _encoder_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    views = build_objective(model, LossConfig(name="weak"))(batch)
    model.load_state_dict(state)  # the same weights and BatchNorm statistics for the joint run
    assert calls == []
    out = build_objective(model, LossConfig(name="weak", pcl_cost="joint"))(batch)
    assert calls == [model]  # the correspondences came from the joint sequence...
    assert torch.isfinite(out["loss"]) and out["pairs"] == 2 and out["pcl"] > 0
    assert not torch.allclose(out["pcl"], views["pcl"])  # ...and they are not the view pairs' ones
    out["loss"].backward()
    assert model.embed.weight.grad.abs().sum() > 0
    # one labelled pair among unlabelled videos: still the joint cost (the unlabelled were once
    # counted as pairs of themselves, and the view-pair cost taken in its place)
    calls.clear()
    half = dataclasses.replace(batch, action_labels=torch.tensor([0, 0, -1, -1]))
    out = build_objective(model, LossConfig(name="weak", pcl_cost="joint"))(half)
    assert calls == [model] and out["pairs"] == 1
    with pytest.raises(ConfigError, match="--pcl-cost"):
        LossConfig(name="weak", pcl_cost="joint", view_ensemble=False)


@pytest.mark.parametrize("cost", ["views", "joint"])
def test_compiling_the_weak_objective_compiles_its_encoder_pass_and_changes_no_value(cost):
    """``--compile objective --loss weak`` compiles the encoder and projection only (PCL aligns on
    the host; Eq. 3 gathered at world size 2 fails in Inductor's CPU code): one graph, no graph
    break, and the loss, each term and every gradient the eager objective's. A video with an
    unknown label (-1) is left out of the class token's cross-entropy, and with no label known the
    term is 0."""
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.engine import apply_speedups

    # training mode (BatchNorm on the batch, the padded frames kept out of it), without dropout
    # (compiled code draws other random masks)
    cfg = configure(recipe("debug"), {"data.temporal.num_frames": 6, "model.image_size": 32, "loss.pcl_cost": cost,
                                      "parallel.compile": "objective", "model.dropout": 0.0}, weak=True)
    torch.manual_seed(0)
    batch = _encoder_batch()
    batch.action_labels = torch.tensor([0, 0, 2, -1])  # one pair, and a video of no known class
    batch.mask[1, 0, -2:] = False  # a short view: two padded frames
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        objective = build_objective(model, cfg.loss)
        if compiled:
            assert "compiled objective (encode)" in apply_speedups(model, cfg, objective)
        torch._dynamo.utils.counters.clear()
        out = objective(batch)
        out["loss"].backward()
        results.append(({k: v.detach() for k, v in out.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    (eager, g0), (comp, g1) = results
    assert eager["pairs"] == 1 and eager["ce"] > 0 and g0.keys() == g1.keys() and len(g0) > 10
    assert eager["pcl"] > 0 if cost == "views" else eager["pcl"] >= 0  # (joint: no exact hit on this batch)
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-5, atol=1e-6)
    for n in g0:  # (in training mode BatchNorm's normalisation spreads float32 rounding: per tensor, by norm)
        assert (g1[n] - g0[n]).norm() <= 1e-4 * g0[n].norm() + 1e-6, n
    # the cross-entropy: the mean over the known videos' views, 0 with none known
    model = build_model(cfg.model).eval()
    objective = build_objective(model, cfg.loss)
    logits = model(batch.views.flatten(0, 1), batch.mask.flatten(0, 1))["logits"]
    ref = F.cross_entropy(logits[:6], torch.tensor([0, 0, 0, 0, 2, 2]))
    torch.testing.assert_close(objective(batch)["ce"], ref)
    batch.action_labels = torch.full((4,), -1)
    out = objective(batch)
    assert out["ce"] == 0 and out["pairs"] == 0 and torch.isfinite(out["loss"])
