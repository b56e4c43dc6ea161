"""Augmentations shared by every method: weak (geometric), strong (photometric), CutMix.

Facts from the official UniMatch code (`reference/unimatch_v1_fixmatch.md` §2):

- weak: the long side is rescaled to a uniform integer in [int(0.5 L), int(2.0 L)] (aspect kept), then
  padded on the right/bottom to the crop (image 0 in raw [0, 1] space, mask 255; unlabeled tiles flag
  the padding as invalid instead), randomly cropped, and flipped horizontally with p = 0.5;
- strong (on the weak view, geometry untouched): with p = 0.8 colour jitter (brightness, contrast and
  saturation factors in [0.5, 1.5], hue shift in [-0.25, 0.25], the four in random order), grayscale
  with p = 0.2, Gaussian blur with p = 0.5 and sigma ~ U(0.1, 2.0);
- CutMix box: present with p = 0.5; area ~ U(0.02, 0.4) of the crop, aspect ~ U(0.3, 1/0.3),
  position resampled (with a new aspect) until the box fits.

Everything works on float tensors in [0, 1], (3, H, W), with torch only (no torchvision). Every random
draw comes from an explicit `torch.Generator`, so a sample's augmentation is a function of its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from s4seg.config import IGNORE_INDEX

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL and torchvision use


def cutmix(target: Tensor, source: Tensor, box: Tensor) -> Tensor:
    """Paste `source` into `target` where `box` is True.

    Works for images (B, C, H, W) and for per-pixel maps (B, H, W): pseudo-labels, confidences,
    valid masks. The same box is used for the image and its targets, so they stay aligned.
    """
    box = box.bool()
    if target.dim() == box.dim() + 1:
        box = box.unsqueeze(1)
    return torch.where(box, source, target)


# --------------------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------------------
def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=g).item())


def _chance(g: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=g).item() < p


# --------------------------------------------------------------------------------------------------
# Weak (geometric) augmentation
# --------------------------------------------------------------------------------------------------
def weak_augment(
    image: Tensor,
    mask: Tensor,
    crop: int,
    scale_range: tuple[float, float],
    g: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random rescale, pad, crop and horizontal flip of an image and its mask.

    image (3, H, W) float in [0, 1]; mask (H, W) int64. Returns (image, mask, valid), each (crop, crop):
    padding has image 0, mask IGNORE_INDEX and valid False. Labeled tiles train on `mask`; unlabeled
    tiles use `valid` (their mask is the hidden ground truth, kept for monitoring only).
    """
    _, h, w = image.shape
    long_side = max(h, w)
    new_long = _randint(g, int(scale_range[0] * long_side), int(scale_range[1] * long_side))
    new_h, new_w = max(1, round(h * new_long / long_side)), max(1, round(w * new_long / long_side))
    if (new_h, new_w) != (h, w):
        # antialias when shrinking, as PIL's bilinear resize does
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=new_h < h)[0].clamp_(0.0, 1.0)
        mask = F.interpolate(mask[None, None].float(), size=(new_h, new_w), mode="nearest")[0, 0].long()
    valid = torch.ones((new_h, new_w), dtype=torch.bool)

    pad_h, pad_w = max(0, crop - new_h), max(0, crop - new_w)
    if pad_h or pad_w:  # right/bottom only
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        valid = F.pad(valid, (0, pad_w, 0, pad_h), value=False)

    top = _randint(g, 0, image.shape[1] - crop)
    left = _randint(g, 0, image.shape[2] - crop)
    image = image[:, top : top + crop, left : left + crop]
    mask = mask[top : top + crop, left : left + crop]
    valid = valid[top : top + crop, left : left + crop]

    if _chance(g, 0.5):
        image, mask, valid = image.flip(-1), mask.flip(-1), valid.flip(-1)
    return image.contiguous(), mask.contiguous(), valid.contiguous()


