"""The `tile` stage: cut scenes into fixed-size tiles, write `tiles.zarr` and `split.parquet` atomically.

Scenes are streamed from the source one at a time and written a row of tiles at a time, so peak
memory is one scene plus one row of tiles, whatever the number of scenes. Both outputs are written to
temporary siblings and renamed on success: an error leaves no partial store and keeps a previous one.

Tile positions along an axis of length L: 0, stride, 2 * stride, ... while the tile fits, plus one
last tile ending exactly at the border (shifted inward, so no padding and every pixel covered). A
scene smaller than a tile along an axis gets one tile there, padded with image 0 / mask 255.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from s4seg.config import IGNORE_INDEX, DatasetConfig, SplitConfig, TilingConfig, load_params
from s4seg.data.sources import Source, build_source
from s4seg.data.split import make_split, resolve_test_scenes, save_split
from s4seg.data.store import TileStoreWriter
from s4seg.errors import DataError
from s4seg.io import atomic_dir

log = logging.getLogger(__name__)


def tile_starts(length: int, tile_size: int, stride: int) -> np.ndarray:
    """Start offsets along one axis; the last tile ends at the border (or covers a short axis padded)."""
    if length <= tile_size:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, length - tile_size + 1, stride, dtype=np.int64)
    if starts[-1] != length - tile_size:
        starts = np.append(starts, length - tile_size)
    return starts


def tile_scene(image: np.ndarray, mask: np.ndarray, tile_size: int, stride: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield one row of tiles at a time: tiles (n, T, T, C), masks (n, T, T), offsets (n, 2) as (y, x)."""
    height, width = mask.shape
    if image.shape[:2] != (height, width):
        raise DataError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    # Pad short axes up to one tile (bottom/right): image 0, mask ignore.
    ph, pw = max(tile_size - height, 0), max(tile_size - width, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    xs = tile_starts(width, tile_size, stride)
    for y in tile_starts(height, tile_size, stride):
        tiles = np.stack([image[y : y + tile_size, x : x + tile_size] for x in xs])
        masks = np.stack([mask[y : y + tile_size, x : x + tile_size] for x in xs])
        offsets = np.stack([np.full_like(xs, y), xs], axis=1)
        yield tiles, masks, offsets


def write_tiles(source: Source, tiling: TilingConfig, split: SplitConfig, tiles_path: str | Path,
                split_path: str | Path) -> None:
    """Tile every scene of `source` into `tiles_path` (zarr) and write the split table to `split_path`."""
    names = source.scene_names()
    unlabeled = source.unlabeled_scene_names()
    patterns = split.test_scenes if split.test_scenes is not None else source.default_test_scenes
    # Checked before any pixel is read: a typo in a test pattern should not cost a full tiling run.
    test_scenes = resolve_test_scenes(names, patterns, unlabeled, source_name=source.name)
    log.info("%s: %d scene(s) (%d test, %d without masks), tiles %d px, stride %d", source.name, len(names),
             len(test_scenes), len(unlabeled), tiling.tile_size, tiling.stride)

    scene_of_tile: list[str] = []
    offsets: list[np.ndarray] = []
    has_labels: list[np.ndarray] = []
    with atomic_dir(tiles_path) as tmp:
        writer = TileStoreWriter(
            tmp, dataset=source.name, classes=source.classes, palette=source.palette,
            tile_size=tiling.tile_size, stride=tiling.stride, channels=source.channels, bands=source.bands,
        )
        bar = tqdm(source.scenes(), total=len(names), desc="tile", unit="scene", file=sys.stderr,
                   disable=not sys.stderr.isatty())
        for scene in bar:
            image, mask = scene.image, scene.mask
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != source.channels:
                raise DataError(f"scene {scene.name}: expected a uint8 (H, W, {source.channels}) image, "
                                f"found {image.dtype} {image.shape}")
            writer.start_scene(scene.name, mask.shape[0], mask.shape[1], labeled=scene.labeled)
            for tiles, masks, offs in tile_scene(image, mask, tiling.tile_size, tiling.stride):
                writer.append_tiles(tiles, masks, offs)
                scene_of_tile.extend([scene.name] * len(tiles))
                offsets.append(offs)
                has_labels.append((masks != IGNORE_INDEX).any(axis=(1, 2)))
            del scene, image, mask  # release the scene before the next one is read
        writer.close()
        if len(scene_of_tile) == 0:
            raise DataError(f"{source.name}: the source yielded no scene")
        table = make_split(scene_of_tile, np.concatenate(offsets), test_scenes, split,
                           unlabeled_scenes=unlabeled, has_labels=np.concatenate(has_labels))
        save_split(table, split_path)
        counts = table["role"].value_counts()
        log.info("wrote %d tiles: %d labeled, %d unlabeled, %d test", len(table), counts.get("labeled", 0),
                 counts.get("unlabeled", 0), counts.get("test", 0))


def build_tiles(dataset: DatasetConfig, tiling: TilingConfig, split: SplitConfig, tiles_path: str | Path,
                split_path: str | Path) -> None:
    """The tile stage's work on typed params: build the source named by `dataset.name`, then tile it."""
    write_tiles(build_source(dataset), tiling, split, tiles_path, split_path)


def tile_main(params_path: str | Path, tiles_path: str | Path, split_path: str | Path) -> None:
    """Entry point shared by `stages/tile.py` and `s4seg tile`: read params, build both outputs."""
    params = load_params(params_path)
    build_tiles(params.dataset, params.tiling, params.split, tiles_path, split_path)
