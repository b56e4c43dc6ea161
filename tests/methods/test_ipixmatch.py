"""IPixMatch: spatial distributions, KL and Pearson distances, log|Omega| normalisation, warm-up ramp, composition
with its three bases (exact base loss at alpha = 0, streams, delegation, gradients), dump layer, engine run."""

from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import K, TinySegmenter, make_batch  # tests/methods/tiny.py
from torch import Tensor

import s4seg.models
from s4seg.config import ModelConfig
from s4seg.engine.checkpoint import load_method
from s4seg.engine.loop import fit
from s4seg.engine.method import build_method, method_config
from s4seg.errors import ParamsError
from s4seg.methods.fixmatch import FixMatch
from s4seg.methods.ipixmatch import (
    IPixMatch,
    IPixMatchConfig,
    confident_set,
    inter_pixel_loss,
    kl_distance,
    pearson_distance,
    rampup_weight,
    spatial_log_distribution,
)
from s4seg.methods.losses import eval_mode
from s4seg.methods.unimatch import UniMatch, UniMatchConfig
from s4seg.methods.unimatch_v2 import UniMatchV2
from s4seg.runtime import make_runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
import engine_helpers as h  # noqa: E402

BASES = ("fixmatch", "unimatch", "unimatch_v2")


def make(seed: int = 0, **cfg: Any) -> IPixMatch:
    torch.manual_seed(seed)
    return IPixMatch(IPixMatchConfig(**cfg), TinySegmenter(), K)


def row(values: list[float], t: float = 1.0) -> Tensor:
    """(1, 1, 1, n) logits whose psi at temperature t is `values` (they must sum to 1)."""
    return (t * torch.tensor(values).log()).view(1, 1, 1, -1)


def everywhere(n: int) -> Tensor:
    return torch.ones(1, 1, n, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_values() -> None:
    # the config class, not the workspace's params.yaml (which `dvc exp run -S` rewrites)
    section = {}
    cfg = method_config("ipixmatch", section)
    assert cfg == IPixMatchConfig()
    assert (cfg.base, cfg.alpha, cfg.omega_thresh, cfg.temperature, cfg.distance) == ("unimatch", 1.0, 0.8, 4.0, "kl")
    # base_params is stored resolved: every key of the base's config, with its defaults
    assert cfg.base_params == method_config("unimatch", {}).__dict__


def test_base_params_are_validated_by_the_base_and_resolved() -> None:
    cfg = method_config("ipixmatch", {"base": "unimatch", "base_params": {"conf_thresh": 0.9}})
    assert UniMatchConfig(**cfg.base_params) == UniMatchConfig(conf_thresh=0.9)
    method = IPixMatch(cfg, TinySegmenter(), K)
    assert isinstance(method.base, UniMatch) and method.base.cfg.conf_thresh == 0.9


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"base": "nope"}, r"methods.ipixmatch: base 'nope' is not a registered method; choose one of: .*unimatch"),
        ({"base_params": {"fp_dropout": 2.0}}, r"methods.ipixmatch: base_params \(unimatch\): fp_dropout must be"),
        ({"base": "unimatch_v2", "base_params": {"fp_dropout": 0.5}},
         r"methods.ipixmatch: base_params \(unimatch_v2\): unknown key\(s\) fp_dropout"),
        ({"distance": "l2"}, "methods.ipixmatch: distance must be one of kl, pearson, found 'l2'"),
        ({"omega_thresh": 1.0}, r"methods.ipixmatch: omega_thresh must be in \[0, 1\)"),
        ({"temperature": 0.0}, "methods.ipixmatch: temperature must be > 0"),
        ({"warmup_fraction": 1.5}, r"methods.ipixmatch: warmup_fraction must be in \[0, 1\]"),
        ({"warmup_steps": -1}, "methods.ipixmatch: warmup_steps must be >= 0"),
    ],
)
def test_bad_params_name_the_section(section: dict[str, Any], match: str) -> None:
    with pytest.raises(ParamsError, match=match):
        method_config("ipixmatch", section)


# ------------------------------------------------------------------------------------------------
# Eq. (3)-(5)
# ------------------------------------------------------------------------------------------------
def test_omega_is_strictly_above_tau_and_never_padding() -> None:
    conf = torch.tensor([[[0.8, 0.81, 0.9, 0.2]]])
    valid = torch.tensor([[[True, True, False, True]]])
    assert confident_set(conf, valid, 0.8).tolist() == [[[False, True, False, False]]]


