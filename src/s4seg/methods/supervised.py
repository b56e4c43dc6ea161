"""Supervised baseline: cross-entropy on labeled tiles only (reference/unimatch_v1_fixmatch.md §1.4, §1.5).

Used twice: by the `warmup` stage (epochs over the labeled tiles) and as `method: supervised` in
`train`, where it follows exactly the semi-supervised schedule (same iterations, LR and labeled
augmentation; the unlabeled stream is simply not loaded): the fair baseline every gain is measured
against. The official supervised script instead runs epochs over the labeled set only, so it sees
far fewer iterations than the semi-supervised runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from s4seg.config import IGNORE_INDEX
from s4seg.engine.method import Batch, Method, MethodConfig, StepOutput, register_method


@dataclass(frozen=True)
class SupervisedConfig(MethodConfig):
    """No hyper-parameters: the schedule lives in the `warmup` / `train` sections."""


def supervised_loss(logits: Tensor, y: Tensor) -> Tensor:
    """L_x: pixel-wise CE against the labels, mean over pixels with y != 255 (void and padding).

    A batch with no valid pixel gives 0 (with a gradient path), not NaN.
    """
    ce = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum")  # fp32 under autocast
    return ce / (y != IGNORE_INDEX).sum().clamp_min(1)


@register_method("supervised")
class Supervised(Method):
    config_class = SupervisedConfig
    uses_unlabeled = False

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        loss_x = supervised_loss(self.model(batch.x), batch.y)
        return StepOutput(loss=loss_x, logs={"loss_x": loss_x.detach()})
