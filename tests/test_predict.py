"""`s4seg predict`: evaluate's sliding window on image files of any size, GeoTIFF in and out, bounded memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import s4seg
from s4seg.cli import main as cli_main
from s4seg.errors import DataError, ParamsError
from s4seg.evaluation.sliding import predict_scene, scene_probabilities
from s4seg.predict import (
    GEO_TAGS,
    NODATA_TAG,
    PredictOptions,
    Predictor,
    find_inputs,
    output_stems,
    predict_files,
)
from s4seg.runtime import make_runtime

K = 4
PALETTE = ["#8429F6", "#E2A929", "#3C1098", "#FEDD3A"]
WINDOW = 64
GEOTAGS = [  # a UTM zone 33N GeoTIFF: pixel scale, tie point, GeoKeys, their ASCII parameters, no-data
    (33550, 12, 3, (0.5, 0.5, 0.0), True),
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
    (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True),
    (34737, 2, 0, "WGS 84 / UTM zone 33N|", True),
]


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): smooth colour blobs plus noise, so that a model's classes vary across the scene."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 37.0
    base = np.stack([np.sin(yy + 2 * c) * np.cos(xx - c) for c in range(3)], axis=-1) * 100 + 128
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def stub_predict(images: torch.Tensor) -> torch.Tensor:
    """Logits from the colours plus a ramp across the window: overlapping windows disagree near their edges."""
    ramp = torch.linspace(-1, 1, images.shape[-1]).view(1, 1, 1, -1)
    return torch.cat([images[:, :1] * 4 + ramp, images[:, 1:2] * 4 - ramp, images[:, 2:3] * 4,
                      images.mean(dim=1, keepdim=True) * 3], dim=1)


STUB = Predictor(stub_predict, ["land", "water", "building", "road"], PALETTE)


def stub_loader(path: Path, device: torch.device) -> Predictor:
    return STUB


def write_geotiff(path: Path, image: np.ndarray, nodata: str | None = None, **kwargs) -> None:
    tags = GEOTAGS + ([(NODATA_TAG, 2, 0, nodata, True)] if nodata is not None else [])
    kwargs = {"tile": (32, 32), "compression": "zlib", "photometric": "rgb", **kwargs}
    tifffile.imwrite(path, image, extratags=tags, metadata=None, **kwargs)


def read(path: Path) -> np.ndarray:
    return tifffile.imread(path) if path.suffix == ".tif" else np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A real s4seg model artifact: UniMatch V2 (EMA teacher) on a small DeepLabV3+ (ResNet-18, 16 channels).

    The student is perturbed after the teacher was copied, so predicting with the student instead of
    the teacher (what the method's `predict` uses) would change the labels.
    """
    import s4seg.methods  # noqa: F401  (fills the method registry)
    from s4seg.config import ModelConfig, TrainConfig
    from s4seg.engine.checkpoint import model_artifact, save_torch_atomic
    from s4seg.engine.method import build_method
    from s4seg.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", weights=None, decoder_channels=16)
    model = build_model(cfg, K, load_pretrained=False)
    with torch.no_grad():
        model.classifier.weight.mul_(40)  # spread the logits: a random net otherwise predicts one class
    method = build_method("unimatch_v2", {}, model, K).eval()
    with torch.no_grad():
        method.model.classifier.weight.mul_(-1)
    path = tmp_path_factory.mktemp("model") / "student.pt"
    save_torch_atomic(model_artifact(method, model_cfg=cfg, classes=STUB.classes, palette=PALETTE, step=2,
                                     train_cfg=TrainConfig()), path)
    return path


