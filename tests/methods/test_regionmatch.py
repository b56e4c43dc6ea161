"""RegionMatch: regions and pooling, dual-threshold region targets, PRSPL (entropy quantiles, dynamic alpha,
agreement), CIR2R, PRCC, the region cap, CutMix transport, ablation switches, gradients, dump layers, `fit`."""

from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import K, TinySegmenter, make_batch, sgd_step  # tests/methods/tiny.py

from s4seg.config import IGNORE_INDEX, ModelConfig
from s4seg.engine.checkpoint import load_method
from s4seg.engine.loop import fit
from s4seg.engine.method import build_method, method_config
from s4seg.errors import ParamsError
from s4seg.evaluation.regions import pseudo_regions, relabel_regions
from s4seg.methods.fixmatch import FixMatch, FixMatchConfig
from s4seg.methods.regionmatch import (
    RegionMatch,
    RegionMatchConfig,
    WeakView,
    cap_regions,
    cir2r_loss,
    connected_regions,
    dynamic_alpha,
    entropy_quantile,
    masked_average_pool,
    per_image_mean,
    pixel_cells,
    prcc_loss,
    prspl_mask,
    region_ce,
    region_cells,
    region_targets,
    regions_on_features,
    transport,
)
from s4seg.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
import engine_helpers as h  # noqa: E402

# Low thresholds so that a randomly initialised tiny model has regions in I (soft and hard) and a mask M
LOW = {"tau_low": 0.35, "tau_high": 0.36}


def make(**cfg: Any) -> RegionMatch:
    torch.manual_seed(0)
    return RegionMatch(RegionMatchConfig(**cfg), TinySegmenter(), K)


# ------------------------------------------------------------------------------------------------
# Params
# ------------------------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_values() -> None:
    # the config class, not the workspace's params.yaml (which `dvc exp run -S` rewrites)
    section = {}
    cfg = method_config("regionmatch", section)
    assert cfg == RegionMatchConfig()
    assert (cfg.tau_low, cfg.tau_high, cfg.lambda_u, cfg.lambda_cir, cfg.lambda_pr, cfg.alpha0) == (
        0.85, 0.95, 0.5, 2.0, 1.0, 0.2)
    assert cfg.prspl and cfg.cir2r and cfg.prcc and cfg.region_cls_labeled and cfg.region_cls_unlabeled


@pytest.mark.parametrize(("section", "match"), [
    ({"tau_low": 0.96}, r"methods.regionmatch: need 0 <= tau_low <= tau_high <= 1, found 0.96 and 0.95"),
    ({"alpha_schedule": "cosine"}, "methods.regionmatch: alpha_schedule must be one of linear_decay, fixed, inverse"),
    ({"region_labels": "both"}, "methods.regionmatch: region_labels must be one of hard_soft, hard, soft"),
    ({"max_regions": 1}, "methods.regionmatch: max_regions must be >= 2"),
    ({"lambda_cir": -1.0}, "methods.regionmatch: lambda_cir must be >= 0"),
])  # fmt: skip
def test_bad_params_name_the_section(section: dict[str, Any], match: str) -> None:
    with pytest.raises(ParamsError, match=match):
        method_config("regionmatch", section)


# ------------------------------------------------------------------------------------------------
# Regions and pooling
# ------------------------------------------------------------------------------------------------
def test_connected_components_per_class_8_connected_numbered_over_the_batch() -> None:
    labels = torch.tensor([
        [[0, 0, 1, 1],
         [0, 1, 1, 2],
         [2, 2, 0, 0],
         [2, 2, 0, 0]],
        [[1, 0, 0, 0],
         [0, 1, 0, 0],
         [0, 0, 0, 0],
         [0, 0, 0, 0]],
    ])  # fmt: skip
    valid = torch.ones_like(labels, dtype=torch.bool)
    valid[1, 3, 3] = False
    regions, n = connected_regions(labels, valid)
    expected = torch.tensor([
        [[0, 0, 1, 1],
         [0, 1, 1, 2],
         [3, 3, 4, 4],
         [3, 3, 4, 4]],
        [[5, 6, 6, 6],   # the diagonal 1s are one region (8-connectivity), and so are the 0s around them
         [6, 5, 6, 6],
         [6, 6, 6, 6],
         [6, 6, 6, -1]],  # invalid: no region
    ])  # fmt: skip
    assert n == 7 and torch.equal(regions, expected)
    # the dump's convention (s4seg.evaluation.regions): renumbered per tile, the same regions
    for b in range(2):
        dumped = relabel_regions(regions[b].numpy())
        assert np.array_equal(dumped, pseudo_regions(labels[b].numpy(), valid[b].numpy()))


