"""`dumps/pseudo.zarr`: what a trained method would train on, for every unlabeled tile.

The dump runs the method's own `pseudo_labels` (its teacher and its selection rule) in eval mode, without
gradients, over the unlabeled tiles, and stores the result next to the hidden ground truth. Layout (zarr v3,
Blosc/zstd, one chunk per tile along the first axis), readable with plain `zarr` without importing s4seg:

    tile_id         (N,)          int64    row -> tile id in data/tiles.zarr (images live there; join on it)
    pseudo          (N, T, T)     uint8    hard pseudo-label (class index)
    conf            (N, T, T)     float16  confidence of `pseudo` (max softmax prob., or the method's own score)
    keep            (N, T, T)     bool     the pixel would contribute to the unlabeled loss
    regions         (N, T, T)     int32    region ids, unique within a tile: 1..n_t, 0 = no region
    gt              (N, T, T)     uint8    hidden ground truth, 255 = ignore (never used in training)
    region_offsets  (N + 1,)      int64    regions of row t are rows region_offsets[t] : region_offsets[t + 1]
    region_class    (R,)          uint8    of the three region tables below (ragged: R = all regions);
    region_conf     (R,)          float32  region id i of row t is table row region_offsets[t] + i - 1
    region_pixels   (R,)          int32
    extra/<name>    (N, ...)      any      method-specific layers (see below)

    attrs: format, method, iteration (training step of the model), params_hash, model (path), classes,
           palette, dataset, tile_size, tiles (path of the tile store), num_tiles, layers (every array above,
           as paths), regions ("connected components, per class, 8-connectivity" or "method"),
           min_region_pixels, conf_dtype, precision (the dump's, resolved: fp32 | bf16 | fp16)

Example, with plain zarr:

    g = zarr.open_group("dumps/pseudo.zarr", mode="r")
    t = 3; o = g["region_offsets"][t : t + 2]
    classes_of_regions = g["region_class"][o[0] : o[1]]   # region id i -> classes_of_regions[i - 1]

Regions: by default the connected components of the pseudo-label, per class, 8-connected
(`s4seg.evaluation.regions`), so region inspection works for every method; a method that sets
`PseudoLabels.regions` gets its own regions stored instead (relabelled to 1..n, negative ids = none).

Extension point: every entry `name -> (B, ...) tensor` of `PseudoLabels.extra` becomes the array
`extra/<name>` with shape (N, ...), one chunk per tile, stored with the tensor's dtype (float64 as float32).
A method adds a layer to the dump (propagated regions, region-classifier outputs, discriminator maps) by
filling `extra` in its `pseudo_labels`; nothing here changes. Every batch must return the same keys. One
name has a meaning here: `confident`, a bool layer of the pixels the method would keep before it expands
its selection (CorrMatch's F before region propagation); the quality then scores what the expansion adds
(`propagated_coverage`, `propagated_accuracy` of `s4seg.evaluation.pseudo_quality`). With it, `prior_label`
(the pseudo-label before the expansion, uint8) lets the quality score what the expansion overwrites inside that
set (`relabelled_coverage`, `relabelled_accuracy`, `relabelled_prior_accuracy`).

Atomicity: the store is built in a temporary sibling and renamed onto `dumps/pseudo.zarr` only when
complete (`s4seg.io.atomic_dir`); an interrupted dump leaves the previous store in place.

Speed: images are read one batch ahead and each batch's post-processing (regions, quality counts, chunk
encoding and writing) runs in a worker thread while the model computes the next batch, so the dump costs
little more than plain inference (`benchmark_dump` measures both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm
from zarr.codecs import BloscCodec

from s4seg.data.store import TileStore
from s4seg.engine.method import Method, PseudoLabels
from s4seg.evaluation.pseudo_quality import CONFIDENT_LAYER, PRIOR_LABEL_LAYER, PseudoQuality
from s4seg.evaluation.regions import pseudo_regions, region_table, relabel_regions
from s4seg.io import atomic_dir, atomic_path
from s4seg.runtime import make_runtime

log = logging.getLogger(__name__)

DUMP_FORMAT = "s4seg.pseudo/1"
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
_TABLE_CHUNK = 65536


@dataclass
class PseudoBatch:
    """One batch of pseudo-labels as NumPy arrays on the CPU, with the rows' tile ids and ground truth."""

    rows: slice  # rows of the dump these tiles occupy
    tile_ids: np.ndarray  # (B,) int64
    gt: np.ndarray  # (B, T, T) uint8
    pseudo: np.ndarray  # (B, T, T) uint8
    conf: np.ndarray  # (B, T, T) float32 (stored as float16)
    keep: np.ndarray  # (B, T, T) bool
    regions: np.ndarray | None  # (B, T, T) int32 from the method, or None
    extra: dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Running a method
