"""RRN: patch discriminator, BCE targets, LPLF mask, DRLC weights, L_f, CPS targets, ensemble, gradients,
twin initialisation, resume through the engine, artifact reload."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from tiny import K, TinySegmenter, make_batch  # tests/methods/tiny.py

import s4seg.models
from s4seg.config import IGNORE_INDEX, ModelConfig
from s4seg.engine.checkpoint import load_method
from s4seg.engine.loop import fit
from s4seg.engine.method import method_config
from s4seg.errors import ParamsError
from s4seg.evaluation.dump import write_dump
from s4seg.methods.losses import paste
from s4seg.methods.rrn import (
    RRN,
    PatchDiscriminator,
    RRNConfig,
    cross_labeled_cps,
    discriminator_input,
    discriminator_loss,
    drlc_weights,
    feature_matching,
    ground_truth_input,
    region_mask,
    selection_loss,
)
from s4seg.runtime import make_runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
import engine_helpers as h  # noqa: E402

SIZE = 16


def make(**cfg: Any) -> RRN:
    torch.manual_seed(0)
    return RRN(RRNConfig(**cfg), TinySegmenter(), K)


def set_verdict(method: RRN, *accept: bool) -> None:
    """Make discriminator i accept (rc ~ 1) or reject (rc ~ 0) every region, whatever its input."""
    for d, ok in zip(method.discriminators, accept, strict=True):
        with torch.no_grad():
            d.classifier.weight.zero_()
            d.classifier.bias.fill_(50.0 if ok else -50.0)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_values() -> None:
    # the config class, not the workspace's params.yaml (which `dvc exp run -S` rewrites)
    cfg = method_config("rrn", {})
    assert cfg == RRNConfig()
    assert (cfg.cps_weight, cfg.selection_weight, cfg.fm_weight, cfg.rc_thresh) == (1.0, 1.0, 0.1, 0.6)
    assert (cfg.d_lr, cfg.d_betas) == (1e-4, (0.9, 0.99))
    assert cfg.lplf and cfg.drlc and cfg.ensemble and cfg.cps_on_labeled


def test_bad_params_name_the_section() -> None:
    with pytest.raises(ParamsError, match=r"methods.rrn: ensemble_average must be one of logits, probs"):
        method_config("rrn", {"ensemble_average": "median"})
    with pytest.raises(ParamsError, match=r"methods.rrn: rc_thresh must be in \[0, 1\]"):
        method_config("rrn", {"rc_thresh": 1.5})


# ------------------------------------------------------------------------------------------------
# Discriminator
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("crop", "rc_side"), [(512, 4), (192, 2), (16, 1)])
def test_discriminator_shapes(crop: int, rc_side: int) -> None:
    """conv4 is crop/16; the 10 x 10 head over it, padded to a multiple of 10: 32 -> 4, 12 -> 2, 1 -> 1."""
    torch.manual_seed(0)
    d = PatchDiscriminator(K + 3).eval()
    with torch.no_grad():
        rc, f = d(torch.rand(2, K + 3, crop, crop))
    assert rc.shape == (2, 1, rc_side, rc_side)
    assert f.shape == (2, 512)


def test_discriminator_feature_is_a_global_average_and_tiny_crops_run() -> None:
    """f pools the whole conv4 map: a change in the bottom-right corner of a 512 crop moves it (the code's
    fixed 20 x 20 window would not see it)."""
    torch.manual_seed(0)
    d = PatchDiscriminator(K + 3, width=8).eval()
    x = torch.rand(1, K + 3, 512, 512)
    y = x.clone()
    y[..., -64:, -64:] = 0
    with torch.no_grad():
        assert not torch.allclose(d(x)[1], d(y)[1])
        rc, f = d(torch.rand(1, K + 3, 12, 12))  # under one conv4 cell: padded up to 16 px
    assert rc.shape == (1, 1, 1, 1) and f.shape == (1, 64)


def test_discriminator_inputs() -> None:
    labels = torch.tensor([[[0, 2], [IGNORE_INDEX, 1]]])
    images = torch.full((1, 3, 2, 2), 0.5)
    real = ground_truth_input(labels, images, K)
    assert real.shape == (1, K + 3, 2, 2)
    assert real[0, :K, 0, 0].tolist() == [1, 0, 0] and real[0, :K, 0, 1].tolist() == [0, 0, 1]
    assert real[0, :K, 1, 0].tolist() == [0, 0, 0]  # ignore -> all-zero
    assert torch.equal(real[:, K:], images)
    prob = torch.full((1, K, 2, 2), 1 / K)
    valid = torch.tensor([[[True, True], [True, False]]])
    fake = discriminator_input(prob, images, valid)
    assert fake[0, :K, 1, 1].tolist() == [0, 0, 0] and fake[0, :K, 0, 0].sum() == pytest.approx(1.0)


def test_discriminator_bce_targets_real_one_fake_zero() -> None:
    real, fake = torch.tensor([[[[2.0, -1.0]]]]), torch.tensor([[[[0.5, -3.0]]]])

    def bce(logit: float, target: float) -> float:
        p = 1 / (1 + math.exp(-logit))
        return -(target * math.log(p) + (1 - target) * math.log(1 - p))

    expected = ((bce(2.0, 1) + bce(-1.0, 1)) / 2 + (bce(0.5, 0) + bce(-3.0, 0)) / 2) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # a perfect discriminator (real -> 1, fake -> 0) has ~0 loss; the swapped one a large loss
    assert discriminator_loss(torch.full((1, 1, 2, 2), 30.0), torch.full((1, 1, 2, 2), -30.0)) < 1e-9
    assert discriminator_loss(torch.full((1, 1, 2, 2), -30.0), torch.full((1, 1, 2, 2), 30.0)) > 29


def test_training_step_trains_each_discriminator_on_gt_as_real_and_its_branch_as_fake() -> None:
    """The aux loss of d_b equals the BCE recomputed on [one-hot GT, x] as real and [softmax of branch b on
    the mixed view, mixed view] as fake, and differs from the swapped targets (d in eval mode: no dropout)."""
    method = make()
    for d in method.discriminators:
        d.eval()  # no dropout, so the recomputation below is exact
        with torch.no_grad():
            d.classifier.weight.mul_(100)  # outputs far from 0, so that swapping the targets shows
    batch = make_batch(2, SIZE)
    out = method.training_step(batch, 0)
    u_mix = paste(batch.u_w, batch.u_w_mix, batch.box1)
    valid = paste(batch.valid_u, batch.valid_u_mix, batch.box1)
    real = ground_truth_input(batch.y, batch.x, K)
    with torch.no_grad():
        for b, (net, d) in enumerate(zip(method.branches, method.discriminators, strict=True)):
            fake = discriminator_input(net(u_mix).softmax(1), u_mix, valid)
            expected = discriminator_loss(d(real)[0], d(fake)[0])
            assert out.aux_losses[f"d{b + 1}"].item() == pytest.approx(expected.item(), rel=1e-5)
            swapped = discriminator_loss(d(fake)[0], d(real)[0])
            assert not math.isclose(out.aux_losses[f"d{b + 1}"].item(), swapped.item(), rel_tol=1e-3)


# ------------------------------------------------------------------------------------------------
# LPLF, DRLC, L_f
# ------------------------------------------------------------------------------------------------
def test_lplf_mask_from_a_known_rc_map() -> None:
    """rc 2 x 2 -> 4 x 4 by bilinear (align_corners=False): rows/cols sample the cells at 0, 1/4, 3/4, 1."""
    rc = torch.tensor([[0.9, 0.1], [0.55, 0.3]])
    logits = torch.log(rc / (1 - rc))[None, None]
    up, mask = region_mask(logits, (4, 4), eps=0.6)
    t = [0.0, 0.25, 0.75, 1.0]
    expected = torch.tensor([[(1 - a) * ((1 - c) * 0.9 + c * 0.1) + a * ((1 - c) * 0.55 + c * 0.3) for c in t]
                             for a in t])
    assert torch.allclose(up[0], expected, atol=1e-6)
    assert torch.equal(mask[0], expected >= 0.6)
    assert mask[0].tolist() == [[True, True, False, False], [True, True, False, False],
                                [True, False, False, False], [False, False, False, False]]


def test_selection_loss_is_the_mean_self_label_ce_over_credible_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, K, 3, 3)
    weight = (torch.rand(2, 3, 3) > 0.5).float()
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    valid[1, 2] = False
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                if weight[b, i, j] > 0 and valid[b, i, j]:
                    z = logits[b, :, i, j]
                    total += -(z.log_softmax(0)[z.argmax()]).item()
                    count += 1
    assert selection_loss(logits, weight, valid).item() == pytest.approx(total / count, rel=1e-5)
    assert selection_loss(logits, torch.zeros(2, 3, 3), valid).item() == 0.0  # nothing credible


def test_drlc_weights_in_the_four_cases_of_eq3() -> None:
    own = torch.tensor([True, True, False, False])
    other = torch.tensor([True, False, True, False])
    assert drlc_weights(own, other).tolist() == [2.0, 1.0, 1.0, 0.0]
    assert drlc_weights(own, None).tolist() == [1.0, 1.0, 0.0, 0.0]  # LPLF alone, Eq. 1
    # weighted loss: both-accepted pixels count twice, over the pixels with weight > 0
    logits = torch.tensor([[[[2.0, 0.0, 1.0, 3.0]], [[0.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    ce = F.cross_entropy(logits, logits.argmax(1), reduction="none")[0, 0]
    loss = selection_loss(logits, drlc_weights(own, other)[None, None], torch.ones(1, 1, 4, dtype=torch.bool))
    assert loss.item() == pytest.approx(((2 * ce[0] + ce[1] + ce[2]) / 3).item())


def test_method_weights_use_both_discriminators_only_with_drlc() -> None:
    size = (4, 4)
    yes, no = torch.full((1, 1, 1, 1), 50.0), torch.full((1, 1, 1, 1), -50.0)
    drlc = make()
    cases = {(yes, yes): 2.0, (yes, no): 1.0, (no, yes): 1.0, (no, no): 0.0}
    for (own, other), w in cases.items():
        assert drlc._weight(own, other, size).unique().tolist() == [w]
    lplf = make(drlc=False)
    assert lplf._weight(no, yes, size).unique().tolist() == [0.0]
    assert lplf._weight(yes, no, size).unique().tolist() == [1.0]


def test_feature_matching_on_known_features() -> None:
    f_real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean [2, 3]
    f_fake = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]])  # mean [1, 1]
    assert feature_matching(f_real, f_fake).item() == pytest.approx((1 + 2) / 2)


# ------------------------------------------------------------------------------------------------
# The training step
# ------------------------------------------------------------------------------------------------
def _student_logits(method: RRN, batch: Any) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The step's train-mode student logits on the mixed images, recomputed (BN batch statistics)."""
    u_mix = paste(batch.u_w, batch.u_w_mix, batch.box1)
    valid = paste(batch.valid_u, batch.valid_u_mix, batch.box1)
    with torch.no_grad():
        return [net(u_mix) for net in method.branches], u_mix, valid


