"""`s4seg bench train`: seconds per training iteration and peak memory of each method, fp32 against the fast path.

Each method runs twice, each run in its own subprocess (`python -m s4seg.engine.bench ...`), so its peak
resident memory (VmHWM from /proc/self/status, falling back to ru_maxrss) is its own and not the maximum
over the runs before it:
- `fp32`: fp32 and contiguous tensors, as s4seg ran before `s4seg.runtime` existed;
- `fast`: what the pipeline runs now: channels_last weights and images, and `precision` (default `auto`:
  bf16 autocast where the hardware has it natively, else fp32; pass `fp32` to show the fallback of a CPU
  without bf16, i.e. channels_last alone).
The table gives both times and the speed-up fp32 / fast. `threads` sets torch's intra-op threads of every
run (default: torch's own, one per core): on a machine other jobs load, fewer threads than cores avoid
the stalls of a parallel region waiting for a descheduled thread (measured here: 10x slower steps).

One iteration is what the engine does per optimiser step: the method's `training_step` on a synthetic batch
of the given size (under the run's autocast), backward, optimiser step and the EMA update when the method
has a teacher. The first `WARMUP_ITERS` iterations are not timed (allocator and kernel warm-up). On CUDA
the peak allocated GPU memory is reported too.

`reference_params` (`s4seg bench train --reference`): UniMatch's reference configuration, so that a step can
be timed against the official code on the same machine: DeepLabV3+ on ResNet-50 with the deep stem, output
stride 16, 256 decoder channels, random init, 21 classes (Pascal VOC), crop 321, batch 2 (reference/
unimatch_v1_fixmatch.md: Pascal crop 321, batch 2 per GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from s4seg import timing
from s4seg.config import ModelConfig, Params, from_dict, to_dict
from s4seg.io import write_text_atomic

log = logging.getLogger(__name__)

WARMUP_ITERS = 2
BASELINE = "fixmatch"
PATHS = ("fp32", "fast")  # fp32 contiguous; the pipeline's runtime (channels_last, `precision`)
REFERENCE = {"batch": 2, "crop": 321, "num_classes": 21, "methods": ("supervised", "unimatch")}


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20  # kB on Linux, bytes on macOS


def synthetic_batch(batch: int, crop: int, num_classes: int, generator: torch.Generator) -> Any:
    """A `Batch` with every field filled, as the engine's loader would produce it."""
    from s4seg.data.augment import cutmix_box
    from s4seg.engine.method import Batch

    def images() -> torch.Tensor:
        return torch.rand(batch, 3, crop, crop, generator=generator)

    def labels() -> torch.Tensor:
        return torch.randint(0, num_classes, (batch, crop, crop), generator=generator)

    def boxes() -> torch.Tensor:
        return torch.stack([cutmix_box(crop, generator, p=1.0) for _ in range(batch)])

    valid = torch.ones(batch, crop, crop, dtype=torch.bool)
    return Batch(x=images(), y=labels(), u_w=images(), u_s1=images(), u_s2=images(), box1=boxes(), box2=boxes(),
                 valid_u=valid, u_w_mix=images(), u_s1_mix=images(), u_s2_mix=images(), valid_u_mix=valid.clone(),
                 y_u=labels(), y_u_mix=labels(), ids_u=torch.arange(batch))


def reference_params(params: Params) -> Params:
    """`params` with UniMatch's reference model: DeepLabV3+, ResNet-50 deep stem, OS 16, random init."""
    model = ModelConfig(arch="deeplabv3plus", encoder="resnet50", weights=None, output_stride=16, deep_stem=True,
                        aspp_dilations=(6, 12, 18), decoder_channels=256, freeze_encoder=False)
    return dataclasses.replace(params, model=model)


