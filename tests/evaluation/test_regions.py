"""Connected components per class, region tables and relabelling against brute-force flood fill."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from s4seg.evaluation.regions import pseudo_regions, region_table, relabel_regions


def _flood_partition(labels: np.ndarray, valid: np.ndarray) -> set[frozenset[tuple[int, int]]]:
    """8-connected components of equal labels, by breadth-first search."""
    seen = np.zeros(labels.shape, bool)
    parts = set()
    h, w = labels.shape
    for y in range(h):
        for x in range(w):
            if seen[y, x] or not valid[y, x]:
                continue
            comp, queue = set(), deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                comp.add((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and valid[ny, nx] \
                                and labels[ny, nx] == labels[y, x]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            parts.add(frozenset(comp))
    return parts


def _partition(ids: np.ndarray) -> set[frozenset[tuple[int, int]]]:
    return {frozenset(map(tuple, np.argwhere(ids == i))) for i in np.unique(ids) if i > 0}


def test_components_equal_flood_fill_and_ids_are_consecutive() -> None:
    rng = np.random.default_rng(0)
    pseudo = rng.integers(0, 3, (12, 10))
    valid = rng.random(pseudo.shape) > 0.1
    ids = pseudo_regions(pseudo, valid)
    assert ids.dtype == np.int32
    assert _partition(ids) == _flood_partition(pseudo, valid)
    assert set(np.unique(ids[ids > 0])) == set(range(1, int(ids.max()) + 1))
    assert (ids[~valid] == 0).all()
    # each region has one class
    for i in range(1, int(ids.max()) + 1):
        assert len(np.unique(pseudo[ids == i])) == 1


def test_diagonal_neighbours_join_and_classes_split() -> None:
    pseudo = np.array([[0, 1, 1],
                       [1, 0, 1],
                       [1, 1, 0]])
    ids = pseudo_regions(pseudo)
    # 8-connectivity: the 0s on the diagonal form one region, and so do the 1s, which touch diagonally
    # at (0, 1)-(1, 0) and (1, 2)-(2, 1); 4-connectivity would give 3 + 2 regions.
    assert len(np.unique(ids[pseudo == 0])) == 1 and len(np.unique(ids[pseudo == 1])) == 1
    assert ids.max() == 2


def test_min_region_pixels_drops_small_components() -> None:
    pseudo = np.array([[0, 0, 0, 1],
                       [0, 0, 0, 2],
                       [2, 2, 2, 2]])
    ids = pseudo_regions(pseudo, min_region_pixels=2)
    assert ids[0, 3] == 0  # the single class-1 pixel
    assert ids.max() == 2 and set(np.unique(ids)) == {0, 1, 2}
    table = region_table(ids, pseudo, np.full(pseudo.shape, 0.5), num_classes=3)
    assert sorted(table.pixels.tolist()) == [5, 6]


def test_region_table_class_conf_and_size() -> None:
    regions = np.array([[1, 1, 2],
                        [0, 2, 2]], np.int32)
    pseudo = np.array([[0, 0, 1],
                       [2, 1, 0]])  # region 2 is mostly class 1
    conf = np.array([[0.2, 0.4, 0.9],
                     [1.0, 0.6, 0.3]])
    table = region_table(regions, pseudo, conf, num_classes=3)
    assert table.cls.tolist() == [0, 1]
    assert table.conf.tolist() == pytest.approx([0.3, 0.6])
    assert table.pixels.tolist() == [2, 3]
    assert len(region_table(np.zeros((2, 2), np.int32), np.zeros((2, 2), int), np.zeros((2, 2)), 3)) == 0


def test_relabel_method_regions() -> None:
    regions = np.array([[7, 7, -1],
                        [0, 42, 42]])
    out = relabel_regions(regions)
    assert out.tolist() == [[2, 2, 0], [1, 3, 3]]
    assert relabel_regions(regions, min_region_pixels=2).tolist() == [[1, 1, 0], [0, 2, 2]]


def test_rejects_batches() -> None:
    with pytest.raises(ValueError, match=r"one \(H, W\) label map"):
        pseudo_regions(np.zeros((2, 3, 3), int))