def _masked_mean_self_ce(logits: torch.Tensor, valid: torch.Tensor) -> float:
    ce = F.cross_entropy(logits, logits.argmax(1), reduction="none")
    return ((ce * valid).sum() / valid.sum()).item()


@pytest.mark.parametrize(("drlc", "accept", "factor"), [
    (True, (True, True), (2, 2)),  # both discriminators accept every region of both branches: weight 2
    (True, (True, False), (1, 1)),  # only d1: branch 1 by its own d, branch 2 by the other: weight 1 each
    (False, (True, False), (1, 0)),  # LPLF: each branch by its own d only
    (True, (False, False), (0, 0)),
])
def test_selection_term_follows_the_discriminators(drlc: bool, accept: tuple[bool, bool],
                                                   factor: tuple[int, int]) -> None:
    method = make(drlc=drlc)
    set_verdict(method, *accept)
    batch = make_batch(2, SIZE)
    out = method.training_step(batch, 0)
    logits, _, valid = _student_logits(method, batch)
    expected = sum(f * _masked_mean_self_ce(z, valid) for f, z in zip(factor, logits, strict=True))
    key = "loss_dr" if drlc else "loss_ls"
    assert float(out.logs[key]) == pytest.approx(expected, rel=1e-4)
    # keep of the weak view's pseudo-labels: where branch 1's self-label trains
    assert torch.equal(out.pseudo.keep, batch.valid_u if factor[0] else torch.zeros_like(batch.valid_u))
    assert float(out.logs["selected_share"]) == (1.0 if factor[0] else 0.0)


