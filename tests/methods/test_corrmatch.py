"""CorrMatch: correlation map, pixel and region propagation, dynamic threshold, losses, engine run and resume."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import zarr
from tiny import K, TinySegmenter, make_batch, sgd_step  # tests/methods/tiny.py
from torch import Tensor, nn

from s4seg.config import ModelConfig
from s4seg.engine.checkpoint import load_method
from s4seg.engine.loop import fit
from s4seg.engine.method import build_method, method_config
from s4seg.errors import ParamsError
from s4seg.evaluation.dump import write_dump
from s4seg.methods import corrmatch
from s4seg.methods.corrmatch import (
    NO_REGION,
    CorrMatch,
    CorrMatchConfig,
    class_max_confidence,
    correlation_map,
    corrmatch_loss,
    propagate_pixels,
    propagate_regions,
    region_masks,
    soft_consistency,
    updated_threshold,
)
from s4seg.methods.losses import valid_or_all
from s4seg.models import build_model
from s4seg.models.base import Segmenter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
import engine_helpers as h  # noqa: E402


def make(**cfg: Any) -> CorrMatch:
    torch.manual_seed(0)
    return CorrMatch(CorrMatchConfig(**cfg), TinySegmenter(), K)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_values() -> None:
    # the config class, not the workspace's params.yaml (which `dvc exp run -S` rewrites)
    section = {}
    cfg = method_config("corrmatch", section)
    assert cfg == CorrMatchConfig()
    assert (cfg.tau_init, cfg.tau_momentum, cfg.region_rows) == (0.85, 0.999, 128)
    assert (cfg.lambda_hard, cfg.lambda_soft, cfg.lambda_corr) == (0.5, 0.25, 0.25)
    assert not cfg.fp_stream


def test_bad_params_name_the_section() -> None:
    with pytest.raises(ParamsError, match=r"methods.corrmatch: tau_momentum must be in \[0, 1\], found 1.5"):
        method_config("corrmatch", {"tau_momentum": 1.5})
    with pytest.raises(ParamsError, match="methods.corrmatch: region_rows must be >= 0, found -1"):
        method_config("corrmatch", {"region_rows": -1})


class TokenSegmenter(Segmenter):
    """A model whose deepest 'feature' is a (B, N, C) token sequence: no correlation map possible."""

    def __init__(self) -> None:
        super().__init__(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.backbone = nn.Linear(3, 4)

    def encode(self, images: Tensor) -> list[Tensor]:
        return [self.backbone(images.flatten(2).transpose(1, 2))]


def test_an_encoder_without_a_feature_map_is_a_params_error_naming_it() -> None:
    with pytest.raises(ParamsError, match=r"deepest feature of encoder Linear is \(2, 4096, 4\)"):
        CorrMatch(CorrMatchConfig(), TokenSegmenter(), K)


def test_correlation_head_is_built_from_the_deepest_feature_and_trains_in_the_head_group() -> None:
    method = make()
    assert method.correlation.proj[0].in_channels == 6  # TinySegmenter's c4
    assert method.correlation.query.out_channels == method.correlation.key.out_channels == K
    head = {id(p) for p in method.trainable_groups()["head"]}
    assert all(id(p) in head for p in method.correlation.parameters())


# ------------------------------------------------------------------------------------------------
# Correlation map and pixel propagation, Eq. (4)-(5)
# ------------------------------------------------------------------------------------------------
def test_correlation_rows_sum_to_one_on_the_last_axis() -> None:
    torch.manual_seed(0)
    c = correlation_map(torch.randn(2, K, 10), torch.randn(2, K, 10))
    assert c.shape == (2, 10, 10)
    assert torch.allclose(c.sum(dim=-1), torch.ones(2, 10))  # row i: softmax over j
    assert not torch.allclose(c.sum(dim=1), torch.ones(2, 10))  # columns are not normalised


def test_correlation_is_scaled_by_sqrt_k_before_the_softmax() -> None:
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])  # K = 4 channels, 2 positions
    k = torch.tensor([[[2.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    # q_0 . k = (2, 1), q_1 . k = (2, 0); / sqrt(4) = (1, 0.5), (1, 0)
    expected = torch.tensor([[[math.exp(1), math.exp(0.5)], [math.exp(1), 1.0]]])
    expected = expected / expected.sum(dim=-1, keepdim=True)
    assert torch.allclose(correlation_map(q, k), expected)


def test_pixel_propagation_equals_a_brute_force_loop() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, K, 4, 5)
    corr = correlation_map(torch.randn(2, K, 20), torch.randn(2, K, 20))
    z = propagate_pixels(logits, corr, (4, 5), (4, 5))  # same grid: both resizes are the identity
    p = logits.flatten(2)
    brute = torch.zeros(2, K, 20)
    for b in range(2):
        for c in range(K):
            for j in range(20):
                brute[b, c, j] = sum(p[b, c, i] * corr[b, i, j] for i in range(20))
    assert torch.allclose(z.flatten(2), brute, atol=1e-5)
    # other grid: logits resized to it (f1), z resized back to the crop
    logits = torch.randn(2, K, 12, 12)
    small = F.interpolate(logits, size=(4, 5), mode="bilinear", align_corners=True)
    z = propagate_pixels(logits, corr, (4, 5), (12, 12))
    expected = F.interpolate(torch.bmm(small.flatten(2), corr).view(2, K, 4, 5), size=(12, 12), mode="bilinear",
                             align_corners=True)
    assert z.shape == (2, K, 12, 12) and torch.allclose(z, expected, atol=1e-6)


def test_pixel_propagation_trains_the_map_not_the_logits() -> None:
    logits = torch.randn(1, K, 4, 4, requires_grad=True)
    scores = torch.randn(1, 16, 16, requires_grad=True)
    z = propagate_pixels(logits, scores.softmax(-1), (4, 4), (8, 8))
    z.sum().backward()
    assert logits.grad is None and scores.grad is not None and scores.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Region propagation, Eq. (7)-(10)
# ------------------------------------------------------------------------------------------------
def test_region_mask_resizes_then_normalises_then_binarises_strictly() -> None:
    rows = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]]])  # (1, 2, 2, 2)
    masks = region_masks(rows, (3, 3))
    # bilinear, align_corners: [[0, .5, 1], [1, 1.5, 2], [2, 2.5, 3]] / 3; the centre is exactly 0.5: out
    assert masks[0, 0].tolist() == [[False, False, False], [False, False, True], [True, True, True]]
    assert not masks[0, 1].any()  # a flat row: 0/0, empty


def test_region_masks_equal_a_per_row_loop_across_chunks() -> None:
    torch.manual_seed(0)
    rows = torch.rand(2, 40, 3, 4)  # 40 > one chunk of 32
    masks = region_masks(rows, (7, 9))
    for b in range(2):
        for k in range(40):
            up = F.interpolate(rows[b, k][None, None], size=(7, 9), mode="bilinear", align_corners=True)[0, 0]
            assert torch.equal(masks[b, k], (up - up.min()) / (up.max() - up.min()) > 0.5)


def reference_propagation(masks: Tensor, label: Tensor, confident: Tensor, tau: float) -> tuple[Tensor, ...]:
    """The straightforward per-image, per-region loop of the code (reference §2 step 5), paper's r1 > tau."""
    label, expanded = label.clone(), confident.clone()
    regions = torch.full(label.shape, NO_REGION, dtype=torch.int32)
    for b in range(masks.shape[0]):
        for k in range(masks.shape[1]):
            region = masks[b, k]
            support = region & confident[b]
            n_support = int(support.sum())
            if n_support == 0 or not n_support / int(region.sum()) > tau:
                continue
            classes, counts = label[b][support].unique(return_counts=True)  # sorted: ties go to the smallest
            best = int(counts.argmax())
            if int(counts[best]) / n_support > tau:
                label[b][region] = classes[best]
                expanded[b] |= region
                regions[b][region] = k + 1
    return label, expanded, regions


