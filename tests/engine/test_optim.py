"""Poly LR, parameter groups with the head LR multiplier, optimiser choice, linear LR scaling."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from s4seg.config import TrainConfig, TrainStageConfig
from s4seg.engine.loop import effective_lr, total_steps
from s4seg.engine.optim import Optimizers, build_optimizer, lr_multiplier, poly_lr, set_lr, warmup_steps
from s4seg.errors import ParamsError

sys.path.insert(0, str(Path(__file__).parent))
import engine_helpers as h  # noqa: E402


def test_poly_lr_values():
    assert poly_lr(0.01, 0, 100, 0.9) == pytest.approx(0.01)
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 99, 100, 0.9) == pytest.approx(0.01 * 0.01**0.9)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0
    assert poly_lr(1.0, 3, 4, 1.0) == pytest.approx(0.25)


def test_param_groups_get_role_lr():
    method = h.build("supervised")
    cfg = TrainConfig(lr=0.01, lr_multi=10.0, momentum=0.8, weight_decay=1e-3)
    opt = build_optimizer(method.trainable_groups(), cfg, cfg.lr)
    assert isinstance(opt, torch.optim.SGD)
    roles = {g["role"]: g for g in opt.param_groups}
    assert {id(p) for p in roles["backbone"]["params"]} == {id(p) for p in method.model.encoder.parameters()}
    assert {id(p) for p in roles["head"]["params"]} == {id(p) for p in method.model.head.parameters()}
    set_lr(opt, 0.002)
    assert roles["backbone"]["lr"] == pytest.approx(0.002)
    assert roles["head"]["lr"] == pytest.approx(0.02)
    assert roles["head"]["momentum"] == 0.8 and roles["head"]["weight_decay"] == 1e-3


@pytest.mark.parametrize("warm_multi, expected", [(1.0, 0.002), (0.0, 0.0), (None, 0.02)])
def test_warm_head_gets_its_own_lr(warm_multi, expected):
    """From the warmup, the model's trained head runs at lr x warm_head_lr_multi (None: lr_multi); the
    backbone at lr, and a head the method adds (here an extra module) at lr x lr_multi."""
    method = h.build("supervised")
    method.extra_head = torch.nn.Conv2d(8, 3, 1)  # a fresh module of the method, as CorrMatch's head
    cfg = TrainStageConfig(lr=0.01, lr_multi=10.0, warm_head_lr_multi=warm_multi)
    opt = Optimizers(method, cfg, cfg.lr, method.warm_head_params()).main
    roles = {g["role"]: g for g in opt.param_groups}
    assert {id(p) for p in roles["warm_head"]["params"]} == {id(p) for p in method.model.head.parameters()}
    assert {id(p) for p in roles["head"]["params"]} == {id(p) for p in method.extra_head.parameters()}
    set_lr(opt, 0.002)
    assert roles["backbone"]["lr"] == pytest.approx(0.002)
    assert roles["head"]["lr"] == pytest.approx(0.02)
    assert roles["warm_head"]["lr"] == pytest.approx(expected)
    cold = {g["role"] for g in Optimizers(method, cfg, cfg.lr).main.param_groups}  # not a warm start
    assert cold == {"backbone", "head"}
    with pytest.raises(ParamsError, match="warm_head_lr_multi"):
        TrainStageConfig(warm_head_lr_multi=-1.0)


def test_rrn_with_both_heads_redrawn_has_no_warm_head():
    twin, both = h.build("rrn"), h.build("rrn")
    both.cfg = dataclasses.replace(both.cfg, reinit_heads="both")
    assert {id(p) for p in twin.warm_head_params()} == {id(p) for p in twin.model.head.parameters()}
    assert both.warm_head_params() == []


def test_teacher_params_are_not_optimised():
    method = h.build("toy")
    groups = method.trainable_groups()
    in_groups = {id(p) for ps in groups.values() for p in ps}
    assert not in_groups & {id(p) for p in method.teacher().parameters()}
    assert in_groups == {id(p) for p in method.model.parameters()}


def test_adamw_and_unknown_optimizer():
    method = h.build("supervised")
    opt = build_optimizer(method.trainable_groups(), TrainConfig(optimizer="adamw"), 1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ParamsError, match="optimizer 'adam' is not supported"):
        build_optimizer(method.trainable_groups(), TrainConfig(optimizer="adam"), 1e-4)
    with pytest.raises(ValueError, match="unknown parameter group 'decoder'"):
        lr_multiplier("decoder", 10.0)


def test_linear_lr_scaling_rule():
    assert effective_lr(TrainConfig(lr=0.001, batch_size=8), world_size=1) == 0.001
    cfg = TrainConfig(lr=0.001, batch_size=2, accumulate=2, lr_reference_batch=8)
    assert effective_lr(cfg, world_size=1) == pytest.approx(0.0005)
    assert effective_lr(cfg, world_size=2) == pytest.approx(0.001)


def test_total_steps():
    assert total_steps(TrainConfig(epochs=2.0), batches_per_epoch=5) == 10
    assert total_steps(TrainConfig(epochs=2.0, accumulate=2), batches_per_epoch=5) == 5
    assert total_steps(TrainConfig(epochs=0.01), batches_per_epoch=5) == 1
    assert total_steps(TrainConfig(epochs=2.0, iterations=7), batches_per_epoch=5) == 7


def test_linear_warmup_ramps_the_poly_lr_then_leaves_it() -> None:
    # W = 4 of T = 10: steps 0..3 run at (t+1)/4 of the poly value, step 4 on at the poly value itself
    for step in range(10):
        ramp = min(1.0, (step + 1) / 4)
        assert poly_lr(0.01, step, 10, 0.9, 4) == pytest.approx(0.01 * ramp * (1 - step / 10) ** 0.9)
    assert poly_lr(0.01, 3, 10, 0.9, 4) == pytest.approx(poly_lr(0.01, 3, 10, 0.9))
    assert poly_lr(0.01, 0, 10, 0.9, 4) == pytest.approx(0.0025)
    assert warmup_steps(0.1, 168) == 17 and warmup_steps(0.0, 168) == 0
