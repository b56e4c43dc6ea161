"""The real Dubai aerial data (../shared/datasets/dubai-aerial) through the `dubai` preset and the tile stage.

Skipped when the folder is absent; CI sets S4SEG_REQUIRE_SHARED=1, which turns the skip into a failure.
The colours expected here are the README's table (the dataset's classes.json colours are wrong), written
out independently of the preset. Tiling uses the preset's params on a subset of scenes (parts 2 and 6 of
all 8 Tiles: 16 of the 72 scenes, among them RGB masks with black and Unlabeled pixels, palette-mode
masks from Tiles 2 and 4, and test scenes from Tiles 3 and 8), to stay within a few seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from s4seg.config import IGNORE_INDEX, DatasetConfig, SplitConfig, TilingConfig, from_dict
from s4seg.data.sources import build_source
from s4seg.data.split import load_split, resolve_test_scenes
from s4seg.data.store import TileStore
from s4seg.data.tiling import write_tiles

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "src" / "s4seg" / "presets" / "dubai.yaml"

# The README's table: class -> colour (the masks' real colours), and the two colours to ignore.
README_COLOURS = {
    "Land (unpaved)": 0x8429F6,
    "Water": 0xE2A929,
    "Building": 0x3C1098,
    "Vegetation": 0xFEDD3A,
    "Road": 0x6EC1E4,
}
BLACK, UNLABELED = 0x000000, 0x9B9B9B

# Parts 2 and 6 of every Tile. The wildcard parts name a scene: "Tile 3/6" is Tile 3, image_part_006.
SUBSET = {"image_glob": "*/images/image_part_00[26].jpg", "mask_glob": "*/masks/image_part_00[26].png"}


def preset() -> dict:
    return yaml.safe_load(PRESET.read_text())


def packed_rgb(path: Path) -> np.ndarray:
    """Mask file -> (H, W) int 0xRRGGBB; palette-mode files looked up in their own palette table."""
    with Image.open(path) as im:
        if im.mode == "P":
            table = np.array(im.getpalette(), dtype=np.int64).reshape(-1, 3)
            rgb = table[np.asarray(im)]
        else:
            assert im.mode == "RGB", (path, im.mode)
            rgb = np.asarray(im).astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def expected_mask(path: Path, classes: list[str]) -> np.ndarray:
    """Brute force: each README colour to its class id in `classes`, black and Unlabeled to 255."""
    colour = packed_rgb(path)
    mask = np.full(colour.shape, 77, dtype=np.uint8)  # 77: no colour of the table; must not survive
    for class_id, name in enumerate(classes):
        mask[colour == README_COLOURS[name]] = class_id
    mask[(colour == BLACK) | (colour == UNLABELED)] = IGNORE_INDEX
    assert (mask != 77).all(), f"{path}: a colour outside the README table"
    return mask


# --------------------------------------------------------------------------------------------------
# The preset
# --------------------------------------------------------------------------------------------------
def test_preset_dataset_block_builds_the_whole_dataset(dubai_root, monkeypatch):
    """The preset's dataset block, root as written (relative to the repository root, where dvc runs stages)."""
    block = preset()["dataset"]
    monkeypatch.chdir(REPO)
    if (REPO / block["root"]).resolve() != dubai_root.resolve():  # S4SEG_SHARED points elsewhere
        block = block | {"root": str(dubai_root)}
    cfg = from_dict(DatasetConfig, block, where="dubai.yaml: dataset")
    source = build_source(cfg)
    assert source.name == "folder"
    names = source.scene_names()
    assert len(names) == 72 and len(set(names)) == 72
    assert names[0] == "Tile 1/image_part_001" and names[-1] == "Tile 8/image_part_009"
    assert source.unlabeled_scene_names() == set()
    assert len(source.classes) == 5
    assert {c: int(p[1:], 16) for c, p in zip(source.classes, source.palette, strict=True)} == README_COLOURS
    assert {int(c[1:], 16) for c in cfg.ignore_colors} == {BLACK, UNLABELED}

    split = from_dict(SplitConfig, preset()["split"], where="dubai.yaml: split")
    tiling = from_dict(TilingConfig, preset()["tiling"], where="dubai.yaml: tiling")
    assert tiling.tile_size == tiling.stride == 256
    test = resolve_test_scenes(names, split.test_scenes)
    assert test == {f"Tile {t}/image_part_00{k}" for t in (3, 8) for k in range(1, 10)}