def test_r1_r2_acceptance_and_relabelling_on_a_constructed_example() -> None:
    # one 1 x 6 image; F = confident; label; five regions, tau = 0.5
    label = torch.tensor([[[0, 0, 1, 1, 2, 2]]])
    confident = torch.tensor([[[True, True, True, False, True, True]]])

    def region(*cols: int) -> Tensor:
        m = torch.zeros(1, 6, dtype=torch.bool)
        m[0, list(cols)] = True
        return m

    masks = torch.stack([
        region(0, 1, 2, 3),  # k=0: S = 0,1,2 -> r1 = 3/4 > .5; labels 0,0,1 -> r2 = 2/3 > .5: all four -> 0
        region(3, 4),  # k=1: S = {4}, r1 = 1/2, not > .5 (paper's strict r1): rejected
        region(1, 2, 4),  # k=2: labels now 0,0,2 (col 2 was relabelled by k=0) -> 0 wins with 2/3: accepted
        region(4, 5),  # k=3: labels 0 (from k=2), 2 -> tie 1/2: r2 = .5 not > .5: rejected
        region(5),  # k=4: S = {5}: r1 = 1, class 2 with r2 = 1: accepted (relabels nothing, expands nothing)
    ])[None]  # (1, 5, 1, 6)
    out = propagate_regions(masks, label, confident, 0.5, K)
    assert out.label.tolist() == [[[0, 0, 0, 0, 0, 2]]]
    assert out.expanded.tolist() == [[[True, True, True, True, True, True]]]  # col 3 joined M through k=0
    assert out.regions.tolist() == [[[1, 3, 3, 1, 3, 5]]]
    assert out.accepted.tolist() == [[True, False, True, False, True]]
    # the order matters: without k=0 relabelling col 2, k=2 sees labels 0, 1, 2 and has no majority
    alone = propagate_regions(masks[:, 2:3], label, confident, 0.5, K)
    assert alone.accepted.tolist() == [[False]]
    # ties go to the smallest class: labels 2, 1 on a region at tau 0 -> class 1
    tie = propagate_regions(region(4, 2)[None, None], torch.tensor([[[0, 0, 1, 0, 2, 0]]]), confident, 0.0, K)
    assert tie.label[0, 0, 2].item() == 1 and tie.label[0, 0, 4].item() == 1
    assert tie.label.tolist() == reference_propagation(region(4, 2)[None, None], torch.tensor(
        [[[0, 0, 1, 0, 2, 0]]]), confident, 0.0)[0].tolist()


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_region_propagation_equals_the_per_region_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b, n, size = 3, 24, (10, 12)
    masks = region_masks(torch.rand(b, n, 3, 3, generator=g), size)
    masks &= torch.rand(b, 1, *size, generator=g) > 0.1  # some pixels not allowed (box, padding)
    coarse = torch.randint(0, K, (b, 1, 3, 3), generator=g).float()
    label = F.interpolate(coarse, size=size, mode="nearest")[:, 0].long()  # blobs: majorities exist
    noise = torch.rand(b, *size, generator=g) < 0.15
    label = torch.where(noise, torch.randint(0, K, (b, *size), generator=g), label)
    confident = torch.rand(b, *size, generator=g) < 0.8
    for tau in (0.0, 0.3, 0.5, 0.6, 0.8):
        fast = propagate_regions(masks, label, confident, tau, K)
        ref = reference_propagation(masks, label, confident, tau)
        assert torch.equal(fast.label, ref[0]) and torch.equal(fast.expanded, ref[1])
        assert torch.equal(fast.regions, ref[2])
    assert propagate_regions(masks, label, confident, 0.3, K).accepted.any()  # the inputs do exercise it


