"""Tiling: positions, round trip by offsets, full coverage, streaming memory, atomic outputs on errors."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from s4seg.config import IGNORE_INDEX, SplitConfig, TilingConfig
from s4seg.data.sources import Scene, Source
from s4seg.data.split import load_split
from s4seg.data.store import TileStore
from s4seg.data.tiling import tile_main, tile_scene, tile_starts, write_tiles
from s4seg.errors import DataError, DatasetNotFoundError, ParamsError, S4segError


class ArraySource(Source):
    """Scenes given as arrays (or built lazily by a function, to test streaming)."""

    name = "arrays"
    classes = ("a", "b", "c")
    palette = ("#000000", "#FF0000", "#00FF00")

    def __init__(self, scenes: list[Scene] | None = None, *, count: int = 0, make=None, test=("s0",)) -> None:
        self._scenes = scenes
        self.count = len(scenes) if scenes is not None else count
        self.make = make
        self.default_test_scenes = test

    def scene_names(self) -> list[str]:
        return [f"s{i}" for i in range(self.count)]

    def scenes(self) -> Iterator[Scene]:
        for i in range(self.count):
            yield self._scenes[i] if self._scenes is not None else self.make(i)


def random_scene(rng: np.random.Generator, name: str, h: int, w: int) -> Scene:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (h, w), dtype=np.uint8)
    mask[rng.random((h, w)) < 0.1] = IGNORE_INDEX
    return Scene(name, image, mask)


@pytest.mark.parametrize(
    ("length", "tile", "stride", "expected"),
    [(10, 4, 4, [0, 4, 6]), (8, 4, 4, [0, 4]), (10, 4, 3, [0, 3, 6]), (3, 4, 2, [0]), (4, 4, 1, [0]),
     (7, 4, 1, [0, 1, 2, 3])],
)
def test_tile_starts_end_at_the_border(length, tile, stride, expected):
    assert tile_starts(length, tile, stride).tolist() == expected


@pytest.mark.parametrize(
    ("h", "w", "tile", "stride"), [(70, 90, 32, 32), (70, 90, 32, 20), (20, 50, 32, 16), (9, 7, 32, 32)]
)
def test_tiles_equal_the_scene_at_their_offsets(h, w, tile, stride):
    """Brute force: each tile is scene[y:y+T, x:x+T], padded with image 0 / mask 255 where the scene ends."""
    scene = random_scene(np.random.default_rng(0), "s", h, w)
    rows = list(tile_scene(scene.image, scene.mask, tile, stride))
    tiles = np.concatenate([r[0] for r in rows])
    masks = np.concatenate([r[1] for r in rows])
    offsets = np.concatenate([r[2] for r in rows])
    assert len(offsets) == len(tile_starts(h, tile, stride)) * len(tile_starts(w, tile, stride))
    covered = np.zeros((h, w), dtype=int)
    for t, m, (y, x) in zip(tiles, masks, offsets, strict=True):
        ref_img = np.zeros((tile, tile, 3), np.uint8)
        ref_mask = np.full((tile, tile), IGNORE_INDEX, np.uint8)
        part = scene.image[y : y + tile, x : x + tile]
        ref_img[: part.shape[0], : part.shape[1]] = part
        ref_mask[: part.shape[0], : part.shape[1]] = scene.mask[y : y + tile, x : x + tile]
        np.testing.assert_array_equal(t, ref_img)
        np.testing.assert_array_equal(m, ref_mask)
        covered[y : y + tile, x : x + tile] += 1
        # shifted inward: a tile never starts where it would leave the scene (unless the scene is smaller)
        assert y + tile <= max(h, tile) and x + tile <= max(w, tile)
    assert covered.min() >= 1  # every pixel covered


def test_store_round_trip_by_offsets(tmp_path):
    """Stitching each scene's tiles back by offsets gives the scene exactly, with overlap and small scenes."""
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng, "s0", 70, 90), random_scene(rng, "s1", 100, 64), random_scene(rng, "s2", 20, 50),
              random_scene(rng, "s3", 9, 7)]
    write_tiles(ArraySource(scenes), TilingConfig(32, 20), SplitConfig(labeled=0.5), tmp_path / "t.zarr",
                tmp_path / "s.parquet")
    store = TileStore(tmp_path / "t.zarr")
    assert [s.name for s in store.scenes] == ["s0", "s1", "s2", "s3"]
    assert store.tile_size == 32 and store.stride == 20 and store.classes == ["a", "b", "c"]
    for scene in scenes:
        image, mask = store.stitch_scene(scene.name)
        np.testing.assert_array_equal(image, scene.image)
        np.testing.assert_array_equal(mask, scene.mask)
    split = load_split(tmp_path / "s.parquet")
    assert len(split.table) == len(store)
    np.testing.assert_array_equal(split.table[["y", "x"]].to_numpy(), store.offsets)
    assert split.scenes("test") == ["s0"]


def test_same_params_give_identical_outputs(tmp_path):
    rng = np.random.default_rng(2)
    scenes = [random_scene(rng, f"s{i}", 64, 64) for i in range(3)]
    for run in ("a", "b"):
        write_tiles(ArraySource(scenes), TilingConfig(32, 32), SplitConfig(labeled=0.3, seed=5),
                    tmp_path / run / "t.zarr", tmp_path / run / "s.parquet")
    assert (tmp_path / "a/s.parquet").read_bytes() == (tmp_path / "b/s.parquet").read_bytes()
    a, b = TileStore(tmp_path / "a/t.zarr"), TileStore(tmp_path / "b/t.zarr")
    np.testing.assert_array_equal(a.images[:], b.images[:])
    np.testing.assert_array_equal(a.masks[:], b.masks[:])


