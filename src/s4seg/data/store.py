"""`data/tiles.zarr`: the tiled dataset every later stage reads.

Layout (zarr v3, one chunk per tile, Blosc/zstd), readable with plain zarr:

    images      (N, T, T, C) uint8
    masks       (N, T, T)    uint8, IGNORE_INDEX = 255 on void
    scene_index (N,)         int32, index into attrs["scenes"]
    offsets     (N, 2)       int32, (y, x) pixel offset of the tile in its scene
    attrs: dataset, classes, palette ("#RRGGBB" per class), tile_size, stride, bands,
           scenes: [{"name", "height", "width", "labeled"}, ...]

Scenes smaller than a tile are padded (image 0, mask 255) at the bottom/right; `labeled: false`
marks images that came without a mask (all 255; their tiles are unlabeled-pool only).

The tile id is its row index. `data/split.parquet` (s4seg.data.split) assigns each id a role.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from s4seg.errors import DataError, DatasetNotFoundError

# Level 1: tiles are written once per params change but 5x faster than level 5 for ~5 % more bytes
# (measured on the Dubai tiles); bit-shuffling does not help uint8 imagery.
_COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")


@dataclass(frozen=True)
class SceneInfo:
    name: str
    height: int
    width: int
    labeled: bool = True  # False: an image without a mask (unlabeled pool only)


class TileStoreWriter:
    """Append tiles scene by scene into a new store (used by the tile stage inside `atomic_dir`)."""

    def __init__(
        self,
        path: str | Path,
        *,
        dataset: str,
        classes: Sequence[str],
        palette: Sequence[str],
        tile_size: int,
        stride: int,
        channels: int = 3,
        bands: str = "rgb",
    ) -> None:
        self.group = zarr.open_group(str(path), mode="w")
        t = tile_size
        self.images = self.group.create_array(
            "images", shape=(0, t, t, channels), chunks=(1, t, t, channels), dtype="uint8",
            compressors=_COMPRESSOR, dimension_names=("tile", "y", "x", "band"),
        )
        self.masks = self.group.create_array(
            "masks", shape=(0, t, t), chunks=(1, t, t), dtype="uint8", compressors=_COMPRESSOR,
            fill_value=255, dimension_names=("tile", "y", "x"),
        )
        self.scene_index = self.group.create_array(
            "scene_index", shape=(0,), chunks=(4096,), dtype="int32", dimension_names=("tile",)
        )
        self.offsets = self.group.create_array(
            "offsets", shape=(0, 2), chunks=(4096, 2), dtype="int32", dimension_names=("tile", "yx")
        )
        self.scenes: list[SceneInfo] = []
        self.attrs = {
            "dataset": dataset,
            "classes": list(classes),
            "palette": list(palette),
            "tile_size": tile_size,
            "stride": stride,
            "bands": bands,
        }

    def add_scene(self, name: str, tiles: np.ndarray, masks: np.ndarray, offsets: np.ndarray,
                  height: int, width: int, labeled: bool = True) -> None:
        """tiles (n, T, T, C) uint8, masks (n, T, T) uint8, offsets (n, 2) (y, x)."""
        self.start_scene(name, height, width, labeled)
        self.append_tiles(tiles, masks, offsets)

    def start_scene(self, name: str, height: int, width: int, labeled: bool = True) -> None:
        """Begin a scene; its tiles follow in one or more `append_tiles` calls (bounded memory)."""
        if any(s.name == name for s in self.scenes):
            raise DataError(f"scene name {name!r} appears twice; scene names must be unique")
        self.scenes.append(SceneInfo(name, int(height), int(width), bool(labeled)))

    def append_tiles(self, tiles: np.ndarray, masks: np.ndarray, offsets: np.ndarray) -> None:
        """Tiles of the scene begun last: tiles (n, T, T, C), masks (n, T, T), offsets (n, 2) (y, x)."""
        assert self.scenes, "start_scene() first"
        assert len(tiles) == len(masks) == len(offsets)
        self.images.append(tiles.astype(np.uint8, copy=False))
        self.masks.append(masks.astype(np.uint8, copy=False))
        self.scene_index.append(np.full(len(tiles), len(self.scenes) - 1, dtype=np.int32))
        self.offsets.append(offsets.astype(np.int32))

    def close(self) -> None:
        self.group.attrs.update({**self.attrs, "scenes": [s.__dict__ for s in self.scenes]})


class TileStore:
    """Read-only view of `tiles.zarr`. `image(i)` (T, T, C) uint8, `mask(i)` (T, T) uint8."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise DatasetNotFoundError(f"{path}: tile store not found; run `dvc repro tile` first")
        try:
            self.group = zarr.open_group(str(path), mode="r")
            self.images = self.group["images"]
            self.masks = self.group["masks"]
            self.scene_index = np.asarray(self.group["scene_index"][:])
            self.offsets = np.asarray(self.group["offsets"][:])
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise DataError(f"{path}: not an s4seg tile store ({e}); rebuild it with `dvc repro tile`") from e
        self.path = path
        attrs = dict(self.group.attrs)
        self.dataset: str = attrs["dataset"]
        self.classes: list[str] = list(attrs["classes"])
        self.palette: list[str] = list(attrs["palette"])
        self.tile_size: int = int(attrs["tile_size"])
        self.stride: int = int(attrs["stride"])
        self.bands: str = attrs.get("bands", "rgb")
        self.scenes: list[SceneInfo] = [SceneInfo(**s) for s in attrs["scenes"]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def image(self, i: int) -> np.ndarray:
        return np.asarray(self.images[int(i)])

    def mask(self, i: int) -> np.ndarray:
        return np.asarray(self.masks[int(i)])

    def scene_of(self, i: int) -> str:
        return self.scenes[int(self.scene_index[i])].name

    def tiles_of(self, scene: str) -> np.ndarray:
        """Tile ids of a scene, in storage order."""
        names = [s.name for s in self.scenes]
        if scene not in names:
            raise DataError(f"{self.path}: no scene {scene!r}; scenes are: {', '.join(names[:10])}...")
        return np.flatnonzero(self.scene_index == names.index(scene))

    def scene_info(self, scene: str) -> SceneInfo:
        return next(s for s in self.scenes if s.name == scene)

    def stitch_scene(self, scene: str) -> tuple[np.ndarray, np.ndarray]:
        """Reassemble a scene's image (H, W, C) and mask (H, W) from its tiles and offsets."""
        info = self.scene_info(scene)
        t = self.tile_size
        ids = self.tiles_of(scene)
        image = np.zeros((info.height, info.width, self.images.shape[-1]), dtype=np.uint8)
        mask = np.full((info.height, info.width), 255, dtype=np.uint8)
        for i in ids:
            y, x = self.offsets[i]
            h, w = min(t, info.height - y), min(t, info.width - x)  # scenes smaller than a tile
            image[y : y + h, x : x + w] = self.image(i)[:h, :w]
            mask[y : y + h, x : x + w] = self.mask(i)[:h, :w]
        return image, mask
