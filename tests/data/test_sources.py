"""Sources: registry, folder (colour / palette / index masks, unlabeled images), ISPRS and LoveDA layouts.

The ISPRS and LoveDA fixtures are tiny files written here in those datasets' exact formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from s4seg.config import IGNORE_INDEX, DatasetConfig
from s4seg.data.sources import SOURCES, build_source
from s4seg.data.sources.base import ColorMap
from s4seg.data.sources.folder import glob_regex
from s4seg.data.sources.isprs import ISPRS_PALETTE
from s4seg.errors import DataError, DatasetNotFoundError, ParamsError

RNG = np.random.default_rng(0)


def hex_to_rgb(colour: str) -> list[int]:
    return [int(colour[i : i + 2], 16) for i in (1, 3, 5)]


def save_png(path: Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if palette is not None:  # palette-mode ("P") PNG: the pixel values index `palette`
        im = Image.fromarray(array, mode="P")
        im.putpalette(palette.astype(np.uint8).ravel().tolist())
    im.save(path)


def test_registry_lists_valid_names():
    assert {"synthetic", "folder", "isprs", "loveda"} <= set(SOURCES)
    with pytest.raises(ParamsError,
                       match="unknown dataset 'vaihingen'; choose one of: folder, isprs, loveda, synthetic"):
        build_source(DatasetConfig(name="vaihingen"))


@pytest.mark.parametrize(
    ("pattern", "path", "groups"),
    [("*/images/*.jpg", "Tile 1/images/part_1.jpg", ("Tile 1", "part_1")),
     ("**/images/*.jpg", "images/x.jpg", (None, "x")),
     ("**/images/*.jpg", "a/b/images/x.jpg", ("a/b", "x")),
     ("labels/*_label.tif", "labels/2_10_label.tif", ("2_10",)),
     ("img/[ab]?.png", "img/a1.png", ("a", "1"))],
)
def test_glob_regex_captures_wildcards(pattern, path, groups):
    assert glob_regex(pattern).fullmatch(path).groups() == groups


@pytest.mark.parametrize(("pattern", "path"), [("*/images/*.jpg", "a/b/images/x.jpg"), ("*.png", "x.jpg")])
def test_glob_regex_rejects(pattern, path):
    assert glob_regex(pattern).fullmatch(path) is None


# --------------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------------
PALETTE = ("#3C1098", "#8429F6", "#6EC1E4")
COLOURS = np.array([hex_to_rgb(c) for c in PALETTE] + [[155, 155, 155], [0, 0, 0]], np.uint8)  # + 2 ignore


def folder_cfg(root: Path | None, **kw) -> DatasetConfig:
    base = dict(name="folder", root=root and str(root), image_glob="*/images/*.jpg", mask_glob="*/masks/*.png",
                classes=("building", "land", "road"), palette=PALETTE, ignore_colors=("#9B9B9B", "#000000"))
    return DatasetConfig(**(base | kw))


def make_colour_folder(root: Path) -> dict[str, np.ndarray]:
    """Two 'Tile' folders; Tile 2 has palette-mode masks. Returns the expected class-id mask per scene."""
    expected = {}
    for tile, palette_mode in (("Tile 1", False), ("Tile 2", True)):
        for part in ("part_1", "part_2"):
            codes = RNG.integers(0, 5, (12, 10))
            image = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            (root / tile / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / tile / "images" / f"{part}.jpg")
            if palette_mode:
                save_png(root / tile / "masks" / f"{part}.png", codes.astype(np.uint8), palette=COLOURS)
            else:
                save_png(root / tile / "masks" / f"{part}.png", COLOURS[codes])
            expected[f"{tile}/{part}"] = np.where(codes < 3, codes, IGNORE_INDEX).astype(np.uint8)
    return expected


def test_folder_colour_and_palette_masks(tmp_path):
    expected = make_colour_folder(tmp_path)
    source = build_source(folder_cfg(tmp_path))
    assert source.classes == ("building", "land", "road") and source.palette == PALETTE
    assert source.scene_names() == ["Tile 1/part_1", "Tile 1/part_2", "Tile 2/part_1", "Tile 2/part_2"]
    scenes = list(source.scenes())
    assert [s.name for s in scenes] == source.scene_names()
    for scene in scenes:
        assert scene.image.shape == (12, 10, 3) and scene.image.dtype == np.uint8 and scene.labeled
        np.testing.assert_array_equal(scene.mask, expected[scene.name])


def test_folder_index_masks_with_remap_and_ignore(tmp_path):
    ids = RNG.integers(0, 4, (6, 7)).astype(np.uint8) * 10  # file ids 0, 10, 20, 30
    Image.fromarray(RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "labels").mkdir()
    Image.fromarray(ids).save(tmp_path / "labels" / "a.png")
    cfg = DatasetConfig(name="folder", root=str(tmp_path), image_glob="*.png", mask_glob="labels/*.png",
                        mask_format="index", classes=("x", "y", "z"), id_map={10: 0, 20: 1, 30: 2}, ignore_ids=(0,))
    (scene,) = build_source(cfg).scenes()
    lut = {0: IGNORE_INDEX, 10: 0, 20: 1, 30: 2}
    np.testing.assert_array_equal(scene.mask, np.vectorize(lut.get)(ids))
    bad = DatasetConfig(**(cfg.__dict__ | {"id_map": {10: 0, 20: 1}}))
    with pytest.raises(DataError, match=r"labels/a.png: mask id\(s\) \[30\] map to no class"):
        list(build_source(bad).scenes())


def test_folder_unlabeled_images(tmp_path):
    make_colour_folder(tmp_path)
    extra = tmp_path / "unlabeled" / "more"
    extra.mkdir(parents=True)
    Image.fromarray(RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(extra / "u1.jpg")
    source = build_source(folder_cfg(tmp_path, unlabeled_glob="**/*.jpg"))
    # the labeled images also match "**/*.jpg" but stay labeled
    assert source.unlabeled_scene_names() == {"unlabeled/more/u1"}
    scenes = {s.name: s for s in source.scenes()}
    assert len(scenes) == 5
    u = scenes["unlabeled/more/u1"]
    assert not u.labeled and u.image.shape == (9, 11, 3) and (u.mask == IGNORE_INDEX).all()


def test_folder_errors(tmp_path):
    make_colour_folder(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="dataset.root: .*missing is not a directory"):
        build_source(folder_cfg(tmp_path / "missing"))
    with pytest.raises(ParamsError, match="dataset.root: the 'folder' dataset needs a root"):
        build_source(folder_cfg(None))
    with pytest.raises(DataError, match=r"dataset.image_glob = '\*/images/\*.tif' matches no image file"):
        build_source(folder_cfg(tmp_path, image_glob="*/images/*.tif"))
    with pytest.raises(ParamsError, match="dataset.palette: 2 colour"):
        build_source(folder_cfg(tmp_path, palette=PALETTE[:2]))
    with pytest.raises(ParamsError, match=r"dataset.palette\[0\]: colour 'red' is not of the form #RRGGBB"):
        build_source(folder_cfg(tmp_path, palette=("red", *PALETTE[1:])))
    (tmp_path / "Tile 2" / "masks" / "part_2.png").unlink()
    with pytest.raises(DataError, match=r"Tile 2/images/part_2.jpg: no mask found for this image"):
        build_source(folder_cfg(tmp_path))


def test_folder_unknown_colour_names_colour_and_file(tmp_path):
    make_colour_folder(tmp_path)
    source = build_source(folder_cfg(tmp_path, ignore_colors=("#000000",)))  # grey is now unknown
    with pytest.raises(DataError, match=r"Tile 1/masks/part_1.png: mask colour\(s\) #9B9B9B \(\d+ px\)"):
        list(source.scenes())


def test_color_map_in_row_blocks_matches_brute_force(monkeypatch):
    """Blocks of a few rows (as on a 6000 x 6000 ISPRS label) give the per-pixel lookup exactly."""
    monkeypatch.setattr(ColorMap, "BLOCK_PIXELS", 25)  # 10-px-wide mask: blocks of 2 rows, the last one short
    codes = RNG.integers(0, 5, (9, 10))
    ids = ColorMap(PALETTE, ("#9B9B9B", "#000000"))(COLOURS[codes], "m.png")
    np.testing.assert_array_equal(ids, np.where(codes < 3, codes, IGNORE_INDEX))
    assert ids.dtype == np.uint8


def test_color_map_names_the_most_frequent_unknown_colours():
    rgb = np.zeros((6, 10, 3), np.uint8)
    for i in range(7):  # colour #0000(i+1) on i+1 pixels
        rgb.reshape(-1, 3)[i * 8 : i * 8 + i + 1] = (0, 0, i + 1)
    with pytest.raises(DataError, match=r"^m.png: mask colour\(s\) #000007 \(7 px\), #000006 \(6 px\), "
                       r"#000005 \(5 px\), #000004 \(4 px\), #000003 \(3 px\) and 2 more are neither"):
        ColorMap(("#000000",))(rgb, "m.png")
    with pytest.raises(ParamsError, match=r"x.palette: the same colour is given for two classes"):
        ColorMap(("#00FF00", "#00ff00"), where="x")
    with pytest.raises(ParamsError, match=r"x.ignore_colors\[0\]: colour #00FF00 is also a class colour"):
        ColorMap(("#00FF00",), ("#00FF00",), where="x")


def test_folder_size_mismatch_and_unreadable(tmp_path):
    make_colour_folder(tmp_path)
    Image.fromarray(np.zeros((13, 10, 3), np.uint8)).save(tmp_path / "Tile 2" / "images" / "part_1.jpg")
    with pytest.raises(DataError, match=r"Tile 2/masks/part_1.png: mask is 10x12 .* is 10x13"):
        list(build_source(folder_cfg(tmp_path)).scenes())
    (tmp_path / "Tile 2" / "images" / "part_1.jpg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(DataError, match=r"Tile 2/images/part_1.jpg: cannot read image"):
        list(build_source(folder_cfg(tmp_path)).scenes())


# --------------------------------------------------------------------------------------------------
# ISPRS
# --------------------------------------------------------------------------------------------------
ISPRS_RGB = np.array([hex_to_rgb(c) for c in ISPRS_PALETTE] + [[0, 0, 0]], np.uint8)  # + eroded border


def write_isprs_scene(image_path: Path, label_path: Path, h: int, w: int) -> np.ndarray:
    codes = RNG.integers(0, 7, (h, w))
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(image_path, RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), photometric="rgb")
    tifffile.imwrite(label_path, ISPRS_RGB[codes], photometric="rgb")
    return np.where(codes < 6, codes, IGNORE_INDEX).astype(np.uint8)


def test_isprs_vaihingen_layout(tmp_path):
    expected = {}
    for area in (1, 2, 10):
        expected[f"area{area}"] = write_isprs_scene(
            tmp_path / "top" / f"top_mosaic_09cm_area{area}.tif",
            tmp_path / "gt" / f"top_mosaic_09cm_area{area}.tif", 9, 7 + area)
    source = build_source(DatasetConfig(name="isprs", root=str(tmp_path)))
    assert source.classes[:2] == ("impervious_surfaces", "building") and source.bands == "irrg"
    assert source.scene_names() == ["area1", "area2", "area10"]  # natural order
    assert "area2" in source.default_test_scenes and "area1" not in source.default_test_scenes
    assert len(source.default_test_scenes) == 17
    for scene in source.scenes():
        assert scene.image.shape == (9, 7 + int(scene.name[4:]), 3)
        np.testing.assert_array_equal(scene.mask, expected[scene.name])
    with pytest.raises(DatasetNotFoundError, match="gt_eroded: folder not found"):
        build_source(DatasetConfig(name="isprs", root=str(tmp_path), isprs_eroded=True))
    with pytest.raises(ParamsError, match="Vaihingen orthophotos exist in IRRG only"):
        build_source(DatasetConfig(name="isprs", root=str(tmp_path), isprs_bands="rgb"))


def test_isprs_potsdam_layout(tmp_path):
    expected = {}
    for tile in ("2_10", "2_13"):
        expected[tile] = write_isprs_scene(
            tmp_path / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif",
            tmp_path / "5_Labels_all_noBoundary" / f"top_potsdam_{tile}_label_noBoundary.tif", 8, 8)
    cfg = DatasetConfig(name="isprs", root=str(tmp_path), isprs_variant="potsdam", isprs_bands="rgb",
                        isprs_eroded=True)
    source = build_source(cfg)
    assert source.scene_names() == ["2_10", "2_13"] and source.bands == "rgb"
    assert "2_13" in source.default_test_scenes and len(source.default_test_scenes) == 14
    for scene in source.scenes():
        np.testing.assert_array_equal(scene.mask, expected[scene.name])
    # an unknown colour names the file
    label = tmp_path / "5_Labels_all_noBoundary" / "top_potsdam_2_13_label_noBoundary.tif"
    rgb = tifffile.imread(label)
    rgb[0, 0] = (250, 250, 250)
    tifffile.imwrite(label, rgb, photometric="rgb")
    with pytest.raises(DataError, match=r"top_potsdam_2_13_label_noBoundary.tif: mask colour\(s\) #FAFAFA"):
        list(build_source(cfg).scenes())


# --------------------------------------------------------------------------------------------------
# LoveDA
# --------------------------------------------------------------------------------------------------
def test_loveda_layout(tmp_path):
    expected = {}
    for split, domain, ids in (("Train", "Urban", (1366, 1367)), ("Train", "Rural", (0, 1)), ("Val", "Urban", (3514,)),
                               ("Val", "Rural", (2522,))):
        for i in ids:
            raw = RNG.integers(0, 8, (8, 6)).astype(np.uint8)
            save_png(tmp_path / split / domain / "images_png" / f"{i}.png",
                     RNG.integers(0, 256, (8, 6, 3), dtype=np.uint8))
            save_png(tmp_path / split / domain / "masks_png" / f"{i}.png", raw)
            expected[f"{split}/{domain}/{i}"] = np.where(raw == 0, IGNORE_INDEX, raw - 1).astype(np.uint8)
    source = build_source(DatasetConfig(name="loveda", root=str(tmp_path)))
    assert len(source.classes) == 7 and source.default_test_scenes == ("Val/*",)
    assert source.scene_names() == ["Train/Urban/1366", "Train/Urban/1367", "Train/Rural/0", "Train/Rural/1",
                                    "Val/Urban/3514", "Val/Rural/2522"]
    for scene in source.scenes():
        np.testing.assert_array_equal(scene.mask, expected[scene.name])
    only_rural = build_source(DatasetConfig(name="loveda", root=str(tmp_path), loveda_domains=("Rural",)))
    assert only_rural.scene_names() == ["Train/Rural/0", "Train/Rural/1", "Val/Rural/2522"]
    with pytest.raises(ParamsError, match="dataset.loveda_domains"):
        build_source(DatasetConfig(name="loveda", root=str(tmp_path), loveda_domains=("Suburban",)))
    save_png(tmp_path / "Val" / "Rural" / "masks_png" / "2522.png", np.full((8, 6), 9, np.uint8))
    with pytest.raises(DataError, match=r"2522.png: mask id\(s\) \[9\] map to no class"):
        list(source.scenes())