def _peak_bytes(tmp_path: Path, count: int) -> int:
    """Peak traced allocation while tiling `count` scenes of 512 x 512 (1 MiB of pixels each)."""
    def make(i: int) -> Scene:
        return Scene(f"s{i}", np.full((512, 512, 3), i, np.uint8), np.full((512, 512), i % 3, np.uint8))

    source = ArraySource(count=count, make=make)
    tracemalloc.start()
    try:
        write_tiles(source, TilingConfig(128, 128), SplitConfig(labeled=0.5), tmp_path / f"{count}.zarr",
                    tmp_path / f"{count}.parquet")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_number_of_scenes(tmp_path):
    few, many = _peak_bytes(tmp_path, 2), _peak_bytes(tmp_path, 12)
    # 10 more scenes hold 10 MiB of pixels: streaming keeps the peak at about one scene.
    assert many < few + 2 * 2**20, (few, many)


# --------------------------------------------------------------------------------------------------
# Errors through the stage entry point: one clear message, no partial store, the previous one kept.
# --------------------------------------------------------------------------------------------------
def _folder_dataset(root: Path, *, size_mismatch=False, unknown_colour=False, unreadable=False) -> None:
    rng = np.random.default_rng(3)
    colours = np.array([[255, 0, 0], [0, 0, 255], [0, 0, 0]], np.uint8)
    for tile in ("A", "B"):
        (root / tile / "images").mkdir(parents=True)
        (root / tile / "masks").mkdir(parents=True)
        for part in (1, 2):
            ids = rng.integers(0, 3, (40, 48))
            rgb = colours[ids]
            if unknown_colour and tile == "B" and part == 2:
                rgb[5, 7] = (18, 52, 86)
            h = 41 if size_mismatch and tile == "B" else 40
            image = rng.integers(0, 256, (h, 48, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / tile / "images" / f"p{part}.png")
            Image.fromarray(rgb).save(root / tile / "masks" / f"p{part}.png")
    if unreadable:
        (root / "B" / "images" / "p1.png").write_bytes(b"not a png at all")


def _params(path: Path, root: Path | None, **overrides) -> Path:
    params = {
        "dataset": {"name": "folder", "root": str(root), "image_glob": "*/images/*.png", "mask_glob": "*/masks/*.png",
                    "classes": ["red", "blue"], "palette": ["#FF0000", "#0000FF"], "ignore_colors": ["#000000"]},
        "tiling": {"tile_size": 16, "stride": 16},
        "split": {"test_scenes": ["B/*"], "labeled": 0.5},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        params[section][name] = value
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def previous(tmp_path):
    """A good tile store and split already in place."""
    good = tmp_path / "good"
    _folder_dataset(good)
    out = tmp_path / "out"
    tile_main(_params(tmp_path / "good.yaml", good), out / "tiles.zarr", out / "split.parquet")
    return out, (out / "split.parquet").read_bytes(), len(TileStore(out / "tiles.zarr"))


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("missing_root", DatasetNotFoundError, r"dataset.root: .*nowhere is not a directory"),
        ("size_mismatch", DataError, r"B/masks/p\d.png: mask is 48x40 .* image .*B/images/p\d.png is 48x41"),
        ("unknown_colour", DataError, r"B/masks/p2.png: mask colour\(s\) #123456 \(1 px\)"),
        ("unreadable", DataError, r"B/images/p1.png: cannot read image"),
        ("unknown_name", ParamsError, r"dataset.name: unknown dataset 'foldr'; choose one of: folder, isprs, loveda"),
        ("fraction", ParamsError, r"split: labeled = 1.5: expected a fraction in \(0, 1\]"),
        ("zero", ParamsError, r"split: labeled = 0.0: expected a fraction in \(0, 1\]"),
        ("too_many", ParamsError, r"split.labeled = 500: more than the \d+ training tiles"),
        ("bad_pattern", ParamsError, r"split.test_scenes: pattern 'C/\*' matches no labeled scene"),
        ("no_match", DataError, r"dataset.image_glob = '\*/imgs/\*.png' matches no image file"),
    ],
)
def test_bad_input_leaves_previous_outputs_intact(tmp_path, previous, case, error, match):
    out, split_bytes, n_tiles = previous
    bad = tmp_path / "bad"
    _folder_dataset(bad, size_mismatch=case == "size_mismatch", unknown_colour=case == "unknown_colour",
                    unreadable=case == "unreadable")
    overrides = {
        "missing_root": {"dataset__root": str(tmp_path / "nowhere")},
        "unknown_name": {"dataset__name": "foldr"},
        "fraction": {"split__labeled": 1.5},
        "zero": {"split__labeled": 0},
        "too_many": {"split__labeled": 500},
        "bad_pattern": {"split__test_scenes": ["C/*"]},
        "no_match": {"dataset__image_glob": "*/imgs/*.png"},
    }.get(case, {})
    with pytest.raises(error, match=match) as info:
        tile_main(_params(tmp_path / "bad.yaml", bad, **overrides), out / "tiles.zarr", out / "split.parquet")
    assert isinstance(info.value, S4segError)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["split.parquet", "tiles.zarr"]  # no temporary left
    assert (out / "split.parquet").read_bytes() == split_bytes
    assert len(TileStore(out / "tiles.zarr")) == n_tiles