def test_masked_average_pool_is_the_region_mean_of_nearest_upsampled_features() -> None:
    torch.manual_seed(0)
    for (height, width), (fh, fw) in [((8, 8), (4, 4)), ((5, 7), (2, 3))]:
        features = torch.randn(2, 3, fh, fw)
        regions = torch.randint(-1, 4, (2, height, width))
        regions[1] += 4 * (regions[1] >= 0)  # ids 4..7 in the second image
        cpu = torch.device("cpu")
        raster = region_cells(regions, pixel_cells((2, height, width), (fh, fw), cpu), 8)  # repeated pairs
        grouped = regions_on_features(regions, (fh, fw), 8)  # pixels ordered cell by cell: fewer triplets
        assert len(grouped.region) < len(raster.region)
        upsampled = F.interpolate(features, size=(height, width), mode="nearest")  # (2, 3, H, W)
        for cells in (raster, grouped):
            pooled = masked_average_pool(features, cells)
            for i in range(8):
                inside = regions == i
                expected = upsampled.permute(0, 2, 3, 1)[inside].mean(0)
                assert torch.allclose(pooled[i], expected, atol=1e-6), i
                assert cells.area[i] == inside.sum()


def test_pooling_gradient_reaches_only_the_cells_under_the_region() -> None:
    features = torch.randn(1, 2, 2, 2, requires_grad=True)
    regions = torch.full((1, 4, 4), -1)
    regions[0, :2, :2] = 0  # exactly cell (0, 0)
    cells = region_cells(regions, pixel_cells((1, 4, 4), (2, 2), torch.device("cpu")), 1)
    (grad,) = torch.autograd.grad(masked_average_pool(features, cells).sum(), features)
    assert torch.equal(grad[0, :, 0, 0], torch.ones(2))
    assert grad[0, :, 1:].abs().sum() == grad[0, :, 0, 1].abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# Region classification targets and losses, Eq. (5)-(8)
# ------------------------------------------------------------------------------------------------
def test_dual_threshold_region_targets() -> None:
    mean_conf = torch.tensor([0.84, 0.90, 0.96, 0.95, 0.85])
    mean_prob = torch.tensor([[0.84, 0.1, 0.06], [0.05, 0.9, 0.05], [0.02, 0.02, 0.96], [0.95, 0.03, 0.02],
                              [0.1, 0.85, 0.05]])
    selected, hard, target = region_targets(mean_conf, mean_prob, 0.85, 0.95)
    assert selected.tolist() == [False, True, True, True, True]  # just below tau_low: dropped; at tau_low: kept
    assert hard.tolist() == [False, False, True, True, False]  # >= tau_high (Eq. 7), 0.95 included
    assert torch.equal(target[1], mean_prob[1]) and torch.equal(target[4], mean_prob[4])  # soft: q_tilde
    assert target[2].tolist() == [0, 0, 1] and target[3].tolist() == [1, 0, 0]  # hard: one-hot argmax
    _, hard_only, target_h = region_targets(mean_conf, mean_prob, 0.85, 0.95, "hard")
    assert hard_only.tolist() == selected.tolist() and target_h[1].tolist() == [0, 1, 0]
    _, soft_only, target_s = region_targets(mean_conf, mean_prob, 0.85, 0.95, "soft")
    assert not soft_only.any() and torch.equal(target_s, mean_prob)


def test_region_ce_hard_and_soft_and_the_per_image_mean() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]))
    hard = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    assert torch.allclose(region_ce(logits, hard), torch.tensor([math.log(2), -math.log(0.6)]))
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(region_ce(logits, soft)[0], torch.tensor(0.5 * math.log(2) + 0.5 * math.log(4)))
    # image 0: regions with losses 1 and 3; image 1: none (0); image 2: one region with loss 4
    values, image = torch.tensor([1.0, 3.0, 4.0]), torch.tensor([0, 0, 2])
    assert per_image_mean(values, image, 3).item() == pytest.approx((2.0 + 0.0 + 4.0) / 3)


