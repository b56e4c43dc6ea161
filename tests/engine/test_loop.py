"""The training loop: determinism, CSV log, artifact, resume (in-process and after SIGKILL), snapshots."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from s4seg.config import IGNORE_INDEX, ModelConfig
from s4seg.engine import loop
from s4seg.engine.checkpoint import CHECKPOINT_FORMAT, code_hash
from s4seg.engine.loop import PseudoLabelSnapshots, fit

sys.path.insert(0, str(Path(__file__).parent))
import engine_helpers as h  # noqa: E402

HELPER = Path(__file__).parent / "engine_helpers.py"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return h.make_store(tmp_path_factory.mktemp("tiles") / "tiles.zarr")


def _fit(method, store, out: Path, cfg=None, **kw):
    return fit(method, store, h.make_split(), cfg or h.tiny_train_config(), model_cfg=ModelConfig(weights=None),
               seed=kw.pop("seed", 0), out_path=out / "model.pt", log_path=out / "log.csv",
               checkpoint_dir=out / "ckpt", **kw)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_and_params_change(store, tmp_path):
    cfg = h.tiny_train_config(iterations=3)
    initial = {k: v.clone() for k, v in h.build("toy").state_dict().items()}
    _fit(h.build("toy"), store, tmp_path / "a", cfg)
    _fit(h.build("toy"), store, tmp_path / "b", cfg)
    _fit(h.build("toy"), store, tmp_path / "c", cfg, seed=1)
    a, b, c = (_weights(tmp_path / d / "model.pt") for d in "abc")
    assert _same(a, b)
    assert not _same(a, c)
    assert not torch.equal(a["model.head.weight"], initial["model.head.weight"])
    # the EMA teacher moved too (m = 0 at the first step copies the student)
    assert not torch.equal(a["ema.head.weight"], initial["ema.head.weight"])


def test_csv_log_and_artifact(store, tmp_path):
    result = _fit(h.build("toy"), store, tmp_path, h.tiny_train_config(iterations=6, log_every=2))
    assert result["steps"] == 6 and result["resumed_from"] is None
    rows = _rows(tmp_path / "log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert list(rows[0]) == ["step", "epoch", "lr", "loss_x", "loss_u", "loss", "pseudo_kept_share",
                             "pseudo_kept_acc", "pseudo_tau95_share", "pseudo_tau95_acc", "pseudo_rank_acc",
                             "pseudo_all_acc"]
    # 7 unlabeled tiles, batch 2 -> 3 micro-batches per epoch
    assert [float(r["epoch"]) for r in rows] == pytest.approx([2 / 3, 4 / 3, 2.0], abs=1e-5)
    assert float(rows[0]["lr"]) == pytest.approx(0.05 * (1 - 1 / 6) ** 0.9)  # lr of step index 1
    for r in rows:
        assert math.isfinite(float(r["loss"]))
        assert 0.0 <= float(r["pseudo_kept_share"]) <= 1.0 and 0.0 <= float(r["pseudo_kept_acc"]) <= 1.0
    art = torch.load(tmp_path / "model.pt", weights_only=True)
    assert art["step"] == 6 and art["method"] == "toy_semi" and art["classes"] == list(h.CLASSES)
    # a finished run leaves no resume point: `dvc repro -f` or a re-run after a code change trains again
    assert not (tmp_path / "ckpt" / "last.pt").exists()
    again = _fit(h.build("toy"), store, tmp_path, h.tiny_train_config(iterations=6, log_every=2))
    assert again["resumed_from"] is None and again["steps"] == 6
    assert _rows(tmp_path / "log.csv") == rows


def test_pseudo_accuracy_against_hidden_truth(store, tmp_path):
    """A method whose pseudo-labels are the hidden ground truth scores accuracy 1 on kept pixels."""
    method = h.build("toy")
    original = method.training_step

    def oracle_step(batch, step):
        out = original(batch, step)
        out.pseudo.label = batch.y_u.clamp_max(2)
        return out

    method.training_step = oracle_step
    _fit(method, store, tmp_path, h.tiny_train_config(iterations=2, log_every=2))
    (row,) = _rows(tmp_path / "log.csv")
    assert float(row["pseudo_kept_acc"]) == 1.0


def test_warm_start_with_a_zero_warm_head_lr_keeps_the_head(store, tmp_path):
    """fit(warm_start=True) puts the model's head in the 'warm_head' LR group: at warm_head_lr_multi 0 it
    stays exactly as loaded while the encoder trains; without warm_start the same head moves."""
    from s4seg.config import TrainStageConfig

    base = dataclasses.asdict(h.tiny_train_config(iterations=3, log_every=3))
    cfg = TrainStageConfig(**base, warm_head_lr_multi=0.0)
    runs = {}
    for warm in (True, False):
        method = h.build("supervised")
        head0 = {k: v.clone() for k, v in method.model.head.state_dict().items()}
        enc0 = method.model.encoder[0].weight.detach().clone()
        _fit(method, store, tmp_path / str(warm), cfg, warm_start=warm)
        head_same = all(torch.equal(head0[k], v) for k, v in method.model.head.state_dict().items())
        runs[warm] = (head_same, torch.equal(enc0, method.model.encoder[0].weight.detach()))
    assert runs[True] == (True, False)
    assert runs[False] == (False, False)


def test_pseudo_label_counts_on_a_hand_made_batch():
    """Kept / FixMatch-rule / confidence-ranked / all pixels graded against the truth, counted by hand."""
    from s4seg.engine.method import PseudoLabels

    label = torch.tensor([[[0, 1, 2, 1], [2, 2, 0, 1]]])
    truth = torch.tensor([[[0, 1, 1, IGNORE_INDEX], [2, 0, 0, 1]]])
    conf = torch.tensor([[[0.99, 0.97, 0.96, 0.99], [0.90, 0.80, 0.60, 0.50]]])
    keep = torch.tensor([[[False, True, True, True], [True, True, False, False]]])  # a miner's 5 pixels
    valid = torch.tensor([[[True, True, True, True], [True, True, True, False]]])  # last pixel is padding
    counts = loop.pseudo_label_counts(PseudoLabels(label=label, conf=conf, keep=keep), truth, valid, tau=0.95)
    # kept & valid: (0,1) right, (0,2) wrong, (0,3) no truth, (1,0) right, (1,1) wrong -> 5 kept, 4 graded, 2 right
    # conf >= 0.95: (0,0) right, (0,1) right, (0,2) wrong, (0,3) no truth -> 4 kept, 3 graded, 2 right
    # the 5 most confident valid pixels: the four above and (1,0) right -> 4 graded, 3 right
    # every valid pixel: 6 with truth, right at (0,0), (0,1), (1,0), (1,2) -> 6 graded, 4 right
    assert counts.tolist() == [7, 5, 4, 2, 4, 3, 2, 4, 3, 6, 4]


def _crashing(method, at_step: int):
    """`method`, with a training step that raises KeyboardInterrupt at step index `at_step`."""
    original = method.training_step

    def step_or_crash(batch, step):
        if step == at_step:
            raise KeyboardInterrupt
        return original(batch, step)

    method.training_step = step_or_crash
    return method


def test_resume_after_crash_gives_identical_weights_and_log(store, tmp_path):
    # the checkpoint (step 4) falls inside a log window (rows every 3 steps): the running means travel too
    cfg = h.tiny_train_config(iterations=7, checkpoint_every=2, log_every=3)
    _fit(h.build("toy"), store, tmp_path / "full", cfg)

    with pytest.raises(KeyboardInterrupt):
        _fit(_crashing(h.build("toy"), at_step=5), store, tmp_path / "crash", cfg)
    assert not (tmp_path / "crash" / "model.pt").exists()
    ckpt = torch.load(tmp_path / "crash" / "ckpt" / "last.pt", weights_only=False)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["step"] == 4
    assert {"method", "optimizers", "scaler", "rng", "run_hash", "stats", "log"} <= set(ckpt)
    (tmp_path / "crash" / "log.csv").unlink()  # as DVC does before it runs a stage again
    result = _fit(h.build("toy"), store, tmp_path / "crash", cfg)
    assert result["resumed_from"] == 4  # last checkpoint before the crash (every 2 steps)
    assert _same(_weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "crash" / "model.pt"))
    # the log has each row once, with the same values, as if never interrupted
    assert [r["step"] for r in _rows(tmp_path / "crash" / "log.csv")] == ["3", "6", "7"]
    assert _rows(tmp_path / "crash" / "log.csv") == _rows(tmp_path / "full" / "log.csv")
    assert not (tmp_path / "crash" / "ckpt" / "last.pt").exists()


def test_bf16_run_resumes_bit_identically_and_records_its_precision(store, tmp_path):
    """bf16 autocast on the CPU (native here or emulated) is deterministic: a crashed run resumes to the same
    weights and log. The artifact names the precision; a bf16 checkpoint is not resumed by an fp32 run."""
    cfg = h.tiny_train_config(iterations=7, checkpoint_every=2, log_every=3, precision="bf16")
    _fit(h.build("toy"), store, tmp_path / "full", cfg)
    with pytest.raises(KeyboardInterrupt):
        _fit(_crashing(h.build("toy"), at_step=5), store, tmp_path / "crash", cfg)
    (tmp_path / "crash" / "log.csv").unlink()
    assert _fit(h.build("toy"), store, tmp_path / "crash", cfg)["resumed_from"] == 4
    assert _same(_weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "crash" / "model.pt"))
    assert _rows(tmp_path / "crash" / "log.csv") == _rows(tmp_path / "full" / "log.csv")
    assert torch.load(tmp_path / "full" / "model.pt", weights_only=True)["precision"] == "bf16"

    fp32 = dataclasses.replace(cfg, precision="fp32")
    _fit(h.build("toy"), store, tmp_path / "fp32", fp32)
    assert torch.load(tmp_path / "fp32" / "model.pt", weights_only=True)["precision"] == "fp32"
    # bf16 really ran: the weights differ from fp32's (in the last bits at least)
    assert not _same(_weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "fp32" / "model.pt"))
    with pytest.raises(KeyboardInterrupt):
        _fit(_crashing(h.build("toy"), at_step=5), store, tmp_path / "switch", cfg)
    assert _fit(h.build("toy"), store, tmp_path / "switch", fp32)["resumed_from"] is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_steps_run_under_the_runtime(store, tmp_path, precision):
    """Weights and batch images channels_last; the step inside autocast exactly when the precision asks for it."""
    method = h.build("toy")
    original, seen = method.training_step, []

    def observed(batch, step):
        seen.append((batch.x.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu")))
        return original(batch, step)

    method.training_step = observed
    _fit(method, store, tmp_path, h.tiny_train_config(iterations=2, precision=precision))
    assert seen == [(True, precision == "bf16")] * 2
    assert method.model.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)


def _checkpoint_of_a_crash(store, out: Path, cfg) -> None:
    with pytest.raises(KeyboardInterrupt):
        _fit(_crashing(h.build("toy"), at_step=2), store, out, cfg)
    assert torch.load(out / "ckpt" / "last.pt", weights_only=False)["step"] == 2


def test_changed_config_does_not_resume(store, tmp_path):
    cfg = h.tiny_train_config(iterations=3, checkpoint_every=1)
    _checkpoint_of_a_crash(store, tmp_path, cfg)
    result = _fit(h.build("toy"), store, tmp_path, h.tiny_train_config(iterations=3, checkpoint_every=1, lr=0.01))
    assert result["resumed_from"] is None
    # presentation-only keys (and the post-training PreciseBN pass) do not invalidate the checkpoint
    _checkpoint_of_a_crash(store, tmp_path, cfg)
    changed = h.tiny_train_config(iterations=3, checkpoint_every=1, log_every=5, precise_bn="off")
    assert _fit(h.build("toy"), store, tmp_path, changed)["resumed_from"] == 2


def test_changed_code_does_not_resume(store, tmp_path, monkeypatch, caplog):
    cfg = h.tiny_train_config(iterations=3, checkpoint_every=1)
    _checkpoint_of_a_crash(store, tmp_path, cfg)
    monkeypatch.setattr(loop, "code_hash", lambda: "edited-source")
    with caplog.at_level("WARNING"):
        result = _fit(h.build("toy"), store, tmp_path, cfg)
    assert result["resumed_from"] is None and result["steps"] == 3
    assert "not resumed, starting from step 0" in caplog.text


def test_code_hash_follows_every_source_file(tmp_path):
    package = tmp_path / "s4seg"
    (package / "methods").mkdir(parents=True)
    (package / "methods" / "m.py").write_text("x = 1\n")
    (package / "readme.txt").write_text("not code")
    before = code_hash(package)
    (package / "readme.txt").write_text("still not code")
    assert code_hash(package) == before
    (package / "methods" / "m.py").write_text("x = 1  # a comment\n")
    assert code_hash(package) != before
    assert code_hash() == code_hash(Path(loop.__file__).resolve().parents[1])  # the installed package


def test_supervised_on_semi_schedule_and_warmup_schedule(store, tmp_path):
    cfg = h.tiny_train_config(iterations=None, epochs=2.0)
    # train schedule: epochs over the 7 unlabeled tiles -> 3 batches of 2 per epoch
    assert _fit(h.build("supervised"), store, tmp_path / "semi", cfg)["steps"] == 6
    # warmup schedule: epochs over the 3 labeled tiles -> 1 batch of 2 per epoch
    assert _fit(h.build("supervised"), store, tmp_path / "warm", cfg, labeled_only=True)["steps"] == 2
    rows = _rows(tmp_path / "semi" / "log.csv")
    assert "pseudo_kept_share" not in rows[0] and "loss_x" in rows[0]


def test_gradient_accumulation_counts_steps(store, tmp_path):
    cfg = h.tiny_train_config(iterations=None, epochs=2.0, batch_size=1, accumulate=3)
    # 7 unlabeled tiles, batch 1 -> 7 micro-batches per epoch; 14 micro-batches / 3 per step -> 5 steps
    assert _fit(h.build("toy"), store, tmp_path, cfg)["steps"] == 5
    assert [float(r["epoch"]) for r in _rows(tmp_path / "log.csv")][-1] == pytest.approx(15 / 7, abs=1e-5)


class _RecordingWriter:
    def __init__(self):
        self.steps, self.shapes, self.labels = [], [], []

    def add(self, step, pseudo):
        self.steps.append(step)
        self.shapes.append(tuple(pseudo.label.shape))
        self.labels.append((pseudo.label.clone(), pseudo.conf.clone(), pseudo.keep.clone()))


def test_snapshots_do_not_change_training(store, tmp_path):
    cfg = h.tiny_train_config(iterations=4)
    _fit(h.build("toy"), store, tmp_path / "plain", cfg)
    writer = _RecordingWriter()
    snaps = PseudoLabelSnapshots(writer, store, [3, 4])
    _fit(h.build("toy"), store, tmp_path / "snap", h.tiny_train_config(iterations=4, snapshot_every=2),
         snapshots=snaps)
    assert writer.steps == [0, 2, 4] and writer.shapes == [(2, 16, 16)] * 3
    assert _same(_weights(tmp_path / "plain" / "model.pt"), _weights(tmp_path / "snap" / "model.pt"))


def test_eval_every_logs_test_miou_points_without_changing_training(store, tmp_path):
    """train.eval_every: test mIoU at steps 2 and 4 (and the last, 5), empty cells between; same weights and
    BN buffers as a run without the curve (each point re-estimates the BN statistics, PreciseBN, then puts
    them back); the last point equals a brute-force count over the final model, whose PreciseBN is the same."""
    cfg = {"iterations": 5, "precision": "fp32", "precise_bn": "all"}
    _fit(h.build("toy"), store, tmp_path / "plain", h.tiny_train_config(**cfg))
    method = h.build("toy")
    _fit(method, store, tmp_path / "curve", h.tiny_train_config(**cfg, eval_every=2, log_every=1))
    assert _same(_weights(tmp_path / "plain" / "model.pt"), _weights(tmp_path / "curve" / "model.pt"))
    rows = {int(r["step"]): r["test_miou"] for r in _rows(tmp_path / "curve" / "log.csv")}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[1] == rows[3] == ""
    points = {step: float(rows[step]) for step in (2, 4, 5)}
    assert all(0.0 <= v <= 1.0 for v in points.values())
    # the last point, recomputed by hand: per class |pred & gt| / |pred | gt| over the test tiles, mean over
    # classes present in either
    test_ids = h.make_split().test
    method.eval()
    with torch.no_grad():
        images = torch.stack([torch.from_numpy(store.image(int(i))).permute(2, 0, 1).float() / 255 for i in test_ids])
        pred = method.predict(images).argmax(1).numpy()
    gt = np.stack([store.mask(int(i)) for i in test_ids])
    pred, gt = pred[gt != IGNORE_INDEX], gt[gt != IGNORE_INDEX]  # ignore pixels count nowhere
    ious = [((pred == c) & (gt == c)).sum() / ((pred == c) | (gt == c)).sum()
            for c in range(store.num_classes) if ((pred == c) | (gt == c)).any()]
    assert points[5] == pytest.approx(float(np.mean(ious)), abs=1e-6)


def test_a_curve_point_leaves_every_buffer_and_the_rng_as_it_found_them(store):
    method = h.build("toy")
    method.train()
    buffers = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    runtime = loop.make_runtime(torch.device("cpu"), "fp32", where="test")
    split = h.make_split()
    value = loop.eval_test_miou(method, store, split.test, runtime, 2, [int(i) for i in split.labeled])
    assert 0.0 <= value <= 1.0 and method.training
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in buffers.items())
    assert torch.equal(torch.get_rng_state(), rng)
    # and the statistics were really re-estimated for the point: without the restore they would differ
    loop.recompute_bn_stats(method.networks(), store, [int(i) for i in split.labeled], batch_size=4,
                            device=torch.device("cpu"))
    assert not torch.equal(buffers["model.encoder.1.running_mean"], method.state_dict()["model.encoder.1.running_mean"])


def test_snapshots_survive_a_crash(store, tmp_path):
    """Snapshots taken before the last checkpoint come back on resume; later ones are taken again."""
    cfg = h.tiny_train_config(iterations=6, snapshot_every=1, checkpoint_every=3)
    full = _RecordingWriter()
    _fit(h.build("toy"), store, tmp_path / "full", cfg, snapshots=PseudoLabelSnapshots(full, store, [3, 4]))

    with pytest.raises(KeyboardInterrupt):
        _fit(_crashing(h.build("toy"), at_step=4), store, tmp_path / "crash", cfg,
             snapshots=PseudoLabelSnapshots(_RecordingWriter(), store, [3, 4]))
    resumed = _RecordingWriter()  # a new store, as after a SIGKILL (the old one was never published)
    result = _fit(h.build("toy"), store, tmp_path / "crash", cfg,
                  snapshots=PseudoLabelSnapshots(resumed, store, [3, 4]))
    assert result["resumed_from"] == 3
    assert resumed.steps == full.steps == list(range(7))
    for a, b in zip(resumed.labels, full.labels, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _run_helper(tmp: Path, store: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HELPER), "--store", str(store), "--out", str(tmp / "model.pt"),
         "--log", str(tmp / "log.csv"), "--checkpoints", str(tmp / "ckpt"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_finishes_same_run(store, tmp_path):
    args = ("--iterations", "24", "--checkpoint-every", "3")
    killed = _run_helper(tmp_path / "killed", store.path, *args, "--sleep", "0.1")
    # the uninterrupted reference, in this process, with the helper's exact config
    _fit(h.build("toy"), store, tmp_path / "full", h.tiny_train_config(iterations=24, checkpoint_every=3, log_every=2))

    ckpt = tmp_path / "killed" / "ckpt" / "last.pt"
    deadline = time.time() + 30
    while time.time() < deadline and killed.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 6:
            break
        time.sleep(0.1)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=10)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model.pt").exists()
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert 6 <= step_at_kill < 24

    rerun = _run_helper(tmp_path / "killed", store.path, *args)
    _, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    assert f"resumed from {ckpt} at step" in err
    full_art = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed_art = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    assert resumed_art["step"] == full_art["step"] == 24
    assert _same(full_art["state_dict"], resumed_art["state_dict"])
    assert _rows(tmp_path / "killed" / "log.csv") == _rows(tmp_path / "full" / "log.csv")