def test_regions_stay_off_the_cutmix_box_and_the_padding() -> None:
    method, batch = make(tau_init=0.0, dynamic_tau=False), make_batch()  # tau 0: every region is accepted
    out = method.training_step(batch, 0)
    covered = out.pseudo.regions != NO_REGION
    assert covered.any()
    assert not (covered & batch.box1).any() and not (covered & ~batch.valid_u).any()
    assert not (out.pseudo.keep & ~batch.valid_u).any()


# ------------------------------------------------------------------------------------------------
# Dynamic threshold, Eq. (11)
# ------------------------------------------------------------------------------------------------
def test_class_maxima_and_the_threshold_update_over_a_few_steps() -> None:
    # 4 pixels, K = 3: softmax confidences of argmax class 0: .7, .9; class 2: .6; the .95 pixel is invalid
    def logits_of(probs: list[list[float]]) -> Tensor:
        return torch.tensor(probs).log().T.reshape(1, 3, 1, 4)

    probs = [[0.7, 0.2, 0.1], [0.9, 0.05, 0.05], [0.1, 0.3, 0.6], [0.0125, 0.95, 0.0375]]
    valid = torch.tensor([[[True, True, True, False]]])
    class_max = class_max_confidence(logits_of(probs), valid, 3)
    assert class_max.tolist() == pytest.approx([0.9, -1.0, 0.6])
    tau, expected = torch.tensor(0.85, dtype=torch.float64), 0.85
    for _ in range(3):  # new = mean(.9, .6) = .75 each step
        tau = updated_threshold(tau, class_max, 0.999)
        expected = 0.999 * expected + 0.001 * 0.75
        assert tau.item() == pytest.approx(expected, abs=1e-7)
    assert updated_threshold(tau, torch.full((3,), -1.0), 0.999).item() == tau.item()  # no class: no update
    assert updated_threshold(tau, torch.tensor([1.0, 1.0, 1.0]), 0.0).item() == 1.0


