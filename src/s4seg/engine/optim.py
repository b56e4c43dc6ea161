"""Optimiser with LR-role parameter groups, and the poly LR schedule.

Conventions (shared by every method):
- Groups come from `Method.trainable_groups()`: 'backbone' runs at lr, 'head' at lr * lr_multi.
  Weight decay applies to every parameter, BN and biases included (as in UniMatch, reference §4).
- Poly LR, set *before* optimiser step t (0-based, t = 0 .. T-1): lr_t = lr0 * (1 - t/T) ** power.
  Step 0 runs at lr0 and the last step at a small positive LR. The official code sets the LR after
  the step with the index of the step just done, which shifts the curve by one step; the difference
  is one iteration out of T.
"""

from __future__ import annotations

import torch
from torch import nn

from s4seg.config import TrainConfig
from s4seg.engine.method import AuxOptimizer
from s4seg.errors import ParamsError

LR_ROLES = ("backbone", "head")


def lr_multiplier(role: str, lr_multi: float) -> float:
    if role not in LR_ROLES:
        raise ValueError(f"unknown parameter group {role!r}; Method.trainable_groups() may return {LR_ROLES}")
    return lr_multi if role == "head" else 1.0


def build_optimizer(groups: dict[str, list[nn.Parameter]], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, no Nesterov) or AdamW over the non-empty groups; each group remembers its role."""
    param_groups = [
        {"params": params, "role": role, "lr_scale": lr_multiplier(role, cfg.lr_multi), "lr": lr}
        for role, params in groups.items()
        if params
    ]
    if not param_groups:
        raise ValueError("the method has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=cfg.weight_decay)
    raise ParamsError(f"params.yaml: optimizer {cfg.optimizer!r} is not supported; choose one of: adamw, sgd")


def build_aux_optimizer(aux: AuxOptimizer) -> torch.optim.Optimizer:
    """The torch optimiser of a method's auxiliary network (`Method.aux_optimizers`); its base LR is kept
    in each group's `lr_scale`, so `set_lr(opt, poly factor)` follows the main schedule."""
    groups = [{"params": list(aux.params), "lr_scale": aux.lr, "lr": aux.lr}]
    if aux.kind == "adam":
        return torch.optim.Adam(groups, lr=aux.lr, betas=aux.betas, weight_decay=aux.weight_decay)
    if aux.kind == "sgd":
        return torch.optim.SGD(groups, lr=aux.lr, momentum=aux.momentum, weight_decay=aux.weight_decay)
    raise ValueError(f"auxiliary optimiser kind {aux.kind!r} is not supported; choose one of: adam, sgd")


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """lr0 * (1 - step/T) ** power for step in [0, T)."""
    return base_lr * (1.0 - min(step, total_steps) / total_steps) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to lr times its role multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
