"""Training snapshots: layout, atomic close, empty store, per-snapshot quality."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from s4seg.data.store import TileStore, TileStoreWriter
from s4seg.errors import DatasetNotFoundError
from s4seg.evaluation.snapshots import SnapshotWriter, snapshot_quality, snapshot_tile_ids

T = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> TileStore:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tiles") / "tiles.zarr"
    w = TileStoreWriter(path, dataset="tiny", classes=["a", "b"], palette=["#000000", "#ffffff"], tile_size=T,
                        stride=T)
    masks = rng.integers(0, 2, (4, T, T)).astype(np.uint8)
    masks[:, 0, 0] = 255
    w.add_scene("s", rng.integers(0, 256, (4, T, T, 3), dtype=np.uint8), masks,
                np.array([[0, 0], [0, T], [T, 0], [T, T]]), 2 * T, 2 * T)
    w.close()
    return TileStore(path)


def test_snapshot_tile_ids_are_fixed_and_spread() -> None:
    ids = np.arange(10, 20)
    assert snapshot_tile_ids(ids, 3).tolist() == [10, 14, 19]
    assert snapshot_tile_ids(ids, 50).tolist() == ids.tolist()
    assert snapshot_tile_ids(ids, 0).tolist() == []


def test_writer_layout_and_quality(store: TileStore, tmp_path: Path) -> None:
    out = tmp_path / "snapshots.zarr"
    ids = [1, 3]
    gt = np.stack([store.mask(i) for i in ids])
    writer = SnapshotWriter(out, store, ids)
    images = writer.images()
    assert images.shape == (2, 3, T, T) and images.dtype == np.float32 and images.max() <= 1.0
    assert np.allclose(images[1].transpose(1, 2, 0) * 255, store.image(3))
    label0 = np.where(gt == 255, 0, 1 - gt)  # all wrong (where valid)
    label1 = np.where(gt == 255, 0, gt)  # all right
    keep1 = np.zeros_like(gt, bool)
    keep1[:, :4] = True
    # step 10: tensors; step 20: numpy arrays
    writer.add(10, SimpleNamespace(label=torch.from_numpy(label0.astype(np.int64)),
                                   conf=torch.full((2, T, T), 0.5), keep=torch.ones(2, T, T, dtype=torch.bool)))
    writer.add(20, SimpleNamespace(label=label1, conf=np.full((2, T, T), 0.9), keep=keep1))
    assert not out.exists()  # published on close only
    writer.close()
    g = zarr.open_group(str(out), mode="r")
    assert g["steps"][:].tolist() == [10, 20]
    assert g["pseudo"].shape == (2, 2, T, T) and g["pseudo"].dtype == np.uint8
    assert g["conf"].dtype == np.float16 and g["keep"].dtype == np.bool_
    assert np.array_equal(g["gt"][:], gt) and g["tile_ids"][:].tolist() == ids
    assert g.attrs["num_snapshots"] == 2 and g.attrs["classes"] == ["a", "b"]
    q = snapshot_quality(out)
    valid = gt != 255
    assert q["step"].tolist() == [10, 20]
    assert q["accuracy"].tolist() == pytest.approx([0.0, 1.0])
    assert q["coverage"].tolist() == pytest.approx([1.0, (keep1 & valid).sum() / valid.sum()])
    assert q["accuracy_all"].tolist() == pytest.approx([0.0, 1.0])

    def mix(labels: np.ndarray) -> np.ndarray:
        return np.bincount(labels, minlength=2) / labels.size

    truth = mix(gt[valid])  # step 10 keeps everything with the classes swapped; step 20 the first columns, right
    expected = [np.abs(truth[::-1] - truth).sum() / 2, np.abs(mix(gt[valid & keep1]) - truth).sum() / 2]
    assert q["class_bias"].tolist() == pytest.approx(expected) and expected[1] > 0


def test_empty_store_and_abort(store: TileStore, tmp_path: Path) -> None:
    out = tmp_path / "snapshots.zarr"
    with SnapshotWriter(out, store, [0]):
        pass
    g = zarr.open_group(str(out), mode="r")
    assert g["steps"].shape == (0,) and g["pseudo"].shape == (0, 1, T, T) and g.attrs["num_snapshots"] == 0
    assert len(snapshot_quality(out)) == 0
    # an exception inside the block keeps the previous store and leaves no temporary
    with pytest.raises(RuntimeError, match="training died"), SnapshotWriter(out, store, [0, 1]) as w:
        w.add(1, SimpleNamespace(label=np.zeros((2, T, T)), conf=np.zeros((2, T, T)), keep=np.zeros((2, T, T))))
        raise RuntimeError("training died")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshots.zarr"]
    assert zarr.open_group(str(out), mode="r")["tile_ids"][:].tolist() == [0]


def test_errors(store: TileStore, tmp_path: Path) -> None:
    w = SnapshotWriter(tmp_path / "s.zarr", store, [0])
    with pytest.raises(ValueError, match=r"label has shape \(2, 8, 8\), expected \(1, 8, 8\)"):
        w.add(0, SimpleNamespace(label=np.zeros((2, T, T)), conf=np.zeros((1, T, T)), keep=np.zeros((1, T, T))))
    w.close()
    with pytest.raises(RuntimeError, match="add after close"):
        w.add(1, SimpleNamespace(label=np.zeros((1, T, T)), conf=np.zeros((1, T, T)), keep=np.zeros((1, T, T))))
    with pytest.raises(DatasetNotFoundError, match="snapshot store not found"):
        snapshot_quality(tmp_path / "missing.zarr")
