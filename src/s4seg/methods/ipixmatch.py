"""IPixMatch: an inter-pixel relation loss added to a base weak-to-strong method (UniMatch by default).

Paper: IPixMatch, "Boost Semi-supervised Semantic Segmentation with Inter-Pixel Relation" (Wu et al., TII;
no arXiv id in the paper text, no public code), §III-B Eq. (2)-(6), §IV-C (loss ablation, warm-up). Spec and resolved
ambiguities: `reference/regionmatch_ipixmatch.md` part B (B.1, B.2 items cited as [B.2.n] below).

    L_sum = L_o + alpha(i) L_IPix                                     (Eq. 6)
    L_IPix per image = 1 / (C log|Omega|) sum_k phi(psi(p_k,Omega), psi(q_k,Omega))   (Eq. 2)

with p the teacher logits of the weak view, q the student logits, Omega the pixels where the teacher's max
softmax is > tau (Eq. 3), psi the spatial softmax of one class channel at temperature t (Eq. 4), and phi
the KL divergence (L_KL, the paper's choice) or 1 - Pearson rho (L_CR, Eq. 5; `distance`).

The base (`base`, default unimatch as in §IV-B; fixmatch and unimatch_v2 work too) is built by name on the
same model (`AddOnMethod`), with its own params in `base_params`, and runs unchanged: L_o is its whole loss
(with the code's global /2 only if the base's `halve_loss` is on), and alpha L_IPix is added outside it
[B.1.6]. L_IPix reads the base's views from
`StepOutput.streams` (`losses.py`, "Streams"): per strong view, the student logits q and the detached logits
p its pseudo-labels were taken from, CutMix-ed with the same box as those pseudo-labels [B.2.3], and the
view's confidence and valid mask. The dump writes the base's pseudo-labels plus `extra["omega"]`, Omega of
the un-mixed weak view.

Choices where the paper is silent or ambiguous (reference part B):
- Teacher [B.2.1]: the paper speaks of an EMA teacher, UniMatch has none; the teacher is the base's own
  labeller, so L_IPix is the only difference from the base run. UniMatch base: its eval-mode inference
  stream by default, or the detached train-mode weak logits of the code with `base_params:
  {weak_labels_from_train_forward: true}` (the reference's B.1.2); the partner is labelled in eval mode, as in
  UniMatch. EMA teacher: `base: unimatch_v2`, or `base: fixmatch` with `base_params: {ema_teacher: true}`.
- Student views [B.2.2]: every CutMix-ed strong view the base has (s1, s2; FixMatch: s1), L_IPix is their
  mean. UniMatch's feature-perturbed weak view is left out (its input is not a strong image); `include_fp`
  adds it, against the un-mixed weak logits.
- Omega [B.2.4]: per image, strict ">" on the teacher's softmax at T = 1 (the view's mixed confidence),
  padding excluded.
- Support of psi [B.2.5]: Eq. (4) sums over all HW, Eq. (2) restricts psi to Omega: the softmax is taken over
  Omega only, consistent with the log|Omega| divisor (the maximum entropy on |Omega| points).
- |Omega| < 2 [B.2.6]: log|Omega| <= 0; such an image contributes 0 and still counts in the batch mean (/B).
- KL [B.2.7]: KL(teacher || student), teacher detached, no t^2 factor (Eq. 2 has none). All C classes [B.2.8],
  present in the image or not.
- Pearson [B.2.9]: rho over the |Omega| entries of the two psi vectors, std clamped at >= 1e-8, same divisor.
- Resolution [B.2.10]: the base's logits at crop resolution (those its pseudo-labels come from), bilinear
  upsampling as everywhere here (the paper used nearest for determinism only). Unlabeled images only [B.2.12].
- alpha and warm-up [B.2.11]: alpha(i) = alpha exp(-5 (1 - min(i / i_w, 1))^2) from step 0, alpha afterwards
  (§IV-C, 5 of 80 epochs on VOC, 30 of 240 on Cityscapes). i_w = `warmup_steps` if > 0, else `warmup_fraction`
  of the run's `total_steps` (set by the engine); when the engine gives none, no warm-up (the Table I setting)
  and a warning.
- The paper's other changes to UniMatch (halved batch and LR, nearest upsampling, deterministic algorithms)
  belong to the run, not to the method; its "UniMatch*" baseline is the base method with the same run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from s4seg.engine.method import AddOnConfig, AddOnMethod, Batch, PseudoLabels, StepOutput, register_method
from s4seg.errors import ParamsError
from s4seg.methods.losses import gaussian_rampup, valid_or_all

log = logging.getLogger(__name__)

DISTANCES = ("kl", "pearson")
STRONG_VIEWS = ("s1", "s2")
PEARSON_EPS = 1e-8  # [B.2.9]


@dataclass(frozen=True)
class IPixMatchConfig(AddOnConfig):
    base: str = "unimatch"  # L_o of Eq. (6): IPixMatch is applied to UniMatch (§IV-B)
    # base_params (AddOnConfig): the base's own keys, as in methods.<base>; {} = its defaults (paper values)
    alpha: float = 1.0  # weight of L_IPix, Eq. (6); 1 in Table I
    omega_thresh: float = 0.8  # tau of Eq. (3): Omega = {max softmax > tau}
    temperature: float = 4.0  # t of Eq. (4)
    distance: str = "kl"  # kl: L_KL (the paper's choice, §IV-C) | pearson: L_CR, Eq. (5)
    warmup_fraction: float = 0.0625  # i_w as a share of the run: 5 of UniMatch's 80 VOC epochs (§IV-C)
    warmup_steps: int = 0  # > 0: i_w in optimiser steps (overrides warmup_fraction); 0 and fraction 0: no ramp
    include_fp: bool = False  # true: L_IPix also on UniMatch's feature-perturbed view [B.2.2]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0:
            raise ParamsError(f"alpha must be >= 0, found {self.alpha!r}")
        if not 0.0 <= self.omega_thresh < 1.0:
            raise ParamsError(f"omega_thresh must be in [0, 1), found {self.omega_thresh!r}")
        if self.temperature <= 0:
            raise ParamsError(f"temperature must be > 0, found {self.temperature!r}")
        if self.distance not in DISTANCES:
            raise ParamsError(f"distance must be one of {', '.join(DISTANCES)}, found {self.distance!r}")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ParamsError(f"warmup_fraction must be in [0, 1], found {self.warmup_fraction!r}")
        if self.warmup_steps < 0:
            raise ParamsError(f"warmup_steps must be >= 0, found {self.warmup_steps!r}")


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def confident_set(conf: Tensor, valid: Tensor, tau: float) -> Tensor:
    """Omega, Eq. (3): (B, H, W) bool, teacher max softmax strictly above tau, padding excluded [B.2.4]."""
    return (conf > tau) & valid.bool()


def spatial_log_distribution(logits: Tensor, omega: Tensor, temperature: float) -> Tensor:
    """log psi, Eq. (4), over Omega [B.2.5]: for each image and class, log-softmax of logits / t over the
    pixels of Omega. (B, K, H, W), (B, H, W) -> (B, K, H*W) float32, 0 outside Omega.

    An image with an empty Omega gets NaN; `inter_pixel_loss` never passes one.
    """
    inside = omega.flatten(1)[:, None, :]  # (B, 1, N)
    z = (logits.float() / temperature).flatten(2).masked_fill(~inside, float("-inf"))
    return z.log_softmax(dim=-1).masked_fill(~inside, 0.0)


def kl_distance(log_p: Tensor, log_q: Tensor, omega: Tensor) -> Tensor:
    """phi = KL(psi(p) || psi(q)) per image and class (B, K), a sum over Omega only [B.2.7]."""
    p = log_p.exp() * omega.flatten(1)[:, None, :]
    return (p * (log_p - log_q)).sum(dim=-1)


def pearson_distance(log_p: Tensor, log_q: Tensor, omega: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """phi = 1 - rho_p(psi(p), psi(q)), Eq. (5), per image and class (B, K); rho over the |Omega| entries.

    rho is scale-free, so it is computed on |Omega| psi (mean 1 over Omega), against which eps is negligible.
    """
    inside = omega.flatten(1)[:, None, :].float()  # (B, 1, N)
    n = inside.sum(dim=-1, keepdim=True).clamp_min(1)
    u, v = log_p.exp() * inside * n, log_q.exp() * inside * n
    u = (u - u.sum(dim=-1, keepdim=True) / n) * inside  # centred over Omega, 0 outside
    v = (v - v.sum(dim=-1, keepdim=True) / n) * inside
    cov = (u * v).sum(dim=-1) / n[..., 0]
    std_u = ((u * u).sum(dim=-1) / n[..., 0]).clamp_min(eps**2).sqrt()
    std_v = ((v * v).sum(dim=-1) / n[..., 0]).clamp_min(eps**2).sqrt()
    return 1 - cov / (std_u * std_v)


def inter_pixel_loss(logits_t: Tensor, logits_s: Tensor, omega: Tensor, temperature: float,
                     distance: str = "kl") -> Tensor:
    """L_KL or L_CR, Eq. (2), averaged over the batch: per image sum_k phi_k / (C log|Omega|).

    Teacher logits p (detached here), student logits q: (B, K, H, W); omega (B, H, W). An image with
    |Omega| < 2 contributes 0 and still counts in the mean over B [B.2.6].
    """
    n = omega.flatten(1).sum(dim=1)  # (B,)
    enough = n >= 2
    # an empty Omega would give NaN rows: compute those images over every pixel, then drop them below
    support = omega | (n == 0)[:, None, None]
    log_p = spatial_log_distribution(logits_t.detach(), support, temperature)
    log_q = spatial_log_distribution(logits_s, support, temperature)
    phi = (kl_distance if distance == "kl" else pearson_distance)(log_p, log_q, support)  # (B, K)
    divisor = logits_s.shape[1] * n.clamp_min(2).float().log()  # C log|Omega|, > 0 (clamped: dropped anyway)
    per_image = torch.where(enough, phi.sum(dim=1) / divisor, torch.zeros_like(divisor))
    return per_image.mean()


def rampup_weight(step: int, warmup_steps: int, alpha: float) -> float:
    """alpha(i) = alpha exp(-5 (1 - min(i / i_w, 1))^2), the Gaussian warm-up of §IV-C; i_w = 0: alpha."""
    return alpha * gaussian_rampup(step, warmup_steps)


# --------------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------------
@register_method("ipixmatch")
class IPixMatch(AddOnMethod):
    config_class = IPixMatchConfig

    def __init__(self, cfg: IPixMatchConfig, model: nn.Module, num_classes: int) -> None:
        super().__init__(cfg, model, num_classes)
        self._warned_no_total = False

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        out = self.base.training_step(batch, step)  # L_o, Eq. (6), and the views it trained on
        losses, in_omega, valid = [], 0, 0
        for view in self.views(out.streams):
            s = out.streams
            omega = confident_set(s[f"conf_{view}"], s[f"valid_{view}"], self.cfg.omega_thresh)
            losses.append(inter_pixel_loss(s[f"logits_t_{view}"], s[f"logits_{view}"], omega,
                                           self.cfg.temperature, self.cfg.distance))
            in_omega, valid = in_omega + omega.sum(), valid + s[f"valid_{view}"].sum()
        loss_ipix = torch.stack(losses).mean()  # mean over the student views [B.2.2]
        alpha = rampup_weight(step, self.warmup_steps(), self.cfg.alpha)
        pseudo = out.pseudo
        if pseudo is not None:
            self._add_omega(pseudo, valid_or_all(batch.valid_u, batch.u_w))
        logs: dict[str, Any] = {
            **out.logs,
            "loss_ipix": loss_ipix.detach(),
            "alpha": alpha,
            "omega_ratio": in_omega / valid.clamp_min(1),  # share of valid strong-view pixels in Omega
        }
        return StepOutput(loss=out.loss + alpha * loss_ipix, logs=logs, pseudo=pseudo, aux_losses=out.aux_losses,
                          streams=out.streams)

    def views(self, streams: dict[str, Tensor]) -> list[str]:
        """The base's student views L_IPix applies to: its strong views (+ fp with `include_fp`)."""
        views = [v for v in STRONG_VIEWS if f"logits_{v}" in streams] + (["fp"] if self.cfg.include_fp else [])
        needed = [f"{key}_{v}" for v in views for key in ("logits", "logits_t", "conf", "valid")]
        missing = [key for key in needed if key not in streams]
        if not views or missing:
            raise ParamsError(
                f"methods.ipixmatch: base {self.cfg.base!r} does not return the streams L_IPix needs "
                f"(missing: {', '.join(missing) or 'logits_s1'}; it returns: {', '.join(sorted(streams)) or 'none'}); "
                "choose a weak-to-strong base (fixmatch, unimatch, unimatch_v2), and include_fp only with unimatch"
            )
        return views

    def warmup_steps(self) -> int:
        """i_w: `warmup_steps`, else `warmup_fraction` of the run's total steps; 0 (no ramp) when unknown."""
        if self.cfg.warmup_steps > 0:
            return self.cfg.warmup_steps
        if self.cfg.warmup_fraction == 0:
            return 0
        if self.total_steps is None:
            if not self._warned_no_total:
                log.warning("ipixmatch: the engine gave no total_steps, so warmup_fraction %.4g cannot be turned "
                            "into steps; training without warm-up (set warmup_steps to ramp)",
                            self.cfg.warmup_fraction)
                self._warned_no_total = True
            return 0
        return max(1, round(self.cfg.warmup_fraction * self.total_steps))

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        """The base's pseudo-labels, plus Omega of the weak view (`extra["omega"]`, Eq. 3) for the dump."""
        return self._add_omega(self.base.pseudo_labels(images, valid), valid_or_all(valid, images))

    def _add_omega(self, pseudo: PseudoLabels, valid: Tensor) -> PseudoLabels:
        pseudo.extra["omega"] = confident_set(pseudo.conf, valid, self.cfg.omega_thresh)
        return pseudo
