"""Named wall-clock sections inside a training step, for `s4seg bench train`: what share of a step a
method spends in, e.g., RegionMatch's connected components. Off (a no-op) unless a benchmark calls
`start_recording()`; the pipeline never does. On CUDA a section only measures the host side unless its
code synchronises (connected components copy to the CPU, so theirs is exact)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

_totals: dict[str, float] | None = None


@contextmanager
def section(name: str) -> Iterator[None]:
    """Add the wall time of the block to `name`'s total while recording."""
    if _totals is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        _totals[name] = _totals.get(name, 0.0) + time.perf_counter() - start


def start_recording() -> None:
    """Reset the totals and record from now on."""
    global _totals
    _totals = {}


def recorded() -> dict[str, float]:
    """Seconds per section since `start_recording()` ({} when not recording)."""
    return dict(_totals or {})


def stop_recording() -> dict[str, float]:
    """Stop recording; returns the totals so far."""
    global _totals
    totals, _totals = recorded(), None
    return totals
