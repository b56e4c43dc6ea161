"""`data/split.parquet`: one row per tile: id, scene, x, y, role (labeled / unlabeled / test), ratio, seed.

The split is made at scene level: every tile of a scene matched by `split.test_scenes` (fnmatch
patterns; null = the source's documented default) is a test tile, so test pixels never share a scene
with training pixels. Of the training tiles, `split.labeled` (a fraction in (0, 1], rounded to the
nearest count and at least 1, or a whole number of tiles > 1) are sampled as labeled with
`numpy.random.default_rng(split.seed)`; the rest are unlabeled. Tiles whose mask is all ignore, and
all tiles of images that came without masks, are never labeled (and never test). `ratio` is the
labeled fraction (split.labeled, or count / pool size) and `seed` is split.seed, on every row, so
result tables can be grouped by them. The same inputs give a byte-identical file.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from s4seg.config import SplitConfig
from s4seg.errors import DataError, DatasetNotFoundError, ParamsError
from s4seg.io import atomic_path

ROLES = ("labeled", "unlabeled", "test")
COLUMNS = ("id", "scene", "x", "y", "role", "ratio", "seed")


@dataclass(frozen=True)
class Split:
    table: pd.DataFrame

    def ids(self, role: str) -> np.ndarray:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return self.table.loc[self.table["role"] == role, "id"].to_numpy(dtype=np.int64)

    @property
    def labeled(self) -> np.ndarray:
        return self.ids("labeled")

    @property
    def unlabeled(self) -> np.ndarray:
        return self.ids("unlabeled")

    @property
    def test(self) -> np.ndarray:
        return self.ids("test")

    def scenes(self, role: str) -> list[str]:
        """Scene names that hold tiles of `role`, in first-appearance order."""
        return list(dict.fromkeys(self.table.loc[self.table["role"] == role, "scene"]))


def load_split(path: str | Path) -> Split:
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: split table not found; run `dvc repro tile` first")
    table = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(COLUMNS)}")
    return Split(table)


def resolve_test_scenes(names: Sequence[str], patterns: Sequence[str], unlabeled: Collection[str] = (),
                        source_name: str = "dataset") -> set[str]:
    """Labeled scenes matched by any fnmatch pattern; every pattern must match one, a training scene must remain."""
    labeled = [n for n in names if n not in unlabeled]
    if not patterns:
        raise ParamsError(
            f"split.test_scenes: the {source_name!r} dataset has no default test scenes; list fnmatch patterns "
            f"on scene names, e.g. [{labeled[-1]!r}] (scenes: {_preview(labeled)})"
        )
    test: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(labeled, pattern)
        if not hits:
            raise ParamsError(
                f"split.test_scenes: pattern {pattern!r} matches no labeled scene; scenes are: {_preview(labeled)}"
            )
        test.update(hits)
    if len(test) == len(labeled):
        raise ParamsError(
            f"split.test_scenes {list(patterns)} match all {len(labeled)} labeled scenes; leave some for training"
        )
    return test


def make_split(scene_of_tile: Sequence[str], offsets: np.ndarray, test_scenes: Collection[str],
               cfg: SplitConfig, unlabeled_scenes: Collection[str] = (),
               has_labels: np.ndarray | None = None) -> pd.DataFrame:
    """The split table for tiles 0..N-1 (tile i of scene `scene_of_tile[i]` at `offsets[i]` = (y, x))."""
    scenes = np.asarray(scene_of_tile, dtype=object)
    n = len(scenes)
    offsets = np.asarray(offsets).reshape(n, 2)
    is_test = np.isin(scenes, list(test_scenes))
    no_masks = np.isin(scenes, list(unlabeled_scenes))
    has_labels = np.ones(n, dtype=bool) if has_labels is None else np.asarray(has_labels, dtype=bool)
    is_test &= ~no_masks
    pool = np.flatnonzero(~is_test & ~no_masks & has_labels)
    if len(pool) == 0:
        raise ParamsError("split: no training tile with labels is left after taking out the test scenes")
    if cfg.labeled <= 1:
        count = max(1, int(np.floor(cfg.labeled * len(pool) + 0.5)))
        ratio = float(cfg.labeled)
    else:
        count = int(cfg.labeled)
        if count > len(pool):
            raise ParamsError(
                f"split.labeled = {count}: more than the {len(pool)} training tiles with labels; "
                f"give at most {len(pool)} or a fraction in (0, 1]"
            )
        ratio = count / len(pool)
    rng = np.random.default_rng(cfg.seed)
    labeled = np.sort(rng.choice(pool, size=count, replace=False))
    role = np.where(is_test, "test", "unlabeled").astype(object)
    role[labeled] = "labeled"
    return pd.DataFrame({
        "id": np.arange(n, dtype=np.int64),
        "scene": pd.Series(scenes, dtype=object),
        "x": offsets[:, 1].astype(np.int32),
        "y": offsets[:, 0].astype(np.int32),
        "role": pd.Series(role, dtype=object),
        "ratio": np.full(n, ratio, dtype=np.float64),
        "seed": np.full(n, cfg.seed, dtype=np.int64),
    })


def save_split(table: pd.DataFrame, path: str | Path) -> None:
    """Write the table atomically; same table, same bytes."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False, engine="pyarrow", compression="zstd")


def _preview(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
