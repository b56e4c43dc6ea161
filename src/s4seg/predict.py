"""`s4seg predict`: a trained model on new imagery of any size (JPEG, PNG, TIFF, GeoTIFF).

For every input image, written to OUT_DIR (the inputs' folders below their common folder are kept):

    NAME.mask.png|tif     class index per pixel, uint8; 255 (IGNORE_INDEX) where the input has no data
    NAME.conf.png|tif     confidence, uint8 = round(255 x the mean softmax probability of the chosen
                          class over the windows covering the pixel); 0 where the input has no data
    NAME.color.png|tif    (--color) the mask in the model's class palette, RGB
    NAME.preview.png      the image with the colour mask blended over it, at most 1024 px a side

TIFF inputs give tiled, DEFLATE-compressed TIFF outputs carrying the input's georeferencing tags
(GEO_TAGS), so GIS tools place them where the image was; the mask and confidence declare their
no-data value (GDAL_NODATA 255 and 0). No-data input pixels are those equal to the input's
GDAL_NODATA in every band, or transparent in an alpha band.

Prediction is `evaluate`'s: the same sliding window and softmax averaging
(`s4seg.evaluation.sliding.iter_scene_bands`) through the method's own `predict`, so a method with
a teacher or an ensemble predicts here as it is scored there, in the same runtime (`s4seg.runtime`:
channels_last, and `precision`, default auto as `evaluate.precision`). Everything needed comes from the
model file (classes, palette, architecture; the model normalises its input itself).

Memory: the sweep holds about one window of rows of probabilities (a ring of rows). A TIFF whose whole image and
outputs would exceed `max_memory_mb` is also read chunk-row by chunk-row (tifffile's Zarr store)
and its outputs are spooled to raw files on disk, then written tile by tile, so its peak memory
does not grow with its height. JPEG and PNG are decoded whole by Pillow (about 5 bytes per pixel
in all): convert a huge one to a tiled GeoTIFF first. Every output is written atomically: a
failure leaves no partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
import zarr
from PIL import Image, UnidentifiedImageError

from s4seg.config import IGNORE_INDEX, EvaluateConfig, TilingConfig
from s4seg.errors import CheckpointError, DataError, ParamsError
from s4seg.evaluation.sliding import Predict, ReadRows, iter_scene_bands, labels_and_confidence
from s4seg.io import atomic_path
from s4seg.runtime import Runtime, make_runtime

log = logging.getLogger(__name__)

# A user's own orthophotos are large; PIL's decompression-bomb guard is for untrusted web images.
Image.MAX_IMAGE_PIXELS = None

MODEL_BANDS = 3  # every s4seg model takes RGB (s4seg.models.base.Segmenter)
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", *TIFF_SUFFIXES)
OUTPUT_KINDS = ("mask", "conf", "color", "preview")  # NAME.<kind>.<suffix>; skipped when listing inputs
GEO_TAGS = {  # copied from a TIFF input to its TIFF outputs: the outputs share its pixel grid
    33550: "ModelPixelScale",
    33922: "ModelTiepoint",
    34264: "ModelTransformation",
    34735: "GeoKeyDirectory",
    34736: "GeoDoubleParams",
    34737: "GeoAsciiParams",
}
NODATA_TAG = 42113  # GDAL_NODATA, ASCII
ALPHA_EXTRASAMPLES = (1, 2)  # TIFF ExtraSamples: associated, unassociated alpha
OUTPUT_TILE = 256  # TIFF output tile side (a multiple of 16, as TIFF requires)


# --------------------------------------------------------------------------------------------------
# Options and model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictOptions:
    """Defaults are `evaluate`'s (window = the default tile size), so both predict alike."""

    window: int = TilingConfig().tile_size  # sliding-window side, pixels
    overlap: float = EvaluateConfig().overlap  # share of a window overlapping its neighbour
    batch_size: int = EvaluateConfig().batch_size  # windows per forward pass
    max_memory_mb: float = 2048  # a TIFF whose image + outputs exceed this is streamed row by row
    color: bool = False  # also write the mask in the class palette
    preview_px: int = 1024  # longest side of the preview

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ParamsError(f"--window {self.window}: expected a positive number of pixels")
        if not 0.0 <= self.overlap < 1.0:
            raise ParamsError(f"--overlap {self.overlap}: expected a fraction in [0, 1) of the window")
        if self.batch_size < 1:
            raise ParamsError(f"--batch {self.batch_size}: expected a positive number of windows")
        if self.max_memory_mb <= 0:
            raise ParamsError(f"--max-memory-mb {self.max_memory_mb}: expected a positive number of MB")
        if self.preview_px < 1:
            raise ParamsError(f"preview_px {self.preview_px}: expected a positive number of pixels")


