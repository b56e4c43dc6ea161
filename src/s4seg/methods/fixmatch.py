"""FixMatch for segmentation, as reproduced in UniMatch: weak-view pseudo-label, threshold, strong view + CutMix.

Paper: FixMatch (Sohn et al., arXiv 2001.07685) as restated in UniMatch V2 (arXiv 2410.10777) §3.1,
Eq. (1)-(5). Facts: `reference/unimatch_v1_fixmatch.md` §1.3, §1.5; `reference/unimatch_v2.md` §1 (its
FixMatch baseline adds an EMA teacher and in-batch CutMix).

One iteration: pseudo-label the weak view u_w (argmax, confidence >= tau), paste the CutMix partner's strong
view into u_s1 inside box1 and its pseudo-labels into the targets the same way, then
    L = L_x + L_s
with L_s the masked CE of Eq. (4) normalised by the valid-pixel count (`losses.unlabeled_ce`).

Where paper and code differ, this file follows the paper and a param switches to the code, except:
- Total (`halve_loss`): Eq. (5) writes L = L_x + lambda L_u with lambda = 1 (default); both official codes
  divide by 2 (true). With SGD the factor is half the LR, and it matters at a short warm-started budget: the
  halved loss gives the labeled term half the weight it has in `supervised` (measured on the synthetic
  default, README "Measured").
- Pseudo-labels (`weak_labels_from_train_forward`): Eq. (3) just says p^w = f(x^w); here they come from
  the inference stream, `pseudo_labels()` (eval-mode BN, no grad), which is also what the dump writes. The
  V1 code takes them from the detached weak logits of a train-mode forward shared with the labeled batch
  (BN batch statistics over labeled + weak); `true` does that (the partner is still labelled in eval mode,
  as in the code, and the dump then differs from training by the BN mode).
- EMA teacher (`ema_teacher`): off, as in UniMatch's FixMatch. On, as in UniMatch V2's FixMatch baseline:
  the teacher pseudo-labels; the engine updates it with min(1 - 1/(t+1), ema_gamma), Eq. (18).
- Evaluation (`eval_teacher`): with a teacher, `predict` uses it (UniMatch V2 reports the EMA teacher,
  reference V2 §5); false evaluates the student.
- CutMix partner (`cutmix_partner`): "batch" = the engine's second unlabeled batch (V1 code); "flip" =
  the reversed batch (V2 code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from s4seg.engine.method import Batch, Method, MethodConfig, PseudoLabels, StepOutput, register_method
from s4seg.errors import ParamsError
from s4seg.methods.losses import (
    Targets,
    check_common,
    check_momentum,
    cutmix_partner,
    eval_mode,
    frozen_copy,
    label_partner,
    labeled_ce,
    mask_ratio,
    paste,
    select_confident,
    unlabeled_ce,
    valid_or_all,
    view_streams,
)


@dataclass(frozen=True)
class FixMatchConfig(MethodConfig):
    conf_thresh: float = 0.95  # tau, Eq. (4); 0.95 in UniMatch (Pascal, COCO) and UniMatch V2 (all datasets)
    ema_teacher: bool = False  # UniMatch's FixMatch has none (reference V1 §4); V2's baseline does
    ema_gamma: float = 0.996  # cap of the EMA momentum, Eq. (18) (used only with ema_teacher)
    eval_teacher: bool = True  # with ema_teacher, evaluate the teacher (reference V2 §5)
    cutmix_partner: str = "batch"  # batch (V1 code: second unlabeled loader) | flip (V2 code: reversed batch)
    weak_labels_from_train_forward: bool = False  # true: V1 code's train-mode joint labeled+weak forward
    halve_loss: bool = False  # Eq. (5): L = L_x + L_u (paper); true: the codes' (L_x + L_u) / 2

    def __post_init__(self) -> None:
        check_common(self.conf_thresh, self.cutmix_partner)
        check_momentum(self.ema_gamma)
        if self.ema_teacher and self.weak_labels_from_train_forward:
            raise ParamsError(
                "ema_teacher and weak_labels_from_train_forward are exclusive: with a teacher the pseudo-labels "
                "come from the teacher; set one of them to false"
            )


@register_method("fixmatch")
class FixMatch(Method):
    config_class = FixMatchConfig

    def __init__(self, cfg: FixMatchConfig, model: nn.Module, num_classes: int) -> None:
        super().__init__(cfg, model, num_classes)
        self.ema_model = frozen_copy(model) if cfg.ema_teacher else None

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        tau = self.cfg.conf_thresh
        valid_w = valid_or_all(batch.valid_u, batch.u_w)
        # Eval-mode labelling first, before a train-mode pass updates the BN running statistics
        partner_targets = label_partner(batch, self.cfg.cutmix_partner, self.pseudo_labels)
        if self.cfg.weak_labels_from_train_forward:
            logits_x, logits_w = self.model(torch.cat([batch.x, batch.u_w])).split([len(batch.x), len(batch.u_w)])
            pseudo = select_confident(logits_w, tau, valid_w)  # detached inside
        else:
            pseudo = self.pseudo_labels(batch.u_w, valid_w)
            logits_x = self.model(batch.x)
        weak = Targets.of(pseudo, valid_w)

        # Strong view: CutMix the image and, with the same box, the targets
        partner = cutmix_partner(batch, weak, partner_targets)
        u_s = paste(batch.u_s1, partner.u_s1, batch.box1)
        target_s = weak.cutmix(partner.targets, batch.box1)
        logits_s = self.model(u_s)

        loss_x = labeled_ce(logits_x, batch.y)  # Eq. (1)
        loss_u_s = unlabeled_ce(logits_s, target_s.label, target_s.keep, target_s.valid)  # Eq. (4)
        loss = (loss_x + loss_u_s) / (2 if self.cfg.halve_loss else 1)  # Eq. (5), lambda = 1
        logs: dict[str, Any] = {
            "loss_x": loss_x.detach(),
            "loss_u_s": loss_u_s.detach(),
            "mask_ratio": mask_ratio(weak.keep, weak.valid),
            "tau": tau,
        }
        return StepOutput(loss=loss, logs=logs, pseudo=pseudo, streams=view_streams("s1", logits_s, target_s))

    def _labeller(self) -> nn.Module:
        return self.ema_model if self.ema_model is not None else self.model

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        """Weak-view pseudo-labels: the teacher's (or the student's) eval-mode prediction, kept at conf >= tau."""
        with eval_mode(self._labeller()) as labeller:
            return select_confident(labeller(images), self.cfg.conf_thresh, valid)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        net = self.ema_model if self.ema_model is not None and self.cfg.eval_teacher else self.model
        with eval_mode(net):
            return net(images)

    def teacher(self) -> nn.Module | None:
        return self.ema_model

    def ema_momentum(self) -> float:
        return self.cfg.ema_gamma