def test_spatial_distribution_is_a_softmax_over_omega_per_class() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    omega = torch.rand(2, 4, 5) > 0.5
    log_psi = spatial_log_distribution(logits, omega, temperature=4.0)  # (2, 3, 20)
    assert log_psi.shape == (2, 3, 20)
    psi = log_psi.exp() * omega.flatten(1)[:, None]
    assert torch.allclose(psi.sum(-1), torch.ones(2, 3))  # one distribution per image and class
    assert (log_psi[~omega.flatten(1)[:, None].expand(2, 3, 20)] == 0).all()  # nothing outside Omega
    for b in range(2):  # brute force: softmax of the Omega entries only
        for c in range(3):
            z = logits[b, c][omega[b]] / 4.0
            assert torch.allclose(log_psi[b, c][omega[b].flatten()], z.log_softmax(0), atol=1e-6)


def test_temperature_smooths_the_spatial_distribution() -> None:
    logits = row([0.25, 0.75], t=4.0)  # = (0, 4 ln 3): psi = (1/4, 3/4) at t = 4, (1/82, 81/82) at t = 1
    assert torch.allclose(spatial_log_distribution(logits, everywhere(2), 4.0).exp(), torch.tensor([0.25, 0.75]))
    assert torch.allclose(spatial_log_distribution(logits, everywhere(2), 1.0).exp(), torch.tensor([1, 81]) / 82)


