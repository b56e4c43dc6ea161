"""TileStoreWriter / TileStore: scenes written in pieces read back whole, with their attributes."""

from __future__ import annotations

import numpy as np
import pytest

from s4seg.data.store import TileStore, TileStoreWriter
from s4seg.errors import DataError, DatasetNotFoundError


def test_scene_written_in_rows_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    writer = TileStoreWriter(tmp_path / "t.zarr", dataset="x", classes=["a", "b"], palette=["#000000", "#FFFFFF"],
                             tile_size=8, stride=8)
    tiles = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (4, 8, 8), dtype=np.uint8)
    offsets = np.array([[0, 0], [0, 8], [8, 0], [8, 8]])
    writer.start_scene("one", 16, 16)
    writer.append_tiles(tiles[:2], masks[:2], offsets[:2])
    writer.append_tiles(tiles[2:], masks[2:], offsets[2:])
    writer.add_scene("two", tiles[:1], np.full((1, 8, 8), 255, np.uint8), offsets[:1], 5, 6, labeled=False)
    writer.close()

    store = TileStore(tmp_path / "t.zarr")
    assert len(store) == 5 and store.num_classes == 2 and store.dataset == "x"
    assert [(s.name, s.height, s.width, s.labeled) for s in store.scenes] == [("one", 16, 16, True),
                                                                               ("two", 5, 6, False)]
    assert store.tiles_of("one").tolist() == [0, 1, 2, 3] and store.scene_of(4) == "two"
    image, mask = store.stitch_scene("one")
    np.testing.assert_array_equal(image[8:, :8], tiles[2])
    np.testing.assert_array_equal(mask[:8, 8:], masks[1])
    image, mask = store.stitch_scene("two")
    assert image.shape == (5, 6, 3) and (mask == 255).all()
    np.testing.assert_array_equal(image, tiles[0][:5, :6])


def test_duplicate_scene_and_missing_store(tmp_path):
    writer = TileStoreWriter(tmp_path / "t.zarr", dataset="x", classes=["a"], palette=["#000000"], tile_size=4,
                             stride=4)
    writer.start_scene("one", 4, 4)
    with pytest.raises(DataError, match="scene name 'one' appears twice"):
        writer.start_scene("one", 4, 4)
    with pytest.raises(DatasetNotFoundError, match="nothing.zarr: tile store not found"):
        TileStore(tmp_path / "nothing.zarr")
