"""The EMA-teacher update shared by every method that declares a teacher (`Method.teacher()`).

After optimiser step t (0-based) the engine calls `ema_update(teacher, student, t, gamma)` with
m = min(1 - 1/(t+1), gamma): m = 0 at t = 0 (the teacher becomes a copy of the student), 0.5 at
t = 1, and gamma from t >= 1/(1-gamma) - 1 on (reference/unimatch_v2.md §1 item 9).

Every parameter, frozen ones included, becomes m * teacher + (1 - m) * student. Floating-point
buffers (BN running mean/var) are blended the same way, as in the official UniMatch V2 code;
integer buffers (BN's num_batches_tracked) cannot be averaged and are copied from the student.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_momentum(step: int, gamma: float) -> float:
    return min(1.0 - 1.0 / (step + 1), gamma)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, gamma: float) -> float:
    """Blend `student` into `teacher` in place; returns the momentum used."""
    m = ema_momentum(step, gamma)
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    t_buffers, s_buffers = dict(teacher.named_buffers()), dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_buffers.keys() != s_buffers.keys():
        raise ValueError("EMA teacher and student have different parameter or buffer names")
    for name, t in t_params.items():
        t.mul_(m).add_(s_params[name].detach(), alpha=1.0 - m)
    for name, t in t_buffers.items():
        s = s_buffers[name]
        if t.is_floating_point():
            t.mul_(m).add_(s, alpha=1.0 - m)
        else:
            t.copy_(s)
    return m
