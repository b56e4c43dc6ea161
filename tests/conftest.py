"""Shared fixtures. Tests build their data in code; the real Dubai data is read from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Two cores: one intra-op thread per test process keeps parallel helpers and CI predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def dubai_root() -> Path:
    """../shared/datasets/dubai-aerial; skipped when absent unless S4SEG_REQUIRE_SHARED=1 (CI)."""
    root = Path(os.environ.get("S4SEG_SHARED", SHARED)) / "datasets" / "dubai-aerial"
    if not root.is_dir():
        if os.environ.get("S4SEG_REQUIRE_SHARED") == "1":
            pytest.fail(f"{root} is missing and S4SEG_REQUIRE_SHARED=1 makes the real-data tests mandatory")
        pytest.skip(f"{root} not present")
    return root