def test_selection_waits_for_its_start_step() -> None:
    method = make(selection_start_step=3)
    set_verdict(method, True, True)
    batch = make_batch(2, SIZE)
    assert float(method.training_step(batch, 2).logs["loss_dr"]) == 0.0
    assert float(method.training_step(batch, 3).logs["loss_dr"]) > 0.0


def test_cps_trains_each_branch_on_the_other_branchs_mixed_labels() -> None:
    method = make()
    batch = make_batch(2, SIZE)
    # eval-mode labels of both branches on the weak view and the partner (before the step moves BN statistics)
    with torch.no_grad():
        labels_w = [net.eval()(batch.u_w).argmax(1) for net in method.branches]
        labels_m = [net(batch.u_w_mix).argmax(1) for net in method.branches]
    method.train()
    out = method.training_step(batch, 0)
    y = [paste(w, m, batch.box1) for w, m in zip(labels_w, labels_m, strict=True)]
    logits, _, valid = _student_logits(method, batch)

    def ce(z: torch.Tensor, target: torch.Tensor) -> float:
        return (F.cross_entropy(z, target, reduction="none")[valid].mean()).item()

    assert float(out.logs["loss_cps_u"]) == pytest.approx(ce(logits[0], y[1]) + ce(logits[1], y[0]), rel=1e-5)
    assert torch.equal(out.pseudo.label, labels_w[0])
    assert torch.equal(out.pseudo.extra["label_2"].long(), labels_w[1])
    with torch.no_grad():
        logits_x = [net(batch.x) for net in method.branches]
    assert float(out.logs["loss_cps_l"]) == pytest.approx(sum(cross_labeled_cps(*logits_x)).item(), rel=1e-5)
    assert float(make(cps_on_labeled=False).training_step(batch, 0).logs["loss_cps_l"]) == 0.0


