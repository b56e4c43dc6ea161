"""The embedded default dataset: seeded synthetic aerial scenes in the ISPRS taxonomy.

Each scene is a small town seen from above at roughly 10-15 cm per pixel: a road grid (some roads end
at T-junctions) with sidewalks and lane markings, blocks filled with houses and gardens, flat-roofed
commercial buildings with parking lots, parks with tree clusters and ponds, car parks and building
sites. Street trees overhang the roads; cars stand on roads, driveways and parking lots.

What makes it hard, on purpose (a small labeled set should under-fit it):
- every scene has its own sun direction and elevation (shadow length), illumination, colour cast,
  grass dryness, asphalt grey and set of roof colours, so class appearance shifts between scenes;
- grey and concrete-coloured flat roofs look like roads and paved yards; only context and the cast
  shadow tell them apart;
- trees are close to grass in colour in some scenes and differ mainly by texture (lumpy crowns with a
  lit and a shaded side) and by their shadows;
- shadows darken every class without changing its label (as in the ISPRS ground truth);
- clutter (bare soil, building material, pools, ponds, yard objects) resembles dry grass, roofs or
  cars; sensor blur and noise on top.

Labels follow ISPRS: 0 impervious surfaces, 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter.
Scene `i` depends only on (`dataset.seed`, `i`, `dataset.scene_size`), so adding scenes leaves the
others unchanged. Everything is vectorised numpy/scipy; 8 scenes of 1024 x 1024 take a few seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from s4seg.config import DatasetConfig
from s4seg.data.sources.base import Scene, Source, register_source
from s4seg.data.sources.isprs import ISPRS_CLASSES, ISPRS_PALETTE
from s4seg.errors import ParamsError

IMPERVIOUS, BUILDING, LOW_VEG, TREE, CAR, CLUTTER = range(6)

# Surface materials: they set the texture of a pixel (labels are painted separately).
GRASS, TREE_M, ASPHALT, CONCRETE, ROOF, CAR_M, SOIL, WATER, OBJECT = range(9)
# (amplitude of medium-scale texture, amplitude of pixel grain) per material
TEXTURE = np.array(
    [[0.10, 0.06], [0.26, 0.08], [0.04, 0.05], [0.03, 0.04], [0.03, 0.03],
     [0.00, 0.02], [0.12, 0.08], [0.03, 0.01], [0.04, 0.04]], dtype=np.float32,
)

ROOF_COLOURS = np.array(
    [
        [0.62, 0.33, 0.25],  # terracotta tiles
        [0.48, 0.34, 0.27],  # brown tiles
        [0.31, 0.32, 0.34],  # dark grey slate / bitumen
        [0.58, 0.58, 0.57],  # light grey: as light as concrete
        [0.46, 0.46, 0.45],  # mid grey: as grey as asphalt
        [0.80, 0.80, 0.78],  # white membrane
        [0.36, 0.41, 0.48],  # blue-grey metal
        [0.42, 0.52, 0.44],  # green copper / green roof: close to grass
    ],
    dtype=np.float32,
)
CAR_COLOURS = np.array(
    [[0.86, 0.86, 0.86], [0.66, 0.67, 0.69], [0.42, 0.43, 0.45], [0.10, 0.10, 0.11], [0.62, 0.10, 0.09],
     [0.14, 0.22, 0.50], [0.18, 0.32, 0.22], [0.75, 0.65, 0.45]],
    dtype=np.float32,
)
CAR_WEIGHTS = np.array([0.24, 0.22, 0.14, 0.2, 0.07, 0.06, 0.03, 0.04])


@dataclass(frozen=True)
class _Style:
    """Per-scene appearance: what changes between scenes (the domain shift inside the dataset)."""

    grass: np.ndarray
    dry: np.ndarray
    tree: np.ndarray
    asphalt: np.ndarray
    concrete: np.ndarray
    roofs: np.ndarray  # (k, 3) roof colours used in this scene
    roof_weights: np.ndarray
    sun: tuple[float, float]  # unit vector (dy, dx) along which shadows fall
    shadow_px_per_m: float  # shadow length per metre of height (sun elevation)
    shadow_tint: np.ndarray
    gain: np.ndarray
    gamma: float
    noise: float
    urban: float  # 0 = leafy suburb, 1 = dense centre
    block_spacing: float


def _style(rng: np.random.Generator) -> _Style:
    dryness = rng.uniform(0.0, 0.8)
    grass = (1 - dryness) * np.array([0.33, 0.48, 0.22]) + dryness * np.array([0.55, 0.52, 0.34])
    # Trees are darker than grass, but in some scenes barely: texture and shadows must tell them apart.
    closeness = rng.uniform(0.1, 0.55)
    tree = (1 - closeness) * np.array([0.17, 0.30, 0.14]) + closeness * grass
    grey = rng.uniform(0.30, 0.50)
    asphalt = grey + rng.normal(0, 0.012, 3)
    concrete = rng.uniform(0.56, 0.70) + rng.normal(0, 0.015, 3) + np.array([0.02, 0.01, -0.01])
    k = int(rng.integers(3, 6))
    roofs = ROOF_COLOURS[rng.choice(len(ROOF_COLOURS), size=k, replace=False)]
    roofs = roofs * rng.uniform(0.9, 1.1, (k, 1))
    angle = rng.uniform(0, 2 * np.pi)
    return _Style(
        grass=grass.astype(np.float32),
        dry=np.array([0.60, 0.56, 0.36], dtype=np.float32),
        tree=tree.astype(np.float32),
        asphalt=asphalt.astype(np.float32),
        concrete=concrete.astype(np.float32),
        roofs=roofs.astype(np.float32),
        roof_weights=rng.dirichlet(np.ones(k)),
        sun=(float(np.sin(angle)), float(np.cos(angle))),
        shadow_px_per_m=rng.uniform(0.8, 2.2),
        shadow_tint=np.array([0.42, 0.46, 0.58], dtype=np.float32) * rng.uniform(0.85, 1.25),
        gain=(rng.uniform(0.8, 1.15) * (1 + rng.normal(0, 0.05, 3))).astype(np.float32),
        gamma=rng.uniform(0.85, 1.15),
        noise=rng.uniform(0.008, 0.025),
        urban=rng.uniform(0, 1),
        block_spacing=rng.uniform(210, 320),
    )


def _value_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Smooth noise of unit-ish amplitude and feature size `cell` pixels: a cubic upsampled grid."""
    n = int(np.ceil(size / cell)) + 1
    grid = rng.standard_normal((n, n)).astype(np.float32)
    # Zoom so that n - 1 grid steps span the scene: no more pixels computed than ~size + one cell.
    field = ndimage.zoom(grid, size / (n - 1), order=3, prefilter=False, mode="reflect")
    return field[:size, :size]


