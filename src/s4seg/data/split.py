"""`data/split.parquet`: one row per tile: id, scene, x, y, role (labeled / unlabeled / test), ratio, seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from s4seg.errors import DataError, DatasetNotFoundError

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