# --------------------------------------------------------------------------------------------------
def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to_numpy(t: Any) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # NumPy has no bfloat16


def _read_batch(store: TileStore, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) and np.all(np.diff(ids) == 1):  # contiguous ids: one slice read
        sel = slice(int(ids[0]), int(ids[-1]) + 1)
        return np.asarray(store.images[sel]), np.asarray(store.masks[sel])
    return np.asarray(store.images.oindex[ids]), np.asarray(store.masks.oindex[ids])


def iter_pseudo_labels(
    method: Method,
    store: TileStore,
    tile_ids: Sequence[int],
    *,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    progress: bool | None = None,
    desc: str = "pseudo-labels",
) -> Iterator[PseudoBatch]:
    """Yield the method's pseudo-labels of `tile_ids`, batch by batch (eval mode, no grad).

    The method runs on `device` in `precision` (s4seg.runtime: autocast, channels_last). Images are read
    one batch ahead in a thread. `progress=None` shows a bar only when stderr is a TTY.
    """
    tile_ids = np.asarray(tile_ids, dtype=np.int64)
    runtime = make_runtime(device, precision, where="dump.precision")
    runtime.module(method).eval()
    if progress is None:
        progress = sys.stderr.isatty()
    starts = list(range(0, len(tile_ids), batch_size))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dump-read") as reader, \
            tqdm(total=len(tile_ids), desc=desc, unit="tile", disable=not progress) as bar:
        pending = reader.submit(_read_batch, store, tile_ids[: batch_size]) if starts else None
        for start in starts:
            ids = tile_ids[start : start + batch_size]
            images, gt = pending.result()
            nxt = start + batch_size
            pending = reader.submit(_read_batch, store, tile_ids[nxt : nxt + batch_size]) if nxt < len(
                tile_ids) else None
            with torch.no_grad(), runtime.autocast():
                pl = method.pseudo_labels(runtime.input(images))
            yield _as_numpy(pl, slice(start, start + len(ids)), ids, gt)
            bar.update(len(ids))


def _as_numpy(pl: PseudoLabels, rows: slice, ids: np.ndarray, gt: np.ndarray) -> PseudoBatch:
    expected = gt.shape
    label = _to_numpy(pl.label)
    if label.shape != expected:
        raise ValueError(f"pseudo_labels returned label of shape {label.shape}, expected {expected}")
    extra = {}
    for name, value in (pl.extra or {}).items():
        arr = _to_numpy(value)
        if arr.shape[0] != len(ids):
            raise ValueError(f"PseudoLabels.extra[{name!r}] has {arr.shape[0]} rows for a batch of {len(ids)}")
        extra[name] = arr.astype(np.float32) if arr.dtype == np.float64 else arr
    return PseudoBatch(
        rows=rows,
        tile_ids=ids,
        gt=gt,
        pseudo=label.astype(np.uint8),
        conf=_to_numpy(pl.conf).astype(np.float32),
        keep=_to_numpy(pl.keep).astype(bool),
        regions=None if pl.regions is None else _to_numpy(pl.regions),
        extra=extra,
    )