class _Canvas:
    """Label, base colour, material and height maps of one scene, painted object by object."""

    def __init__(self, size: int, style: _Style) -> None:
        self.size = size
        self.label = np.full((size, size), LOW_VEG, dtype=np.uint8)
        self.rgb = np.empty((size, size, 3), dtype=np.float32)
        self.rgb[:] = style.grass
        self.material = np.full((size, size), GRASS, dtype=np.uint8)
        self.height = np.zeros((size, size), dtype=np.float32)

    def box(self, y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice] | None:
        """Slices of the rectangle clipped to the canvas; None when nothing is left."""
        ya, yb = max(int(round(y0)), 0), min(int(round(y1)), self.size)
        xa, xb = max(int(round(x0)), 0), min(int(round(x1)), self.size)
        if ya >= yb or xa >= xb:
            return None
        return slice(ya, yb), slice(xa, xb)

    def paint(self, region: tuple[slice, slice] | None, label: int, colour: np.ndarray, material: int,
              height: float | None = None, where: np.ndarray | None = None) -> None:
        """Paint a box (optionally only where the boolean `where`, shaped like the box, is True)."""
        if region is None:
            return
        if where is None:
            self.label[region] = label
            self.rgb[region] = colour
            self.material[region] = material
            if height is not None:
                self.height[region] = height
            return
        self.label[region][where] = label
        self.rgb[region][where] = colour
        self.material[region][where] = material
        if height is not None:
            self.height[region][where] = height


