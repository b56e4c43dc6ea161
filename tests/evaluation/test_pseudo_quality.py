"""Pseudo-label quality metrics against brute-force pixel and region counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from s4seg.evaluation.pseudo_quality import METRICS, PseudoQuality, flat_metrics

IGN = 255


def _brute_pixels(pseudo: np.ndarray, keep: np.ndarray, gt: np.ndarray, k: int) -> dict[str, list[float]]:
    """Loop over every pixel; ratios as the module docstring defines them, per class and overall (last)."""
    c = {name: [0] * (k + 1) for name in ("valid", "kept", "correct", "kept_correct", "gt_valid")}
    for p, kp, g in zip(pseudo.ravel(), keep.ravel(), gt.ravel(), strict=True):
        if g == IGN:
            continue
        for idx in (int(p), k):
            c["valid"][idx] += 1
            c["kept"][idx] += bool(kp)
            c["correct"][idx] += int(p == g)
            c["kept_correct"][idx] += int(p == g and kp)
        c["gt_valid"][int(g)] += 1
        c["gt_valid"][k] += 1

    def r(a: str, b: str) -> list[float]:
        return [c[a][i] / c[b][i] if c[b][i] else math.nan for i in range(k + 1)]

    kept_share = [c["kept"][i] / c["kept"][k] for i in range(k)]
    gt_share = [c["gt_valid"][i] / c["gt_valid"][k] for i in range(k)]
    bias = [kept_share[i] - gt_share[i] for i in range(k)]
    return {"accuracy": r("kept_correct", "kept"), "accuracy_all": r("correct", "valid"),
            "coverage": r("kept", "valid"), "mining_ratio": r("kept_correct", "correct"),
            "effective_ratio": r("kept_correct", "gt_valid"), "kept_share": [*kept_share, 1.0],
            "class_bias": [*bias, sum(abs(b) for b in bias) / 2]}


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12


def test_pixel_metrics_match_brute_force_with_ignore_pixels() -> None:
    rng = np.random.default_rng(0)
    k = 4
    gt = rng.integers(0, k, (3, 9, 7)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = IGN  # ignore pixels
    pseudo = np.where(rng.random(gt.shape) < 0.6, np.where(gt == IGN, 0, gt), rng.integers(0, k, gt.shape))
    pseudo[..., 0] = 3  # class 3 predicted only in the first column ...
    gt[gt == 3] = 2  # ... and never in the ground truth: accuracy of class 3 is 0, effective ratio NaN
    keep = rng.random(gt.shape) < 0.7
    keep[0, 0, 0], gt[0, 0, 0] = True, IGN  # a kept ignore pixel must not count anywhere
    q = PseudoQuality(k)
    q.update(pseudo[0], keep[0], gt[0])  # tiles one by one and as a batch give the same counts
    q.update(pseudo[1:], keep[1:], gt[1:])
    expected = _brute_pixels(pseudo, keep, gt, k)
    per_class, overall = q.per_class(), q.metrics()
    for name, values in expected.items():
        for c in range(k):
            assert _close(per_class[name][c], values[c]), (name, c, per_class[name][c], values[c])
        assert _close(overall[name], values[k]), (name, overall[name], values[k])
    assert per_class["accuracy"][3] == 0.0 and math.isnan(per_class["effective_ratio"][3])


def test_hand_counted_case() -> None:
    # 2x3 tile: gt [[0, 0, 1], [1, 255, 1]], pseudo [[0, 1, 1], [1, 1, 0]], keep [[1, 1, 0], [1, 1, 1]]
    gt = np.array([[0, 0, 1], [1, IGN, 1]], np.uint8)
    pseudo = np.array([[0, 1, 1], [1, 1, 0]])
    keep = np.array([[1, 1, 0], [1, 1, 1]], bool)
    q = PseudoQuality(2)
    q.update(pseudo, keep, gt)
    m = q.metrics()
    # valid: 5 pixels; correct: (0,0), (0,2), (1,0) = 3; kept valid: (0,0), (0,1), (1,0), (1,2) = 4;
    # kept & correct: (0,0), (1,0) = 2
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["accuracy_all"] == pytest.approx(3 / 5)
    assert m["coverage"] == pytest.approx(4 / 5)
    assert m["mining_ratio"] == pytest.approx(2 / 3)
    assert m["effective_ratio"] == pytest.approx(2 / 5)
    # kept pseudo-labels 0, 1, 1, 0: mix (1/2, 1/2); valid ground truth 0, 0, 1, 1, 1: mix (2/5, 3/5)
    per_class = q.per_class()
    assert per_class["kept_share"] == pytest.approx([1 / 2, 1 / 2])
    assert per_class["class_bias"] == pytest.approx([1 / 10, -1 / 10])
    assert m["class_bias"] == pytest.approx(1 / 10)


def test_propagated_metrics_match_brute_force() -> None:
    """Kept pixels outside the method's confident set, counted pixel by pixel; tiles without a confident set
    (the second update) count nowhere in the propagated metrics."""
    rng = np.random.default_rng(3)
    k = 3
    gt = rng.integers(0, k, (2, 8, 6)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.15] = IGN
    pseudo = np.where(rng.random(gt.shape) < 0.7, np.where(gt == IGN, 1, gt), rng.integers(0, k, gt.shape))
    confident = rng.random(gt.shape) < 0.5
    keep = confident | (rng.random(gt.shape) < 0.4)  # M = F united with the "regions"
    keep[0, 0, 0], confident[0, 0, 0], gt[0, 0, 0] = True, False, IGN  # an added ignore pixel counts nowhere
    q = PseudoQuality(k)
    q.update(pseudo, keep, gt, confident=confident)
    q.update(rng.integers(0, k, (4, 4)), np.ones((4, 4), bool), rng.integers(0, k, (4, 4)).astype(np.uint8))
    base, added, added_ok = [0] * (k + 1), [0] * (k + 1), [0] * (k + 1)
    for p_, kp, f, g in zip(pseudo.ravel(), keep.ravel(), confident.ravel(), gt.ravel(), strict=True):
        if g == IGN:
            continue
        for idx in (int(p_), k):
            base[idx] += 1
            added[idx] += int(kp and not f)
            added_ok[idx] += int(kp and not f and p_ == g)
    per_class, overall = q.per_class(), q.metrics()
    for c in range(k):
        assert _close(per_class["propagated_coverage"][c], added[c] / base[c])
        assert _close(per_class["propagated_accuracy"][c], added_ok[c] / added[c] if added[c] else math.nan)
    assert overall["propagated_coverage"] == pytest.approx(added[k] / base[k])
    assert overall["propagated_accuracy"] == pytest.approx(added_ok[k] / added[k])


def test_propagated_metrics_hand_counted_and_nan_without_a_confident_set() -> None:
    # 1x4 tile: gt [0, 1, 1, 255], pseudo [0, 0, 1, 1], F [1, 0, 0, 0], M [1, 1, 1, 1]:
    # valid pixels 3; added (M & ~F, valid): pixels 1 (wrong) and 2 (right)
    gt = np.array([[0, 1, 1, IGN]], np.uint8)
    q = PseudoQuality(2)
    q.update(np.array([[0, 0, 1, 1]]), np.ones((1, 4), bool), gt, confident=np.array([[1, 0, 0, 0]], bool))
    m = q.metrics()
    assert m["propagated_coverage"] == pytest.approx(2 / 3)
    assert m["propagated_accuracy"] == pytest.approx(1 / 2)
    assert q.per_class()["propagated_accuracy"] == pytest.approx([0.0, 1.0])
    plain = PseudoQuality(2)
    plain.update(np.array([[0, 0, 1, 1]]), np.ones((1, 4), bool), gt)
    assert math.isnan(plain.metrics()["propagated_coverage"]) and math.isnan(plain.metrics()["propagated_accuracy"])
    with pytest.raises(ValueError, match="confident shape"):
        q.update(np.zeros((1, 4), int), np.ones((1, 4), bool), gt, confident=np.ones((1, 3), bool))


def test_relabelled_metrics_match_brute_force() -> None:
    """Confident pixels whose label the expansion changed, counted pixel by pixel with their accuracy after and
    before; a tile with a confident set but no prior label (the second update) counts nowhere in them."""
    rng = np.random.default_rng(5)
    k = 3
    gt = rng.integers(0, k, (3, 7, 5)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.15] = IGN
    prior = rng.integers(0, k, gt.shape)
    pseudo = np.where(rng.random(gt.shape) < 0.4, rng.integers(0, k, gt.shape), prior)  # some relabelled
    confident = rng.random(gt.shape) < 0.6
    keep = confident | (rng.random(gt.shape) < 0.3)
    q = PseudoQuality(k)
    q.update(pseudo, keep, gt, confident=confident, prior=prior.astype(np.uint8))
    q.update(rng.integers(0, k, (4, 4)), np.ones((4, 4), bool), rng.integers(0, k, (4, 4)).astype(np.uint8),
             confident=np.ones((4, 4), bool))
    base, changed, after_ok, before_ok = ([0] * (k + 1) for _ in range(4))
    for p_, f, b, g in zip(pseudo.ravel(), confident.ravel(), prior.ravel(), gt.ravel(), strict=True):
        if g == IGN:
            continue
        for idx in (int(p_), k):
            base[idx] += 1
            if f and b != p_:
                changed[idx] += 1
                after_ok[idx] += int(p_ == g)
                before_ok[idx] += int(b == g)
    assert changed[k] > 0
    per_class, overall = q.per_class(), q.metrics()
    for c in range(k):
        assert _close(per_class["relabelled_coverage"][c], changed[c] / base[c])
        assert _close(per_class["relabelled_accuracy"][c], after_ok[c] / changed[c] if changed[c] else math.nan)
        assert _close(per_class["relabelled_prior_accuracy"][c],
                      before_ok[c] / changed[c] if changed[c] else math.nan)
    assert overall["relabelled_coverage"] == pytest.approx(changed[k] / base[k])
    assert overall["relabelled_accuracy"] == pytest.approx(after_ok[k] / changed[k])
    assert overall["relabelled_prior_accuracy"] == pytest.approx(before_ok[k] / changed[k])


def test_relabelled_metrics_hand_counted() -> None:
    # 1x5 tile: gt [0, 0, 1, 1, 255], prior [0, 1, 1, 0, 0], pseudo after the expansion [1, 0, 1, 1, 1],
    # F [1, 1, 0, 1, 1]. Valid 4. Changed inside F (valid): pixel 0 (right -> wrong), pixel 1 (wrong -> right),
    # pixel 3 (wrong -> right); pixel 2 is outside F (unchanged anyway), pixel 4 is void.
    gt = np.array([[0, 0, 1, 1, IGN]], np.uint8)
    q = PseudoQuality(2)
    q.update(np.array([[1, 0, 1, 1, 1]]), np.ones((1, 5), bool), gt, confident=np.array([[1, 1, 0, 1, 1]], bool),
             prior=np.array([[0, 1, 1, 0, 0]], np.uint8))
    m = q.metrics()
    assert m["relabelled_coverage"] == pytest.approx(3 / 4)
    assert m["relabelled_accuracy"] == pytest.approx(2 / 3)
    assert m["relabelled_prior_accuracy"] == pytest.approx(1 / 3)
    # by the new label: class 0 gets pixel 1 (right after, wrong before); class 1 gets pixels 0 and 3
    assert q.per_class()["relabelled_accuracy"] == pytest.approx([1.0, 1 / 2])
    assert q.per_class()["relabelled_prior_accuracy"] == pytest.approx([0.0, 1 / 2])
    plain = PseudoQuality(2)
    plain.update(np.array([[0, 0, 1, 1, 1]]), np.ones((1, 5), bool), gt, confident=np.ones((1, 5), bool))
    assert math.isnan(plain.metrics()["relabelled_coverage"])
    with pytest.raises(ValueError, match="needs confident"):
        plain.update(np.zeros((1, 5), int), np.ones((1, 5), bool), gt, prior=np.zeros((1, 5), np.uint8))
    with pytest.raises(ValueError, match="prior shape"):
        plain.update(np.zeros((1, 5), int), np.ones((1, 5), bool), gt, confident=np.ones((1, 5), bool),
                     prior=np.zeros((1, 4), np.uint8))


def _brute_regions(regions: np.ndarray, pseudo: np.ndarray, gt: np.ndarray, k: int) -> dict[str, list[float]]:
    correct, consistency, count = [0] * (k + 1), [0.0] * (k + 1), [0] * (k + 1)
    for rid in range(1, int(regions.max()) + 1):
        members = regions == rid
        cls = np.bincount(pseudo[members], minlength=k).argmax()
        g = gt[members & (gt != IGN)]
        if g.size == 0:
            continue
        hist = np.bincount(g, minlength=k)
        for idx in (cls, k):
            count[idx] += 1
            correct[idx] += int(hist.argmax() == cls)
            consistency[idx] += hist.max() / g.size
    return {"region_accuracy": [a / n if n else math.nan for a, n in zip(correct, count, strict=True)],
            "region_consistency": [a / n if n else math.nan for a, n in zip(consistency, count, strict=True)],
            "regions": [float(n) for n in count]}


def test_region_metrics_on_constructed_regions() -> None:
    # Three regions of one tile, known by construction:
    #   region 1 (class 0), 6 pixels: gt 0,0,0,0,1,255 -> dominant 0 = its class (correct), consistency 4/5
    #   region 2 (class 1), 4 pixels: gt 0,0,0,1        -> dominant 0 != 1 (wrong),          consistency 3/4
    #   region 3 (class 1), 2 pixels: gt 255, 255       -> no valid pixel: not counted
    regions = np.array([[1, 1, 1, 2, 2, 0],
                        [1, 1, 1, 2, 2, 3]], np.int32)
    regions[0, 5] = 3
    pseudo = np.where(regions == 1, 0, 1)
    gt = np.array([[0, 0, 0, 0, 0, IGN],
                   [0, 1, IGN, 0, 1, IGN]], np.uint8)
    q = PseudoQuality(2)
    q.update(pseudo, np.ones_like(gt, bool), gt, regions)
    m, pc = q.metrics(), q.per_class()
    assert m["regions"] == 2
    assert m["region_accuracy"] == pytest.approx(1 / 2)
    assert m["region_consistency"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert pc["region_accuracy"].tolist() == [1.0, 0.0]
    assert pc["region_consistency"].tolist() == pytest.approx([4 / 5, 3 / 4])
    # An explicit region_class overrides the majority rule: call region 2 class 0 and it becomes correct.
    q2 = PseudoQuality(2)
    q2.update(pseudo, np.ones_like(gt, bool), gt, regions, region_class=np.array([0, 0, 1]))
    assert q2.metrics()["region_accuracy"] == pytest.approx(1.0)


def test_region_metrics_match_brute_force_on_random_regions() -> None:
    rng = np.random.default_rng(1)
    k = 3
    regions = rng.integers(0, 6, (2, 8, 8)).astype(np.int32)  # regions spanning classes, 0 = none
    pseudo = rng.integers(0, k, regions.shape)
    gt = rng.integers(0, k, regions.shape).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.25] = IGN
    q = PseudoQuality(k)
    q.update(pseudo, np.ones_like(gt, bool), gt, regions)
    expected = {name: [0.0] * (k + 1) for name in ("region_accuracy", "region_consistency", "regions")}
    # Per tile brute force, then combine (counts add; ratios are re-weighted by region counts)
    tiles = [_brute_regions(regions[i], pseudo[i], gt[i], k) for i in range(2)]
    for idx in range(k + 1):
        n = sum(t["regions"][idx] for t in tiles)
        expected["regions"][idx] = n
        for name in ("region_accuracy", "region_consistency"):
            total = sum(t[name][idx] * t["regions"][idx] for t in tiles if t["regions"][idx])
            expected[name][idx] = total / n if n else math.nan
    pc, m = q.per_class(), q.metrics()
    for name, values in expected.items():
        for c in range(k):
            assert _close(pc[name][c], values[c]), (name, c)
        assert _close(m[name], values[k]), name


def test_flat_metrics_gain_and_nan_to_none() -> None:
    gt = np.array([[0, 1]], np.uint8)
    student, warmup = PseudoQuality(2), PseudoQuality(2)
    student.update(np.array([[0, 1]]), np.array([[True, True]]), gt)
    warmup.update(np.array([[0, 0]]), np.array([[True, False]]), gt)
    flat = flat_metrics({"student": student, "warmup": warmup})
    assert flat["student.accuracy"] == 1.0 and flat["warmup.accuracy_all"] == 0.5
    assert flat["gain.accuracy_all"] == pytest.approx(0.5)
    assert flat["gain.coverage"] == pytest.approx(0.5)
    assert flat["student.region_accuracy"] is None  # no regions given: NaN -> None
    assert {k.split(".", 1)[1] for k in flat} == set(METRICS)


def test_table_rows_and_errors() -> None:
    q = PseudoQuality(2)
    q.update(np.array([[0, 1]]), np.array([[True, False]]), np.array([[0, 0]], np.uint8))
    rows = q.table("student", ["a", "b"])
    assert len(rows) == len(METRICS) * 3  # two classes + "all"
    acc_a = next(r for r in rows if r["class"] == "a" and r["metric"] == "accuracy")
    assert acc_a == {"model": "student", "class": "a", "metric": "accuracy", "value": 1.0}
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        q.table("student", ["a", "b", "c"])
    with pytest.raises(ValueError, match="shapes differ"):
        q.update(np.zeros((2, 2), int), np.zeros((2, 3), bool), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="class ids >= num_classes"):
        q.update(np.zeros((1, 1), int), np.zeros((1, 1), bool), np.full((1, 1), 7, np.uint8))


def test_curve_matches_a_brute_force_threshold_sweep() -> None:
    rng = np.random.default_rng(3)
    k = 3
    gt = rng.integers(0, k, (2, 12, 10)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.15] = IGN
    pseudo = np.where(rng.random(gt.shape) < 0.7, np.where(gt == IGN, 0, gt), rng.integers(0, k, gt.shape))
    conf = rng.random(gt.shape)
    # values exactly on the grid must count as >= that threshold; values outside [0, 1] in the end bins
    conf.flat[:6] = [0.0, 0.95, 0.999, 1.0, -0.2, 1.3]
    q = PseudoQuality(k)
    q.update(pseudo, np.ones(gt.shape, bool), gt, conf=conf)
    curve = q.curve()
    valid = gt != IGN
    clipped = np.clip(conf, 0.0, 1.0)
    for index in (0, 1, 333, 500, 950, 998, 999):
        t = index / 1000
        assert curve["threshold"][index] == t
        above = valid & (clipped >= t)
        assert curve["coverage"][index] == pytest.approx(above.sum() / valid.sum(), abs=1e-15)
        expected = (pseudo[above] == gt[above]).mean() if above.any() else math.nan
        assert _close(curve["accuracy"][index], expected), (t, curve["accuracy"][index], expected)


def test_threshold_coverage_of_a_hand_made_propagation() -> None:
    # five pixels, by decreasing confidence; right, right, wrong, right, right
    gt = np.array([[0, 0, 0, 0, 0]], np.uint8)
    pseudo = np.array([[0, 0, 1, 0, 0]])
    conf = np.array([[0.95, 0.9, 0.8, 0.7, 0.6]])
    # a selection that adds the least confident (right) pixel to the two most confident: 3/5 at accuracy 1.
    # Thresholds: 1/5 at 1, 2/5 at 1, 3/5 at 2/3, 4/5 at 3/4, 5/5 at 4/5; accuracy 1 is reached up to 2/5.
    q = PseudoQuality(2)
    q.update(pseudo, np.array([[True, True, False, False, True]]), gt, conf=conf)
    assert q.metrics()["coverage"] == pytest.approx(0.6)
    assert q.metrics()["threshold_coverage"] == pytest.approx(0.4)
    # a plain threshold at 0.9 sits on the curve: 2/5 at 1
    plain = PseudoQuality(2)
    plain.update(pseudo, conf >= 0.9, gt, conf=conf)
    assert plain.metrics()["threshold_coverage"] == pytest.approx(plain.metrics()["coverage"]) == pytest.approx(0.4)
    # at 0.7 (4/5 at 3/4) a lower threshold is both larger and more accurate (5/5 at 4/5): the curve says so
    lower = PseudoQuality(2)
    lower.update(pseudo, conf >= 0.7, gt, conf=conf)
    assert lower.metrics()["coverage"] == pytest.approx(0.8)
    assert lower.metrics()["threshold_coverage"] == pytest.approx(1.0)
    # without confidences there is no curve
    blind = PseudoQuality(2)
    blind.update(pseudo, conf >= 0.7, gt)
    assert math.isnan(blind.metrics()["threshold_coverage"])
    assert np.isnan(blind.curve()["accuracy"]).all()
