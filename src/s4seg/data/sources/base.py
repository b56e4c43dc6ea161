"""What every source shares: the `Scene` it yields, the `Source` interface, the registry and file readers.

A source is a plain class whose class attributes hold the dataset's facts (classes, palette, default
test scenes) and whose `scenes()` generator yields one `Scene` at a time, so that the tile stage holds
a single scene in memory however many the dataset has.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from s4seg.config import IGNORE_INDEX, DatasetConfig
from s4seg.errors import DataError, DatasetNotFoundError, ParamsError

log = logging.getLogger(__name__)

# Real orthophotos are large (ISPRS Potsdam: 6000 x 6000); PIL's decompression-bomb guard is for
# untrusted web images, not for a user's own dataset.
Image.MAX_IMAGE_PIXELS = None

TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Scene:
    """One scene: image (H, W, C) uint8, mask (H, W) uint8 with class ids and IGNORE_INDEX.

    `labeled=False` marks an image that came without a mask (its mask is all IGNORE_INDEX): its tiles
    go to the unlabeled pool only, never to the labeled set or the test set.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    labeled: bool = True


class Source:
    """Base of all sources. Subclasses set the class attributes and implement the two methods."""

    name: ClassVar[str] = ""
    classes: tuple[str, ...] = ()
    palette: tuple[str, ...] = ()  # one "#RRGGBB" per class
    default_test_scenes: tuple[str, ...] = ()  # fnmatch patterns on scene names
    bands: str = "rgb"
    channels: int = 3

    def scene_names(self) -> list[str]:
        """Names of all scenes in `scenes()` order, without reading any pixels."""
        raise NotImplementedError

    def unlabeled_scene_names(self) -> set[str]:
        """Names of the scenes that come without masks (unlabeled pool only)."""
        return set()

    def scenes(self) -> Iterator[Scene]:
        """Yield the scenes one at a time, in `scene_names()` order."""
        raise NotImplementedError


S = TypeVar("S", bound=type[Source])
SOURCES: dict[str, Callable[[DatasetConfig], Source]] = {}


def register_source(name: str) -> Callable[[S], S]:
    """Class decorator: make a source buildable as `dataset.name: <name>`."""

    def wrap(cls: S) -> S:
        if name in SOURCES:
            raise ValueError(f"source {name!r} registered twice")
        cls.name = name
        SOURCES[name] = cls
        return cls

    return wrap


def build_source(cfg: DatasetConfig) -> Source:
    """The source named by `dataset.name`, configured by the rest of the `dataset` section."""
    if cfg.name not in SOURCES:
        raise ParamsError(
            f"dataset.name: unknown dataset {cfg.name!r}; choose one of: {', '.join(sorted(SOURCES))}"
        )
    return SOURCES[cfg.name](cfg)


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------
def require_root(cfg: DatasetConfig) -> Path:
    """`dataset.root` as an existing directory (relative paths are relative to the working directory)."""
    if not cfg.root:
        raise ParamsError(f"dataset.root: the {cfg.name!r} dataset needs a root directory; set dataset.root")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"dataset.root: {root} is not a directory (resolved from {Path.cwd()}); "
            f"set dataset.root to the folder that holds the {cfg.name!r} dataset"
        )
    return root


# --------------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------------
def parse_color(text: str, where: str) -> tuple[int, int, int]:
    """'#RRGGBB' -> (r, g, b)."""
    s = text.strip()
    if len(s) != 7 or s[0] != "#":
        raise ParamsError(f"{where}: colour {text!r} is not of the form #RRGGBB")
    try:
        return int(s[1:3], 16), int(s[3:5], 16), int(s[5:7], 16)
    except ValueError as e:
        raise ParamsError(f"{where}: colour {text!r} is not of the form #RRGGBB") from e