# ------------------------------------------------------------------------------------------------
# PRSPL, Eq. (9)-(17)
# ------------------------------------------------------------------------------------------------
def test_entropy_quantile_is_the_kth_smallest_over_valid_pixels() -> None:
    values = torch.tensor([[[0.1, 0.5, 0.2, 0.9, 0.3]], [[0.7, 0.1, 0.4, 0.0, 0.0]]])
    valid = torch.tensor([[[True] * 5], [[True, True, True, False, False]]])
    # k = ceil(0.8 * 5) = 4 -> 0.5; k = ceil(0.8 * 3) = 3 -> 0.7 (the invalid 0.0s do not count)
    assert entropy_quantile(values, valid, 0.8).flatten().tolist() == pytest.approx([0.5, 0.7])
    assert entropy_quantile(values, valid, 0.5).flatten().tolist() == pytest.approx([0.3, 0.4])  # k = 3, 2
    # batch scope: 8 valid values, k = ceil(6.4) = 7 -> 0.7 for both images
    assert entropy_quantile(values, valid, 0.8, "batch").flatten().tolist() == pytest.approx([0.7, 0.7])
    # q n an integer up to rounding: (1 - 0.7) * 10 = 3.0000000000000004 in floating point, k = 3 (not 4)
    ten = torch.arange(10.0).reshape(1, 1, 10)
    assert entropy_quantile(ten, torch.ones_like(ten, dtype=torch.bool), 1 - 0.7).item() == 2.0
    assert entropy_quantile(values, torch.zeros_like(valid), 0.8).isinf().all()  # no valid pixel


def test_dynamic_alpha_decays_linearly_over_training() -> None:
    assert [dynamic_alpha(0.2, t, 100) for t in (0, 25, 50, 100, 150)] == pytest.approx([0.2, 0.15, 0.1, 0, 0])
    assert dynamic_alpha(0.2, 50, 100, "fixed") == 0.2
    assert dynamic_alpha(0.2, 25, 100, "inverse") == pytest.approx(0.05)
    assert dynamic_alpha(0.2, 50, 0) == 0.2  # total unknown: alpha_0


def test_prspl_mask_low_entropy_in_both_views_and_the_same_class() -> None:
    entropy_pixel = torch.tensor([[[0.1, 0.2, 0.9, 0.3]]])
    entropy_region = torch.tensor([[[0.5, 0.5, 0.1, 2.0]]])
    label_pixel = torch.tensor([[[0, 1, 1, 2]]])
    label_region = torch.tensor([[[0, 0, 1, 2]]])
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    # alpha 0.25: k = 3, T^p = 0.3, T^r = 0.5. Pixel 1 disagrees, 2 has a high H^p, 3 a high H^r
    mask = prspl_mask(entropy_pixel, entropy_region, label_pixel, label_region, valid, 0.25)
    assert mask.flatten().tolist() == [True, False, False, False]
    # alpha 0: thresholds are the maxima, only the agreement test is left
    mask = prspl_mask(entropy_pixel, entropy_region, label_pixel, label_region, valid, 0.0)
    assert mask.flatten().tolist() == [True, False, True, True]
    valid[0, 0, 0] = False
    assert not prspl_mask(entropy_pixel, entropy_region, label_pixel, label_region, valid, 0.0)[0, 0, 0]


def test_pseudo_labels_keep_is_the_prspl_mask_with_the_current_alpha() -> None:
    method, batch = make(), make_batch()
    view = method._label(batch.u_w, batch.valid_u)
    h_p = -(view.prob * view.prob.log()).sum(1)
    q_r = view.region_prob[view.regions.clamp_min(0)].permute(0, 3, 1, 2)  # painted per pixel
    h_r = -(q_r * q_r.log()).sum(1)
    kept = []
    for alpha in (0.0, 0.5):
        method.alpha_t.fill_(alpha)
        pseudo = method.pseudo_labels(batch.u_w, batch.valid_u)
        assert torch.equal(pseudo.keep, pseudo.extra["prspl_mask"])
        expected = torch.zeros_like(pseudo.keep)  # Eq. (11)-(17) by brute force, image by image
        for b in range(len(h_p)):
            v = batch.valid_u[b]
            k = math.ceil((1 - alpha) * int(v.sum()) - 1e-9)
            t_p, t_r = h_p[b][v].sort().values[k - 1], h_r[b][v].sort().values[k - 1]
            expected[b] = (h_p[b] <= t_p) & (h_r[b] <= t_r) & (q_r[b].argmax(0) == view.label[b]) & v
        assert torch.equal(pseudo.keep, expected), alpha
        kept.append(int(pseudo.keep.sum()))
    assert kept[1] < kept[0]