# --------------------------------------------------------------------------------------------------
# Tiling a subset of scenes with the preset's params
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiled(dubai_root, tmp_path_factory):
    params = preset()
    cfg = from_dict(DatasetConfig, params["dataset"] | SUBSET | {"root": str(dubai_root)}, where="dataset")
    tiling = from_dict(TilingConfig, params["tiling"], where="tiling")
    split_cfg = from_dict(SplitConfig, params["split"], where="split")
    out = tmp_path_factory.mktemp("dubai")
    start = time.perf_counter()
    write_tiles(build_source(cfg), tiling, split_cfg, out / "tiles.zarr", out / "split.parquet")
    seconds = time.perf_counter() - start
    print(f"tiled 16 Dubai scenes in {seconds:.1f} s")
    return TileStore(out / "tiles.zarr"), load_split(out / "split.parquet"), split_cfg


def test_subset_has_the_scenes_it_should(tiled):
    store, _, _ = tiled
    assert [s.name for s in store.scenes] == [f"Tile {t}/{k}" for t in range(1, 9) for k in (2, 6)]
    assert store.dataset == "folder" and store.classes == list(README_COLOURS)
    assert store.tile_size == 256 and store.stride == 256


def test_class_ids_are_0_to_4_or_ignore(tiled):
    store, _, _ = tiled
    values = set()
    for start in range(0, len(store), 64):
        values |= set(np.unique(store.masks[start : start + 64]).tolist())
    assert values == {0, 1, 2, 3, 4, IGNORE_INDEX}


@pytest.mark.parametrize(
    ("scene", "mask_file", "black", "unlabeled"),
    [("Tile 3/6", "Tile 3/masks/image_part_006.png", 302, 3429),  # a test scene
     ("Tile 5/2", "Tile 5/masks/image_part_002.png", 506, 2655)],  # a training scene
)
def test_black_and_unlabeled_pixels_are_ignored(tiled, dubai_root, scene, mask_file, black, unlabeled):
    """Against a direct colour count on the mask file: black + Unlabeled pixels are exactly the 255s."""
    store, _, _ = tiled
    colour = packed_rgb(dubai_root / mask_file)
    assert (colour == BLACK).sum() == black and (colour == UNLABELED).sum() == unlabeled
    image, mask = store.stitch_scene(scene)
    assert mask.shape == colour.shape
    assert (mask == IGNORE_INDEX).sum() == black + unlabeled
    assert (mask[(colour == BLACK) | (colour == UNLABELED)] == IGNORE_INDEX).all()
    for class_id, name in enumerate(store.classes):
        assert (mask == class_id).sum() == (colour == README_COLOURS[name]).sum(), name
    np.testing.assert_array_equal(mask, expected_mask(dubai_root / mask_file, store.classes))
    with Image.open(dubai_root / mask_file.replace("masks", "images").replace(".png", ".jpg")) as im:
        np.testing.assert_array_equal(image, np.asarray(im.convert("RGB")))


@pytest.mark.parametrize(
    ("scene", "mask_file"),
    [("Tile 2/6", "Tile 2/masks/image_part_006.png"), ("Tile 4/2", "Tile 4/masks/image_part_002.png")],
)
def test_palette_mode_masks_decode_to_the_same_classes(tiled, dubai_root, scene, mask_file):
    """P-mode masks: their palette table holds the README colours, decoded as in the RGB masks."""
    store, _, _ = tiled
    with Image.open(dubai_root / mask_file) as im:
        assert im.mode == "P"
        used = np.unique(np.asarray(im))
        table = np.array(im.getpalette(), dtype=np.int64).reshape(-1, 3)[used]
    used_colours = {int((r << 16) | (g << 8) | b) for r, g, b in table}
    assert used_colours <= set(README_COLOURS.values()) | {BLACK, UNLABELED}
    assert len(used_colours & set(README_COLOURS.values())) >= 3
    _, mask = store.stitch_scene(scene)
    np.testing.assert_array_equal(mask, expected_mask(dubai_root / mask_file, store.classes))


def test_scene_level_split_with_tiles_3_and_8_as_test(tiled):
    store, split, cfg = tiled
    table = split.table
    roles = table.groupby("scene")["role"].agg(set)
    test_scenes = {s for s, r in roles.items() if "test" in r}
    assert test_scenes == {"Tile 3/2", "Tile 3/6", "Tile 8/2", "Tile 8/6"}
    for scene, scene_roles in roles.items():
        # no scene mixes test tiles with training (labeled / unlabeled) tiles
        assert scene_roles == {"test"} or scene_roles <= {"labeled", "unlabeled"}, (scene, scene_roles)
    assert (table["scene"].to_numpy() == np.array([store.scene_of(i) for i in range(len(store))])).all()
    # labeled: 1/8 of the training tiles that have any label, rounded half up
    pool = [i for i in table.index[table.role != "test"] if (store.mask(i) != IGNORE_INDEX).any()]
    assert (table.role == "labeled").sum() == int(np.floor(cfg.labeled * len(pool) + 0.5))
    assert (table.ratio == cfg.labeled).all() and (table.seed == cfg.seed).all()