def test_kl_distance_on_known_vectors() -> None:
    log_p = torch.tensor([0.25, 0.75]).log().view(1, 1, 2)
    log_q = torch.tensor([0.5, 0.5]).log().view(1, 1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_distance(log_p, log_q, everywhere(2)).item() == pytest.approx(expected)
    assert kl_distance(log_p, log_p, everywhere(2)).item() == pytest.approx(0.0, abs=1e-7)
    # outside Omega nothing counts (log psi is 0 there, as spatial_log_distribution gives it)
    omega = torch.tensor([[[True, True, False]]])
    padded_p = torch.cat([log_p, torch.zeros(1, 1, 1)], -1)
    padded_q = torch.cat([log_q, torch.full((1, 1, 1), -5.0)], -1)
    assert kl_distance(padded_p, padded_q, omega).item() == pytest.approx(expected)


def test_pearson_distance_on_known_vectors() -> None:
    u = torch.tensor([0.2, 0.3, 0.5])
    same_shape = 0.5 * u + 0.5 / 3  # an affine map with a positive slope: rho = 1, although KL > 0
    mirrored = -0.5 * u + 1.5 / 3  # negative slope: rho = -1
    log_u = u.log().view(1, 1, 3)
    assert pearson_distance(log_u, same_shape.log().view(1, 1, 3), everywhere(3)).item() == pytest.approx(0, abs=1e-5)
    assert kl_distance(log_u, same_shape.log().view(1, 1, 3), everywhere(3)).item() > 0.01
    assert pearson_distance(log_u, mirrored.log().view(1, 1, 3), everywhere(3)).item() == pytest.approx(2, abs=1e-5)
    v = torch.tensor([0.6, 0.1, 0.3])
    rho = torch.corrcoef(torch.stack([u, v]))[0, 1].item()
    assert pearson_distance(log_u, v.log().view(1, 1, 3), everywhere(3)).item() == pytest.approx(1 - rho, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# Eq. (2): reduction
# ------------------------------------------------------------------------------------------------
def brute_force_loss(logits_t: Tensor, logits_s: Tensor, omega: Tensor, t: float, distance: str) -> float:
    """Eq. (2) by loops: per image sum_k phi / (C log|Omega|), 0 if |Omega| < 2, mean over B."""
    total = 0.0
    b, c = logits_t.shape[:2]
    for i in range(b):
        n = int(omega[i].sum())
        if n < 2:
            continue
        phi = 0.0
        for k in range(c):
            p = (logits_t[i, k][omega[i]].double() / t).softmax(0)
            q = (logits_s[i, k][omega[i]].double() / t).softmax(0)
            if distance == "kl":
                phi += float((p * (p.log() - q.log())).sum())
            else:
                phi += 1 - float(torch.corrcoef(torch.stack([p, q]))[0, 1])
        total += phi / (c * math.log(n))
    return total / b


@pytest.mark.parametrize("distance", ["kl", "pearson"])
def test_loss_is_normalised_by_c_log_omega_per_image(distance: str) -> None:
    torch.manual_seed(1)
    logits_t, logits_s = 3 * torch.randn(3, K, 4, 4), 3 * torch.randn(3, K, 4, 4)
    omega = torch.zeros(3, 4, 4, dtype=torch.bool)
    omega[0, :2, :2] = True  # |Omega| = 4
    omega[1, :3, :3] = True  # 9
    omega[2] = True  # 16
    loss = inter_pixel_loss(logits_t, logits_s, omega, 4.0, distance)
    assert loss.item() == pytest.approx(brute_force_loss(logits_t, logits_s, omega, 4.0, distance), rel=1e-4)
    # the divisor differs per image: scaling |Omega| of one image changes only its own weight
    one = inter_pixel_loss(logits_t[:1], logits_s[:1], omega[:1], 4.0, distance)
    assert one.item() == pytest.approx(brute_force_loss(logits_t[:1], logits_s[:1], omega[:1], 4.0, distance), rel=1e-4)


@pytest.mark.parametrize("distance", ["kl", "pearson"])
def test_images_with_fewer_than_two_omega_pixels_give_zero_and_count_in_the_mean(distance: str) -> None:
    torch.manual_seed(2)
    logits_t = 3 * torch.randn(3, K, 4, 4)
    logits_s = (3 * torch.randn(3, K, 4, 4)).requires_grad_()
    omega = torch.zeros(3, 4, 4, dtype=torch.bool)
    omega[0, :2, :3] = True  # 6 pixels
    omega[1, 2, 2] = True  # one pixel: log 1 = 0
    # image 2: empty Omega
    loss = inter_pixel_loss(logits_t, logits_s, omega, 4.0, distance)
    alone = inter_pixel_loss(logits_t[:1], logits_s[:1].detach(), omega[:1], 4.0, distance)
    assert torch.isfinite(loss) and alone > 0
    assert loss.item() == pytest.approx(alone.item() / 3, rel=1e-5)  # denominator B = 3, not 1
    loss.backward()
    assert torch.isfinite(logits_s.grad).all()
    assert (logits_s.grad[1:] == 0).all()  # the skipped images get no gradient
    assert inter_pixel_loss(logits_t[1:], logits_s[1:], omega[1:], 4.0, distance).item() == 0


def test_gradient_reaches_the_student_on_omega_only_and_never_the_teacher() -> None:
    torch.manual_seed(3)
    logits_t = (3 * torch.randn(2, K, 4, 4)).requires_grad_()
    logits_s = (3 * torch.randn(2, K, 4, 4)).requires_grad_()
    omega = torch.rand(2, 4, 4) > 0.4
    inter_pixel_loss(logits_t, logits_s, omega, 4.0).backward()
    assert logits_t.grad is None  # teacher detached [B.2.7]
    grad = logits_s.grad.abs().sum(1)  # (B, H, W)
    assert (grad[~omega] == 0).all() and (grad[omega] > 0).all()


def test_loss_is_zero_when_student_matches_teacher() -> None:
    logits = 3 * torch.randn(2, K, 4, 4)
    omega = torch.ones(2, 4, 4, dtype=torch.bool)
    assert inter_pixel_loss(logits, logits.clone(), omega, 4.0).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# alpha warm-up (§IV-C)
# ------------------------------------------------------------------------------------------------
def test_ramp_at_start_middle_end_of_warm_up() -> None:
    assert rampup_weight(0, 100, 1.0) == pytest.approx(math.exp(-5))  # ~0.0067
    assert rampup_weight(50, 100, 2.0) == pytest.approx(2.0 * math.exp(-5 / 4))
    assert rampup_weight(100, 100, 1.0) == 1.0
    assert rampup_weight(10_000, 100, 1.0) == 1.0  # constant afterwards [B.2.11]
    assert rampup_weight(0, 0, 0.5) == 0.5  # no warm-up
    ramp = [rampup_weight(i, 100, 1.0) for i in range(101)]
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False))


def test_warm_up_length_from_steps_fraction_or_total_steps(caplog: pytest.LogCaptureFixture) -> None:
    assert make(warmup_steps=40).warmup_steps() == 40
    method = make(warmup_fraction=0.0625)
    method.total_steps = 1600  # what the engine sets; reaches the base too
    assert method.warmup_steps() == 100 and method.base.total_steps == 1600
    with caplog.at_level(logging.WARNING, logger="s4seg.methods.ipixmatch"):
        unknown = make(warmup_fraction=0.0625)
        assert unknown.warmup_steps() == 0 and unknown.warmup_steps() == 0
    assert sum("no total_steps" in r.message for r in caplog.records) == 1  # warned once
    assert make(warmup_fraction=0.0).warmup_steps() == 0


