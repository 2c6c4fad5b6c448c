"""Spatial augmentation: one draw per view, identical on every frame, different across views."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from carl_scale.data.config import SpatialConfig
from carl_scale.data.spatial import (apply_geometric, apply_photometric, draw_view_params, eval_geometric,
                                     eval_photometric, photometric_batch, to_tchw)

CFG = SpatialConfig(image_size=48, blur_p=0.5)


def _random_image(seed: int, h: int = 64, w: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _view(frames: np.ndarray, params) -> torch.Tensor:
    return apply_photometric(apply_geometric(to_tchw(frames), params, CFG.image_size), params, CFG)


def test_same_transform_on_every_frame():
    img = _random_image(0)
    frames = np.stack([img] * 6)
    for seed in range(20):
        p = draw_view_params(64, 80, CFG, np.random.default_rng(seed))
        out = _view(frames, p)
        assert out.shape == (6, 3, 48, 48) and out.dtype == torch.float32
        for t in range(1, 6):
            torch.testing.assert_close(out[t], out[0], rtol=0, atol=0)


def test_per_frame_equals_whole_view():
    """Applying the view's parameters to each frame alone gives the same result as to the clip:
    nothing in the transform depends on the other frames."""
    frames = np.stack([_random_image(s) for s in range(4)])
    p = draw_view_params(64, 80, CFG, np.random.default_rng(3))
    whole = _view(frames, p)
    for t in range(4):
        torch.testing.assert_close(whole[t], _view(frames[t : t + 1], p)[0], rtol=1e-5, atol=1e-5)


def test_views_get_different_parameters():
    rng = np.random.default_rng(0)
    draws = [draw_view_params(64, 80, CFG, rng) for _ in range(40)]
    assert len({d.crop for d in draws}) > 30
    assert {d.flip for d in draws} == {True, False}
    assert {d.grayscale for d in draws} == {True, False}
    assert {d.blur_sigma is None for d in draws} == {True, False}
    img = np.stack([_random_image(1)] * 2)
    assert not torch.allclose(_view(img, draws[0]), _view(img, draws[1]))


def test_crop_box_bounds_and_area():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = draw_view_params(90, 160, CFG, rng).crop
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 160
        # area in crop_scale (0.8-1, rounding aside) or the fallback: the largest centre crop of
        # ratio 4/3, 90 x 120 = 0.75 of this 90 x 160 frame
        assert 0.74 * 90 * 160 <= h * w <= 90 * 160


def test_eval_transform_is_deterministic_centre_crop():
    frames = to_tchw(np.stack([_random_image(5, 60, 100)] * 2))
    out = eval_photometric(eval_geometric(frames, 32), CFG)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, eval_photometric(eval_geometric(frames, 32), CFG))


def test_separable_blur_equals_torchvision():
    import torchvision.transforms.v2.functional as TF

    from carl_scale.data.spatial import gaussian_blur_separable

    g = torch.Generator().manual_seed(0)
    for shape, k, sigma in [((4, 3, 40, 56), 5, 1.7), ((2, 3, 9, 7), 3, 0.4), ((1, 3, 112, 112), 11, 2.0)]:
        x = torch.rand(shape, generator=g)
        for method in ("shifts", "conv"):  # the CPU's way and the GPU's
            torch.testing.assert_close(gaussian_blur_separable(x, k, sigma, method),
                                       TF.gaussian_blur(x, [k, k], [sigma, sigma]), atol=1e-5, rtol=1e-5)


def test_yiq_hue_shift_moves_hue_like_hsv():
    """Hue 0 is the identity; a shift moves pure colours' HSV hue by about the same amount."""
    from carl_scale.data.spatial import adjust_hue_yiq

    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(adjust_hue_yiq(x, 0.0), x, atol=1e-6, rtol=0)
    prim = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]]).view(3, 3, 1, 1)
    for shift in (0.05, -0.08):
        out = adjust_hue_yiq(prim, shift)

        def hue(rgb):  # HSV hue in turns
            r, g_, b = rgb.flatten(1).unbind(1)
            return torch.atan2(torch.sqrt(torch.tensor(3.0)) * (g_ - b), 2 * r - g_ - b) / (2 * torch.pi)

        moved = torch.remainder(hue(out) - hue(prim) + 0.5, 1.0) - 0.5
        assert torch.all((moved - shift).abs() < 0.05), moved  # YIQ and HSV hue differ a little


