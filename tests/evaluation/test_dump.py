"""The pseudo-label dump: layout read back with plain zarr, content, extension point, atomicity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import Tensor, nn

from s4seg.data.store import TileStore, TileStoreWriter
from s4seg.engine.method import Method, MethodConfig, PseudoLabels
from s4seg.evaluation.dump import params_hash, warmup_threshold, write_dump
from s4seg.evaluation.pseudo_quality import PseudoQuality
from s4seg.evaluation.regions import pseudo_regions
from s4seg.report.inspect import dump_quality

T, K = 16, 3
CLASSES = ["road", "tree", "roof"]


def make_store(path: Path) -> TileStore:
    """Two 32x32 scenes of four 16x16 tiles each; masks with some ignore pixels."""
    rng = np.random.default_rng(0)
    w = TileStoreWriter(path, dataset="tiny", classes=CLASSES, palette=["#808080", "#00ff00", "#ff0000"],
                        tile_size=T, stride=T)
    offsets = np.array([[0, 0], [0, T], [T, 0], [T, T]])
    for name in ("a", "b"):
        images = rng.integers(0, 256, (4, T, T, 3), dtype=np.uint8)
        masks = rng.integers(0, K, (4, T, T)).astype(np.uint8)
        masks[:, 0, :3] = 255
        w.add_scene(name, images, masks, offsets, 2 * T, 2 * T)
    w.close()
    return TileStore(path)


class TinyMethod(Method):
    """A 1x1 conv; keeps pixels with conf >= 0.4; optional extra layers, own regions, failure."""

    name = "tiny"

    def __init__(self, fail_on_batch: int | None = None, extra: bool = False, regions: bool = False,
                 expand: bool = False) -> None:
        torch.manual_seed(0)
        super().__init__(MethodConfig(), nn.Conv2d(3, K, 1), K)
        self.fail_on_batch, self.extra, self.regions, self.expand = fail_on_batch, extra, regions, expand
        self.calls = 0

    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        self.calls += 1
        if self.calls == self.fail_on_batch:
            raise RuntimeError("boom on purpose")
        conf, label = self.predict(images).softmax(1).max(1)
        out = PseudoLabels(label=label, conf=conf, keep=conf >= 0.4)
        if self.extra:
            out.extra = {"score": conf.double() * 2, "flags": label == 0}
        if self.expand:  # CorrMatch-like: relabels the confident left quarter as class 0 and keeps class 0
            # beyond its confident set; it names that set and its labels before the change
            confident, prior = out.keep, label
            out.label = torch.where(confident & (torch.arange(T) < T // 4), 0, prior)
            out.extra = {"confident": confident, "prior_label": prior.to(torch.uint8), "flags": out.label == 0}
            out.keep = confident | (out.label == 0)
        if self.regions:  # quadrants as regions, ids 10 and 20 (and -1 = none in the last row)
            r = torch.full_like(label, 10, dtype=torch.int32)
            r[:, :, T // 2 :] = 20
            r[:, -1] = -1
            out.regions = r
        return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> TileStore:
    return make_store(tmp_path_factory.mktemp("tiles") / "tiles.zarr")


UNLABELED = [0, 2, 3, 5, 7]  # not contiguous; batches of 2 -> 3 batches, the last one short


def test_dump_layout_with_plain_zarr(store: TileStore, tmp_path: Path) -> None:
    method = TinyMethod()
    out = tmp_path / "pseudo.zarr"
    quality = write_dump(method, store, UNLABELED, out, batch_size=2, device="cpu",
                         attrs={"iteration": 7, "params_hash": "abc"}, progress=False)
    g = zarr.open_group(str(out), mode="r")
    n = len(UNLABELED)
    expected = {"tile_id": ((n,), np.int64), "pseudo": ((n, T, T), np.uint8), "conf": ((n, T, T), np.float16),
                "keep": ((n, T, T), np.bool_), "regions": ((n, T, T), np.int32), "gt": ((n, T, T), np.uint8),
                "region_offsets": ((n + 1,), np.int64), "region_class": (None, np.uint8),
                "region_conf": (None, np.float32), "region_pixels": (None, np.int32)}
    for name, (shape, dtype) in expected.items():
        assert g[name].dtype == dtype, name
        if shape is not None:
            assert g[name].shape == shape, name
    assert g["pseudo"].chunks == (1, T, T)
    attrs = dict(g.attrs)
    assert attrs["method"] == "tiny" and attrs["iteration"] == 7 and attrs["params_hash"] == "abc"
    assert attrs["classes"] == CLASSES and attrs["palette"][1] == "#00ff00" and attrs["tile_size"] == T
    assert attrs["layers"] == list(expected) and attrs["num_tiles"] == n
    assert attrs["tiles"] == str(store.path)

    # content: the method's own output, the store's ground truth, connected components
    assert g["tile_id"][:].tolist() == UNLABELED
    images = torch.from_numpy(np.stack([store.image(i) for i in UNLABELED])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        conf, label = method.model(images).softmax(1).max(1)
    assert np.array_equal(g["pseudo"][:], label.numpy())
    assert np.allclose(g["conf"][:].astype(np.float32), conf.numpy(), atol=1e-3)
    assert np.array_equal(g["keep"][:], (conf >= 0.4).numpy())
    assert np.array_equal(g["gt"][:], np.stack([store.mask(i) for i in UNLABELED]))
    offsets, region_class = g["region_offsets"][:], g["region_class"][:]
    region_conf, region_pixels = g["region_conf"][:], g["region_pixels"][:]
    assert offsets[-1] == len(region_class) == len(region_conf) == len(region_pixels)
    for row in range(n):
        regions, pseudo = g["regions"][row], g["pseudo"][row]
        assert np.array_equal(regions, pseudo_regions(pseudo))
        ids = np.arange(1, offsets[row + 1] - offsets[row] + 1)
        assert regions.max() == len(ids)
        for i in ids:
            t = offsets[row] + i - 1
            assert region_class[t] == pseudo[regions == i][0]
            assert region_pixels[t] == (regions == i).sum()
            assert region_conf[t] == pytest.approx(conf[row].numpy()[regions == i].mean(), abs=1e-3)

    # the returned quality counts equal counts taken from the stored arrays
    direct = PseudoQuality(K)
    direct.update(g["pseudo"][:], g["keep"][:], g["gt"][:], g["regions"][:], conf=g["conf"][:])
    assert quality.metrics() == pytest.approx(direct.metrics(), nan_ok=True)
    # the curve is taken from the confidences as stored (float16), so the dump reproduces it exactly
    assert np.array_equal(quality.conf_valid, direct.conf_valid)
    assert np.array_equal(quality.conf_correct, direct.conf_correct)


def test_extra_layers_and_method_regions(store: TileStore, tmp_path: Path) -> None:
    out = tmp_path / "pseudo.zarr"
    write_dump(TinyMethod(extra=True, regions=True), store, UNLABELED, out, batch_size=2, device="cpu",
               progress=False)
    g = zarr.open_group(str(out), mode="r")
    assert g["extra/score"].shape == (5, T, T) and g["extra/score"].dtype == np.float32  # float64 -> float32
    assert g["extra/flags"].dtype == np.bool_
    assert np.allclose(g["extra/score"][:], 2 * g["conf"][:].astype(np.float32), atol=1e-2)
    assert g.attrs["layers"][-2:] == ["extra/flags", "extra/score"]
    assert g.attrs["regions"] == "method"
    regions = g["regions"][0]
    assert (regions[-1] == 0).all() and (regions[0, : T // 2] == 1).all() and (regions[0, T // 2 :] == 2).all()
    assert g["region_offsets"][:].tolist() == [0, 2, 4, 6, 8, 10]


def test_expanded_selection_is_scored_from_the_confident_layer(store: TileStore, tmp_path: Path) -> None:
    """`extra["confident"]` feeds the propagated_* metrics, in the dump's counts and in the counts
    `s4seg inspect` recomputes from the stored arrays."""
    out = tmp_path / "pseudo.zarr"
    quality = write_dump(TinyMethod(expand=True), store, UNLABELED, out, batch_size=2, device="cpu", progress=False)
    g = zarr.open_group(str(out), mode="r")
    confident, keep, gt = g["extra/confident"][:], g["keep"][:], g["gt"][:]
    added = keep & ~confident & (gt != 255)
    assert added.any() and (keep != confident).any()  # the method does expand
    m = quality.metrics()
    assert m["propagated_coverage"] == pytest.approx(added.sum() / (gt != 255).sum())
    assert m["propagated_accuracy"] == pytest.approx((g["pseudo"][:] == gt)[added].mean())
    prior = g["extra/prior_label"][:]
    relabelled = confident & (prior != g["pseudo"][:]) & (gt != 255)
    assert relabelled.any() and g["extra/prior_label"].dtype == np.uint8
    assert m["relabelled_coverage"] == pytest.approx(relabelled.sum() / (gt != 255).sum())
    assert m["relabelled_accuracy"] == pytest.approx((g["pseudo"][:] == gt)[relabelled].mean())
    assert m["relabelled_prior_accuracy"] == pytest.approx((prior == gt)[relabelled].mean())
    assert dump_quality(out).metrics() == pytest.approx(m, nan_ok=True)
    plain = write_dump(TinyMethod(), store, UNLABELED, tmp_path / "plain.zarr", batch_size=2, device="cpu",
                       progress=False)
    assert np.isnan(plain.metrics()["propagated_coverage"]) and np.isnan(plain.metrics()["relabelled_coverage"])


def test_bf16_dump_matches_fp32_within_bf16_rounding(store: TileStore, tmp_path: Path) -> None:
    """The dump runs under its runtime: a bf16 method output (conf, an extra layer) is stored like an fp32 one
    (NumPy has no bfloat16), and the confidences agree to bf16's rounding (8 bits: 1/256 near 1)."""
    fp32, bf16 = tmp_path / "fp32.zarr", tmp_path / "bf16.zarr"
    write_dump(TinyMethod(extra=True), store, UNLABELED, fp32, batch_size=2, device="cpu", progress=False)
    write_dump(TinyMethod(extra=True), store, UNLABELED, bf16, batch_size=2, device="cpu", precision="bf16",
               progress=False)
    a, b = zarr.open_group(str(fp32), mode="r"), zarr.open_group(str(bf16), mode="r")
    assert (a.attrs["precision"], b.attrs["precision"]) == ("fp32", "bf16")
    assert b["conf"].dtype == np.float16 and b["extra/score"].dtype == np.float32
    np.testing.assert_allclose(b["conf"][:].astype(np.float32), a["conf"][:].astype(np.float32), atol=1e-2)
    assert not np.array_equal(b["conf"][:], a["conf"][:])  # the model did run in bf16
    assert (b["pseudo"][:] == a["pseudo"][:]).mean() > 0.95


