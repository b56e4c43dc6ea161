"""The training loop shared by every method: `fit(method, store, split, cfg, ...)`.

One loop, top to bottom, no callbacks: device and DDP setup, data schedule, optimiser, resume, then
for each optimiser step: set the poly LR, run `accumulate` micro-batches (forward inside the method,
backward here), average gradients over ranks, step, update the EMA teacher, log, snapshot, checkpoint.
The method computes losses only (see `s4seg.engine.method`).

Precision and memory format come from `s4seg.runtime` (`cfg.precision`, resolved once here): the forward
passes run under its autocast, model and images are channels_last; backward, optimiser step and EMA
update run outside autocast on the fp32 parameters. The resolved precision is part of the run's identity
(a checkpoint written in bf16 is not resumed in fp32) and is recorded in the model artifact.

Units: a micro-batch is `batch_size` labeled tiles (+ the same number of unlabeled tiles and CutMix
partners); a step is one optimiser step over `accumulate` micro-batches. Epochs are counted in
micro-batches (one pass over the unlabeled tiles, or over the labeled tiles with `labeled_only`).
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from s4seg.config import IGNORE_INDEX, ModelConfig, TrainConfig, to_dict
from s4seg.data.loaders import PairedSchedule, make_loader
from s4seg.data.split import Split
from s4seg.data.store import TileStore
from s4seg.engine import distributed
from s4seg.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng,
    code_hash,
    load_training_state,
    model_artifact,
    restore_rng,
    run_hash,
    save_torch_atomic,
)
from s4seg.engine.ema import ema_update
from s4seg.engine.method import Batch, Method, PseudoLabels, StepOutput
from s4seg.engine.optim import Optimizers
from s4seg.engine.precise_bn import PRECISE_BN_CHOICES, precise_bn_tiles, recompute_bn_stats
from s4seg.engine.progress import Progress, format_duration
from s4seg.errors import ParamsError
from s4seg.evaluation.metrics import ConfusionMatrix
from s4seg.io import atomic_path
from s4seg.runtime import Runtime, make_runtime, to_input

log = logging.getLogger(__name__)

# TrainConfig keys that do not change the training trajectory (how it is observed, or the post-training
# PreciseBN pass): left out of the resume hash, so changing them re-uses the last checkpoint.
_PRESENTATION_KEYS = ("num_workers", "checkpoint_every", "log_every", "snapshot_every", "snapshot_tiles", "precise_bn",
                      "eval_every")
_BAR_REFRESH_STEPS = 5  # the bar's loss needs .item(), a device sync


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimiser steps of the run: `iterations` if set, else round(epochs * micro-batches per epoch / accumulate)."""
    if cfg.iterations is not None:
        return cfg.iterations
    return max(1, round(cfg.epochs * batches_per_epoch / cfg.accumulate))


def effective_lr(cfg: TrainConfig, world_size: int) -> float:
    """`lr`, linearly rescaled when `lr_reference_batch` is set (see TrainConfig)."""
    if cfg.lr_reference_batch is None:
        return cfg.lr
    return cfg.lr * cfg.batch_size * cfg.accumulate * world_size / cfg.lr_reference_batch