def test_alpha_follows_total_steps_and_warns_when_it_is_unset(caplog: pytest.LogCaptureFixture) -> None:
    method, batch = make(), make_batch()
    with caplog.at_level(logging.WARNING):
        method.training_step(batch, 3)
    assert float(method.alpha_t) == pytest.approx(0.2) and "total_steps is not set" in caplog.text
    method.total_steps = 10
    out = method.training_step(batch, 5)
    assert float(method.alpha_t) == pytest.approx(0.1) and out.logs["alpha_t"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------
# RSCC: CIR2R, Eq. (18)-(19), and PRCC, Eq. (20)-(21)
# ------------------------------------------------------------------------------------------------
def test_cir2r_on_known_similarities() -> None:
    weak = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)  # S^w = identity
    strong = torch.tensor([[3.0, 0.0], [1.0, 1.0]], requires_grad=True)  # S^s off-diagonal = 1/sqrt(2)
    loss = cir2r_loss(weak, strong)
    assert loss.item() == pytest.approx(2 * 0.5 / 4)  # two entries (1/sqrt 2)^2 out of 4
    grad_weak, grad_strong = torch.autograd.grad(loss, [weak, strong], allow_unused=True)
    assert grad_weak is None and grad_strong.abs().sum() > 0  # S^w is detached
    assert cir2r_loss(strong.detach(), strong).item() == pytest.approx(0.0, abs=1e-7)
    empty = torch.zeros(0, 2, requires_grad=True)
    assert cir2r_loss(empty, empty).item() == 0.0


def test_prcc_is_the_area_weighted_distance_to_the_normalised_region_proxy() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2).requires_grad_()  # cells [1,0], [0,2]
    regions = torch.tensor([[[0, 0, 0, 1],
                             [0, 1, 1, 1]]])  # fmt: skip
    cells = region_cells(regions, pixel_cells((1, 2, 4), (1, 2), torch.device("cpu")), 2)
    # region 0: 3 pixels in cell 0, 1 in cell 1 -> mu = (3, 1)/sqrt(10)
    d0, d1 = math.sqrt(2 - 6 / math.sqrt(10)), math.sqrt(2 - 2 / math.sqrt(10))
    only_0 = prcc_loss(features, cells, torch.tensor([True, False]))
    assert only_0.item() == pytest.approx((3 * d0 + d1) / 4, rel=1e-6)
    assert prcc_loss(features, cells, torch.tensor([True, True])).item() == pytest.approx((3 * d0 + d1) / 4, rel=1e-6)
    (grad,) = torch.autograd.grad(only_0, features)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # identical features in a region: distance 0 (clamped at 1e-8, finite gradient)
    flat = torch.ones(1, 2, 1, 2, requires_grad=True)
    zero = prcc_loss(flat, cells, torch.tensor([True, True]))
    assert zero.item() < 1e-6 and torch.isfinite(torch.autograd.grad(zero, flat)[0]).all()
    assert prcc_loss(features, cells, torch.tensor([False, False])).item() == 0.0


def test_region_cap_is_a_uniform_sample_in_id_order_given_the_seed() -> None:
    ids = torch.arange(10, 60)
    assert torch.equal(cap_regions(ids, 50), ids)
    torch.manual_seed(0)
    first = cap_regions(ids, 8)
    torch.manual_seed(0)
    again = cap_regions(ids, 8)
    torch.manual_seed(1)
    other = cap_regions(ids, 8)
    assert len(first) == 8 and len(set(first.tolist())) == 8 and set(first.tolist()) <= set(ids.tolist())
    assert torch.equal(first, first.sort().values) and torch.equal(first, again) and not torch.equal(first, other)


def test_cir2r_matrix_stays_bounded_by_max_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    from s4seg.methods import regionmatch

    sizes = []
    original = regionmatch.cir2r_loss
    monkeypatch.setattr(regionmatch, "cir2r_loss", lambda w, s: sizes.append(len(s)) or original(w, s))
    method = make(min_region_cells=0.0, max_regions=5)  # every region counts; far more than 5
    out = method.training_step(make_batch(), 0)
    assert sizes == [5] and out.logs["cir_regions"] == 5.0 and out.logs["regions_large"] > 5