def test_model_file_matches_evaluate_pixel_for_pixel(model_file, tmp_path):
    """PNG, JPEG and GeoTIFF inputs (one smaller than a window) through a model file give evaluate's labels."""
    from s4seg.engine.checkpoint import load_method

    images = {"a.png": scene(150, 230, 1), "b.jpg": scene(97, 140, 2), "tiny.png": scene(40, 50, 3)}
    for name, image in images.items():
        Image.fromarray(image).save(tmp_path / name, quality=95)
    write_geotiff(tmp_path / "c.tif", scene(120, 90, 4))
    out = tmp_path / "out"
    options = PredictOptions(window=WINDOW, overlap=0.5, batch_size=3, color=True)
    results = predict_files(model_file, [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "tiny.png",
                                         tmp_path / "c.tif"], out, options, device="cpu")

    method = load_method(model_file)
    runtime = make_runtime("cpu", "auto")  # evaluate's runtime with evaluate.precision = auto, as predict's default
    for result in results:
        image = np.asarray(Image.open(result.path).convert("RGB")) if result.path.suffix != ".tif" \
            else tifffile.imread(result.path)  # the decoded JPEG, not the array it was saved from
        expected = predict_scene(runtime.predictor(runtime.module(method).predict), image, WINDOW, 0.5, K, 3)
        np.testing.assert_array_equal(read(result.outputs["mask"]), expected)
        assert len(np.unique(expected)) > 1, "a one-class prediction would not test much"
        np.testing.assert_array_equal(read(result.outputs["color"]),
                                      np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in PALETTE],
                                               np.uint8)[expected])
        assert Image.open(result.outputs["preview"]).size == (image.shape[1], image.shape[0])
    names = {p.name for p in out.iterdir()}
    assert names == {f"{stem}.{kind}.{ext}" for stem, ext in [("a", "png"), ("b", "png"), ("tiny", "png"), ("c", "tif")]
                     for kind in ("mask", "conf", "color")} | {f"{s}.preview.png" for s in ("a", "b", "tiny", "c")}
    # The teacher predicts (unimatch_v2's `predict`), not the perturbed student.
    student = predict_scene(method.model, images["a.png"], WINDOW, 0.5, K, 3)
    assert (student != read(results[0].outputs["mask"])).mean() > 0.5


def test_geotiff_tags_come_back(tmp_path):
    """Every georeferencing tag of the input is in every TIFF output; masks declare their own no-data value."""
    write_geotiff(tmp_path / "ortho.tif", scene(70, 100), nodata="0")
    [result] = predict_files("stub", [tmp_path / "ortho.tif"], tmp_path / "out",
                             PredictOptions(window=WINDOW, color=True), "cpu", loader=stub_loader)
    expected = {code: value for code, _, _, value, _ in GEOTAGS}
    assert set(expected) <= set(GEO_TAGS)
    for kind, nodata in (("mask", "255"), ("conf", "0"), ("color", None)):
        with tifffile.TiffFile(result.outputs[kind]) as tif:
            tags = tif.pages[0].tags
            assert {code: tags[code].value for code in expected} == expected, kind
            assert (tags[NODATA_TAG].value if NODATA_TAG in tags else None) == nodata, kind
            assert tif.pages[0].is_tiled


def test_no_data_and_alpha_become_ignore(tmp_path):
    image = scene(60, 80)
    image[:10] = 0  # GDAL_NODATA 0 in every band
    write_geotiff(tmp_path / "nodata.tif", image, nodata="0")
    rgba = np.dstack([scene(60, 80), np.full((60, 80), 255, np.uint8)])
    rgba[:, :7, 3] = 0  # transparent columns
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    results = predict_files("stub", [tmp_path / "nodata.tif", tmp_path / "alpha.png"], tmp_path / "out",
                            PredictOptions(window=WINDOW), "cpu", loader=stub_loader)
    for result, hole in zip(results, (np.s_[:10], np.s_[:, :7]), strict=True):
        mask, conf = read(result.outputs["mask"]), read(result.outputs["conf"])
        assert (mask[hole] == 255).all() and (conf[hole] == 0).all()
        outside = np.ones_like(mask, bool)
        outside[hole] = False
        assert (mask[outside] < K).all() and (conf[outside] > 0).all()


@pytest.mark.parametrize(
    "layout",
    [{"tile": (32, 32)}, {"tile": None, "rowsperstrip": 7}, {"planarconfig": "separate", "tile": None}],
    ids=["tiled", "striped", "planar"],
)
def test_streaming_equals_in_memory(tmp_path, layout):
    """Any TIFF layout, read chunk-row by chunk-row with outputs spooled to disk, gives the in-memory result."""
    image = scene(333, 150)
    data = np.moveaxis(image, -1, 0) if layout.get("planarconfig") == "separate" else image
    write_geotiff(tmp_path / "s.tif", data, **layout)
    outputs = {}
    for name, budget in (("memory", 4096), ("stream", 1e-6)):
        [result] = predict_files("stub", [tmp_path / "s.tif"], tmp_path / name,
                                 PredictOptions(window=WINDOW, batch_size=5, max_memory_mb=budget, color=True),
                                 "cpu", loader=stub_loader)
        assert result.streamed == (name == "stream")
        outputs[name] = {kind: read(path) for kind, path in result.outputs.items()}
    for kind, array in outputs["memory"].items():
        np.testing.assert_array_equal(outputs["stream"][kind], array, err_msg=kind)
    probs = scene_probabilities(stub_predict, image, WINDOW, PredictOptions().overlap, K, 5)
    np.testing.assert_array_equal(outputs["stream"]["mask"], probs.argmax(dim=0).numpy())
    np.testing.assert_array_equal(outputs["stream"]["conf"], probs.amax(dim=0).mul(255).round().byte().numpy())
    assert not [p for p in (tmp_path / "stream").iterdir() if p.name.startswith(".")]  # spool removed


