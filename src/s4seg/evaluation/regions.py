"""Regions of a pseudo-label: connected components per class, and per-region class and confidence.

A region is a set of 8-connected pixels (`skimage.measure.label(..., connectivity=2)`) that share one
pseudo-label class, so every region has exactly one class. 8-connectivity follows RegionMatch's official
code (reference/regionmatch_ipixmatch.md A.1); diagonal neighbours of the same class join one region.

Id convention (the one `dumps/pseudo.zarr` stores): ids are int32, unique within a tile and consecutive,
1..n in raster order of each region's first pixel; 0 means "no region" (invalid pixels, and components
smaller than `min_region_pixels`).

Regions a method builds itself (`PseudoLabels.regions`, e.g. propagated regions that may span classes)
are brought to the same convention by `relabel_regions`: negative ids mean "no region", every other id
becomes 1..n in increasing order of the original id. The class of such a region is the majority
pseudo-label inside it (for connected components this is the region's only class).

NumPy and scikit-image only (no torch): the report reads these functions too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.measure import label as connected_components

CONNECTIVITY = 2  # 8-neighbourhood in 2-D (skimage: 1 = 4-neighbourhood, 2 = 8-neighbourhood)


@dataclass(frozen=True)
class RegionTable:
    """Per-region facts of one tile; row i describes region id i + 1."""

    cls: np.ndarray  # (n,) uint8 majority pseudo-label class
    conf: np.ndarray  # (n,) float32 mean confidence over the region's pixels
    pixels: np.ndarray  # (n,) int32 pixel count

    def __len__(self) -> int:
        return int(self.cls.shape[0])


def pseudo_regions(pseudo: np.ndarray, valid: np.ndarray | None = None, min_region_pixels: int = 1) -> np.ndarray:
    """Connected components of a (H, W) pseudo-label, per class: int32 ids 1..n, 0 = no region."""
    if pseudo.ndim != 2:
        raise ValueError(f"pseudo_regions expects one (H, W) label map, got shape {pseudo.shape}")
    # Shift classes by one so 0 can be the background value that skimage never labels.
    shifted = pseudo.astype(np.int32) + 1
    if valid is not None:
        shifted[~valid.astype(bool)] = 0
    ids = connected_components(shifted, background=0, connectivity=CONNECTIVITY).astype(np.int32)
    if min_region_pixels > 1:
        ids = _drop_small(ids, min_region_pixels)
    return ids


def relabel_regions(regions: np.ndarray, min_region_pixels: int = 1) -> np.ndarray:
    """A method's own region ids -> the dump convention (1..n consecutive, 0 = none; negative = none)."""
    regions = np.asarray(regions)
    flat = regions.reshape(-1).astype(np.int64)
    present = flat >= 0
    out = np.zeros(flat.shape, dtype=np.int32)
    if present.any():
        _, inverse = np.unique(flat[present], return_inverse=True)
        out[present] = inverse.astype(np.int32) + 1
    out = out.reshape(regions.shape)
    if min_region_pixels > 1:
        out = _drop_small(out, min_region_pixels)
    return out


def region_table(regions: np.ndarray, pseudo: np.ndarray, conf: np.ndarray, num_classes: int) -> RegionTable:
    """Class (majority pseudo-label), mean confidence and size of each region id 1..max(regions)."""
    n = int(regions.max(initial=0))
    ids = regions.reshape(-1).astype(np.int64)
    inside = ids > 0
    ids = ids[inside] - 1
    pixels = np.bincount(ids, minlength=n)
    conf_sum = np.bincount(ids, weights=conf.reshape(-1)[inside].astype(np.float64), minlength=n)
    joint = np.bincount(ids * num_classes + pseudo.reshape(-1)[inside].astype(np.int64),
                        minlength=n * num_classes).reshape(n, num_classes)
    return RegionTable(
        cls=joint.argmax(axis=1).astype(np.uint8) if n else np.zeros(0, np.uint8),
        conf=(conf_sum / np.maximum(pixels, 1)).astype(np.float32),
        pixels=pixels.astype(np.int32),
    )


def _drop_small(ids: np.ndarray, min_region_pixels: int) -> np.ndarray:
    """Set regions below `min_region_pixels` to 0 and renumber the rest 1..m, keeping their order."""
    sizes = np.bincount(ids.reshape(-1), minlength=1)
    keep = sizes >= min_region_pixels
    keep[0] = False
    new_id = np.zeros(sizes.shape, dtype=np.int32)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_id[ids]
