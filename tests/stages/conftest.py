"""Shared input of the stage tests: a tiny tile store and split (6 tiles: 2 labeled, 3 unlabeled, 1 test)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from s4seg.config import IGNORE_INDEX
from s4seg.data.store import TileStoreWriter


def write_toy_tiles(work: Path, tile: int) -> None:
    """`work/tiles.zarr` and `work/split.parquet`: random images whose mask is the dominant colour."""
    rng = np.random.default_rng(0)
    n = 6
    images = rng.integers(0, 256, size=(n, tile, tile, 3), dtype=np.uint8)
    masks = images.argmax(-1).astype(np.uint8)
    masks[:, :3] = IGNORE_INDEX
    writer = TileStoreWriter(work / "tiles.zarr", dataset="toy", classes=["r", "g", "b"],
                             palette=["#ff0000", "#00ff00", "#0000ff"], tile_size=tile, stride=tile)
    writer.add_scene("s0", images, masks, np.stack([np.zeros(n), np.arange(n) * tile], 1), tile, tile * n)
    writer.close()
    roles = ["labeled", "labeled", "unlabeled", "unlabeled", "unlabeled", "test"]
    pd.DataFrame({"id": np.arange(n), "scene": "s0", "x": np.arange(n) * tile, "y": 0, "role": roles,
                  "ratio": 0.4, "seed": 0}).to_parquet(work / "split.parquet")


@pytest.fixture(scope="module")
def toy_tiles() -> Callable[[Path, int], None]:
    return write_toy_tiles