@dataclass(frozen=True)
class Predictor:
    """What prediction needs from a model file: the logits callable and the class legend."""

    predict: Predict
    classes: list[str]
    palette: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_predictor(path: str | Path, runtime: Runtime) -> Predictor:
    """Rebuild the method of a model file on the runtime's device and memory format; its `predict` (teacher,
    ensemble) is used as is (`predict_files` runs it under the runtime)."""
    from s4seg.engine.checkpoint import load_method, read_model_file

    try:
        artifact = read_model_file(path)
    except CheckpointError as e:
        raise _one_line(e, path) from e
    num_classes = int(artifact["num_classes"])
    classes = list(artifact.get("classes") or [f"class {i}" for i in range(num_classes)])
    palette = list(artifact.get("palette") or [])
    del artifact  # load_method reads the file again; do not hold two copies of the weights
    method = runtime.module(load_method(path, runtime.device))
    if len(classes) != num_classes or len(palette) not in (0, num_classes):
        raise CheckpointError(f"{path}: the model predicts {num_classes} classes but lists {len(classes)} class "
                              f"names and {len(palette)} colours; re-run the stage that wrote it")
    if not palette:
        from s4seg.report.base import default_palette

        palette = default_palette(num_classes)
    return Predictor(method.predict, classes, palette)


