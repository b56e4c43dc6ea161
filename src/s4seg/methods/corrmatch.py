"""CorrMatch: a correlation map on the encoder's deepest feature, pixel and region propagation, dynamic tau.

Paper: CorrMatch, "Label Propagation via Correlation Matching for Semi-Supervised Semantic Segmentation" (Sun
et al., CVPR 2024, arXiv 2306.04300), §3.1-3.4, Eq. (1)-(12). Facts: `reference/corrmatch.md` §0-§4 and §8
(the current official version, `ca5c877`: region propagation and a single strong stream).

One iteration, on top of weak-to-strong consistency with CutMix (`fixmatch.py`):
- Correlation map, Eq. (4): on the last feature `model.encode` returns (the code's c4), a shared projection
  (3x3 conv, BN, ReLU, Dropout2d) and two 1x1 convs w1, w2 to K = number of classes give q and k;
  C = softmax_j(q_i . k_j / sqrt(K)), (B, HW, HW), every row sums to one. Training only: `predict` is the
  plain segmentation output. The head lives here (models know no method) and trains in the 'head' LR group.
- Pixel propagation, Eq. (5): z = f1(logits) . C with the logits *detached* and resized to the feature
  grid; z[:, :, j] = sum_i P[:, :, i] C[i, j] (the contraction runs over the axis the softmax did not
  normalise, as in the code, reference §1 and I#27), then resized to the crop. So the correlation losses
  train the projection, w1, w2 and the encoder, never the decoder or the classifier (reference §8.2).
- Region propagation, Eq. (7)-(10): `region_rows` random rows of C (one draw for the batch), each resized
  to the crop, min-max normalised, > 0.5; regions are kept off the CutMix box and the padding. In sample
  order, a region R whose confident part S = R & F is a share r1 > tau of R, and whose most frequent
  current pseudo-label (ties: the smallest class) holds a share r2 > tau of S, gives that class to all of R
  and joins the kept mask M (M starts as F). Later regions see, and may overwrite, earlier ones' labels.
- Dynamic threshold, Eq. (11): tau starts at 0.85; every training step, before any mask is built,
  tau <- 0.999 tau + 0.001 mean_l max{conf : argmax = l}, over the classes present among the valid pixels
  of the un-mixed weak view. A registered buffer (state dict, checkpoints); only `training_step` moves it.
- Losses, §3.4 and Eq. (12): L = (L_s + L_u) / 2, L_s = (L_s^h + L_s^c) / 2 (CE of the logits and of z
  against the ground truth), L_u = 0.5 L_u^h + 0.25 L_u^s + 0.25 L_u^c, where L_u^h is the strong view's CE
  against the propagated label on M (Eq. 1), L_u^s = KL(P_w || P_s) on F (Eq. 3) and L_u^c the mean of the
  strong z against the propagated label on M and the weak z against the weak label on F_w (Eq. 6; code).
  Every unlabeled term divides by the valid-pixel count (`losses.unlabeled_ce`).

Where the paper and the code differ, or the paper is silent:
- Eq. (4) typesets Softmax(w1^T w2) / sqrt(D) with D "the channel dimension"; the code scales before the
  softmax and w1, w2 have K channels, so D = K. This file does the same (rows then sum to one).
- Eq. (7) binarises a row and then resizes it (f2); the code resizes, normalises and binarises at the crop
  size. This file follows the code (smoother masks than a feature-grid binarisation).
- Sampling: the paper says "random sampling" of 128 rows; the code draws indices with replacement, one set
  for the batch, over [0, HW - 2] (the last position can never be drawn: an off-by-one not kept here).
  `region_rows_replace: false` draws distinct rows (at most HW).
- r1: the paper writes r1 > tau, the code r1 >= tau; this file follows the paper. r2 > tau in both. The
  confidence mask is conf >= tau, as in the code and `losses.select_confident` (Eq. 2 writes >; for a
  continuous confidence the two differ on nothing that matters).
- Threshold (`dynamic_tau`): Eq. (11) names no momentum; 0.999 is the code's. The code takes the
  predictions of the un-mixed view with the ignore mask of the *mixed* one (I#23, "negligible"); this file
  uses the un-mixed view's own valid mask. Under torchrun the per-class maxima are all-reduced with MAX,
  which is the code's all_gather: every rank holds the same tau. false keeps tau = tau_init (the paper's
  "Fixed" ablation, Tab. 5; tau = 0 on Cityscapes, I#12).
- Soft loss: KL(P_w || P_s), the author's direction (I#3); masked by F, not by the expanded M (code; the
  paper's Eq. 3 uses M_i before Eq. 10 expands it). Inside the CutMix box the code's target is the
  *un-mixed* weak softmax although the image shows the partner there; this file uses the partner's softmax
  inside the box, like every other target of the strong view (`kl_unmixed_target: true` = the code).
- Correlation loss: Eq. (6) has one term; the code averages the strong and the weak one (I#3, I#5). Code.
- Feature-perturbation stream (`fp_stream`, code only, not in the paper): UniMatch's Dropout2d(0.5) on every
  encoder feature of the weak view, decoded with the clean features in one pass (BN running statistics
  left to the clean strong pass, as `unimatch.py`'s default); its CE against the weak label on F_w takes
  half of the hard weight (0.25 + 0.25, as the code). Off by default: the paper has no such stream.
- Pseudo-labels (`weak_labels_from_train_forward`): as in `fixmatch.py`, by default the weak label, its
  confidence and the correlation map of the region masks come from the inference stream (eval mode, no
  grad, no dropout): `pseudo_labels()`, which the dump writes, applies the same selection. true = the code:
  the detached weak logits and C of the train-mode labeled + weak forward (BN batch statistics, dropout on).
  The CutMix partner is the engine's second unlabeled batch, labelled in eval mode, as in the code.
- Gradient path (`corr_grad_to_encoder`): the correlation losses reach the encoder through the deepest
  feature, in the paper and the code; false detaches that feature (they then train the projection, w1 and
  w2 only). Measured on the synthetic default (README): it does not change what holds corrmatch back.
- Labeled criterion: CE (the code's VOC setting); the code's Cityscapes OHEM is not implemented here.
- Output stride: the code's ResNet runs at stride 8 (reference §1: 41 x 41 cells at crop 321), so C and its
  regions sit on a grid twice as fine. The stride is the model's (`model.output_stride`, 16 by default for
  every method, so one warmup serves them all); 8 is the code's. Measured (README): at 8 corrmatch beats
  supervised at the default budget, at 16 it does not.

Dump (`pseudo_labels`): label = propagated label, conf = its softmax probability, keep = M (what L_u^h trains
on), regions = 1 + the sample index of the last accepted region covering a pixel (NO_REGION elsewhere);
extra: `confident` (F, before propagation), `prior_label` (the weak label before propagation, uint8: the dump
grades the confident pixels Eq. 10 relabels), `expanded` (M), `tau` (B,). Rows are drawn from a fixed-seed
generator there, so a dump is reproducible and never moves the training RNG. The correlation head's BN
statistics come from training (the engine's PreciseBN re-estimates the model's only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from s4seg import timing
from s4seg.data.augment import cutmix
from s4seg.engine.method import Batch, Method, MethodConfig, PseudoLabels, StepOutput, register_method
from s4seg.errors import ParamsError
from s4seg.evaluation.pseudo_quality import CONFIDENT_LAYER, PRIOR_LABEL_LAYER
from s4seg.methods.losses import (
    Targets,
    bn_stats_frozen,
    eval_mode,
    labeled_ce,
    mask_ratio,
    paste,
    select_confident,
    unlabeled_ce,
    valid_or_all,
)
from s4seg.methods.unimatch import feature_perturbation

# `PseudoLabels.regions` value of a pixel no region covers: the dump (`evaluation.regions.relabel_regions`)
# reads negative ids as "no region" and renumbers the others 1..n.
NO_REGION = -1
DUMP_REGION_SEED = 0  # rows drawn by `pseudo_labels` (dump, snapshots): reproducible, off the training RNG
_MASK_CHUNK = 32  # rows resized at a time: bounds the float (B, chunk, H, W) buffer


@dataclass(frozen=True)
class CorrMatchConfig(MethodConfig):
    tau_init: float = 0.85  # §3.4 "a relatively small value (0.85) as initialization"; configs/pascal.yaml
    tau_momentum: float = 0.999  # EMA momentum of Eq. (11)'s update (code, util/thresh_helper.py)
    dynamic_tau: bool = True  # §3.4; false: tau stays tau_init (Tab. 5 "Fixed"; 0 on Cityscapes, I#12)
    lambda_hard: float = 0.5  # lambda_1, Eq. (12)
    lambda_soft: float = 0.25  # lambda_2, Eq. (12)
    lambda_corr: float = 0.25  # lambda_3, Eq. (12)
    region_rows: int = 128  # rows of C sampled for region propagation, §4.3 Tab. 8 (0: pixel propagation only)
    region_rows_replace: bool = True  # code: indices drawn with replacement; false: distinct rows
    corr_channels: int = 256  # width of the shared projection before w1, w2 (code: 2048 -> 256)
    corr_dropout: float = 0.1  # Dropout2d at the end of that projection (code)
    fp_stream: bool = False  # code only: UniMatch's feature-perturbation stream (takes half the hard weight)
    fp_dropout: float = 0.5  # Dropout2d of that stream (code)
    kl_unmixed_target: bool = False  # true: code's KL target, the un-mixed weak softmax even inside the box
    weak_labels_from_train_forward: bool = False  # true: code's train-mode labeled + weak forward labels
    corr_grad_to_encoder: bool = True  # paper and code; false: the correlation losses stop at the projection

    def __post_init__(self) -> None:
        unit = {"tau_init": self.tau_init, "tau_momentum": self.tau_momentum}
        for key, value in unit.items():
            if not 0.0 <= value <= 1.0:
                raise ParamsError(f"{key} must be in [0, 1], found {value!r}")
        for key in ("lambda_hard", "lambda_soft", "lambda_corr"):
            if getattr(self, key) < 0:
                raise ParamsError(f"{key} must be >= 0, found {getattr(self, key)!r}")
        if self.region_rows < 0:
            raise ParamsError(f"region_rows must be >= 0, found {self.region_rows!r}")
        if self.corr_channels < 1:
            raise ParamsError(f"corr_channels must be >= 1, found {self.corr_channels!r}")
        for key in ("corr_dropout", "fp_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ParamsError(f"{key} must be in [0, 1), found {getattr(self, key)!r}")


# --------------------------------------------------------------------------------------------------
# Correlation map and pixel propagation, Eq. (4)-(5)
# --------------------------------------------------------------------------------------------------
def correlation_map(query: Tensor, key: Tensor) -> Tensor:
    """C of Eq. (4) from q = w1 f and k = w2 f, both (B, K, HW): softmax over j of q_i . k_j / sqrt(K),
    scaled before the softmax (code), so every row C[b, i, :] sums to one. Returns (B, HW, HW)."""
    scores = torch.bmm(query.transpose(1, 2), key) * query.shape[1] ** -0.5
    return scores.float().softmax(dim=-1)  # fp32 under autocast: rows of up to HW small probabilities


class CorrelationHead(nn.Module):
    """The code's `proj` + `Corr`: 3x3 conv -> BN -> ReLU -> Dropout2d, then 1x1 convs w1, w2 to K."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),  # the code's bias: cancelled by the BN
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.query = nn.Conv2d(channels, num_classes, 1)  # w1
        # w2 without the code's bias: a bias b adds q_i . b to every entry of row i, which the softmax over j
        # cancels, so it would never get a gradient; the map is the same for any value of it
        self.key = nn.Conv2d(channels, num_classes, 1, bias=False)

    def forward(self, feat: Tensor) -> Tensor:
        """(B, C, h, w) feature -> correlation map (B, hw, hw)."""
        f = self.proj(feat)
        return correlation_map(self.query(f).flatten(2), self.key(f).flatten(2))


