"""UniMatch V2: EMA teacher, two strong views, complementary channel dropout on the encoder features.

Paper: UniMatch V2, "Pushing the Limit of Semi-Supervised Semantic Segmentation" (Yang et al., arXiv
2410.10777), §3.3, Eq. (12)-(18) and Algorithm 1. Facts: `reference/unimatch_v2.md` §1, §5, §7.

One iteration: the EMA teacher pseudo-labels the weak view (Eq. 18 model; argmax, conf >= tau); the two
strong views, each CutMixed with its own box, are encoded together, and the two features of each pair
(s1_j, s2_j) are multiplied by complementary channel masks 2M and 2(1 - M) (Eq. 14-15) before one decoder pass
(Eq. 16). L_u = (L_s1 + L_s2) / 2 (Eq. 17) and L = L_x + L_u (Eq. 5; `halve_loss: true` = the code's global
/2, see `fixmatch.py`).
The engine updates the teacher after each step with momentum min(1 - 1/(t+1), ema_gamma).

Choices where paper and code differ, or the paper is silent:
- Dropped pairs (`undropped_pairs`): the paper applies the complementary masks to every pair (Eq. 14-15,
  Algorithm 1); the code leaves floor(0.5 n) random pairs of n undropped. Default 0 (paper); 0.5 = code.
- M: Algorithm 1 draws every channel from Bernoulli(0.5); the text's "half of its channels (C/2)" is its
  expectation. Bernoulli is used, so M and 1 - M are disjoint and cover every channel in any case.
- Levels: one mask per pair shared by every feature level, as in the paper and code (DPT: four ViT levels of
  the same width). When levels differ in width (DeepLabV3+: c1 and c4), one mask is drawn per level, with the
  same per-pair complementarity: channels of different levels do not correspond, so no mask can be shared.
- CutMix partner (`cutmix_partner`): the paper counts CutMix in A^s without naming a partner; the code pastes
  the reversed batch (sample B-1-i, which does nothing at B = 1). Default "batch": the engine's partner batch,
  labelled by the teacher, as for the other methods here; "flip" = the code.
- Evaluation (`eval_teacher`): the paper reports the EMA teacher (§4.4.8, reference §5); false = the student.
- BN running statistics (`perturbed_bn_stats`): the paper's DPT head has no BatchNorm, so there the
  question does not arise. With DeepLabV3+ (BN in ASPP and decoder), letting the dropped-out strong
  decode (survivors x2) update the running statistics skews them away from the clean features seen at
  inference; measured on the synthetic default, 1/8 labels, 126 iterations: teacher 38.7 mIoU, 49.2 after
  recomputing BN statistics on clean tiles. Default false: that decode normalises with its batch
  statistics but leaves the running ones alone; true = updating them, as the code would with BN.
  The teacher's BN buffers are blended like its weights (as the code does for buffers); the engine's
  PreciseBN (`train.precise_bn`) re-estimates them, and the student's, for the final artifact.
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
    bn_stats_frozen,
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
class UniMatchV2Config(MethodConfig):
    conf_thresh: float = 0.95  # tau, Eq. (17); 0.95 on every dataset (reference §3)
    ema_gamma: float = 0.996  # Eq. (18): momentum min(1 - 1/(iter+1), 0.996)
    eval_teacher: bool = True  # report the EMA teacher (§4.4.8; reference §5)
    undropped_pairs: float = 0.0  # share of pairs left undropped: 0 = paper (Eq. 14-15), 0.5 = code
    cutmix_partner: str = "batch"  # batch (engine's partner batch) | flip (code: reversed batch)
    perturbed_bn_stats: bool = False  # true: the dropped-out strong decode also updates BN running stats
    halve_loss: bool = False  # Eq. (5): L = L_x + L_u (paper); true: the code's (L_x + L_u) / 2

    def __post_init__(self) -> None:
        check_common(self.conf_thresh, self.cutmix_partner)
        check_momentum(self.ema_gamma)
        if not 0.0 <= self.undropped_pairs <= 1.0:
            raise ParamsError(f"undropped_pairs must be in [0, 1], found {self.undropped_pairs!r}")


def complementary_masks(
    pairs: int, channels: int, undropped_pairs: float = 0.0, device: torch.device | None = None
) -> Tensor:
    """Channel scales (2 * pairs, C) of Eq. (14)-(15): rows [0, pairs) are 2M for view 1, rows
    [pairs, 2 pairs) are 2(1 - M) for view 2, M ~ Bernoulli(0.5) per pair and channel. The first
    floor(undropped_pairs * pairs) pairs of a random permutation get scale 1 in both views (code's rule)."""
    m = torch.bernoulli(torch.full((pairs, channels), 0.5, device=device))
    scales = torch.cat([2 * m, 2 * (1 - m)])
    left_alone = int(pairs * undropped_pairs)  # floor, as the code's int(n * 0.5)
    if left_alone:
        chosen = torch.randperm(pairs, device=device)[:left_alone]
        scales[chosen] = 1.0
        scales[chosen + pairs] = 1.0
    return scales


def complementary_dropout(feats: list[Tensor], undropped_pairs: float = 0.0) -> list[Tensor]:
    """Eq. (14)-(15) on features of concat(u_s1, u_s2): each (2n, C_l, h, w), pair j = rows (j, n + j).

    One mask for every level when all levels have the same width (paper, DPT), else one mask per level.
    """
    assert all(f.dim() == 4 for f in feats), "encode() must return (B, C, h, w) feature maps"
    assert len(feats[0]) % 2 == 0, "expected the two strong views stacked along the batch"
    pairs = len(feats[0]) // 2
    same_width = len({f.shape[1] for f in feats}) == 1
    shared = complementary_masks(pairs, feats[0].shape[1], undropped_pairs, feats[0].device) if same_width else None
    out = []
    for f in feats:
        scales = shared if shared is not None else complementary_masks(pairs, f.shape[1], undropped_pairs, f.device)
        out.append(f * scales.to(f.dtype)[:, :, None, None])
    return out


def unimatch_v2_loss(loss_x: Tensor, loss_u_s1: Tensor, loss_u_s2: Tensor, halve: bool = False) -> Tensor:
    """Eq. (17) in Eq. (5): L_u = (L_s1 + L_s2) / 2; L = L_x + L_u, or (L_x + L_u) / 2 (code)."""
    return (loss_x + (loss_u_s1 + loss_u_s2) / 2) / (2 if halve else 1)


@register_method("unimatch_v2")
class UniMatchV2(Method):
    config_class = UniMatchV2Config

    def __init__(self, cfg: UniMatchV2Config, model: nn.Module, num_classes: int) -> None:
        super().__init__(cfg, model, num_classes)
        self.ema_model = frozen_copy(model)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        valid_w = valid_or_all(batch.valid_u, batch.u_w)
        pseudo = self.pseudo_labels(batch.u_w, valid_w)  # the teacher's
        weak = Targets.of(pseudo, valid_w)

        partner = cutmix_partner(batch, weak, label_partner(batch, self.cfg.cutmix_partner, self.pseudo_labels))
        u_s1 = paste(batch.u_s1, partner.u_s1, batch.box1)
        u_s2 = paste(batch.u_s2, partner.u_s2, batch.box2)
        target_s1 = weak.cutmix(partner.targets, batch.box1)
        target_s2 = weak.cutmix(partner.targets, batch.box2)

        logits_x = self.model(batch.x)  # a separate pass: no dropout on labeled images
        feats = complementary_dropout(self.model.encode(torch.cat([u_s1, u_s2])), self.cfg.undropped_pairs)
        with bn_stats_frozen(self.model, frozen=not self.cfg.perturbed_bn_stats):
            logits_s1, logits_s2 = self.model.decode(feats, tuple(u_s1.shape[-2:])).chunk(2)  # Eq. (16)

        loss_x = labeled_ce(logits_x, batch.y)  # Eq. (1)
        loss_u_s1 = unlabeled_ce(logits_s1, target_s1.label, target_s1.keep, target_s1.valid)  # Eq. (17)
        loss_u_s2 = unlabeled_ce(logits_s2, target_s2.label, target_s2.keep, target_s2.valid)
        loss = unimatch_v2_loss(loss_x, loss_u_s1, loss_u_s2, self.cfg.halve_loss)
        logs: dict[str, Any] = {
            "loss_x": loss_x.detach(),
            "loss_u_s1": loss_u_s1.detach(),
            "loss_u_s2": loss_u_s2.detach(),
            "mask_ratio": mask_ratio(weak.keep, weak.valid),
            "tau": self.cfg.conf_thresh,
        }
        streams = {**view_streams("s1", logits_s1, target_s1), **view_streams("s2", logits_s2, target_s2)}
        return StepOutput(loss=loss, logs=logs, pseudo=pseudo, streams=streams)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        """Weak-view pseudo-labels of the EMA teacher (eval mode), kept at conf >= tau."""
        with eval_mode(self.ema_model) as teacher:
            return select_confident(teacher(images), self.cfg.conf_thresh, valid)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        net = self.ema_model if self.cfg.eval_teacher else self.model
        with eval_mode(net):
            return net(images)

    def teacher(self) -> nn.Module | None:
        return self.ema_model

    def ema_momentum(self) -> float:
        return self.cfg.ema_gamma