def _one_line(error: CheckpointError, path: str | Path) -> CheckpointError:
    """torch.load's refusal of a pickled object spans a dozen lines (with terminal escapes): keep its first."""
    text = str(error)
    if "\n" not in text or error.__cause__ is None:
        return error
    cause = re.sub(r"\x1b\[[0-9;]*m", "", str(error.__cause__).splitlines()[0]).strip()
    cause = cause if len(cause) <= 100 else cause[:100] + "..."
    return CheckpointError(f"{path}: cannot read the model file ({type(error.__cause__).__name__}: {cause}); "
                           "expected an s4seg model written by the warmup or train stage")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when present, else cpu."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ParamsError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"--device {name}: CUDA is not available here; use --device auto or cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def find_inputs(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly, in folders (not recursive) or matched by globs (`**` recursive), in order.

    Files found in folders or by globs are skipped when they are outputs of an earlier run.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            found.append(path)
            continue
        if path.is_dir():
            listed, where = sorted(path.iterdir()), f"{path}: folder has"
        elif glob.has_magic(str(spec)):
            listed, where = sorted(Path(p) for p in glob.glob(str(spec), recursive=True)), f"{spec}: matches"
        else:
            raise DataError(f"{spec}: no such image file, folder or glob match")
        images = [p for p in listed if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not _is_output(p)]
        if not images:
            raise DataError(f"{where} no JPEG, PNG or TIFF image ({', '.join(IMAGE_SUFFIXES)})")
        found += images
    unique = {Path(os.path.abspath(p)): p for p in reversed(found)}  # keep each file once, first place
    return [p for p in found if unique.get(Path(os.path.abspath(p))) is p]


def _is_output(path: Path) -> bool:
    return any(path.stem.endswith(f".{kind}") for kind in OUTPUT_KINDS)


@dataclass(frozen=True)
class ImageInfo:
    """An input image's header, checked: 8-bit RGB, optionally with an alpha band."""

    path: Path
    height: int
    width: int
    is_tiff: bool
    alpha: bool  # a 4th band that is transparency
    nodata: int | None = None  # GDAL_NODATA, when it is a uint8 value
    geotags: tuple[tuple, ...] = ()  # tifffile extratags: (code, dtype, count, value, writeonce)
    planar: bool = False  # TIFF bands stored one after another (S, Y, X)

    @property
    def bands(self) -> int:
        return MODEL_BANDS + int(self.alpha)


def read_header(path: Path) -> ImageInfo:
    """Check that `path` is an image the model can take; raise a DataError saying what it is instead."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _tiff_header(path)
    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e}); "
                        "expected a JPEG, PNG or TIFF file") from e
    bands = {"1": 1, "L": 1, "LA": 2, "P": 3, "RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4}
    if mode not in bands:
        raise DataError(f"{path}: found an image of mode {mode}; expected 8-bit RGB (uint8); "
                        "convert it to 8 bits per band first")
    _check_bands(path, bands[mode], alpha=mode in ("RGBA", "LA"))
    return ImageInfo(path, height, width, is_tiff=False, alpha=mode == "RGBA")


def _tiff_header(path: Path) -> ImageInfo:
    try:
        with tifffile.TiffFile(path) as tif:
            series, page = tif.series[0], tif.pages[0]
            shape, axes, dtype = series.shape, series.axes, series.dtype
            extrasamples, tags = tuple(page.extrasamples), page.tags
            geotags = tuple((code, int(tags[code].dtype), tags[code].count, tags[code].value, True)
                            for code in GEO_TAGS if code in tags)
            nodata = tags[NODATA_TAG].value if NODATA_TAG in tags else None
    except Exception as e:  # tifffile raises many types on corrupt files; all mean "unreadable"
        raise DataError(f"{path}: cannot read the TIFF ({type(e).__name__}: {e})") from e
    if axes not in ("YX", "YXS", "SYX"):
        raise DataError(f"{path}: found a TIFF of shape {shape} (axes {axes}); expected one RGB image (Y, X, S)")
    bands = 1 if axes == "YX" else shape[axes.index("S")]
    alpha = bands == MODEL_BANDS + 1 and bool(extrasamples) and extrasamples[-1] in ALPHA_EXTRASAMPLES
    _check_bands(path, bands, alpha)
    if dtype != np.uint8:
        raise DataError(f"{path}: found {dtype} samples; expected 8-bit (uint8) RGB; rescale it to 8 bits, "
                        "e.g. gdal_translate -ot Byte -scale in.tif out.tif")
    height, width = shape[1:] if axes == "SYX" else shape[:2]
    return ImageInfo(path, height, width, is_tiff=True, alpha=alpha, nodata=_uint8_nodata(path, nodata),
                     geotags=geotags, planar=axes == "SYX")


def _check_bands(path: Path, bands: int, alpha: bool) -> None:
    if bands - int(alpha) != MODEL_BANDS:
        raise DataError(
            f"{path}: found {bands} band{'s' if bands != 1 else ''}; the model expects {MODEL_BANDS} (RGB, "
            "optionally with an alpha band); keep the RGB bands, e.g. gdal_translate -b 1 -b 2 -b 3 in.tif out.tif"
        )


def _uint8_nodata(path: Path, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value.is_integer() and 0 <= value <= 255):
        log.warning("%s: GDAL_NODATA %r is not a uint8 value; no pixel is treated as no data", path, text)
        return None
    return int(value)


READ_ERRORS = (OSError, ValueError, RuntimeError, SyntaxError, UnidentifiedImageError, tifffile.TiffFileError)


@contextlib.contextmanager
def open_rows(info: ImageInfo, stream: bool) -> Iterator[ReadRows]:
    """A `read_rows(top, bottom) -> (h, W, bands) uint8` of the image, whole in memory or `stream`ed (TIFF).

    A file that fails to decode raises a DataError naming it.
    """
    if info.is_tiff:
        with tifffile.TiffFile(info.path) as tif:
            if stream:
                yield _decoding(info, _TiffRows(tif, info))
                return
            image = _decoding(info, lambda _t, _b: tif.asarray(series=0, level=0))(0, info.height)
            image = np.moveaxis(image, 0, -1) if info.planar else image
    else:
        def decode(_top: int, _bottom: int) -> np.ndarray:
            with Image.open(info.path) as im:
                return np.asarray(im.convert("RGBA" if info.alpha else "RGB"))

        image = _decoding(info, decode)(0, info.height)
    yield lambda top, bottom: image[top:bottom]


def _decoding(info: ImageInfo, read: ReadRows) -> ReadRows:
    """`read`, with a decoding failure (corrupt file, missing codec) turned into a DataError naming the file."""

    def read_rows(top: int, bottom: int) -> np.ndarray:
        try:
            return read(top, bottom)
        except READ_ERRORS as e:
            raise DataError(f"{info.path}: cannot decode the image ({type(e).__name__}: {e})") from e

    return read_rows


class _TiffRows:
    """Rows of a TIFF, read chunk-row by chunk-row through tifffile's Zarr store.

    It keeps the rows from the last `top` asked for down to the last chunk row read: the sweep only
    moves down, so every chunk is decoded once.
    """

    def __init__(self, tif: tifffile.TiffFile, info: ImageInfo) -> None:
        self.array = zarr.open_array(tif.aszarr(series=0, level=0), mode="r")
        self.planar, self.height = info.planar, info.height
        self.step = int(self.array.chunks[1 if self.planar else 0])  # rows per strip or tile
        self.rows = np.zeros((0, info.width, info.bands), np.uint8)  # rows [self.top, self.top + len)
        self.top = 0

    def __call__(self, top: int, bottom: int) -> np.ndarray:
        end = self.top + len(self.rows)
        if not self.top <= top <= end:  # not next to what is held: start again at top's chunk row
            self.top = end = top - top % self.step
            self.rows = self.rows[:0]
        if bottom > end:
            stop = min(self.height, -(-bottom // self.step) * self.step)
            self.rows = np.concatenate([self.rows[top - self.top :], self._read(end, stop)])
            self.top = top
        return self.rows[top - self.top : bottom - self.top]

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self.planar:
            return np.moveaxis(self.array[:, start:stop], 0, -1)
        return self.array[start:stop]


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------
class _ArrayRows:
    """Mask and confidence held whole in memory."""

    def __init__(self, height: int, width: int) -> None:
        self.arrays = {"mask": np.empty((height, width), np.uint8), "conf": np.empty((height, width), np.uint8)}

    def write(self, top: int, mask: np.ndarray, conf: np.ndarray) -> None:
        self.arrays["mask"][top : top + len(mask)] = mask
        self.arrays["conf"][top : top + len(conf)] = conf

    def finish(self) -> None:
        pass

    def read(self, kind: str, top: int, bottom: int) -> np.ndarray:
        return self.arrays[kind][top:bottom]


class _SpooledRows:
    """Mask and confidence spooled to raw files in `folder` as the bands arrive (top to bottom),
    read back a tile row at a time: memory does not grow with the scene."""

    def __init__(self, folder: Path, width: int) -> None:
        self.width, self.rows = width, 0
        self.paths = {kind: folder / f"{kind}.u8" for kind in ("mask", "conf")}
        self.files = {kind: open(path, "wb") for kind, path in self.paths.items()}  # noqa: SIM115 (closed in finish)

    def write(self, top: int, mask: np.ndarray, conf: np.ndarray) -> None:
        assert top == self.rows, "bands arrive in order"
        self.files["mask"].write(np.ascontiguousarray(mask).tobytes())
        self.files["conf"].write(np.ascontiguousarray(conf).tobytes())
        self.rows += len(mask)

    def finish(self) -> None:
        for f in self.files.values():
            f.close()

    def read(self, kind: str, top: int, bottom: int) -> np.ndarray:
        count = (bottom - top) * self.width
        return np.fromfile(self.paths[kind], np.uint8, count=count, offset=top * self.width).reshape(-1, self.width)


RowsOf = Callable[[int, int], np.ndarray]  # (top, bottom) -> (h, W) or (h, W, 3) uint8


def write_tiff(path: Path, rows: RowsOf, height: int, width: int, samples: int, extratags: Sequence[tuple]) -> None:
    """A tiled, DEFLATE-compressed TIFF, encoded one tile row at a time from `rows`."""

    def tiles() -> Iterator[np.ndarray]:
        for top in range(0, height, OUTPUT_TILE):
            band = rows(top, min(top + OUTPUT_TILE, height))
            for left in range(0, width, OUTPUT_TILE):
                yield band[:, left : left + OUTPUT_TILE]  # tifffile zero-pads edge tiles

    shape = (height, width, samples) if samples > 1 else (height, width)
    bigtiff = height * width * samples > 2**32 - 2**25  # classic TIFF offsets are 32-bit
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tiff:
        # DEFLATE level 1: masks compress well at any level, and level 6 costs ~3x the time on big scenes.
        # `buffersize` bounds how many tiles the parallel encoder reads ahead of the writer.
        tiff.write(tiles(), shape=shape, dtype=np.uint8, tile=(OUTPUT_TILE, OUTPUT_TILE), compression="zlib",
                   compressionargs={"level": 1}, photometric="rgb" if samples == 3 else "minisblack",
                   extratags=list(extratags), metadata=None, buffersize=8 * 2**20)


def colorize(labels: np.ndarray, palette: Sequence[str]) -> np.ndarray:
    """(h, W) class ids -> (h, W, 3) in the palette; no-data black (white if black is a class colour)."""
    from s4seg.report.figures import colorize as report_colorize  # matplotlib: imported only when drawing

    return report_colorize(labels, palette)


class _Preview:
    """The image and mask subsampled to at most `size` px a side as the bands go by; blended at the end.

    Both are allocated once: small arrays kept alive between the sweep's large transient ones would
    fragment the heap and let memory creep up with the scene's height.
    """

    def __init__(self, height: int, width: int, size: int) -> None:
        self.step = max(1, math.ceil(max(height, width) / size))
        rows, cols = -(-height // self.step), -(-width // self.step)
        self.image = np.zeros((rows, cols, MODEL_BANDS), np.uint8)
        self.mask = np.zeros((rows, cols), np.uint8)

    def add(self, top: int, image: np.ndarray, mask: np.ndarray) -> None:
        first = -top % self.step  # rows top + first, top + first + step, ... are multiples of step
        picked = mask[first :: self.step, :: self.step]
        at = (top + first) // self.step
        self.image[at : at + len(picked)] = image[first :: self.step, :: self.step, :MODEL_BANDS]
        self.mask[at : at + len(picked)] = picked

    def render(self, palette: Sequence[str]) -> np.ndarray:
        blend = (self.image.astype(np.uint16) + colorize(self.mask, palette)) // 2
        return np.where((self.mask == IGNORE_INDEX)[..., None], self.image, blend.astype(np.uint8))


@dataclass
class SceneResult:
    """One predicted image: its outputs and how long it took."""

    path: Path
    outputs: dict[str, Path]  # kind -> written file
    height: int
    width: int
    seconds: float
    streamed: bool

    @property
    def seconds_per_megapixel(self) -> float:
        return self.seconds / (self.height * self.width / 1e6)


def output_stems(inputs: Sequence[Path], out_dir: Path) -> list[Path]:
    """OUT_DIR / (input's folder below the inputs' common folder) / input name without its suffix."""
    folders = [Path(os.path.abspath(p)).parent for p in inputs]
    common = Path(os.path.commonpath(folders))
    return [out_dir / folder.relative_to(common) / p.stem for p, folder in zip(inputs, folders, strict=True)]


def output_paths(info: ImageInfo, stem: Path, color: bool) -> dict[str, Path]:
    suffix = ".tif" if info.is_tiff else ".png"
    kinds = ["mask", "conf"] + (["color"] if color else [])
    paths = {kind: stem.with_name(f"{stem.name}.{kind}{suffix}") for kind in kinds}
    paths["preview"] = stem.with_name(f"{stem.name}.preview.png")
    return paths


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------
def in_memory_bytes(info: ImageInfo, color: bool) -> int:
    """Bytes of the whole image and its outputs (mask, confidence, colour) held at once."""
    return info.height * info.width * (info.bands + 2 + (3 if color else 0))


def predict_image(
    predictor: Predictor,
    info: ImageInfo,
    stem: Path,
    options: PredictOptions,
    device: torch.device | str = "cpu",
) -> SceneResult:
    """Predict one image and write its outputs next to `stem` (see the module docstring)."""
    started = time.perf_counter()
    h, w = info.height, info.width
    budget = options.max_memory_mb * 2**20
    stream = info.is_tiff and in_memory_bytes(info, options.color) > budget
    if not info.is_tiff and in_memory_bytes(info, options.color) > budget:
        log.warning("%s: JPEG and PNG are decoded whole (~%d MB, over --max-memory-mb %g); to predict it row by "
                    "row, convert it to a tiled GeoTIFF (gdal_translate -co TILED=YES)", info.path,
                    in_memory_bytes(info, options.color) >> 20, options.max_memory_mb)
    paths = output_paths(info, stem, options.color)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if stream:  # spooled next to the outputs: the user chose that disk for them
            spool = stack.enter_context(tempfile.TemporaryDirectory(prefix=".s4seg-predict-", dir=stem.parent))
            rows: _ArrayRows | _SpooledRows = _SpooledRows(Path(spool), w)
            stack.callback(rows.finish)
        else:
            rows = _ArrayRows(h, w)
        preview = _Preview(h, w, options.preview_px)
        read = stack.enter_context(open_rows(info, stream))

        def rgb(top: int, bottom: int) -> np.ndarray:
            return read(top, bottom)[..., :MODEL_BANDS]

        bands = iter_scene_bands(predictor.predict, rgb, h, w, options.window, options.overlap,
                                 predictor.num_classes, options.batch_size, device, desc=info.path.name)
        for band in bands:
            labels, prob = labels_and_confidence(band.probs)  # as evaluate's predict_scene
            mask, conf = labels.cpu().numpy(), prob.mul_(255).round_().to(torch.uint8).cpu().numpy()
            pixels = read(band.top, band.top + len(mask))  # rows still held by the reader: no decoding
            invalid = _no_data(pixels, info)
            if invalid is not None:
                mask[invalid], conf[invalid] = IGNORE_INDEX, 0
            rows.write(band.top, mask, conf)
            preview.add(band.top, pixels, mask)
        rows.finish()
        _write_outputs(paths, rows, info, predictor.palette, preview)
    result = SceneResult(info.path, paths, h, w, time.perf_counter() - started, stream)
    log.info("%s: %dx%d in %.1f s (%.2f s/Mpx, %s) -> %s", info.path, w, h, result.seconds,
             result.seconds_per_megapixel, "row by row" if stream else "in memory", paths["mask"])
    return result


def _no_data(pixels: np.ndarray, info: ImageInfo) -> np.ndarray | None:
    """(h, W) bool: transparent, or equal to GDAL_NODATA in every band; None when the image declares neither."""
    invalid = None
    if info.alpha:
        invalid = pixels[..., MODEL_BANDS] == 0
    if info.nodata is not None:
        equal = (pixels[..., :MODEL_BANDS] == info.nodata).all(axis=-1)
        invalid = equal if invalid is None else invalid | equal
    return invalid


def _write_outputs(paths: dict[str, Path], rows: _ArrayRows | _SpooledRows, info: ImageInfo,
                   palette: Sequence[str], preview: _Preview) -> None:
    """Every output of one image, each to a temporary file; all are renamed only when all are written."""
    h, w = info.height, info.width
    sources: dict[str, tuple[RowsOf, int, tuple]] = {
        "mask": (lambda t, b: rows.read("mask", t, b), 1, ((NODATA_TAG, 2, 0, str(IGNORE_INDEX), True),)),
        "conf": (lambda t, b: rows.read("conf", t, b), 1, ((NODATA_TAG, 2, 0, "0", True),)),
        "color": (lambda t, b: colorize(rows.read("mask", t, b), palette), 3, ()),
    }
    with contextlib.ExitStack() as stack:
        for kind, path in paths.items():
            tmp = stack.enter_context(atomic_path(path))
            if kind == "preview":
                Image.fromarray(preview.render(palette)).save(tmp, format="PNG")
                continue
            read, samples, nodata = sources[kind]
            if info.is_tiff:
                write_tiff(tmp, read, h, w, samples, info.geotags + nodata)
            else:
                Image.fromarray(read(0, h)).save(tmp, format="PNG")


def predict_files(
    model: str | Path,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | Path,
    options: PredictOptions | None = None,
    device: str = "auto",
    loader: Callable[[Path, Runtime], Predictor] = load_predictor,
    precision: str = "auto",
) -> list[SceneResult]:
    """`s4seg predict`: every image of `inputs` through the model file `model`, outputs in `out_dir`.

    The model runs on `device` in `precision` (auto | fp32 | bf16 | fp16, s4seg.runtime), channels_last.

    Every input is checked (readable, 8-bit RGB) and the model is loaded before anything is written.
    """
    options = options or PredictOptions()
    paths = find_inputs(inputs)
    if not paths:
        raise DataError("no input image given: name image files, folders or globs")
    infos = [read_header(p) for p in paths]
    stems = output_stems(paths, Path(out_dir))
    clashes = {Path(os.path.abspath(p)) for p in paths} & {
        Path(os.path.abspath(q)) for info, stem in zip(infos, stems, strict=True)
        for q in output_paths(info, stem, options.color).values()}
    if clashes:
        raise DataError(f"{sorted(clashes)[0]}: an input would be overwritten by an output; choose another -o")
    runtime = make_runtime(resolve_device(device), precision, where="--precision")
    dev = runtime.device
    predictor = loader(Path(model), runtime)
    predictor = dataclasses.replace(predictor, predict=runtime.predictor(predictor.predict))
    log.info("%s: %d classes (%s), window %d, overlap %.2f, %s; %d image(s)", model, predictor.num_classes,
             ", ".join(predictor.classes), options.window, options.overlap, runtime.describe(), len(infos))
    results = [predict_image(predictor, info, stem, options, dev) for info, stem in zip(infos, stems, strict=True)]
    megapixels, seconds = sum(r.height * r.width for r in results) / 1e6, sum(r.seconds for r in results)
    log.info("%d image(s), %.1f Mpx in %.1f s (%.2f s/Mpx)", len(results), megapixels, seconds,
             seconds / max(megapixels, 1e-9))
    return results
