"""`stages/tile.py` as dvc runs it: a subprocess that writes both outputs, repeatably, or fails cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from s4seg.data.split import load_split
from s4seg.data.store import TileStore

REPO = Path(__file__).resolve().parents[2]
PARAMS = {
    "dataset": {"name": "synthetic", "num_scenes": 3, "scene_size": 128, "seed": 1},
    "tiling": {"tile_size": 64, "stride": 48},
    "split": {"test_scenes": None, "labeled": 0.25, "seed": 3},
}


def run_stage(params: dict, out: Path) -> subprocess.CompletedProcess:
    path = out / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "tile.py"), "--params", str(path), "--tiles",
         str(out / "data" / "tiles.zarr"), "--split", str(out / "data" / "split.parquet")],
        capture_output=True, text=True, cwd=out, timeout=120,
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, bytes]:
    out = tmp_path_factory.mktemp("tile_stage")
    result = run_stage(PARAMS, out)
    assert result.returncode == 0, result.stderr
    return out, (out / "data" / "split.parquet").read_bytes()


def test_stage_writes_both_outputs(first_run):
    out, _ = first_run
    store = TileStore(out / "data" / "tiles.zarr")
    split = load_split(out / "data" / "split.parquet")
    # 128 px at tile 64 / stride 48: starts 0, 48, 64 per axis -> 9 tiles per scene
    assert len(store) == 27 and store.tile_size == 64 and store.stride == 48
    assert store.images.shape == (27, 64, 64, 3) and store.masks.shape == (27, 64, 64)
    assert sorted(set(np.asarray(store.offsets).ravel().tolist())) == [0, 48, 64]
    assert split.table["id"].tolist() == list(range(27))
    # synthetic default test scene (3 scenes): the last one
    assert split.scenes("test") == ["scene_02"]
    # 0.25 of the 18 training tiles = 4.5, rounded half up to 5
    assert len(split.labeled) == 5 and len(split.unlabeled) == 13
    assert set(split.table.loc[split.labeled, "scene"]) <= {"scene_00", "scene_01"}
    assert sorted(p.name for p in (out / "data").iterdir()) == ["split.parquet", "tiles.zarr"]


def test_same_params_give_a_byte_identical_split(first_run, tmp_path):
    _, split_bytes = first_run
    result = run_stage(PARAMS, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "split.parquet").read_bytes() == split_bytes
    # and a different split seed gives a different one
    result = run_stage(PARAMS | {"split": PARAMS["split"] | {"seed": 4}}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "split.parquet").read_bytes() != split_bytes


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("split", "labeled", 1.5, r"^error: .*params\.yaml: split: labeled = 1\.5: expected a fraction in \(0, 1\]"),
        ("dataset", "name", "nope", r"^error: dataset\.name: unknown dataset 'nope'; choose one of: folder, "),
        ("tiling", "stride", 100, r"^error: .*params\.yaml: tiling: stride = 100: expected 1\.\.tile_size \(64\)"),
    ],
)
def test_bad_param_is_one_line_exit_2_and_keeps_previous_outputs(first_run, section, key, value, message):
    out, split_bytes = first_run
    before = TileStore(out / "data" / "tiles.zarr")
    images_before = np.asarray(before.images[:])
    params = PARAMS | {section: PARAMS[section] | {key: value}}
    result = run_stage(params, out)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors == lines[-1:]
    assert re.search(message, errors[0]), errors[0]
    # the previous outputs are untouched, and no temporary is left next to them
    assert sorted(p.name for p in (out / "data").iterdir()) == ["split.parquet", "tiles.zarr"]
    assert (out / "data" / "split.parquet").read_bytes() == split_bytes
    np.testing.assert_array_equal(np.asarray(TileStore(out / "data" / "tiles.zarr").images[:]), images_before)
