"""Losses and pseudo-label targets shared by the weak-to-strong methods (FixMatch, UniMatch V1 and V2, ...).

Paper: UniMatch V2 (arXiv 2410.10777), §3.1, which also restates FixMatch and UniMatch V1.
Facts: `reference/unimatch_v1_fixmatch.md` §1.2, §1.5 and `reference/unimatch_v2.md` §1 (steps 3, 5, 6).

- L_x, Eq. (1): cross-entropy against the ground truth, mean over non-ignored pixels.
- L_u, Eq. (4): cross-entropy of a strong view against the hard weak pseudo-label on the pixels whose
  confidence is >= tau. Eq. (4) averages over every pixel; the official code divides the sum over kept
  pixels by the number of *valid* (non-padding) pixels, kept or not, which is the same thing once padding
  is left out. Dividing by the kept count instead would inflate the loss early on, when few pixels pass tau.
- CutMix of the targets: a strong view pasted with a partner's pixels inside its box trains, inside the
  box, on the partner's pseudo-label, confidence and valid mask (`Targets.cutmix`).

Also the small pieces these methods share, so that each method file holds only its paper: the targets a
view trains on, the CutMix partner, eval-mode labelling, the EMA teacher's copy and config checks.

Streams (`StepOutput.streams`), for a loss term added on top of these methods (`AddOnMethod`, e.g.
ipixmatch). Per student view v, `view_streams(v, logits, targets)` gives the tensors the view's loss used:
    logits_<v>    (B, K, H, W) the student's logits of the view (with grad)
    logits_t_<v>  (B, K, H, W) detached logits its pseudo-labels were taken from (teacher side), in the
                  view's frame: CutMix-ed with the same box as the targets (absent if the labeller gives none)
    label_<v>, conf_<v>, keep_<v>, valid_<v>  (B, H, W) the view's `Targets`
Views: `s1`, `s2` the CutMix-ed strong image views (FixMatch has `s1` only, from u_s1 and box1); `fp`
UniMatch's feature-perturbed weak view (un-mixed weak targets).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s4seg.config import IGNORE_INDEX
from s4seg.data.augment import cutmix
from s4seg.engine.method import Batch, PseudoLabels
from s4seg.errors import ParamsError

CUTMIX_PARTNERS = ("batch", "flip")


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def labeled_ce(logits: Tensor, target: Tensor) -> Tensor:
    """L_x, Eq. (1): CE against the ground truth, mean over pixels that are not IGNORE_INDEX.

    A batch with no labeled pixel at all gives 0 (with a graph), not the NaN of `F.cross_entropy`'s mean.
    """
    # fp32 under autocast (bf16 logits): the log-softmax and the sum over pixels need its precision
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
    return ce.sum() / (target != IGNORE_INDEX).sum().clamp_min(1)


def unlabeled_ce(logits: Tensor, label: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
    """L_u, Eq. (4): CE of a strong view against the hard pseudo-label on kept pixels (conf >= tau),
    summed over the batch and divided by the number of valid (non-padding) pixels, not of kept ones."""
    ce = F.cross_entropy(logits.float(), label, reduction="none")  # (B, H, W), fp32 under autocast
    return (ce * keep).sum() / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------
# Pseudo-labels and the targets a strong view trains on
# --------------------------------------------------------------------------------------------------
def select_confident(logits: Tensor, tau: float, valid: Tensor | None = None) -> PseudoLabels:
    """The indicator of Eq. (4): hard label = argmax, conf = max softmax, keep = (conf >= tau) & valid.

    No temperature, sharpening or distribution alignment (reference V2 §1 step 2). `>=`, so tau = 0 keeps
    every valid pixel (UniMatch's Cityscapes setting) and a pixel at exactly tau is kept.
    """
    prob = logits.detach().float().softmax(dim=1)  # fp32 even under autocast: conf >= tau compares fp32
    conf, label = prob.max(dim=1)
    keep = conf >= tau
    if valid is not None:
        keep = keep & valid.bool()
    return PseudoLabels(label=label, conf=conf, keep=keep, logits=logits.detach())


def valid_or_all(valid: Tensor | None, images: Tensor) -> Tensor:
    """The (B, H, W) bool valid mask of `images`; every pixel is valid when the batch gives none."""
    if valid is not None:
        return valid.bool()
    b, _, h, w = images.shape
    return torch.ones(b, h, w, dtype=torch.bool, device=images.device)


def mask_ratio(keep: Tensor, valid: Tensor) -> Tensor:
    """Share of valid pixels of the un-mixed weak view that pass tau (the reference's logged mask ratio)."""
    return keep.sum() / valid.sum().clamp_min(1)


@dataclass(frozen=True)
class Targets:
    """What one unlabeled view trains on, per pixel (all (B, H, W))."""

    label: Tensor  # int64 hard pseudo-label
    conf: Tensor  # float confidence of `label`
    keep: Tensor  # bool: conf >= tau and valid
    valid: Tensor  # bool: not padding (the loss denominator)
    logits: Tensor | None = None  # (B, K, H, W) detached logits of the labeller (`PseudoLabels.logits`)

    @classmethod
    def of(cls, pseudo: PseudoLabels, valid: Tensor) -> Targets:
        return cls(label=pseudo.label, conf=pseudo.conf, keep=pseudo.keep & valid, valid=valid, logits=pseudo.logits)

    def cutmix(self, partner: Targets, box: Tensor | None) -> Targets:
        """Targets of a view whose pixels inside `box` were replaced by the partner's (reference V1 §1.2 step 6)."""
        if box is None:
            return self
        pairs = zip(self.fields(), partner.fields(), strict=True)
        return Targets(*(cutmix(a, b, box) if a is not None and b is not None else None for a, b in pairs))

    def flipped(self) -> Targets:
        """The batch reversed along dim 0: sample i gets sample B-1-i's targets (UniMatch V2 code's partner)."""
        return Targets(*(None if t is None else t.flip(0) for t in self.fields()))

    def fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        return self.label, self.conf, self.keep, self.valid, self.logits


def view_streams(view: str, logits: Tensor, targets: Targets) -> dict[str, Tensor]:
    """`StepOutput.streams` of one student view: its logits and targets (see "Streams" above)."""
    streams = {f"logits_{view}": logits, f"label_{view}": targets.label, f"conf_{view}": targets.conf,
               f"keep_{view}": targets.keep, f"valid_{view}": targets.valid}
    if targets.logits is not None:
        streams[f"logits_t_{view}"] = targets.logits
    return streams


@dataclass(frozen=True)
class Partner:
    """The CutMix partner of an unlabeled batch: its targets and its strong views (pixel-aligned)."""

    targets: Targets
    u_s1: Tensor
    u_s2: Tensor | None


def label_partner(batch: Batch, mode: str, label: Callable[[Tensor, Tensor], PseudoLabels]) -> Targets | None:
    """Targets of the CutMix partner batch, labelled by `label(u_w_mix, valid_u_mix)` (the method's own
    pseudo-labelling, eval mode); None for mode "flip", whose targets are the weak ones reversed.

    Methods call this before their train-mode passes, as the V1 code labels its partner first.
    """
    if mode == "flip":
        return None
    if mode != "batch":
        raise ValueError(f"cutmix_partner {mode!r} is not one of {', '.join(CUTMIX_PARTNERS)}")
    if batch.u_w_mix is None or batch.u_s1_mix is None:
        raise ValueError("cutmix_partner 'batch' needs the partner batch (u_w_mix, u_s1_mix) from the engine")
    valid = valid_or_all(batch.valid_u_mix, batch.u_w_mix)
    return Targets.of(label(batch.u_w_mix, valid), valid)


def cutmix_partner(batch: Batch, weak: Targets, partner_targets: Targets | None) -> Partner:
    """The partner whose pixels are pasted into the strong views, and its targets.

    - `partner_targets` given ("batch"): the engine's second, independently augmented unlabeled batch
      (`u_*_mix`), UniMatch V1's second loader.
    - None ("flip"): the same batch reversed (UniMatch V2 code): no extra pass, but with B = 1 nothing is
      mixed and with odd B the middle sample mixes with itself.
    """
    if partner_targets is None:
        u_s2 = batch.u_s2.flip(0) if batch.u_s2 is not None else None
        return Partner(targets=weak.flipped(), u_s1=batch.u_s1.flip(0), u_s2=u_s2)
    return Partner(targets=partner_targets, u_s1=batch.u_s1_mix, u_s2=batch.u_s2_mix)


def paste(images: Tensor, partner_images: Tensor, box: Tensor | None) -> Tensor:
    """CutMix of images (`data.augment.cutmix`); no box means no CutMix."""
    return images if box is None else cutmix(images, partner_images, box)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An EMA teacher: a deep copy without gradients, in eval mode (it only ever labels and evaluates).

    At t = 0 the engine's momentum min(1 - 1/(t+1), gamma) is 0, so after the first optimiser step the
    teacher is the student whatever weights it was copied from.
    """
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run `module` in eval mode (BN running statistics) and give it back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@contextmanager
def bn_stats_frozen(module: nn.Module, frozen: bool = True) -> Iterator[nn.Module]:
    """Inside, BatchNorm layers still normalise with batch statistics but leave their running
    statistics alone (momentum 0). For passes over perturbed features (channel dropout scales the
    survivors by 2): their statistics are not those of the clean features seen at inference, and with a
    BN decoder (DeepLabV3+) and small batches letting them in shifts the eval-time statistics.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen else []
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield module
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum


def check_common(conf_thresh: float, cutmix_partner: str) -> None:
    """Validate the keys every weak-to-strong config has; `from_dict` prefixes the params section."""
    if not 0.0 <= conf_thresh <= 1.0:
        raise ParamsError(f"conf_thresh must be in [0, 1], found {conf_thresh!r}")
    if cutmix_partner not in CUTMIX_PARTNERS:
        raise ParamsError(f"cutmix_partner must be one of {', '.join(CUTMIX_PARTNERS)}, found {cutmix_partner!r}")


def check_momentum(ema_gamma: float) -> None:
    if not 0.0 <= ema_gamma < 1.0:
        raise ParamsError(f"ema_gamma must be in [0, 1), found {ema_gamma!r}")


def gaussian_rampup(step: int, ramp_steps: int) -> float:
    """exp(-5 (1 - min(t / T_r, 1))^2), the Gaussian ramp-up of Laine & Aila (2017) from ~0.0067 at step 0
    to 1 at T_r and after; T_r <= 0: 1 (no ramp)."""
    if ramp_steps <= 0:
        return 1.0
    return math.exp(-5.0 * (1.0 - min(step / ramp_steps, 1.0)) ** 2)