@dataclass
class _Trees:
    """Crowns collected while laying out the scene, rendered together at the end."""

    ys: list[float]
    xs: list[float]
    radii: list[float]
    heights: list[float]

    def add(self, y: float, x: float, r: float, h: float) -> None:
        self.ys.append(y)
        self.xs.append(x)
        self.radii.append(r)
        self.heights.append(h)


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------
def _road_lines(rng: np.random.Generator, size: int, spacing: float) -> list[tuple[float, float]]:
    """Centre positions and widths of parallel roads."""
    lines = []
    pos = rng.uniform(-0.6, 0.1) * spacing
    while True:
        pos += rng.uniform(0.75, 1.25) * spacing
        if pos > size - 0.25 * spacing:
            break
        lines.append((pos, float(rng.choice([14, 18, 22, 28]))))
    if not lines:  # small scenes: one road through the middle
        lines.append((size * rng.uniform(0.35, 0.65), 18.0))
    return lines


def _car(cv: _Canvas, rng: np.random.Generator, y: float, x: float, along_x: bool) -> None:
    """A car centred at (y, x): body, darker windscreen and rear window, lighter roof."""
    length, width = rng.uniform(17, 23), rng.uniform(8, 10)
    h, w = (width, length) if along_x else (length, width)
    region = cv.box(y - h / 2, y + h / 2, x - w / 2, x + w / 2)
    if region is None:
        return
    colour = CAR_COLOURS[rng.choice(len(CAR_COLOURS), p=CAR_WEIGHTS)] * rng.uniform(0.9, 1.08)
    cv.paint(region, CAR, colour, CAR_M, height=1.5)
    sub = cv.rgb[region]
    n = sub.shape[1] if along_x else sub.shape[0]
    front = slice(int(n * 0.22), int(n * 0.36))
    rear = slice(int(n * 0.72), int(n * 0.8))
    glass = np.array([0.12, 0.13, 0.15], dtype=np.float32)
    for part in (front, rear):
        if along_x:
            sub[1:-1, part] = glass
        else:
            sub[part, 1:-1] = glass


def _roads(cv: _Canvas, rng: np.random.Generator, style: _Style, size: int):
    """Draw the road grid; return road lines and the blocks between them as (y0, y1, x0, x1)."""
    rows = _road_lines(rng, size, style.block_spacing)
    cols = _road_lines(rng, size, style.block_spacing)
    sidewalk = float(rng.choice([0, 4, 5, 6]))
    marking = np.array([0.88, 0.88, 0.86], dtype=np.float32)
    spans = []
    for ci, (x, w) in enumerate(cols):
        # Some roads end at a T-junction instead of crossing the whole scene.
        if len(rows) >= 2 and rng.random() < 0.3:
            a = int(rng.integers(0, len(rows) - 1))
            y0, y1 = (rows[a][0], size) if rng.random() < 0.5 else (0, rows[a + 1][0])
        else:
            y0, y1 = 0, size
        spans.append((ci, x, w, y0, y1))
    for y, w in rows:
        cv.paint(cv.box(y - w / 2 - sidewalk, y + w / 2 + sidewalk, 0, size), IMPERVIOUS, style.concrete, CONCRETE)
    for _, x, w, y0, y1 in spans:
        cv.paint(cv.box(y0, y1, x - w / 2 - sidewalk, x + w / 2 + sidewalk), IMPERVIOUS, style.concrete, CONCRETE)
    for y, w in rows:
        cv.paint(cv.box(y - w / 2, y + w / 2, 0, size), IMPERVIOUS, style.asphalt, ASPHALT)
        if w >= 18:
            for x0 in np.arange(rng.uniform(0, 24), size, 24):
                cv.paint(cv.box(y - 1, y + 1, x0, x0 + 12), IMPERVIOUS, marking, CONCRETE)
    for _, x, w, y0, y1 in spans:
        cv.paint(cv.box(y0, y1, x - w / 2, x + w / 2), IMPERVIOUS, style.asphalt, ASPHALT)
        if w >= 18:
            for s in np.arange(y0 + rng.uniform(0, 24), y1, 24):
                cv.paint(cv.box(s, s + 12, x - 1, x + 1), IMPERVIOUS, marking, CONCRETE)
    # Traffic: cars along each lane.
    for y, w in rows:
        for lane in (-w / 4, w / 4):
            n = rng.poisson(size / 200)
            for x in rng.uniform(0, size, n):
                _car(cv, rng, y + lane, x, along_x=True)
    for _, x, w, y0, y1 in spans:
        for lane in (-w / 4, w / 4):
            for yy in rng.uniform(y0, y1, rng.poisson((y1 - y0) / 200)):
                _car(cv, rng, yy, x + lane, along_x=False)
    # Blocks: rectangles between consecutive road edges (scene borders count as edges).
    def intervals(lines: list[tuple[float, float]]) -> list[tuple[float, float]]:
        edges = [(-1e9, 0.0)] + [(p - w / 2 - sidewalk, p + w / 2 + sidewalk) for p, w in lines] + [(size, 1e9)]
        out = []
        for (_, end), (start, _) in zip(edges[:-1], edges[1:], strict=True):
            a, b = max(end, 0) + 3, min(start, size) - 3
            if b - a > 30:
                out.append((a, b))
        return out

    blocks = [(y0, y1, x0, x1) for y0, y1 in intervals(rows) for x0, x1 in intervals(cols)]
    return rows, spans, blocks


