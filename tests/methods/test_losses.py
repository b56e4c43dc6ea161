"""Shared losses and targets of the weak-to-strong methods, checked by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from s4seg.config import IGNORE_INDEX
from s4seg.engine.method import Batch, PseudoLabels
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
)


def _ce(logits_pixel: list[float], label: int) -> float:
    """-log softmax(logits)[label] for one pixel, by hand."""
    return -logits_pixel[label] + math.log(sum(math.exp(v) for v in logits_pixel))


# ------------------------------------------------------------------------------------------------
# L_x
# ------------------------------------------------------------------------------------------------
def test_labeled_ce_is_the_mean_over_non_ignored_pixels() -> None:
    # one image, 2 classes, 1x3 pixels; the middle pixel is ignored
    logits = torch.tensor([[[[2.0, 0.0, -1.0]], [[0.0, 5.0, 1.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, IGNORE_INDEX, 1]]])
    expected = (_ce([2.0, 0.0], 0) + _ce([-1.0, 1.0], 1)) / 2
    assert labeled_ce(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_labeled_ce_of_an_all_ignored_batch_is_zero_with_a_graph() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = labeled_ce(logits, torch.full((1, 2, 2), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ------------------------------------------------------------------------------------------------
# Confidence masking, Eq. (4)
# ------------------------------------------------------------------------------------------------
def test_select_confident_keeps_pixels_at_exactly_tau() -> None:
    # equal logits over 2 classes give a confidence of exactly 0.5; over 4 classes, 0.25 (dyadic, exact)
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 1] = 10.0  # pixel 1: class 1, confidence ~1
    at_tau = select_confident(logits, 0.5)
    assert at_tau.conf[0, 0, 0].item() == 0.5
    assert at_tau.keep.tolist() == [[[True, True]]]
    assert at_tau.label.tolist() == [[[0, 1]]]
    # the next float32 above 0.5 (a float64 step would round back to 0.5 against float32 confidences)
    above = select_confident(logits, torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)).item())
    assert above.keep.tolist() == [[[False, True]]]
    assert select_confident(logits, 0.0).keep.all()


def test_select_confident_drops_invalid_pixels_and_has_documented_dtypes() -> None:
    logits = torch.zeros(2, 3, 2, 2)
    logits[:, 2] = 9.0  # confident class 2 everywhere
    valid = torch.tensor([[[True, False], [True, True]], [[False, False], [True, True]]])
    pseudo = select_confident(logits, 0.95, valid)
    assert pseudo.label.dtype == torch.int64 and pseudo.conf.dtype == torch.float32 and pseudo.keep.dtype == torch.bool
    assert torch.equal(pseudo.keep, valid)
    assert (pseudo.label == 2).all()


def test_select_confident_is_detached_and_float32_under_half_precision_logits() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    pseudo = select_confident(logits.half(), 0.5)
    assert not pseudo.conf.requires_grad and pseudo.conf.dtype == torch.float32


def test_unlabeled_ce_divides_by_valid_pixels_not_kept_ones() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 3)
    label = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    keep = torch.tensor([[[True, False, True], [False, False, False]]])
    valid = torch.tensor([[[True, True, True], [True, False, False]]])  # 4 valid, 2 kept
    kept_ce = sum(_ce(logits[0, :, i, j].tolist(), int(label[0, i, j])) for i, j in [(0, 0), (0, 2)])
    loss = unlabeled_ce(logits, label, keep, valid)
    assert loss.item() == pytest.approx(kept_ce / 4, rel=1e-6)
    assert loss.item() != pytest.approx(kept_ce / 2, rel=1e-3)


def test_unlabeled_ce_with_no_valid_pixel_is_zero_not_nan() -> None:
    logits = torch.randn(1, 2, 2, 2)
    none = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert unlabeled_ce(logits, torch.zeros(1, 2, 2, dtype=torch.long), none, none).item() == 0.0


def test_mask_ratio_counts_kept_among_valid() -> None:
    keep = torch.tensor([[True, False], [False, False]])
    valid = torch.tensor([[True, True], [True, False]])
    assert mask_ratio(keep, valid).item() == pytest.approx(1 / 3)


def test_valid_or_all() -> None:
    images = torch.zeros(2, 3, 4, 5)
    assert valid_or_all(None, images).shape == (2, 4, 5) and valid_or_all(None, images).all()
    given = torch.zeros(2, 4, 5, dtype=torch.uint8)
    assert valid_or_all(given, images).dtype == torch.bool


# ------------------------------------------------------------------------------------------------
# CutMix of the targets
# ------------------------------------------------------------------------------------------------
def _targets(value: int, b: int = 2, h: int = 4, w: int = 4) -> Targets:
    label = torch.full((b, h, w), value, dtype=torch.long)
    conf = torch.full((b, h, w), value / 10)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    return Targets(label=label, conf=conf, keep=conf >= 0.5, valid=valid)


def test_targets_cutmix_takes_label_conf_keep_valid_from_the_partner_inside_the_box() -> None:
    mine, partner = _targets(3), _targets(7)
    partner_valid = partner.valid.clone()
    partner_valid[0, 1, 1] = False  # padding of the partner, inside the box
    partner = Targets(partner.label, partner.conf, partner.keep & partner_valid, partner_valid)
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    box[0, 0:2, 1:3] = True  # sample 0: rows 0-1, cols 1-2; sample 1: no box
    mixed = mine.cutmix(partner, box)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                inside = bool(box[b, i, j])
                assert mixed.label[b, i, j].item() == (7 if inside else 3)
                assert mixed.conf[b, i, j].item() == pytest.approx(0.7 if inside else 0.3)
                padding = (b, i, j) == (0, 1, 1)
                assert mixed.valid[b, i, j].item() == (not padding)
                assert mixed.keep[b, i, j].item() == (inside and not padding)  # 0.3 < 0.5 outside
    assert mine.cutmix(partner, None) is mine


def test_targets_of_keeps_only_valid_and_flipped_reverses_the_batch() -> None:
    pseudo = PseudoLabels(
        label=torch.arange(3).view(3, 1, 1).expand(3, 2, 2).clone(),
        conf=torch.ones(3, 2, 2),
        keep=torch.ones(3, 2, 2, dtype=torch.bool),
    )
    valid = torch.ones(3, 2, 2, dtype=torch.bool)
    valid[0, 0, 0] = False
    t = Targets.of(pseudo, valid)
    assert not t.keep[0, 0, 0] and t.keep.sum() == 11
    flipped = t.flipped()
    assert flipped.label[:, 0, 0].tolist() == [2, 1, 0]
    assert not flipped.valid[2, 0, 0] and not flipped.keep[2, 0, 0]


def test_paste_images_inside_box_only() -> None:
    images, partner = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    box = torch.tensor([[[True, False], [False, False]]])
    pasted = paste(images, partner, box)
    assert pasted[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0] and pasted.sum() == 3
    assert paste(images, partner, None) is images


def _unlabeled_batch(b: int = 3) -> Batch:
    u = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 2, 2)
    valid_mix = torch.ones(b, 2, 2, dtype=torch.bool)
    valid_mix[:, 0, 0] = False
    return Batch(
        x=u, y=torch.zeros(b, 2, 2, dtype=torch.long), u_w=u, u_s1=u + 10, u_s2=u + 20,
        u_w_mix=u + 100, u_s1_mix=u + 110, u_s2_mix=u + 120, valid_u_mix=valid_mix,
    )  # fmt: skip


def test_label_partner_labels_the_partner_weak_view_with_its_valid_mask() -> None:
    batch = _unlabeled_batch()
    seen = {}

    def label(images: torch.Tensor, valid: torch.Tensor) -> PseudoLabels:
        seen["images"], seen["valid"] = images, valid
        return PseudoLabels(label=torch.full(valid.shape, 5), conf=torch.ones(valid.shape), keep=valid.clone())

    targets = label_partner(batch, "batch", label)
    assert seen["images"] is batch.u_w_mix and torch.equal(seen["valid"], batch.valid_u_mix)
    assert (targets.label == 5).all() and not targets.valid[:, 0, 0].any() and not targets.keep[:, 0, 0].any()
    partner = cutmix_partner(batch, _targets(0, b=3, h=2, w=2), targets)
    assert partner.u_s1 is batch.u_s1_mix and partner.u_s2 is batch.u_s2_mix and partner.targets is targets


def test_cutmix_partner_flip_reverses_views_and_targets() -> None:
    batch = _unlabeled_batch()
    assert label_partner(batch, "flip", lambda *_: pytest.fail("flip needs no extra labelling")) is None
    label = torch.arange(3).view(3, 1, 1).expand(3, 2, 2).clone()
    ones = torch.ones(3, 2, 2, dtype=torch.bool)
    weak = Targets(label=label, conf=torch.ones(3, 2, 2), keep=ones, valid=ones)
    partner = cutmix_partner(batch, weak, None)
    assert partner.u_s1[:, 0, 0, 0].tolist() == [12.0, 11.0, 10.0]
    assert partner.u_s2[:, 0, 0, 0].tolist() == [22.0, 21.0, 20.0]
    assert partner.targets.label[:, 0, 0].tolist() == [2, 1, 0]


def test_label_partner_errors() -> None:
    batch = _unlabeled_batch()
    batch.u_w_mix = None
    with pytest.raises(ValueError, match="needs the partner batch"):
        label_partner(batch, "batch", lambda *_: None)
    with pytest.raises(ValueError, match="'mirror' is not one of batch, flip"):
        label_partner(batch, "mirror", lambda *_: None)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def test_eval_mode_restores_the_previous_mode() -> None:
    net = nn.Sequential(nn.BatchNorm2d(2))
    net.train()
    with eval_mode(net):
        assert not net.training and not net[0].training
    assert net.training and net[0].training
    net.eval()
    with eval_mode(net):
        pass
    assert not net.training


def test_frozen_copy_is_an_independent_gradient_free_eval_copy() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)).train()
    copy = frozen_copy(net)
    assert not copy.training and all(not p.requires_grad for p in copy.parameters())
    assert all(p.requires_grad for p in net.parameters()) and net.training
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(copy[0].weight, net[0].weight)


def test_config_checks() -> None:
    check_common(0.0, "batch")
    check_common(1.0, "flip")
    with pytest.raises(ParamsError, match=r"conf_thresh must be in \[0, 1\], found 1.5"):
        check_common(1.5, "batch")
    with pytest.raises(ParamsError, match="cutmix_partner must be one of batch, flip, found 'mirror'"):
        check_common(0.95, "mirror")
    with pytest.raises(ParamsError, match=r"ema_gamma must be in \[0, 1\), found 1.0"):
        check_momentum(1.0)


def test_bn_stats_frozen_normalises_with_batch_stats_but_keeps_running_stats() -> None:
    from s4seg.methods.losses import bn_stats_frozen

    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.1)).train()
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    before = bn[0].running_mean.clone(), bn[0].running_var.clone()
    with bn_stats_frozen(bn):
        out = bn(x)
    assert torch.equal(bn[0].running_mean, before[0]) and torch.equal(bn[0].running_var, before[1])
    assert bn[0].momentum == 0.1  # restored
    # batch statistics were used: each channel of the output has mean 0
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    with bn_stats_frozen(bn, frozen=False):
        bn(x)
    assert not torch.equal(bn[0].running_mean, before[0])
