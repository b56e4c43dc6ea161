"""Shared scaffolding for the method tests: a tiny two-level segmenter, a seeded batch and a pseudo-label stub.

Importable as `tiny` because `tests/methods/conftest.py` puts this folder on `sys.path`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s4seg.config import IGNORE_INDEX
from s4seg.engine.method import Batch, Method, PseudoLabels
from s4seg.models.base import Segmenter

K = 3  # classes


class TinySegmenter(Segmenter):
    """c1 (conv + BN + ReLU, full resolution), c4 (strided conv) and a 1x1 classifier."""

    def __init__(self, num_classes: int = K) -> None:
        super().__init__(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.c1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.c4 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(10, num_classes, 1)

    def encode(self, images: Tensor) -> list[Tensor]:
        c1 = self.c1(self.normalize(images))
        return [c1, self.c4(c1)]

    def decode(self, feats: list[Tensor], size: tuple[int, int], return_embedding: bool = False) -> Any:
        c1, c4 = feats
        emb = torch.cat([c1, F.interpolate(c4, size=c1.shape[-2:], mode="nearest")], dim=1)
        logits = F.interpolate(self.classifier(emb), size=size, mode="bilinear", align_corners=False)
        return (logits, emb) if return_embedding else logits

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": [*self.c1.parameters(), *self.c4.parameters()], "head": [*self.classifier.parameters()]}


def make_batch(b: int = 2, size: int = 12, seed: int = 0, unlabeled: bool = True) -> Batch:
    """A seeded (b, size, size) batch; without `unlabeled`, only `x` and `y`.

    `y` ignores its last two columns, `valid_u` the last three rows and `valid_u_mix` the first two columns;
    the CutMix boxes are fixed (box1 rows 2:7 cols 3:9, box2 rows 6:11 cols 1:5), so `size` must be >= 12.
    The draw order from the generator is part of the contract: tests assert values computed from it.
    """
    g = torch.Generator().manual_seed(seed)

    def image() -> Tensor:
        return torch.rand(b, 3, size, size, generator=g)

    def labels() -> Tensor:
        return torch.randint(0, K, (b, size, size), generator=g)

    y = labels()
    y[:, :, -2:] = IGNORE_INDEX
    if not unlabeled:
        return Batch(x=image(), y=y)
    u_w, u_w_mix = image(), image()
    box1 = torch.zeros(b, size, size, dtype=torch.bool)
    box1[:, 2:7, 3:9] = True
    box2 = torch.zeros(b, size, size, dtype=torch.bool)
    box2[:, 6:11, 1:5] = True
    valid_u = torch.ones(b, size, size, dtype=torch.bool)
    valid_u[:, -3:] = False
    valid_u_mix = torch.ones(b, size, size, dtype=torch.bool)
    valid_u_mix[:, :, :2] = False
    return Batch(
        x=image(), y=y, u_w=u_w, u_s1=(u_w + 0.2 * image()).clamp(0, 1), u_s2=(u_w - 0.2 * image()).clamp(0, 1),
        box1=box1, box2=box2, valid_u=valid_u, u_w_mix=u_w_mix, u_s1_mix=(u_w_mix * 0.8),
        u_s2_mix=(u_w_mix * 0.6), valid_u_mix=valid_u_mix, y_u=labels(), y_u_mix=labels(), ids_u=torch.arange(b),
    )  # fmt: skip


def fake_pseudo(value_of: dict[int, int]) -> Callable[..., PseudoLabels]:
    """pseudo_labels stub: label = value_of[id(images)] everywhere, confidence 1, keep = valid."""

    def pseudo_labels(images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        b, _, h, w = images.shape
        v = torch.ones(b, h, w, dtype=torch.bool) if valid is None else valid
        return PseudoLabels(torch.full((b, h, w), value_of[id(images)]), torch.ones(b, h, w), v.clone())

    return pseudo_labels


def sgd_step(loss: Tensor, params: list[nn.Parameter], lr: float = 0.1) -> None:
    """One plain SGD step by hand (torch.optim's first step costs seconds of imports)."""
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(lr * g)


def ema_update(method: Method, t: int) -> None:
    """The engine's teacher update, Eq. (18): momentum min(1 - 1/(t+1), gamma)."""
    m = min(1 - 1 / (t + 1), method.ema_momentum())
    with torch.no_grad():
        for pt, ps in zip(method.teacher().parameters(), method.model.parameters(), strict=True):
            pt.mul_(m).add_(ps, alpha=1 - m)
