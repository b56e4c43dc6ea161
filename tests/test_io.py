"""Atomic writes: all or nothing, and the previous artifact survives a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from s4seg.io import atomic_dir, atomic_path, write_text_atomic


def test_atomic_dir_replaces_previous_on_success(tmp_path: Path) -> None:
    out = tmp_path / "store.zarr"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["store.zarr"]  # no temporaries left


def test_atomic_dir_keeps_previous_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "store.zarr"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["store.zarr"]


def test_atomic_file(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "m.json"
    write_text_atomic(out, "{}")
    with pytest.raises(ValueError), atomic_path(out) as tmp:
        tmp.write_text("partial")
        raise ValueError
    assert out.read_text() == "{}"
    assert not list(out.parent.glob(".*tmp*"))
