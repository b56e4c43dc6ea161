"""Sliding-window stitching: a model whose output is a known function of absolute position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s4seg.data.store import TileStore, TileStoreWriter
from s4seg.errors import ParamsError
from s4seg.evaluation.sliding import (
    iter_scene_bands,
    predict_scene,
    predict_tiles,
    scene_probabilities,
    stride_of,
    window_starts,
)

K = 4


def coordinate_image(h: int, w: int) -> np.ndarray:
    """uint8 (H, W, 3): channel 0 = row, channel 1 = column, channel 2 = 7 (all < 256)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy, xx, np.full_like(yy, 7)], axis=-1).astype(np.uint8)


def logits_at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A known, non-trivial function of absolute position: (..., ) coords -> (K, ...) logits."""
    return torch.stack([torch.sin(0.3 * (k + 1) * y + 0.17 * x * (k - 1.5)) * 4 for k in range(K)])


class PositionModel:
    """Decodes absolute coordinates from the image and returns `logits_at` them; records window sizes.

    Zero padding is recognisable (channel 2 is 7 in the image, 0 in padding) and gets huge logits of
    class 0, so a padded pixel leaking into the result would break the comparison.
    """

    def __init__(self) -> None:
        self.sizes: list[tuple[int, ...]] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(images.shape))
        coords = (images * 255).round()
        y, x = coords[:, 0], coords[:, 1]
        logits = logits_at(y, x).permute(1, 0, 2, 3)  # (B, K, h, w)
        padding = coords[:, 2:3] == 0
        garbage = torch.tensor([100.0, -100.0, -100.0, -100.0]).view(1, K, 1, 1)
        return torch.where(padding, garbage, logits)


def expected_probs(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return logits_at(yy, xx).softmax(dim=0)


@pytest.mark.parametrize(
    ("h", "w"),
    [(70, 90), (20, 25), (20, 70)],
    ids=["larger-than-window", "smaller-than-window", "smaller-in-one-axis"],
)
def test_scene_reproduces_position_function(h, w):
    model = PositionModel()
    image = coordinate_image(h, w)
    probs = scene_probabilities(model, image, window=32, overlap=0.5, num_classes=K, batch_size=3)
    assert probs.shape == (K, h, w)
    torch.testing.assert_close(probs, expected_probs(h, w), rtol=0, atol=1e-6)
    labels = predict_scene(model, image, window=32, overlap=0.5, num_classes=K, batch_size=3)
    np.testing.assert_array_equal(labels, expected_probs(h, w).argmax(dim=0).numpy())
    assert labels.dtype == np.uint8
    assert all(s[1:] == (3, 32, 32) for s in model.sizes)  # only full windows reach the model


def test_window_count_and_float_input():
    model = PositionModel()
    image = torch.from_numpy(coordinate_image(70, 90)).permute(2, 0, 1).float() / 255
    probs = scene_probabilities(model, image, window=32, overlap=0.5, num_classes=K, batch_size=4)
    torch.testing.assert_close(probs, expected_probs(70, 90), rtol=0, atol=1e-6)
    # rows 0, 16, 32, 38 and columns 0, 16, 32, 48, 58: 20 windows
    assert sum(s[0] for s in model.sizes) == 20


def test_overlapping_windows_average_probabilities():
    """A model whose output depends on the position *inside* the window: the mean over covering windows."""

    def local(images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        logits = torch.zeros(b, 2, h, w)
        logits[:, 0, :, : w // 2] = 10.0  # left half of every window votes class 0, right half class 1
        logits[:, 1, :, w // 2 :] = 10.0
        return logits

    image = np.zeros((4, 12, 3), dtype=np.uint8)
    probs = scene_probabilities(local, image, window=4, overlap=0.5, num_classes=2, batch_size=8)
    # column starts 0, 2, 4, 6, 8: column c is covered by windows starting at c-3..c (within range)
    hi = torch.tensor(10.0).exp() / (torch.tensor(10.0).exp() + 1)
    expected = []
    for c in range(12):
        votes = [hi if c - s < 2 else 1 - hi for s in (0, 2, 4, 6, 8) if s <= c < s + 4]
        expected.append(sum(votes) / len(votes))
    torch.testing.assert_close(probs[0], torch.stack(expected).float().expand(4, 12), rtol=0, atol=1e-6)


def test_window_starts_shift_inward():
    assert window_starts(70, 32, 16) == [0, 16, 32, 38]
    assert window_starts(64, 32, 16) == [0, 16, 32]
    assert window_starts(32, 32, 16) == [0]
    assert window_starts(10, 32, 16) == [0]
    assert window_starts(100, 32, 32) == [0, 32, 64, 68]
    assert stride_of(256, 1 / 3) == 171
    assert stride_of(256, 0.0) == 256
    with pytest.raises(ParamsError, match=r"evaluate.overlap must be in \[0, 1\); found 1.0"):
        stride_of(256, 1.0)


def test_bad_logits_shape_raises():
    with pytest.raises(ValueError, match=r"expected \(1, 4, 32, 32\)"):
        scene_probabilities(lambda x: x[:, :2], coordinate_image(20, 20), 32, 0.5, K, 1)


@pytest.fixture
def tiny_store(tmp_path) -> TileStore:
    rng = np.random.default_rng(1)
    writer = TileStoreWriter(tmp_path / "tiles.zarr", dataset="toy", classes=list("abcd"),
                             palette=["#000000", "#ff0000", "#00ff00", "#0000ff"], tile_size=8, stride=8)
    tiles = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    writer.add_scene("s0", tiles, np.zeros((5, 8, 8), np.uint8), np.zeros((5, 2), np.int32), 8, 40)
    writer.close()
    return TileStore(tmp_path / "tiles.zarr")


def test_predict_tiles_in_order(tiny_store):
    def channel_class(images: torch.Tensor) -> torch.Tensor:
        label = (images[:, 0] * 255).round().long() % K
        return torch.nn.functional.one_hot(label, K).permute(0, 3, 1, 2).float()

    ids = [4, 0, 2]
    labels = predict_tiles(channel_class, tiny_store, ids, batch_size=2)
    assert labels.shape == (3, 8, 8) and labels.dtype == np.uint8
    for row, i in zip(labels, ids, strict=True):
        np.testing.assert_array_equal(row, tiny_store.image(i)[..., 0] % K)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 40])
def test_bands_stream_top_to_bottom(batch_size):
    """The sweep reads rows top-down, a window-and-a-batch of rows at a time, and hands out each row once,
    equal to the whole-scene probabilities (the ring buffer wraps many times on a tall scene)."""
    model = PositionModel()
    image = coordinate_image(250, 45)
    reads = []

    def read_rows(top: int, bottom: int) -> np.ndarray:
        reads.append((top, bottom))
        return image[top:bottom]

    bands = [(band.top, band.probs.clone()) for band in
             iter_scene_bands(model, read_rows, 250, 45, window=32, overlap=0.5, num_classes=K, batch_size=batch_size)]
    assert [top for top, _ in bands] == sorted({top for top, _ in bands}) and bands[0][0] == 0
    joined = torch.cat([probs for _, probs in bands], dim=1)
    torch.testing.assert_close(joined, expected_probs(250, 45), rtol=0, atol=1e-6)
    assert all(a[0] <= b[0] for a, b in zip(reads, reads[1:], strict=False))  # never goes back up
    windows_per_row = 2  # column starts 0 and 13 (the last one shifted inward) on width 45
    span = 32 + 16 * -(-batch_size // windows_per_row)  # a window plus the rows of windows one batch reaches
    assert max(bottom - top for top, bottom in reads) <= span