def validate(cfg: TrainConfig, where: str) -> None:
    checks = {
        "batch_size": cfg.batch_size >= 1, "crop": cfg.crop >= 1, "accumulate": cfg.accumulate >= 1,
        "epochs": cfg.epochs > 0, "lr": cfg.lr > 0, "lr_warmup": 0 <= cfg.lr_warmup < 1,
        "checkpoint_every": cfg.checkpoint_every >= 1, "snapshot_every": cfg.snapshot_every >= 0,
        "num_workers": cfg.num_workers >= 0, "log_every": cfg.log_every >= 1, "eval_every": cfg.eval_every >= 0,
        "iterations": cfg.iterations is None or cfg.iterations >= 1,
        "lr_reference_batch": cfg.lr_reference_batch is None or cfg.lr_reference_batch >= 1,
        "scale_range": 0 < cfg.scale_range[0] <= cfg.scale_range[1],
    }
    for key, ok in checks.items():
        if not ok:
            raise ParamsError(f"params.yaml: {where}.{key} = {getattr(cfg, key)!r} is out of range")
    if cfg.precise_bn not in PRECISE_BN_CHOICES:
        raise ParamsError(f"params.yaml: {where}.precise_bn = {cfg.precise_bn!r}; expected one of "
                          f"{', '.join(PRECISE_BN_CHOICES)}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Per-step statistics and the CSV log
# --------------------------------------------------------------------------------------------------
FIXMATCH_TAU = 0.95  # FixMatch's confidence threshold (its paper; UniMatch's default)


def pseudo_label_counts(pseudo: PseudoLabels, truth: Tensor, valid: Tensor | None,
                        tau: float = FIXMATCH_TAU) -> Tensor:
    """Pixel counts that grade what a method trains on against the hidden ground truth `truth` (B, H, W).

    Returns float64 [valid, kept, graded, correct, tau_kept, tau_graded, tau_correct, rank_graded,
    rank_correct, all_graded, all_correct]: valid unlabeled pixels; those the method keeps (`pseudo.keep`),
    kept with ground truth (not IGNORE_INDEX), kept and correct. Then references on the same labels of the
    same model at the same step, so that a method that mines more pixels (CorrMatch, RegionMatch's PRSPL)
    can be judged at equal footing: `tau_*`, the pixels FixMatch's rule keeps (`pseudo.conf >= tau`);
    `rank_*`, as many pixels as the method keeps, chosen by confidence alone (the highest `pseudo.conf` of
    the batch); `all_*`, every valid pixel (the accuracy of the whole pseudo-label map, which compares the
    teachers of two runs whatever they keep).
    """
    valid = valid.bool() if valid is not None else torch.ones_like(truth, dtype=torch.bool)
    has_truth = truth != IGNORE_INDEX
    right = pseudo.label == truth

    def graded(mask: Tensor) -> list[Tensor]:
        return [(mask & has_truth).sum(), (mask & has_truth & right).sum()]

    keep = pseudo.keep.bool() & valid
    tau_keep = (pseudo.conf >= tau) & valid
    n_kept = int(keep.sum())
    rank_keep = torch.zeros_like(valid)
    if n_kept > 0:  # the n_kept most confident valid pixels
        conf = torch.where(valid, pseudo.conf.float(), torch.tensor(-1.0, device=valid.device)).flatten()
        rank_keep.view(-1)[conf.topk(n_kept).indices] = True
    counts = [valid.sum(), keep.sum(), *graded(keep), tau_keep.sum(), *graded(tau_keep), *graded(rank_keep),
              *graded(valid)]
    return torch.stack(counts).double()


class StepStats:
    """Running sums since the last log row: mean of every log key, and pseudo-label counts.

    Values stay on the device until `row()` (one sync per row instead of one per step). The sums travel
    in the resume checkpoint (`state`), so the first row after a resume averages the same steps as in an
    uninterrupted run.
    """

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.sums: dict[str, Tensor | float] = dict(state["sums"]) if state else {}
        self.count = int(state["count"]) if state else 0
        # pixel counts of `pseudo_label_counts`, summed over the steps of a row
        self.pseudo: Tensor | None = state["pseudo"] if state else None

    def state(self) -> dict[str, Any]:
        cpu = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in self.sums.items()}
        return {"sums": cpu, "count": self.count, "pseudo": None if self.pseudo is None else self.pseudo.cpu()}

    def add(self, out: StepOutput, batch: Batch) -> None:
        self.count += 1
        for k, v in out.logs.items():
            v = v.detach().float() if isinstance(v, Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["loss"] = self.sums.get("loss", 0.0) + out.loss.detach().float()
        if out.pseudo is not None and batch.y_u is not None:
            counts = pseudo_label_counts(out.pseudo, batch.y_u, batch.valid_u)
            self.pseudo = counts if self.pseudo is None else self.pseudo + counts.to(self.pseudo.device)

    def row(self) -> dict[str, float]:
        out = {k: float(v) / self.count for k, v in self.sums.items()}
        if self.pseudo is not None:
            (valid, kept, graded, correct, tau_kept, tau_graded, tau_correct, rank_graded, rank_correct,
             all_graded, all_correct) = self.pseudo.tolist()

            def ratio(a: float, b: float) -> float:
                return a / b if b > 0 else math.nan

            out["pseudo_kept_share"] = ratio(kept, valid)  # share of valid pixels trained on
            out["pseudo_kept_acc"] = ratio(correct, graded)  # against the hidden GT
            # the same model's pseudo-labels under FixMatch's rule, and ranked by confidence at the kept share
            out["pseudo_tau95_share"] = ratio(tau_kept, valid)
            out["pseudo_tau95_acc"] = ratio(tau_correct, tau_graded)
            out["pseudo_rank_acc"] = ratio(rank_correct, rank_graded)
            out["pseudo_all_acc"] = ratio(all_correct, all_graded)  # the whole pseudo-label map
        return out


class CsvLog:
    """logs/*.csv, written row by row. Its rows also live in memory and travel in the resume checkpoint,
    so a resumed run rewrites the rows before the checkpoint (DVC deletes a stage's outputs before it
    runs it) and its log equals an uninterrupted run's row for row."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fields: list[str] | None = None
        self.rows: list[dict[str, str]] = []

    def start(self, state: dict[str, Any] | None) -> None:
        """A fresh log, or the fields and rows a checkpoint carried."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields = list(state["fields"]) if state and state["fields"] else None
        self.rows = [dict(r) for r in state["rows"]] if state else []
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            if self.fields:
                writer = csv.DictWriter(f, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(self.rows)

    def state(self) -> dict[str, Any]:
        return {"fields": self.fields, "rows": list(self.rows)}

    def write(self, row: dict[str, Any]) -> None:
        new_file = self.fields is None
        if new_file:
            self.fields = list(row)
        # keys that appear only after the header was written are dropped; missing ones stay empty
        text = {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in row.items() if k in self.fields}
        self.rows.append(text)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new_file:
                writer.writeheader()
            writer.writerow(text)


@torch.no_grad()
def eval_test_miou(method: Method, store: TileStore, tile_ids: np.ndarray, runtime: Runtime, batch_size: int,
              bn_tiles: list[int]) -> float | str:
    """mIoU of `method.predict` on the test tiles, for the curve of `train.eval_every` (test mIoU against
    iterations), measured as the final model is: BN statistics re-estimated over `bn_tiles` first
    (PreciseBN; the running statistics of batches of augmented crops are far noisier), then eval mode.
    Every BN buffer and the RNG are restored afterwards, so the run is the same with or without the curve.
    Never used to pick a model. "" when the split has no test tiles."""
    if len(tile_ids) == 0:
        return ""
    was_training, rng = method.training, capture_rng()
    buffers = {name: b.clone() for name, b in method.named_buffers()}
    recompute_bn_stats(method.networks(), store, bn_tiles, batch_size=batch_size * 2, device=runtime.device,
                       precision=runtime.precision)
    method.eval()
    matrix = ConfusionMatrix(store.num_classes)
    for start in range(0, len(tile_ids), batch_size):
        chunk = [int(i) for i in tile_ids[start : start + batch_size]]
        with runtime.autocast():
            logits = method.predict(runtime.input(np.stack([store.image(i) for i in chunk])))
        matrix.update(logits.argmax(dim=1).cpu().numpy(), np.stack([store.mask(i) for i in chunk]))
    for name, b in method.named_buffers():
        b.copy_(buffers[name])
    method.train(was_training)
    restore_rng(rng)
    return matrix.metrics().miou


# --------------------------------------------------------------------------------------------------
# Pseudo-label snapshots
# --------------------------------------------------------------------------------------------------
class PseudoLabelSnapshots:
    """Every `snapshot_every` steps, the method's pseudo-labels of fixed un-augmented unlabeled tiles.

    `writer` has `.add(step, PseudoLabels)` (s4seg.evaluation.snapshots.SnapshotWriter). Snapshots run
    in eval mode without touching the RNG streams, so taking them does not change the training run.
    The snapshots taken so far travel in the resume checkpoint (compact: uint8 label, float16 conf), so
    a run resumed after a crash writes the same snapshots as an uninterrupted one.
    """

    def __init__(self, writer: Any, store: TileStore, tile_ids: list[int]) -> None:
        self.writer = writer
        self.tile_ids = [int(i) for i in tile_ids]
        images = np.stack([store.image(i) for i in self.tile_ids]) if self.tile_ids else None
        self.images = None if images is None else to_input(images)
        self.taken: list[tuple[int, PseudoLabels]] = []

    def take(self, step: int, method: Method, runtime: Runtime) -> None:
        if self.images is None:
            return
        was_training = method.training
        rng = capture_rng()
        method.eval()
        with torch.no_grad(), runtime.autocast():  # as training labels its batches
            pseudo = method.pseudo_labels(runtime.images(self.images))
        method.train(was_training)
        restore_rng(rng)
        regions = None if pseudo.regions is None else pseudo.regions.cpu()
        self._add(step, PseudoLabels(label=pseudo.label.to("cpu", torch.uint8), keep=pseudo.keep.cpu(),
                                     conf=pseudo.conf.to("cpu", torch.float16), regions=regions))

    def _add(self, step: int, pseudo: PseudoLabels) -> None:
        self.taken.append((step, pseudo))
        self.writer.add(step, pseudo)

    def state(self) -> list[tuple[int, PseudoLabels]]:
        return list(self.taken)

    def restore(self, taken: list[tuple[int, PseudoLabels]], up_to_step: int) -> None:
        """Re-write the snapshots a checkpoint carried (those of steps <= the checkpoint's)."""
        for step, pseudo in taken:
            if step <= up_to_step:
                self._add(step, pseudo)


# --------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------
def fit(
    method: Method,
    store: TileStore,
    split: Split,
    cfg: TrainConfig,
    *,
    model_cfg: ModelConfig,
    seed: int,
    out_path: str | Path,
    log_path: str | Path,
    checkpoint_dir: str | Path,
    labeled_only: bool = False,
    snapshots: PseudoLabelSnapshots | None = None,
    identity: dict[str, Any] | None = None,
    section: str = "train",
    warm_start: bool = False,
) -> dict[str, Any]:
    """Train `method` on the split's tiles with schedule `cfg`; write the model artifact to `out_path`.

    labeled_only: epochs count passes over the labeled tiles and no unlabeled data is read (warmup).
    Otherwise epochs count passes over the unlabeled tiles; a method with `uses_unlabeled = False`
    (supervised) follows that same schedule on labeled tiles only.
    identity: extra facts that define the run (e.g. the hash of the init weights) for the resume check.
    warm_start: the method starts from a trained model (train.init: warmup), so `Method.warm_head_params()`
    form the LR group 'warm_head' (engine/optim.py).
    Returns {"steps", "seconds", "resumed_from"}.
    """
    validate(cfg, section)
    ctx = distributed.setup(cfg.device)
    try:
        return _fit(method, store, split, cfg, ctx, model_cfg=model_cfg, seed=seed, out_path=Path(out_path),
                    log_path=Path(log_path), checkpoint_dir=Path(checkpoint_dir), labeled_only=labeled_only,
                    snapshots=snapshots, identity=identity or {}, section=section, warm_start=warm_start)
    finally:
        distributed.teardown(ctx)


def _fit(method: Method, store: TileStore, split: Split, cfg: TrainConfig, ctx: distributed.DistContext, *,
         model_cfg: ModelConfig, seed: int, out_path: Path, log_path: Path, checkpoint_dir: Path,
         labeled_only: bool, snapshots: PseudoLabelSnapshots | None, identity: dict[str, Any],
         section: str, warm_start: bool) -> dict[str, Any]:
    device = ctx.device
    if ctx.is_main:
        log.info("training %s on %s (world size %d)", method.name, device, ctx.world_size)
    seed_everything(seed + ctx.rank)  # method randomness (dropout masks) differs per rank
    runtime = make_runtime(device, cfg.precision, where=f"{section}.precision")
    if ctx.is_main:
        log.info("%s precision: %s (%s.precision = %s)", section, runtime.describe(), section, cfg.precision)
    runtime.module(method)
    method.on_fit_start()  # before resume (a checkpoint overrides it) and before DDP's broadcast

    # Data schedule ---------------------------------------------------------------------------------
    schedule = PairedSchedule(split.labeled, split.unlabeled, cfg.batch_size, seed, labeled_only=labeled_only,
                              load_unlabeled=method.uses_unlabeled, rank=ctx.rank, world_size=ctx.world_size)
    steps = total_steps(cfg, schedule.batches_per_epoch)
    base_lr = effective_lr(cfg, ctx.world_size)
    if ctx.is_main:
        log.info("%s plan: %d optimiser steps of %d x %d micro-batch(es) of %d tiles (%.2f epochs of %d)", section,
                 steps, cfg.accumulate, ctx.world_size, cfg.batch_size,
                 steps * cfg.accumulate / schedule.batches_per_epoch, schedule.batches_per_epoch)

    # Optimiser and gradient scaler (fp16 only: bf16 has fp32's exponent range) --------------------------
    optimizers = Optimizers(method, cfg, base_lr, method.warm_head_params() if warm_start else ())
    if ctx.is_main:
        log.info("%s LR groups: %s", section, optimizers.describe())
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.precision == "fp16")

    # Resume ----------------------------------------------------------------------------------------
    train_keys = {k: v for k, v in to_dict(cfg).items() if k not in _PRESENTATION_KEYS}
    this_run = run_hash({
        "train": train_keys, "method": method.name, "method_config": method.cfg, "model": model_cfg,
        "seed": seed, "world_size": ctx.world_size, "labeled_only": labeled_only,
        "labeled": split.labeled.tolist(), "unlabeled": split.unlabeled.tolist(), "store": len(store),
        "code": code_hash(), "precision": runtime.precision, **identity,
    })
    ckpt_path = checkpoint_dir / "last.pt"
    # on the CPU: RNG states must stay CPU tensors; load_state_dict moves weights and optimiser state
    state = load_training_state(ckpt_path, this_run, map_location="cpu")
    step = 0
    method.total_steps = steps
    if state is not None:
        method.load_state_dict(state["method"])
        optimizers.load_state_dict(state["optimizers"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"][ctx.rank])
        step = int(state["step"])
        if snapshots is not None and ctx.is_main:
            snapshots.restore(state.get("snapshots") or [], step)
        if ctx.is_main:
            log.info("resumed from %s at step %d of %d", ckpt_path, step, steps)
    resumed_from = step if state is not None else None
    stats = StepStats(state["stats"] if state is not None else None)
    csv_log = CsvLog(log_path) if ctx.is_main else None
    if csv_log is not None:
        csv_log.start(state["log"] if state is not None else None)
    del state
    if ctx.distributed:
        distributed.broadcast_module(method)

    def save_checkpoint() -> None:
        distributed.average_buffers(method, ctx.world_size)
        rng = capture_rng()
        if ctx.distributed:
            all_rng: list[Any] = [None] * ctx.world_size
            torch.distributed.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        if ctx.is_main:
            save_torch_atomic({
                "format": CHECKPOINT_FORMAT, "run_hash": this_run, "step": step, "total_steps": steps,
                "method": method.state_dict(), "optimizers": optimizers.state_dict(),
                "scaler": scaler.state_dict(), "rng": all_rng, "stats": stats.state(),
                "log": csv_log.state() if csv_log is not None else None,
                "snapshots": snapshots.state() if snapshots is not None else [],
            }, ckpt_path)

    # Loop ------------------------------------------------------------------------------------------
    micro_per_step = cfg.accumulate
    loader = make_loader(store, schedule, crop=cfg.crop, scale_range=cfg.scale_range, seed=seed,
                         start=step * micro_per_step, stop=steps * micro_per_step, num_workers=cfg.num_workers,
                         pin_memory=device.type == "cuda")
    batches = iter(loader)
    progress = Progress(steps, step, f"{section} {method.name}", enabled=ctx.is_main)
    if snapshots is not None and ctx.is_main and step == 0 and cfg.snapshot_every > 0:
        snapshots.take(0, method, runtime)
    bn_tiles = precise_bn_tiles(split, cfg.precise_bn)  # the final model's BN statistics (and the curve's)
    started = time.perf_counter()
    timed = False  # the time estimate is logged once, after the first few steps of this process
    method.train()
    while step < steps:
        lr = optimizers.start_step(step, steps)
        for _ in range(micro_per_step):
            batch = next(batches).to(device, memory_format=runtime.memory_format)
            with runtime.autocast():
                out = method.training_step(batch, step)
            optimizers.backward(out, scaler, micro_per_step)
            stats.add(out, batch)
            out.streams.clear()  # free what composed methods needed, before the next forward
        optimizers.step(scaler, ctx.world_size)
        teacher = method.teacher()
        if teacher is not None:
            ema_update(teacher, method.model, step, method.ema_momentum())
        step += 1

        epoch_end = (step * micro_per_step) // schedule.batches_per_epoch > (
            (step - 1) * micro_per_step) // schedule.batches_per_epoch
        evaluate_now = cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == steps)
        if ctx.is_main and (step % cfg.log_every == 0 or step == steps or evaluate_now):
            row = {"step": step, "epoch": step * micro_per_step / schedule.batches_per_epoch, "lr": lr,
                   **stats.row()}
            if cfg.eval_every > 0:  # the column exists from the first row on (the CSV header); empty between
                row["test_miou"] = (eval_test_miou(method, store, split.test, runtime, cfg.batch_size, bn_tiles)
                                    if evaluate_now else "")
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"{method.name}: loss is {row['loss']} at step {step}; lower the LR")
            csv_log.write(row)
            stats = StepStats()
        if step % _BAR_REFRESH_STEPS == 0 or step == steps:
            progress.update(step, loss=f"{out.loss.item():.4f}", lr=f"{lr:.2e}")
            if not timed and ctx.is_main and step - progress.initial >= _BAR_REFRESH_STEPS:  # the plan, timed
                timed = True
                rate = progress.seconds_per_step() or 0.0
                log.info("%s %s: %d steps to go at %.2f s/iter, about %s", section, method.name, steps - step,
                         rate, format_duration(rate * (steps - step)))
        if snapshots is not None and ctx.is_main and cfg.snapshot_every > 0 and step % cfg.snapshot_every == 0:
            snapshots.take(step, method, runtime)
        if step % cfg.checkpoint_every == 0 or epoch_end or step == steps:
            save_checkpoint()
    progress.close()
    del batches

    # Final artifact: the model of the last step (never a "best" epoch picked on test data) ----------
    distributed.average_buffers(method, ctx.world_size)
    # every rank runs the same tiles in the same order, so the networks stay identical across ranks
    recomputed = recompute_bn_stats(method.networks(), store, bn_tiles, batch_size=cfg.batch_size * 2, device=device,
                                    precision=runtime.precision)
    if recomputed and ctx.is_main:
        log.info("PreciseBN: BN statistics recomputed over %d training tiles (%s)", len(bn_tiles), cfg.precise_bn)
    if ctx.is_main:
        artifact = model_artifact(method, model_cfg=model_cfg, classes=store.classes, palette=store.palette,
                                  step=step, train_cfg=cfg, precision=runtime.precision)
        artifact["seed"] = seed
        save_torch_atomic(artifact, out_path)
        # the run is complete and its result is the artifact: leave no resume point behind, so that
        # `dvc repro -f` or a re-run after a change trains again instead of resuming at the last step
        ckpt_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    if ctx.is_main:
        log.info("%s: %d steps done in %.1f s; wrote %s", method.name, step, seconds, out_path)
    return {"steps": step, "seconds": seconds, "resumed_from": resumed_from}

