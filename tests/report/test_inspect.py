"""`s4seg inspect` backends: tile and scene PNGs of known size, the summary table, errors; no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image as PILImage

from s4seg.data.store import TileStore, TileStoreWriter
from s4seg.errors import DataError, DatasetNotFoundError
from s4seg.evaluation.pseudo_quality import PseudoQuality
from s4seg.evaluation.regions import pseudo_regions, region_table
from s4seg.report.inspect import TITLE_PX, inspect_scene, inspect_tile, legend_height, summary

T = 16
CLASSES = ["road", "tree", "roof"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A tile store (one 32x48 scene of six tiles) and a dump of tiles 1, 2 and 4, written with plain zarr
    in the documented layout, so these tests need no method and no torch."""
    root = tmp_path_factory.mktemp("inspect")
    rng = np.random.default_rng(0)
    tiles = root / "tiles.zarr"
    w = TileStoreWriter(tiles, dataset="tiny", classes=CLASSES, palette=["#808080", "#00ff00", "#ff0000"],
                        tile_size=T, stride=T)
    offsets = np.array([[y, x] for y in (0, T) for x in (0, T, 2 * T)])
    masks = rng.integers(0, 3, (6, T, T)).astype(np.uint8)
    masks[:, :2] = 255
    w.add_scene("s1", rng.integers(0, 256, (6, T, T, 3), dtype=np.uint8), masks, offsets, 2 * T, 3 * T)
    w.close()
    ids = np.array([1, 2, 4])
    gt = masks[ids]
    pseudo = np.where(rng.random(gt.shape) < 0.7, np.where(gt == 255, 0, gt), rng.integers(0, 3, gt.shape))
    pseudo = pseudo.astype(np.uint8)
    conf = rng.random(gt.shape).astype(np.float16)
    keep = conf > 0.3
    regions = np.stack([pseudo_regions(p) for p in pseudo])
    tables = [region_table(r, p, c, 3) for r, p, c in zip(regions, pseudo, conf, strict=True)]
    dump = root / "pseudo.zarr"
    g = zarr.open_group(str(dump), mode="w")
    for name, value in {"tile_id": ids, "pseudo": pseudo, "conf": conf, "keep": keep, "regions": regions, "gt": gt,
                        "region_offsets": np.concatenate([[0], np.cumsum([len(t) for t in tables])]),
                        "region_class": np.concatenate([t.cls for t in tables]),
                        "region_conf": np.concatenate([t.conf for t in tables]),
                        "region_pixels": np.concatenate([t.pixels for t in tables])}.items():
        g.create_array(name, data=np.asarray(value))
    g.attrs.update({"classes": CLASSES, "palette": ["#808080", "#00ff00", "#ff0000"], "method": "tiny",
                    "iteration": 5, "params_hash": "h", "tiles": str(tiles)})
    return dump, tiles, {"pseudo": pseudo, "keep": keep, "gt": gt, "regions": regions}


def test_tile_png_has_the_expected_size(artifacts: tuple[Path, Path, dict], tmp_path: Path) -> None:
    dump, tiles, _ = artifacts
    out = inspect_tile(dump, tiles, 2, tmp_path / "sub" / "tile.png", panel_px=64)
    assert out.is_file()
    with PILImage.open(out) as im:
        assert im.size == (5 * 64, TITLE_PX + 64 + legend_height(3))
        assert legend_height(3) == 28  # one legend row: the size does not just echo the code
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # something was drawn
    # the tile path recorded in the dump is used when none is given
    with PILImage.open(inspect_tile(dump, None, 4, tmp_path / "t4.png", panel_px=32)) as im:
        assert im.size == (160, TITLE_PX + 32 + 28)


def test_scene_png_follows_the_aspect_ratio(artifacts: tuple[Path, Path, dict], tmp_path: Path) -> None:
    dump, tiles, _ = artifacts
    out = inspect_scene(dump, tiles, "s1", tmp_path / "scene.png", panel_px=64)
    with PILImage.open(out) as im:
        assert im.size == (5 * 96, TITLE_PX + 64 + 28)  # scene is 32 x 48: panels 96 wide, 64 high


def test_summary_table_matches_counts(artifacts: tuple[Path, Path, dict]) -> None:
    dump, _, arrays = artifacts
    text = summary(dump)
    lines = text.splitlines()
    assert "method tiny" in lines[0] and "iteration 5" in lines[0] and "3 unlabeled tiles" in lines[0]
    q = PseudoQuality(3)
    q.update(arrays["pseudo"], arrays["keep"], arrays["gt"], arrays["regions"])
    overall = next(line for line in lines if line.startswith("all"))
    assert overall.split()[1] == f"{q.metrics()['accuracy']:.3f}"
    assert overall.split()[-1] == str(int(q.metrics()["regions"]))
    for name in CLASSES:
        assert any(line.startswith(name) for line in lines)


def test_errors(artifacts: tuple[Path, Path, dict], tmp_path: Path) -> None:
    dump, tiles, _ = artifacts
    with pytest.raises(DataError, match="tile 0 is not in the dump"):
        inspect_tile(dump, tiles, 0, tmp_path / "x.png")
    with pytest.raises(DataError, match="no scene 'nope'; scenes are: s1"):
        inspect_scene(dump, tiles, "nope", tmp_path / "x.png")
    with pytest.raises(DatasetNotFoundError, match="pseudo-label dump not found"):
        summary(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("pseudo", data=np.zeros(2))
    with pytest.raises(DataError, match="missing tile_id"):
        summary(tmp_path / "other.zarr")
    assert TileStore(tiles).num_classes == 3


def test_readers_do_not_import_torch() -> None:
    code = ("import sys; import s4seg.report.inspect, s4seg.report.pseudo_section, s4seg.evaluation.snapshots; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
