"""Segmentation models: encoders (ResNet, EfficientNet-Lite0, DINOv2 ViT) and decoders (DeepLabV3+, DPT).

    model = build_model(params.model, num_classes)   # a Segmenter: images in [0, 1] -> logits

Importing this package registers every family (one file each); `build_model` looks the
architecture and the encoder up by name, loads `model.weights` and freezes the encoder if asked.
"""

from __future__ import annotations

from s4seg.config import ModelConfig
from s4seg.errors import ParamsError
from s4seg.models import deeplabv3plus, dpt, efficientnet_lite, resnet, vit  # noqa: F401  (registers)
from s4seg.models.base import Encoder, Segmenter
from s4seg.models.registry import arch_names, encoder_names, get_arch, get_encoder
from s4seg.models.weights import load_weights

__all__ = ["Encoder", "Segmenter", "arch_names", "build_encoder", "build_model", "encoder_names"]


def build_model(cfg: ModelConfig, num_classes: int, load_pretrained: bool = True) -> Segmenter:
    """The Segmenter `cfg` describes, with `num_classes` output channels.

    `load_pretrained=False` skips `cfg.weights` (random init): for rebuilding a model whose trained
    state dict is loaded next (checkpoints, evaluation), so the pretrained file need not exist there.
    """
    if num_classes < 1:
        raise ParamsError(f"model: num_classes must be at least 1, found {num_classes}")
    entry = get_encoder(cfg.encoder)
    if cfg.weights == "package" and entry.package_weights is None:
        raise ParamsError(
            f"model.weights: 'package' is only available for efficientnet_lite0, not for encoder {cfg.encoder!r}; "
            "give a local weights file or null (random init)"
        )
    model = get_arch(cfg.arch)(cfg, num_classes)
    if load_pretrained:
        load_weights(model, cfg.weights, entry.package_weights, what=f"{cfg.arch} with encoder {cfg.encoder}")
    if cfg.freeze_encoder:
        model.freeze_encoder()
    return model


def build_encoder(name: str, **kwargs) -> Encoder:
    """A bare encoder by registered name (e.g. `include_head=True` for ImageNet classification)."""
    return get_encoder(name).build(**kwargs)
