"""`dumps/snapshots.zarr`: pseudo-labels of a fixed few unlabeled tiles, every N training iterations.

The train stage (engine) creates a `SnapshotWriter` with the tile store and a fixed subset of unlabeled
tile ids (`snapshot_tile_ids`), calls `add(step, pseudo)` with the method's `PseudoLabels` of those tiles
(`writer.images()` gives them as a float array in [0, 1], (n, C, T, T), ready for `torch.from_numpy`),
and `close()` at the end. Layout (zarr v3, readable with plain zarr), S snapshots of n tiles:

    steps     (S,)            int64    training iteration of each snapshot
    pseudo    (S, n, T, T)    uint8    hard pseudo-label
    conf      (S, n, T, T)    float16  confidence
    keep      (S, n, T, T)    bool     selected pixels
    gt        (n, T, T)       uint8    hidden ground truth (255 = ignore)
    tile_ids  (n,)            int64    tile ids in data/tiles.zarr
    attrs: format, classes, palette, tile_size, num_snapshots, tiles (path)

One chunk per (snapshot, tile). The store is built in a temporary sibling and renamed onto its path by
`close()`; closing with zero snapshots still writes a valid store (S = 0), so DVC always finds the output.
Leaving a `with SnapshotWriter(...)` block by an exception, or calling `abort()`, removes the temporary.

`snapshot_quality(path)` gives coverage and accuracy per snapshot for the report. This module imports no
torch (tensors are recognised by their `detach` method), so the report can use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from s4seg.data.store import TileStore
from s4seg.errors import DataError, DatasetNotFoundError
from s4seg.evaluation.pseudo_quality import PseudoQuality
from s4seg.io import atomic_dir

SNAPSHOT_FORMAT = "s4seg.snapshots/1"
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def snapshot_tile_ids(unlabeled: Sequence[int], count: int) -> np.ndarray:
    """A fixed, evenly spaced subset of `count` unlabeled tile ids (all of them if there are fewer)."""
    unlabeled = np.asarray(unlabeled, dtype=np.int64)
    if count <= 0 or len(unlabeled) == 0:
        return unlabeled[:0]
    if count >= len(unlabeled):
        return unlabeled.copy()
    return unlabeled[np.linspace(0, len(unlabeled) - 1, count).round().astype(np.int64)]


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class SnapshotWriter:
    """Collects pseudo-label snapshots of fixed tiles; `close()` publishes them atomically at `path`."""

    def __init__(self, path: str | Path, store: TileStore, tile_ids: Sequence[int]) -> None:
        self.path = Path(path)
        self.store = store
        self.tile_ids = np.asarray(tile_ids, dtype=np.int64)
        n, t = len(self.tile_ids), store.tile_size
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_dir(self.path))
        self.group = zarr.open_group(str(tmp), mode="w")

        def array(name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, dims: tuple[str, ...],
                  **kw: Any) -> zarr.Array:
            return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=_COMPRESSOR,
                                           dimension_names=dims, **kw)

        self.steps = array("steps", (0,), (1024,), "int64", ("snapshot",))
        dims = ("snapshot", "tile", "y", "x")
        self.pseudo = array("pseudo", (0, n, t, t), (1, 1, t, t), "uint8", dims)
        self.conf = array("conf", (0, n, t, t), (1, 1, t, t), "float16", dims)
        self.keep = array("keep", (0, n, t, t), (1, 1, t, t), "bool", dims)
        gt = array("gt", (n, t, t), (1, t, t), "uint8", ("tile", "y", "x"), fill_value=255)
        array("tile_ids", (n,), (max(n, 1),), "int64", ("tile",))[:] = self.tile_ids
        if n:
            gt[:] = np.stack([store.mask(i) for i in self.tile_ids])
        self.num_snapshots = 0
        self._closed = False

    def images(self) -> np.ndarray:
        """The snapshot tiles' images as float32 (n, C, T, T) in [0, 1]: the input of `pseudo_labels`."""
        if not len(self.tile_ids):
            t = self.store.tile_size
            return np.zeros((0, 3, t, t), np.float32)
        stack = np.stack([self.store.image(i) for i in self.tile_ids])  # (n, T, T, C)
        return np.ascontiguousarray(stack.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0

    def add(self, step: int, pseudo: Any) -> None:
        """Append one snapshot: `pseudo` is a `PseudoLabels` (tensors or arrays) of the snapshot tiles."""
        if self._closed:
            raise RuntimeError(f"{self.path}: SnapshotWriter.add after close")
        label, conf, keep = (_numpy(getattr(pseudo, f)) for f in ("label", "conf", "keep"))
        expected = (len(self.tile_ids), self.store.tile_size, self.store.tile_size)
        for name, arr in (("label", label), ("conf", conf), ("keep", keep)):
            if arr.shape != expected:
                raise ValueError(f"snapshot at step {step}: {name} has shape {arr.shape}, expected {expected}")
        self.steps.append(np.array([step], np.int64))
        self.pseudo.append(label.astype(np.uint8)[None])
        self.conf.append(conf.astype(np.float16)[None])
        self.keep.append(keep.astype(bool)[None])
        self.num_snapshots += 1

    def close(self) -> None:
        """Write the attributes and rename the store onto `path` (idempotent)."""
        if self._closed:
            return
        self.group.attrs.update({
            "format": SNAPSHOT_FORMAT,
            "classes": self.store.classes,
            "palette": self.store.palette,
            "tile_size": self.store.tile_size,
            "num_snapshots": self.num_snapshots,
            "tiles": str(self.store.path),
        })
        self._closed = True
        self._stack.close()

    def abort(self) -> None:
        """Drop the temporary store; whatever was at `path` before stays."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(_Aborted):
            self._stack.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Aborted(Exception):
    """Raised into the atomic_dir context to make it discard the temporary store."""


def open_snapshots(path: str | Path) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: snapshot store not found; run `dvc repro train` first")
    try:
        group = zarr.open_group(str(path), mode="r")
        for name in ("steps", "pseudo", "conf", "keep", "gt", "tile_ids"):
            group[name]  # noqa: B018 - presence check
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not an s4seg snapshot store ({e}); rebuild it with `dvc repro train`") from e
    return group


SNAPSHOT_METRICS = ("accuracy", "accuracy_all", "coverage", "mining_ratio", "effective_ratio", "class_bias")


def snapshot_quality(path: str | Path) -> pd.DataFrame:
    """One row per snapshot: step and the overall pixel metrics of `s4seg.evaluation.pseudo_quality`.

    Columns: step, accuracy, accuracy_all, coverage, mining_ratio, effective_ratio, class_bias (no region
    metrics).
    """
    group = open_snapshots(path)
    steps = np.asarray(group["steps"][:])
    gt = np.asarray(group["gt"][:])
    k = len(group.attrs.get("classes", [])) or int(gt[gt != 255].max(initial=0)) + 1
    rows = []
    for s, step in enumerate(steps):
        q = PseudoQuality(k)
        q.update(np.asarray(group["pseudo"][s]), np.asarray(group["keep"][s]), gt)
        m = q.metrics()
        rows.append({"step": int(step), **{name: m[name] for name in SNAPSHOT_METRICS}})
    return pd.DataFrame(rows, columns=["step", *SNAPSHOT_METRICS])