def test_training_step_uses_the_ramped_alpha() -> None:
    method, batch = make(warmup_steps=10, alpha=2.0), make_batch()
    method.train()
    out = method.training_step(batch, 5)
    assert out.logs["alpha"] == pytest.approx(2.0 * math.exp(-5 * 0.25))


# ------------------------------------------------------------------------------------------------
# Composition with the base methods
# ------------------------------------------------------------------------------------------------
def base_and_ipixmatch(base: str, **cfg: Any) -> tuple[Any, IPixMatch]:
    torch.manual_seed(0)
    plain = build_method(base, {}, TinySegmenter(), K)
    torch.manual_seed(0)
    cfg = {"warmup_fraction": 0.0, "omega_thresh": 0.4, **cfg}  # the tiny model is rarely > 0.8 confident
    composed = IPixMatch(IPixMatchConfig(base=base, **cfg), TinySegmenter(), K)
    plain.train(), composed.train()
    return plain, composed


@pytest.mark.parametrize("base", BASES)
def test_alpha_zero_gives_exactly_the_base_loss(base: str) -> None:
    plain, composed = base_and_ipixmatch(base, alpha=0.0)
    batch = make_batch()
    torch.manual_seed(1)  # dropout masks (unimatch, unimatch_v2) drawn alike
    expected = plain.training_step(batch, 0)
    torch.manual_seed(1)
    out = composed.training_step(batch, 0)
    assert torch.equal(out.loss, expected.loss)
    assert all(torch.equal(torch.as_tensor(out.logs[k]), torch.as_tensor(v)) for k, v in expected.logs.items())
    assert out.logs["loss_ipix"] > 0  # the term is computed, only weighted by 0
    grads = torch.autograd.grad(out.loss, list(composed.model.parameters()))
    grads_plain = torch.autograd.grad(expected.loss, list(plain.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_plain, strict=True))


def labeller_of(method: IPixMatch) -> torch.nn.Module:
    teacher = method.teacher()
    return method.model if teacher is None else teacher


@pytest.mark.parametrize("base", BASES)
def test_loss_adds_alpha_times_l_ipix_over_the_strong_views(base: str) -> None:
    plain, composed = base_and_ipixmatch(base, alpha=2.0)
    batch = make_batch()
    # the teacher side: eval-mode logits of the weak view and of the partner, CutMix-ed with each view's box
    with torch.no_grad(), eval_mode(labeller_of(composed)) as labeller:
        logits_w, logits_mix = labeller(batch.u_w), labeller(batch.u_w_mix)
    torch.manual_seed(1)
    expected = plain.training_step(batch, 0)
    torch.manual_seed(1)
    out = composed.training_step(batch, 0)
    views = ["s1"] if base == "fixmatch" else ["s1", "s2"]
    assert composed.views(out.streams) == views
    terms = []
    for view, box in zip(views, [batch.box1, batch.box2], strict=False):
        s = out.streams
        teacher = torch.where(box[:, None], logits_mix, logits_w)
        assert torch.allclose(s[f"logits_t_{view}"], teacher, atol=1e-6)
        conf = teacher.softmax(1).amax(1)
        valid = torch.where(box, batch.valid_u_mix, batch.valid_u)
        omega = (conf > 0.4) & valid
        assert 2 <= omega.sum() < valid.sum()
        terms.append(brute_force_loss(teacher, s[f"logits_{view}"].detach(), omega, 4.0, "kl"))
    loss_ipix = sum(terms) / len(terms)
    assert out.logs["loss_ipix"].item() == pytest.approx(loss_ipix, rel=1e-4)
    assert out.loss.item() == pytest.approx(expected.loss.item() + 2.0 * loss_ipix, rel=1e-5)


def test_include_fp_adds_unimatch_feature_perturbed_view() -> None:
    _, composed = base_and_ipixmatch("unimatch", include_fp=True)
    out = composed.training_step(make_batch(), 0)
    assert composed.views(out.streams) == ["s1", "s2", "fp"]
    assert torch.equal(out.streams["conf_fp"], out.pseudo.conf)  # fp trains against the un-mixed weak view
    _, on_fixmatch = base_and_ipixmatch("fixmatch", include_fp=True)
    with pytest.raises(ParamsError, match="base 'fixmatch' does not return the streams L_IPix needs .*conf_fp"):
        on_fixmatch.training_step(make_batch(), 0)


