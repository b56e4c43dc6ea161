"""Pseudo-label quality against the hidden ground truth of unlabeled tiles (diagnostic only).

Every count is over *valid* pixels, i.e. pixels whose ground truth is not IGNORE_INDEX (255): void pixels
cannot be judged right or wrong. "Kept" pixels are the ones the method trains on (`PseudoLabels.keep`);
"correct" pixels are those whose pseudo-label equals the ground truth.

Pixel metrics (overall, and per class c):

- `accuracy`: kept & correct / kept. Per class: among kept pixels whose pseudo-label is c (precision).
- `accuracy_all`: correct / valid, ignoring the selection (the model's own pixel accuracy); per class: among
  valid pixels whose pseudo-label is c. Comparable between models whatever their selection rule.
- `coverage`: kept / valid. Per class: among valid pixels whose pseudo-label is c.
- `mining_ratio`, CorrMatch Sec. 4.4 (arXiv 2306.04300): "The mining ratio is the proportion of selected
  high-confidence pixels among all correctly predicted pixels", i.e. kept & correct / correct. Per class:
  among correct pixels of class c.
- `effective_ratio` (effective pseudo-label ratio), CorrMatch Sec. 4.4: "The effective pseudo label ratio is
  the proportion of accurately predicted pseudo labels to the whole image, which can reflect effective
  pseudo label numbers", i.e. kept & correct / valid ("the whole image" read as its valid pixels). Per
  class: among valid pixels whose ground truth is c (the share of class c that gets a correct, kept label).
- `kept_share`: per class, the share of the kept pixels whose pseudo-label is c: the class mix of what the
  method trains on (overall: 1, every kept pixel).
- `class_bias`: per class, `kept_share` minus the share of class c in the valid ground truth (positive: the
  class is over-represented in the training signal); overall, the total variation distance between the two
  mixes, half the sum of |bias| (0: the ground truth's mix; 1: disjoint). A confidence threshold keeps easy
  classes and drops hard ones, so this shows how far the unlabeled loss re-weights the classes.
- `propagated_coverage`, `propagated_accuracy`: for a method that keeps pixels beyond its own confident set
  (CorrMatch's region propagation, Eq. 10: M = F united with the accepted regions) and says which in
  `PseudoLabels.extra["confident"]` (F), the kept pixels outside F, as a share of the valid pixels, and
  their accuracy: what the propagation adds to the training signal, and whether it is right. Per class: by
  pseudo-label class, among valid pixels of that class. NaN where no tile gave F (every other method).
- `relabelled_coverage`, `relabelled_accuracy`, `relabelled_prior_accuracy`: for a method that also says what
  its pseudo-label was before the expansion (`PseudoLabels.extra["prior_label"]`), the pixels of F whose label
  the expansion changed (CorrMatch's Eq. 10 relabels a whole accepted region, confident pixels of other
  classes included), as a share of the valid pixels, with their accuracy after and before the change. The
  `propagated_*` metrics grade only what is added outside F; these grade what it overwrites inside F: a
  relabelling gains (after - before) x coverage correct kept pixels, which is negative when it hurts. Per
  class: by the new pseudo-label class. NaN where no tile gave F and a prior label.
- `threshold_coverage` (overall only): the coverage that a plain confidence threshold on the same pseudo-labels
  reaches at the accuracy of the method's own selection, i.e. the largest share of valid pixels whose most
  confident part is at least `accuracy` right (thresholds on a grid of 1/CURVE_BINS). A method whose
  selection is a confidence threshold gets `threshold_coverage` >= `coverage` (equal unless a lower threshold
  is as accurate); one that keeps more than any threshold does at its accuracy (`coverage` >
  `threshold_coverage`) mines pixels that confidence alone does not find. NaN without confidences.

Accuracy against coverage as the threshold sweeps (`curve()`): the pixels with confidence >= t, for t on the
grid k / CURVE_BINS, k = 0..CURVE_BINS-1: their share of the valid pixels and their accuracy. It compares the
pseudo-labels of two models at equal coverage or equal accuracy, whatever their selection rules. Confidences
outside [0, 1] count in the first or last bin.

Region metrics, RegionMatch Fig. 1 (IJCAI 2025): "Region labels are derived from pixel predictions, with the
true category defined as the ground truth of the dominant pixel. Based on this, the region accuracy is
calculated. Regional consistency measures the proportion of pixels in a region belonging to the dominant
category." Regions are those of the dump (connected components of the whole pseudo-label per class, see
`s4seg.evaluation.regions`, or a method's own regions), selection is not applied, and only a region's valid
pixels count; a region without any valid pixel is left out. With g_i the majority ground-truth class of region
i, n_i its valid pixels and d_i those of them whose ground truth is g_i:

- `region_accuracy`: share of regions whose class (majority pseudo-label) equals g_i. Per class c: among
  regions of class c.
- `region_consistency`: mean over regions of d_i / n_i. Per class c: mean over regions of class c.
- `regions`: the number of regions counted.

A ratio with an empty denominator is NaN. NumPy only (the report imports this module, and must not import
torch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from s4seg.config import IGNORE_INDEX

PIXEL_METRICS = ("accuracy", "accuracy_all", "coverage", "mining_ratio", "effective_ratio", "kept_share",
                 "class_bias", "propagated_coverage", "propagated_accuracy", "relabelled_coverage",
                 "relabelled_accuracy", "relabelled_prior_accuracy", "threshold_coverage")
# `PseudoLabels.extra` layer (dump: `extra/confident`) of a method's selection before it expanded it
CONFIDENT_LAYER = "confident"
# `PseudoLabels.extra` layer (dump: `extra/prior_label`) of a method's pseudo-label before it expanded it
PRIOR_LABEL_LAYER = "prior_label"
REGION_METRICS = ("region_accuracy", "region_consistency", "regions")
CURVE_BINS = 1000  # confidence grid of `curve()` and `threshold_coverage`
METRICS = PIXEL_METRICS + REGION_METRICS


class PseudoQuality:
    """Accumulates the counts behind every metric, tile by tile; `metrics()` turns them into ratios."""

    def __init__(self, num_classes: int) -> None:
        k = self.num_classes = num_classes
        # Pixel counts, indexed by the pseudo-label class unless noted.
        self.valid = np.zeros(k, np.int64)
        self.kept = np.zeros(k, np.int64)
        self.correct = np.zeros(k, np.int64)  # pseudo == gt == c
        self.kept_correct = np.zeros(k, np.int64)
        self.gt_valid = np.zeros(k, np.int64)  # indexed by the ground-truth class
        # Kept beyond the method's confident set, on tiles that gave one (`confident` in `update`).
        self.base_valid = np.zeros(k, np.int64)  # valid pixels of those tiles
        self.added = np.zeros(k, np.int64)  # keep & ~confident
        self.added_correct = np.zeros(k, np.int64)
        # Pixels of the confident set whose label the expansion changed (`prior` in `update`), by the new label.
        self.base_relabel_valid = np.zeros(k, np.int64)  # valid pixels of the tiles that gave a prior label
        self.relabelled = np.zeros(k, np.int64)
        self.relabelled_correct = np.zeros(k, np.int64)  # right after the change
        self.relabelled_prior_correct = np.zeros(k, np.int64)  # right before it
        # Valid pixels (and the correct ones among them) by confidence bin [k, k + 1) / CURVE_BINS.
        self.conf_valid = np.zeros(CURVE_BINS, np.int64)
        self.conf_correct = np.zeros(CURVE_BINS, np.int64)
        # Region counts, indexed by the region's class.
        self.regions = np.zeros(k, np.int64)
        self.regions_correct = np.zeros(k, np.int64)
        self.consistency_sum = np.zeros(k, np.float64)

    COUNTS = ("valid", "kept", "correct", "kept_correct", "gt_valid", "base_valid", "added", "added_correct",
              "base_relabel_valid", "relabelled", "relabelled_correct", "relabelled_prior_correct", "regions",
              "regions_correct", "consistency_sum", "conf_valid", "conf_correct")

    def counts(self) -> dict[str, np.ndarray]:
        """Every count array, by name (what `from_counts` rebuilds the accumulator from)."""
        return {name: getattr(self, name) for name in self.COUNTS}

    @classmethod
    def from_counts(cls, counts: dict[str, np.ndarray]) -> PseudoQuality:
        quality = cls(len(counts["valid"]))
        for name in cls.COUNTS:
            setattr(quality, name, np.asarray(counts[name]).astype(getattr(quality, name).dtype))
        return quality

    def update(self, pseudo: np.ndarray, keep: np.ndarray, gt: np.ndarray, regions: np.ndarray | None = None,
               region_class: np.ndarray | None = None, confident: np.ndarray | None = None,
               conf: np.ndarray | None = None, prior: np.ndarray | None = None) -> None:
        """Add one tile (H, W) or a batch (B, H, W).

        `regions` uses the dump's convention (ids 1..n per tile, 0 = none); `region_class` (n,) gives each
        region's class for a single tile (default: majority pseudo-label of the region). For a batch, ids are
        taken per tile and `region_class` must be None. `confident`: the method's selection before it
        expanded it (`PseudoLabels.extra["confident"]`), for the `propagated_*` metrics. `conf`: each pixel's
        confidence, for `curve()` and `threshold_coverage`. `prior`: the pseudo-label before the expansion
        (`PseudoLabels.extra["prior_label"]`), for the `relabelled_*` metrics; it needs `confident`.
        """
        k = self.num_classes
        pseudo = np.asarray(pseudo).astype(np.int64, copy=False)
        keep = np.asarray(keep).astype(bool, copy=False)
        gt = np.asarray(gt)
        if not (pseudo.shape == keep.shape == gt.shape):
            raise ValueError(f"shapes differ: pseudo {pseudo.shape}, keep {keep.shape}, gt {gt.shape}")
        valid = gt != IGNORE_INDEX
        if (gt[valid] >= k).any():
            raise ValueError(f"ground truth has class ids >= num_classes ({k}) besides {IGNORE_INDEX}")
        p, g, kv = pseudo[valid], gt[valid].astype(np.int64), keep[valid]
        ok = p == g
        self.valid += np.bincount(p, minlength=k)[:k]
        self.kept += np.bincount(p[kv], minlength=k)[:k]
        self.correct += np.bincount(p[ok], minlength=k)[:k]
        self.kept_correct += np.bincount(p[ok & kv], minlength=k)[:k]
        self.gt_valid += np.bincount(g, minlength=k)
        if confident is not None:
            confident = np.asarray(confident).astype(bool, copy=False)
            if confident.shape != gt.shape:
                raise ValueError(f"confident shape {confident.shape} differs from gt shape {gt.shape}")
            added = kv & ~confident[valid]
            self.base_valid += np.bincount(p, minlength=k)[:k]
            self.added += np.bincount(p[added], minlength=k)[:k]
            self.added_correct += np.bincount(p[added & ok], minlength=k)[:k]
            if prior is not None:
                prior = np.asarray(prior)
                if prior.shape != gt.shape:
                    raise ValueError(f"prior shape {prior.shape} differs from gt shape {gt.shape}")
                before = prior[valid].astype(np.int64)
                changed = confident[valid] & (before != p)
                self.base_relabel_valid += np.bincount(p, minlength=k)[:k]
                self.relabelled += np.bincount(p[changed], minlength=k)[:k]
                self.relabelled_correct += np.bincount(p[changed & ok], minlength=k)[:k]
                self.relabelled_prior_correct += np.bincount(p[changed & (before == g)], minlength=k)[:k]
        elif prior is not None:
            raise ValueError("prior (the label before the expansion) needs confident (the set it expanded)")
        if conf is not None:
            conf = np.asarray(conf)
            if conf.shape != gt.shape:
                raise ValueError(f"conf shape {conf.shape} differs from gt shape {gt.shape}")
            bins = confidence_bins(conf[valid])
            self.conf_valid += np.bincount(bins, minlength=CURVE_BINS)
            self.conf_correct += np.bincount(bins[ok], minlength=CURVE_BINS)
        if regions is None:
            return
        regions = np.asarray(regions)
        if regions.shape != gt.shape:
            raise ValueError(f"regions shape {regions.shape} differs from gt shape {gt.shape}")
        if regions.ndim == 3:
            if region_class is not None:
                raise ValueError("region_class is per tile; pass tiles one by one to give it")
            for i in range(regions.shape[0]):
                self._update_regions(regions[i], pseudo[i], gt[i], None)
        else:
            self._update_regions(regions, pseudo, gt, region_class)

    def _update_regions(self, regions: np.ndarray, pseudo: np.ndarray, gt: np.ndarray,
                        region_class: np.ndarray | None) -> None:
        k = self.num_classes
        n = int(regions.max(initial=0))
        if n == 0:
            return
        ids = regions.reshape(-1).astype(np.int64)
        inside = ids > 0
        if region_class is None:
            joint_pseudo = np.bincount(ids[inside] * k + pseudo.reshape(-1)[inside], minlength=(n + 1) * k)
            region_class = joint_pseudo.reshape(n + 1, k)[1:].argmax(axis=1)
        region_class = np.asarray(region_class).astype(np.int64)
        if region_class.shape != (n,):
            raise ValueError(f"region_class has shape {region_class.shape}, expected ({n},) for ids 1..{n}")
        judged = inside & (gt.reshape(-1) != IGNORE_INDEX)
        joint = np.bincount(ids[judged] * k + gt.reshape(-1)[judged].astype(np.int64),
                            minlength=(n + 1) * k).reshape(n + 1, k)[1:]  # (n, K): gt histogram per region
        size = joint.sum(axis=1)
        counted = size > 0
        dominant = joint.argmax(axis=1)
        consistency = joint.max(axis=1) / np.maximum(size, 1)
        cls = region_class[counted]
        self.regions += np.bincount(cls, minlength=k)[:k]
        self.regions_correct += np.bincount(cls[dominant[counted] == cls], minlength=k)[:k]
        self.consistency_sum += np.bincount(cls, weights=consistency[counted], minlength=k)[:k]

    def metrics(self) -> dict[str, float]:
        """Overall metrics (see the module docstring)."""
        return {
            "accuracy": _ratio(self.kept_correct.sum(), self.kept.sum()),
            "accuracy_all": _ratio(self.correct.sum(), self.valid.sum()),
            "coverage": _ratio(self.kept.sum(), self.valid.sum()),
            "mining_ratio": _ratio(self.kept_correct.sum(), self.correct.sum()),
            "effective_ratio": _ratio(self.kept_correct.sum(), self.valid.sum()),
            "kept_share": _ratio(self.kept.sum(), self.kept.sum()),
            "class_bias": float(np.abs(self._class_bias()).sum() / 2),
            "propagated_coverage": _ratio(self.added.sum(), self.base_valid.sum()),
            "propagated_accuracy": _ratio(self.added_correct.sum(), self.added.sum()),
            "relabelled_coverage": _ratio(self.relabelled.sum(), self.base_relabel_valid.sum()),
            "relabelled_accuracy": _ratio(self.relabelled_correct.sum(), self.relabelled.sum()),
            "relabelled_prior_accuracy": _ratio(self.relabelled_prior_correct.sum(), self.relabelled.sum()),
            "threshold_coverage": self._threshold_coverage(),
            "region_accuracy": _ratio(self.regions_correct.sum(), self.regions.sum()),
            "region_consistency": _ratio(self.consistency_sum.sum(), self.regions.sum()),
            "regions": float(self.regions.sum()),
        }

    def per_class(self) -> dict[str, np.ndarray]:
        """Each metric as a (K,) array, grouped as the module docstring says."""
        return {
            "accuracy": _ratio(self.kept_correct, self.kept),
            "accuracy_all": _ratio(self.correct, self.valid),
            "coverage": _ratio(self.kept, self.valid),
            "mining_ratio": _ratio(self.kept_correct, self.correct),
            "effective_ratio": _ratio(self.kept_correct, self.gt_valid),
            "kept_share": _ratio(self.kept, self.kept.sum()),
            "class_bias": self._class_bias(),
            "propagated_coverage": _ratio(self.added, self.base_valid),
            "propagated_accuracy": _ratio(self.added_correct, self.added),
            "relabelled_coverage": _ratio(self.relabelled, self.base_relabel_valid),
            "relabelled_accuracy": _ratio(self.relabelled_correct, self.relabelled),
            "relabelled_prior_accuracy": _ratio(self.relabelled_prior_correct, self.relabelled),
            "threshold_coverage": np.full(self.num_classes, np.nan),  # overall only
            "region_accuracy": _ratio(self.regions_correct, self.regions),
            "region_consistency": _ratio(self.consistency_sum, self.regions),
            "regions": self.regions.astype(np.float64),
        }

    def curve(self) -> dict[str, np.ndarray]:
        """`threshold`, `coverage`, `accuracy` (CURVE_BINS,) each: the valid pixels with confidence >= threshold
        (as a share of the valid pixels with a confidence) and their accuracy; NaN where none is that confident."""
        above = np.cumsum(self.conf_valid[::-1])[::-1]  # pixels with confidence >= k / CURVE_BINS
        above_correct = np.cumsum(self.conf_correct[::-1])[::-1]
        return {"threshold": np.arange(CURVE_BINS) / CURVE_BINS,
                "coverage": _ratio(above, self.conf_valid.sum()),
                "accuracy": _ratio(above_correct, above)}

    def _threshold_coverage(self) -> float:
        accuracy = _ratio(self.kept_correct.sum(), self.kept.sum())
        if self.conf_valid.sum() == 0 or np.isnan(accuracy):
            return float("nan")
        curve = self.curve()
        # the own accuracy is a ratio of integers; a tolerance keeps a threshold method on its own curve
        reached = curve["coverage"][curve["accuracy"] >= accuracy - 1e-12]
        return float(reached.max()) if len(reached) else 0.0

    def _class_bias(self) -> np.ndarray:
        """(K,) kept share minus ground-truth share per class; NaN when nothing is kept or judged."""
        return _ratio(self.kept, self.kept.sum()) - _ratio(self.gt_valid, self.gt_valid.sum())

    def table(self, model: str, classes: Sequence[str]) -> list[dict[str, object]]:
        """Long rows (model, class, metric, value): one per class and metric, plus class "all" (overall)."""
        if len(classes) != self.num_classes:
            raise ValueError(f"{len(classes)} class names for {self.num_classes} classes")
        rows: list[dict[str, object]] = []
        for metric, values in self.per_class().items():
            rows += [{"model": model, "class": c, "metric": metric, "value": float(v)}
                     for c, v in zip(classes, values, strict=True)]
        rows += [{"model": model, "class": "all", "metric": m, "value": v} for m, v in self.metrics().items()]
        return rows


def flat_metrics(qualities: dict[str, PseudoQuality], gain: tuple[str, str] | None = ("student", "warmup")
                 ) -> dict[str, float | None]:
    """`{"student.accuracy": ..., "warmup.accuracy": ..., "gain.accuracy": ...}` for `metrics/pseudo.json`.

    `gain.<m>` = first minus second model of `gain`; NaN becomes None (JSON has no NaN).
    """
    out: dict[str, float | None] = {}
    values = {name: q.metrics() for name, q in qualities.items()}
    for name, metrics in values.items():
        out.update({f"{name}.{m}": v for m, v in metrics.items()})
    if gain is not None and gain[0] in values and gain[1] in values:
        a, b = (values[n] for n in gain)
        out.update({f"gain.{m}": a[m] - b[m] for m in METRICS})
    return {k: (None if v is None or np.isnan(v) else float(v)) for k, v in out.items()}


def confidence_bins(conf: np.ndarray) -> np.ndarray:
    """Bin index k of each confidence, such that conf >= k / CURVE_BINS holds exactly (float64 edges)."""
    edges = np.arange(CURVE_BINS, dtype=np.float64) / CURVE_BINS
    bins = np.searchsorted(edges, np.asarray(conf, dtype=np.float64).reshape(-1), side="right") - 1
    return np.clip(bins, 0, CURVE_BINS - 1)


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray | float:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return float(out) if out.ndim == 0 else out
