"""RRN: CPS twin networks + patch discriminators (LPLF, DRLC) + ensembling inference.

Paper: "Semi-Supervised Semantic Segmentation With Region Relevance" (Chen et al., arXiv 2304.11539; text in
`papers/rrn.txt`), §II A-E, §III-A, Table III. Facts: `reference/rrn_cps.md` §1-§8. The released code does
whole-image (s4GAN-style) selection only; the region-level part here is reconstructed from the paper and the
patch discriminator that survives as bytecode (reference §2b, §3 "paper / recommended", §8.1).

One iteration (branches b = 1, 2; o = the other one):
- CPS (§II-A, Eq. 4-6): both branches label the weak view and its CutMix partner (eval mode, no grad); the
  student input pastes the partner into the view inside `box1`, the hard labels are pasted the same way,
  and each branch trains on the other's labels: L_cps^u = CE(f1(u), y2) + CE(f2(u), y1). Labeled images
  take part too (Eq. 5, L_cps^l, with the labeled logits' argmax). L_sup = CE(f1(x), y*) + CE(f2(x), y*).
- Discriminators d_b (`PatchDiscriminator`): input [softmax(z_b), image] (fake) or [one-hot(y*), image]
  (real); outputs a region-consistency map rc (sigmoid of a patch head) and a feature f (conv4, pooled).
  Trained by BCE (real -> 1, fake -> 0, mean over rc cells) with their own Adam (engine's aux optimisers,
  named "d1", "d2"), once per segmentor step, on the detached prediction.
- LPLF (§II-B, Eq. 1): rc_b = d_b(z_b) upsampled to a pixel mask m_b = [rc >= eps]; L_ls trains z_b on its own
  argmax where m_b. L_f (Eq. 2): L1 between the batch-mean features of real and fake inputs of d_b.
- DRLC (§II-C, Eq. 3): both discriminators judge each branch; the self-label CE gets weight 2 where both
  accept, 1 where one does, 0 where none. L_dr replaces L_ls (Eq. 8).
- L = L_sup + lambda_1 L_cps + lambda_2 (L_ls or L_dr) + lambda_3 L_f (Eq. 7, 8), each term summed over b.
- Ensembling inference (§II-D): `predict` averages the two branches.

Choices where paper and code differ, or the paper is silent (switch in brackets):
- Twin initialisation [`reinit_heads`]: CPS/RRN start both backbones from the same ImageNet weights and both
  heads from different random draws (Kaiming-normal fan_in, norms 1/0; reference §1.1). Here training starts
  from the warmup model: "twin" (default) keeps branch 1 = the warmup model and re-initialises branch 2's head
  (every head module: convs and linears Kaiming-normal fan_in, norm layers weight 1 / bias 0 / fresh running
  statistics, anything else its own `reset_parameters`), so both encoders start from the same warmup weights
  and the heads differ; "both" re-initialises both heads (two different draws), as the paper's random heads.
  The copy and the draws happen when `fit` starts (`on_fit_start`), after the stage has loaded the warmup
  weights into `self.model`, and again at construction so that a method that is never fitted has its twin.
  [`twin_rampup`] With "twin", the random head's labels would supervise the warm branch 1 at full weight from
  step 0 (measured: L_cps 4.8 at step 5; branch 1 alone fell from the warmup's 55.3 to 49.8 test mIoU after
  168 steps). So branch 1's two CPS terms (it learning from the twin's labels, unlabeled and labeled) are
  weighted by the Gaussian ramp-up exp(-5 (1 - t/T_r)^2) over the first `twin_rampup` share of the steps
  (Laine & Aila 2017; the CPS/RRN code ramps the LR over 10 epochs instead), while the twin learns from
  branch 1's labels at full weight from the start (with it: 58.3 and 59.7 on two seeds, supervised 56.6
  and 57.3; README "Measured"). 0 = no ramp; "both" (the paper's symmetric random heads) never ramps.
- Labeled images in CPS [`cps_on_labeled`]: in Eq. 5 (paper, default), absent from the CutMix code (false).
  L_cps^l is the cross CE over every pixel of the labeled crops (as no-CutMix CPS does), from detached argmaxes.
- CPS pseudo-labels come from eval-mode passes (as every method here; the dump writes the same); the code runs
  them in train mode (BN batch statistics). The student input is the CutMix of the weak views, as the CPS code;
  [`strong_view`] true pastes the strong views instead. [`cutmix_partner`] as in `fixmatch.py`.
- Patch discriminator: four stride-2 4x4 convs (64-128-256-512, LeakyReLU 0.2, Dropout2d 0.5 after the first
  three) and a rc head Conv(512 -> 1, k, stride k) with k = `rc_kernel` = 10 conv4 cells ([B]: 160 px per rc
  cell). f = global average pool of conv4: the code's fixed 20 x 20 window only covers the top-left of a
  512 crop's 32 x 32 map (reference §2a, §8.2). The head's input is zero-padded evenly on both sides to a
  multiple of k, so every pixel has an rc cell and crops under 16 k px still work ([B] drops the rim: 3 x 3 at
  512 where this gives 4 x 4). rc is upsampled bilinearly (on the sigmoid, as [B]) to the crop.
- D inputs: images in [0, 1] as loaded (the code min-max rescales the normalised batch, about the same range);
  ignore pixels of the real one-hot are all-zero, and so are the padding pixels of the fake softmax (the code
  leaves the prediction there, a cue D could use; reference §8.10).
- Which D mode judges [`judge_with_dropout`]: the code leaves D in train mode, so Dropout2d(0.5) is active in
  the selection decisions and the L_f features; default false judges with D in eval mode (deterministic
  decisions, as the dump); true = code.
- Selection loss: the branch's own argmax (Eq. 1/3, code), never the other's label; the mask is detached and
  D passes serving the segmentor are frozen (no gradient into D; L_f is the only adversarial path, as in the
  code). Normalisation: sum of w CE over pixels with w > 0, divided by their count (0 if none): Eq. 3 literally
  with one denominator, so only-d_b-accepts reduces to L_ls. The code normalises the two d terms separately
  (reference §5). Threshold `>=` (paper), eps = 0.6 (VOC; 0.7 Cityscapes). [`selection_start_step`]: the code
  turns the selection loss on after one epoch; the paper has no delay (0).
- L_f, Eq. 2 writes an L1 norm; here its mean over the 512 channels, as the code (lambda_3 = 0.1 was set with it).
- D optimiser: Adam lr 1e-4, betas (0.9, 0.99) (§III-A); constant LR as the code [`d_lr_poly`].
- Ensemble [`ensemble_average`]: "logits" = equal-weight mean of the raw logits (code; the paper's "weighted
  average" names no weights); "probs" = mean of the softmaxes, returned as log-probabilities.
- Table III ablations: `lplf` (L_ls + L_f), `drlc` (L_dr instead of L_ls), `ensemble` (false: branch 1 alone).
  All three false is the CPS baseline (no discriminators built).

Pseudo-labels (`pseudo_labels`, the dump, `StepOutput.pseudo`): label = branch 1's hard label (the target of
branch 2 in L_cps), conf its max softmax, keep = the pixels where branch 1's self-label trains (w > 0: the
selection on the un-mixed view; every valid pixel without LPLF/DRLC, since CPS trains on all). extra:
`label_2` (branch 2's label, target of branch 1) and the upsampled rc maps `rc_d{i}_b{j}` (d_i judging branch j).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s4seg.config import IGNORE_INDEX
from s4seg.engine.method import (
    AuxOptimizer,
    Batch,
    Method,
    MethodConfig,
    PseudoLabels,
    StepOutput,
    register_method,
)
from s4seg.errors import ParamsError
from s4seg.methods.losses import (
    CUTMIX_PARTNERS,
    Targets,
    eval_mode,
    gaussian_rampup,
    labeled_ce,
    paste,
    unlabeled_ce,
    valid_or_all,
)

TWIN_INITS = ("twin", "both")
ENSEMBLE_AVERAGES = ("logits", "probs")


@dataclass(frozen=True)
class RRNConfig(MethodConfig):
    cps_weight: float = 1.0  # lambda_1, Eq. 7/8: 1.0 on VOC (§III-A); 5.0 on Cityscapes
    selection_weight: float = 1.0  # lambda_2 (L_ls or L_dr), §III-A
    fm_weight: float = 0.1  # lambda_3 (L_f), §III-A
    rc_thresh: float = 0.6  # epsilon, Eq. 1/3: 0.6 on VOC (§III-A); 0.7 on Cityscapes
    lplf: bool = True  # Table III: local pseudo-label filtering (L_ls, L_f)
    drlc: bool = True  # Table III: dynamic region-loss correction (L_dr replaces L_ls)
    ensemble: bool = True  # Table III: ensembling inference (false: branch 1 predicts)
    ensemble_average: str = "logits"  # logits (code) | probs
    cps_on_labeled: bool = True  # Eq. 5 (paper); false = CutMix CPS code (unlabeled only)
    reinit_heads: str = "twin"  # twin: branch 2's head re-initialised | both: both heads (paper's random heads)
    twin_rampup: float = 0.25  # twin only: share of the steps over which branch 1 ramps up to the twin's labels
    strong_view: bool = False  # false: CutMix of the weak views (CPS code); true: of the strong views
    cutmix_partner: str = "batch"  # batch: the engine's second unlabeled batch | flip: the reversed batch
    judge_with_dropout: bool = False  # true: D's Dropout2d active when judging and in L_f (code)
    selection_start_step: int = 0  # no delay (paper); the code starts the selection loss after one epoch
    rc_kernel: int = 10  # conv4 cells per rc cell (bytecode [B]: Conv 10x10 stride 10 = 160 px)
    d_width: int = 64  # channels of D's first conv (64-128-256-512, reference §2a)
    d_lr: float = 1e-4  # Adam, §III-A
    d_betas: tuple[float, float] = (0.9, 0.99)  # §III-A
    d_lr_poly: bool = False  # the code keeps D's LR constant

    def __post_init__(self) -> None:
        checks = {
            "rc_thresh must be in [0, 1]": 0.0 <= self.rc_thresh <= 1.0,
            "cps_weight, selection_weight and fm_weight must be >= 0":
                min(self.cps_weight, self.selection_weight, self.fm_weight) >= 0,
            "rc_kernel and d_width must be >= 1": self.rc_kernel >= 1 and self.d_width >= 1,
            "d_lr must be > 0": self.d_lr > 0,
            "selection_start_step must be >= 0": self.selection_start_step >= 0,
            "twin_rampup must be in [0, 1]": 0.0 <= self.twin_rampup <= 1.0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ParamsError(f"{message}; found {self}")
        for key, value, choices in (("ensemble_average", self.ensemble_average, ENSEMBLE_AVERAGES),
                                    ("reinit_heads", self.reinit_heads, TWIN_INITS),
                                    ("cutmix_partner", self.cutmix_partner, CUTMIX_PARTNERS)):
            if value not in choices:
                raise ParamsError(f"{key} must be one of {', '.join(choices)}, found {value!r}")

    @property
    def discriminators(self) -> bool:
        """LPLF and DRLC both need the discriminators; the CPS baseline has none."""
        return self.lplf or self.drlc


# --------------------------------------------------------------------------------------------------
# The patch discriminator (§III-A "five convolution layers and one average pooling layer"; reference §2b)
# --------------------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """[prediction or one-hot (K), image (3)] -> (rc logits (B, 1, h, w), f (B, 8 * width)).

    rc = sigmoid(logits) is the region-consistency map, one cell per `rc_kernel` x `rc_kernel` conv4 cells
    (16 px each); f is conv4 (after LeakyReLU) averaged over the whole map.
    """

    min_size = 16  # input side giving one conv4 cell; smaller inputs are zero-padded up to it

    def __init__(self, in_channels: int, width: int = 64, rc_kernel: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [in_channels, width, 2 * width, 4 * width, 8 * width]
        for i, (c_in, c_out) in enumerate(zip(channels, channels[1:], strict=False)):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            if i < 3:  # no dropout after conv4 (reference §2a)
                layers.append(nn.Dropout2d(0.5))
        self.trunk = nn.Sequential(*layers)
        self.rc_kernel = rc_kernel
        self.classifier = nn.Conv2d(8 * width, 1, rc_kernel, stride=rc_kernel)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        if min(h, w) < self.min_size:
            x = F.pad(x, (0, max(0, self.min_size - w), 0, max(0, self.min_size - h)))
        feats = self.trunk(x)  # (B, 8 width, H/16, W/16)
        f = feats.mean(dim=(2, 3))  # global average pooling (the code's fixed window is a bug, reference §8.2)
        return self.classifier(_pad_to_multiple(feats, self.rc_kernel)), f


def _pad_to_multiple(feats: Tensor, k: int) -> Tensor:
    """Zero-pad a (B, C, h, w) map evenly on both sides to multiples of k (at least k)."""
    h, w = feats.shape[-2:]
    ph, pw = -(-h // k) * k - h, -(-w // k) * k - w
    return F.pad(feats, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def discriminator_input(prob: Tensor, images: Tensor, valid: Tensor | None = None) -> Tensor:
    """Fake input, Fig. 2(b) concat_p: [softmax (B, K, H, W), image (B, 3, H, W)]; padding pixels all-zero."""
    if valid is not None:
        prob = prob * valid.unsqueeze(1).to(prob.dtype)
    return torch.cat([prob, images.to(prob.dtype)], dim=1)


def ground_truth_input(labels: Tensor, images: Tensor, num_classes: int) -> Tensor:
    """Real input, concat_g: [one-hot(y*) (all-zero on ignore pixels), image]."""
    known = labels != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(known, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    return torch.cat([one_hot * known.unsqueeze(1), images.float()], dim=1)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def discriminator_loss(rc_logits_real: Tensor, rc_logits_fake: Tensor) -> Tensor:
    """D's BCE (reference §2e): 1/2 [BCE(d(real), 1) + BCE(d(fake), 0)], each a mean over rc cells.
    On logits (BCE of a sigmoid is unsafe under autocast), the same value."""
    real = F.binary_cross_entropy_with_logits(rc_logits_real, torch.ones_like(rc_logits_real))
    fake = F.binary_cross_entropy_with_logits(rc_logits_fake, torch.zeros_like(rc_logits_fake))
    return (real + fake) / 2


def region_mask(rc_logits: Tensor, size: tuple[int, int], eps: float) -> tuple[Tensor, Tensor]:
    """§II-B: rc = sigmoid, upsampled bilinearly to the image, m = [rc >= eps] (Eq. 1's condition).
    Returns (rc (B, H, W), m (B, H, W) bool), both detached."""
    rc = F.interpolate(rc_logits.detach().float().sigmoid(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return rc, rc >= eps


def drlc_weights(accepted_own: Tensor, accepted_other: Tensor | None) -> Tensor:
    """Eq. 3: 2 where both discriminators accept, 1 where exactly one does, 0 where none.
    Without the other (LPLF alone, Eq. 1): 1 where the own one accepts."""
    weight = accepted_own.float()
    return weight if accepted_other is None else weight + accepted_other.float()


def selection_loss(logits: Tensor, weight: Tensor, valid: Tensor) -> Tensor:
    """L_ls (Eq. 1) / L_dr (Eq. 3): CE of z against its own one-hot argmax, weighted per pixel, summed and
    divided by the number of valid pixels with weight > 0 (0 when there is none)."""
    ce = F.cross_entropy(logits, logits.detach().argmax(dim=1), reduction="none")  # (B, H, W)
    weight = weight * valid
    return (ce * weight).sum() / (weight > 0).sum().clamp_min(1)


def feature_matching(f_real: Tensor, f_fake: Tensor) -> Tensor:
    """L_f, Eq. 2: | E[d^k(concat_g)] - E[d^k(concat_p)] |, batch means, averaged over channels (code)."""
    return (f_real.float().mean(dim=0) - f_fake.float().mean(dim=0)).abs().mean()


def cross_labeled_cps(logits_1: Tensor, logits_2: Tensor) -> tuple[Tensor, Tensor]:
    """L_cps^l, Eq. 5, as its two terms: (CE(f1(x), argmax f2(x)), CE(f2(x), argmax f1(x))), means over
    every pixel; L_cps^l is their sum."""
    label_1, label_2 = logits_1.detach().argmax(dim=1), logits_2.detach().argmax(dim=1)
    return F.cross_entropy(logits_1, label_2), F.cross_entropy(logits_2, label_1)


# --------------------------------------------------------------------------------------------------
# Twin initialisation
# --------------------------------------------------------------------------------------------------
def reinit_head(model: nn.Module) -> None:
    """Re-draw every module of the model's 'head' group (CPS's head init, reference §1.1): convs and
    linears Kaiming-normal (fan_in), biases 0; norm layers weight 1, bias 0, fresh running statistics;
    other modules with parameters their own `reset_parameters`. Draws from the global torch RNG."""
    head = {id(p) for p in model.param_groups()["head"]}
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own or not all(id(p) in head for p in own):
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.reset_running_stats()
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()


@contextmanager
def frozen(modules: list[nn.Module]) -> Iterator[None]:
    """Passes inside build no graph into these modules' parameters (the code freezes D this way while the
    segmentor's losses are computed); requires_grad comes back on exit."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
