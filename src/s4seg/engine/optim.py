"""Optimiser with LR-role parameter groups, and the poly LR schedule.

Conventions (shared by every method):
- Groups come from `Method.trainable_groups()`: 'backbone' runs at lr, 'head' at lr * lr_multi. When
  `train` starts from the warmup model, the head parameters that come trained from it (`warm_params`:
  the model's decoder and classifier) form a third group, 'warm_head', at lr * warm_head_lr_multi: the
  papers' x10 is for a head trained from scratch, and a warm head restarted at 10x the backbone's LR is
  knocked out of the minimum the warmup found (README, "Measured").
  Weight decay applies to every parameter, BN and biases included (as in UniMatch, reference §4).
- Poly LR, set *before* optimiser step t (0-based, t = 0 .. T-1): lr_t = lr0 * (1 - t/T) ** power.
  Step 0 runs at lr0 and the last step at a small positive LR. The official code sets the LR after
  the step with the index of the step just done, which shifts the curve by one step; the difference
  is one iteration out of T.
- Optional linear warm-up (`lr_warmup`, a share of T; 0 = off, the papers' setting): the poly LR times
  (t + 1) / W for the first W = round(lr_warmup * T) steps (Goyal et al. 2017). It matters when `train`
  starts from a trained model: a poly restart at full height first knocks the warm model out of its
  minimum (its labeled loss rises over the first steps). The CPS/RRN code ramps over 10 epochs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from s4seg.config import TrainConfig
from s4seg.engine import distributed
from s4seg.engine.method import AuxOptimizer, Method, StepOutput
from s4seg.errors import ParamsError

LR_ROLES = ("backbone", "head", "warm_head")


def lr_multiplier(role: str, lr_multi: float, warm_head_lr_multi: float | None = None) -> float:
    """The LR factor of a parameter group: 1 for the backbone, lr_multi for a head, warm_head_lr_multi (None:
    lr_multi) for the head parameters trained by the warmup."""
    if role not in LR_ROLES:
        raise ValueError(f"unknown parameter group {role!r}; Method.trainable_groups() may return {LR_ROLES}")
    if role == "warm_head" and warm_head_lr_multi is not None:
        return warm_head_lr_multi
    return 1.0 if role == "backbone" else lr_multi


def split_warm_head(groups: dict[str, list[nn.Parameter]], warm_params: Iterable[nn.Parameter]
                    ) -> dict[str, list[nn.Parameter]]:
    """`groups` with the 'head' parameters that are among `warm_params` moved to 'warm_head'."""
    warm = {id(p) for p in warm_params}
    if not warm:
        return groups
    head = groups.get("head", [])
    return {**{role: params for role, params in groups.items() if role != "head"},
            "head": [p for p in head if id(p) not in warm], "warm_head": [p for p in head if id(p) in warm]}


def build_optimizer(groups: dict[str, list[nn.Parameter]], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, no Nesterov) or AdamW over the non-empty groups; each group remembers its role."""
    warm_multi = getattr(cfg, "warm_head_lr_multi", None)  # a `train` section field (TrainStageConfig)
    param_groups = [
        {"params": params, "role": role, "lr_scale": lr_multiplier(role, cfg.lr_multi, warm_multi), "lr": lr}
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


def poly_lr(base_lr: float, step: int, total_steps: int, power: float, warmup_steps: int = 0) -> float:
    """lr0 * (1 - step/T) ** power for step in [0, T), times (step + 1) / W for step < W = warmup_steps."""
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return base_lr * ramp * (1.0 - min(step, total_steps) / total_steps) ** power


def warmup_steps(lr_warmup: float, total_steps: int) -> int:
    """Steps of the linear LR warm-up: `lr_warmup` (a share of the run) of `total_steps`."""
    return round(lr_warmup * total_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to lr times its role multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


class Optimizers:
    """The main optimiser over `Method.trainable_groups()` and the method's auxiliary optimisers
    (`Method.aux_optimizers()`), driven together: one place for the LR schedule, the backward of each loss
    into its own parameters, gradient averaging over ranks, the steps and the checkpointed state."""

    def __init__(self, method: Method, cfg: TrainConfig, base_lr: float,
                 warm_params: Iterable[nn.Parameter] = ()) -> None:
        groups = split_warm_head(method.trainable_groups(), warm_params)
        self.params = [p for ps in groups.values() for p in ps]
        self.main = build_optimizer(groups, cfg, base_lr)
        self.aux_specs = method.aux_optimizers()
        self.aux = {name: build_aux_optimizer(spec) for name, spec in self.aux_specs.items()}
        self.base_lr, self.power, self.lr_warmup = base_lr, cfg.poly_power, cfg.lr_warmup

    def describe(self) -> str:
        """The main optimiser's LR groups, e.g. "backbone lr x1 (60 tensors), warm_head lr x1 (18 tensors)"."""
        return ", ".join(f"{g['role']} lr x{g['lr_scale']:g} ({len(g['params'])} tensors)"
                         for g in self.main.param_groups)

    def start_step(self, step: int, total: int) -> float:
        """Set every LR for optimiser step `step` of `total` (poly, after the optional linear warm-up) and
        zero the gradients; returns the main LR. Auxiliary optimisers with `poly` follow the same curve."""
        ramp = warmup_steps(self.lr_warmup, total)
        lr = poly_lr(self.base_lr, step, total, self.power, ramp)
        set_lr(self.main, lr)
        self.main.zero_grad(set_to_none=True)
        for name, opt in self.aux.items():
            set_lr(opt, poly_lr(1.0, step, total, self.power, ramp) if self.aux_specs[name].poly else 1.0)
            opt.zero_grad(set_to_none=True)
        return lr

    def backward(self, out: StepOutput, scaler: torch.amp.GradScaler, divisor: int = 1) -> None:
        """Each loss into its own optimiser's parameters only: the segmentor's loss must not train a
        discriminator, nor the discriminator's loss the segmentor."""
        scaler.scale(out.loss / divisor).backward(inputs=self.params, retain_graph=bool(out.aux_losses))
        for name, aux_loss in out.aux_losses.items():
            scaler.scale(aux_loss / divisor).backward(inputs=self.aux_specs[name].params)

    def step(self, scaler: torch.amp.GradScaler, world_size: int = 1) -> None:
        distributed.average_gradients(self.params, world_size)
        scaler.step(self.main)
        for name, opt in self.aux.items():
            distributed.average_gradients(self.aux_specs[name].params, world_size)
            scaler.step(opt)
        scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "aux": {name: opt.state_dict() for name, opt in self.aux.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        for name, opt in self.aux.items():
            opt.load_state_dict(state["aux"][name])
