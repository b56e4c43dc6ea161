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

One sweep serves every caller (`iter_scene_bands`): windows run in row-major order, a batch at a
time, and the rows no later window reaches are handed out as soon as they are final. `evaluate`
joins the bands into a whole scene; `s4seg predict` writes each band out and so predicts scenes far
larger than memory, reading its rows from the file as the sweep goes down.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from s4seg.data.store import TileStore
from s4seg.errors import ParamsError
from s4seg.runtime import to_input  # lives below the engine, which shares it; importable from here as before

log = logging.getLogger(__name__)

Predict = Callable[[Tensor], Tensor]  # (B, C, h, w) float [0, 1] -> (B, K, h, w) logits
ReadRows = Callable[[int, int], np.ndarray | Tensor]  # (top, bottom) -> uint8 (h, W, C) or float (C, h, W)


def _progress(total: int, desc: str) -> tqdm:
    # One bar per loop on stderr, silent when stderr is not a terminal (DVC logs, CI).
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not sys.stderr.isatty())


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


@dataclass(frozen=True)
class SceneBand:
    """Finished rows `[top, top + h)` of a scene: nothing later in the sweep adds to them.

    `probs` is a view into the sweep's buffer, valid until the next band is asked for: copy it to keep it.
    """

    top: int
    probs: Tensor  # (K, h, W) float32 mean softmax, on the prediction device


