"""Shared fixtures. Tests build their data in code; the real Dubai data is read from ../shared."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Two cores: one intra-op thread per test process keeps parallel helpers and CI predictable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _log_handlers_restored():
    """A CLI `main()` under test calls `logging.basicConfig`, and dvc's in-process CLI its own logger setup:
    both bind handlers to the stream of that moment (capsys's, closed when the test ends). Later tests that
    log (dvc does) must not write to it, so each test leaves the root and dvc loggers as it found them."""
    loggers = [logging.getLogger(), logging.getLogger("dvc")]
    saved = [(list(lg.handlers), lg.level) for lg in loggers]
    yield
    for lg, (handlers, level) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)


@pytest.fixture(scope="session")
def dubai_root() -> Path:
    """../shared/datasets/dubai-aerial; skipped when absent unless S4SEG_REQUIRE_SHARED=1 (CI)."""
    root = Path(os.environ.get("S4SEG_SHARED", SHARED)) / "datasets" / "dubai-aerial"
    if not root.is_dir():
        if os.environ.get("S4SEG_REQUIRE_SHARED") == "1":
            pytest.fail(f"{root} is missing and S4SEG_REQUIRE_SHARED=1 makes the real-data tests mandatory")
        pytest.skip(f"{root} not present")
    return root
