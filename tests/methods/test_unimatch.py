"""UniMatch V1: feature-perturbation stream wiring, dual strong streams, loss weights, smoke."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny import K, TinySegmenter, fake_pseudo, make_batch, sgd_step  # tests/methods/tiny.py
from torch import Tensor

from s4seg.engine.method import method_config
from s4seg.errors import ParamsError
from s4seg.methods import unimatch
from s4seg.methods.losses import select_confident
from s4seg.methods.unimatch import UniMatch, UniMatchConfig, feature_perturbation, unimatch_loss


def make(**cfg: Any) -> UniMatch:
    torch.manual_seed(0)
    return UniMatch(UniMatchConfig(**cfg), TinySegmenter(), K)


# ------------------------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_values() -> None:
    # the config class, not the workspace's params.yaml (which `dvc exp run -S` rewrites)
    section = {}
    assert method_config("unimatch", section) == UniMatchConfig()
    assert UniMatchConfig().conf_thresh == 0.95 and UniMatchConfig().fp_dropout == 0.5


def test_bad_params_name_the_section() -> None:
    with pytest.raises(ParamsError, match=r"methods.unimatch: fp_dropout must be in \[0, 1\), found 1.0"):
        method_config("unimatch", {"fp_dropout": 1.0})
    with pytest.raises(ParamsError, match="methods.unimatch: cutmix_partner must be one of batch, flip"):
        method_config("unimatch", {"cutmix_partner": "x"})


def test_feature_perturbation_drops_whole_channels_per_sample_and_level_with_x2() -> None:
    torch.manual_seed(0)
    feats = [torch.rand(4, 64, 3, 3) + 0.1, torch.rand(4, 64, 2, 2) + 0.1]  # strictly positive
    out = feature_perturbation(feats, 0.5)
    masks = []
    for f, g in zip(feats, out, strict=True):
        ratio = g / f  # (B, C, h, w): 0 or 2, constant over each channel map
        assert torch.all((ratio == 0) | torch.isclose(ratio, torch.tensor(2.0)))
        per_channel = ratio[..., 0, 0]
        assert torch.equal(ratio, per_channel[..., None, None].expand_as(ratio))
        assert 0 < (per_channel == 0).float().mean() < 1
        masks.append(per_channel == 0)
    assert not torch.equal(masks[0], masks[1])  # independent draws for the two levels
    assert not torch.equal(masks[0][0], masks[0][1])  # and for the samples


def test_forward_with_fp_decodes_clean_and_perturbed_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(), make_batch()
    encode, decode = method.model.encode, method.model.decode
    seen: dict[str, Any] = {"decode_calls": 0}

    def spy_encode(images: Tensor) -> list[Tensor]:
        seen["feats"] = encode(images)
        return seen["feats"]

    def spy_decode(feats: list[Tensor], size: tuple[int, int], return_embedding: bool = False) -> Any:
        seen["decode_calls"] += 1
        seen["decoded"] = feats
        return decode(feats, size, return_embedding)

    monkeypatch.setattr(method.model, "encode", spy_encode)
    monkeypatch.setattr(method.model, "decode", spy_decode)
    logits_x, logits_w, logits_fp = method.forward_with_fp(batch.x, batch.u_w)
    assert seen["decode_calls"] == 1
    n = len(batch.x) + len(batch.u_w)
    for clean, joint in zip(seen["feats"], seen["decoded"], strict=True):
        assert len(joint) == 2 * n
        assert torch.equal(joint[:n], clean)  # clean half first
        scale = joint[n:] / clean.clamp_min(1e-12)
        nonzero = clean > 0
        assert torch.all(torch.isclose(scale[nonzero], torch.tensor(2.0)) | (scale[nonzero] == 0))
    assert logits_x.shape == logits_w.shape == logits_fp.shape == (2, K, 12, 12)
    assert not torch.allclose(logits_w, logits_fp)

    # the FP logits' gradient reaches the encoder through the dropout
    stem = method.model.c1[0].weight
    (grad,) = torch.autograd.grad(logits_fp.square().sum(), stem)
    assert grad.abs().sum() > 0


def test_streams_train_on_the_right_targets_and_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(), make_batch()
    method.pseudo_labels = fake_pseudo({id(batch.u_w): 0, id(batch.u_w_mix): 1})
    mixed1 = torch.where(batch.box1, 1, 0)
    mixed2 = torch.where(batch.box2, 1, 0)
    calls = []

    def fake_unlabeled_ce(logits: Tensor, label: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
        # a distinct known value per stream, recognised by its targets
        calls.append(label)
        if torch.equal(label, mixed1):
            assert torch.equal(valid, torch.where(batch.box1, batch.valid_u_mix, batch.valid_u))
            return logits.sum() * 0 + 2.0
        if torch.equal(label, mixed2):
            return logits.sum() * 0 + 4.0
        assert torch.equal(label, torch.zeros_like(label))  # FP stream: the un-mixed weak targets
        assert torch.equal(valid, batch.valid_u) and torch.equal(keep, batch.valid_u)
        return logits.sum() * 0 + 8.0

    monkeypatch.setattr(unimatch, "unlabeled_ce", fake_unlabeled_ce)
    monkeypatch.setattr(unimatch, "labeled_ce", lambda logits, y: logits.sum() * 0 + 1.0)
    out = method.training_step(batch, 0)
    assert len(calls) == 3
    assert {k: float(out.logs[k]) for k in ("loss_x", "loss_u_s1", "loss_u_s2", "loss_u_fp")} == {
        "loss_x": 1.0, "loss_u_s1": 2.0, "loss_u_s2": 4.0, "loss_u_fp": 8.0,
    }  # fmt: skip
    assert out.loss.item() == pytest.approx(1.0 + 0.25 * 2.0 + 0.25 * 4.0 + 0.5 * 8.0)  # Eq. (5), no / 2


def test_unimatch_loss_weights() -> None:
    one = torch.tensor(1.0)
    assert unimatch_loss(one, 0 * one, 0 * one, 0 * one).item() == 1.0
    assert unimatch_loss(0 * one, one, 0 * one, 0 * one).item() == 0.25
    assert unimatch_loss(0 * one, 0 * one, one, 0 * one).item() == 0.25
    assert unimatch_loss(0 * one, 0 * one, 0 * one, one).item() == 0.5
    # halve_loss: the code's global / 2
    assert [unimatch_loss(*(one * (i == k) for i in range(4)), halve=True).item() for k in range(4)] == [
        0.5, 0.125, 0.125, 0.25]


def test_strong_views_are_cutmixed_with_the_partner_views(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(), make_batch()
    seen = []
    forward = method.model.forward
    monkeypatch.setattr(method.model, "forward", lambda images: seen.append(images) or forward(images))
    method.training_step(batch, 0)
    strong = [s for s in seen if len(s) == 2 * len(batch.u_s1)][-1]
    s1, s2 = strong.chunk(2)
    assert torch.equal(s1, torch.where(batch.box1[:, None], batch.u_s1_mix, batch.u_s1))
    assert torch.equal(s2, torch.where(batch.box2[:, None], batch.u_s2_mix, batch.u_s2))


def test_weak_labels_from_train_forward_uses_the_clean_weak_logits_of_the_fp_pass() -> None:
    method, batch = make(conf_thresh=0.4, weak_labels_from_train_forward=True), make_batch()
    torch.manual_seed(1)
    out = method.training_step(batch, 0)
    torch.manual_seed(1)  # same dropout draw: the decoder's BN statistics mix clean and perturbed features
    with torch.no_grad():
        _, logits_w, _ = method.forward_with_fp(batch.x, batch.u_w)
    expected = select_confident(logits_w, 0.4, batch.valid_u)
    assert torch.equal(out.pseudo.label, expected.label) and torch.allclose(out.pseudo.conf, expected.conf)


def test_default_pseudo_labels_are_the_eval_mode_prediction() -> None:
    method, batch = make(conf_thresh=0.4), make_batch()
    expected = method.pseudo_labels(batch.u_w, batch.valid_u)
    out = method.training_step(batch, 0)
    assert torch.equal(out.pseudo.label, expected.label) and torch.equal(out.pseudo.keep, expected.keep)
    assert method.model.training and method.teacher() is None


def test_smoke_a_few_sgd_steps() -> None:
    method = make(conf_thresh=0.0)
    params = [p for v in method.trainable_groups().values() for p in v]
    before = [p.detach().clone() for p in params]
    for t in range(3):
        out = method.training_step(make_batch(seed=t), t)
        assert torch.isfinite(out.loss) and all(torch.isfinite(torch.as_tensor(v)) for v in out.logs.values())
        sgd_step(out.loss, params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
