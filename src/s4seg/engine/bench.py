"""`s4seg bench train`: seconds per training iteration and peak memory of each method.

Every method runs in its own subprocess (`python -m s4seg.engine.bench ...`), so its peak resident
memory (VmHWM from /proc/self/status, falling back to ru_maxrss) is its own and not the maximum over
all methods benchmarked before it. One iteration is what the engine does per optimiser step: the
method's `training_step` on a synthetic batch of the given size, backward, optimiser step and the EMA
update when the method has a teacher. The first `WARMUP_ITERS` iterations are not timed (allocator
and kernel warm-up). On CUDA the peak allocated GPU memory is reported too.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from s4seg.config import Params, from_dict, to_dict
from s4seg.io import write_text_atomic

log = logging.getLogger(__name__)

WARMUP_ITERS = 2
BASELINE = "fixmatch"


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


def bench_one(method_name: str, params: Params, batch: int, crop: int, iters: int, num_classes: int = 6) -> dict:
    """Time `iters` iterations of one method in this process."""
    import s4seg.methods  # noqa: F401  (registers the methods)
    from s4seg.engine.distributed import pick_device
    from s4seg.engine.ema import ema_update
    from s4seg.engine.method import build_method
    from s4seg.engine.optim import Optimizers
    from s4seg.models import build_model

    torch.manual_seed(0)
    device = pick_device(params.train.device)
    model = build_model(params.model, num_classes, load_pretrained=False)  # speed does not depend on weights
    method = build_method(method_name, params.methods.get(method_name, {}), model, num_classes).to(device)
    method.on_fit_start()
    method.train()
    method.total_steps = WARMUP_ITERS + iters
    optimizers = Optimizers(method, params.train, params.train.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    data = synthetic_batch(batch, crop, num_classes, torch.Generator().manual_seed(0)).to(device)
    use_amp = params.train.amp and device.type == "cuda"

    def iteration(step: int) -> None:
        optimizers.start_step(step, WARMUP_ITERS + iters)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = method.training_step(data, step)
        optimizers.backward(out, scaler)
        optimizers.step(scaler)
        if method.teacher() is not None:
            ema_update(method.teacher(), method.model, step, method.ema_momentum())

    for step in range(WARMUP_ITERS):
        iteration(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(WARMUP_ITERS, WARMUP_ITERS + iters):
        iteration(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    row = {"method": method_name, "device": str(device), "arch": params.model.arch, "encoder": params.model.encoder,
           "batch": batch, "crop": crop, "iters": iters, "sec_per_iter": seconds, "peak_rss_mib": peak_rss_mib(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def bench_in_subprocess(method_name: str, params: Params, batch: int, crop: int, iters: int) -> dict:
    """`bench_one` in a fresh Python process, so that its peak RSS is its own."""
    cmd = [sys.executable, "-m", "s4seg.engine.bench", "--method", method_name, "--batch", str(batch),
           "--crop", str(crop), "--iters", str(iters), "--params-json", json.dumps(to_dict(params))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench of {method_name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_train(methods: list[str] | None, params: Params, *, batch: int, crop: int, iters: int,
                out_json: str | Path, echo: bool = True) -> list[dict]:
    """Benchmark each method in a subprocess; add the ratio to fixmatch; write `out_json` atomically.

    methods None = every registered method. `echo` prints a table to stdout.
    """
    from s4seg.engine.method import method_class
    from s4seg.methods import registered_methods  # fills the registry

    if methods is None:
        methods = registered_methods()

    for name in methods:
        method_class(name)  # an unknown name fails here, with the list of known ones
    rows = [bench_in_subprocess(name, params, batch, crop, iters) for name in methods]
    base = next((r["sec_per_iter"] for r in rows if r["method"] == BASELINE), None)
    for r in rows:
        r[f"ratio_to_{BASELINE}"] = r["sec_per_iter"] / base if base else None
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_json, json.dumps(rows, indent=2) + "\n")
    if echo:
        print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<14}{'s/iter':>10}{'peak RSS MiB':>14}{'x ' + BASELINE:>12}"]
    for r in rows:
        ratio = r.get(f"ratio_to_{BASELINE}")
        lines.append(f"{r['method']:<14}{r['sec_per_iter']:>10.3f}{r['peak_rss_mib']:>14.0f}"
                     f"{(f'{ratio:.2f}' if ratio is not None else '-'):>12}")
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description="one method's training benchmark (used by bench_train)")
    parser.add_argument("--method", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--crop", type=int, required=True)
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--params-json", required=True)
    args = parser.parse_args()
    params = from_dict(Params, json.loads(args.params_json), where="bench params")
    print(json.dumps(bench_one(args.method, params, args.batch, args.crop, args.iters)))


if __name__ == "__main__":
    _main()
