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


def test_the_eval_view_is_the_training_crops_centre_box_resized_to_a_square():
    """What training sees on average: a 16:9 frame's largest centre crop of ratio 4/3 (training's
    fallback box), a 4:3 frame whole, both squeezed to a square as training's crops are; a square
    frame resized whole (the synthetic set: unchanged by this)."""
    import torchvision.transforms.v2.functional as TF

    wide = to_tchw(_random_image(1, 90, 160)[None])
    box = draw_view_params(90, 160, dataclasses.replace(CFG, crop_scale=(1.0, 1.0)), np.random.default_rng(0)).crop
    assert box == (0, 20, 90, 120)  # (a box of area 1 cannot have a ratio <= 4/3 here: the fallback)
    torch.testing.assert_close(eval_geometric(wide, 32), TF.resize(wide[..., :, 20:140], [32, 32], antialias=True))
    four_three = to_tchw(_random_image(2, 60, 80)[None])
    torch.testing.assert_close(eval_geometric(four_three, 32), TF.resize(four_three, [32, 32], antialias=True))
    square = to_tchw(_random_image(3, 64, 64)[None])
    old_view = TF.center_crop(TF.resize(square, [32], antialias=True), [32, 32])
    torch.testing.assert_close(eval_geometric(square, 32), old_view)


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


def test_crop_views_crops_each_videos_two_views_as_apply_geometric_does():
    """The collate's crops: each video's first T frames are its first view, the last T its second;
    videos of different frame sizes side by side, in the caller's order."""
    from carl_scale.data.spatial import crop_views, to_tchw

    rng = np.random.default_rng(2)
    shapes = [(64, 80), (40, 56), (64, 80)]
    videos = [torch.from_numpy(rng.integers(0, 256, (2 * 4, h, w, 3), dtype=np.uint8)) for h, w in shapes]
    params = [tuple(draw_view_params(h, w, CFG, rng) for _ in range(2)) for h, w in shapes]
    got = crop_views(videos, params, 48)
    assert crop_views([], [], 48) == []
    for x, p, views in zip(videos, params, got):
        assert views.shape == (2, 4, 3, 48, 48) and views.dtype == torch.uint8
        for v in range(2):
            assert torch.equal(views[v], apply_geometric(to_tchw(x[4 * v:4 * v + 4]), p[v], 48))
