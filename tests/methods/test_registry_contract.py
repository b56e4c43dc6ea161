"""One contract over the whole method registry.

Every registered method builds from its shipped `params.yaml` section, runs one CPU `training_step` on a
tiny model and tiny tensors, returns a finite scalar loss and finite scalar logs, sends gradients to exactly
the parameters it declares trainable (an EMA teacher gets none; each auxiliary loss, e.g. a discriminator's,
to exactly its own auxiliary optimiser's parameters), stays in train mode, round-trips its
state dict, and its `pseudo_labels` / `predict` have the documented shapes and dtypes.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import K, TinySegmenter, make_batch  # tests/methods/tiny.py
from torch import Tensor

import s4seg.methods
from s4seg.config import load_params
from s4seg.engine.method import Method, build_method, registered_methods

# Import every module of the package, so the contract covers every method that exists, whether or not
# `s4seg/methods/__init__.py` lists it yet.
for _module in pkgutil.iter_modules(s4seg.methods.__path__):
    importlib.import_module(f"{s4seg.methods.__name__}.{_module.name}")

PARAMS = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
METHODS = registered_methods()
B = 2
SIZE = 16


def build(name: str) -> Method:
    torch.manual_seed(0)
    return build_method(name, PARAMS.methods.get(name), TinySegmenter(), K)


def check_pseudo_labels(pseudo: Any, valid: Tensor) -> None:
    shape = (B, SIZE, SIZE)
    assert pseudo.label.shape == shape and pseudo.label.dtype == torch.int64
    assert ((pseudo.label >= 0) & (pseudo.label < K)).all()
    assert pseudo.conf.shape == shape and pseudo.conf.is_floating_point()
    assert ((pseudo.conf >= 0) & (pseudo.conf <= 1)).all()
    assert pseudo.keep.shape == shape and pseudo.keep.dtype == torch.bool
    assert not (pseudo.keep & ~valid).any(), "padding must never be kept"
    if pseudo.regions is not None:
        assert pseudo.regions.shape == shape and pseudo.regions.dtype == torch.int32
    for key, layer in pseudo.extra.items():
        assert isinstance(key, str) and isinstance(layer, Tensor) and layer.shape[0] == B


def test_the_registry_holds_the_issue_4_methods() -> None:
    assert {"fixmatch", "unimatch", "unimatch_v2"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_method_has_a_shipped_params_section(name: str) -> None:
    assert name in PARAMS.methods, f"params.yaml has no methods.{name} section"


@pytest.mark.parametrize("name", METHODS)
def test_one_cpu_training_step(name: str) -> None:
    method = build(name)
    method.train()
    batch = make_batch(B, SIZE, unlabeled=method.uses_unlabeled)
    out = method.training_step(batch, 0)

    assert out.loss.dim() == 0 and out.loss.requires_grad and torch.isfinite(out.loss)
    for key, value in out.logs.items():
        assert isinstance(key, str)
        value = float(value)  # a float or a 0-d tensor
        assert math.isfinite(value), f"log {key} = {value}"
    assert method.training and all(m.training for m in method.model.modules()), "left the student in eval mode"

    out.loss.backward(retain_graph=bool(out.aux_losses))
    trainable = [p for group in method.trainable_groups().values() for p in group]
    trainable_ids = {id(p) for p in trainable}
    assert len(trainable_ids) == len(trainable), "a parameter is in two groups"
    aux_specs = method.aux_optimizers()
    aux_ids = {name: {id(p) for p in spec.params} for name, spec in aux_specs.items()}
    assert not set().union(*aux_ids.values()) & trainable_ids, "an auxiliary net's parameter is also trainable"
    with_grad = {id(p) for p in method.parameters() if p.grad is not None}
    requires_grad = {id(p) for p in method.parameters() if p.requires_grad}
    assert with_grad == trainable_ids, "gradients must reach exactly the trainable parameters"
    assert requires_grad == trainable_ids.union(*aux_ids.values())
    # each auxiliary loss (a discriminator's) reaches exactly its own optimiser's parameters
    assert set(out.aux_losses) == set(aux_specs)
    for name, aux_loss in out.aux_losses.items():
        assert aux_loss.dim() == 0 and torch.isfinite(aux_loss)
        method.zero_grad(set_to_none=True)
        aux_loss.backward(retain_graph=True)
        assert {id(p) for p in method.parameters() if p.grad is not None} == aux_ids[name], name
    teacher = method.teacher()
    if teacher is not None:
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert 0.0 < method.ema_momentum() < 1.0

    if out.pseudo is not None:
        check_pseudo_labels(out.pseudo, batch.valid_u)


@pytest.mark.parametrize("name", METHODS)
def test_pseudo_labels_and_predict_shapes(name: str) -> None:
    method = build(name)
    batch = make_batch(B, SIZE, unlabeled=True)
    check_pseudo_labels(method.pseudo_labels(batch.u_w, batch.valid_u), batch.valid_u)
    method.eval()
    logits = method.predict(batch.u_w)
    assert logits.shape == (B, K, SIZE, SIZE) and logits.is_floating_point() and not logits.requires_grad


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trips(name: str) -> None:
    method = build(name)
    method.training_step(make_batch(B, SIZE, unlabeled=method.uses_unlabeled), 0)  # BN running statistics move
    fresh = build(name)
    fresh.load_state_dict(method.state_dict())
    for (key, a), b in zip(method.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