def test_twin_rampup_weights_only_branch_1_learning_from_the_twin() -> None:
    """reinit_heads 'twin': branch 1's CPS terms (targets from the re-drawn twin) carry exp(-5 (1 - t/T_r)^2);
    the twin's terms, L_sup and everything else keep their weight. Same seed, same batch: two identical
    methods at step 0 (ramp exp(-5)) and at step T_r (ramp 1) differ by (1 - exp(-5)) x branch 1's terms."""
    batch = make_batch(2, SIZE)
    losses, methods = {}, {}
    for step in (0, 25):
        method = methods[step] = make(lplf=False, drlc=False, twin_rampup=0.25)
        method.total_steps = 100  # T_r = 25 steps
        with torch.no_grad():
            labels_w = [net.eval()(batch.u_w).argmax(1) for net in method.branches]
            labels_m = [net(batch.u_w_mix).argmax(1) for net in method.branches]
        method.train()
        out = method.training_step(batch, step)
        losses[step] = float(out.loss.detach())
        assert float(out.logs["twin_ramp"]) == pytest.approx(math.exp(-5) if step == 0 else 1.0)
    y_2 = paste(labels_w[1], labels_m[1], batch.box1)  # the twin's labels, CutMix-ed as the student input
    logits, _, valid = _student_logits(methods[25], batch)
    with torch.no_grad():
        logits_x = [net(batch.x) for net in methods[25].branches]
    branch_1 = (F.cross_entropy(logits[0], y_2, reduction="none")[valid].mean()
                + F.cross_entropy(logits_x[0], logits_x[1].argmax(1))).item()
    assert losses[25] - losses[0] == pytest.approx((1 - math.exp(-5)) * branch_1, rel=1e-4)
    # the paper's symmetric random heads, or no known schedule: no ramp
    both = make(reinit_heads="both", twin_rampup=0.25)
    both.total_steps = 100
    assert both.twin_label_weight(0) == 1.0
    assert make(twin_rampup=0.25).twin_label_weight(0) == 1.0  # total_steps unset