RSS_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    sys.path.insert(0, sys.argv[4])
    from test_predict import STUB
    from s4seg.predict import PredictOptions, predict_files

    torch.set_num_threads(1)
    big, small, out = sys.argv[1:4]
    options = PredictOptions(window=128, max_memory_mb=1e-3, color=True)  # both scenes stream
    predict_files("stub", [small], out + "/warm", options, "cpu", loader=lambda p, d: STUB)  # imports, code paths
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    [result] = predict_files("stub", [big], out + "/big", options, "cpu", loader=lambda p, d: STUB)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (after - before) / 1024, "streamed": result.streamed}))
""")


def test_large_scene_streams_in_bounded_memory(tmp_path):
    """A 9-Mpx scene (1000 x 9000) streams with a peak-RSS growth below what holding it would take, and
    gives the in-memory result. Memory of the sweep grows with the width, never with the height."""
    h, w = 9000, 1000
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(yy * 7 + xx) % 256, (xx * 3) % 256, (yy // 5) % 256], axis=-1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", image, tile=(256, 256), compression="zlib", photometric="rgb",
                     metadata=None)
    tifffile.imwrite(tmp_path / "small.tif", image[:300, :300], tile=(256, 256), photometric="rgb", metadata=None)
    whole_mb = h * w * (3 + 1 + 1 + 3) / 2**20  # image, mask, confidence and colour mask held at once: 69 MB
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(s4seg.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "big.tif"), str(tmp_path / "small.tif"),
                            str(tmp_path / "out"), str(Path(__file__).parent)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["streamed"]
    assert report["growth_mb"] < 0.6 * whole_mb, report  # measured: ~30 MB streamed, ~70 MB in memory

    expected = predict_scene(stub_predict, image, 128, PredictOptions().overlap, K, PredictOptions().batch_size)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "big" / "big.mask.tif"), expected)


# --------------------------------------------------------------------------------------------------
# Inputs, outputs and errors
# --------------------------------------------------------------------------------------------------
def test_inputs_from_files_folders_and_globs(tmp_path):
    for part in ("Tile 1/images", "Tile 2/images"):
        (tmp_path / part).mkdir(parents=True)
        for name in ("image_part_001.jpg", "image_part_002.jpg", "notes.txt", "image_part_001.mask.png"):
            (tmp_path / part / name).write_bytes(b"")
    one = tmp_path / "Tile 1/images/image_part_001.jpg"
    found = find_inputs([one, tmp_path / "Tile 1/images", str(tmp_path / "Tile */images/*_002.jpg")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "Tile 1/images/image_part_001.jpg", "Tile 1/images/image_part_002.jpg", "Tile 2/images/image_part_002.jpg"]
    stems = output_stems(found, tmp_path / "out")  # same names in different folders stay apart
    assert [s.relative_to(tmp_path / "out").as_posix() for s in stems] == [
        "Tile 1/images/image_part_001", "Tile 1/images/image_part_002", "Tile 2/images/image_part_002"]
    with pytest.raises(DataError, match=r"missing\.png: no such image file, folder or glob match"):
        find_inputs([tmp_path / "missing.png"])
    with pytest.raises(DataError, match=r"nothing\*\.tif: matches no JPEG, PNG or TIFF image"):
        find_inputs([str(tmp_path / "nothing*.tif")])


def bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the message expected for it)."""
    (folder / "text.png").write_text("not an image")
    (folder / "broken.tif").write_bytes(b"II*\x00garbage")
    Image.fromarray(scene(20, 20)[..., 0]).save(folder / "grey.png")
    tifffile.imwrite(folder / "rgbn.tif", np.zeros((20, 20, 4), np.uint8), photometric="rgb", extrasamples=[0],
                     metadata=None)
    tifffile.imwrite(folder / "deep.tif", np.zeros((20, 20, 3), np.uint16), photometric="rgb", metadata=None)
    return {
        "text": (folder / "text.png", r"text\.png: cannot read the image \(UnidentifiedImageError"),
        "broken": (folder / "broken.tif", r"broken\.tif: cannot read the TIFF"),
        "grey": (folder / "grey.png", r"grey\.png: found 1 band; the model expects 3 \(RGB"),
        "rgbn": (folder / "rgbn.tif", r"rgbn\.tif: found 4 bands; the model expects 3 \(RGB, optionally with an alpha"),
        "deep": (folder / "deep.tif", r"deep\.tif: found uint16 samples; expected 8-bit \(uint8\) RGB"),
    }


