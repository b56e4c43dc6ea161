"""Supervised baseline: L_x against a brute-force masked mean CE; gradients reach the model."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import K, TinySegmenter, make_batch  # tests/methods/tiny.py

from s4seg.config import IGNORE_INDEX
from s4seg.engine.method import build_method, method_config
from s4seg.errors import ParamsError
from s4seg.methods import registered_methods
from s4seg.methods.supervised import Supervised, supervised_loss


def test_loss_equals_brute_force_masked_mean():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 3.0]]]])  # (1, 3, 1, 2)
    y = torch.tensor([[[0, IGNORE_INDEX]]])
    # pixel 0: softmax over (2, 0, 1) at class 0; pixel 1 ignored
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(1)))
    assert supervised_loss(logits, y).item() == pytest.approx(expected)

    torch.manual_seed(0)
    logits, y = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    y[0, :2] = IGNORE_INDEX
    terms = [-torch.log_softmax(logits[b, :, i, j], 0)[y[b, i, j]] for b in range(2) for i in range(4)
             for j in range(5) if y[b, i, j] != IGNORE_INDEX]
    assert supervised_loss(logits, y).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = supervised_loss(logits, torch.full((1, 2, 2), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_training_step_reaches_every_model_param():
    torch.manual_seed(0)
    method = build_method("supervised", {}, TinySegmenter(), K)
    assert isinstance(method, Supervised) and not method.uses_unlabeled and "supervised" in registered_methods()
    out = method.training_step(make_batch(unlabeled=False), step=0)
    assert torch.isfinite(out.loss) and out.logs["loss_x"] == out.loss.detach()
    assert out.pseudo is None
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.model.parameters())


def test_config_has_no_keys():
    with pytest.raises(ParamsError, match="methods.supervised: unknown key"):
        method_config("supervised", {"conf_thresh": 0.9})