@register_method("rrn")
class RRN(Method):
    config_class = RRNConfig

    def __init__(self, cfg: RRNConfig, model: nn.Module, num_classes: int) -> None:
        super().__init__(cfg, model, num_classes)
        self.model_2 = copy.deepcopy(model)
        self._redraw_heads()
        self.discriminators = nn.ModuleList(
            [PatchDiscriminator(num_classes + 3, cfg.d_width, cfg.rc_kernel) for _ in range(2)]
            if cfg.discriminators else []
        )

    def _redraw_heads(self) -> None:
        if self.cfg.reinit_heads == "both":
            reinit_head(self.model)
        reinit_head(self.model_2)

    def on_fit_start(self) -> None:
        """The twin copies the model's weights as training starts (the train stage loads the warmup weights
        into `self.model` after the method is built), so both encoders start from them; then the head(s)
        are re-drawn."""
        self.model_2.load_state_dict(self.model.state_dict())
        self._redraw_heads()

    def warm_head_params(self) -> list[nn.Parameter]:
        """Branch 1's head keeps the warmup's weights with reinit_heads 'twin'; 'both' re-draws it too."""
        return [] if self.cfg.reinit_heads == "both" else super().warm_head_params()

    def twin_label_weight(self, step: int) -> float:
        """Weight of branch 1's CPS terms (it learning from the twin's labels) at `step`: the Gaussian ramp
        over `twin_rampup` of the run with reinit_heads 'twin', else 1 (see the module docstring)."""
        if self.cfg.reinit_heads != "twin" or not self.total_steps:
            return 1.0
        return gaussian_rampup(step, round(self.cfg.twin_rampup * self.total_steps))

    @property
    def branches(self) -> tuple[nn.Module, nn.Module]:
        return self.model, self.model_2

    # Pseudo-labels and selection -------------------------------------------------------------------
    @torch.no_grad()
    def _branch_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = []
        for net in self.branches:
            with eval_mode(net):
                out.append(net(images).float())
        return out[0], out[1]

    def _judge(self, d: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """d on an input, in the mode of the passes that serve the segmentor: (rc logits, f)."""
        if self.cfg.judge_with_dropout:
            return d(inputs)
        with eval_mode(d):
            return d(inputs)

    def _weight(self, rc_own: Tensor, rc_other: Tensor | None, size: tuple[int, int]) -> Tensor:
        """Per-pixel selection weight of one branch from its own d's rc logits and, with DRLC, the other's."""
        accepted_own = region_mask(rc_own, size, self.cfg.rc_thresh)[1]
        accepted_other = region_mask(rc_other, size, self.cfg.rc_thresh)[1] if self.cfg.drlc else None
        return drlc_weights(accepted_own, accepted_other)  # Eq. 1 or Eq. 3

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        """Both branches' eval-mode labels (label: branch 1, extra label_2: branch 2); keep = the pixels where
        branch 1's self-label trains under LPLF/DRLC (every valid pixel without them); extra: the rc maps."""
        valid = valid_or_all(valid, images)
        probs = [logits.softmax(dim=1) for logits in self._branch_logits(images)]
        conf, label = probs[0].max(dim=1)
        extra: dict[str, Tensor] = {"label_2": probs[1].argmax(dim=1).to(torch.uint8)}
        keep = valid
        if self.cfg.discriminators:
            size = tuple(images.shape[-2:])
            for b, prob in enumerate(probs):
                fake = discriminator_input(prob, images, valid)
                rc_own = self._judge(self.discriminators[b], fake)[0]
                rc_other = self._judge(self.discriminators[1 - b], fake)[0]
                extra[f"rc_d{b + 1}_b{b + 1}"] = region_mask(rc_own, size, self.cfg.rc_thresh)[0].half()
                extra[f"rc_d{2 - b}_b{b + 1}"] = region_mask(rc_other, size, self.cfg.rc_thresh)[0].half()
                if b == 0:
                    keep = (self._weight(rc_own, rc_other, size) > 0) & valid
        return PseudoLabels(label=label, conf=conf, keep=keep, extra=extra)

    # Training --------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> StepOutput:
        cfg = self.cfg
        valid_w = valid_or_all(batch.valid_u, batch.u_w)
        pseudo = self.pseudo_labels(batch.u_w, valid_w)
        weak = [Targets(label=label, conf=pseudo.conf, keep=valid_w, valid=valid_w)
                for label in (pseudo.label, pseudo.extra["label_2"].long())]

        # CutMix partner: its images and both branches' labels (reference §1.2-1.3)
        view, view_mix = (batch.u_s1, batch.u_s1_mix) if cfg.strong_view else (batch.u_w, batch.u_w_mix)
        if cfg.cutmix_partner == "flip":
            partner_images, partner = view.flip(0), [t.flipped() for t in weak]
        else:
            if batch.u_w_mix is None or view_mix is None:
                raise ValueError("cutmix_partner 'batch' needs the partner batch (u_w_mix, u_s1_mix) from the engine")
            partner_images = view_mix
            valid_mix = valid_or_all(batch.valid_u_mix, batch.u_w_mix)
            partner = [Targets(label=logits.argmax(dim=1), conf=pseudo.conf, keep=valid_mix, valid=valid_mix)
                       for logits in self._branch_logits(batch.u_w_mix)]
        u_mix = paste(view, partner_images, batch.box1)
        target_1, target_2 = (w.cutmix(p, batch.box1) for w, p in zip(weak, partner, strict=True))
        valid_mix_u = target_1.valid

        # Segmentors: labeled and mixed unlabeled images, both branches
        logits_x = [net(batch.x) for net in self.branches]  # separate passes (BN statistics), as the code
        logits_u = [net(u_mix) for net in self.branches]

        loss_sup = labeled_ce(logits_x[0], batch.y) + labeled_ce(logits_x[1], batch.y)  # Eq. 4
        # Eq. 6 and 5, split by the branch that learns: [0] branch 1 on the twin's labels, [1] the reverse
        cps_u = (unlabeled_ce(logits_u[0], target_2.label, valid_mix_u, valid_mix_u),
                 unlabeled_ce(logits_u[1], target_1.label, valid_mix_u, valid_mix_u))
        cps_l = cross_labeled_cps(*logits_x) if cfg.cps_on_labeled else (loss_sup.new_zeros(()),) * 2
        ramp = self.twin_label_weight(step)
        loss_cps_u, loss_cps_l = cps_u[0] + cps_u[1], cps_l[0] + cps_l[1]
        loss = loss_sup + cfg.cps_weight * (ramp * (cps_u[0] + cps_l[0]) + cps_u[1] + cps_l[1])  # Eq. 5, 7
        logs: dict[str, Any] = {"loss_sup": loss_sup.detach(), "loss_cps_u": loss_cps_u.detach(),
                                "loss_cps_l": loss_cps_l.detach(), "twin_ramp": ramp}
        aux_losses: dict[str, Tensor] = {}
        if cfg.discriminators:
            real = ground_truth_input(batch.y, batch.x, self.num_classes)
            fakes = [discriminator_input(lu.float().softmax(dim=1), u_mix, valid_mix_u) for lu in logits_u]
            selection, loss_f, selected = self._segmentor_terms(logits_u, fakes, real, valid_mix_u, step)
            loss = loss + cfg.selection_weight * selection + cfg.fm_weight * loss_f  # Eq. 7 / 8
            aux_losses, d_logs = self._discriminator_losses(fakes, real)
            logs.update({("loss_dr" if cfg.drlc else "loss_ls"): selection.detach(), "loss_f": loss_f.detach(),
                         "selected_share": selected, **d_logs})
        return StepOutput(loss=loss, logs=logs, pseudo=pseudo, aux_losses=aux_losses)

    def _segmentor_terms(self, logits_u: list[Tensor], fakes: list[Tensor], real: Tensor, valid: Tensor,
                         step: int) -> tuple[Tensor, Tensor, Tensor]:
        """Sum over branches of the selection loss (L_ls or L_dr) and of L_f, through frozen discriminators;
        and the share of valid mixed pixels with weight > 0 (branch 1)."""
        cfg = self.cfg
        size = tuple(logits_u[0].shape[-2:])
        selection = logits_u[0].new_zeros((), dtype=torch.float32)
        loss_f = selection.clone()
        selected = selection.detach().clone()
        with frozen(list(self.discriminators)):
            for b, (logits, fake) in enumerate(zip(logits_u, fakes, strict=True)):
                own, other = self.discriminators[b], self.discriminators[1 - b]
                rc_own, f_fake = self._judge(own, fake)  # f_fake carries the segmentor's gradient (Eq. 2)
                with torch.no_grad():
                    f_real = self._judge(own, real)[1]
                    rc_other = self._judge(other, fake)[0] if cfg.drlc else None
                if cfg.lplf:
                    loss_f = loss_f + feature_matching(f_real, f_fake)  # Eq. 2
                weight = self._weight(rc_own, rc_other, size)
                if b == 0:
                    selected = ((weight > 0) & valid).sum() / valid.sum().clamp_min(1)
                if step >= cfg.selection_start_step:
                    selection = selection + selection_loss(logits, weight, valid)  # Eq. 1 / 3
        return selection, loss_f, selected

    def _discriminator_losses(self, fakes: list[Tensor], real: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Each d_b on its branch's detached prediction (fake) and on the labeled ground truth (real)."""
        losses, logs = {}, {}
        for b, (d, fake) in enumerate(zip(self.discriminators, fakes, strict=True)):
            rc_real, _ = d(real)
            rc_fake, _ = d(fake.detach())
            losses[f"d{b + 1}"] = discriminator_loss(rc_real, rc_fake)
            logs[f"loss_d{b + 1}"] = losses[f"d{b + 1}"].detach()
            logs[f"d{b + 1}_real"] = rc_real.detach().float().sigmoid().mean()
            logs[f"d{b + 1}_fake"] = rc_fake.detach().float().sigmoid().mean()
        return losses, logs

    # Inference and engine hooks --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """§II-D ensembling inference: the mean of both branches (logits, or probabilities as log-probs);
        branch 1 alone with `ensemble` off."""
        if not self.cfg.ensemble:
            with eval_mode(self.model):
                return self.model(images)
        logits_1, logits_2 = self._branch_logits(images)
        if self.cfg.ensemble_average == "logits":
            return (logits_1 + logits_2) / 2
        prob = (logits_1.softmax(dim=1) + logits_2.softmax(dim=1)) / 2
        return prob.clamp_min(torch.finfo(prob.dtype).tiny).log()  # finite logits whose softmax is prob

    def networks(self) -> list[nn.Module]:
        return [self.model, self.model_2]

    def aux_optimizers(self) -> dict[str, AuxOptimizer]:
        return {f"d{b + 1}": AuxOptimizer(params=list(d.parameters()), kind="adam", lr=self.cfg.d_lr,
                                          betas=self.cfg.d_betas, poly=self.cfg.d_lr_poly)
                for b, d in enumerate(self.discriminators)}

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Both branches: encoders in 'backbone', decoders in 'head'; the discriminators have their own."""
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for net in self.branches:
            for role, params in net.param_groups().items():
                groups[role] += [p for p in params if p.requires_grad]
        return groups