def _building(cv: _Canvas, rng: np.random.Generator, style: _Style, y0: float, y1: float, x0: float,
              x1: float, height: float, flat: bool, colour: np.ndarray | None = None) -> None:
    region = cv.box(y0, y1, x0, x1)
    if region is None:
        return
    if colour is None:
        colour = style.roofs[rng.choice(len(style.roofs), p=style.roof_weights)] * rng.uniform(0.93, 1.07)
    cv.paint(region, BUILDING, colour, ROOF, height=height)
    sub = cv.rgb[region]
    hh, ww = sub.shape[:2]
    if not flat:
        # Gable: two roof planes along the long axis, one facing the sun (brighter), one away.
        lit = 1.12 if rng.random() < 0.5 else 0.84
        if ww >= hh:
            sub[: hh // 2] *= lit
            sub[hh // 2 :] *= 2 - lit - 0.04
            sub[max(hh // 2 - 1, 0) : hh // 2 + 1] *= 0.9  # ridge line
        else:
            sub[:, : ww // 2] *= lit
            sub[:, ww // 2 :] *= 2 - lit - 0.04
            sub[:, max(ww // 2 - 1, 0) : ww // 2 + 1] *= 0.9
    else:
        # Parapet edge and rooftop units (air handling, skylights): still "building".
        sub[:2] *= 0.85
        sub[-2:] *= 0.85
        sub[:, :2] *= 0.85
        sub[:, -2:] *= 0.85
        for _ in range(rng.poisson(hh * ww / 900)):
            uh, uw = rng.uniform(4, 12, 2)
            uy, ux = rng.uniform(2, max(hh - uh - 2, 3)), rng.uniform(2, max(ww - uw - 2, 3))
            tone = rng.choice([0.7, 1.2, 0.55])
            sub[int(uy) : int(uy + uh), int(ux) : int(ux + uw)] *= tone
            cv.height[region][int(uy) : int(uy + uh), int(ux) : int(ux + uw)] = height + 1.5


def _yard_object(cv: _Canvas, rng: np.random.Generator, y: float, x: float) -> None:
    """Clutter: sheds' contents, trailers, material piles, containers: small objects of any colour."""
    h, w = rng.uniform(5, 14, 2)
    colour = rng.uniform(0.15, 0.85, 3).astype(np.float32)
    cv.paint(cv.box(y, y + h, x, x + w), CLUTTER, colour, OBJECT, height=rng.uniform(0.5, 2.5))


def _pool(cv: _Canvas, rng: np.random.Generator, y: float, x: float) -> None:
    h, w = rng.uniform(10, 18), rng.uniform(16, 28)
    border = np.array([0.78, 0.78, 0.74], dtype=np.float32)
    cv.paint(cv.box(y - 2, y + h + 2, x - 2, x + w + 2), IMPERVIOUS, border, CONCRETE)
    water = np.array([0.25, 0.62, 0.76], dtype=np.float32) * rng.uniform(0.85, 1.1)
    cv.paint(cv.box(y, y + h, x, x + w), CLUTTER, water, WATER)


def _houses(cv, rng, style, trees, block) -> None:
    y0, y1, x0, x1 = block
    lot = rng.uniform(55, 85)
    ny, nx = max(1, round((y1 - y0) / lot)), max(1, round((x1 - x0) / lot))
    ly, lx = (y1 - y0) / ny, (x1 - x0) / nx
    for i in range(ny):
        for j in range(nx):
            ay, ax = y0 + i * ly, x0 + j * lx
            if rng.random() < 0.45:  # paved patio or driveway
                py, px = rng.uniform(0.2, 0.5) * ly, rng.uniform(0.2, 0.5) * lx
                oy, ox = ay + rng.uniform(0, ly - py), ax + rng.uniform(0, lx - px)
                cv.paint(cv.box(oy, oy + py, ox, ox + px), IMPERVIOUS, style.concrete * rng.uniform(0.9, 1.05),
                         CONCRETE)
                if rng.random() < 0.4:
                    _car(cv, rng, oy + py / 2, ox + px / 2, along_x=px > py)
            hy, hx = rng.uniform(0.4, 0.68) * ly, rng.uniform(0.4, 0.68) * lx
            by, bx = ay + rng.uniform(4, max(ly - hy - 4, 5)), ax + rng.uniform(4, max(lx - hx - 4, 5))
            height = rng.uniform(5, 10)
            flat = rng.random() < 0.25
            _building(cv, rng, style, by, by + hy, bx, bx + hx, height, flat)
            if rng.random() < 0.3:  # L-shaped house: a wing on one side
                wy, wx = hy * rng.uniform(0.4, 0.7), hx * rng.uniform(0.3, 0.5)
                _building(cv, rng, style, by + hy - 2, by + hy + wy, bx, bx + wx, height * 0.9, flat)
            if rng.random() < 0.2:  # garden shed
                sy, sx = ay + rng.uniform(2, ly - 14), ax + rng.uniform(2, lx - 14)
                _building(cv, rng, style, sy, sy + rng.uniform(7, 12), sx, sx + rng.uniform(7, 12), 2.5, True)
            if rng.random() < 0.12:
                _pool(cv, rng, ay + rng.uniform(2, ly - 20), ax + rng.uniform(2, lx - 30))
            for _ in range(rng.poisson(0.5)):
                _yard_object(cv, rng, ay + rng.uniform(0, ly - 8), ax + rng.uniform(0, lx - 8))
            for _ in range(rng.poisson(2.2)):
                trees.add(ay + rng.uniform(0, ly), ax + rng.uniform(0, lx), rng.uniform(7, 15), rng.uniform(5, 12))


def _parking_rows(cv, rng, y0, y1, x0, x1, occupancy: float) -> None:
    """Rows of stalls with cars, aligned with the longer side of the area."""
    stall_line = np.array([0.85, 0.85, 0.82], dtype=np.float32)
    along_x = (x1 - x0) >= (y1 - y0)
    # Cars stand across the row direction: a row is one car length deep, stalls 12 px wide, then an aisle.
    if along_x:
        for ry in np.arange(y0 + 4, y1 - 24, 44):
            for sx in np.arange(x0 + 2, x1 - 12, 12):
                cv.paint(cv.box(ry, ry + 24, sx, sx + 1), IMPERVIOUS, stall_line, CONCRETE)
                if rng.random() < occupancy:
                    _car(cv, rng, ry + 12, sx + 6.5, along_x=False)
    else:
        for rx in np.arange(x0 + 4, x1 - 24, 44):
            for sy in np.arange(y0 + 2, y1 - 12, 12):
                cv.paint(cv.box(sy, sy + 1, rx, rx + 24), IMPERVIOUS, stall_line, CONCRETE)
                if rng.random() < occupancy:
                    _car(cv, rng, sy + 6.5, rx + 12, along_x=True)


def _commercial(cv, rng, style, trees, block) -> None:
    y0, y1, x0, x1 = block
    paving = style.asphalt * rng.uniform(1.0, 1.2)
    cv.paint(cv.box(y0 + 4, y1 - 4, x0 + 4, x1 - 4), IMPERVIOUS, paving, ASPHALT)
    h, w = y1 - y0, x1 - x0
    # One or two large flat-roofed buildings; the rest is parking.
    if rng.random() < 0.5 or min(h, w) < 120:
        by0, by1 = y0 + rng.uniform(0.05, 0.2) * h, y0 + rng.uniform(0.55, 0.8) * h
        bx0, bx1 = x0 + rng.uniform(0.05, 0.3) * w, x0 + rng.uniform(0.7, 0.95) * w
        _building(cv, rng, style, by0, by1, bx0, bx1, rng.uniform(8, 20), True)
        _parking_rows(cv, rng, by1 + 6, y1 - 6, x0 + 8, x1 - 8, rng.uniform(0.3, 0.9))
    else:
        mid = x0 + rng.uniform(0.4, 0.6) * w
        _building(cv, rng, style, y0 + 10, y1 - 10, x0 + 10, mid - 6, rng.uniform(8, 20), True)
        _building(cv, rng, style, y0 + 10, y0 + 0.5 * h, mid + 6, x1 - 10, rng.uniform(8, 20), True)
        _parking_rows(cv, rng, y0 + 0.5 * h + 8, y1 - 8, mid + 6, x1 - 8, rng.uniform(0.3, 0.9))
    for _ in range(rng.poisson(1.0)):  # containers, skips
        _yard_object(cv, rng, rng.uniform(y0, y1 - 14), rng.uniform(x0, x1 - 14))
    for x in np.arange(x0 + 8, x1 - 8, rng.uniform(25, 45)):  # a row of trees along the front
        if rng.random() < 0.6:
            trees.add(y0 + 6, x, rng.uniform(6, 11), rng.uniform(6, 12))


def _park(cv, rng, style, trees, block) -> None:
    y0, y1, x0, x1 = block
    h, w = y1 - y0, x1 - x0
    for _ in range(rng.integers(1, 3)):  # straight paths across the park
        if rng.random() < 0.5:
            y = rng.uniform(y0, y1)
            cv.paint(cv.box(y - 3, y + 3, x0, x1), IMPERVIOUS, style.concrete * 0.95, CONCRETE)
        else:
            x = rng.uniform(x0, x1)
            cv.paint(cv.box(y0, y1, x - 3, x + 3), IMPERVIOUS, style.concrete * 0.95, CONCRETE)
    if rng.random() < 0.35:  # pond (clutter in the ISPRS legend)
        cy, cx, r = rng.uniform(y0 + 0.3 * h, y1 - 0.3 * h), rng.uniform(x0 + 0.3 * w, x1 - 0.3 * w), rng.uniform(
            15, 0.25 * min(h, w) + 16)
        region = cv.box(cy - 1.5 * r, cy + 1.5 * r, cx - 1.5 * r, cx + 1.5 * r)
        if region is not None:
            yy, xx = np.mgrid[region]
            blob = np.hypot((yy - cy) / r, (xx - cx) / (r * rng.uniform(0.8, 1.5)))
            blob += 0.25 * _value_noise(rng, max(blob.shape), 8)[: blob.shape[0], : blob.shape[1]]
            colour = np.array([0.20, 0.33, 0.36], dtype=np.float32) * rng.uniform(0.8, 1.2)
            cv.paint(region, CLUTTER, colour, WATER, where=blob < 1)
    n = rng.poisson(h * w / rng.uniform(400, 1000))
    centres = rng.uniform(0, 1, (max(1, n // 8), 2)) * [h, w] + [y0, x0]  # clustered groves
    for _ in range(n):
        cy, cx = centres[rng.integers(len(centres))] + rng.normal(0, 30, 2)
        if y0 <= cy < y1 and x0 <= cx < x1:
            trees.add(cy, cx, rng.uniform(7, 16), rng.uniform(6, 16))


def _car_park(cv, rng, style, trees, block) -> None:
    y0, y1, x0, x1 = block
    cv.paint(cv.box(y0 + 3, y1 - 3, x0 + 3, x1 - 3), IMPERVIOUS, style.asphalt * rng.uniform(0.95, 1.15), ASPHALT)
    _parking_rows(cv, rng, y0 + 6, y1 - 6, x0 + 6, x1 - 6, rng.uniform(0.3, 0.85))
    for _ in range(rng.poisson(3)):
        trees.add(rng.uniform(y0, y1), rng.uniform(x0, x1), rng.uniform(5, 9), rng.uniform(5, 9))


def _building_site(cv, rng, style, trees, block, soil_noise: np.ndarray) -> None:
    """Bare soil with material piles and a shell of a building: mostly clutter."""
    y0, y1, x0, x1 = block
    region = cv.box(y0, y1, x0, x1)
    if region is None:
        return
    soil = np.array([0.56, 0.45, 0.34], dtype=np.float32) * rng.uniform(0.85, 1.1)
    cv.paint(region, CLUTTER, soil, SOIL, where=soil_noise[region] > -0.3)
    for _ in range(rng.poisson(4)):
        _yard_object(cv, rng, rng.uniform(y0, y1 - 14), rng.uniform(x0, x1 - 14))
    if rng.random() < 0.5:
        h, w = y1 - y0, x1 - x0
        _building(cv, rng, style, y0 + 0.3 * h, y0 + 0.6 * h, x0 + 0.3 * w, x0 + 0.7 * w, rng.uniform(3, 9), True,
                  colour=np.array([0.55, 0.55, 0.53], dtype=np.float32))


def _street_trees(rng, trees, rows, spans, size) -> None:
    for y, w in rows:
        if rng.random() < 0.65:
            side = w / 2 + 4
            for x in np.arange(rng.uniform(0, 30), size, rng.uniform(26, 40)):
                if rng.random() < 0.8:
                    trees.add(y + rng.choice([-side, side]), x, rng.uniform(7, 12), rng.uniform(7, 12))
    for _, x, w, y0, y1 in spans:
        if rng.random() < 0.65:
            side = w / 2 + 4
            for y in np.arange(y0 + rng.uniform(0, 30), y1, rng.uniform(26, 40)):
                if rng.random() < 0.8:
                    trees.add(y, x + rng.choice([-side, side]), rng.uniform(7, 12), rng.uniform(7, 12))


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
def _render_trees(cv: _Canvas, rng: np.random.Generator, trees: _Trees, style: _Style) -> np.ndarray:
    """Irregular, lumpy crowns with a lit and a shaded side; returns the crown dome field (0..1)."""
    size = cv.size
    dome = np.zeros((size, size), dtype=np.float32)
    top = np.zeros((size, size), dtype=np.float32)
    tone = np.ones((size, size), dtype=np.float32)
    for y, x, r, h in zip(trees.ys, trees.xs, trees.radii, trees.heights, strict=True):
        region = cv.box(y - 1.4 * r, y + 1.4 * r, x - 1.4 * r, x + 1.4 * r)
        if region is None:
            continue
        yy, xx = np.ogrid[region]
        d = np.clip(1 - ((yy - y) ** 2 + (xx - x) ** 2) / r**2, 0, 1).astype(np.float32)
        sub = dome[region]
        take = d > sub
        sub[take] = d[take]
        top[region] = np.maximum(top[region], h * np.sqrt(d))
        tone[region][take] = rng.uniform(0.85, 1.15)
    # Lobed outlines: perturb the dome with noise at a few pixels' scale before thresholding.
    lobes = _value_noise(rng, size, 5)
    crown = (dome > 0) & (dome + 0.3 * lobes > 0.2) & (cv.label != BUILDING)
    # Shading: the side facing the sun is bright, the far side dark; leaf clumps at ~3 px.
    gy, gx = np.gradient(ndimage.gaussian_filter(dome, 1.5))
    facing = -(gy * style.sun[0] + gx * style.sun[1])
    clumps = _value_noise(rng, size, 3)
    shade = (0.9 + 3.0 * facing + 0.18 * clumps) * tone
    cv.label[crown] = TREE
    cv.material[crown] = TREE_M
    cv.rgb[crown] = style.tree * shade[crown][:, None]
    cv.height = np.where(crown, np.maximum(cv.height, np.maximum(top, 2.0)), cv.height)
    return dome


def _shadows(height: np.ndarray, sun: tuple[float, float], px_per_m: float) -> np.ndarray:
    """Soft shadow strength (0..1): a pixel is shaded when something towards the sun is tall enough.

    Pixel p is in shadow if some pixel k steps towards the sun has height h with h * px_per_m >= k and
    h above p's own height (scan along the sun direction; one shifted copy per step).
    """
    size = height.shape[0]
    reach = np.full_like(height, -1.0)
    steps = int(np.ceil(float(height.max()) * px_per_m))
    for k in range(1, steps + 1):
        dy, dx = int(round(k * sun[0])), int(round(k * sun[1]))
        if abs(dy) >= size or abs(dx) >= size:
            break
        shifted = np.full_like(height, -1.0)
        src = height[max(-dy, 0) : size - max(dy, 0), max(-dx, 0) : size - max(dx, 0)]
        shifted[max(dy, 0) : size - max(-dy, 0), max(dx, 0) : size - max(-dx, 0)] = src
        np.maximum(reach, shifted - k / px_per_m, out=reach)
    hard = (reach > height + 0.3).astype(np.float32)
    return ndimage.gaussian_filter(hard, 0.8)


def render_scene(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of the series `seed`: image (size, size, 3) uint8 and mask (size, size) uint8."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, size]))
    style = _style(rng)
    cv = _Canvas(size, style)

    # Low vegetation: patches of drier grass at two scales.
    patches = _value_noise(rng, size, 48) + 0.5 * _value_noise(rng, size, 12)
    dryness = np.clip(0.5 + 0.35 * patches, 0, 1)[..., None]
    cv.rgb[:] = (1 - 0.6 * dryness) * style.grass + 0.6 * dryness * style.dry

    trees = _Trees([], [], [], [])
    rows, spans, blocks = _roads(cv, rng, style, size)
    kinds = ["houses", "commercial", "park", "car_park", "site"]
    u = style.urban
    weights = np.array([0.55 - 0.3 * u, 0.1 + 0.35 * u, 0.18, 0.05 + 0.05 * u, 0.1 - 0.03 * u])
    soil_noise = _value_noise(rng, size, 20)
    for block in blocks:
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        if kind == "houses":
            _houses(cv, rng, style, trees, block)
        elif kind == "commercial":
            _commercial(cv, rng, style, trees, block)
        elif kind == "park":
            _park(cv, rng, style, trees, block)
        elif kind == "car_park":
            _car_park(cv, rng, style, trees, block)
        else:
            _building_site(cv, rng, style, trees, block, soil_noise)
    _street_trees(rng, trees, rows, spans, size)
    _render_trees(cv, rng, trees, style)

    # Texture by material, then shadows, illumination, sensor blur and noise.
    medium = _value_noise(rng, size, 4)
    grain = rng.standard_normal((size, size), dtype=np.float32)
    amp = TEXTURE[cv.material]
    img = cv.rgb * (1 + amp[..., 0] * medium + amp[..., 1] * grain)[..., None]
    shade = _shadows(cv.height, style.sun, style.shadow_px_per_m)[..., None]
    img *= 1 - shade * (1 - style.shadow_tint)
    light = 1 + 0.07 * _value_noise(rng, size, 256)
    img *= light[..., None] * style.gain
    np.clip(img, 0, 1, out=img)
    img **= style.gamma
    img = ndimage.gaussian_filter(img, (0.6, 0.6, 0))
    img += rng.normal(0, style.noise, img.shape).astype(np.float32)
    image = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return image, cv.label


@register_source("synthetic")
class SyntheticSource(Source):
    """The embedded default: `dataset.num_scenes` scenes of `dataset.scene_size` pixels, seeded.

    Scene names are `scene_00`, `scene_01`, ...; the last two (the last one when there are fewer than
    four scenes) are the default test scenes.
    """

    classes = ISPRS_CLASSES
    palette = ISPRS_PALETTE

    def __init__(self, cfg: DatasetConfig) -> None:
        if cfg.num_scenes < 2:
            raise ParamsError(f"dataset.num_scenes = {cfg.num_scenes}: need at least 2 (training and test)")
        if cfg.scene_size < 128:
            raise ParamsError(f"dataset.scene_size = {cfg.scene_size}: need at least 128 pixels")
        self.num_scenes = cfg.num_scenes
        self.size = cfg.scene_size
        self.seed = cfg.seed
        names = self.scene_names()
        self.default_test_scenes = tuple(names[-2:] if len(names) >= 4 else names[-1:])

    def scene_names(self) -> list[str]:
        return [f"scene_{i:02d}" for i in range(self.num_scenes)]

    def scenes(self) -> Iterator[Scene]:
        for i, name in enumerate(self.scene_names()):
            image, mask = render_scene(self.seed, i, self.size)
            yield Scene(name, image, mask)