# --------------------------------------------------------------------------------------------------
# Writing the dump
# --------------------------------------------------------------------------------------------------
class _DumpWriter:
    """Creates the arrays, writes one batch at a time, and finishes the region tables and attributes."""

    def __init__(self, path: Path, n: int, tile_size: int, num_classes: int, min_region_pixels: int) -> None:
        self.group = zarr.open_group(str(path), mode="w")
        self.n, self.t, self.k = n, tile_size, num_classes
        self.min_region_pixels = min_region_pixels
        self.quality = PseudoQuality(num_classes)
        self.region_counts = np.zeros(n, np.int64)
        self.tables: list[tuple[int, Any]] = []  # (row, RegionTable), in any order
        self.method_regions: bool | None = None
        self.extra_names: set[str] | None = None
        t = tile_size
        self.tile_id = self._array("tile_id", (n,), (max(min(n, _TABLE_CHUNK), 1),), "int64", ("tile",))
        self.pseudo = self._array("pseudo", (n, t, t), (1, t, t), "uint8", ("tile", "y", "x"))
        self.conf = self._array("conf", (n, t, t), (1, t, t), "float16", ("tile", "y", "x"))
        self.keep = self._array("keep", (n, t, t), (1, t, t), "bool", ("tile", "y", "x"))
        self.regions = self._array("regions", (n, t, t), (1, t, t), "int32", ("tile", "y", "x"))
        self.gt = self._array("gt", (n, t, t), (1, t, t), "uint8", ("tile", "y", "x"), fill_value=255)

    def _array(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any,
               dims: tuple[str, ...], fill_value: Any = None) -> zarr.Array:
        kwargs = {} if fill_value is None else {"fill_value": fill_value}
        return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=_COMPRESSOR,
                                       dimension_names=dims, **kwargs)

    def write(self, b: PseudoBatch) -> None:
        """Regions, quality counts and chunk writes of one batch (runs in the writer thread)."""
        has_regions = b.regions is not None
        if self.method_regions is None:
            self.method_regions = has_regions
        elif self.method_regions != has_regions:
            raise ValueError("pseudo_labels set `regions` for some batches and not for others")
        names = set(b.extra)
        if self.extra_names is None:
            self.extra_names = names
            for name, arr in b.extra.items():
                self._array(f"extra/{name}", (self.n, *arr.shape[1:]), (1, *arr.shape[1:]), arr.dtype,
                            ("tile",) + tuple(f"dim_{i}" for i in range(1, arr.ndim)))
        elif names != self.extra_names:
            raise ValueError(f"PseudoLabels.extra keys changed between batches: {sorted(self.extra_names)} "
                             f"then {sorted(names)}")
        regions = np.empty(b.pseudo.shape, np.int32)
        confident = b.extra.get(CONFIDENT_LAYER)  # the method's selection before it expanded it, if any
        prior = b.extra.get(PRIOR_LABEL_LAYER)  # and its pseudo-label before the expansion
        conf = b.conf.astype(np.float16)  # as stored: the curve recomputed from the dump is the same
        for i in range(len(b.tile_ids)):
            if has_regions:
                regions[i] = relabel_regions(b.regions[i], self.min_region_pixels)
            else:
                regions[i] = pseudo_regions(b.pseudo[i], min_region_pixels=self.min_region_pixels)
            table = region_table(regions[i], b.pseudo[i], b.conf[i], self.k)
            row = b.rows.start + i
            self.tables.append((row, table))
            self.region_counts[row] = len(table)
            self.quality.update(b.pseudo[i], b.keep[i], b.gt[i], regions[i], table.cls,
                                None if confident is None else confident[i], conf[i],
                                None if prior is None else prior[i])
        self.tile_id[b.rows] = b.tile_ids
        self.pseudo[b.rows] = b.pseudo
        self.conf[b.rows] = conf
        self.keep[b.rows] = b.keep
        self.regions[b.rows] = regions
        self.gt[b.rows] = b.gt
        for name, arr in b.extra.items():
            self.group[f"extra/{name}"][b.rows] = arr

    def finish(self, attrs: dict[str, Any]) -> None:
        offsets = np.zeros(self.n + 1, np.int64)
        np.cumsum(self.region_counts, out=offsets[1:])
        tables = [t for _, t in sorted(self.tables, key=lambda rt: rt[0])]
        total = int(offsets[-1])
        chunk = (max(min(total, _TABLE_CHUNK), 1),)

        def column(name: str, values: list[np.ndarray], dtype: str) -> None:
            arr = self._array(name, (total,), chunk, dtype, ("region",))
            if total:
                arr[:] = np.concatenate(values).astype(dtype)

        self._array("region_offsets", (self.n + 1,), (self.n + 1,), "int64", ("tile_edge",))[:] = offsets
        column("region_class", [t.cls for t in tables], "uint8")
        column("region_conf", [t.conf for t in tables], "float32")
        column("region_pixels", [t.pixels for t in tables], "int32")
        layers = ["tile_id", "pseudo", "conf", "keep", "regions", "gt", "region_offsets", "region_class",
                  "region_conf", "region_pixels"] + [f"extra/{n}" for n in sorted(self.extra_names or ())]
        self.group.attrs.update({
            **attrs,
            "format": DUMP_FORMAT,
            "num_tiles": self.n,
            "tile_size": self.t,
            "layers": layers,
            "regions": "method" if self.method_regions else "connected components, per class, 8-connectivity",
            "min_region_pixels": self.min_region_pixels,
            "conf_dtype": "float16",
        })


