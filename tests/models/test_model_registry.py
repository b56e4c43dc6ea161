"""build_model and the registries: lookups by name, errors that list the valid names, config checks."""

from __future__ import annotations

import pytest

from s4seg.config import ModelConfig, Params, from_dict, load_params
from s4seg.errors import ParamsError
from s4seg.models import arch_names, build_encoder, build_model, encoder_names
from s4seg.models.deeplabv3plus import DeepLabV3Plus
from s4seg.models.dpt import DPT, DPT_HEAD_CFGS
from s4seg.models.registry import register_encoder


def test_registered_names():
    assert arch_names() == ["deeplabv3plus", "dpt"]
    assert encoder_names() == [
        "efficientnet_lite0",
        "resnet101",
        "resnet18",
        "resnet50",
        "vit_base",
        "vit_large",
        "vit_small",
    ]
    assert set(encoder_names("vit")) == set(DPT_HEAD_CFGS)


def test_default_config_is_pretrained_deeplabv3plus_on_efficientnet(tmp_path):
    model = build_model(ModelConfig(), num_classes=6)
    assert isinstance(model, DeepLabV3Plus) and model.classifier.out_channels == 6
    assert model.backbone._blocks[0]._bn1.running_var.std() > 0  # ImageNet statistics, not ones


def test_load_pretrained_false_skips_the_file():
    model = build_model(ModelConfig(encoder="resnet18", weights="/nowhere.pth"), 2, load_pretrained=False)
    assert isinstance(model, DeepLabV3Plus)


def test_unknown_encoder_lists_valid_ones():
    with pytest.raises(
        ParamsError,
        match=r"model.encoder: 'resnet34' is not a registered encoder; choose one of: efficientnet_lite0, resnet101, ",
    ):
        build_model(ModelConfig(encoder="resnet34", weights=None), 2)


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(
        ParamsError, match=r"model.arch: 'unet' is not a registered architecture; choose one of: deeplabv3plus, dpt"
    ):
        build_model(ModelConfig(arch="unet", encoder="resnet18", weights=None), 2)


def test_encoder_must_fit_the_arch():
    with pytest.raises(
        ParamsError,
        match=r"'vit_small' cannot be used with model.arch 'deeplabv3plus'; choose one of: efficientnet_lite0",
    ):
        build_model(ModelConfig(encoder="vit_small", weights=None), 2)
    with pytest.raises(ParamsError, match=r"'resnet18' cannot be used with model.arch 'dpt'; choose one of: vit_base"):
        build_model(ModelConfig(arch="dpt", encoder="resnet18", weights=None), 2)
    with pytest.raises(ParamsError, match="model.deep_stem: true applies to ResNet encoders only"):
        build_model(ModelConfig(arch="dpt", encoder="vit_small", weights=None, deep_stem=True), 2)


def test_dpt_builds():
    model = build_model(ModelConfig(arch="dpt", encoder="vit_small", weights=None), 2)
    assert isinstance(model, DPT) and model.embedding_dim == 64


def test_num_classes_checked():
    with pytest.raises(ParamsError, match="num_classes must be at least 1, found 0"):
        build_model(ModelConfig(weights=None), 0)


def test_model_config_validation():
    with pytest.raises(ParamsError, match=r"params.yaml: model: output_stride: expected 8 or 16, found 32"):
        from_dict(Params, {"model": {"output_stride": 32}}, "params.yaml")
    with pytest.raises(ParamsError, match=r"aspp_dilations: expected positive integers, found \[6, 0\]"):
        ModelConfig(aspp_dilations=(6, 0))
    with pytest.raises(ParamsError, match="weights: expected 'package', a file path or null"):
        ModelConfig(weights=" ")
    with pytest.raises(ParamsError, match="decoder_channels: expected a positive integer, found 0"):
        ModelConfig(decoder_channels=0)


def test_shipped_params_build():
    params = load_params("params.yaml")
    model = build_model(params.model, num_classes=3, load_pretrained=False)
    assert model.classifier.out_channels == 3


def test_build_encoder_and_double_registration():
    assert build_encoder("resnet18", include_head=True).fc.out_features == 1000
    with pytest.raises(RuntimeError, match="registered twice"):
        register_encoder("resnet18", kind="cnn")(lambda: None)
