"""s4seg.runtime: `auto` precision from the hardware (mocked), bad values named by key, channels_last and bf16
predictions against fp32 contiguous ones, and what each runtime does to models, images and batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from s4seg import runtime as rt
from s4seg.config import ModelConfig, load_params
from s4seg.engine.bench import synthetic_batch
from s4seg.errors import ParamsError
from s4seg.models import build_model
from s4seg.runtime import Runtime, make_runtime, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    """AVX-512 but no bf16 dot products (a Skylake/Cascade Lake server)."""
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


@pytest.fixture
def cpu_with_amx(monkeypatch):
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


def test_auto_is_fp32_without_native_bf16(cpu_without_bf16):
    assert not rt.cpu_has_native_bf16()
    assert resolve_precision("auto", CPU) == "fp32"
    runtime = make_runtime("cpu", "auto")
    assert runtime.precision == "fp32" and runtime.dtype is None


def test_auto_is_bf16_with_native_bf16(cpu_with_amx):
    assert rt.cpu_has_native_bf16()
    runtime = make_runtime("cpu", "auto")
    assert runtime.precision == "bf16" and runtime.dtype == torch.bfloat16


def test_avx512_bf16_alone_counts_and_a_capped_torch_does_not(monkeypatch):
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))  # Cooper Lake, Zen 4
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert resolve_precision("auto", CPU) == "fp32"


@pytest.mark.parametrize(("has_bf16", "auto"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, has_bf16, auto):
    """Ampere and newer: bf16; older GPUs: fp32 (fp16 needs a gradient scaler and is asked for explicitly)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: has_bf16)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == auto
    assert resolve_precision("fp16", cuda) == "fp16"
    if not has_bf16:
        with pytest.raises(ParamsError, match=r"evaluate.precision = 'bf16' but this GPU has no bf16"):
            resolve_precision("bf16", cuda, where="evaluate.precision")


def test_explicit_values_are_kept(cpu_without_bf16, caplog):
    assert resolve_precision("fp32", CPU) == "fp32"
    rt._warn_emulated.cache_clear()
    assert resolve_precision("bf16", CPU) == "bf16"  # asked for: runs, emulated, with a warning
    assert "emulated, slower than fp32" in caplog.text


def test_bad_values_name_the_key():
    with pytest.raises(ParamsError, match=r"params.yaml: train.precision = 'fp64'; expected one of: auto, fp32"):
        make_runtime("cpu", "fp64", where="train.precision")
    with pytest.raises(ParamsError, match=r"dump.precision = 'fp16' runs on CUDA only; on cpu use auto"):
        make_runtime("cpu", "fp16", where="dump.precision")


@pytest.mark.parametrize("section", ["warmup", "train", "evaluate", "dump"])
def test_params_yaml_rejects_a_bad_precision(tmp_path: Path, section: str):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({section: {"precision": "half"}}))
    with pytest.raises(ParamsError, match=rf"params.yaml: {section}: precision = 'half': expected one of auto, fp32"):
        load_params(path)


def test_module_images_and_batch_follow_the_memory_format():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert make_runtime("cpu").module(net) is net
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert net[1].weight.is_contiguous()  # 1-D tensors have no memory format
    x = make_runtime("cpu").input(np.zeros((2, 8, 8, 3), np.uint8) + 255)
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last) and float(x.max()) == 1.0
    batch = synthetic_batch(2, 8, 3, torch.Generator().manual_seed(0)).to(CPU, memory_format=torch.channels_last)
    assert batch.u_s1_mix.is_contiguous(memory_format=torch.channels_last) and batch.y.is_contiguous()
    Runtime(CPU, channels_last=False).module(net)  # back to contiguous: the bench's fp32 baseline
    assert net[0].weight.is_contiguous()


def test_predictor_autocasts_and_returns_fp32_logits():
    net = torch.nn.Conv2d(3, 2, 1)
    runtime = Runtime(CPU, "bf16")

    def predict(images: torch.Tensor) -> torch.Tensor:
        assert images.is_contiguous(memory_format=torch.channels_last) and torch.is_autocast_enabled("cpu")
        logits = net(images)
        assert logits.dtype == torch.bfloat16
        return logits

    assert runtime.predictor(predict)(torch.rand(1, 3, 4, 4)).dtype == torch.float32


def _default_model() -> torch.nn.Module:
    """The default DeepLabV3+ on EfficientNet-Lite0, random init, with logits of a trained net's size (std ~2)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights=None), 6, load_pretrained=False).eval()
    with torch.no_grad():
        for m in model.modules():  # BN statistics other than (0, 1), as after training
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.classifier.weight.mul_(60)  # random init gives logits of ~0.03, where any tolerance is loose
    return model


def test_channels_last_and_bf16_predict_like_fp32_contiguous():
    """Logits of |max| ~4. channels_last changes only the memory order: fp32 logits agree to 1e-4 (other conv
    kernels round differently; measured 2e-6) and the labels are equal. bf16 rounds activations to 8 bits of
    mantissa: logits agree to 0.1 (measured 0.02) and labels on at least 99% of the pixels (measured 100%)."""
    model = _default_model()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = Runtime(CPU, "fp32", channels_last=False)
    logits = reference.predictor(reference.module(model))(images)
    fast = Runtime(CPU, "fp32", channels_last=True)
    logits_cl = fast.predictor(fast.module(model))(images)
    assert model.classifier.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(logits_cl, logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(logits_cl.argmax(1), logits.argmax(1))
    bf16 = Runtime(CPU, "bf16", channels_last=True)
    logits_bf16 = bf16.predictor(model)(images)
    assert logits_bf16.dtype == torch.float32
    assert float(logits.abs().max()) > 2.0  # the tolerances are meaningful
    assert (logits_bf16 - logits).abs().max() < 0.1
    assert (logits_bf16.argmax(1) == logits.argmax(1)).float().mean() >= 0.99