def test_gradients_segmentor_loss_never_reaches_a_discriminator_and_back() -> None:
    """Through the graph itself (not only the engine's backward(inputs=...)), then the engine's pattern."""
    method = make()
    method.train()
    out = method.training_step(make_batch(2, SIZE), 0)
    seg = [p for ps in method.trainable_groups().values() for p in ps]
    disc = [p for d in method.discriminators for p in d.parameters()]
    assert {id(p) for p in seg}.isdisjoint(id(p) for p in disc)
    assert all(g is None for g in torch.autograd.grad(out.loss, disc, allow_unused=True, retain_graph=True))
    for name, d in zip(("d1", "d2"), method.discriminators, strict=True):
        grads = torch.autograd.grad(out.aux_losses[name], seg + disc, allow_unused=True, retain_graph=True)
        own = {id(p) for p in d.parameters()}
        for p, g in zip(seg + disc, grads, strict=True):
            assert (g is not None) == (id(p) in own)

    # the engine: main loss into the main optimiser's params, each aux loss into its own
    main_grads = torch.autograd.grad(out.loss, seg, retain_graph=True, allow_unused=True)
    aux_grads = {n: torch.autograd.grad(out.aux_losses[n], list(d.parameters()), retain_graph=True)
                 for n, d in zip(("d1", "d2"), method.discriminators, strict=True)}
    out.loss.backward(inputs=seg, retain_graph=True)
    for name, spec in method.aux_optimizers().items():
        out.aux_losses[name].backward(inputs=spec.params)
        assert all(torch.equal(p.grad, g) for p, g in zip(spec.params, aux_grads[name], strict=True))
    for p, g in zip(seg, main_grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def test_feature_matching_reaches_the_segmentor_through_a_frozen_discriminator() -> None:
    method = make(selection_weight=0.0)
    batch = make_batch(2, SIZE)
    logits = [torch.randn(2, K, SIZE, SIZE, requires_grad=True) for _ in range(2)]
    fakes = [discriminator_input(z.softmax(1), batch.u_w, None) for z in logits]
    real = ground_truth_input(batch.y, batch.x, K)
    _, loss_f, _ = method._segmentor_terms(logits, fakes, real, batch.valid_u, 0)
    grads = torch.autograd.grad(loss_f, logits)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(p.requires_grad and p.grad is None for d in method.discriminators for p in d.parameters())


def test_cps_baseline_builds_no_discriminator() -> None:
    method = make(lplf=False, drlc=False, ensemble=False)
    assert len(method.discriminators) == 0 and method.aux_optimizers() == {}
    out = method.training_step(make_batch(2, SIZE), 0)
    assert out.aux_losses == {} and "loss_f" not in out.logs
    assert torch.equal(out.pseudo.keep, make_batch(2, SIZE).valid_u)  # CPS trains on every valid pixel


# ------------------------------------------------------------------------------------------------
# Twin, ensemble, pseudo-labels, engine hooks
# ------------------------------------------------------------------------------------------------
def test_twin_shares_the_encoder_and_redraws_the_head() -> None:
    torch.manual_seed(0)
    model = TinySegmenter()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    method = RRN(RRNConfig(), model, K)
    twin = method.model_2.state_dict()
    for k, v in original.items():
        assert torch.equal(method.model.state_dict()[k], v), k  # "twin": branch 1 is the warmup model
        if k.startswith("classifier."):
            assert not torch.equal(twin[k], v), k
        else:
            assert torch.equal(twin[k], v), k
    assert twin["classifier.bias"].abs().sum() == 0  # CPS head init: Kaiming weights, zero biases
    both = RRN(RRNConfig(reinit_heads="both"), TinySegmenter(), K)
    assert not torch.equal(both.model.classifier.weight, both.model_2.classifier.weight)
    groups = method.trainable_groups()
    assert {id(p) for p in groups["backbone"]} == {id(p) for net in method.branches for p in net.c1.parameters()} | {
        id(p) for net in method.branches for p in net.c4.parameters()}
    assert {id(p) for p in groups["head"]} == {id(p) for net in method.branches for p in net.classifier.parameters()}
    assert method.networks() == [method.model, method.model_2]


@pytest.mark.parametrize("average", ["logits", "probs"])
def test_ensemble_is_the_mean_of_the_branches(average: str) -> None:
    method = make(ensemble_average=average).eval()
    images = make_batch(2, SIZE).u_w
    with torch.no_grad():
        z1, z2 = method.model(images), method.model_2(images)
    out = method.predict(images)
    if average == "logits":
        assert torch.allclose(out, (z1 + z2) / 2)
    else:
        assert torch.allclose(out.softmax(1), (z1.softmax(1) + z2.softmax(1)) / 2, atol=1e-6)
    assert torch.equal(make(ensemble=False).eval().predict(images), z1)


def test_pseudo_labels_hold_both_labels_and_the_rc_maps() -> None:
    method = make()
    set_verdict(method, False, True)  # d2 accepts: branch 1 weight 1 under DRLC
    batch = make_batch(2, SIZE)
    pl = method.pseudo_labels(batch.u_w, batch.valid_u)
    assert set(pl.extra) == {"label_2", "rc_d1_b1", "rc_d2_b1", "rc_d2_b2", "rc_d1_b2"}
    assert pl.extra["rc_d1_b1"].shape == (2, SIZE, SIZE) and float(pl.extra["rc_d1_b1"].max()) < 1e-6
    assert float(pl.extra["rc_d2_b1"].min()) == 1.0
    assert torch.equal(pl.keep, batch.valid_u)
    set_verdict(method, False, False)
    assert not method.pseudo_labels(batch.u_w, batch.valid_u).keep.any()


def test_aux_optimizers_are_the_papers_adam() -> None:
    method = make()
    specs = method.aux_optimizers()
    assert set(specs) == {"d1", "d2"}
    for spec, d in zip(specs.values(), method.discriminators, strict=True):
        assert (spec.kind, spec.lr, spec.betas, spec.poly) == ("adam", 1e-4, (0.9, 0.99), False)
        assert [id(p) for p in spec.params] == [id(p) for p in d.parameters()]


# ------------------------------------------------------------------------------------------------
# Through the engine
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return h.make_store(tmp_path_factory.mktemp("tiles") / "tiles.zarr", tile=SIZE)


def _fit(out: Path, store, iterations: int, crash_at: int | None = None) -> tuple[RRN, dict[str, Any]]:
    torch.manual_seed(0)
    method = RRN(RRNConfig(judge_with_dropout=True), h.TinySegmenter(len(h.CLASSES)), len(h.CLASSES))
    if crash_at is not None:
        original = method.training_step

        def step_or_crash(batch, step):
            if step == crash_at:
                raise KeyboardInterrupt
            return original(batch, step)

        method.training_step = step_or_crash
    cfg = h.tiny_train_config(iterations=iterations, crop=SIZE, checkpoint_every=2, log_every=1)
    result = fit(method, store, h.make_split(), cfg, model_cfg=ModelConfig(weights=None), seed=0,
                 out_path=out / "model.pt", log_path=out / "log.csv", checkpoint_dir=out / "ckpt")
    return method, result


def _equal(a: Any, b: Any) -> bool:
    """Deep equality of nested dicts / lists of tensors (optimiser state dicts)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_resume_after_a_crash_is_bit_identical(store, tmp_path) -> None:
    """Both branches, both discriminators (with dropout drawing from the RNG), all three optimisers."""
    _fit(tmp_path / "full", store, 6)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "crash", store, 6, crash_at=5)
    ckpt = torch.load(tmp_path / "crash" / "ckpt" / "last.pt", weights_only=False)
    assert set(ckpt["optimizers"]["aux"]) == {"d1", "d2"} and ckpt["optimizers"]["aux"]["d1"]["state"]
    # checkpoints every 2 steps and at epoch ends (3 batches): the step done before the crash is run again
    assert _fit(tmp_path / "crash", store, 6)[1]["resumed_from"] == 4
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "crash" / "model.pt", weights_only=True)["state_dict"]
    assert any(k.startswith("model_2.") for k in full) and any(k.startswith("discriminators.1.") for k in full)
    assert _equal(full, resumed)  # discriminator weights too: Adam's moments were restored
    assert (tmp_path / "full" / "log.csv").read_text() == (tmp_path / "crash" / "log.csv").read_text()


def test_two_steps_through_fit_then_reload_and_predict(store, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(s4seg.models, "build_model", lambda cfg, k, load_pretrained=True: h.TinySegmenter(k))
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in
              RRN(RRNConfig(), h.TinySegmenter(len(h.CLASSES)), len(h.CLASSES)).state_dict().items()}
    method, _ = _fit(tmp_path, store, 2)
    after = method.state_dict()
    for prefix in ("model.", "model_2.", "discriminators.0.", "discriminators.1."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and "loss_dr" in rows[0] and "loss_d1" in rows[0]
    loaded = load_method(tmp_path / "model.pt")
    assert isinstance(loaded, RRN) and not loaded.training
    images = torch.rand(1, 3, 20, 24)
    method.eval()
    assert loaded.predict(images).shape == (1, len(h.CLASSES), 20, 24)
    make_runtime("cpu").module(loaded)  # fit leaves its method channels_last: same layout, same rounding
    assert torch.equal(loaded.predict(images), method.predict(images))

    # the dump holds what training selects on: branch 2's label and the four rc maps as extra layers
    write_dump(loaded, store, h.make_split().unlabeled.tolist(), tmp_path / "pseudo.zarr", batch_size=4,
               device="cpu", progress=False)
    g = zarr.open_group(str(tmp_path / "pseudo.zarr"), mode="r")
    for name in ("rc_d1_b1", "rc_d2_b1", "rc_d1_b2", "rc_d2_b2"):
        layer = g[f"extra/{name}"][:]
        assert layer.shape == (7, SIZE, SIZE) and layer.dtype == np.float16 and ((layer >= 0) & (layer <= 1)).all()
    assert g["extra/label_2"].dtype == np.uint8


def test_twin_starts_from_the_weights_loaded_after_construction(store, tmp_path, monkeypatch) -> None:
    """The train stage loads the warmup weights into `method.model` after build_method: fit's
    `on_fit_start` copies them into the twin (encoder; head re-drawn) before the first step."""
    method = RRN(RRNConfig(), h.TinySegmenter(len(h.CLASSES)), len(h.CLASSES))
    torch.manual_seed(1)
    warmup = h.TinySegmenter(len(h.CLASSES)).state_dict()
    method.model.load_state_dict(warmup)  # what stages/train.py's load_init_weights does
    method.on_fit_start()
    for k, v in warmup.items():
        assert torch.equal(method.model.state_dict()[k], v), k
        assert torch.equal(method.model_2.state_dict()[k], v) != k.startswith("head."), k

    calls = []
    monkeypatch.setattr(RRN, "on_fit_start", lambda self: calls.append(self))
    cfg = h.tiny_train_config(iterations=1, crop=SIZE)
    fit(method, store, h.make_split(), cfg, model_cfg=ModelConfig(weights=None), seed=0,
        out_path=tmp_path / "model.pt", log_path=tmp_path / "log.csv", checkpoint_dir=tmp_path / "ckpt")
    assert calls == [method]
