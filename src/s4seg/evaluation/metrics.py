"""Confusion-matrix segmentation metrics, accumulated over a whole test set.

The confusion matrix `M` is (K, K) int64 with rows = ground truth and columns = prediction. Pixels
whose ground truth is `IGNORE_INDEX` (255) are not counted at all. `M` is additive, so a test set is
scored by summing the matrices of its tiles (or scenes) and computing the metrics once at the end:
this is *not* the mean of per-tile scores.

Per class c, with TP = M[c, c], FP = column sum - TP, FN = row sum - TP:

    iou       = TP / (TP + FP + FN)
    f1        = 2 TP / (2 TP + FP + FN)   (the Dice score of the class)
    precision = TP / (TP + FP)
    recall    = TP / (TP + FN)
    pixels    = TP + FN                   (ground-truth pixels of the class)

Absent classes, precisely:
- a class that appears in neither the ground truth nor the prediction has NaN for iou, f1, precision
  and recall, and is left out of every mean (mIoU, mF1, ...): nothing can be said about it;
- a class that appears in only one of the two has a defined value: absent from the ground truth but
  predicted gives iou = f1 = precision = 0 (every prediction of it is wrong) and it *counts* in the
  means; present in the ground truth but never predicted gives iou = f1 = recall = 0;
- a 0/0 ratio of a class that does appear (recall of a class absent from the ground truth, precision
  of a class never predicted) is 0, not NaN, so the four per-class metrics are always NaN together.

    miou, mf1, mprecision, mrecall = NaN-ignoring means over classes
    oa = trace(M) / sum(M)  (overall pixel accuracy; NaN when no pixel was counted)

The official UniMatch / CorrMatch code sums intersections and unions the same way but divides the
mean by all K classes, so a class absent from both would count as 0 there; on a test set that holds
every class (the usual case) the two rules agree.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from s4seg.config import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

CLASS_METRICS = ("iou", "f1", "precision", "recall", "pixels")
MEAN_METRICS = ("miou", "mf1", "mprecision", "mrecall", "oa", "pixels")


def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction, over pixels with target != ignore.

    `pred` and `target` are integer arrays of the same shape (any number of dims), numpy or torch
    (a CUDA tensor is counted on its device). Predictions must lie in [0, K); targets in [0, K) or
    equal `ignore_index`, otherwise ValueError.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    k = int(num_classes)
    # torch only if the caller already uses it: this module stays importable without torch (the report).
    torch = sys.modules.get("torch")
    if torch is not None and (isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor)):
        device = pred.device if isinstance(pred, torch.Tensor) else target.device
        p = torch.as_tensor(pred, device=device).reshape(-1).long()
        t = torch.as_tensor(target, device=device).reshape(-1).long()
        valid = t != ignore_index
        p, t = p[valid], t[valid]
        _check_range(int(p.min()) if p.numel() else 0, int(p.max()) if p.numel() else 0, k, "prediction")
        _check_range(int(t.min()) if t.numel() else 0, int(t.max()) if t.numel() else 0, k, "target")
        counts = torch.bincount(t * k + p, minlength=k * k)
        return counts.reshape(k, k).cpu().numpy().astype(np.int64)
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    t = np.asarray(target).reshape(-1).astype(np.int64)
    valid = t != ignore_index
    p, t = p[valid], t[valid]
    if p.size:
        _check_range(int(p.min()), int(p.max()), k, "prediction")
        _check_range(int(t.min()), int(t.max()), k, "target")
    # One bincount over the flattened (gt, pred) pair index: the whole matrix in one vectorised pass.
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def _check_range(lo: int, hi: int, k: int, what: str) -> None:
    if lo < 0 or hi >= k:
        raise ValueError(f"{what} labels must lie in [0, {k}) (or be the ignore index); found [{lo}, {hi}]")


@dataclass(frozen=True)
class SegMetrics:
    """Metrics of one confusion matrix. Per-class arrays have length K (NaN: class absent, see module doc)."""

    iou: np.ndarray
    f1: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    pixels: np.ndarray  # ground-truth pixel count per class (int64)
    oa: float
    miou: float
    mf1: float
    mprecision: float
    mrecall: float
    total_pixels: int

    def per_class(self) -> dict[str, np.ndarray]:
        return {"iou": self.iou, "f1": self.f1, "precision": self.precision, "recall": self.recall,
                "pixels": self.pixels}

    def means(self) -> dict[str, float]:
        return {"miou": self.miou, "mf1": self.mf1, "mprecision": self.mprecision,
                "mrecall": self.mrecall, "oa": self.oa, "pixels": float(self.total_pixels)}

    def rows(self, classes: Sequence[str]) -> list[tuple[str, str, float]]:
        """Long-format rows (class, metric, value): per-class metrics, then the means with class "all"."""
        if len(classes) != len(self.iou):
            raise ValueError(f"{len(classes)} class names for {len(self.iou)} classes")
        out = [(name, metric, float(values[c]))
               for c, name in enumerate(classes) for metric, values in self.per_class().items()]
        out += [("all", metric, float(value)) for metric, value in self.means().items()]
        return out


def metrics_from_confusion(matrix: np.ndarray) -> SegMetrics:
    """All metrics of a (K, K) confusion matrix (rows = ground truth); rules in the module docstring."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K); found shape {m.shape}")
    tp = np.diag(m)
    gt = m.sum(axis=1)
    predicted = m.sum(axis=0)
    fp, fn = predicted - tp, gt - tp
    present = (gt + predicted) > 0

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        # 0/0 of a class that does appear is 0; a class appearing nowhere is NaN (excluded from means).
        out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        out[~present] = np.nan
        return out

    iou = ratio(tp, tp + fp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    total = m.sum()
    return SegMetrics(
        iou=iou, f1=f1, precision=precision, recall=recall, pixels=gt.astype(np.int64),
        oa=float(tp.sum() / total) if total > 0 else float("nan"),
        miou=_nanmean(iou), mf1=_nanmean(f1), mprecision=_nanmean(precision), mrecall=_nanmean(recall),
        total_pixels=int(total),
    )


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


class ConfusionMatrix:
    """Incremental accumulator: `update(pred, target)` per batch, `metrics()` once at the end."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot add a {other.num_classes}-class matrix to a {self.num_classes}-class one")
        self.matrix += other.matrix
        return self

    def metrics(self) -> SegMetrics:
        return metrics_from_confusion(self.matrix)
