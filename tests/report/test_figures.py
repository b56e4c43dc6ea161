"""Palette colouring of label maps."""

from __future__ import annotations

import numpy as np
import pytest

from s4seg.report.figures import colorize, hex_to_rgb, ignore_color, legend_handles


def test_colorize_palette_and_ignore():
    labels = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    rgb = colorize(labels, ["#ff0000", "#00ff00", "#0000ff"])
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 0].tolist() == [0, 0, 255]
    assert rgb[1, 1].tolist() == [0, 0, 0]  # ignore: black
    # black is a class colour: ignore becomes white
    assert colorize(labels, ["#000000", "#00ff00", "#0000ff"])[1, 1].tolist() == [255, 255, 255]


def test_helpers():
    assert hex_to_rgb("#0a0B0c") == (10, 11, 12)
    with pytest.raises(ValueError, match="expected #RRGGBB"):
        hex_to_rgb("#fff")
    assert ignore_color(["#000000"]) == (255, 255, 255)
    handles = legend_handles(["a", "b"], ["#ff0000", "#00ff00"])
    assert [h.get_label() for h in handles] == ["a", "b", "ignore (255)"]