def test_interrupted_dump_keeps_previous_store(store: TileStore, tmp_path: Path) -> None:
    out = tmp_path / "pseudo.zarr"
    write_dump(TinyMethod(), store, UNLABELED[:2], out, batch_size=2, device="cpu", attrs={"iteration": 1},
               progress=False)
    with pytest.raises(RuntimeError, match="boom on purpose"):
        write_dump(TinyMethod(fail_on_batch=2), store, UNLABELED, out, batch_size=2, device="cpu",
                   attrs={"iteration": 2}, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pseudo.zarr"]  # no temporary left behind
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["iteration"] == 1 and g["pseudo"].shape[0] == 2
    # without a previous store, nothing appears at all
    fresh = tmp_path / "fresh.zarr"
    with pytest.raises(RuntimeError, match="boom on purpose"):
        write_dump(TinyMethod(fail_on_batch=2), store, UNLABELED, fresh, batch_size=2, device="cpu",
                   progress=False)
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pseudo.zarr"]


def test_inconsistent_extra_keys_fail(store: TileStore, tmp_path: Path) -> None:
    class Flaky(TinyMethod):
        def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
            out = super().pseudo_labels(images, valid)
            out.extra = {"a": out.conf} if self.calls == 1 else {}
            return out

    with pytest.raises(ValueError, match="extra keys changed between batches"):
        write_dump(Flaky(), store, UNLABELED, tmp_path / "p.zarr", batch_size=2, device="cpu", progress=False)
    assert not (tmp_path / "p.zarr").exists()


def test_params_hash_and_warmup_threshold() -> None:
    info = {"method": "fixmatch", "method_config": {"conf_thresh": 0.95}, "model_config": {"arch": "x"}, "step": 3}
    assert params_hash(info) == params_hash({**info, "step": 99})  # the step is not a param
    assert params_hash(info) != params_hash({**info, "method_config": {"conf_thresh": 0.9}})
    assert len(params_hash(info)) == 16
    assert warmup_threshold({"conf_thresh": 0.95}) == 0.95
    assert warmup_threshold({}) is None and warmup_threshold({"conf_thresh": True}) is None
    assert warmup_threshold(MethodConfig()) is None