# ------------------------------------------------------------------------------------------------
# CutMix transport
# ------------------------------------------------------------------------------------------------
def _view(regions: torch.Tensor, conf: float, label: int, embedding: torch.Tensor) -> WeakView:
    b, hh, ww = regions.shape
    n = int(regions.max()) + 1
    prob = torch.full((b, K, hh, ww), (1 - conf) / (K - 1))
    prob[:, label] = conf
    return WeakView(prob=prob, label=torch.full_like(regions, label), conf=torch.full((b, hh, ww), conf),
                    valid=regions >= 0, keep=regions >= 0, prspl=regions >= 0, regions=regions,
                    region_prob=torch.full((n, K), 1 / K), embedding=embedding)


def test_transport_keeps_visible_regions_and_pools_weak_features_from_each_source() -> None:
    own_regions = torch.tensor([[[0, 0, 1, 1]] * 4])  # left half region 0, right half region 1
    partner_regions = torch.zeros(1, 4, 4, dtype=torch.long)
    partner_regions[0, 0, 0] = -1  # a padding pixel of the partner (outside the box: never visible)
    own_emb, partner_emb = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    own, partner = _view(own_regions, 0.9, 0, own_emb), _view(partner_regions, 0.6, 2, partner_emb)
    box = torch.zeros(1, 4, 4, dtype=torch.bool)
    box[0, :, 3] = True  # the last column comes from the partner
    box[0, 0, 2] = True
    t = transport(own, partner, box)
    expected = torch.tensor([[[0, 0, 1, 2]] + [[0, 0, 1, 2]] * 3])
    expected[0, 0, 2] = 2  # own region 1 keeps its 3 visible pixels; partner region 0 has 5
    assert torch.equal(t.regions, expected)
    assert t.mean_conf.tolist() == pytest.approx([0.9, 0.9, 0.6])
    assert t.mean_prob[2].tolist() == pytest.approx([0.2, 0.2, 0.6]) and t.image.tolist() == [0, 0, 0]
    assert torch.equal(t.label, torch.where(box, 2, 0))
    pooled = masked_average_pool(t.weak_features, t.weak_cells)
    own_px, partner_px = own_emb[0].permute(1, 2, 0), partner_emb[0].permute(1, 2, 0)
    assert torch.allclose(pooled[1], own_px[~box[0] & (own_regions[0] == 1)].mean(0))
    assert torch.allclose(pooled[2], partner_px[box[0]].mean(0))  # from the partner's weak features
    assert t.weak_cells.area.tolist() == [8.0, 3.0, 5.0]


# ------------------------------------------------------------------------------------------------
# The method: wiring, ablations, gradients, dump layers
# ------------------------------------------------------------------------------------------------
def _terms(out: Any) -> dict[str, float]:
    return {k: float(out.logs[k]) for k in ("loss_p_l", "loss_p_u", "loss_r_l", "loss_r_u", "loss_cir", "loss_pr")}


def test_full_step_has_every_term_and_eq_4_sums_them() -> None:
    out = make(**LOW).training_step(make_batch(), 0)
    terms = _terms(out)
    assert all(v > 0 for v in terms.values()), terms
    assert 0 < float(out.logs["region_selected_share"]) <= 1 and 0 < float(out.logs["region_hard_share"]) < 1
    expected = (terms["loss_p_l"] + terms["loss_p_u"] + terms["loss_r_l"] + 0.5 * terms["loss_r_u"]
                + 2.0 * terms["loss_cir"] + 1.0 * terms["loss_pr"])
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert float(out.logs["loss_r"]) == pytest.approx(terms["loss_r_l"] + 0.5 * terms["loss_r_u"], rel=1e-6)


@pytest.mark.parametrize(("switch", "term", "weight"), [
    ("cir2r", "loss_cir", 2.0), ("prcc", "loss_pr", 1.0),
    ("region_cls_labeled", "loss_r_l", 1.0), ("region_cls_unlabeled", "loss_r_u", 0.5),
])  # fmt: skip
def test_each_ablation_switch_removes_its_term_only(switch: str, term: str, weight: float) -> None:
    batch = make_batch()
    full = make(**LOW).training_step(batch, 0)
    ablated = make(**LOW, **{switch: False}).training_step(batch, 0)
    assert float(ablated.logs[term]) == 0.0 and float(full.logs[term]) > 0
    others = {k: v for k, v in _terms(ablated).items() if k != term}
    assert others == pytest.approx({k: v for k, v in _terms(full).items() if k != term}, rel=1e-5)
    assert full.loss.item() - ablated.loss.item() == pytest.approx(weight * float(full.logs[term]), rel=1e-4)


