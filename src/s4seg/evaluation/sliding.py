"""Inference over test tiles and over whole scenes by sliding window.

`predict` is any callable `(B, C, h, w) float in [0, 1] -> (B, K, h, w) logits` (a `Method.predict`,
an ensemble, a test double); this module never sees a model.

Whole scenes: windows of `window` pixels step by `stride = round(window * (1 - overlap))`; the last
window of each row and column is shifted inward so it ends exactly at the scene border (no padding).
Only a scene smaller than one window is zero-padded at its bottom/right up to the window, and the
padded part of the prediction is discarded. The softmax probabilities of all windows covering a
pixel are averaged (probabilities rather than logits, so that one over-confident window cannot
dominate the vote), and the label is their argmax. This is UniMatch V2's sliding evaluation
(reference/unimatch_v2.md: last window snapped to the border, softmax summed): dividing by the
per-pixel window count does not change the argmax, it only makes the buffer a probability.
UniMatch V1 and CorrMatch truncate the border windows instead of shifting them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from s4seg.data.store import TileStore
from s4seg.errors import ParamsError

log = logging.getLogger(__name__)

Predict = Callable[[Tensor], Tensor]  # (B, C, h, w) float [0, 1] -> (B, K, h, w) logits


def _progress(total: int, desc: str) -> tqdm:
    # One bar per loop on stderr, silent when stderr is not a terminal (DVC logs, CI).
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not sys.stderr.isatty())


def to_input(images: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def predict_tiles(
    predict: Predict,
    store: TileStore,
    ids: Sequence[int] | np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Labels (N, T, T) uint8 of tiles `ids` (in that order), batch by batch."""
    ids = np.asarray(ids, dtype=np.int64)
    t = store.tile_size
    out = np.zeros((len(ids), t, t), dtype=np.uint8)
    with _progress(len(ids), "tiles") as bar:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            images = np.stack([store.image(i) for i in chunk])
            logits = predict(to_input(images, device))
            _check_logits(logits, len(chunk), None, (t, t))
            out[start : start + len(chunk)] = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
            bar.update(len(chunk))
    return out


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, stride, 2 stride, ..., and a last one at `length - window`.

    A length shorter than the window gives [0] (the caller pads). Every pixel is covered.
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)  # shifted inward: ends on the border, overlapping its neighbour more
    return starts


def stride_of(window: int, overlap: float) -> int:
    if not 0.0 <= overlap < 1.0:
        raise ParamsError(f"params.yaml: evaluate.overlap must be in [0, 1); found {overlap}")
    return max(1, round(window * (1.0 - overlap)))


def _windows(height: int, width: int, window: int, stride: int) -> Iterator[tuple[int, int]]:
    for y in window_starts(height, window, stride):
        for x in window_starts(width, window, stride):
            yield y, x


@torch.no_grad()
def scene_probabilities(
    predict: Predict,
    image: np.ndarray | Tensor,
    window: int,
    overlap: float,
    num_classes: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Mean softmax probabilities (K, H, W) float32 over all windows covering each pixel.

    `image` is uint8 (H, W, C) as stored, or float (C, H, W) in [0, 1].
    """
    x = _as_chw(image, device)
    c, h, w = x.shape
    if window <= 0:
        raise ParamsError(f"params.yaml: evaluate.window must be positive; found {window}")
    stride = stride_of(window, overlap)
    # Zero-pad only a scene smaller than the window (at bottom/right), so every window is full size.
    ph, pw = max(h, window), max(w, window)
    if (ph, pw) != (h, w):
        x = torch.nn.functional.pad(x, (0, pw - w, 0, ph - h))
    probs = torch.zeros((num_classes, ph, pw), dtype=torch.float32, device=x.device)
    hits = torch.zeros((1, ph, pw), dtype=torch.float32, device=x.device)
    boxes = list(_windows(ph, pw, window, stride))
    with _progress(len(boxes), "windows") as bar:
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start : start + batch_size]
            batch = torch.stack([x[:, y : y + window, xx : xx + window] for y, xx in chunk])
            logits = predict(batch)
            _check_logits(logits, len(chunk), num_classes, (window, window))
            p = logits.float().softmax(dim=1)
            for (y, xx), p_win in zip(chunk, p, strict=True):
                probs[:, y : y + window, xx : xx + window] += p_win
                hits[:, y : y + window, xx : xx + window] += 1
            bar.update(len(chunk))
    assert bool((hits > 0).all()), "a pixel was covered by no window"
    return (probs / hits)[:, :h, :w]


def predict_scene(
    predict: Predict,
    image: np.ndarray | Tensor,
    window: int,
    overlap: float,
    num_classes: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Labels (H, W) uint8 of a whole scene: argmax of `scene_probabilities`."""
    probs = scene_probabilities(predict, image, window, overlap, num_classes, batch_size, device)
    return probs.argmax(dim=0).to(torch.uint8).cpu().numpy()


def _as_chw(image: np.ndarray | Tensor, device: torch.device | str) -> Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, C) image, found {image.dtype} {image.shape}")
        return to_input(image[None], device)[0]
    if image.ndim != 3 or not image.is_floating_point():
        raise ValueError(f"expected a float (C, H, W) image tensor, found {image.dtype} {tuple(image.shape)}")
    return image.to(device)


def _check_logits(logits: Tensor, batch: int, num_classes: int | None, size: tuple[int, int]) -> None:
    ok = logits.ndim == 4 and logits.shape[0] == batch and tuple(logits.shape[2:]) == size
    if not ok or (num_classes is not None and logits.shape[1] != num_classes):
        k = num_classes if num_classes is not None else "K"
        raise ValueError(
            f"predict returned logits of shape {tuple(logits.shape)}; expected ({batch}, {k}, {size[0]}, {size[1]})"
        )
