"""A generic folder of images and masks, paired by name, with the class coding given in params."""

from __future__ import annotations

import colorsys
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from s4seg.config import IGNORE_INDEX, DatasetConfig
from s4seg.data.sources.base import (
    ColorMap,
    IdMap,
    Scene,
    Source,
    check_same_size,
    parse_color,
    read_color_mask,
    read_image,
    read_index_mask,
    register_source,
    require_root,
)
from s4seg.errors import DataError, ParamsError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def glob_regex(pattern: str) -> re.Pattern:
    """A glob (relative to the root, `/`-separated) as a regex whose groups are the wildcard parts.

    `**/` matches any number of folders (also none), `*` and `?` match within one path component,
    `[...]` is a character class.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:(.*)/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif pattern[i] == "*":
            out.append("([^/]*)")
            i += 1
        elif pattern[i] == "?":
            out.append("([^/])")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"([{body}])")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _match(root: Path, files: list[str], pattern: str, key: str) -> dict[str, Path]:
    """Files (relative posix paths) matching `pattern`, keyed by their wildcard parts joined by '/'."""
    regex = glob_regex(pattern)
    found: dict[str, Path] = {}
    for rel in files:
        m = regex.fullmatch(rel)
        if m is None:
            continue
        name = "/".join(g for g in m.groups() if g)
        if name in found:
            raise DataError(
                f"{root / rel} and {found[name]} both match dataset.{key} = {pattern!r} with the same "
                f"wildcard parts {name!r}; make the pattern specific enough to tell them apart"
            )
        found[name] = root / rel
    return found


@register_source("folder")
class FolderSource(Source):
    """Images and masks under `dataset.root`, found by glob patterns and paired by name.

    `dataset.image_glob` and `dataset.mask_glob` are globs relative to the root. An image and a mask
    form a pair when the parts matched by the wildcards of their patterns agree: with
    `*/images/*.jpg` and `*/masks/*.png`, `Tile 1/images/part_01.jpg` pairs with
    `Tile 1/masks/part_01.png`. The joined wildcard parts (`Tile 1/part_01`) are the scene name, so test
    scenes can be given as patterns such as `Tile 3/*`. An image without a mask is an error; a mask
    without an image is logged and skipped.

    Masks are colour-coded (`mask_format: color`; RGB, or palette-mode PNG converted to RGB; class
    colours in `palette`, colours to ignore in `ignore_colors`) or hold class ids
    (`mask_format: index`; ids remapped by `id_map`, `ignore_ids` ignored). Images may be JPEG, PNG
    or TIFF, 8 bits per band. `unlabeled_glob` adds images without masks; their scene name is their
    path relative to the root without the extension, and their tiles go to the unlabeled pool only.
    This source has no default test scenes: set `split.test_scenes`.
    """

    default_test_scenes = ()

    def __init__(self, cfg: DatasetConfig) -> None:
        if cfg.mask_format not in ("color", "index"):
            raise ParamsError(f"dataset.mask_format = {cfg.mask_format!r}: expected color or index")
        if not cfg.classes:
            raise ParamsError("dataset.classes: the folder source needs the list of class names")
        if cfg.mask_format == "color" and len(cfg.palette) != len(cfg.classes):
            raise ParamsError(
                f"dataset.palette: {len(cfg.palette)} colour(s) for {len(cfg.classes)} classes; colour masks "
                "need one #RRGGBB per class, in the order of dataset.classes"
            )
        if cfg.palette and len(cfg.palette) != len(cfg.classes):
            raise ParamsError(f"dataset.palette: {len(cfg.palette)} colour(s) for {len(cfg.classes)} classes")
        self.root = require_root(cfg)
        self.classes = tuple(cfg.classes)
        self.palette = tuple(cfg.palette) or tuple(_default_palette(len(cfg.classes)))
        for i, c in enumerate(self.palette):
            parse_color(c, f"dataset.palette[{i}]")
        self.mask_format = cfg.mask_format
        if cfg.mask_format == "color":
            self.colors = ColorMap(self.palette, cfg.ignore_colors, where="dataset")
        else:
            self.ids = IdMap(len(self.classes), cfg.id_map, cfg.ignore_ids, where="dataset")

        files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        images = _match(self.root, files, cfg.image_glob, "image_glob")
        masks = _match(self.root, files, cfg.mask_glob, "mask_glob")
        if not images:
            raise DataError(
                f"dataset.image_glob = {cfg.image_glob!r} matches no image file under {self.root} "
                f"(image suffixes: {', '.join(IMAGE_SUFFIXES)})"
            )
        missing = [str(p) for name, p in images.items() if name not in masks]
        if missing:
            raise DataError(
                f"{missing[0]}: no mask found for this image (and {len(missing) - 1} more); expected a file "
                f"matching dataset.mask_glob = {cfg.mask_glob!r} with the same wildcard parts"
            )
        for name in sorted(set(masks) - set(images)):
            log.warning("%s: mask without an image (dataset.image_glob = %r); skipped", masks[name], cfg.image_glob)
        self.pairs = [(name, images[name], masks[name]) for name in images]

        self.unlabeled: list[tuple[str, Path]] = []
        if cfg.unlabeled_glob:
            taken = {p for _, a, b in self.pairs for p in (a, b)}
            extra = _match(self.root, files, cfg.unlabeled_glob, "unlabeled_glob")
            for path in extra.values():
                if path not in taken:
                    name = path.relative_to(self.root).with_suffix("").as_posix()
                    self.unlabeled.append((name, path))
            if not self.unlabeled:
                raise DataError(
                    f"dataset.unlabeled_glob = {cfg.unlabeled_glob!r} matches no image under {self.root} "
                    "besides the labeled ones"
                )
        log.info("%s: %d labeled image(s), %d unlabeled", self.root, len(self.pairs), len(self.unlabeled))

    def scene_names(self) -> list[str]:
        return [name for name, _, _ in self.pairs] + [name for name, _ in self.unlabeled]

    def unlabeled_scene_names(self) -> set[str]:
        return {name for name, _ in self.unlabeled}

    def scenes(self) -> Iterator[Scene]:
        for name, image_path, mask_path in self.pairs:
            image = read_image(image_path)
            if self.mask_format == "color":
                raw = read_color_mask(mask_path)
                check_same_size(image, raw, image_path, mask_path)
                mask = self.colors(raw, mask_path)
            else:
                raw = read_index_mask(mask_path)
                check_same_size(image, raw, image_path, mask_path)
                mask = self.ids(raw, mask_path)
            yield Scene(name, image, mask)
        for name, image_path in self.unlabeled:
            image = read_image(image_path)
            yield Scene(name, image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8), labeled=False)


def _default_palette(n: int) -> list[str]:
    """Distinct display colours for index-mask datasets that give none (HSV wheel)."""
    return ["#{:02X}{:02X}{:02X}".format(*(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.8, 0.95)))
            for i in range(n)]