def color_hex(rgb: Sequence[int]) -> str:
    return "#{:02X}{:02X}{:02X}".format(*(int(c) for c in rgb))


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int32 key 0xRRGGBB."""
    rgb = rgb.astype(np.int32, copy=False)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class ColorMap:
    """Maps colour-coded masks (H, W, 3) to class ids; ignore colours map to IGNORE_INDEX.

    A lookup table over all 2^24 colours (16 MiB) is applied a block of rows at a time, so the
    temporaries stay small however large the scene (an ISPRS Potsdam label is 6000 x 6000).
    """

    MAX_CLASSES = IGNORE_INDEX - 1  # one id below IGNORE_INDEX is kept free to mark unknown colours
    BLOCK_PIXELS = 1 << 21  # pixels per block of rows

    def __init__(self, palette: Sequence[str], ignore_colors: Sequence[str] = (), where: str = "dataset") -> None:
        if len(palette) > self.MAX_CLASSES:
            raise ParamsError(f"{where}.palette: {len(palette)} classes; at most {self.MAX_CLASSES} are supported")
        keys: dict[int, int] = {}
        for i, c in enumerate(palette):
            r, g, b = parse_color(c, f"{where}.palette[{i}]")
            keys[(r << 16) | (g << 8) | b] = i
        if len(keys) < len(palette):
            raise ParamsError(f"{where}.palette: the same colour is given for two classes: {list(palette)}")
        for i, c in enumerate(ignore_colors):
            r, g, b = parse_color(c, f"{where}.ignore_colors[{i}]")
            key = (r << 16) | (g << 8) | b
            if key in keys and keys[key] != IGNORE_INDEX:
                raise ParamsError(f"{where}.ignore_colors[{i}]: colour {c} is also a class colour in the palette")
            keys[key] = IGNORE_INDEX
        self._unknown = len(palette)  # no class has this id, and it is not IGNORE_INDEX
        self._lut = np.full(1 << 24, self._unknown, dtype=np.uint8)
        self._lut[np.fromiter(keys, dtype=np.int64)] = np.fromiter(keys.values(), dtype=np.uint8)
        self._known = sorted(keys)

    def __call__(self, rgb: np.ndarray, path: Path | str) -> np.ndarray:
        ids = np.empty(rgb.shape[:2], dtype=np.uint8)
        rows = max(1, self.BLOCK_PIXELS // max(1, rgb.shape[1]))
        for y in range(0, rgb.shape[0], rows):
            ids[y : y + rows] = self._lut[_pack(rgb[y : y + rows])]
        unknown = ids == self._unknown
        if unknown.any():
            colours, counts = np.unique(_pack(rgb[unknown]), return_counts=True)
            order = np.argsort(-counts, kind="stable")[:5]  # the most frequent first
            shown = ", ".join(f"{_hex_key(colours[j])} ({counts[j]} px)" for j in order)
            more = f" and {len(colours) - 5} more" if len(colours) > 5 else ""
            raise DataError(
                f"{path}: mask colour(s) {shown}{more} are neither in the palette nor in the ignore colours "
                f"{[_hex_key(k) for k in self._known]}; add them to dataset.palette or dataset.ignore_colors"
            )
        return ids


def _hex_key(key: int) -> str:
    return color_hex(((int(key) >> 16) & 255, (int(key) >> 8) & 255, int(key) & 255))


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------
def _read_tiff(path: Path) -> np.ndarray:
    try:
        array = tifffile.imread(path)
    except Exception as e:  # tifffile raises many types on corrupt files; all mean "unreadable"
        raise DataError(f"{path}: cannot read TIFF image ({type(e).__name__}: {e})") from e
    # Some writers store bands first (C, H, W): move them last.
    if array.ndim == 3 and array.shape[0] <= 4 < array.shape[2]:
        array = np.moveaxis(array, 0, -1)
    return array


def read_image(path: Path) -> np.ndarray:
    """An 8-bit image as (H, W, 3) uint8 (grey and palette images expanded, alpha dropped)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        array = _read_tiff(path)
        if array.dtype != np.uint8:
            raise DataError(f"{path}: expected an 8-bit image, found dtype {array.dtype}; convert it to uint8")
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] < 3:
            raise DataError(f"{path}: expected an (H, W, 3) image, found shape {array.shape}")
        return np.ascontiguousarray(array[..., :3])
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "L", "P", "LA", "CMYK", "YCbCr"):
                raise DataError(f"{path}: expected an 8-bit image, found PIL mode {im.mode}")
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def read_color_mask(path: Path) -> np.ndarray:
    """A colour-coded mask as (H, W, 3) uint8; palette-mode PNGs are converted to RGB first."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        array = _read_tiff(path)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] < 3:
            raise DataError(f"{path}: expected an RGB colour mask, found {array.dtype} of shape {array.shape}")
        return np.ascontiguousarray(array[..., :3])
    try:
        with Image.open(path) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about palette transparency; irrelevant for labels
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from e


def read_index_mask(path: Path) -> np.ndarray:
    """A single-channel mask of integer ids (grey or palette-mode PNG: the raw indices)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        array = _read_tiff(path)
    else:
        try:
            with Image.open(path) as im:
                array = np.asarray(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from e
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: expected a single-channel integer index mask, found {array.dtype} {array.shape}")
    return array


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (width x height) but its image "
            f"{image_path} is {image.shape[1]}x{image.shape[0]}; an image and its mask must have the same size"
        )


class IdMap:
    """Maps index masks to class ids: `id_map` (file id -> class id), then `ignore_ids` -> IGNORE_INDEX.

    Ids absent from `id_map` keep their value; any resulting id >= num_classes (other than
    IGNORE_INDEX) is an error naming the file.
    """

    def __init__(self, num_classes: int, id_map: dict[int, int], ignore_ids: Sequence[int],
                 where: str = "dataset") -> None:
        self.num_classes = num_classes
        self.lut = np.arange(65536, dtype=np.int32)
        for src, dst in id_map.items():
            if not (0 <= src < 65536) or not (0 <= dst < num_classes or dst == IGNORE_INDEX):
                raise ParamsError(
                    f"{where}.id_map: {src} -> {dst} is out of range; expected file ids 0..65535 mapped to "
                    f"class ids 0..{num_classes - 1} or {IGNORE_INDEX}"
                )
            self.lut[src] = dst
        for i in ignore_ids:
            if not 0 <= i < 65536:
                raise ParamsError(f"{where}.ignore_ids: {i} is out of range 0..65535")
            self.lut[i] = IGNORE_INDEX

    def __call__(self, ids: np.ndarray, path: Path | str) -> np.ndarray:
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= 65536:
            raise DataError(f"{path}: mask ids must lie in 0..65535, found {ids.min()}..{ids.max()}")
        out = self.lut[ids]
        bad = (out >= self.num_classes) & (out != IGNORE_INDEX)
        if bad.any():
            found = np.unique(ids[bad])[:10].tolist()
            raise DataError(
                f"{path}: mask id(s) {found} map to no class (expected 0..{self.num_classes - 1} after "
                "dataset.id_map); add them to dataset.id_map or dataset.ignore_ids"
            )
        return out.astype(np.uint8)