# --------------------------------------------------------------------------------------------------
# Strong (photometric) augmentation
# --------------------------------------------------------------------------------------------------
def grayscale(image: Tensor) -> Tensor:
    """(3, H, W) -> (1, H, W) luma."""
    r, gr, b = image.unbind(0)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * gr + _GRAY_WEIGHTS[2] * b).unsqueeze(0)


def _blend(image: Tensor, other: Tensor, factor: float) -> Tensor:
    return (factor * image + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(image: Tensor, factor: float) -> Tensor:
    return _blend(image, torch.zeros_like(image), factor)


def adjust_contrast(image: Tensor, factor: float) -> Tensor:
    return _blend(image, grayscale(image).mean(), factor)


def adjust_saturation(image: Tensor, factor: float) -> Tensor:
    return _blend(image, grayscale(image), factor)


def rgb_to_hsv(image: Tensor) -> Tensor:
    """(3, ...) RGB in [0, 1] -> (3, ...) HSV, all in [0, 1] (hue as a fraction of the circle)."""
    r, g, b = image.unbind(0)
    maxc, _ = image.max(0)
    minc, _ = image.min(0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, sat, maxc])


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of `rgb_to_hsv`."""
    h, s, v = hsv.unbind(0)
    sector = torch.floor(h * 6.0)
    frac = h * 6.0 - sector
    sector = sector.long() % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * frac)
    t = v * (1.0 - s * (1.0 - frac))
    # For each of the six hue sectors, which of (v, q, p, t) goes to R, G and B.
    candidates = torch.stack([v, q, p, t])  # (4, ...)
    table = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=hsv.device)
    pick = table[sector]  # (..., 3)
    rgb = torch.gather(candidates, 0, pick.movedim(-1, 0))
    return rgb


def adjust_hue(image: Tensor, shift: float) -> Tensor:
    """Rotate the hue by `shift` (fraction of the circle, in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(image)
    hsv = torch.stack([(hsv[0] + shift) % 1.0, hsv[1], hsv[2]])
    return hsv_to_rgb(hsv).clamp(0.0, 1.0)


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a (C, H, W) image; kernel radius ceil(3 sigma), reflected borders."""
    radius = max(1, math.ceil(3.0 * sigma))
    radius = min(radius, image.shape[-1] - 1, image.shape[-2] - 1)  # reflect padding needs radius < size
    if radius < 1:
        return image
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def strong_augment(
    image: Tensor,
    g: torch.Generator,
    *,
    jitter_p: float = 0.8,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
    hue: float = 0.25,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> Tensor:
    """Photometric strong augmentation of a (3, H, W) image in [0, 1]; geometry is untouched."""
    if _chance(g, jitter_p):
        order = torch.randperm(4, generator=g).tolist()  # torchvision's ColorJitter applies ops in random order
        factors = [
            _uniform(g, 1 - brightness, 1 + brightness),
            _uniform(g, 1 - contrast, 1 + contrast),
            _uniform(g, 1 - saturation, 1 + saturation),
            _uniform(g, -hue, hue),
        ]
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for i in order:
            image = ops[i](image, factors[i])
    if _chance(g, grayscale_p):
        image = grayscale(image).expand(3, -1, -1).clone()
    if _chance(g, blur_p):
        image = gaussian_blur(image, _uniform(g, *blur_sigma))
    return image


# --------------------------------------------------------------------------------------------------
# CutMix
# --------------------------------------------------------------------------------------------------
def cutmix_box(
    size: int,
    g: torch.Generator,
    *,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> Tensor:
    """(size, size) bool box (True = take the partner's pixel); all False with probability 1 - p."""
    box = torch.zeros((size, size), dtype=torch.bool)
    if not _chance(g, p):
        return box
    box_area = _uniform(g, *area) * size * size
    while True:  # resample aspect and position until the box fits (official code's rule)
        ratio = _uniform(g, *aspect)
        w = int(math.sqrt(box_area / ratio))
        h = int(math.sqrt(box_area * ratio))
        x = _randint(g, 0, size - 1)
        y = _randint(g, 0, size - 1)
        if x + w <= size and y + h <= size:
            break
    box[y : y + h, x : x + w] = True
    return box