@torch.no_grad()
def iter_scene_bands(
    predict: Predict,
    read_rows: ReadRows,
    height: int,
    width: int,
    window: int,
    overlap: float,
    num_classes: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    desc: str = "windows",
) -> Iterator[SceneBand]:
    """Mean softmax probabilities of a scene, top to bottom, in bands of finished rows.

    `read_rows(top, bottom)` returns rows `[top, bottom)` of the scene: uint8 (h, W, C) or float
    (C, h, W) in [0, 1]; it is called with non-decreasing `top`. Windows run in row-major order,
    `batch_size` at a time; after each batch the rows above the next window are final and are
    yielded. The sums live in a ring of rows (scene row r at r % ring) just tall enough for the rows
    one batch can touch, so a scene of any height streams through in memory set by its width.
    """
    if window <= 0:
        raise ParamsError(f"params.yaml: evaluate.window must be positive; found {window}")
    stride = stride_of(window, overlap)
    # Zero-pad only a scene smaller than the window (at bottom/right), so every window is full size.
    ph, pw = max(height, window), max(width, window)
    ys, xs = window_starts(ph, window, stride), window_starts(pw, window, stride)
    boxes = [(y, x) for y in ys for x in xs]
    # The windows form a grid: a pixel's window count is its row's count times its column's count.
    row_hits, col_hits = _coverage(ph, ys, window, device), _coverage(pw, xs, window, device)
    batches = [boxes[i : i + batch_size] for i in range(0, len(boxes), batch_size)]
    # Summed probabilities of the unfinished rows, allocated once: allocator churn would raise peak memory.
    ring = max(chunk[-1][0] - chunk[0][0] for chunk in batches) + window
    acc = torch.zeros((num_classes, ring, pw), dtype=torch.float32, device=device)
    done = 0  # rows above are final and yielded; equals the first row of the next batch
    with _progress(len(boxes), desc) as bar:
        for i, chunk in enumerate(batches):
            top, bottom = chunk[0][0], chunk[-1][0] + window
            assert top == done, "a batch starts on the first unfinished row"
            block = _pad_block(read_rows(top, min(bottom, height)), bottom - top, pw)
            logits = predict(_window_batch(block, chunk, top, window, device))
            _check_logits(logits, len(chunk), num_classes, (window, window))
            p = logits.float().softmax(dim=1)
            for (y, x), p_win in zip(chunk, p, strict=True):
                for start, stop in _ring_runs(y, y + window, ring):
                    acc[:, start % ring : (stop - 1) % ring + 1, x : x + window] += p_win[:, start - y : stop - y]
            bar.update(len(chunk))
            final = batches[i + 1][0][0] if i + 1 < len(batches) else ph
            for start, stop in _ring_runs(done, final, ring):
                rows = acc[:, start % ring : (stop - 1) % ring + 1]
                if start < height:
                    stop = min(stop, height)  # rows below are the zero padding of a scene smaller than a window
                    band = rows[:, : stop - start, :width]
                    yield SceneBand(start, band.div_(row_hits[start:stop, None] * col_hits[None, :width]))
                rows.zero_()  # free for the rows `ring` further down
            done = final


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
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, C) image, found {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        read: ReadRows = lambda top, bottom: image[top:bottom]  # noqa: E731
    else:
        if image.ndim != 3 or not image.is_floating_point():
            raise ValueError(f"expected a float (C, H, W) image tensor, found {image.dtype} {tuple(image.shape)}")
        h, w = image.shape[1:]
        read = lambda top, bottom: image[:, top:bottom]  # noqa: E731
    probs = torch.empty((num_classes, h, w), dtype=torch.float32, device=device)
    for band in iter_scene_bands(predict, read, h, w, window, overlap, num_classes, batch_size, device):
        probs[:, band.top : band.top + band.probs.shape[1]] = band.probs
    return probs


def labels_and_confidence(probs: Tensor) -> tuple[Tensor, Tensor]:
    """(K, ...) probabilities -> the class of highest probability (...) uint8 and that probability (...).

    `max` over dim 0 picks the first of tied classes, as `argmax` does, and is about 10x faster on CPU.
    """
    conf, labels = probs.max(dim=0)
    return labels.to(torch.uint8), conf


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
    return labels_and_confidence(probs)[0].cpu().numpy()


def _coverage(length: int, starts: list[int], window: int, device: torch.device | str) -> Tensor:
    """Number of windows covering each position along one axis, float32 (exact small integers)."""
    hits = torch.zeros(length, dtype=torch.float32)
    for s in starts:
        hits[s : s + window] += 1
    assert bool((hits > 0).all()), "a pixel was covered by no window"
    return hits.to(device)


def _ring_runs(start: int, stop: int, ring: int) -> list[tuple[int, int]]:
    """Rows [start, stop) (at most `ring` of them) cut where they wrap around the ring: none, one or two runs."""
    assert stop - start <= ring, "more rows in flight than the ring holds"
    wrap = (start // ring + 1) * ring
    if stop <= start:
        return []
    return [(start, stop)] if stop <= wrap else [(start, wrap), (wrap, stop)]


def _pad_block(pixels: np.ndarray | Tensor, rows: int, width: int) -> np.ndarray | Tensor:
    """Zero-pad a block of rows at its bottom/right to (rows, width): only scenes smaller than a window."""
    if isinstance(pixels, np.ndarray):
        if pixels.shape[:2] == (rows, width):
            return pixels
        return np.pad(pixels, ((0, rows - pixels.shape[0]), (0, width - pixels.shape[1]), (0, 0)))
    if tuple(pixels.shape[1:]) == (rows, width):
        return pixels
    return torch.nn.functional.pad(pixels, (0, width - pixels.shape[2], 0, rows - pixels.shape[1]))


def _window_batch(block: np.ndarray | Tensor, boxes: list[tuple[int, int]], top: int, window: int,
                  device: torch.device | str) -> Tensor:
    """(B, C, window, window) float in [0, 1] on `device`, cut from a block whose first row is `top`."""
    if isinstance(block, np.ndarray):
        windows = np.stack([block[y - top : y - top + window, x : x + window] for y, x in boxes])
        # contiguous (B, C, h, w), not the channels-last view `to_input` returns: a convolution's rounding
        # depends on the memory layout, and this keeps results bit-identical across callers and releases
        return to_input(windows, device).contiguous()
    return torch.stack([block[:, y - top : y - top + window, x : x + window] for y, x in boxes]).to(device)


def _check_logits(logits: Tensor, batch: int, num_classes: int | None, size: tuple[int, int]) -> None:
    ok = logits.ndim == 4 and logits.shape[0] == batch and tuple(logits.shape[2:]) == size
    if not ok or (num_classes is not None and logits.shape[1] != num_classes):
        k = num_classes if num_classes is not None else "K"
        raise ValueError(
            f"predict returned logits of shape {tuple(logits.shape)}; expected ({batch}, {k}, {size[0]}, {size[1]})"
        )
