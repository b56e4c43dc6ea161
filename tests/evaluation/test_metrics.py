"""Confusion-matrix metrics against a brute-force per-pixel count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s4seg.evaluation.metrics import ConfusionMatrix, confusion_matrix, metrics_from_confusion

K = 5


def brute_force(pred: np.ndarray, target: np.ndarray, k: int) -> dict:
    """Python loops over pixels and classes; the rules of the module docstring written out by hand."""
    counts = {(g, p): 0 for g in range(k) for p in range(k)}
    for p, g in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
        if g != 255:
            counts[(g, p)] += 1
    out = {"iou": [], "f1": [], "precision": [], "recall": [], "pixels": []}
    for c in range(k):
        tp = counts[(c, c)]
        fp = sum(counts[(g, c)] for g in range(k) if g != c)
        fn = sum(counts[(c, p)] for p in range(k) if p != c)
        out["pixels"].append(tp + fn)
        if tp + fp + fn == 0:
            for m in ("iou", "f1", "precision", "recall"):
                out[m].append(math.nan)
            continue
        out["iou"].append(tp / (tp + fp + fn))
        out["f1"].append(2 * tp / (2 * tp + fp + fn))
        out["precision"].append(tp / (tp + fp) if tp + fp else 0.0)
        out["recall"].append(tp / (tp + fn) if tp + fn else 0.0)
    correct = sum(counts[(c, c)] for c in range(k))
    total = sum(counts.values())
    present = [c for c in range(k) if not math.isnan(out["iou"][c])]
    out["oa"] = correct / total
    out["miou"] = sum(out["iou"][c] for c in present) / len(present)
    out["mf1"] = sum(out["f1"][c] for c in present) / len(present)
    out["counts"] = counts
    return out


@pytest.fixture
def case() -> tuple[np.ndarray, np.ndarray]:
    """Random labels where class 3 is absent everywhere and class 4 is predicted but absent from GT."""
    rng = np.random.default_rng(0)
    target = rng.choice([0, 1, 2, 255], size=(3, 9, 11), p=[0.3, 0.3, 0.25, 0.15]).astype(np.uint8)
    pred = rng.choice([0, 1, 2, 4], size=(3, 9, 11), p=[0.3, 0.3, 0.3, 0.1]).astype(np.uint8)
    return pred, target


def test_confusion_matrix_matches_pixel_loop(case):
    pred, target = case
    expected = brute_force(pred, target, K)["counts"]
    matrix = confusion_matrix(pred, target, K)
    assert matrix.dtype == np.int64
    assert {(g, p): int(matrix[g, p]) for g in range(K) for p in range(K)} == expected
    assert matrix.sum() == int((target != 255).sum())


def test_torch_and_numpy_agree(case):
    pred, target = case
    np.testing.assert_array_equal(
        confusion_matrix(torch.from_numpy(pred).long(), torch.from_numpy(target), K),
        confusion_matrix(pred, target, K),
    )


def test_metrics_match_brute_force_with_absent_classes(case):
    pred, target = case
    ref = brute_force(pred, target, K)
    m = metrics_from_confusion(confusion_matrix(pred, target, K))
    for name in ("iou", "f1", "precision", "recall"):
        np.testing.assert_allclose(getattr(m, name), ref[name], equal_nan=True)
    np.testing.assert_array_equal(m.pixels, ref["pixels"])
    # class 3 appears nowhere: NaN, out of the means; class 4 is predicted only: IoU 0, counted.
    assert np.isnan(m.iou[3]) and np.isnan(m.f1[3])
    assert m.iou[4] == 0.0 and m.recall[4] == 0.0 and m.pixels[4] == 0
    assert m.miou == pytest.approx(ref["miou"])
    assert m.miou == pytest.approx(np.mean(m.iou[[0, 1, 2, 4]]))
    assert m.mf1 == pytest.approx(ref["mf1"])
    assert m.oa == pytest.approx(ref["oa"])


def test_hand_computed_two_class_case():
    target = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 0]])
    m = metrics_from_confusion(confusion_matrix(pred, target, 3))
    # class 0: TP 1, FN 1, FP 0; class 1: TP 1, FP 1; class 2 nowhere.
    np.testing.assert_allclose(m.iou, [0.5, 0.5, np.nan])
    np.testing.assert_allclose(m.f1, [2 / 3, 2 / 3, np.nan])
    np.testing.assert_allclose(m.precision, [1.0, 0.5, np.nan])
    np.testing.assert_allclose(m.recall, [0.5, 1.0, np.nan])
    assert m.oa == pytest.approx(2 / 3)
    assert m.miou == pytest.approx(0.5)


def test_accumulation_equals_one_pass(case):
    pred, target = case
    acc = ConfusionMatrix(K)
    for p, t in zip(pred, target, strict=True):
        acc.update(p, t)
    np.testing.assert_array_equal(acc.matrix, confusion_matrix(pred, target, K))
    other = ConfusionMatrix(K)
    other.update(pred[:1], target[:1])
    acc += other
    assert acc.matrix.sum() == confusion_matrix(pred, target, K).sum() + (target[0] != 255).sum()


def test_all_ignored_gives_nan_means():
    m = metrics_from_confusion(confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 255), 2))
    assert m.total_pixels == 0 and math.isnan(m.oa) and math.isnan(m.miou)


def test_rows_long_format():
    m = metrics_from_confusion(np.array([[2, 0], [1, 1]]))
    rows = m.rows(["a", "b"])
    assert ("a", "iou", 2 / 3) in rows and ("b", "pixels", 2.0) in rows
    assert ("all", "oa", 0.75) in rows
    with pytest.raises(ValueError, match="1 class names for 2 classes"):
        m.rows(["a"])


def test_out_of_range_labels_raise():
    with pytest.raises(ValueError, match=r"prediction labels must lie in \[0, 3\)"):
        confusion_matrix(np.array([3]), np.array([0]), 3)
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 3\).*found \[7, 7\]"):
        confusion_matrix(np.array([0]), np.array([7]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3), np.zeros(4), 3)
    with pytest.raises(ValueError, match="square"):
        metrics_from_confusion(np.zeros((2, 3)))


def test_metrics_module_does_not_need_torch():
    import subprocess
    import sys

    code = "import sys, s4seg.evaluation.metrics; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
