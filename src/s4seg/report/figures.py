"""Figure helpers shared by report sections: label maps in the class palette, legends, figures.

Figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas (no pyplot global state, no
display), saved with `ReportContext.save_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run without a display

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from s4seg.config import IGNORE_INDEX  # noqa: E402

MODEL_COLORS = {"warmup": "#8c8c8c", "student": "#1f77b4"}  # others: the tab10 cycle


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    if len(value) != 6:
        raise ValueError(f"colour {color!r}: expected #RRGGBB")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def ignore_color(palette: Sequence[str]) -> tuple[int, int, int]:
    """Black for ignored pixels, or white when black is a class colour."""
    return (255, 255, 255) if any(hex_to_rgb(c) == (0, 0, 0) for c in palette) else (0, 0, 0)


def colorize(labels: np.ndarray, palette: Sequence[str]) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 in the palette; IGNORE_INDEX and unknown ids get `ignore_color`."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = ignore_color(palette)
    for i, color in enumerate(palette[:IGNORE_INDEX]):
        lut[i] = hex_to_rgb(color)
    return lut[np.asarray(labels, dtype=np.uint8)]


def display_image(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 tile -> something imshow draws: the first three bands, or one band in grey."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] >= 3:
        return image[..., :3]
    return image[..., 0] if image.ndim == 3 else image


def legend_handles(classes: Sequence[str], palette: Sequence[str], with_ignore: bool = True) -> list[Patch]:
    handles = [Patch(facecolor=c, edgecolor="#444444", label=name) for name, c in zip(classes, palette, strict=False)]
    if with_ignore:
        ignore = "#{:02x}{:02x}{:02x}".format(*ignore_color(palette))
        handles.append(Patch(facecolor=ignore, edgecolor="#444444", label=f"ignore ({IGNORE_INDEX})"))
    return handles


def model_color(name: str, index: int) -> str:
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    return matplotlib.colors.to_hex(matplotlib.colormaps["tab10"]((index + 2) % 10))
