"""RegionMatch: region classifier, pixel-region synergy pseudo-labels (PRSPL) and region correlations (RSCC).

Paper: RegionMatch, "Pixel-Region Collaboration for Semi-Supervised Semantic Segmentation in Remote Sensing
Images" (Zhu et al., Xidian University; no arXiv id, no public code), §3, Eq. (1)-(21), §4.1, Tables 4-7.
Spec of every ambiguity: `reference/regionmatch_ipixmatch.md` part A (A.1 modules and regions, A.2 one
iteration, A.3 resolutions, A.5 cost caps). Labels below: [P] paper, [R] that reference's proposed resolution.

One iteration, on the FixMatch stream of `fixmatch.py` (one strong view u_s1, CutMixed with the engine's
partner batch inside box1):
1. Weak side, no grad (`pseudo_labels`): pixel distribution q^p of the weak view, y_hat = argmax; regions
   r = connected components of y_hat; region features R_i = h(MAP(F, i)) of the decoder embedding F;
   region distribution q^r_i = softmax f_r(R_i), painted on its pixels; PRSPL mask M (Eq. 9-17).
2. CutMix transport of y_hat, M, q^p, confidence and region ids into the strong frame.
3. L_all = L_p^l + L_p^u + L_r + lambda_1 L_CIR + lambda_2 L_PR (Eq. 4; a plain sum, [R] A.2 step 7), with
   L_p^u the CE of the strong view on M, over the valid-pixel count (Eq. 16), L_r = mean_l L_r^l +
   lambda mean_u L_r^u (Eq. 5-8), L_CIR the MSE of weak/strong region cosine matrices (Eq. 18-19) and L_PR
   the pixel-to-region distance inside the selected regions (Eq. 20-21).

Choices (paper silent or ambiguous), each with its switch where one exists:
- Regions [R A.1]: connected components per class, 8-connectivity, of the ground truth (labeled tiles) and
  of y_hat (unlabeled), with `s4seg.evaluation.regions.pseudo_regions` (the dump's convention); ignore and
  padding pixels join no region. Run on the CPU, per tile, once per batch; every term reuses them.
- Features and heads [R A.1]: F is the decoder embedding before the pixel classifier f_p (`decode(...,
  return_embedding=True)`; DeepLabV3+: 256 channels at stride 4). h = Linear(d, 256)-ReLU-Linear(256, 256),
  no BN (region counts vary); f_r = Linear(256, K). Both train in the 'head' LR group.
- Masked average pooling [R A.1]: pixel (y, x) lies in feature cell (floor(y h/H), floor(x w/W)) (nearest
  upsampling of F), so MAP_i = sum_c w_ic F_c / sum_c w_ic with w_ic the region's pixels in cell c. Built once
  per region map as (region, cell, count) triplets, run-length encoded over the pixels taken cell by cell
  (no sort: `torch.unique` is slow on the CPU; a pair may repeat, sums do not care); pooling is one gather +
  index_add, no Python loop over regions and no upsampled F.
- Minimum size [R A.1]: PRSPL uses every region; L_r, CIR2R and PRCC only regions of at least
  `min_region_cells` feature cells (4 cells = 64 px at stride 4, the reference's A_min), counted on the
  visible part in the strong frame.
- Pseudo-labels: from the inference stream (eval-mode BN, no grad), which the dump also writes, as in
  `fixmatch.py`; `weak_labels_from_train_forward: true` takes them from the detached weak half of a
  train-mode labeled + weak pass (UniMatch code's FixMatch, [R] A.3.1). No EMA teacher [R A.2 step 2].
- Confidence gate [R A.3.2]: M replaces the fixed tau of Eq. (3) entirely. `prspl: false` (Table 4 without
  PRSPL) uses the fixed mask conf >= `conf_thresh` instead.
- q^r per pixel [R A.3.4]: each region's softmax painted on its pixels, so H^r is constant in a region.
- Quantiles [R A.3.5]: T^p, T^r of Eq. (13)-(14) per image over its valid pixels, the k-th smallest with
  k = ceil((1 - alpha_t) n); ties at T are kept (<=). `quantile_scope: batch` pools the batch (U2PL).
- Schedule [P Eq. 15, R A.3.6]: alpha_t = alpha_0 (1 - t / total) as written, so the entropy filter loosens
  during training; t / total is the step fraction (continuous, where the paper counts whole epochs).
  `alpha_schedule: fixed` keeps alpha_0 (Table 6 "fixed"); `inverse` = alpha_0 t / total (Table 6's text:
  permissive early, strict late). The total comes from `self.total_steps`, which the engine sets before
  training; 0 (unset) keeps alpha_0 and logs a warning. The current alpha_t is a buffer, so the dump of a
  trained model selects with the alpha of its last training step.
- Agreement [P Eq. 17]: M = [H^r <= T^r] and [H^p <= T^p] and [argmax q^r = y_hat] and valid.
- Eq. (16) normalisation [R A.3.7]: sum over kept pixels / valid pixels, as `losses.unlabeled_ce`.
- Region targets [R A.3.8-9]: c_bar = mean max-softmax over the region's visible pixels, q_tilde = mean q^p;
  I = {c_bar >= tau_low}; hard (argmax q_tilde) where c_bar >= tau_high (Eq. 7's >=, not the text's >),
  soft CE against q_tilde between. Weak targets, strong-view region features. Means per image, then over
  images (Eq. 8's 1/N sums; an image without regions counts as 0). `region_labels: hard | soft` = Table 7.
- CutMix [R A.2 step 6, A.3.10]: a region cut by the box keeps one id for its visible part; its weak
  features are pooled from each visible pixel's source image (own weak view outside the box, the partner's
  inside), so weak and strong region sets are the same for CIR2R.
- CIR2R [R A.3.10-11]: one cosine matrix per batch over the regions of all its images (>= min size), the
  weak side detached, MSE = mean over the matrix entries. Capped at `max_regions` (N_max, A.5): over the
  cap, a uniform sample without replacement (`torch.randperm`, so deterministic given torch's RNG), the
  same regions on both sides, in id order.
- PRCC [R A.3.12-13]: L2-normalised, un-projected strong features F_hat; proxy mu_i = normalised weighted
  mean of F_hat over the region; d_ic = ||mu_i - F_hat_c|| (>= 1e-8), averaged over the region's pixels
  (area weights), then over the regions in I of the batch. -log e^{-d} = d, so Eq. (21) is this distance;
  the paper's plain sum over pixels would grow with region area. No detach.
- Total loss: the plain sum of Eq. (4). `halve_loss: true` divides it by 2 (the UniMatch code's
  (L_x + L_u) / 2); with every RegionMatch term off the run is exactly `fixmatch.py` with the same
  `halve_loss`.
- Ablations (`dvc exp run -S methods.regionmatch.<key>=false`): `prspl`, `cir2r`, `prcc` (Table 4),
  `region_cls_labeled`, `region_cls_unlabeled` (Table 5); each removes its term only. Table 4's rows keep
  the region classification (PRSPL needs f_r); its "none" row (FixMatch) is all five off.

`pseudo_labels` also returns the region ids (`regions`: int32 ids over the batch, -1 = none; the dump
renumbers them 1..n per tile) and, in `extra`, the region classifier's class (`region_classifier_label`,
uint8, 255 = no region) and confidence (`region_classifier_conf`) painted per pixel, and the PRSPL mask
(`prspl_mask`); `keep` is the mask the pixel loss trains on (M, or the fixed one with `prspl: false`).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s4seg import timing
from s4seg.config import IGNORE_INDEX
from s4seg.engine.method import Batch, Method, MethodConfig, PseudoLabels, StepOutput, register_method
from s4seg.errors import ParamsError
from s4seg.evaluation.regions import pseudo_regions
from s4seg.methods.losses import check_common, eval_mode, labeled_ce, mask_ratio, paste, unlabeled_ce, valid_or_all

log = logging.getLogger(__name__)

ALPHA_SCHEDULES = ("linear_decay", "fixed", "inverse")
QUANTILE_SCOPES = ("image", "batch")
REGION_LABELS = ("hard_soft", "hard", "soft")
NO_REGION_CLASS = 255  # `region_classifier_label` of pixels in no region


@dataclass(frozen=True)
class RegionMatchConfig(MethodConfig):
    tau_low: float = 0.85  # Eq. (6), §4.1
    tau_high: float = 0.95  # Eq. (7), §4.1
    lambda_u: float = 0.5  # lambda of Eq. (8): weight of the unlabeled region loss
    lambda_cir: float = 2.0  # lambda_1 of Eq. (4), §4.1
    lambda_pr: float = 1.0  # lambda_2 of Eq. (4), §4.1
    alpha0: float = 0.2  # alpha_0 of Eq. (15), §4.1 "20%"
    alpha_schedule: str = "linear_decay"  # Eq. (15) | fixed (Table 6) | inverse (Table 6's text)
    quantile_scope: str = "image"  # Eq. (13)-(14) over one image's pixels | batch (U2PL's percentile)
    prspl: bool = True  # Table 4; false: the fixed mask conf >= conf_thresh of Eq. (3)
    conf_thresh: float = 0.95  # tau of Eq. (3), only with prspl off (FixMatch's value, reference A.3.1)
    cir2r: bool = True  # Table 4
    prcc: bool = True  # Table 4
    region_cls_labeled: bool = True  # Table 5: L_r^l
    region_cls_unlabeled: bool = True  # Table 5: L_r^u
    region_labels: str = "hard_soft"  # Table 7: hard_soft | hard | soft
    min_region_cells: float = 4.0  # A_min in feature cells for L_r, CIR2R, PRCC (64 px at stride 4; ref. A.1)
    max_regions: int = 1024  # N_max: regions per batch in CIR2R (reference A.5)
    projection_dim: int = 256  # width of h (reference A.1)
    cutmix_partner: str = "batch"  # batch (engine's partner batch) | flip (reversed batch)
    weak_labels_from_train_forward: bool = False  # true: detached weak half of a train-mode labeled+weak pass
    halve_loss: bool = False  # true: L_all / 2, the UniMatch code's (all terms off = FixMatch, same halve_loss)

    def __post_init__(self) -> None:
        check_common(self.conf_thresh, self.cutmix_partner)
        if not 0.0 <= self.tau_low <= self.tau_high <= 1.0:
            raise ParamsError(f"need 0 <= tau_low <= tau_high <= 1, found {self.tau_low!r} and {self.tau_high!r}")
        if not 0.0 <= self.alpha0 <= 1.0:
            raise ParamsError(f"alpha0 must be in [0, 1], found {self.alpha0!r}")
        for key, value, choices in (("alpha_schedule", self.alpha_schedule, ALPHA_SCHEDULES),
                                    ("quantile_scope", self.quantile_scope, QUANTILE_SCOPES),
                                    ("region_labels", self.region_labels, REGION_LABELS)):
            if value not in choices:
                raise ParamsError(f"{key} must be one of {', '.join(choices)}, found {value!r}")
        for key in ("lambda_u", "lambda_cir", "lambda_pr", "min_region_cells"):
            if getattr(self, key) < 0:
                raise ParamsError(f"{key} must be >= 0, found {getattr(self, key)!r}")
        if self.max_regions < 2:
            raise ParamsError(f"max_regions must be >= 2 (a similarity matrix needs two regions), "
                              f"found {self.max_regions!r}")
        if self.projection_dim < 1:
            raise ParamsError(f"projection_dim must be >= 1, found {self.projection_dim!r}")


# --------------------------------------------------------------------------------------------------
# Regions and masked average pooling
# --------------------------------------------------------------------------------------------------
def connected_regions(labels: Tensor, valid: Tensor) -> tuple[Tensor, int]:
    """Connected components of each (H, W) label map of a batch (`pseudo_regions`: per class, 8-connected).

    Returns (B, H, W) int64 ids numbered over the batch, tile b's after tile b-1's (0..n-1 in raster
    order of each region's first pixel), -1 on invalid pixels; and n. Runs on the CPU (scikit-image).
    """
    with timing.section("connected_components"):  # its share of a step: `s4seg bench train`
        labels_np = labels.detach().cpu().numpy()
        valid_np = valid.detach().cpu().numpy()
        ids = np.empty(labels_np.shape, dtype=np.int64)
        offset = 0
        for b in range(labels_np.shape[0]):
            local = pseudo_regions(labels_np[b], valid_np[b])  # 1..n_b, 0 = none
            ids[b] = np.where(local > 0, local.astype(np.int64) - 1 + offset, -1)
            offset += int(local.max(initial=0))
        return torch.from_numpy(ids).to(labels.device), offset


def pixel_cells(shape: tuple[int, int, int], feature_size: tuple[int, int], device: torch.device) -> Tensor:
    """(B, H, W) int64 row of each pixel's feature cell in a (B * h * w, D) feature matrix: pixel (y, x) of
    image b lies in cell (floor(y h / H), floor(x w / W)), i.e. nearest upsampling of the feature map."""
    b, height, width = shape
    h, w = feature_size
    ys = torch.arange(height, device=device) * h // height
    xs = torch.arange(width, device=device) * w // width
    within = ys[:, None] * w + xs[None, :]  # (H, W)
    return torch.arange(b, device=device)[:, None, None] * (h * w) + within


def cell_order(shape: tuple[int, int, int], feature_size: tuple[int, int], device: torch.device) -> Tensor:
    """A permutation of the B * H * W pixels that puts the pixels of each feature cell next to each other
    (cell by cell, raster order inside a cell), so that `region_cells` finds few runs per cell."""
    _, height, width = shape
    order = torch.from_numpy(_cell_order_of_one_image(height, width, *feature_size)).to(device)
    return (torch.arange(shape[0], device=device)[:, None] * (height * width) + order).reshape(-1)


@functools.lru_cache(maxsize=16)
def _cell_order_of_one_image(height: int, width: int, h: int, w: int) -> np.ndarray:
    within = pixel_cells((1, height, width), (h, w), torch.device("cpu")).reshape(-1).numpy()
    return np.argsort(within, kind="stable")  # numpy: torch's CPU sort is much slower


def with_none_as_last(regions: Tensor, num_regions: int) -> Tensor:
    """Region ids with "no region" (-1) mapped to an extra id `num_regions`, so that scatter and gather
    ops run over every pixel (no boolean indexing over pixels) and the extra row is dropped afterwards."""
    return torch.where(regions >= 0, regions, num_regions)


@dataclass(frozen=True)
class RegionCells:
    """Where each region lies on a feature map: (region, cell, pixel count w_ic) triplets. A pair may
    appear in several triplets (a region that leaves a cell and comes back): sums over triplets are
    unaffected."""

    region: Tensor  # (P,) int64 region id
    cell: Tensor  # (P,) int64 row of the flattened (cells, D) feature matrix
    pixels: Tensor  # (P,) float32 pixels of the region in that cell
    area: Tensor  # (N,) float32 pixels of each region
    num_regions: int


def region_cells(regions: Tensor, cells: Tensor, num_regions: int, order: Tensor | None = None) -> RegionCells:
    """The (region, cell, count) triplets of a region map (ids 0..n-1, -1 = none) and its pixel-to-cell map:
    runs of equal (cell, region) along `order` (`cell_order`; raster order if None, which gives more runs).
    Run-length encoding instead of a sort (`torch.unique` is slow on the CPU); every step is vectorised."""
    r = with_none_as_last(regions, num_regions).reshape(-1)
    c = cells.reshape(-1)
    if order is not None:
        r, c = r[order], c[order]
    keys, counts = torch.unique_consecutive(c * (num_regions + 1) + r, return_counts=True)
    region, cell = keys % (num_regions + 1), keys // (num_regions + 1)
    real = region < num_regions  # drop the runs of "no region" (few: one per cell at most)
    region, cell, pixels = region[real], cell[real], counts[real].float()
    area = torch.zeros(num_regions, device=regions.device).index_add_(0, region, pixels)
    return RegionCells(region=region, cell=cell, pixels=pixels, area=area, num_regions=num_regions)


def regions_on_features(regions: Tensor, feature_size: tuple[int, int], num_regions: int,
                        from_partner: Tensor | None = None) -> RegionCells:
    """`region_cells` of a (B, H, W) region map on (B, D, h, w) features. With `from_partner` (B, H, W) bool,
    those pixels read the second half of stacked [own; partner] features (2B, D, h, w) instead."""
    shape = tuple(regions.shape)
    cells = pixel_cells(shape, feature_size, regions.device)
    if from_partner is not None:
        cells = cells + from_partner.long() * (shape[0] * feature_size[0] * feature_size[1])
    return region_cells(regions, cells, num_regions, cell_order(shape, feature_size, regions.device))


def masked_average_pool(features: Tensor, cells: RegionCells) -> Tensor:
    """MAP of §3.3: (B, D, h, w) features -> (N, D) region means, sum_c w_ic F_c / sum_c w_ic (reference A.1)."""
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    weighted = flat[cells.cell] * cells.pixels[:, None].to(flat.dtype)
    sums = flat.new_zeros(cells.num_regions, flat.shape[1]).index_add(0, cells.region, weighted)
    return sums / cells.area.clamp_min(1).to(flat.dtype)[:, None]


def region_pixel_mean(values: Tensor, regions: Tensor, num_regions: int) -> Tensor:
    """(B, C, H, W) per-pixel values -> (N, C) means over each region's pixels (c_bar, q_tilde of Eq. 6-7)."""
    ids = with_none_as_last(regions, num_regions).reshape(-1)
    per_pixel = values.permute(0, 2, 3, 1).reshape(-1, values.shape[1])
    sums = per_pixel.new_zeros(num_regions + 1, values.shape[1]).index_add_(0, ids, per_pixel)[:num_regions]
    counts = torch.bincount(ids, minlength=num_regions + 1)[:num_regions]
    return sums / counts.clamp_min(1)[:, None].to(sums.dtype)


def region_value(values: Tensor, regions: Tensor, num_regions: int) -> Tensor:
    """(N,) value of a (B, H, W) map that is constant over each region (its class, its image index)."""
    ids = with_none_as_last(regions, num_regions).reshape(-1)
    return values.new_zeros(num_regions + 1).scatter_(0, ids, values.reshape(-1))[:num_regions]


def paint(values: Tensor, regions: Tensor, fill: float) -> Tensor:
    """(N, ...) per-region values -> (B, H, W, ...) per pixel; `fill` on pixels in no region."""
    table = torch.cat([values, values.new_full((1, *values.shape[1:]), fill)])
    return table[with_none_as_last(regions, len(values))]


def image_of_pixels(regions: Tensor) -> Tensor:
    """(B, H, W) int64 batch index of every pixel (to find each region's image)."""
    return torch.arange(regions.shape[0], device=regions.device)[:, None, None].expand_as(regions)


# --------------------------------------------------------------------------------------------------
# Losses and the PRSPL selection
# --------------------------------------------------------------------------------------------------
def entropy(logp: Tensor, dim: int = 1) -> Tensor:
    """H of Eq. (9)-(10): -sum_c q(c) log q(c), from log-probabilities (0 log 0 = 0)."""
    return -(logp.exp() * logp).sum(dim)


def dynamic_alpha(alpha0: float, step: int, total_steps: int, schedule: str = "linear_decay") -> float:
    """alpha_t of Eq. (15): alpha_0 (1 - t / total) with t / total the share of training done (0 if unknown)."""
    progress = min(step / total_steps, 1.0) if total_steps > 0 else 0.0
    if schedule == "linear_decay":
        return alpha0 * (1.0 - progress)
    if schedule == "fixed":
        return alpha0
    if schedule == "inverse":
        return alpha0 * progress
    raise ValueError(f"alpha_schedule {schedule!r} is not one of {', '.join(ALPHA_SCHEDULES)}")


def entropy_quantile(values: Tensor, valid: Tensor, q: float, scope: str = "image") -> Tensor:
    """T of Eq. (13)-(14): the q-quantile of (B, H, W) `values` over valid pixels, per image (or over the
    batch), as the k-th smallest value with k = ceil(q n). Returns (B, 1, 1); +inf for an image without
    valid pixels (nothing to select there anyway)."""
    b = values.shape[0]
    flat = values.reshape(b, -1).masked_fill(~valid.reshape(b, -1), math.inf)
    if scope == "batch":
        flat = flat.reshape(1, -1)
    n = (flat < math.inf).sum(1)
    k = torch.ceil(q * n.double() - 1e-9).long().clamp(1, flat.shape[1])  # the guard absorbs q n = 3.0000000000000004
    # one selection per row (B rows at most), no sort: invalid pixels are +inf and k <= n
    threshold = torch.stack([row.kthvalue(int(kk)).values for row, kk in zip(flat, k.tolist(), strict=True)])
    return threshold.expand(b).reshape(b, 1, 1) if scope == "batch" else threshold.reshape(b, 1, 1)


def prspl_mask(entropy_pixel: Tensor, entropy_region: Tensor, label_pixel: Tensor, label_region: Tensor,
               valid: Tensor, alpha: float, scope: str = "image") -> Tensor:
    """M of Eq. (17): low entropy in both views (Eq. 11-14, (1 - alpha)-quantiles) and the same class.

    All inputs (B, H, W): pixel-view entropy H^p and class argmax q^p, region-view entropy H^r and class
    argmax q^r painted per pixel, and the valid mask (pixels in a region).
    """
    t_pixel = entropy_quantile(entropy_pixel, valid, 1.0 - alpha, scope)
    t_region = entropy_quantile(entropy_region, valid, 1.0 - alpha, scope)
    return (entropy_pixel <= t_pixel) & (entropy_region <= t_region) & (label_pixel == label_region) & valid


def region_targets(mean_conf: Tensor, mean_prob: Tensor, tau_low: float, tau_high: float,
                   labels: str = "hard_soft") -> tuple[Tensor, Tensor, Tensor]:
    """Eq. (6)-(7): the selected regions I (c_bar >= tau_low), the hard ones (c_bar >= tau_high) and the
    target distribution of each region: one-hot argmax q_tilde where hard, q_tilde itself where soft.
    `labels` hard (soft) makes every region of I hard (soft), Table 7."""
    selected = mean_conf >= tau_low
    hard = {"hard_soft": selected & (mean_conf >= tau_high), "hard": selected, "soft": torch.zeros_like(selected)}[
        labels]
    one_hot = F.one_hot(mean_prob.argmax(1), mean_prob.shape[1]).to(mean_prob.dtype)
    return selected, hard, torch.where(hard[:, None], one_hot, mean_prob)


def region_ce(logits: Tensor, target: Tensor) -> Tensor:
    """l_ce of Eq. (5) and (7) per region: -sum_c target_c log softmax(f_r(R))_c (hard = one-hot target)."""
    return -(target * logits.float().log_softmax(1)).sum(1)


def per_image_mean(values: Tensor, image: Tensor, num_images: int) -> Tensor:
    """Mean over each image's regions (0 for an image with none), then over the images: Eq. (5), (7), (8)."""
    sums = values.new_zeros(num_images).index_add(0, image, values)
    counts = torch.bincount(image, minlength=num_images).clamp_min(1).to(values.dtype)
    return (sums / counts).mean()


def cir2r_loss(weak: Tensor, strong: Tensor) -> Tensor:
    """L_CIR, Eq. (18)-(19): cosine-similarity matrices S^w (detached) and S^s of the same N regions,
    mean squared difference over the N x N entries (0 for no region)."""
    if weak.shape[0] == 0:
        return strong.sum() * 0.0
    with torch.autocast(device_type=strong.device.type, enabled=False):  # float32 similarities under AMP
        w = F.normalize(weak.detach().float(), dim=1)
        s = F.normalize(strong.float(), dim=1)
        return ((w @ w.T - s @ s.T) ** 2).mean()


def prcc_loss(features: Tensor, cells: RegionCells, selected: Tensor) -> Tensor:
    """L_PR, Eq. (20)-(21): -log e^{-d} = d, the distance of each L2-normalised pixel feature to its region's
    proxy mu_i (normalised weighted mean), averaged over the region's pixels, then over the selected regions."""
    if not bool(selected.any()):
        return features.sum() * 0.0
    with torch.autocast(device_type=features.device.type, enabled=False):
        flat = F.normalize(features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1]), dim=1)
        pairs = selected[cells.region]
        region, cell, pixels = cells.region[pairs], cells.cell[pairs], cells.pixels[pairs]
        f_hat = flat[cell]  # (P, D)
        proxy = F.normalize(flat.new_zeros(cells.num_regions, flat.shape[1]).index_add(
            0, region, f_hat * pixels[:, None]), dim=1)
        distance = (proxy[region] - f_hat).pow(2).sum(1).clamp_min(1e-16).sqrt()  # d >= 1e-8: finite gradient
        per_region = flat.new_zeros(cells.num_regions).index_add(0, region, distance * pixels)
        return (per_region[selected] / cells.area[selected]).mean()