def write_dump(
    method: Method,
    store: TileStore,
    tile_ids: Sequence[int],
    path: str | Path,
    *,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    min_region_pixels: int = 1,
    attrs: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> PseudoQuality:
    """Dump `method`'s pseudo-labels of `tile_ids` to `path` atomically; return their quality counts.

    `attrs` adds or overrides attributes (the stage passes iteration, params_hash, model, tiles).
    """
    runtime = make_runtime(device, precision, where="dump.precision")
    if store.num_classes > 255:
        raise ValueError(f"{store.path}: {store.num_classes} classes do not fit the dump's uint8 pseudo-labels")
    base = {"method": method.name or type(method).__name__, "iteration": None, "params_hash": None,
            "classes": store.classes, "palette": store.palette, "dataset": store.dataset,
            "tiles": str(store.path), "precision": runtime.precision}
    with atomic_dir(path) as tmp:
        writer = _DumpWriter(tmp, len(tile_ids), store.tile_size, store.num_classes, min_region_pixels)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dump-write") as pool:
            pending: Future | None = None
            for batch in iter_pseudo_labels(method, store, tile_ids, batch_size=batch_size, device=runtime.device,
                                            precision=runtime.precision, progress=progress, desc="dump"):
                if pending is not None:
                    pending.result()  # one batch in flight: bounded memory, errors surface here
                pending = pool.submit(writer.write, batch)
            if pending is not None:
                pending.result()
        writer.finish({**base, **(attrs or {})})
    log.info("dumped pseudo-labels of %d tiles to %s", len(tile_ids), path)
    return writer.quality


def measure_quality(
    method: Method,
    store: TileStore,
    tile_ids: Sequence[int],
    *,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    min_region_pixels: int = 1,
    threshold: float | None = None,
    progress: bool | None = None,
) -> PseudoQuality:
    """Quality of `method`'s pseudo-labels without writing them.

    With `threshold`, the selection is replaced by `conf >= threshold` (how the dump stage scores the warmup
    model with the trained method's fixed confidence threshold); regions are connected components.
    """
    quality = PseudoQuality(store.num_classes)
    for b in iter_pseudo_labels(method, store, tile_ids, batch_size=batch_size, device=device, precision=precision,
                                progress=progress, desc="warmup pseudo-labels"):
        keep = b.keep if threshold is None else b.conf >= threshold
        for i in range(len(b.tile_ids)):
            regions = pseudo_regions(b.pseudo[i], min_region_pixels=min_region_pixels)
            quality.update(b.pseudo[i], keep[i], b.gt[i], regions, conf=b.conf[i])
    return quality


def cached_quality(cache_dir: str | Path | None, key: dict[str, Any], compute: Callable[[], PseudoQuality]
                   ) -> PseudoQuality:
    """`compute()`, or the counts a previous call with the same `key` stored in `cache_dir` (content-addressed).

    For what depends only on the warmup model: every experiment that shares a warmup scores its pseudo-labels
    once, not once per experiment. The key must hold everything the result depends on (the model file's
    content hash, the tiles, the selection rule, the code); None as `cache_dir` disables the cache.
    """
    if cache_dir is None:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"pseudo-quality-{digest}.npz"
    if path.is_file():
        try:
            with np.load(path) as counts:
                log.info("pseudo-label quality reused from %s", path)
                return PseudoQuality.from_counts(dict(counts))
        except (OSError, ValueError, KeyError) as e:  # a damaged cache entry is recomputed, not fatal
            log.warning("%s: unreadable cache entry (%s); recomputing", path, e)
    quality = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **quality.counts())
    return quality