def test_prspl_off_trains_on_the_fixed_confidence_mask() -> None:
    batch = make_batch()
    method = make(prspl=False, conf_thresh=0.4)
    pseudo = method.pseudo_labels(batch.u_w, batch.valid_u)
    assert torch.equal(pseudo.keep, (pseudo.conf >= 0.4) & batch.valid_u) and not pseudo.extra["prspl_mask"].any()
    with_prspl = make(conf_thresh=0.4).pseudo_labels(batch.u_w, batch.valid_u)
    assert not torch.equal(with_prspl.keep, pseudo.keep)


@pytest.mark.parametrize("halve", [False, True])
def test_everything_off_is_fixmatch(halve: bool) -> None:
    batch = make_batch()
    off = {k: False for k in ("prspl", "cir2r", "prcc", "region_cls_labeled", "region_cls_unlabeled")}
    out = make(**off, conf_thresh=0.4, halve_loss=halve).training_step(batch, 0)
    torch.manual_seed(0)
    reference = FixMatch(FixMatchConfig(conf_thresh=0.4, halve_loss=halve), TinySegmenter(), K).training_step(batch, 0)
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)
    assert float(out.logs["loss_p_u"]) == pytest.approx(float(reference.logs["loss_u_s"]))
    assert float(out.logs["loss_p_u"]) > 0
    assert torch.equal(out.pseudo.keep, reference.pseudo.keep)


def test_strong_pixel_loss_trains_on_the_cutmixed_prspl_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    from s4seg.methods import regionmatch

    method, batch = make(**LOW), make_batch()
    # eval-mode labelling, as the step does before its train-mode passes move the BN statistics
    weak, partner = method.pseudo_labels(batch.u_w, batch.valid_u), method.pseudo_labels(batch.u_w_mix,
                                                                                         batch.valid_u_mix)
    seen = {}
    original = regionmatch.unlabeled_ce
    monkeypatch.setattr(regionmatch, "unlabeled_ce", lambda *a: seen.update(args=a) or original(*a))
    method.training_step(batch, 0)
    _, label, keep, valid = seen["args"]
    assert torch.equal(keep, torch.where(batch.box1, partner.keep, weak.keep)) and keep.any()
    assert torch.equal(label, torch.where(batch.box1, partner.label, weak.label))
    assert torch.equal(valid, torch.where(batch.box1, batch.valid_u_mix, batch.valid_u))


@pytest.mark.parametrize(("on", "reached", "not_reached"), [
    ("region_cls_labeled", {"projection", "region_classifier"}, set()),
    ("region_cls_unlabeled", {"projection", "region_classifier"}, set()),
    ("cir2r", {"projection"}, {"region_classifier"}),
    ("prcc", set(), {"projection", "region_classifier"}),
])  # fmt: skip
def test_gradients_of_each_term_reach_the_right_modules(on: str, reached: set[str], not_reached: set[str]) -> None:
    off = {k: False for k in ("cir2r", "prcc", "region_cls_labeled", "region_cls_unlabeled")}
    method = make(**LOW, **{**off, on: True})
    out = method.training_step(make_batch(), 0)
    out.loss.backward()
    for name in reached:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(method, name).parameters()), name
    for name in not_reached:
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in getattr(method, name).parameters()), name
    assert all(p.grad is not None for p in method.model.parameters())