def propagate_pixels(logits: Tensor, corr: Tensor, feat_size: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """z of Eq. (5): the *detached* logits (B, K, H, W), bilinearly resized to the feature grid (f1), times C:
    z[:, :, j] = sum_i P[:, :, i] C[i, j]; resized back to `size`. Gradients reach C only (reference §1)."""
    b, k = logits.shape[:2]
    p = F.interpolate(logits.detach(), size=feat_size, mode="bilinear", align_corners=True).flatten(2)
    z = torch.bmm(p.to(corr.dtype), corr).view(b, k, *feat_size)
    return F.interpolate(z, size=size, mode="bilinear", align_corners=True)


# --------------------------------------------------------------------------------------------------
# Region propagation, Eq. (7)-(10)
# --------------------------------------------------------------------------------------------------
def sample_rows(corr: Tensor, count: int, feat_size: tuple[int, int], replace: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    """`count` random rows of the detached C (B, HW, HW), one draw for the whole batch (code), as (B, n, h, w)
    maps: row i holds every position's similarity to position i. Without `replace`, min(count, HW) distinct."""
    hw = corr.shape[-1]
    if replace:
        idx = torch.randint(hw, (count,), device=corr.device, generator=generator)
    else:
        idx = torch.randperm(hw, device=corr.device, generator=generator)[:count]
    return corr.detach()[:, idx].reshape(corr.shape[0], len(idx), *feat_size)


def region_masks(rows: Tensor, size: tuple[int, int]) -> Tensor:
    """c-hat of Eq. (7), in the code's order: each row (B, n, h, w) bilinearly resized to `size`
    (align_corners=True), min-max normalised over its H W values, then > 0.5. A flat row gives 0/0 = NaN and
    so an empty mask. Returns (B, n, H, W) bool."""
    b, n = rows.shape[:2]
    out = torch.empty(b, n, *size, dtype=torch.bool, device=rows.device)
    for start in range(0, n, _MASK_CHUNK):
        up = F.interpolate(rows[:, start : start + _MASK_CHUNK].float(), size=size, mode="bilinear",
                           align_corners=True)
        low, high = up.amin(dim=(-2, -1), keepdim=True), up.amax(dim=(-2, -1), keepdim=True)
        out[:, start : start + _MASK_CHUNK] = (up - low) / (high - low) > 0.5
    return out


class Propagated(NamedTuple):
    label: Tensor  # (B, H, W) int64: the pseudo-label after Eq. (10)
    expanded: Tensor  # (B, H, W) bool: M = F united with every accepted region
    regions: Tensor  # (B, H, W) int32: 1 + sample index of the last accepted region here, else NO_REGION
    accepted: Tensor  # (B, n) bool


def propagate_regions(masks: Tensor, label: Tensor, confident: Tensor, tau: float, num_classes: int) -> Propagated:
    """Eq. (8)-(10) for the region masks (B, n, H, W) (already cut to the allowed pixels), the pseudo-label
    (B, H, W) and the confident mask F (B, H, W).

    In sample order k: S_k = R_k & F; skip when |S_k| = 0 or r1 = |S_k| / |R_k| <= tau; k* = the most frequent
    *current* label on S_k (ties: the smallest class); when r2 = count(k*) / |S_k| > tau, label[R_k] = k* and
    M |= R_k. r1 depends on R_k and F only (F never changes), so it is computed for every region and image at
    once; the histogram reads labels that earlier regions may have overwritten, so regions stay a sequential
    loop, each step vectorised over the images. Only regions that pass r1 in some image are visited (a
    region that fails r1 writes nothing), which is the per-region loop's result exactly.
    """
    b, n = masks.shape[:2]
    support = masks & confident[:, None]
    region_size = masks.flatten(2).sum(-1)  # |R_k|, (B, n)
    support_size = support.flatten(2).sum(-1)  # |S_k|
    r1 = support_size.double() / region_size.clamp_min(1).double()
    candidate = (support_size > 0) & (r1 > tau)
    label, expanded = label.clone(), confident.clone()
    regions = torch.full(label.shape, NO_REGION, dtype=torch.int32, device=label.device)
    accepted = torch.zeros(b, n, dtype=torch.bool, device=label.device)
    flat_label = label.view(b, -1)
    for k in candidate.any(dim=0).nonzero().flatten().tolist():  # one host sync for the whole batch
        counts = torch.zeros(b, num_classes, dtype=torch.long, device=label.device)
        counts.scatter_add_(1, flat_label, support[:, k].reshape(b, -1).long())  # G(l), Eq. (9)
        top, cls = counts.max(dim=1)  # Eq. (8); torch returns the first maximal index: the smallest class
        accept = candidate[:, k] & (top.double() / support_size[:, k].clamp_min(1).double() > tau)
        write = masks[:, k] & accept[:, None, None]
        label.copy_(torch.where(write, cls[:, None, None], label))  # in place: flat_label views it
        expanded |= write
        regions.masked_fill_(write, k + 1)
        accepted[:, k] = accept
    return Propagated(label, expanded, regions, accepted)


# --------------------------------------------------------------------------------------------------
# Dynamic threshold, Eq. (11)
# --------------------------------------------------------------------------------------------------
def class_max_confidence(logits: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """max of the confidence over the valid pixels predicted as each class, (K,); -1 for absent classes."""
    conf, label = logits.detach().float().softmax(dim=1).max(dim=1)
    conf = torch.where(valid, conf, torch.full_like(conf, -1.0))
    out = torch.full((num_classes,), -1.0, device=logits.device)
    return out.scatter_reduce(0, label.flatten(), conf.flatten(), reduce="amax")


def updated_threshold(tau: Tensor, class_max: Tensor, momentum: float) -> Tensor:
    """Eq. (11) with the code's EMA: tau <- m tau + (1 - m) mean of the per-class maxima over the present
    classes (a class-balanced mean of maxima, not a mean confidence); unchanged when no class is present."""
    present = class_max >= 0
    increment = (class_max.clamp_min(0) * present).sum() / present.sum().clamp_min(1)
    return torch.where(present.any(), momentum * tau + (1 - momentum) * increment.to(tau.dtype), tau)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def soft_consistency(logits_s: Tensor, prob_w: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
    """L_u^s, Eq. (3): KL(P_w || P_s) = sum_c P_w (log P_w - log P_s) per pixel (I#3), with P_w detached,
    on pixels of F, summed and divided by the number of valid pixels."""
    kl = F.kl_div(logits_s.float().log_softmax(dim=1), prob_w.detach().float(), reduction="none").sum(dim=1)
    return (kl * keep).sum() / valid.sum().clamp_min(1)


def corrmatch_loss(loss_x: Tensor, loss_x_c: Tensor, loss_u_h: Tensor, loss_u_s: Tensor, loss_u_c: Tensor,
                   weights: tuple[float, float, float] = (0.5, 0.25, 0.25), loss_u_fp: Tensor | None = None) -> Tensor:
    """§3.4: L = (L_s + L_u) / 2, L_s = (L_s^h + L_s^c) / 2, L_u = l1 L_u^h + l2 L_u^s + l3 L_u^c (Eq. 12).
    With the code's FP stream, the hard term is the mean of the strong view's and the FP stream's CE."""
    hard = loss_u_h if loss_u_fp is None else (loss_u_h + loss_u_fp) / 2
    loss_s = (loss_x + loss_x_c) / 2
    loss_u = weights[0] * hard + weights[1] * loss_u_s + weights[2] * loss_u_c
    return (loss_s + loss_u) / 2


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
def deepest_feature_channels(model: nn.Module) -> int:
    """Channels of the last feature `model.encode` returns, from one small eval-mode pass without gradients
    (works for any encoder: CNN pyramids and ViT token maps alike)."""
    name = type(getattr(model, "backbone", model)).__name__
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad(), eval_mode(model):
        feats = model.encode(torch.zeros(2, 3, 64, 64, device=device))
    last = feats[-1] if isinstance(feats, (list, tuple)) and feats else None
    if not isinstance(last, Tensor) or last.dim() != 4:
        shape = tuple(last.shape) if isinstance(last, Tensor) else type(last).__name__
        raise ParamsError(
            f"method corrmatch: the deepest feature of encoder {name} is {shape}, but the correlation map needs a "
            "(B, C, h, w) feature map; choose a CNN encoder or a ViT with DPT (model.encoder)"
        )
    return int(last.shape[1])


@register_method("corrmatch")
class CorrMatch(Method):
    config_class = CorrMatchConfig

    def __init__(self, cfg: CorrMatchConfig, model: nn.Module, num_classes: int) -> None:
        super().__init__(cfg, model, num_classes)
        self.correlation = CorrelationHead(deepest_feature_channels(model), num_classes, cfg.corr_channels,
                                           cfg.corr_dropout)
        # float64: the 0.001 steps of the EMA stay exact enough over 10^5 iterations; in state dicts and checkpoints
        self.register_buffer("tau", torch.tensor(cfg.tau_init, dtype=torch.float64))

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        cfg = self.cfg
        if batch.u_w_mix is None or batch.u_s1_mix is None:
            raise ValueError("corrmatch needs the CutMix partner batch (u_w_mix, u_s1_mix) from the engine")
        size = tuple(batch.u_w.shape[-2:])
        valid_w = valid_or_all(batch.valid_u, batch.u_w)
        valid_mix = valid_or_all(batch.valid_u_mix, batch.u_w_mix)
        box = batch.box1.bool() if batch.box1 is not None else torch.zeros_like(valid_w)

        # Eval-mode labelling first, before a train-mode pass moves the BN running statistics
        logits_mix, _, _ = self._infer(batch.u_w_mix, with_corr=False)
        if not cfg.weak_labels_from_train_forward:
            logits_src, corr_src, feat_size = self._infer(batch.u_w, with_corr=True)

        # Train-mode forward of labeled + weak images: logits, (FP logits), correlation maps, z (Eq. 4-5)
        n_x = len(batch.x)
        feats = self.model.encode(torch.cat([batch.x, batch.u_w]))
        logits_xw, logits_fp = self._decode_weak(feats, size, n_x)
        corr_xw = self._correlate(feats[-1])
        z_x, z_w = propagate_pixels(logits_xw, corr_xw, tuple(feats[-1].shape[-2:]), size).split([n_x, len(batch.u_w)])
        logits_x, logits_w = logits_xw.split([n_x, len(batch.u_w)])
        if cfg.weak_labels_from_train_forward:
            logits_src, corr_src, feat_size = logits_w.detach(), corr_xw[n_x:].detach(), tuple(feats[-1].shape[-2:])

        # Dynamic threshold (Eq. 11), moved before any mask is built and used in this same step (code)
        if cfg.dynamic_tau:
            self.update_threshold(logits_src, valid_w)
        tau = float(self.tau)

        # Weak targets; region propagation off the CutMix box and the padding (Eq. 7-10)
        weak, pseudo, accepted = self._label(logits_src, corr_src, feat_size, tau, valid_w, valid_w & ~box)
        partner = Targets.of(select_confident(logits_mix, tau, valid_mix), valid_mix)
        weak_t = Targets.of(weak, valid_w)  # Y_w and F_w: the weak corr loss and the FP stream
        target_s = Targets.of(pseudo, valid_w).cutmix(partner, box)  # Y_prop and M of the strong view
        confident_s = weak_t.cutmix(partner, box).keep  # F of the strong view: the KL mask
        prob_w = logits_src.detach().float().softmax(dim=1)
        kl_target = prob_w if cfg.kl_unmixed_target else cutmix(prob_w, logits_mix.float().softmax(dim=1), box)

        # The single strong stream: CutMix with the partner's strong view, with the correlation branch
        feats_s = self.model.encode(paste(batch.u_s1, batch.u_s1_mix, box))
        logits_s = self.model.decode(feats_s, size)
        z_s = propagate_pixels(logits_s, self._correlate(feats_s[-1]), tuple(feats_s[-1].shape[-2:]), size)

        loss_x = labeled_ce(logits_x, batch.y)  # L_s^h
        loss_x_c = labeled_ce(z_x, batch.y)  # L_s^c, §3.2
        loss_u_h = unlabeled_ce(logits_s, target_s.label, target_s.keep, target_s.valid)  # Eq. (1)
        loss_u_s = soft_consistency(logits_s, kl_target, confident_s, target_s.valid)  # Eq. (3)
        loss_u_c = (unlabeled_ce(z_s, target_s.label, target_s.keep, target_s.valid)  # Eq. (6), code's mean
                    + unlabeled_ce(z_w, weak_t.label, weak_t.keep, weak_t.valid)) / 2
        loss_u_fp = None if logits_fp is None else unlabeled_ce(logits_fp, weak_t.label, weak_t.keep, weak_t.valid)
        weights = (cfg.lambda_hard, cfg.lambda_soft, cfg.lambda_corr)
        loss = corrmatch_loss(loss_x, loss_x_c, loss_u_h, loss_u_s, loss_u_c, weights, loss_u_fp)

        logs: dict[str, Any] = {
            "loss_x": loss_x.detach(),
            "loss_x_c": loss_x_c.detach(),
            "loss_u_h": loss_u_h.detach(),
            "loss_u_s": loss_u_s.detach(),
            "loss_u_c": loss_u_c.detach(),
            "mask_ratio": mask_ratio(weak_t.keep, valid_w),  # F: before region propagation
            "expanded_ratio": mask_ratio(pseudo.keep, valid_w),  # M: what L_u^h trains on (un-mixed view)
            "relabelled_ratio": mask_ratio(weak.keep & (pseudo.label != weak.label), valid_w),  # F overwritten
            "regions_accepted": accepted.sum() / len(batch.u_w),  # per image
            "tau": tau,
        }
        if loss_u_fp is not None:
            logs["loss_u_fp"] = loss_u_fp.detach()
        return StepOutput(loss=loss, logs=logs, pseudo=pseudo)

    @torch.no_grad()
    def update_threshold(self, logits_w: Tensor, valid: Tensor) -> None:
        """Eq. (11) on the weak view's logits; the per-class maxima are all-reduced over ranks, so every rank
        holds the tau of the global batch (the code all-gathers the logits)."""
        class_max = class_max_confidence(logits_w, valid, self.num_classes)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(class_max, op=dist.ReduceOp.MAX)
        self.tau.copy_(updated_threshold(self.tau, class_max, self.cfg.tau_momentum))

    def _correlate(self, feat: Tensor) -> Tensor:
        """C of a training forward; without `corr_grad_to_encoder` the feature is detached, so the correlation
        losses train the projection, w1 and w2 only (an ablation for warm starts, not the paper's path)."""
        return self.correlation(feat if self.cfg.corr_grad_to_encoder else feat.detach())

    def _decode_weak(self, feats: list[Tensor], size: tuple[int, int], n_x: int) -> tuple[Tensor, Tensor | None]:
        """Logits of labeled + weak images; with `fp_stream`, also the weak view's perturbed logits, decoded
        with the clean ones in one pass (UniMatch, `unimatch.py`)."""
        if not self.cfg.fp_stream:
            return self.model.decode(feats, size), None
        perturbed = feature_perturbation(feats, self.cfg.fp_dropout)
        joint = [torch.cat([clean, noisy]) for clean, noisy in zip(feats, perturbed, strict=True)]
        with bn_stats_frozen(self.model):
            clean, noisy = self.model.decode(joint, size).chunk(2)
        return clean, noisy[n_x:]

    @torch.no_grad()
    def _infer(self, images: Tensor, with_corr: bool) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """Eval-mode logits (and correlation map) of `images`, without gradients; the feature grid size."""
        with eval_mode(self):
            feats = self.model.encode(images)
            logits = self.model.decode(feats, tuple(images.shape[-2:]))
            corr = self.correlation(feats[-1]) if with_corr else None
        return logits, corr, tuple(feats[-1].shape[-2:])

    def _label(self, logits: Tensor, corr: Tensor, feat_size: tuple[int, int], tau: float, valid: Tensor,
               allowed: Tensor, generator: torch.Generator | None = None
               ) -> tuple[PseudoLabels, PseudoLabels, Tensor]:
        """The weak pseudo-label (Eq. 2), the same after region propagation (Eq. 7-10) with regions limited to
        `allowed`, and which sampled regions were accepted (B, n). Training and `pseudo_labels` both select
        through here."""
        weak = select_confident(logits, tau, valid)
        with timing.section("region_propagation"):  # its share of a step: `s4seg bench train`
            rows = sample_rows(corr, self.cfg.region_rows, feat_size, self.cfg.region_rows_replace, generator)
            masks = region_masks(rows, tuple(logits.shape[-2:])) & allowed[:, None]
            out = propagate_regions(masks, weak.label, weak.keep, tau, self.num_classes)
        prob = logits.detach().float().softmax(dim=1)
        extra = {CONFIDENT_LAYER: weak.keep, PRIOR_LABEL_LAYER: weak.label.to(torch.uint8),
                 "expanded": out.expanded,
                 "tau": torch.full((len(logits),), tau, device=logits.device)}
        propagated = PseudoLabels(label=out.label, conf=prob.gather(1, out.label[:, None]).squeeze(1),
                                  keep=out.expanded, regions=out.regions, extra=extra)
        return weak, propagated, out.accepted

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        """Propagated weak-view pseudo-labels of the eval-mode prediction with the current tau (never updated
        here); rows drawn from a fixed-seed generator (reproducible dumps, training RNG untouched)."""
        valid = valid_or_all(valid, images)
        logits, corr, feat_size = self._infer(images, with_corr=True)
        generator = torch.Generator(device=images.device).manual_seed(DUMP_REGION_SEED)
        return self._label(logits, corr, feat_size, float(self.tau), valid, valid, generator)[1]

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        with eval_mode(self.model):
            return self.model(images)