@pytest.mark.parametrize("base", BASES)
def test_l_ipix_trains_the_student_only(base: str) -> None:
    _, composed = base_and_ipixmatch(base)
    out = composed.training_step(make_batch(), 0)
    s = out.streams
    loss_ipix = torch.stack([
        inter_pixel_loss(s[f"logits_t_{v}"], s[f"logits_{v}"], confident_set(s[f"conf_{v}"], s[f"valid_{v}"], 0.4), 4.0)
        for v in composed.views(s)
    ]).mean()
    assert loss_ipix.item() == pytest.approx(out.logs["loss_ipix"].item())
    assert not any(s[f"logits_t_{v}"].requires_grad for v in composed.views(s))  # teacher side detached
    loss_ipix.backward()
    grads = [p.grad for p in composed.model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    teacher = composed.teacher()
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters())


def test_delegates_to_the_base_and_keeps_one_copy_of_the_model() -> None:
    torch.manual_seed(0)
    model = TinySegmenter()
    composed = IPixMatch(IPixMatchConfig(base="unimatch_v2"), model, K)
    assert isinstance(composed.base, UniMatchV2) and composed.model is model and composed.base.model is model
    assert composed.teacher() is composed.base.ema_model
    assert composed.networks() == [model, composed.base.ema_model]
    assert composed.ema_momentum() == 0.996
    keys = list(composed.state_dict())
    assert keys and all(k.startswith(("base.model.", "base.ema_model.")) for k in keys)
    assert composed.trainable_groups().keys() == composed.base.trainable_groups().keys()
    images = make_batch().u_w
    composed.eval()
    assert torch.equal(composed.predict(images), composed.base.predict(images))
    fixmatch = make(base="fixmatch")
    assert isinstance(fixmatch.base, FixMatch) and fixmatch.teacher() is None


def test_dump_gets_omega_of_the_weak_view() -> None:
    method, batch = make(), make_batch()
    pseudo = method.pseudo_labels(batch.u_w, batch.valid_u)
    omega = pseudo.extra["omega"]
    assert omega.dtype == torch.bool and omega.shape == batch.valid_u.shape
    assert torch.equal(omega, (pseudo.conf > 0.8) & batch.valid_u)
    method.train()
    out = method.training_step(batch, 0)
    assert set(out.pseudo.extra) == {"omega"}  # the same key every batch
    assert torch.equal(out.pseudo.extra["omega"], (out.pseudo.conf > 0.8) & batch.valid_u)


# ------------------------------------------------------------------------------------------------
# Through the engine
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return h.make_store(tmp_path_factory.mktemp("tiles") / "tiles.zarr")


@pytest.mark.parametrize("base", ["unimatch", "unimatch_v2"])
def test_two_steps_through_fit_and_reload(base: str, store, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(s4seg.models, "build_model", lambda cfg, k, load_pretrained=True: h.TinySegmenter(k))
    torch.manual_seed(0)
    method = build_method("ipixmatch", {"base": base, "warmup_steps": 4}, h.TinySegmenter(), len(h.CLASSES))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    cfg = h.tiny_train_config(iterations=2, precise_bn="off")
    fit(method, store, h.make_split(), cfg, model_cfg=ModelConfig(weights=None), seed=0,
        out_path=tmp_path / "model.pt", log_path=tmp_path / "log.csv", checkpoint_dir=tmp_path / "ckpt")
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "loss_ipix", "alpha", "omega_ratio"))
    assert float(rows[1]["alpha"]) == pytest.approx(math.exp(-5 * 0.75**2))  # step 1 of a 4-step ramp
    after = method.state_dict()
    assert not torch.equal(before["base.model.head.weight"], after["base.model.head.weight"])
    if base == "unimatch_v2":  # the engine updated the base's EMA teacher through method.teacher()
        teacher = after["base.ema_model.head.weight"]
        assert not torch.equal(before["base.ema_model.head.weight"], teacher)
        assert not torch.equal(teacher, after["base.model.head.weight"])  # momentum 0.5 at the second step

    loaded = load_method(tmp_path / "model.pt")
    assert loaded.name == "ipixmatch" and loaded.cfg == method.cfg and type(loaded.base) is type(method.base)
    for (k, v), (k2, v2) in zip(method.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    x = torch.rand(2, 3, 10, 14)
    method.eval()
    with torch.no_grad():
        assert loaded.predict(x).shape == (2, len(h.CLASSES), 10, 14)
        make_runtime("cpu").module(loaded)  # fit leaves its method channels_last: same layout, same rounding
        assert torch.equal(loaded.predict(x), method.predict(x))