def test_only_training_step_moves_tau_and_it_is_in_the_state_dict() -> None:
    method, batch = make(), make_batch()
    assert "tau" in method.state_dict() and method.tau.item() == 0.85
    method.pseudo_labels(batch.u_w, batch.valid_u)
    method.eval()
    method.predict(batch.u_w)
    method.train()
    assert method.tau.item() == 0.85
    out = method.training_step(batch, 0)
    assert method.tau.item() != 0.85 and out.logs["tau"] == method.tau.item()
    fixed = make(dynamic_tau=False)
    fixed.training_step(batch, 0)
    assert fixed.tau.item() == 0.85


def test_training_thresholds_with_the_updated_tau(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(tau_momentum=0.0), make_batch()  # tau jumps to the new class-balanced maximum
    seen = {}
    select = corrmatch.select_confident

    def spy(logits: Tensor, tau: float, valid: Tensor | None = None) -> Any:
        seen.setdefault("tau", tau)
        return select(logits, tau, valid)

    monkeypatch.setattr(corrmatch, "select_confident", spy)
    method.training_step(batch, 0)
    assert seen["tau"] == method.tau.item() != 0.85


# ------------------------------------------------------------------------------------------------
# Losses, §3.4 and Eq. (1), (3), (6), (12)
# ------------------------------------------------------------------------------------------------
def test_each_loss_weight() -> None:
    one, zero = torch.tensor(1.0), torch.tensor(0.0)

    def weight(i: int, fp: bool = False) -> float:
        terms = [zero] * 6
        terms[i] = one
        return corrmatch_loss(*terms[:5], loss_u_fp=terms[5] if fp else None).item()

    # L = ((L_x + L_x^c) / 2 + 0.5 L_u^h + 0.25 L_u^s + 0.25 L_u^c) / 2
    assert [weight(i) for i in range(5)] == [0.25, 0.25, 0.25, 0.125, 0.125]
    # with the code's FP stream the hard weight is shared: 0.125 each (reference §4)
    assert [weight(2, fp=True), weight(5, fp=True)] == [0.125, 0.125]
    assert corrmatch_loss(zero, zero, zero, one, zero, (0.5, 0.1, 0.25)).item() == pytest.approx(0.05)


def test_soft_consistency_is_kl_weak_to_strong_over_valid_pixels() -> None:
    p_w = torch.tensor([0.5, 0.5, 0.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2).contiguous()
    logits_s = torch.tensor([0.25, 0.5, 0.25]).log().view(1, 3, 1, 1).expand(1, 3, 1, 2).contiguous()
    keep = torch.tensor([[[True, False]]])
    valid = torch.tensor([[[True, True]]])
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.5)  # the 0 * log 0 term is 0
    assert soft_consistency(logits_s, p_w, keep, valid).item() == pytest.approx(kl / 2)


def test_streams_train_on_the_right_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(tau_init=0.0, dynamic_tau=False, region_rows=0), make_batch()
    method.eval()
    partner_label = method.predict(batch.u_w_mix).argmax(dim=1)  # eval mode, before any train-mode pass
    method.train()
    calls: list[tuple[tuple[int, ...], Tensor, Tensor, Tensor]] = []
    unlabeled_ce = corrmatch.unlabeled_ce

    def spy(logits: Tensor, label: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
        calls.append((tuple(logits.shape), label, keep, valid))
        return unlabeled_ce(logits, label, keep, valid)

    monkeypatch.setattr(corrmatch, "unlabeled_ce", spy)
    out = method.training_step(batch, 0)
    assert len(calls) == 3  # strong hard, strong corr, weak corr
    mixed_valid = torch.where(batch.box1, batch.valid_u_mix, batch.valid_u)
    (_, label_h, keep_h, valid_h), (_, label_sc, keep_sc, _), (_, label_wc, keep_wc, valid_wc) = calls
    assert torch.equal(valid_h, mixed_valid) and torch.equal(keep_h, mixed_valid)  # tau 0: every valid pixel
    assert torch.equal(label_h, label_sc) and torch.equal(keep_h, keep_sc)  # strong corr: the same targets
    assert torch.equal(label_wc, out.pseudo.label) and torch.equal(valid_wc, batch.valid_u)  # weak: un-mixed
    assert torch.equal(keep_wc, batch.valid_u)
    assert torch.equal(label_h, torch.where(batch.box1, partner_label, label_wc))  # the box: the partner's


def test_region_propagated_labels_reach_the_strong_loss_only(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(tau_init=0.0, dynamic_tau=False), make_batch()
    labels: list[Tensor] = []
    unlabeled_ce = corrmatch.unlabeled_ce
    monkeypatch.setattr(corrmatch, "unlabeled_ce", lambda lo, la, k, v: labels.append(la) or unlabeled_ce(lo, la, k, v))
    out = method.training_step(batch, 0)
    strong, _, weak = labels
    outside = ~batch.box1
    assert torch.equal(strong[outside], out.pseudo.label[outside])  # propagated
    assert not torch.equal(weak, out.pseudo.label)  # the weak corr loss keeps the un-propagated label


@pytest.mark.parametrize("unmixed", [False, True])
def test_kl_target_inside_the_box(monkeypatch: pytest.MonkeyPatch, unmixed: bool) -> None:
    method, batch = make(kl_unmixed_target=unmixed), make_batch()
    method.eval()
    prob_w, prob_mix = (method.predict(u).softmax(dim=1) for u in (batch.u_w, batch.u_w_mix))
    method.train()
    seen = []
    soft = corrmatch.soft_consistency
    monkeypatch.setattr(corrmatch, "soft_consistency", lambda lo, p, k, v: seen.append(p) or soft(lo, p, k, v))
    method.training_step(batch, 0)
    inside = batch.box1[:, None].expand_as(prob_w)
    assert torch.allclose(seen[0][inside], (prob_w if unmixed else prob_mix)[inside])  # the code: un-mixed
    assert torch.allclose(seen[0][~inside], prob_w[~inside])


# ------------------------------------------------------------------------------------------------
# training_step, pseudo_labels, predict
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to_encoder", [True, False])
def test_correlation_losses_train_the_branch_and_the_encoder_only_if_asked(
        monkeypatch: pytest.MonkeyPatch, to_encoder: bool) -> None:
    method = make(tau_init=0.0, dynamic_tau=False, corr_grad_to_encoder=to_encoder)
    monkeypatch.setattr(corrmatch, "corrmatch_loss", lambda lx, lxc, lh, ls, lc, w, fp=None: lxc + lc)
    method.training_step(make_batch(), 0).loss.backward()
    assert all(p.grad is None for p in method.model.classifier.parameters())  # decoder: logits are detached
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.correlation.parameters()
               if p.dim() > 1)
    encoder_grad = method.model.c4[0].weight.grad  # the encoder, through the deepest feature
    if to_encoder:  # the paper's and the code's path
        assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    else:  # the ablation: nothing of the model learns from the correlation losses
        assert all(p.grad is None for p in method.model.parameters())


def test_training_step_gradients_reach_every_trainable_parameter() -> None:
    method = make(tau_init=0.0, dynamic_tau=False)
    out = method.training_step(make_batch(), 0)
    out.loss.backward()
    trainable = [p for group in method.trainable_groups().values() for p in group]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert set(out.logs) >= {"loss_x", "loss_x_c", "loss_u_h", "loss_u_s", "loss_u_c", "tau", "mask_ratio",
                             "expanded_ratio", "regions_accepted"}
    assert float(out.logs["expanded_ratio"]) >= float(out.logs["mask_ratio"])


def test_relabelled_ratio_logs_the_confident_pixels_propagation_overwrote() -> None:
    """tau = 0 makes F every valid pixel, so `relabelled_ratio` is the valid share whose training label differs
    from the weak argmax (taken before the step, while BN still has the same running statistics)."""
    method, batch = make(tau_init=0.0, dynamic_tau=False), make_batch()
    valid = valid_or_all(batch.valid_u, batch.u_w)
    prior = method.pseudo_labels(batch.u_w, batch.valid_u).extra["prior_label"].long()
    out = method.training_step(batch, 0)
    changed = (out.pseudo.label != prior) & valid
    assert changed.any()  # the random head's regions do overwrite confident pixels
    assert float(out.logs["relabelled_ratio"]) == pytest.approx(changed.sum().item() / valid.sum().item())
    assert float(make(tau_init=0.0, dynamic_tau=False, region_rows=0).training_step(batch, 0)
                 .logs["relabelled_ratio"]) == 0.0


def test_fp_stream_is_a_param_and_adds_its_loss() -> None:
    method = make(fp_stream=True, tau_init=0.0, dynamic_tau=False)
    out = method.training_step(make_batch(), 0)
    assert "loss_u_fp" in out.logs and torch.isfinite(out.loss)
    assert "loss_u_fp" not in make().training_step(make_batch(), 0).logs


def test_default_pseudo_labels_are_what_training_selects() -> None:
    method, batch = make(region_rows=0, dynamic_tau=False, tau_init=0.4), make_batch()
    expected = method.pseudo_labels(batch.u_w, batch.valid_u)
    out = method.training_step(batch, 0)
    assert torch.equal(out.pseudo.label, expected.label) and torch.equal(out.pseudo.keep, expected.keep)
    train_forward = make(region_rows=0, dynamic_tau=False, tau_init=0.4, weak_labels_from_train_forward=True)
    assert not torch.equal(train_forward.training_step(batch, 0).pseudo.conf, out.pseudo.conf)


def test_pseudo_labels_for_the_dump() -> None:
    method, batch = make(tau_init=0.3, dynamic_tau=False), make_batch()
    rng = torch.get_rng_state()
    first = method.pseudo_labels(batch.u_w)
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG is untouched
    again = method.pseudo_labels(batch.u_w)
    assert torch.equal(first.regions, again.regions) and torch.equal(first.label, again.label)  # reproducible
    assert first.regions.dtype == torch.int32 and (first.regions != NO_REGION).any()
    assert set(first.extra) == {"confident", "prior_label", "expanded", "tau"}
    assert torch.equal(first.keep, first.extra["expanded"]) and (first.keep >= first.extra["confident"]).all()
    assert first.extra["tau"].shape == (2,) and first.extra["tau"][0].item() == pytest.approx(0.3)
    method.eval()
    prob = method.predict(batch.u_w).softmax(dim=1)
    assert torch.allclose(first.conf, prob.gather(1, first.label[:, None])[:, 0])  # conf of the stored label
    assert torch.equal(first.extra["confident"], prob.amax(dim=1) >= 0.3)  # F: conf >= tau, before propagation
    assert torch.equal(first.extra["prior_label"], prob.argmax(dim=1).to(torch.uint8))  # the label before it
    # at tau 0.35 F is part of the image and accepted regions add pixels to it: `confident` stays F, not M
    partial = make(tau_init=0.35, dynamic_tau=False)
    pseudo = partial.pseudo_labels(batch.u_w)
    assert torch.equal(pseudo.extra["confident"], partial.predict(batch.u_w).softmax(dim=1).amax(dim=1) >= 0.35)
    assert (pseudo.keep & ~pseudo.extra["confident"]).any()


def test_predict_is_the_plain_segmentation_output() -> None:
    method, batch = make(), make_batch()
    method.eval()
    with torch.no_grad():
        assert torch.equal(method.predict(batch.u_w), method.model(batch.u_w))


def test_smoke_a_few_sgd_steps() -> None:
    method = make(tau_init=0.5)
    params = [p for v in method.trainable_groups().values() for p in v]
    before = [p.detach().clone() for p in params]
    for t in range(3):
        out = method.training_step(make_batch(seed=t), t)
        assert torch.isfinite(out.loss) and all(math.isfinite(float(v)) for v in out.logs.values())
        sgd_step(out.loss, params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


# ------------------------------------------------------------------------------------------------
# Through the engine
# ------------------------------------------------------------------------------------------------
TILE = 32
MODEL = ModelConfig(weights=None, decoder_channels=16, output_stride=8)  # EfficientNet-Lite0: a 4 x 4 grid


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return h.make_store(tmp_path_factory.mktemp("tiles") / "tiles.zarr", tile=TILE)


def build_default() -> CorrMatch:
    torch.manual_seed(0)
    return build_method("corrmatch", None, build_model(MODEL, len(h.CLASSES)), len(h.CLASSES))


def _fit(method: CorrMatch, store: Any, out: Path) -> dict[str, Any]:
    cfg = h.tiny_train_config(iterations=2, checkpoint_every=1, crop=TILE, scale_range=(1.0, 1.0))
    return fit(method, store, h.make_split(), cfg, model_cfg=MODEL, seed=0, out_path=out / "model.pt",
               log_path=out / "log.csv", checkpoint_dir=out / "ckpt")


def _crash_at(method: CorrMatch, step_index: int) -> CorrMatch:
    original = method.training_step

    def step_or_crash(batch: Any, step: int) -> Any:
        if step == step_index:
            raise KeyboardInterrupt
        return original(batch, step)

    method.training_step = step_or_crash
    return method


def test_two_steps_through_fit_reload_dump_and_bit_identical_resume(store: Any, tmp_path: Path) -> None:
    method = build_default()
    _fit(method, store, tmp_path / "full")
    with open(tmp_path / "full" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["tau"]) != 0.85 and float(rows[0]["tau"]) != float(rows[1]["tau"])

    loaded = load_method(tmp_path / "full" / "model.pt")
    assert loaded.name == "corrmatch" and loaded.tau.item() == method.tau.item()
    with torch.no_grad():
        assert loaded.predict(torch.rand(1, 3, 33, 47)).shape == (1, len(h.CLASSES), 33, 47)
        pseudo = loaded.pseudo_labels(torch.rand(2, 3, TILE, TILE))
    assert pseudo.regions.shape == (2, TILE, TILE)
    quality = write_dump(loaded, store, [3, 4, 5], tmp_path / "pseudo.zarr", batch_size=2, device="cpu",
                         progress=False)
    group = zarr.open_group(str(tmp_path / "pseudo.zarr"), mode="r")
    added = group["keep"][:] & ~group["extra/confident"][:] & (group["gt"][:] != 255)
    assert quality.metrics()["propagated_coverage"] == pytest.approx(added.sum() / (group["gt"][:] != 255).sum())
    assert group.attrs["regions"] == "method"
    assert {"extra/confident", "extra/prior_label", "extra/expanded", "extra/tau"} <= set(group.attrs["layers"])
    prior, gt = group["extra/prior_label"][:], group["gt"][:]
    assert (prior == group["pseudo"][:])[group["regions"][:] == 0].all()  # only regions relabel (Eq. 10)
    relabelled = group["extra/confident"][:] & (prior != group["pseudo"][:]) & (gt != 255)
    assert quality.metrics()["relabelled_coverage"] == pytest.approx(relabelled.sum() / (gt != 255).sum())
    assert group["extra/tau"][:].tolist() == pytest.approx([loaded.tau.item()] * 3)
    assert (group["keep"][:] == group["extra/expanded"][:]).all()

    with pytest.raises(KeyboardInterrupt):
        _fit(_crash_at(build_default(), 1), store, tmp_path / "crash")
    assert _fit(build_default(), store, tmp_path / "crash")["resumed_from"] == 1
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "crash" / "model.pt", weights_only=True)["state_dict"]
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
