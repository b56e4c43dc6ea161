"""Scene-level split and labeled sampling: counts, seeds, determinism, validation."""

from __future__ import annotations

import numpy as np
import pytest

from s4seg.config import SplitConfig, load_params
from s4seg.data.split import load_split, make_split, resolve_test_scenes, save_split
from s4seg.errors import DatasetNotFoundError, ParamsError

SCENES = ["a/1", "a/2", "b/1", "b/2", "u/1"]


def tiles(per_scene: int = 8) -> tuple[list[str], np.ndarray]:
    names = [s for s in SCENES for _ in range(per_scene)]
    offsets = np.array([(16 * (i // 4), 16 * (i % 4)) for _ in SCENES for i in range(per_scene)])
    return names, offsets


def test_test_scenes_are_resolved_by_pattern():
    assert resolve_test_scenes(SCENES, ["b/*"]) == {"b/1", "b/2"}
    assert resolve_test_scenes(SCENES, ["a/2", "b/1"]) == {"a/2", "b/1"}
    # images without masks are never test scenes
    with pytest.raises(ParamsError, match=r"split.test_scenes: pattern 'u/\*' matches no labeled scene"):
        resolve_test_scenes(SCENES, ["u/*"], unlabeled={"u/1"})


@pytest.mark.parametrize(
    ("patterns", "match"),
    [(["c/*"], r"pattern 'c/\*' matches no labeled scene; scenes are: a/1, a/2"),
     (["*"], r"match all 5 labeled scenes; leave some for training"),
     ([], r"split.test_scenes: the 'dataset' dataset has no default test scenes")],
)
def test_bad_test_patterns(patterns, match):
    with pytest.raises(ParamsError, match=match):
        resolve_test_scenes(SCENES, patterns)


def test_roles_and_fraction():
    names, offsets = tiles()
    table = make_split(names, offsets, {"b/1", "b/2"}, SplitConfig(labeled=0.25, seed=3), unlabeled_scenes={"u/1"})
    assert list(table.columns) == ["id", "scene", "x", "y", "role", "ratio", "seed"]
    assert table["id"].tolist() == list(range(40))
    assert set(table.loc[table.scene.str.startswith("b/"), "role"]) == {"test"}
    assert set(table.loc[table.scene == "u/1", "role"]) == {"unlabeled"}
    labeled = table[table.role == "labeled"]
    assert len(labeled) == 4  # 1/4 of the 16 tiles of a/1 and a/2
    assert set(labeled.scene) <= {"a/1", "a/2"}
    assert (table.ratio == 0.25).all() and (table.seed == 3).all()
    np.testing.assert_array_equal(table[["y", "x"]].to_numpy(), offsets)


def test_count_rounding_and_tiles_without_labels():
    names, offsets = tiles()
    has_labels = np.ones(len(names), bool)
    has_labels[:8] = False  # a/1 is all ignore: never labeled
    table = make_split(names, offsets, {"b/1"}, SplitConfig(labeled=1.0), has_labels=has_labels)
    assert set(table[table.role == "labeled"].scene) == {"a/2", "b/2", "u/1"}
    assert (table[table.scene == "a/1"].role == "unlabeled").all()
    # 1/16 of 32 pool tiles = 2; an absolute count of 5 gives ratio 5/32
    assert (make_split(names, offsets, {"b/1"}, SplitConfig(labeled=1 / 16)).role == "labeled").sum() == 2
    table = make_split(names, offsets, {"b/1"}, SplitConfig(labeled=5))
    assert (table.role == "labeled").sum() == 5 and table.ratio[0] == pytest.approx(5 / 32)
    # a tiny fraction still labels one tile
    assert (make_split(names, offsets, {"b/1"}, SplitConfig(labeled=0.001)).role == "labeled").sum() == 1


def test_seed_picks_the_labeled_tiles():
    names, offsets = tiles()
    pick = {s: set(make_split(names, offsets, {"b/1"}, SplitConfig(labeled=0.25, seed=s)).query("role == 'labeled'").id)
            for s in (0, 0, 1)}
    again = set(make_split(names, offsets, {"b/1"}, SplitConfig(labeled=0.25, seed=0)).query("role == 'labeled'").id)
    assert pick[0] == again and pick[0] != pick[1]


def test_saved_split_is_byte_identical_and_loads(tmp_path):
    names, offsets = tiles()
    for name in ("a.parquet", "b.parquet"):
        save_split(make_split(names, offsets, {"b/1"}, SplitConfig(labeled=0.5, seed=7)), tmp_path / name)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    split = load_split(tmp_path / "a.parquet")
    assert len(split.labeled) == 16 and len(split.test) == 8 and len(split.unlabeled) == 16
    assert split.scenes("test") == ["b/1"]
    with pytest.raises(DatasetNotFoundError, match="missing.parquet: split table not found"):
        load_split(tmp_path / "missing.parquet")


@pytest.mark.parametrize("labeled", [0, -0.5, 2.5])
def test_labeled_outside_range_is_rejected(labeled):
    with pytest.raises(ParamsError, match=rf"labeled = {labeled}: expected a fraction in \(0, 1\]"):
        SplitConfig(labeled=labeled)


def test_labeled_is_named_with_its_section_in_params_files(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("split:\n  labeled: 1.5\n")
    with pytest.raises(ParamsError, match=r"params.yaml: split: labeled = 1.5"):
        load_params(path)


def test_count_larger_than_pool():
    names, offsets = tiles()
    with pytest.raises(ParamsError, match=r"split.labeled = 33: more than the 32 training tiles"):
        make_split(names, offsets, {"b/1"}, SplitConfig(labeled=33))
