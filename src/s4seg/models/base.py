"""The interface every segmentation model implements.

Models know no method: an encoder returns multi-scale features, the decoder turns them into logits.
A method that perturbs features (UniMatch's feature dropout, UniMatch V2's complementary channel
dropout) or needs the decoder's embedding (CorrMatch's correlation map) calls `encode` and `decode`
itself and applies the perturbation in its own file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Segmenter(nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> logits (B, K, H, W).

    Normalisation with the encoder's pretraining mean/std happens inside the model, so data code
    never needs to know which encoder is used. Padding pixels are raw 0 before normalisation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

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
        """{'backbone': encoder params (base LR), 'head': everything else (LR x lr_multi)}."""
        raise NotImplementedError