def cap_regions(candidates: Tensor, max_regions: int) -> Tensor:
    """At most `max_regions` of the candidate ids: all of them, or a uniform sample without replacement
    (torch's RNG), kept in id order."""
    if candidates.numel() <= max_regions:
        return candidates
    chosen = torch.randperm(candidates.numel(), device=candidates.device)[:max_regions]
    return candidates[chosen.sort().values]


def region_match_loss(loss_p_l: Tensor, loss_p_u: Tensor, loss_r: Tensor, loss_cir: Tensor, loss_pr: Tensor,
                      lambda_cir: float, lambda_pr: float) -> Tensor:
    """Eq. (4) with Eq. (1): L_all = L_p^l + L_p^u + L_r + lambda_1 L_CIR + lambda_2 L_PR."""
    return loss_p_l + loss_p_u + loss_r + lambda_cir * loss_cir + lambda_pr * loss_pr


# --------------------------------------------------------------------------------------------------
# The weak view's quantities and their CutMix transport to the strong frame
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeakView:
    """What the weak view gives the strong one (no grad), in the weak image's frame."""

    prob: Tensor  # (B, K, H, W) q^p
    label: Tensor  # (B, H, W) int64 y_hat
    conf: Tensor  # (B, H, W) max q^p
    valid: Tensor  # (B, H, W) bool
    keep: Tensor  # (B, H, W) bool: M of Eq. (17), or conf >= tau with prspl off
    prspl: Tensor  # (B, H, W) bool: M of Eq. (17) (all False with prspl off)
    regions: Tensor  # (B, H, W) int64 ids 0..n-1 over the batch, -1 = none
    region_prob: Tensor  # (n, K) q^r_i
    embedding: Tensor  # (B, D, h, w) F of the weak view

    def flipped(self) -> WeakView:
        """The batch reversed (the 'flip' CutMix partner); region ids keep pointing at `region_prob`."""
        return WeakView(**{k: (v if k == "region_prob" else v.flip(0)) for k, v in vars(self).items()})

    def pseudo_labels(self) -> PseudoLabels:
        conf_r, label_r = self.region_prob.max(1)
        return PseudoLabels(
            label=self.label, conf=self.conf, keep=self.keep, regions=self.regions.to(torch.int32),
            extra={"region_classifier_label": paint(label_r.to(torch.uint8), self.regions, NO_REGION_CLASS),
                   # painted in fp32, stored as fp16: autocast's torch.cat rejects fp16 inside a bf16 region
                   "region_classifier_conf": paint(conf_r.float(), self.regions, 0.0).to(torch.float16),
                   "prspl_mask": self.prspl},
        )


