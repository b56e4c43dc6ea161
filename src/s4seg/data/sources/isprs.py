"""ISPRS 2D semantic labeling benchmark: Vaihingen and Potsdam, read from `dataset.root`."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from s4seg.config import DatasetConfig
from s4seg.data.sources.base import (
    ColorMap,
    Scene,
    Source,
    check_same_size,
    read_color_mask,
    read_image,
    register_source,
    require_root,
)
from s4seg.errors import DataError, DatasetNotFoundError, ParamsError

log = logging.getLogger(__name__)

ISPRS_CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
# The benchmark's colour code: impervious white, building blue, low vegetation cyan, tree green,
# car yellow, clutter/background red.
ISPRS_PALETTE = ("#FFFFFF", "#0000FF", "#00FFFF", "#00FF00", "#FFFF00", "#FF0000")
# Black marks the eroded class borders in the "noBoundary" labels: ignored.
ISPRS_IGNORE = ("#000000",)

VAIHINGEN_TEST_AREAS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)
POTSDAM_TEST_TILES = ("2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15",
                      "5_13", "5_14", "5_15", "6_13", "6_14", "6_15", "7_13")


@register_source("isprs")
class ISPRSSource(Source):
    """ISPRS Vaihingen (`dataset.isprs_variant: vaihingen`) or Potsdam (`potsdam`).

    Expected layout under `dataset.root` (the folders of the official archives, unpacked as they are):

    Vaihingen (IRRG only; 33 areas)::

        top/top_mosaic_09cm_area{N}.tif                       orthophotos (ISPRS_semantic_labeling_Vaihingen.zip)
        gt/top_mosaic_09cm_area{N}.tif                        colour labels, all areas
                                                              (ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip)
        gt_eroded/top_mosaic_09cm_area{N}_noBoundary.tif      with dataset.isprs_eroded: true
                                                              (..._ground_truth_eroded_COMPLETE.zip)

    Potsdam (38 tiles; dataset.isprs_bands: irrg or rgb)::

        3_Ortho_IRRG/top_potsdam_{x}_{y}_IRRG.tif             or 2_Ortho_RGB/top_potsdam_{x}_{y}_RGB.tif
        5_Labels_all/top_potsdam_{x}_{y}_label.tif            colour labels, all tiles
        5_Labels_all_noBoundary/top_potsdam_{x}_{y}_label_noBoundary.tif   with dataset.isprs_eroded: true

    Scene names are `area{N}` (Vaihingen) and `{x}_{y}` (Potsdam). Only scenes that have both an
    orthophoto and a label file are used (a missing label is logged). Default test scenes are the
    benchmark's usual ones: Vaihingen areas 2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35,
    38 (the other 16 train); Potsdam 2_13, 2_14, 3_13, 3_14, 4_13, 4_14, 4_15, 5_13, 5_14, 5_15, 6_13,
    6_14, 6_15, 7_13 (the other 24 train). Labels use the ISPRS colour code; black (the eroded borders)
    is ignored.
    """

    classes = ISPRS_CLASSES
    palette = ISPRS_PALETTE

    VAIHINGEN = {
        "image_dir": "top",
        "label_dir": ("gt", "gt_eroded"),
        "image": re.compile(r"top_mosaic_09cm_area(\d+)\.tif"),
        "label": ("top_mosaic_09cm_area{id}.tif", "top_mosaic_09cm_area{id}_noBoundary.tif"),
    }
    POTSDAM = {
        "image_dir": {"irrg": "3_Ortho_IRRG", "rgb": "2_Ortho_RGB"},
        "label_dir": ("5_Labels_all", "5_Labels_all_noBoundary"),
        "image": {"irrg": re.compile(r"top_potsdam_(\d+_\d+)_IRRG\.tif"),
                  "rgb": re.compile(r"top_potsdam_(\d+_\d+)_RGB\.tif")},
        "label": ("top_potsdam_{id}_label.tif", "top_potsdam_{id}_label_noBoundary.tif"),
    }

    def __init__(self, cfg: DatasetConfig) -> None:
        if cfg.isprs_variant not in ("vaihingen", "potsdam"):
            raise ParamsError(f"dataset.isprs_variant = {cfg.isprs_variant!r}: expected vaihingen or potsdam")
        if cfg.isprs_bands not in ("irrg", "rgb"):
            raise ParamsError(f"dataset.isprs_bands = {cfg.isprs_bands!r}: expected irrg or rgb")
        if cfg.isprs_variant == "vaihingen" and cfg.isprs_bands != "irrg":
            raise ParamsError("dataset.isprs_bands = 'rgb': Vaihingen orthophotos exist in IRRG only; use irrg")
        self.root = require_root(cfg)
        self.variant = cfg.isprs_variant
        self.bands = cfg.isprs_bands
        eroded = int(cfg.isprs_eroded)
        if self.variant == "vaihingen":
            spec = self.VAIHINGEN
            image_dir, pattern = self.root / spec["image_dir"], spec["image"]
            self.default_test_scenes = tuple(f"area{n}" for n in VAIHINGEN_TEST_AREAS)
        else:
            spec = self.POTSDAM
            image_dir, pattern = self.root / spec["image_dir"][self.bands], spec["image"][self.bands]
            self.default_test_scenes = POTSDAM_TEST_TILES
        label_dir = self.root / spec["label_dir"][eroded]
        for d in (image_dir, label_dir):
            if not d.is_dir():
                raise DatasetNotFoundError(
                    f"{d}: folder not found; the {self.variant} layout is described in "
                    "s4seg.data.sources.isprs.ISPRSSource"
                )
        self.pairs: list[tuple[str, Path, Path]] = []
        for path in sorted(image_dir.iterdir(), key=lambda p: _natural_key(p.name)):
            match = pattern.fullmatch(path.name)
            if not match:
                continue
            scene_id = match.group(1)
            label = label_dir / spec["label"][eroded].format(id=scene_id)
            if not label.is_file():
                log.warning("%s: no label file %s; scene skipped", path, label)
                continue
            name = f"area{scene_id}" if self.variant == "vaihingen" else scene_id
            self.pairs.append((name, path, label))
        if not self.pairs:
            raise DataError(
                f"{image_dir}: no orthophoto with a label file in {label_dir} "
                f"(expected names like {pattern.pattern})"
            )
        self.colors = ColorMap(ISPRS_PALETTE, ISPRS_IGNORE, where="isprs")

    def scene_names(self) -> list[str]:
        return [name for name, _, _ in self.pairs]

    def scenes(self) -> Iterator[Scene]:
        for name, image_path, label_path in self.pairs:
            image = read_image(image_path)
            rgb = read_color_mask(label_path)
            check_same_size(image, rgb, image_path, label_path)
            yield Scene(name, image, self.colors(rgb, label_path))


def _natural_key(text: str) -> list:
    """Sort area2 before area10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
