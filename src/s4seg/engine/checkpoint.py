"""Training checkpoints (resume) and the final model artifact (what later stages load).

Two files, two purposes:
- `checkpoint_dir/last.pt`: everything needed to continue a crashed run exactly: method state (model,
  EMA teacher, any extra nets), optimisers, AMP scaler, step, the RNG states of every rank, the log rows
  and snapshots so far, and a hash of the run's identity (configs, seed, split, world size, init weights,
  and the package's source code). A checkpoint whose hash differs from the current run's is stale and
  ignored, so a changed config or changed code never resumes an old run. A finished run deletes its
  checkpoint: its result is the model artifact (in DVC's cache), and `dvc repro -f` trains again. The
  data position needs no state of its own: the loader is a pure function of (seed, micro-batch index).
- the model artifact (`models/*.pt`, format "s4seg-model/1"): the trained method's state dict plus
  the configs needed to rebuild it with `load_method`, and the precision it was trained in (`precision`:
  fp32 | bf16 | fp16, as resolved by s4seg.runtime; absent in artifacts written before it was recorded).
Both are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s4seg.config import ModelConfig, from_dict, to_dict
from s4seg.errors import CheckpointError, S4segError
from s4seg.io import atomic_path

log = logging.getLogger(__name__)

MODEL_FORMAT = "s4seg-model/1"
CHECKPOINT_FORMAT = "s4seg-checkpoint/1"


def run_hash(identity: dict[str, Any]) -> str:
    """A stable hash of a JSON-able description of a run."""
    text = json.dumps(to_dict(identity), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_hash(package: Path | None = None) -> str:
    """Content hash of the s4seg package's Python sources (or of the package folder given): part of every
    run's identity, so a checkpoint written by other code (an edited method, loss or loop, even a comment)
    is never resumed."""
    return _sources_hash(package) if package is not None else _installed_code_hash()


@functools.cache
def _installed_code_hash() -> str:
    return _sources_hash(Path(__file__).resolve().parents[1])


def _sources_hash(package: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_torch_atomic(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Resume checkpoint
# --------------------------------------------------------------------------------------------------
def load_training_state(path: str | Path, expected_hash: str, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The checkpoint at `path` if it belongs to this run, else None (missing, unreadable or stale)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # an unreadable checkpoint of our own is discarded, not fatal
        log.warning("%s: unreadable checkpoint (%s); starting from scratch", path, e)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log.warning("%s: not an s4seg checkpoint; starting from scratch", path)
        return None
    if state.get("run_hash") != expected_hash:
        log.warning("%s: written by another run (other config, data, init weights or code: hash %s, now %s); "
                    "not resumed, starting from step 0",
                    path, state.get("run_hash"), expected_hash)
        return None
    return state


# --------------------------------------------------------------------------------------------------
# Model artifact
# --------------------------------------------------------------------------------------------------
def model_artifact(method: torch.nn.Module, *, model_cfg: ModelConfig, classes: list[str], palette: list[str],
                   step: int, train_cfg: Any, precision: str = "fp32") -> dict[str, Any]:
    """The model file's dict; `precision` is the one training ran in (resolved: fp32 | bf16 | fp16)."""
    return {
        "format": MODEL_FORMAT,
        "model_config": to_dict(model_cfg),
        "num_classes": int(method.num_classes),
        "classes": list(classes),
        "palette": list(palette),
        "method": method.name,
        "method_config": to_dict(method.cfg),
        "state_dict": {k: v.detach().cpu() for k, v in method.state_dict().items()},
        "step": int(step),
        "train_config": to_dict(train_cfg),
        "precision": precision,
    }


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The artifact dict of a model file, checked for format and keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found; run the stage that writes it (dvc repro)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the model file ({type(e).__name__}: {e}); "
                              "expected an s4seg model written by the warmup or train stage") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not an s4seg model file (format {found!r}, expected {MODEL_FORMAT!r})")
    missing = [k for k in ("model_config", "num_classes", "method", "method_config", "state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: model file lacks {missing}; re-run the stage that wrote it")
    return ckpt


def load_method(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Rebuild the trained method (and its model) from a model file, in eval mode on `device`."""
    return load_method_and_info(path, device)[0]


def load_method_and_info(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """`load_method`, and the model file's dict without its state dict (configs, step, precision)."""
    import s4seg.methods  # noqa: F401  (fills the method registry)
    from s4seg.engine.method import build_method
    from s4seg.models import build_model

    ckpt = read_model_file(path)
    try:
        model_cfg = from_dict(ModelConfig, ckpt["model_config"], where=f"{path}: model_config")
        # The state dict holds every weight: do not load pretrained files (which may be absent here).
        model = build_model(model_cfg, int(ckpt["num_classes"]), load_pretrained=False)
        method = build_method(ckpt["method"], ckpt["method_config"], model, int(ckpt["num_classes"]))
    except S4segError as e:
        raise CheckpointError(f"{path}: cannot rebuild the method: {e}") from e
    try:
        method.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: state dict does not match the rebuilt {ckpt['method']} model: {e}") from e
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return method.to(device).eval(), info
