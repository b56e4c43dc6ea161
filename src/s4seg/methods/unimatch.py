"""UniMatch (V1): FixMatch + a feature-perturbation stream + two strong image streams.

Paper: UniMatch, "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic Segmentation" (Yang et
al., CVPR 2023, arXiv 2208.09910), restated in UniMatch V2 (arXiv 2410.10777) §3.2, Eq. (6)-(11).
Facts: `reference/unimatch_v1_fixmatch.md` §1.2, §1.5, §3.1 (`need_fp`), §9.

On top of FixMatch (`fixmatch.py`):
- Feature perturbation, Eq. (6)-(7): the weak view's encoder features e^w = g(x^w) go through
  Dropout2d(0.5), applied independently to every feature the model's `encode` returns (DeepLabV3+: c1 and
  c4; §3.2.1 "to each feature volume independently"). The clean and the perturbed features are decoded
  together in one decoder pass, as in the reference (the decoder's BN statistics mix both), and the FP loss
  reaches the encoder through the dropout. As in the reference, labeled and weak images share this pass; the
  perturbed labeled logits are computed and not used.
- Dual strong streams, Eq. (9)-(10): u_s1 and u_s2, each with its own CutMix box, in one forward.
- Loss, Eq. (11) with Eq. (5): L_u = 0.5 L_fp + 0.25 (L_s1 + L_s2), and L = L_x + L_u; `halve_loss: true`
  is the code's (L_x + L_u) / 2, see `fixmatch.py`. The FP stream trains on the un-mixed weak targets.

Where paper and code differ (`weak_labels_from_train_forward`, `cutmix_partner`): as in `fixmatch.py`, the
main pseudo-labels come by default from the inference stream `pseudo_labels()` (eval-mode BN, no grad); true
takes them, as the code does, from the detached clean weak logits of the train-mode joint labeled + weak
pass. The CutMix partner is the engine's second unlabeled batch, labelled in eval mode, as in the code.

BN running statistics (`perturbed_bn_stats`, neither paper nor code discuss it): in the code the joint
clean + perturbed decode also updates the decoder's running statistics, so inference normalises with
statistics partly made of dropped-out features (survivors x2). With small batches this hurt here (synthetic
default, 1/8 labels, batch 4: 45 mIoU against 47 for the warmup after 126 steps; with this default and
`precise_bn: off`, 57.8 against 50.7 for the warmup and 54.6 for `supervised` after 168 steps).
Default false: the joint decode normalises with its batch statistics, as in the code, but leaves the
running ones to the clean strong pass; true = the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from s4seg.engine.method import Batch, Method, MethodConfig, PseudoLabels, StepOutput, register_method
from s4seg.errors import ParamsError
from s4seg.methods.losses import (
    Targets,
    bn_stats_frozen,
    check_common,
    cutmix_partner,
    eval_mode,
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
class UniMatchConfig(MethodConfig):
    conf_thresh: float = 0.95  # tau, Eq. (10)-(11); 0.95 for Pascal/COCO (reference V1 §4; 0 on Cityscapes)
    fp_dropout: float = 0.5  # nn.Dropout2d(0.5), §3.2.1
    cutmix_partner: str = "batch"  # batch (V1 code: second unlabeled loader) | flip (reversed batch)
    weak_labels_from_train_forward: bool = False  # true: the code's train-mode joint labeled+weak forward
    perturbed_bn_stats: bool = False  # true: the code's joint clean+FP decode also updates BN running stats
    halve_loss: bool = False  # Eq. (5): L = L_x + L_u (paper); true: the code's (L_x + L_u) / 2

    def __post_init__(self) -> None:
        check_common(self.conf_thresh, self.cutmix_partner)
        if not 0.0 <= self.fp_dropout < 1.0:
            raise ParamsError(f"fp_dropout must be in [0, 1), found {self.fp_dropout!r}")


def feature_perturbation(feats: list[Tensor], p: float) -> list[Tensor]:
    """F of Eq. (7): channel dropout (Dropout2d, survivors scaled by 1/(1-p)), drawn independently for
    every feature level and every sample. Always active: it is an augmentation, not a regulariser."""
    assert all(f.dim() == 4 for f in feats), "encode() must return (B, C, h, w) feature maps"
    return [F.dropout2d(f, p, training=True) for f in feats]


def unimatch_loss(loss_x: Tensor, loss_u_s1: Tensor, loss_u_s2: Tensor, loss_u_fp: Tensor,
                  halve: bool = False) -> Tensor:
    """Eq. (11) in Eq. (5): L_u = 0.5 L_fp + 0.25 (L_s1 + L_s2); L = L_x + L_u, or (L_x + L_u) / 2 (code)."""
    loss_u = 0.5 * loss_u_fp + 0.25 * (loss_u_s1 + loss_u_s2)
    return (loss_x + loss_u) / (2 if halve else 1)


@register_method("unimatch")
class UniMatch(Method):
    config_class = UniMatchConfig

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        tau = self.cfg.conf_thresh
        valid_w = valid_or_all(batch.valid_u, batch.u_w)
        # Eval-mode labelling first, before a train-mode pass updates the BN running statistics
        partner_targets = label_partner(batch, self.cfg.cutmix_partner, self.pseudo_labels)
        if self.cfg.weak_labels_from_train_forward:
            logits_x, logits_w, logits_fp = self.forward_with_fp(batch.x, batch.u_w)
            pseudo = select_confident(logits_w, tau, valid_w)  # detached inside
        else:
            pseudo = self.pseudo_labels(batch.u_w, valid_w)
            logits_x, _, logits_fp = self.forward_with_fp(batch.x, batch.u_w)
        weak = Targets.of(pseudo, valid_w)

        # Two strong image streams, each with its own CutMix box, in one forward (Eq. 9)
        partner = cutmix_partner(batch, weak, partner_targets)
        u_s1 = paste(batch.u_s1, partner.u_s1, batch.box1)
        u_s2 = paste(batch.u_s2, partner.u_s2, batch.box2)
        target_s1 = weak.cutmix(partner.targets, batch.box1)
        target_s2 = weak.cutmix(partner.targets, batch.box2)
        logits_s1, logits_s2 = self.model(torch.cat([u_s1, u_s2])).chunk(2)

        loss_x = labeled_ce(logits_x, batch.y)  # Eq. (1)
        loss_u_s1 = unlabeled_ce(logits_s1, target_s1.label, target_s1.keep, target_s1.valid)  # Eq. (10)
        loss_u_s2 = unlabeled_ce(logits_s2, target_s2.label, target_s2.keep, target_s2.valid)
        loss_u_fp = unlabeled_ce(logits_fp, weak.label, weak.keep, weak.valid)  # Eq. (8), un-mixed targets
        loss = unimatch_loss(loss_x, loss_u_s1, loss_u_s2, loss_u_fp, self.cfg.halve_loss)
        logs: dict[str, Any] = {
            "loss_x": loss_x.detach(),
            "loss_u_s1": loss_u_s1.detach(),
            "loss_u_s2": loss_u_s2.detach(),
            "loss_u_fp": loss_u_fp.detach(),
            "mask_ratio": mask_ratio(weak.keep, weak.valid),
            "tau": tau,
        }
        streams = {**view_streams("s1", logits_s1, target_s1), **view_streams("s2", logits_s2, target_s2),
                   **view_streams("fp", logits_fp, weak)}
        return StepOutput(loss=loss, logs=logs, pseudo=pseudo, streams=streams)

    def forward_with_fp(self, x: Tensor, u_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. (6)-(7): encode labeled + weak once, decode [clean; perturbed] in one decoder pass.

        Returns the clean labeled logits, the clean weak logits and the perturbed weak logits p^f.
        """
        feats = self.model.encode(torch.cat([x, u_w]))  # e^w (with the labeled images in front)
        perturbed = feature_perturbation(feats, self.cfg.fp_dropout)
        joint = [torch.cat([clean, noisy]) for clean, noisy in zip(feats, perturbed, strict=True)]
        with bn_stats_frozen(self.model, frozen=not self.cfg.perturbed_bn_stats):
            clean, noisy = self.model.decode(joint, tuple(x.shape[-2:])).chunk(2)
        logits_x, logits_w = clean.split([len(x), len(u_w)])
        return logits_x, logits_w, noisy[len(x) :]

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        """Weak-view pseudo-labels: the eval-mode prediction, kept at conf >= tau."""
        with eval_mode(self.model):
            return select_confident(self.model(images), self.cfg.conf_thresh, valid)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        with eval_mode(self.model):
            return self.model(images)
