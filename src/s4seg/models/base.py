"""The interfaces every segmentation model implements: `Encoder` (a backbone) and `Segmenter`.

Models know no method: an encoder returns multi-scale features, the decoder turns them into logits.
A method that perturbs features (UniMatch's feature dropout, UniMatch V2's complementary channel
dropout) or needs the decoder's embedding (CorrMatch's correlation map) calls `encode` and `decode`
itself and applies the perturbation in its own file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """A backbone: images (already normalised) -> features, low to high level.

    Subclasses set `channels` (of the features `forward_features` returns), `mean`/`std` (the
    normalisation its pretrained weights expect, on images in [0, 1]) and `head_prefixes`: the
    state-dict prefixes of the ImageNet classifier. The classifier is only built with
    `include_head=True` (classification checks); a segmentation encoder leaves it out, so that no
    parameter goes unused (DDP), and `load_pretrained` drops those keys from a pretrained file.
    """

    channels: list[int]
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    head_prefixes: ClassVar[tuple[str, ...]] = ()

    def forward_features(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


class Segmenter(nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> logits (B, K, H, W).

    Normalisation with the encoder's pretraining mean/std happens inside the model, so data code
    never needs to know which encoder is used. Padding pixels are raw 0 before normalisation.

    Subclasses keep their encoder in `self.backbone`; everything else is the head (decoder).
    """

    backbone: nn.Module
    # Keys of official checkpoints for modules this implementation does not build (ignored on load)
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.encoder_frozen = False

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def encode(self, images: Tensor) -> list[Tensor]:
        """Features the decoder uses, low to high level (DeepLabV3+: [c1, c4]; DPT: four ViT layers)."""
        raise NotImplementedError

    def decode(
        self, feats: list[Tensor], size: tuple[int, int], return_embedding: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits upsampled to `size`; with `return_embedding`, also the decoder's last feature map
        before the classifier (B, D, h, w) at its own resolution."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images), tuple(images.shape[-2:]))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{'backbone': encoder params (base LR), 'head': everything else (LR x lr_multi)}.

        Every parameter appears exactly once. Frozen encoder parameters stay in 'backbone' with
        requires_grad=False; an optimiser builder should skip parameters that do not require grad.
        """
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        return {
            "backbone": list(self.backbone.parameters()),
            "head": [p for p in self.parameters() if id(p) not in backbone_ids],
        }

    def freeze_encoder(self) -> None:
        """Stop training the encoder: no gradients, and its BatchNorm statistics stay fixed."""
        self.encoder_frozen = True
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.encoder_frozen:
            self.backbone.eval()  # a frozen encoder keeps its running BN statistics
        return self