def test_pseudo_labels_carry_the_dump_layers() -> None:
    method, batch = make(), make_batch()
    pseudo = method.pseudo_labels(batch.u_w, batch.valid_u)
    b, hh, ww = batch.valid_u.shape
    assert set(pseudo.extra) == {"region_classifier_label", "region_classifier_conf", "prspl_mask"}
    assert all(v.shape == (b, hh, ww) for v in pseudo.extra.values())
    assert pseudo.extra["region_classifier_label"].dtype == torch.uint8
    assert pseudo.regions.dtype == torch.int32
    assert (pseudo.regions[~batch.valid_u] == -1).all() and (pseudo.extra["region_classifier_label"][
        ~batch.valid_u] == 255).all()
    view = method._label(batch.u_w, batch.valid_u)
    conf_r, label_r = view.region_prob.max(1)
    inside = pseudo.regions >= 0
    assert torch.equal(pseudo.extra["region_classifier_label"][inside].long(), label_r[pseudo.regions[inside].long()])
    assert torch.allclose(pseudo.extra["region_classifier_conf"][inside].float(),
                          conf_r[pseudo.regions[inside].long()], atol=1e-3)
    for i in range(b):  # regions: the connected components of the pseudo-label
        assert np.array_equal(relabel_regions(pseudo.regions[i].numpy()),
                              pseudo_regions(pseudo.label[i].numpy(), batch.valid_u[i].numpy()))


def test_training_step_pseudo_is_the_eval_mode_selection_and_weak_side_has_no_grad() -> None:
    method, batch = make(**LOW), make_batch()
    expected = method.pseudo_labels(batch.u_w, batch.valid_u)
    out = method.training_step(batch, 0)
    assert torch.equal(out.pseudo.keep, expected.keep) and torch.equal(out.pseudo.label, expected.label)
    assert not out.pseudo.conf.requires_grad and method.model.training


def test_weak_labels_from_train_forward_labels_with_the_train_mode_joint_pass() -> None:
    method, batch = make(weak_labels_from_train_forward=True), make_batch()
    out = method.training_step(batch, 0)
    with torch.no_grad():  # train-mode BN normalises with batch statistics: the same logits again
        logits, _ = method._forward(torch.cat([batch.x, batch.u_w]))
    assert torch.equal(out.pseudo.label, logits[len(batch.x):].argmax(1))
    assert not torch.equal(out.pseudo.label, make().pseudo_labels(batch.u_w, batch.valid_u).label)


def test_weak_labels_from_train_forward_and_flip_partner_run() -> None:
    for cfg in ({"weak_labels_from_train_forward": True}, {"cutmix_partner": "flip"}):
        method = make(**LOW, **cfg)
        out = method.training_step(make_batch(), 0)
        assert torch.isfinite(out.loss) and float(out.logs["loss_cir"]) > 0
        out.loss.backward()
        assert all(p.grad is not None for p in method.region_classifier.parameters())


def test_smoke_a_few_sgd_steps() -> None:
    method = make(**LOW)
    params = [p for v in method.trainable_groups().values() for p in v]
    assert {id(p) for p in method.projection.parameters()} <= {id(p) for p in method.trainable_groups()["head"]}
    before = [p.detach().clone() for p in params]
    for t in range(3):
        out = method.training_step(make_batch(seed=t), t)
        assert torch.isfinite(out.loss) and all(math.isfinite(float(v)) for v in out.logs.values())
        sgd_step(out.loss, params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


# ------------------------------------------------------------------------------------------------
# Through the engine
# ------------------------------------------------------------------------------------------------
def test_two_steps_through_fit_and_reload(tmp_path: Path) -> None:
    store = h.make_store(tmp_path / "tiles.zarr", tile=32)
    model_cfg = ModelConfig(encoder="resnet18", weights=None, decoder_channels=32)
    torch.manual_seed(0)
    method = build_method("regionmatch", {}, build_model(model_cfg, len(h.CLASSES)), len(h.CLASSES))
    method.total_steps = 2  # what the engine is to set (see the method's docstring)
    cfg = h.tiny_train_config(iterations=2, crop=32, scale_range=(1.0, 1.0))
    fit(method, store, h.make_split(), cfg, model_cfg=model_cfg, seed=0, out_path=tmp_path / "model.pt",
        log_path=tmp_path / "log.csv", checkpoint_dir=tmp_path / "ckpt")
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) and math.isfinite(float(r["loss_cir"])) for r in rows)
    loaded = load_method(tmp_path / "model.pt")
    assert loaded.name == "regionmatch" and float(loaded.alpha_t) == pytest.approx(0.1)  # alpha of step 1 of 2
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert loaded.predict(images).shape == (2, len(h.CLASSES), 32, 32)
        pseudo = loaded.pseudo_labels(images)
    assert pseudo.keep.shape == (2, 32, 32) and pseudo.regions.dtype == torch.int32
    assert IGNORE_INDEX == 255
