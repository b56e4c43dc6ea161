"""FixMatch: targets, CutMix wiring, loss weights, pseudo-label source, EMA option, config errors, smoke."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny import K, TinySegmenter, ema_update, fake_pseudo, make_batch, sgd_step  # tests/methods/tiny.py
from torch import Tensor

from s4seg.engine.method import PseudoLabels, build_method, method_config
from s4seg.errors import ParamsError
from s4seg.methods import fixmatch
from s4seg.methods.fixmatch import FixMatch, FixMatchConfig
from s4seg.methods.losses import select_confident, unlabeled_ce


def make(**cfg: Any) -> FixMatch:
    torch.manual_seed(0)
    return FixMatch(FixMatchConfig(**cfg), TinySegmenter(), K)


# ------------------------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_values() -> None:
    # the config class, not the workspace's params.yaml (which `dvc exp run -S` rewrites)
    section = {}
    assert method_config("fixmatch", section) == FixMatchConfig()
    assert FixMatchConfig().conf_thresh == 0.95 and not FixMatchConfig().ema_teacher
    assert not FixMatchConfig().halve_loss  # Eq. (5): L = L_x + L_u


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"conf_thresh": 1.5}, r"methods.fixmatch: conf_thresh must be in \[0, 1\], found 1.5"),
        ({"cutmix_partner": "mirror"}, "methods.fixmatch: cutmix_partner must be one of batch, flip"),
        ({"ema_teacher": True, "weak_labels_from_train_forward": True}, "exclusive"),
        ({"tau": 0.9}, "methods.fixmatch: unknown key.*tau"),
        ({"ema_gamma": 1.0}, r"ema_gamma must be in \[0, 1\)"),
    ],
)
def test_bad_params_name_the_section(section: dict[str, Any], match: str) -> None:
    with pytest.raises(ParamsError, match=match):
        method_config("fixmatch", section)


def test_strong_view_trains_on_cutmixed_image_and_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(), make_batch()
    method.pseudo_labels = fake_pseudo({id(batch.u_w): 0, id(batch.u_w_mix): 2})
    seen: dict[str, Tensor] = {}
    forward = method.model.forward

    def spy_forward(images: Tensor) -> Tensor:
        seen.setdefault("images", []).append(images)
        return forward(images)

    def spy_ce(logits: Tensor, label: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
        seen.update(label=label, keep=keep, valid=valid)
        return unlabeled_ce(logits, label, keep, valid)

    monkeypatch.setattr(method.model, "forward", spy_forward)
    monkeypatch.setattr(fixmatch, "unlabeled_ce", spy_ce)
    method.training_step(batch, 0)
    strong = seen["images"][1]  # [labeled pass, strong pass]
    inside = batch.box1
    for c in range(3):
        assert torch.equal(strong[:, c][inside], batch.u_s1_mix[:, c][inside])
        assert torch.equal(strong[:, c][~inside], batch.u_s1[:, c][~inside])
    assert torch.equal(seen["label"], torch.where(inside, 2, 0))
    valid = torch.where(inside, batch.valid_u_mix, batch.valid_u)
    assert torch.equal(seen["valid"], valid) and torch.equal(seen["keep"], valid)  # confidence 1 everywhere


@pytest.mark.parametrize(("halve", "total"), [(False, 1.0 + 3.0), (True, (1.0 + 3.0) / 2)])
def test_loss_is_the_sum_of_the_two_terms_or_half_of_it(monkeypatch: pytest.MonkeyPatch, halve: bool,
                                                          total: float) -> None:
    # Eq. (5), lambda = 1 (paper, default); halve_loss: the code's global / 2
    method = make(halve_loss=halve)
    monkeypatch.setattr(fixmatch, "labeled_ce", lambda logits, y: logits.sum() * 0 + 1.0)
    monkeypatch.setattr(fixmatch, "unlabeled_ce", lambda logits, *a: logits.sum() * 0 + 3.0)
    out = method.training_step(make_batch(), 0)
    assert out.loss.item() == pytest.approx(total)
    assert float(out.logs["loss_x"]) == 1.0 and float(out.logs["loss_u_s"]) == 3.0


def test_pseudo_labels_are_the_eval_mode_prediction_training_used() -> None:
    method, batch = make(conf_thresh=0.4), make_batch()
    with torch.no_grad():  # before the step: the step's train-mode passes update the BN running statistics
        expected = method.pseudo_labels(batch.u_w, batch.valid_u)
        method.model.eval()
        by_hand = method.model(batch.u_w).softmax(1).max(1)
    method.train()
    out = method.training_step(batch, 0)
    assert method.training and method.model.training  # eval mode for labelling only
    for name in ("label", "conf", "keep"):
        assert torch.equal(getattr(out.pseudo, name), getattr(expected, name))
    assert torch.allclose(out.pseudo.conf, by_hand.values) and torch.equal(out.pseudo.label, by_hand.indices)
    assert torch.equal(out.pseudo.keep, (by_hand.values >= 0.4) & batch.valid_u)
    ratio = ((by_hand.values >= 0.4) & batch.valid_u).sum() / batch.valid_u.sum()
    assert float(out.logs["mask_ratio"]) == pytest.approx(float(ratio)) and out.logs["tau"] == 0.4


def test_weak_labels_from_train_forward_uses_the_joint_train_mode_pass() -> None:
    method, batch = make(conf_thresh=0.4, weak_labels_from_train_forward=True), make_batch()
    method.train()
    out = method.training_step(batch, 0)
    method.model.train()
    with torch.no_grad():
        logits_w = method.model(torch.cat([batch.x, batch.u_w]))[len(batch.x) :]
    expected = select_confident(logits_w, 0.4, batch.valid_u)
    assert torch.equal(out.pseudo.label, expected.label) and torch.allclose(out.pseudo.conf, expected.conf)
    with torch.no_grad():  # differs from the eval-mode labels (BN batch statistics)
        method.model.eval()
        assert not torch.allclose(method.model(batch.u_w).softmax(1).amax(1), out.pseudo.conf)


def test_flip_partner_mixes_with_the_reversed_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(cutmix_partner="flip"), make_batch()
    labels = torch.arange(2).view(2, 1, 1).expand(2, 12, 12)
    method.pseudo_labels = lambda images, valid=None: PseudoLabels(labels.clone(), torch.ones(2, 12, 12), valid)
    seen = {}
    monkeypatch.setattr(fixmatch, "unlabeled_ce", lambda logits, label, *a: seen.update(label=label) or logits.sum())
    method.training_step(batch, 0)
    assert torch.equal(seen["label"], torch.where(batch.box1, labels.flip(0), labels))


def test_no_teacher_by_default() -> None:
    method = make()
    assert method.teacher() is None
    groups = method.trainable_groups()
    assert sum(len(v) for v in groups.values()) == len(list(method.model.parameters()))


def test_ema_teacher_labels_gets_no_gradient_and_is_evaluated() -> None:
    method, batch = make(ema_teacher=True, conf_thresh=0.0), make_batch()
    teacher = method.teacher()
    assert teacher is method.ema_model and method.ema_momentum() == 0.996
    with torch.no_grad():  # the teacher predicts class 1 everywhere, the student class 2
        teacher.classifier.bias.copy_(torch.tensor([0.0, 100.0, 0.0]))
        method.model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 100.0]))
    out = method.training_step(batch, 0)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert (out.pseudo.label == 1).all()
    in_groups = {id(p) for v in method.trainable_groups().values() for p in v}
    assert not in_groups & {id(p) for p in teacher.parameters()}
    assert torch.equal(method.predict(batch.u_w), teacher(batch.u_w))
    student = FixMatch(FixMatchConfig(ema_teacher=True, eval_teacher=False), method.model, K)
    assert (student.predict(batch.u_w).argmax(1) == 2).all()


def test_smoke_a_few_sgd_steps_with_ema_update() -> None:
    method = make(ema_teacher=True, conf_thresh=0.0)
    before = [p.detach().clone() for p in method.model.parameters()]
    teacher_before = [p.detach().clone() for p in method.ema_model.parameters()]
    params = [p for v in method.trainable_groups().values() for p in v]
    method.train()
    for t in range(3):
        out = method.training_step(make_batch(seed=t), t)
        assert torch.isfinite(out.loss)
        sgd_step(out.loss, params)
        ema_update(method, t)
    assert all(not torch.equal(a, p) for a, p in zip(before, method.model.parameters(), strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(teacher_before, method.ema_model.parameters(), strict=True))


def test_build_method_from_registry() -> None:
    method = build_method("fixmatch", {"conf_thresh": 0.5}, TinySegmenter(), K)
    assert isinstance(method, FixMatch) and method.cfg.conf_thresh == 0.5
