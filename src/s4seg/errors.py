"""Typed errors. Every message says where, what was found, what was expected and what to do."""

from __future__ import annotations


class S4segError(Exception):
    """Base of every error s4seg raises on bad input; the CLI prints it as one line and exits 2."""


class ParamsError(S4segError, ValueError):
    """A params.yaml key is unknown, missing, of the wrong type or out of range."""


class DatasetNotFoundError(S4segError, FileNotFoundError):
    """A dataset root or file does not exist."""


class DataError(S4segError, ValueError):
    """A data file exists but its content is not what was expected (size, colour, format)."""


class CheckpointError(S4segError, ValueError):
    """A checkpoint or weights file is missing keys, has wrong shapes or was built by another config."""


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """`model.weights` (or a model file given to a stage) names a file that does not exist."""
