"""How a model runs: device, precision (autocast) and memory format, set in one place.

Training (`engine.loop.fit`), PreciseBN (`engine.precise_bn`), evaluation (`stages/evaluate.py`), the dump
(`evaluation.dump`) and prediction build a `Runtime` with `make_runtime(device, precision)` and let it move
the model (`module`), lay out the images (`images`, `input`) and open the autocast region (`autocast`), or
wrap a `predict` callable (`predictor`). This module sits below all of them (it imports torch, `config` and
`errors` only), and so does `to_input`, the uint8 -> float image conversion they share.

Memory format: every model here is convolutional (ResNet, EfficientNet-Lite, DeepLabV3+; the ViT's patch
embedding and DPT's fusion blocks), and oneDNN on CPU and cuDNN on GPU run convolutions fastest on NHWC
tensors, so parameters and images are `channels_last`. The values are the same, only their order in memory
differs; a different conv kernel may round differently (last bits of fp32).

Precision (`precision:` in warmup, train, evaluate and dump; `PRECISIONS`):
- `fp32`: no autocast.
- `bf16`: autocast to bfloat16 (convolutions and matrix products in bf16, with fp32 accumulation).
- `fp16`: CUDA only, autocast to float16, with a gradient scaler in training (fp16 overflows without one).
- `auto`: bf16 where the hardware runs it natively: a CUDA device with bf16 (Ampere or newer), or a CPU with
  AVX-512 BF16 or AMX (`cpu_has_native_bf16`, read at run time from the CPU flags); fp32 elsewhere, since
  emulated bf16 is slower than fp32 (and a GPU without bf16 gets fp32, not fp16: fp16 is opt-in).

What stays fp32 under autocast, where precision matters:
- Parameters, gradients, optimiser state and BN running statistics: autocast casts copies for the op, the
  stored tensors stay fp32. The EMA teacher update (`engine.ema`) runs after the step, outside autocast,
  on those fp32 tensors; so do the optimiser step and PreciseBN's averaging of the batch statistics.
- Losses: the cross-entropies of `methods.losses` cast the logits to fp32 (their comment says so); the other
  methods' KL, entropy and region losses cast with `.float()` before their (log-)softmax.
- Softmax confidences and thresholds: `methods.losses.select_confident` and `Method.pseudo_labels` take the
  softmax of fp32 logits, so `conf >= tau` compares fp32 numbers; CorrMatch's correlation softmax is fp32.
- Evaluation: `Runtime.predictor` returns fp32 logits, and the sliding window averages fp32 probabilities.
The logits themselves come out of a bf16 convolution: their rounding (8 bits of mantissa) is the price of
the fast path, the same as with CUDA autocast.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from s4seg.config import PRECISIONS
from s4seg.errors import ParamsError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)
Predict = Callable[[Tensor], Tensor]  # (B, C, h, w) float [0, 1] -> (B, K, h, w) logits

NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of bf16 dot products
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def to_input(images: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


# --------------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------------
@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 dot products in hardware (AVX-512 BF16 or AMX) and torch dispatches to its
    AVX-512 kernels (an older torch, or ATEN_CPU_CAPABILITY below avx512, would run bf16 slower than fp32)."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS) and ("AVX512" in capability or "AMX" in capability)


def native_bf16(device: torch.device) -> bool:
    """bf16 runs natively (faster than fp32) on `device`."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.5 reports native support only
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


@functools.cache
def _warn_emulated(device_type: str) -> None:
    log.warning("precision bf16 on a %s without native bf16: emulated, slower than fp32 (auto would use fp32)",
                device_type)


def resolve_precision(precision: str, device: torch.device, where: str = "precision") -> str:
    """`precision` as run on `device`: fp32, bf16 or fp16 (`auto` decided here). `where` names the params key."""
    if precision not in PRECISIONS:
        raise ParamsError(f"params.yaml: {where} = {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ParamsError(f"params.yaml: {where} = 'fp16' runs on CUDA only; on {device.type} use auto, bf16 or fp32")
    if precision == "bf16" and not native_bf16(device):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ParamsError(f"params.yaml: {where} = 'bf16' but this GPU has no bf16; use auto, fp16 or fp32")
        _warn_emulated(device.type)
    return precision


# --------------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs. `precision` is resolved (fp32 | bf16 | fp16, never auto)."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None (fp32: no autocast)."""
        return _DTYPES.get(self.precision)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        return f"{self.precision}, {'channels_last' if self.channels_last else 'contiguous'} on {self.device}"

    def autocast(self) -> AbstractContextManager:
        """The autocast region of a forward pass (a no-op in fp32). Backward passes stay outside it."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def module(self, module: M) -> M:
        """`module` moved to the device, its 4-D weights in the memory format (in place; returns it)."""
        return module.to(self.device, memory_format=self.memory_format)

    def images(self, images: Tensor) -> Tensor:
        """Float images (B, C, H, W) on the device, in the memory format."""
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def input(self, images: np.ndarray) -> Tensor:
        """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1], ready for the model."""
        return self.images(to_input(images, self.device))

    def predictor(self, predict: Predict) -> Predict:
        """`predict` run under this runtime: images laid out and autocast, fp32 logits out. The module
        behind `predict` is prepared separately (`module`)."""

        def run(images: Tensor) -> Tensor:
            with torch.no_grad(), self.autocast():
                return predict(self.images(images)).float()

        return run


def pick_device(device: str | torch.device) -> torch.device:
    """A torch.device; `auto` = CUDA when present, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_runtime(device: str | torch.device, precision: str = "fp32", *, where: str = "precision",
                 channels_last: bool = True) -> Runtime:
    """The runtime of a stage: `precision` (a PRECISIONS value) resolved for `device` (`where` names its params
    key in errors). channels_last is always on in the pipeline; `s4seg bench train` turns it off for its
    fp32 baseline."""
    dev = pick_device(device)
    return Runtime(dev, resolve_precision(precision, dev, where), channels_last)
