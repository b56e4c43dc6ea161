"""EMA teacher update: m = min(1 - 1/(t+1), gamma), parameters and float buffers blended."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s4seg.engine.ema import ema_momentum, ema_update


def _net(weight: float, running: float, tracked: int) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(weight)
        net[1].running_mean.fill_(running)
        net[1].num_batches_tracked.fill_(tracked)
    return net


def test_momentum_schedule():
    assert ema_momentum(0, 0.996) == 0.0
    assert ema_momentum(1, 0.996) == pytest.approx(0.5)
    assert ema_momentum(3, 0.996) == pytest.approx(0.75)
    assert ema_momentum(248, 0.996) == pytest.approx(1 - 1 / 249)
    assert ema_momentum(249, 0.996) == pytest.approx(0.996)
    assert ema_momentum(10_000, 0.996) == pytest.approx(0.996)


@pytest.mark.parametrize("step, expected_m", [(0, 0.0), (1, 0.5), (9, 0.9), (100, 0.99)])
def test_update_matches_formula(step, expected_m):
    teacher, student = _net(1.0, 4.0, 3), _net(3.0, 8.0, 7)
    m = ema_update(teacher, student, step, gamma=0.99)
    assert m == pytest.approx(expected_m)
    assert teacher[0].weight.detach() == pytest.approx(torch.full((1, 2), expected_m * 1.0 + (1 - expected_m) * 3.0))
    assert teacher[1].running_mean.item() == pytest.approx(expected_m * 4.0 + (1 - expected_m) * 8.0)
    assert teacher[1].num_batches_tracked.item() == 7  # integer buffers are copied
    assert student[0].weight.detach().eq(3.0).all()  # the student is untouched


def test_frozen_teacher_params_still_follow():
    teacher, student = _net(0.0, 0.0, 0), _net(2.0, 0.0, 0)
    teacher[0].weight.requires_grad_(False)
    ema_update(teacher, student, 1, gamma=0.996)
    assert teacher[0].weight.detach().eq(1.0).all()


def test_mismatched_structure():
    with pytest.raises(ValueError, match="different parameter or buffer names"):
        ema_update(nn.Linear(2, 1), nn.Sequential(nn.Linear(2, 1)), 0, 0.9)
