"""Weak geometry keeps image and mask aligned; padding; strong photometric ops; CutMix boxes."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from s4seg.config import IGNORE_INDEX
from s4seg.data.augment import (
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    cutmix,
    cutmix_box,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_hsv,
    strong_augment,
    weak_augment,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _encoded(h: int = 20, w: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask of 4x4 blocks and an image whose every channel encodes the mask value."""
    blocks = torch.arange(25).view(5, 5) % 7
    mask = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)[:h, :w].long()
    image = (mask.float() / 10.0).expand(3, -1, -1).clone()
    return image, mask


@pytest.mark.parametrize("seed", range(6))
def test_weak_geometry_keeps_alignment_at_unit_scale(seed):
    image, mask = _encoded()
    out_img, out_mask, valid = weak_augment(image, mask, crop=24, scale_range=(1.0, 1.0), g=_gen(seed))
    assert out_img.shape == (3, 24, 24) and out_mask.shape == valid.shape == (24, 24)
    # 20x20 padded to 24: exactly 4 rows and 4 columns of padding, at the bottom and on one side
    assert valid.sum() == 400
    assert (out_mask[valid] == torch.round(out_img[0][valid] * 10).long()).all()
    assert (out_mask[~valid] == IGNORE_INDEX).all() and (out_img[:, ~valid] == 0).all()
    assert not valid[-4:].any()  # bottom padding stays at the bottom (no vertical flip)


@pytest.mark.parametrize("seed", range(6))
def test_weak_geometry_keeps_alignment_when_rescaled(seed):
    image, mask = _encoded()
    out_img, out_mask, valid = weak_augment(image, mask, crop=16, scale_range=(0.5, 2.0), g=_gen(seed))
    decoded = torch.round(out_img[0] * 10).long()
    # bilinear blends values at block borders; inside blocks the image still encodes the mask
    agree = (decoded == out_mask)[valid].float().mean()
    assert agree > 0.6
    assert (out_mask[~valid] == IGNORE_INDEX).all()


def test_weak_flip_and_crop_are_exact_permutations():
    image = torch.rand(3, 16, 16)
    mask = torch.arange(256).view(16, 16)
    flips = set()
    for seed in range(12):
        out_img, out_mask, _ = weak_augment(image, mask, crop=8, scale_range=(1.0, 1.0), g=_gen(seed))
        ys, xs = out_mask // 16, out_mask % 16
        assert torch.equal(out_img, image[:, ys, xs])  # every output pixel is the one its mask names
        flips.add(bool(xs[0, 0] > xs[0, 1]))
    assert flips == {True, False}


def test_weak_scale_range_is_respected():
    image, mask = torch.rand(3, 40, 40), torch.zeros(40, 40, dtype=torch.long)
    padded = []
    for seed in range(20):
        _, _, valid = weak_augment(image, mask, crop=40, scale_range=(0.5, 0.75), g=_gen(seed))
        side = int(valid.any(1).sum())  # valid rows (flips move the padding columns, not rows)
        assert 20 <= side <= 30
        padded.append(side)
    assert len(set(padded)) > 3


def test_weak_is_deterministic_per_seed():
    image, mask = torch.rand(3, 20, 20), torch.randint(0, 3, (20, 20))
    a = weak_augment(image, mask, 16, (0.5, 2.0), _gen(3))
    b = weak_augment(image, mask, 16, (0.5, 2.0), _gen(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_hsv_round_trip_and_against_colorsys():
    rgb = torch.rand(3, 7, 5)
    rgb[:, 0, 0] = 0.5  # a gray pixel: hue and saturation 0
    hsv = rgb_to_hsv(rgb)
    for y, x in [(0, 0), (1, 2), (6, 4), (3, 3)]:
        expected = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
        assert hsv[:, y, x].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-5)


def test_hue_shift_matches_colorsys():
    rgb = torch.rand(3, 4, 4)
    out = adjust_hue(rgb, 0.2)
    h, s, v = colorsys.rgb_to_hsv(*rgb[:, 1, 2].tolist())
    assert out[:, 1, 2].tolist() == pytest.approx(colorsys.hsv_to_rgb((h + 0.2) % 1.0, s, v), abs=1e-5)
    assert torch.allclose(adjust_hue(rgb, 0.0), rgb, atol=1e-5)


def test_saturation_and_contrast():
    rgb = torch.rand(3, 4, 4)
    gray = adjust_saturation(rgb, 0.0)
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    assert torch.allclose(gray[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    flat = adjust_contrast(rgb, 0.0)
    assert torch.allclose(flat, flat.mean().expand_as(flat))
    assert torch.allclose(adjust_contrast(rgb, 1.0), rgb)


def test_gaussian_blur_preserves_constant_and_mean():
    const = torch.full((3, 10, 10), 0.3)
    assert torch.allclose(gaussian_blur(const, 1.5), const)
    impulse = torch.zeros(1, 21, 21)
    impulse[0, 10, 10] = 1.0
    blurred = gaussian_blur(impulse, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 10, 10] < 0.2 and blurred[0, 10, 11] == pytest.approx(blurred[0, 11, 10])


def test_strong_augment_is_photometric_and_deterministic():
    image = torch.rand(3, 16, 16)
    outs = [strong_augment(image, _gen(s)) for s in range(10)]
    assert all(o.shape == image.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert torch.equal(strong_augment(image, _gen(4)), outs[4])
    assert sum(not torch.allclose(o, image) for o in outs) >= 7  # p(no op at all) = 0.2 * 0.8 * 0.5
    # geometry untouched: a one-pixel white dot on black stays the brightest pixel (no blur/jitter moves it)
    dot = torch.zeros(3, 9, 9)
    dot[:, 2, 6] = 1.0
    for s in range(10):
        out = strong_augment(dot, _gen(s), jitter_p=0.0, grayscale_p=0.0, blur_p=1.0)
        assert divmod(int(out.sum(0).argmax()), 9) == (2, 6)


def test_cutmix_box_statistics():
    size = 32
    boxes = [cutmix_box(size, _gen(s)) for s in range(400)]
    present = [b for b in boxes if b.any()]
    assert 0.4 < len(present) / len(boxes) < 0.6  # p = 0.5
    for b in present:
        ys, xs = torch.nonzero(b, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert b.sum() == h * w  # one solid rectangle, inside the crop by construction
        assert h * w <= 0.4 * size * size
        assert 0.3 - 0.15 <= h / w <= 1 / 0.3 + 1.5  # aspect range, up to integer flooring
    areas = np.array([b.float().mean().item() for b in present])
    assert 0.15 < areas.mean() < 0.25  # E[U(0.02, 0.4)] = 0.21, minus flooring


def test_cutmix_pastes_inside_box():
    target, source = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    box[0, 1:3, 1:3] = True
    mixed = cutmix(target, source, box)
    assert mixed[0, :, 1:3, 1:3].eq(1).all() and mixed.sum() == 3 * 4
    labels = cutmix(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), 5), box)
    assert labels.sum() == 5 * 4
