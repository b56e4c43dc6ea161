"""`s4seg inspect`: look at a pseudo-label dump (`dumps/pseudo.zarr`, see `s4seg.evaluation.dump`).

    inspect_tile(dump, tiles, tile_id, out_png)   image | ground truth | pseudo-label | selected | regions
    inspect_scene(dump, tiles, scene, out_png)    the same panels, the scene's unlabeled tiles stitched
    summary(dump) -> str                          per-class pseudo-label quality as a text table
    tile_figure / scene_figure                    the same pictures as matplotlib Figures (for the report)

Images come from the tile store (`data/tiles.zarr`); `tiles=None` uses the path recorded in the dump's
attributes. Panels are drawn with matplotlib's Agg backend at 100 dpi and a fixed pixel layout, so the PNG
size is known in advance: width = 5 * panel width, height = TITLE_PX + panel height + legend height
(`legend_height(num_classes)`). Label maps use the report's colours (`s4seg.report.figures.colorize`: the
class palette, ignore pixels black, or white when black is a class colour). In the "selected" panel, pixels
the method does not train on are dark grey; in scene views, tiles that are not in the dump are light grey.
Regions are drawn in arbitrary colours with black boundaries.

Plain zarr, NumPy and matplotlib: no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from matplotlib.figure import Figure  # drawn on the Agg canvas by savefig: no pyplot state, no display
from matplotlib.patches import Patch
from skimage.segmentation import find_boundaries

from s4seg.config import IGNORE_INDEX
from s4seg.data.store import TileStore
from s4seg.errors import DataError, DatasetNotFoundError
from s4seg.evaluation.pseudo_quality import CONFIDENT_LAYER, METRICS, PRIOR_LABEL_LAYER, PseudoQuality
from s4seg.report.base import default_palette
from s4seg.report.figures import colorize, display_image, hex_to_rgb, legend_handles

DPI = 100
TITLE_PX = 20
LEGEND_COLUMNS = 8
LEGEND_ROW_PX = 18
PANELS = ("image", "ground truth", "pseudo-label", "selected", "regions")
_NOT_KEPT = "#404040"
_ABSENT = "#c8c8c8"
_DUMP_ARRAYS = ("tile_id", "pseudo", "conf", "keep", "regions", "gt", "region_offsets", "region_class")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def open_dump(path: str | Path) -> zarr.Group:
    """Open `dumps/pseudo.zarr` read-only, checking it has the documented arrays."""
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: pseudo-label dump not found; run `dvc repro dump` first")
    try:
        group = zarr.open_group(str(path), mode="r")
        missing = [name for name in _DUMP_ARRAYS if name not in group]
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a zarr store ({e}); rebuild it with `dvc repro dump`") from e
    if missing:
        raise DataError(f"{path}: not an s4seg pseudo-label dump: missing {', '.join(missing)}; "
                        "rebuild it with `dvc repro dump`")
    return group


def _tiles(dump: zarr.Group, tiles_path: str | Path | None) -> TileStore:
    return TileStore(tiles_path if tiles_path is not None else dump.attrs["tiles"])


def _palette(dump: zarr.Group, classes: list[str]) -> list[str]:
    palette = list(dump.attrs.get("palette", []))
    return palette if len(palette) >= len(classes) else default_palette(len(classes))


def _row_of(dump: zarr.Group, tile_id: int, path: str | Path) -> int:
    ids = np.asarray(dump["tile_id"][:])
    rows = np.flatnonzero(ids == tile_id)
    if not len(rows):
        preview = ", ".join(map(str, ids[:10]))
        raise DataError(f"{path}: tile {tile_id} is not in the dump (only unlabeled tiles are); "
                        f"dumped tile ids start with: {preview}")
    return int(rows[0])


def dump_quality(path: str | Path, batch: int = 64) -> PseudoQuality:
    """Quality counts of a whole dump, recomputed from its arrays (pseudo, conf, keep, gt, regions,
    extra/confident, extra/prior_label)."""
    group = open_dump(path)
    quality = PseudoQuality(len(group.attrs["classes"]))
    offsets = np.asarray(group["region_offsets"][:])
    region_class = np.asarray(group["region_class"][:])
    n = group["pseudo"].shape[0]
    confident_path = f"extra/{CONFIDENT_LAYER}"
    prior_path = f"extra/{PRIOR_LABEL_LAYER}"
    has_confident, has_prior = confident_path in group, prior_path in group
    for start in range(0, n, batch):
        sl = slice(start, min(start + batch, n))
        pseudo, keep = np.asarray(group["pseudo"][sl]), np.asarray(group["keep"][sl])
        gt, regions = np.asarray(group["gt"][sl]), np.asarray(group["regions"][sl])
        conf = np.asarray(group["conf"][sl])
        confident = np.asarray(group[confident_path][sl]) if has_confident else None
        prior = np.asarray(group[prior_path][sl]) if has_prior else None
        for i, row in enumerate(range(sl.start, sl.stop)):
            quality.update(pseudo[i], keep[i], gt[i], regions[i], region_class[offsets[row] : offsets[row + 1]],
                           None if confident is None else confident[i], conf[i],
                           None if prior is None else prior[i])
    return quality


def summary(dump_path: str | Path) -> str:
    """Per-class pseudo-label quality of a dump as a text table (classes as rows, plus `all`)."""
    group = open_dump(dump_path)
    classes = list(group.attrs["classes"])
    quality = dump_quality(dump_path)
    table = pd.DataFrame(quality.per_class(), index=classes)
    table.loc["all"] = pd.Series(quality.metrics())
    table["regions"] = table["regions"].astype(int)
    table.index.name = "class"
    attrs = group.attrs
    head = (f"{dump_path}: method {attrs.get('method')}, iteration {attrs.get('iteration')}, "
            f"{group['pseudo'].shape[0]} unlabeled tiles, params {attrs.get('params_hash')}")
    return head + "\n" + table[list(METRICS)].to_string(float_format=lambda v: f"{v:.3f}", na_rep="-")


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
def legend_height(num_classes: int) -> int:
    """Pixel height of the legend under the panels: the classes, "ignore" and "not selected"."""
    rows = -(-(num_classes + 2) // LEGEND_COLUMNS)
    return rows * LEGEND_ROW_PX + 10


def _rgb_of(color: str) -> np.ndarray:
    return np.array(hex_to_rgb(color), np.uint8)


def _region_rgb(regions: np.ndarray) -> np.ndarray:
    """Arbitrary, deterministic colour per region id; 0 (no region) black; boundaries black."""
    rng = np.random.default_rng(0)
    lut = rng.integers(60, 256, size=(int(regions.max(initial=0)) + 1, 3)).astype(np.uint8)
    lut[0] = 0
    out = lut[regions]
    out[find_boundaries(regions, mode="inner")] = 0
    return out


def _panels(image: np.ndarray, gt: np.ndarray, pseudo: np.ndarray, keep: np.ndarray, regions: np.ndarray,
            palette: list[str], absent: np.ndarray | None = None) -> list[np.ndarray]:
    pseudo_rgb = colorize(pseudo, palette)
    selected = np.where(keep[..., None], pseudo_rgb, _rgb_of(_NOT_KEPT))
    region_rgb = _region_rgb(regions)
    if absent is not None:  # scene pixels outside the dumped tiles
        for panel in (pseudo_rgb, selected, region_rgb):
            panel[absent] = _rgb_of(_ABSENT)
    return [display_image(image), colorize(gt, palette), pseudo_rgb, selected, region_rgb]


def _figure(panels: list[np.ndarray], titles: tuple[str, ...], classes: list[str], palette: list[str],
            panel_w: int, panel_h: int, caption: str) -> Figure:
    legend_px = legend_height(len(classes))
    width, height = panel_w * len(panels), TITLE_PX + panel_h + legend_px
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    for i, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        ax = fig.add_axes((i * panel_w / width, legend_px / height, panel_w / width, panel_h / height))
        ax.imshow(panel, interpolation="nearest", aspect="auto", cmap="gray" if panel.ndim == 2 else None)
        ax.set_axis_off()
        ax.set_title(title, fontsize=8, pad=2)
    handles = legend_handles(classes, palette) + [
        Patch(facecolor=_NOT_KEPT, edgecolor="#444444", label="not selected")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), LEGEND_COLUMNS), fontsize=7,
               frameon=False, handlelength=1.0, columnspacing=1.0, borderaxespad=0.2)
    fig.text(0.002, 0.002, caption, fontsize=6, ha="left", va="bottom", color="0.3")
    return fig


def _save(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", metadata={"Software": None})
    return out


def inspect_tile(dump_path: str | Path, tiles_path: str | Path | None, tile_id: int, out_png: str | Path,
                 panel_px: int = 256) -> Path:
    """Render one dumped tile (by its id in data/tiles.zarr) as five panels with a class legend to a PNG of
    5 * panel_px by TITLE_PX + panel_px + legend_height(classes) pixels."""
    return _save(tile_figure(dump_path, tiles_path, tile_id, panel_px), out_png)


def tile_figure(dump_path: str | Path, tiles_path: str | Path | None, tile_id: int, panel_px: int = 256) -> Figure:
    """The figure of `inspect_tile`."""
    dump = open_dump(dump_path)
    row = _row_of(dump, int(tile_id), dump_path)
    store = _tiles(dump, tiles_path)
    classes = list(dump.attrs["classes"])
    palette = _palette(dump, classes)
    pseudo, keep, gt = (np.asarray(dump[name][row]) for name in ("pseudo", "keep", "gt"))
    panels = _panels(store.image(tile_id), gt, pseudo, keep, np.asarray(dump["regions"][row]), palette)
    valid = gt != IGNORE_INDEX
    kept = keep & valid
    acc = float((pseudo[kept] == gt[kept]).mean()) if kept.any() else float("nan")
    caption = (f"tile {tile_id} ({store.scene_of(tile_id)}), {dump.attrs.get('method')} "
               f"@ {dump.attrs.get('iteration')}: selected {kept.sum() / max(valid.sum(), 1):.1%}, "
               f"accuracy of selected {acc:.1%}")
    return _figure(panels, PANELS, classes, palette, panel_px, panel_px, caption)


def inspect_scene(dump_path: str | Path, tiles_path: str | Path | None, scene: str, out_png: str | Path,
                  panel_px: int = 512) -> Path:
    """Render `scene_figure` to a PNG."""
    return _save(scene_figure(dump_path, tiles_path, scene, panel_px), out_png)


def scene_figure(dump_path: str | Path, tiles_path: str | Path | None, scene: str, panel_px: int = 512) -> Figure:
    """Stitch the dumped (unlabeled) tiles of `scene` by their offsets and render the five panels.

    The image and ground truth show the whole scene; tiles that are not in the dump are light grey in the
    other panels. Panel height is `panel_px`; width follows the scene's aspect ratio.
    """
    dump = open_dump(dump_path)
    store = _tiles(dump, tiles_path)
    classes = list(dump.attrs["classes"])
    palette = _palette(dump, classes)
    info = store.scene_info(scene) if scene in {s.name for s in store.scenes} else None
    if info is None:
        names = ", ".join(s.name for s in store.scenes[:10])
        raise DataError(f"{store.path}: no scene {scene!r}; scenes are: {names}")
    image, gt = store.stitch_scene(scene)
    h, w, t = info.height, info.width, store.tile_size
    pseudo = np.zeros((h, w), np.uint8)
    keep = np.zeros((h, w), bool)
    regions = np.zeros((h, w), np.int64)
    absent = np.ones((h, w), bool)
    dump_ids = np.asarray(dump["tile_id"][:])
    offsets = np.asarray(dump["region_offsets"][:])
    in_scene = np.flatnonzero(np.isin(dump_ids, store.tiles_of(scene)))
    for row in in_scene:
        y, x = store.offsets[dump_ids[row]]
        th, tw = min(t, h - y), min(t, w - x)
        tile_regions = np.asarray(dump["regions"][row])[:th, :tw].astype(np.int64)
        pseudo[y : y + th, x : x + tw] = np.asarray(dump["pseudo"][row])[:th, :tw]
        keep[y : y + th, x : x + tw] = np.asarray(dump["keep"][row])[:th, :tw]
        # Region ids are unique per tile: shift them by the tile's table offset to stay unique in the scene.
        regions[y : y + th, x : x + tw] = np.where(tile_regions > 0, tile_regions + offsets[row], 0)
        absent[y : y + th, x : x + tw] = False
    panels = _panels(image, gt, pseudo, keep, regions, palette, absent=absent)
    panel_w = max(1, round(panel_px * w / h))
    caption = (f"scene {scene}: {len(in_scene)} unlabeled tiles, {dump.attrs.get('method')} "
               f"@ {dump.attrs.get('iteration')}")
    return _figure(panels, PANELS, classes, palette, panel_w, panel_px, caption)