@pytest.mark.parametrize("name", ["text", "broken", "grey", "rgbn", "deep"])
def test_bad_image_is_one_line_naming_it(tmp_path, name):
    path, message = bad_inputs(tmp_path)[name]
    good = tmp_path / "good.png"
    Image.fromarray(scene(30, 30)).save(good)
    with pytest.raises(DataError, match=message):  # checked before any image is predicted
        predict_files("stub", [good, path], tmp_path / "out", PredictOptions(window=WINDOW), "cpu",
                      loader=stub_loader)
    assert not (tmp_path / "out").exists()


def test_cli_bad_inputs_exit_2_with_one_line(model_file, tmp_path, capsys):
    cases = bad_inputs(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module: torch.load's error spans many lines
    good = tmp_path / "good.png"
    Image.fromarray(scene(30, 30)).save(good)
    out = tmp_path / "out"
    runs = [([str(cases["grey"][0])], str(model_file), cases["grey"][1]),
            ([str(good)], str(garbage), r"garbage\.pt: cannot read the model file"),
            ([str(good)], str(foreign), r"foreign\.pt: not an s4seg model file \(format None"),
            ([str(good)], str(pickled), r"pickled\.pt: cannot read the model file \(UnpicklingError: .*\); expected"),
            ([str(good)], str(tmp_path / "absent.pt"), r"absent\.pt: model file not found")]
    for inputs, model, message in runs:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["predict", "--model", model, *inputs, "-o", str(out), "--device", "cpu"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert re.search(message, err[0]), err[0]
    assert not out.exists() or not any(out.iterdir())


def test_cli_writes_outputs(model_file, tmp_path, capsys):
    Image.fromarray(scene(50, 70)).save(tmp_path / "x.png")
    cli_main(["predict", "--model", str(model_file), str(tmp_path / "x.png"), "-o", str(tmp_path / "out"),
              "--window", "32", "--overlap", "0.25", "--batch", "2", "--device", "cpu"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "x.mask.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.conf.png", "x.mask.png", "x.preview.png"]


def test_failure_leaves_no_partial_output(tmp_path):
    """A model that fails halfway through a streamed scene: no output file, no spool, of that scene."""
    write_geotiff(tmp_path / "s.tif", scene(300, 100))
    calls = []

    def failing(images: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("device lost")
        return stub_predict(images)

    for budget in (1e-6, 4096):
        calls.clear()
        with pytest.raises(RuntimeError, match="device lost"):
            predict_files("stub", [tmp_path / "s.tif"], tmp_path / "out",
                          PredictOptions(window=WINDOW, batch_size=2, max_memory_mb=budget), "cpu",
                          loader=lambda p, d: Predictor(failing, STUB.classes, PALETTE))
        assert list((tmp_path / "out").iterdir()) == []


def test_option_errors(tmp_path):
    for name in ("a.png", "a.mask.png"):
        Image.fromarray(scene(30, 30)).save(tmp_path / name)
    with pytest.raises(ParamsError, match=r"--window 0: expected a positive number of pixels"):
        PredictOptions(window=0)
    with pytest.raises(ParamsError, match=r"--overlap 1.0: expected a fraction in \[0, 1\)"):
        PredictOptions(overlap=1.0)
    with pytest.raises(ParamsError, match=r"--device 'tpu': expected auto, cpu, cuda or cuda:N"):
        predict_files("stub", [tmp_path / "a.png"], tmp_path / "out", device="tpu", loader=stub_loader)
    with pytest.raises(DataError, match=r"a\.mask\.png: an input would be overwritten by an output"):
        predict_files("stub", [tmp_path / "a.png", tmp_path / "a.mask.png"], tmp_path, loader=stub_loader)
