"""UniMatch V2: complementary dropout masks, teacher pseudo-labels, EMA teacher, loss weights, smoke."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny import K, TinySegmenter, ema_update, fake_pseudo, make_batch, sgd_step  # tests/methods/tiny.py
from torch import Tensor

from s4seg.engine.method import PseudoLabels, method_config
from s4seg.errors import ParamsError
from s4seg.methods import unimatch_v2
from s4seg.methods.unimatch_v2 import (
    UniMatchV2,
    UniMatchV2Config,
    complementary_dropout,
    complementary_masks,
    unimatch_v2_loss,
)


def make(**cfg: Any) -> UniMatchV2:
    torch.manual_seed(0)
    return UniMatchV2(UniMatchV2Config(**cfg), TinySegmenter(), K)


# ------------------------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_values() -> None:
    # the config class, not the workspace's params.yaml (which `dvc exp run -S` rewrites)
    section = {}
    cfg = method_config("unimatch_v2", section)
    assert cfg == UniMatchV2Config()
    assert (cfg.conf_thresh, cfg.ema_gamma, cfg.undropped_pairs, cfg.eval_teacher) == (0.95, 0.996, 0.0, True)


def test_bad_params_name_the_section() -> None:
    with pytest.raises(ParamsError, match=r"methods.unimatch_v2: undropped_pairs must be in \[0, 1\], found 2.0"):
        method_config("unimatch_v2", {"undropped_pairs": 2})
    with pytest.raises(ParamsError, match=r"methods.unimatch_v2: ema_gamma must be in \[0, 1\)"):
        method_config("unimatch_v2", {"ema_gamma": 1.5})


def test_complementary_masks_are_disjoint_cover_every_channel_and_scale_by_two() -> None:
    torch.manual_seed(0)
    pairs, channels = 3, 256
    scales = complementary_masks(pairs, channels)
    assert scales.shape == (2 * pairs, channels)
    view1, view2 = scales[:pairs], scales[pairs:]
    assert set(scales.unique().tolist()) == {0.0, 2.0}
    assert not ((view1 > 0) & (view2 > 0)).any()  # disjoint
    assert ((view1 > 0) | (view2 > 0)).all()  # covering
    assert torch.equal(view1 + view2, torch.full_like(view1, 2.0))
    assert 0.4 < (view1 > 0).float().mean() < 0.6  # Bernoulli(0.5)
    assert not torch.equal(view1[0], view1[1])  # one mask per pair


@pytest.mark.parametrize(("pairs", "fraction", "left_alone"), [(4, 0.5, 2), (2, 0.5, 1), (1, 0.5, 0), (3, 0.5, 1)])
def test_undropped_pairs_follow_the_code_rule(pairs: int, fraction: float, left_alone: int) -> None:
    torch.manual_seed(1)
    scales = complementary_masks(pairs, 64, fraction)
    view1, view2 = scales[:pairs], scales[pairs:]
    untouched = [(view1[j] == 1).all() and (view2[j] == 1).all() for j in range(pairs)]
    assert sum(bool(u) for u in untouched) == left_alone
    for j in range(pairs):
        if not untouched[j]:
            assert torch.equal(view1[j] + view2[j], torch.full((64,), 2.0)) and (view1[j] * view2[j] == 0).all()


def test_complementary_dropout_shares_one_mask_across_levels_of_equal_width() -> None:
    torch.manual_seed(0)
    feats = [torch.ones(4, 8, 3, 3) * (i + 1) for i in range(4)]  # DPT-like: 4 levels, same width
    out = complementary_dropout(feats)
    masks = [(o / f)[:, :, 0, 0] for o, f in zip(out, feats, strict=True)]
    for m, o, f in zip(masks, out, feats, strict=True):
        assert torch.equal(m, masks[0])
        assert torch.equal(o, f * m[:, :, None, None])  # constant over each channel map
    assert torch.equal(masks[0][:2] + masks[0][2:], torch.full((2, 8), 2.0))


def test_complementary_dropout_draws_one_mask_per_level_of_different_width() -> None:
    torch.manual_seed(0)
    feats = [torch.ones(4, 32, 4, 4), torch.ones(4, 48, 2, 2)]  # DeepLabV3+-like: c1, c4
    out = complementary_dropout(feats)
    for o, f in zip(out, feats, strict=True):
        m = (o / f)[:, :, 0, 0]
        assert torch.equal(m[:2] + m[2:], torch.full((2, f.shape[1]), 2.0))  # complementary per pair
        assert set(m.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(out[0][:, :32, 0, 0], out[1][:, :32, 0, 0])


def test_strong_views_are_decoded_once_after_complementary_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(), make_batch()
    seen: dict[str, Any] = {"decode": []}
    decode = method.model.decode

    def spy_dropout(feats: list[Tensor], undropped: float) -> list[Tensor]:
        seen["encoded"], seen["undropped"] = feats, undropped
        seen["dropped"] = complementary_dropout(feats, undropped)
        return seen["dropped"]

    def spy_decode(feats: list[Tensor], size: tuple[int, int], return_embedding: bool = False) -> Any:
        seen["decode"].append(feats)
        return decode(feats, size, return_embedding)

    monkeypatch.setattr(unimatch_v2, "complementary_dropout", spy_dropout)
    monkeypatch.setattr(method.model, "decode", spy_decode)
    method.training_step(batch, 0)
    strong = [f for f in seen["decode"] if f is seen["dropped"]]
    assert len(strong) == 1 and len(seen["encoded"][0]) == 2 * len(batch.u_s1) and seen["undropped"] == 0.0
    # the labeled pass is decoded without dropout
    assert sum(1 for f in seen["decode"] if len(f[0]) == len(batch.x)) == 1


def test_pseudo_labels_come_from_the_teacher_which_gets_no_gradient() -> None:
    method, batch = make(conf_thresh=0.0), make_batch()
    teacher = method.teacher()
    assert teacher is method.ema_model and method.ema_momentum() == 0.996
    with torch.no_grad():  # the teacher predicts class 1 everywhere, the student class 2
        teacher.classifier.bias.copy_(torch.tensor([0.0, 100.0, 0.0]))
        method.model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 100.0]))
    method.train()
    out = method.training_step(batch, 0)
    assert (out.pseudo.label == 1).all() and torch.equal(out.pseudo.keep, batch.valid_u)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in method.model.parameters())
    in_groups = {id(p) for v in method.trainable_groups().values() for p in v}
    assert in_groups == {id(p) for p in method.model.parameters()}
    assert (method.predict(batch.u_w).argmax(1) == 1).all()  # the teacher is evaluated by default
    student = UniMatchV2(UniMatchV2Config(eval_teacher=False), method.model, K)
    assert (student.predict(batch.u_w).argmax(1) == 2).all()


def test_loss_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(), make_batch()
    method.pseudo_labels = fake_pseudo({id(batch.u_w): 0, id(batch.u_w_mix): 1})
    mixed1, mixed2 = torch.where(batch.box1, 1, 0), torch.where(batch.box2, 1, 0)

    def fake_unlabeled_ce(logits: Tensor, label: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
        if torch.equal(label, mixed1):
            return logits.sum() * 0 + 2.0
        assert torch.equal(label, mixed2)
        return logits.sum() * 0 + 4.0

    monkeypatch.setattr(unimatch_v2, "unlabeled_ce", fake_unlabeled_ce)
    monkeypatch.setattr(unimatch_v2, "labeled_ce", lambda logits, y: logits.sum() * 0 + 1.0)
    out = method.training_step(batch, 0)
    assert (float(out.logs["loss_u_s1"]), float(out.logs["loss_u_s2"])) == (2.0, 4.0)
    assert out.loss.item() == pytest.approx(1.0 + (2.0 + 4.0) / 2)  # Eq. (5) with Eq. (17), no global / 2
    one = torch.tensor(1.0)
    assert [unimatch_v2_loss(*(one * (i == k) for i in range(3))).item() for k in range(3)] == [1.0, 0.5, 0.5]
    halved = [unimatch_v2_loss(*(one * (i == k) for i in range(3)), halve=True).item() for k in range(3)]
    assert halved == [0.5, 0.25, 0.25]  # halve_loss: the code's global / 2


def test_flip_partner_pastes_the_reversed_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = make(cutmix_partner="flip"), make_batch()
    labels = torch.arange(2).view(2, 1, 1).expand(2, 12, 12)
    method.pseudo_labels = lambda images, valid=None: PseudoLabels(labels.clone(), torch.ones(2, 12, 12), valid)
    seen = []
    encode = method.model.encode
    monkeypatch.setattr(method.model, "encode", lambda images: seen.append(images) or encode(images))
    labels_seen = []
    monkeypatch.setattr(
        unimatch_v2, "unlabeled_ce", lambda logits, label, *a: labels_seen.append(label) or logits.sum()
    )
    method.training_step(batch, 0)
    s1, s2 = seen[-1].chunk(2)
    assert torch.equal(s1, torch.where(batch.box1[:, None], batch.u_s1.flip(0), batch.u_s1))
    assert torch.equal(s2, torch.where(batch.box2[:, None], batch.u_s2.flip(0), batch.u_s2))
    assert torch.equal(labels_seen[0], torch.where(batch.box1, labels.flip(0), labels))
    assert torch.equal(labels_seen[1], torch.where(batch.box2, labels.flip(0), labels))


def test_smoke_a_few_steps_with_ema_update() -> None:
    method = make(conf_thresh=0.0)
    params = [p for v in method.trainable_groups().values() for p in v]
    before = [p.detach().clone() for p in params]
    teacher_before = [p.detach().clone() for p in method.teacher().parameters()]
    method.train()
    for t in range(3):
        out = method.training_step(make_batch(seed=t), t)
        assert torch.isfinite(out.loss) and all(torch.isfinite(torch.as_tensor(v)) for v in out.logs.values())
        sgd_step(out.loss, params)
        ema_update(method, t)
        if t == 0:  # momentum 0 at t = 0: the teacher becomes the student
            for pt, ps in zip(method.teacher().parameters(), params, strict=True):
                assert torch.equal(pt, ps)
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert all(not torch.equal(a, p) for a, p in zip(teacher_before, method.teacher().parameters(), strict=True))