@dataclass(frozen=True)
class StrongTargets:
    """The weak view's targets CutMixed into the strong frame (pixels inside the box come from the partner)."""

    label: Tensor  # (B, H, W)
    keep: Tensor  # (B, H, W) bool
    valid: Tensor  # (B, H, W) bool
    regions: Tensor  # (B, H, W) ids 0..m-1 of the visible regions, -1 = none
    mean_conf: Tensor  # (m,) c_bar over the visible pixels
    mean_prob: Tensor  # (m, K) q_tilde over the visible pixels
    image: Tensor  # (m,) image of each region
    weak_features: Tensor  # (2B, D, h, w): the own weak features, then the partner's
    weak_cells: RegionCells  # regions on `weak_features`, each pixel in its source image


def transport(own: WeakView, partner: WeakView, box: Tensor | None) -> StrongTargets:
    """CutMix of y_hat, M, q^p, confidence and region ids with the strong view's box (reference A.2 step 6).

    A region keeps one id for its visible part; partner regions get ids after the own ones; ids are then
    renumbered 0..m-1 over the regions that are still visible.
    """
    box = torch.zeros_like(own.valid) if box is None else box.bool()
    n_own = own.region_prob.shape[0]
    partner_ids = torch.where(partner.regions >= 0, partner.regions + n_own, -1)
    mixed = torch.where(box, partner_ids, own.regions)
    n_all = n_own + partner.region_prob.shape[0]
    seen = torch.bincount(with_none_as_last(mixed, n_all).reshape(-1), minlength=n_all + 1)[:n_all] > 0
    new_id = torch.cat([seen.long().cumsum(0) - 1, mixed.new_full((1,), -1)])  # visible ids keep their order
    regions = new_id[with_none_as_last(mixed, n_all)]
    m = int(seen.sum())
    conf = torch.where(box, partner.conf, own.conf)
    prob = torch.where(box[:, None], partner.prob, own.prob)
    means = region_pixel_mean(torch.cat([prob, conf[:, None]], 1), regions, m)
    return StrongTargets(
        label=torch.where(box, partner.label, own.label),
        keep=torch.where(box, partner.keep, own.keep),
        valid=torch.where(box, partner.valid, own.valid),
        regions=regions,
        mean_conf=means[:, -1],
        mean_prob=means[:, :-1],
        image=region_value(image_of_pixels(regions), regions, m),
        weak_features=torch.cat([own.embedding, partner.embedding]),
        weak_cells=regions_on_features(regions, tuple(own.embedding.shape[-2:]), m, from_partner=box),
    )


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
@register_method("regionmatch")
class RegionMatch(Method):
    config_class = RegionMatchConfig
    # Optimiser steps of the run, for alpha_t (Eq. 15); the engine sets it before training. 0 = unknown.
    total_steps: int = 0

    def __init__(self, cfg: RegionMatchConfig, model: nn.Module, num_classes: int) -> None:
        super().__init__(cfg, model, num_classes)
        d, p = embedding_dim(model), cfg.projection_dim
        self.projection = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Linear(p, p))  # h
        self.region_classifier = nn.Linear(p, num_classes)  # f_r
        # alpha_t of the last training step (saved with the model: the dump selects with it)
        self.register_buffer("alpha_t", torch.tensor(float(cfg.alpha0)))
        self._warned_no_total = False

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        cfg = self.cfg
        self.alpha_t.fill_(self._alpha(step))
        valid_w = valid_or_all(batch.valid_u, batch.u_w)
        # Eval-mode labelling first, before a train-mode pass updates the BN running statistics
        partner = self._label_partner(batch)
        if cfg.weak_labels_from_train_forward:
            logits, emb = self._forward(torch.cat([batch.x, batch.u_w]))
            sizes = [len(batch.x), len(batch.u_w)]
            (logits_x, logits_w), (emb_x, emb_w) = logits.split(sizes), emb.split(sizes)
            weak = self._weak_view(logits_w.detach(), emb_w.detach(), valid_w)
        else:
            weak = self._label(batch.u_w, valid_w)
            logits_x, emb_x = self._forward(batch.x)
        if partner is None:  # "flip": the reversed batch
            partner, partner_s1 = weak.flipped(), batch.u_s1.flip(0)
        else:
            partner_s1 = batch.u_s1_mix
        target = transport(weak, partner, batch.box1)
        logits_s, emb_s = self._forward(paste(batch.u_s1, partner_s1, batch.box1))

        loss_p_l = labeled_ce(logits_x, batch.y)  # Eq. (2)
        loss_p_u = unlabeled_ce(logits_s, target.label, target.keep, target.valid)  # Eq. (16)
        zero = logits_s.new_zeros((), dtype=torch.float32)
        loss_r_l, region_acc_l = self._labeled_region_loss(emb_x, batch.y) if cfg.region_cls_labeled else (zero, zero)
        loss_r_u, loss_cir, loss_pr, stats = self._unlabeled_region_losses(emb_s, target)
        loss_r = loss_r_l + cfg.lambda_u * loss_r_u  # Eq. (8)
        loss = region_match_loss(loss_p_l, loss_p_u, loss_r, loss_cir, loss_pr, cfg.lambda_cir, cfg.lambda_pr)
        if cfg.halve_loss:
            loss = loss / 2
        logs: dict[str, Any] = {
            "loss_p_l": loss_p_l.detach(), "loss_p_u": loss_p_u.detach(), "loss_r": loss_r.detach(),
            "loss_r_l": loss_r_l.detach(), "loss_r_u": loss_r_u.detach(), "loss_cir": loss_cir.detach(),
            "loss_pr": loss_pr.detach(), "mask_ratio": mask_ratio(weak.keep, weak.valid),
            "alpha_t": float(self.alpha_t), "region_acc_l": region_acc_l,
            "regions_per_image": weak.region_prob.shape[0] / len(batch.u_w), **stats,
        }  # fmt: skip
        return StepOutput(loss=loss, logs=logs, pseudo=weak.pseudo_labels())

    # Region losses ---------------------------------------------------------------------------------
    def _labeled_region_loss(self, emb_x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """L_r^l, Eq. (5): regions of the ground truth (>= min size), hard CE of f_r(h(MAP(F_l))); and the
        region classifier's accuracy on them (a log)."""
        regions, n = connected_regions(y, y != IGNORE_INDEX)
        cells = regions_on_features(regions, tuple(emb_x.shape[-2:]), n)
        chosen = (cells.area >= self._min_area(y, emb_x)).nonzero().squeeze(1)
        classes = region_value(y, regions, n)[chosen]
        image = region_value(image_of_pixels(regions), regions, n)[chosen]
        logits_r = self.region_classifier(self.projection(masked_average_pool(emb_x.float(), cells)[chosen]))
        target = F.one_hot(classes, self.num_classes).float()
        accuracy = (logits_r.detach().argmax(1) == classes).float().sum() / max(len(chosen), 1)
        return per_image_mean(region_ce(logits_r, target), image, len(y)), accuracy

    def _unlabeled_region_losses(self, emb_s: Tensor, target: StrongTargets) -> tuple[Tensor, Tensor, Tensor,
                                                                                       dict[str, Any]]:
        """L_r^u (Eq. 6-7), L_CIR (Eq. 18-19) and L_PR (Eq. 20-21) on the strong frame's regions, and logs."""
        cfg = self.cfg
        zero = emb_s.new_zeros((), dtype=torch.float32)
        if not (cfg.region_cls_unlabeled or cfg.cir2r or cfg.prcc):
            return zero, zero, zero, {}
        cells = regions_on_features(target.regions, tuple(emb_s.shape[-2:]), target.weak_cells.num_regions)
        large = (cells.area >= self._min_area(target.regions, emb_s)).nonzero().squeeze(1)  # (E,)
        selected, hard, soft_or_hard = region_targets(target.mean_conf[large], target.mean_prob[large],
                                                      cfg.tau_low, cfg.tau_high, cfg.region_labels)
        if cfg.region_cls_unlabeled or cfg.cir2r:
            projected = self.projection(masked_average_pool(emb_s.float(), cells)[large])  # R^s, (E, p)
        loss_r_u = loss_cir = loss_pr = zero
        if cfg.region_cls_unlabeled:
            ce = region_ce(self.region_classifier(projected[selected]), soft_or_hard[selected])
            loss_r_u = per_image_mean(ce, target.image[large][selected], len(target.regions))
        cir = cap_regions(torch.arange(len(large), device=emb_s.device), cfg.max_regions)
        if cfg.cir2r:
            with torch.no_grad():
                weak_pooled = masked_average_pool(target.weak_features.float(), target.weak_cells)
                weak_projected = self.projection(weak_pooled[large[cir]])  # R^w, detached
            loss_cir = cir2r_loss(weak_projected, projected[cir])
        if cfg.prcc:
            in_i = torch.zeros(cells.num_regions, dtype=torch.bool, device=emb_s.device)
            in_i[large[selected]] = True
            loss_pr = prcc_loss(emb_s, cells, in_i)
        stats = {
            "regions_large": len(large) / len(target.regions),  # per image, >= min size (strong frame)
            "region_selected_share": selected.float().sum() / max(len(large), 1),  # |I| / large regions
            "region_hard_share": hard.float().sum() / selected.float().sum().clamp_min(1),
            "cir_regions": float(len(cir)),
        }
        return loss_r_u, loss_cir, loss_pr, stats

    # Pseudo-labels ---------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        """y_hat, its confidence and the PRSPL mask M (Eq. 17) with the current alpha_t; region ids and the
        region classifier's class, confidence and M per pixel in `extra`."""
        return self._label(images, valid_or_all(valid, images)).pseudo_labels()

    @torch.no_grad()
    def _label(self, images: Tensor, valid: Tensor) -> WeakView:
        with eval_mode(self.model):
            logits, emb = self._forward(images)
        return self._weak_view(logits, emb, valid)

    @torch.no_grad()
    def _weak_view(self, logits: Tensor, embedding: Tensor, valid: Tensor) -> WeakView:
        """Steps 5a-d of reference A.2 on one weak batch: q^p, y_hat, regions, q^r and the mask M."""
        logp = logits.float().log_softmax(1)
        prob = logp.exp()
        conf, label = prob.max(1)
        regions, n = connected_regions(label, valid)
        cells = regions_on_features(regions, tuple(embedding.shape[-2:]), n)
        region_logp = self.region_classifier(self.projection(masked_average_pool(embedding.float(), cells)))
        region_logp = region_logp.float().log_softmax(1)
        in_region = valid & (regions >= 0)
        if self.cfg.prspl:
            prspl = prspl_mask(entropy(logp), paint(entropy(region_logp), regions, math.inf), label,
                               paint(region_logp.argmax(1), regions, -1), in_region, float(self.alpha_t),
                               self.cfg.quantile_scope)
            keep = prspl
        else:
            prspl = torch.zeros_like(valid)
            keep = (conf >= self.cfg.conf_thresh) & valid
        return WeakView(prob=prob, label=label, conf=conf, valid=valid, keep=keep, prspl=prspl, regions=regions,
                        region_prob=region_logp.exp(), embedding=embedding)

    def _label_partner(self, batch: Batch) -> WeakView | None:
        """The CutMix partner batch's weak view (eval mode), or None for 'flip' (the reversed own batch)."""
        if self.cfg.cutmix_partner == "flip":
            return None
        if batch.u_w_mix is None or batch.u_s1_mix is None:
            raise ValueError("cutmix_partner 'batch' needs the partner batch (u_w_mix, u_s1_mix) from the engine")
        return self._label(batch.u_w_mix, valid_or_all(batch.valid_u_mix, batch.u_w_mix))

    # Helpers ---------------------------------------------------------------------------------------
    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at image size and the decoder embedding F (before f_p)."""
        return self.model.decode(self.model.encode(images), tuple(images.shape[-2:]), return_embedding=True)

    def _min_area(self, pixels: Tensor, features: Tensor) -> float:
        """A_min in pixels: `min_region_cells` feature cells of this pass (64 px at stride 4 with 4 cells)."""
        (height, width), (h, w) = pixels.shape[-2:], features.shape[-2:]
        return self.cfg.min_region_cells * (height * width) / (h * w)

    def _alpha(self, step: int) -> float:
        total = int(self.total_steps or 0)
        if total <= 0 and not self._warned_no_total and self.cfg.alpha_schedule != "fixed":
            log.warning("regionmatch: total_steps is not set; alpha_t stays at alpha0 = %g", self.cfg.alpha0)
            self._warned_no_total = True
        return dynamic_alpha(self.cfg.alpha0, step, total, self.cfg.alpha_schedule)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        with eval_mode(self.model):
            return self.model(images)


def embedding_dim(model: nn.Module) -> int:
    """Channels d of the decoder embedding F: the model's `embedding_dim`, else one probe forward (eval mode)."""
    dim = getattr(model, "embedding_dim", None)
    if dim is not None:
        return int(dim)
    with torch.no_grad(), eval_mode(model):
        probe = torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device)
        _, emb = model.decode(model.encode(probe), (32, 32), return_embedding=True)
    return int(emb.shape[1])