def bench_one(method_name: str, params: Params, batch: int, crop: int, iters: int, num_classes: int = 6, *,
              precision: str = "fp32", channels_last: bool = False, threads: int | None = None) -> dict:
    """Time `iters` iterations of one method in this process, in `precision` (a PRECISIONS value)."""
    import s4seg.methods  # noqa: F401  (registers the methods)
    from s4seg.engine.distributed import pick_device
    from s4seg.engine.ema import ema_update
    from s4seg.engine.method import build_method
    from s4seg.engine.optim import Optimizers
    from s4seg.models import build_model
    from s4seg.runtime import make_runtime

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    runtime = make_runtime(pick_device(params.train.device), precision, where="bench precision",
                           channels_last=channels_last)
    model = build_model(params.model, num_classes, load_pretrained=False)  # speed does not depend on weights
    method = runtime.module(build_method(method_name, params.methods.get(method_name, {}), model, num_classes))
    method.on_fit_start()
    method.train()
    method.total_steps = WARMUP_ITERS + iters
    optimizers = Optimizers(method, params.train, params.train.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.precision == "fp16")
    data = synthetic_batch(batch, crop, num_classes, torch.Generator().manual_seed(0))
    data = data.to(runtime.device, memory_format=runtime.memory_format)

    def iteration(step: int) -> None:
        optimizers.start_step(step, WARMUP_ITERS + iters)
        with runtime.autocast():
            out = method.training_step(data, step)
        optimizers.backward(out, scaler)
        optimizers.step(scaler)
        if method.teacher() is not None:
            ema_update(method.teacher(), method.model, step, method.ema_momentum())

    device = runtime.device
    for step in range(WARMUP_ITERS):
        iteration(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timing.start_recording()
    try:
        start = time.perf_counter()
        for step in range(WARMUP_ITERS, WARMUP_ITERS + iters):
            iteration(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iters
    finally:
        sections = {name: total / iters for name, total in timing.stop_recording().items()}
    row = {"method": method_name, "device": str(device), "arch": params.model.arch, "encoder": params.model.encoder,
           "batch": batch, "crop": crop, "classes": num_classes, "iters": iters, "precision": runtime.precision,
           "memory_format": "channels_last" if channels_last else "contiguous", "sec_per_iter": seconds,
           "peak_rss_mib": peak_rss_mib(), "torch_threads": torch.get_num_threads(),
           # named parts of the step (s4seg.timing), s/iter and share of the step
           "sections": {name: {"sec_per_iter": t, "share": t / seconds} for name, t in sections.items()}}
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def bench_in_subprocess(method_name: str, params: Params, batch: int, crop: int, iters: int, num_classes: int = 6,
                        *, precision: str = "fp32", channels_last: bool = False, threads: int | None = None) -> dict:
    """`bench_one` in a fresh Python process, so that its peak RSS is its own."""
    cmd = [sys.executable, "-m", "s4seg.engine.bench", "--method", method_name, "--batch", str(batch),
           "--crop", str(crop), "--iters", str(iters), "--classes", str(num_classes), "--precision", precision,
           "--params-json", json.dumps(to_dict(params))] + (["--channels-last"] if channels_last else []) + (
           ["--threads", str(threads)] if threads is not None else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench of {method_name} ({precision}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_train(methods: list[str] | None, params: Params, *, batch: int, crop: int, iters: int,
                out_json: str | Path, precision: str = "auto", num_classes: int = 6, threads: int | None = None,
                echo: bool = True) -> list[dict]:
    """Benchmark each method on both paths (`PATHS`), each run in a subprocess; write `out_json` atomically.

    Rows: one per (method, path), with `path`, the speed-up fp32 / fast (on both rows of a method) and the
    ratio to fixmatch on the same path. methods None = every registered method. `echo` prints a table.
    """
    from s4seg.config import check_precision
    from s4seg.engine.method import method_class
    from s4seg.methods import registered_methods  # fills the registry

    if methods is None:
        methods = registered_methods()
    for name in methods:
        method_class(name)  # an unknown name fails here, with the list of known ones
    check_precision(precision)
    runs = {"fp32": {"precision": "fp32", "channels_last": False},
            "fast": {"precision": precision, "channels_last": True}}
    rows = []
    for name in methods:
        pair = {path: {"path": path, **bench_in_subprocess(name, params, batch, crop, iters, num_classes,
                                                           threads=threads, **run)}
                for path, run in runs.items()}
        for row in pair.values():
            row["speedup"] = pair["fp32"]["sec_per_iter"] / pair["fast"]["sec_per_iter"]
        rows += pair.values()
    for path in PATHS:
        base = next((r["sec_per_iter"] for r in rows if r["method"] == BASELINE and r["path"] == path), None)
        for r in rows:
            if r["path"] == path:
                r[f"ratio_to_{BASELINE}"] = r["sec_per_iter"] / base if base else None
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_json, json.dumps(rows, indent=2) + "\n")
    if echo:
        print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per method: s/iter in fp32 and on the fast path, the speed-up, peak RSS, ratio to fixmatch."""
    by_method: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[r["path"]] = r
    lines = [f"{'method':<14}{'fp32 s/iter':>13}{'fast s/iter':>13}{'speed-up':>10}{'peak RSS MiB':>16}"
             f"{'fast x ' + BASELINE:>16}"]
    for name, pair in by_method.items():
        slow, fast = pair["fp32"], pair["fast"]
        ratio = fast.get(f"ratio_to_{BASELINE}")
        lines.append(f"{name:<14}{slow['sec_per_iter']:>13.3f}{fast['sec_per_iter']:>13.3f}{fast['speedup']:>9.2f}x"
                     f"{slow['peak_rss_mib']:>8.0f}/{fast['peak_rss_mib']:<7.0f}"
                     f"{(f'{ratio:.2f}' if ratio is not None else '-'):>16}")
    for name, pair in by_method.items():
        for section, part in pair["fast"].get("sections", {}).items():
            lines.append(f"  {name}: {section} {part['sec_per_iter']:.3f} s/iter, {100 * part['share']:.0f}% of "
                         "its fast step")
    fast = next((r for r in rows if r["path"] == "fast"), None)
    if fast is not None:
        lines.append(f"fp32 = fp32, contiguous; fast = {fast['precision']}, channels_last. {fast['arch']} / "
                     f"{fast['encoder']}, batch {fast['batch']}, crop {fast['crop']}, {fast['device']}, "
                     f"{fast['torch_threads']} threads")
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description="one method's training benchmark (used by bench_train)")
    parser.add_argument("--method", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--crop", type=int, required=True)
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--params-json", required=True)
    args = parser.parse_args()
    params = from_dict(Params, json.loads(args.params_json), where="bench params")
    print(json.dumps(bench_one(args.method, params, args.batch, args.crop, args.iters, args.classes,
                               precision=args.precision, channels_last=args.channels_last, threads=args.threads)))


if __name__ == "__main__":
    _main()