def test_the_batched_colour_augmentation_equals_the_per_view_one():
    """photometric_batch (the GPU collate's path) against apply_photometric view by view: every
    jitter order, none, grayscale, blur with different sigmas or none, in one batch."""
    cfg = SpatialConfig(image_size=40, blur_p=0.5, grayscale_p=0.3)
    rng = np.random.default_rng(0)
    params = [draw_view_params(64, 80, cfg, rng) for _ in range(12)]
    params[0] = dataclasses.replace(params[0], jitter_order=None, grayscale=False, blur_sigma=None)
    params[1] = dataclasses.replace(params[1], jitter_order=(1, 0, 3, 2), grayscale=True, blur_sigma=2.0)
    params[2] = dataclasses.replace(params[2], jitter_order=(3, 2, 1, 0), grayscale=False, blur_sigma=0.3)
    assert {p.grayscale for p in params} == {True, False} and None in {p.blur_sigma for p in params}
    frames = torch.from_numpy(rng.integers(0, 256, (12, 5, 3, 40, 40), dtype=np.uint8))
    ref = torch.stack([apply_photometric(frames[i], p, cfg) for i, p in enumerate(params)])
    torch.testing.assert_close(photometric_batch(frames, params, cfg), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(photometric_batch(frames[:1], params[:1], cfg), ref[:1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 view parameters for 12 views"):
        photometric_batch(frames, params[:2], cfg)


def _crop_reference(frames: torch.Tensor, p, size: int) -> torch.Tensor:
    """torchvision's resized crop and flip in float (its GPU path before rounding), one view."""
    import torchvision.transforms.v2.functional as TF

    out = TF.resized_crop(to_tchw(frames).double(), *p.crop, [size, size], antialias=True)
    return TF.horizontal_flip(out) if p.flip else out


def test_the_batched_crops_equal_torchvisions_resized_crop():
    """crops_batched (the GPU collate's crops) against torchvision view by view: its matrices hold
    torch's antialiased weights (shrinking, enlarging, a crop of exactly the output size, flips, the
    centre fallback), and its uint8 output is that rounded, as torchvision rounds on a GPU, but for
    pixels within float rounding of a half level."""
    from carl_scale.data.spatial import crop_matrices, crops_batched

    size, rng = 48, np.random.default_rng(1)
    params = [draw_view_params(64, 80, CFG, rng) for _ in range(8)]
    params[0] = dataclasses.replace(params[0], crop=(10, 20, 30, 24), flip=True)  # enlarged
    params[1] = dataclasses.replace(params[1], crop=(3, 5, 48, 48), flip=False)  # the output size: a copy
    params[2] = dataclasses.replace(params[2], crop=(0, 0, 64, 80), flip=True)  # the whole frame
    assert {p.flip for p in params} == {True, False}
    frames = torch.from_numpy(rng.integers(0, 256, (8, 5, 64, 80, 3), dtype=np.uint8))
    ref = torch.stack([_crop_reference(frames[i], p, size) for i, p in enumerate(params)])
    rows, cols = crop_matrices(params, 64, 80, size)
    planes = frames.permute(0, 1, 4, 2, 3).double()  # (V, T, 3, H, W)
    exact = torch.from_numpy(rows)[:, None, None] @ planes @ torch.from_numpy(cols)[:, None, None]
    torch.testing.assert_close(exact, ref, rtol=0, atol=1e-9)
    assert torch.equal(exact[1], frames[1, :, 3:51, 5:53].permute(0, 3, 1, 2).double())
    for dtype, flips in ((torch.float32, 0.002), (torch.float16, 0.1)):
        got = crops_batched(frames, params, size, dtype=dtype)
        assert got.dtype == torch.uint8 and got.shape == (8, 5, 3, size, size)
        diff = (got.double() - ref.round()).abs()
        assert diff.max() <= 1 and (diff > 0).double().mean() < flips, (dtype, (diff > 0).double().mean())
        if dtype == torch.float32:  # only where the exact value is within float rounding of a half level
            assert ((ref - ref.floor() - 0.5).abs()[diff > 0] < 1e-3).all()
    # a view per chunk of working memory changes nothing
    assert torch.equal(crops_batched(frames, params, size, budget_bytes=1), crops_batched(frames, params, size))
    with pytest.raises(ValueError, match="2 view parameters for 8 views"):
        crops_batched(frames, params[:2], size)


def test_crop_views_per_view_and_batched_agree_across_frame_sizes():
    """The collate's crops: the videos of each frame size batched together, in the caller's order;
    the CPU's per-view path (torchvision's uint8 kernel) within one grey level of them."""
    from carl_scale.data.spatial import crop_views

    rng = np.random.default_rng(2)
    shapes = [(64, 80), (40, 56), (64, 80)]
    videos = [torch.from_numpy(rng.integers(0, 256, (2 * 4, h, w, 3), dtype=np.uint8)) for h, w in shapes]
    params = [tuple(draw_view_params(h, w, CFG, rng) for _ in range(2)) for h, w in shapes]
    per_view, batched = (crop_views(videos, params, 48, method) for method in ("per_view", "batched"))
    chunked = crop_views(videos, params, 48, "batched", budget_bytes=1)  # a video at a time
    assert all(torch.equal(a, b) for a, b in zip(batched, chunked))
    assert crop_views([], [], 48) == []
    for x, p, a, b in zip(videos, params, per_view, batched):
        assert a.shape == b.shape == (2, 4, 3, 48, 48) and a.dtype == b.dtype == torch.uint8
        assert (a.int() - b.int()).abs().max() <= 1
        for v in range(2):  # each view of the video's frames: the first T, then the second T
            torch.testing.assert_close(a[v], apply_geometric(to_tchw(x[4 * v:4 * v + 4]), p[v], 48), rtol=0, atol=0)
