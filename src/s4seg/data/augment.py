"""Augmentations shared by every method: weak (geometric), strong (photometric), CutMix."""

from __future__ import annotations

import torch
from torch import Tensor


def cutmix(target: Tensor, source: Tensor, box: Tensor) -> Tensor:
    """Paste `source` into `target` where `box` is True.

    Works for images (B, C, H, W) and for per-pixel maps (B, H, W): pseudo-labels, confidences,
    valid masks. The same box is used for the image and its targets, so they stay aligned.
    """
    box = box.bool()
    if target.dim() == box.dim() + 1:
        box = box.unsqueeze(1)
    return torch.where(box, source, target)