# --------------------------------------------------------------------------------------------------
# Params hash, selection rule of the warmup model, benchmark
# --------------------------------------------------------------------------------------------------
def params_hash(info: dict[str, Any]) -> str:
    """Short SHA-256 of the method name, method config and model config of a model file's dict
    (`s4seg.engine.checkpoint.read_model_file`)."""
    payload = {k: info.get(k) for k in ("method", "method_config", "model_config")}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def warmup_threshold(method_config: dict[str, Any] | Any) -> float | None:
    """The trained method's fixed confidence threshold (`conf_thresh`), or None (then keep all valid pixels).

    The warmup model has no selection rule of its own; applying the trained method's fixed threshold makes
    `accuracy` and `coverage` comparable. Methods with learned or adaptive selection (dynamic thresholds,
    entropy quantiles, region classifiers) cannot be transplanted onto the warmup weights, so their warmup
    baseline keeps every valid pixel; `accuracy_all` compares the two models independently of selection.
    """
    value = method_config.get("conf_thresh") if isinstance(method_config, dict) else getattr(
        method_config, "conf_thresh", None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def benchmark_dump(method: Method, store: TileStore, tile_ids: Sequence[int], out: str | Path, *,
                   batch_size: int = 8, device: str = "auto", precision: str = "fp32",
                   repeats: int = 1) -> dict[str, float]:
    """Seconds of plain inference (read tiles + `predict` + argmax) and of `write_dump` over the same tiles.

    The two alternate `repeats` times and the fastest run of each is reported, which damps the noise of a
    shared machine.
    """
    runtime = make_runtime(select_device(device), precision, where="dump.precision")
    runtime.module(method).eval()
    ids = np.asarray(tile_ids, dtype=np.int64)
    inference, dump = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad(), runtime.autocast():
            for s in range(0, len(ids), batch_size):
                images, _ = _read_batch(store, ids[s : s + batch_size])
                method.predict(runtime.input(images)).argmax(dim=1).cpu()
        inference.append(time.perf_counter() - start)
        start = time.perf_counter()
        write_dump(method, store, ids, out, batch_size=batch_size, device=runtime.device, precision=precision,
                   progress=False)
        dump.append(time.perf_counter() - start)
    return {"tiles": float(len(ids)), "inference_s": min(inference), "dump_s": min(dump),
            "ratio": min(dump) / min(inference)}
