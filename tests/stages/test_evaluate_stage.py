"""The evaluate stage on a tiny tile store with test-double models whose scores are known by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr

from s4seg.data.store import TileStoreWriter
from s4seg.errors import CheckpointError, ParamsError

REPO = Path(__file__).resolve().parents[2]
T, K = 16, 4
CLASSES = ["road", "tree", "water", "car"]  # "car" never occurs in the test scenes


def _load_stage():
    spec = importlib.util.spec_from_file_location("evaluate_stage", REPO / "stages" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


stage = _load_stage()


def oracle(images: torch.Tensor) -> torch.Tensor:
    """Reads the label hidden in channel 0 of the image: a perfect model."""
    label = (images[:, 0] * 255).round().long()
    return torch.nn.functional.one_hot(label, K).permute(0, 3, 1, 2).float() * 5


def constant_zero(images: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(images.shape[0], K, *images.shape[2:])
    logits[:, 0] = 1.0
    return logits


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Two 32x48 test scenes (tiles 16, stride 16) and one training scene; classes 0-2 and 255 in test."""
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    writer = TileStoreWriter(root / "tiles.zarr", dataset="toy", classes=CLASSES,
                             palette=["#808080", "#00ff00", "#0000ff", "#ff0000"], tile_size=T, stride=T)
    rows = []
    for s, (name, role) in enumerate([("train0", "labeled"), ("test0", "test"), ("test1", "test")]):
        mask = rng.choice([0, 1, 2, 255], size=(32, 48), p=[0.4, 0.3, 0.2, 0.1]).astype(np.uint8)
        truth = np.where(mask == 255, rng.integers(0, 3, size=mask.shape), mask).astype(np.uint8)
        image = np.stack([truth, rng.integers(0, 256, mask.shape), np.full(mask.shape, 9)], -1).astype(np.uint8)
        offsets = np.array([(y, x) for y in (0, 16) for x in (0, 16, 32)], dtype=np.int32)
        tiles = np.stack([image[y : y + T, x : x + T] for y, x in offsets])
        masks = np.stack([mask[y : y + T, x : x + T] for y, x in offsets])
        writer.add_scene(name, tiles, masks, offsets, 32, 48)
        rows += [{"id": 6 * s + i, "scene": name, "x": int(x), "y": int(y), "role": role, "ratio": 0.5, "seed": 0}
                 for i, (y, x) in enumerate(offsets)]
    writer.close()
    pd.DataFrame(rows).to_parquet(root / "split.parquet")
    # fp32: test_real_model_file compares labels with an fp32 forward pass (bf16: tests/test_runtime.py)
    evaluate = {"batch_size": 4, "window": T, "overlap": 0.5, "precision": "fp32"}
    (root / "params.yaml").write_text(yaml.safe_dump({"evaluate": evaluate}))
    for name in ("warmup.pt", "student.pt"):
        (root / name).write_bytes(b"test double")
    return root


def argv(root: Path, *models: str) -> list[str]:
    out = ["--params", str(root / "params.yaml"), "--tiles", str(root / "tiles.zarr"),
           "--split", str(root / "split.parquet"), "--table", str(root / "metrics" / "eval.parquet"),
           "--summary", str(root / "metrics" / "summary.json"), "--device", "cpu"]
    for m in models:
        out += ["--model", m]
    return out


def fake_loader(path: Path, device: torch.device):
    return (oracle if path.name == "student.pt" else constant_zero), K


@pytest.fixture(scope="module")
def evaluated(workdir) -> dict:
    return stage.main(argv(workdir, f"warmup={workdir / 'warmup.pt'}", f"student={workdir / 'student.pt'}"),
                      loader=fake_loader)


def test_summary_matches_hand_computed_scores(workdir, evaluated):
    masks = np.asarray(zarr.open_group(str(workdir / "tiles.zarr"), mode="r")["masks"][6:])
    valid = masks != 255
    zero_iou = (masks == 0).sum() / valid.sum()  # the constant-0 model: IoU_0 = n_0 / all; classes 1, 2: 0
    summary = json.loads((workdir / "metrics" / "summary.json").read_text())
    assert summary == evaluated
    assert summary["student.miou"] == pytest.approx(1.0) and summary["student.oa"] == pytest.approx(1.0)
    assert summary["warmup.miou"] == pytest.approx(zero_iou / 3)  # "car" is absent: excluded from the mean
    assert summary["warmup.oa"] == pytest.approx(zero_iou)
    assert summary["warmup.scene_miou"] == pytest.approx(zero_iou / 3)  # the scenes are exactly the tiles
    assert summary["student.scene_miou"] == pytest.approx(1.0)
    assert summary["gain.miou"] == pytest.approx(1.0 - zero_iou / 3)
    assert summary["gain.scene_oa"] == pytest.approx(1.0 - zero_iou)


def test_table_long_format(workdir, evaluated):
    table = pd.read_parquet(workdir / "metrics" / "eval.parquet")
    assert list(table.columns) == ["model", "scope", "scene", "tile", "class", "metric", "value"]
    assert set(table["scope"]) == {"dataset", "scene", "tile"}
    warm = table[(table["model"] == "warmup") & (table["scope"] == "dataset")].set_index(["class", "metric"])["value"]
    assert np.isnan(warm[("car", "iou")]) and warm[("tree", "iou")] == 0.0
    assert warm[("all", "pixels")] == warm[[(c, "pixels") for c in CLASSES]].sum()
    scenes = table[(table["scope"] == "scene") & (table["model"] == "student")]
    assert set(scenes["scene"]) == {"test0", "test1", ""}
    tiles = table[(table["scope"] == "tile") & (table["model"] == "warmup") & (table["metric"] == "miou")]
    assert sorted(tiles["tile"]) == list(range(6, 18)) and set(tiles["scene"]) == {"test0", "test1"}


def test_predictions_zarr_plain_readable(workdir, evaluated):
    group = zarr.open_group(str(workdir / "metrics" / "predictions.zarr"), mode="r")
    ids = np.asarray(group["ids"][:])
    np.testing.assert_array_equal(ids, np.arange(6, 18))
    images = np.asarray(zarr.open_group(str(workdir / "tiles.zarr"), mode="r")["images"][6:])
    np.testing.assert_array_equal(group["student"][:], images[..., 0])
    assert group["warmup"].dtype == np.uint8 and not group["warmup"][:].any()
    assert group.attrs["classes"] == CLASSES and group.attrs["models"] == ["warmup", "student"]
    # test doubles carry no training precision; the report shows "unrecorded" for them
    assert group.attrs["precision"] == {"evaluate": "fp32", "trained": {"warmup": None, "student": None}}


def test_missing_model_file_is_an_error_only_if_passed(workdir, tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: model file for --model student not found"):
        stage.main(argv(workdir, f"student={tmp_path / 'nope.pt'}"), loader=fake_loader)
    # warmup alone: fine, no gain keys
    args = argv(workdir, f"warmup={workdir / 'warmup.pt'}")
    args[args.index("--summary") + 1] = str(tmp_path / "summary.json")
    args[args.index("--table") + 1] = str(tmp_path / "eval.parquet")
    summary = stage.main(args, loader=fake_loader)
    assert "warmup.miou" in summary and not any(k.startswith("gain.") for k in summary)
    assert (tmp_path / "predictions.zarr").is_dir()


def test_bad_arguments(workdir):
    with pytest.raises(ParamsError, match="expected NAME=PATH"):
        stage.main(argv(workdir, "models/warmup.pt"), loader=fake_loader)
    with pytest.raises(ParamsError, match="given twice"):
        stage.main(argv(workdir, "a=x.pt", "a=y.pt"), loader=fake_loader)
    with pytest.raises(CheckpointError, match="model predicts 3 classes but .* has 4"):
        stage.main(argv(workdir, f"warmup={workdir / 'warmup.pt'}"), loader=lambda p, d: (constant_zero, 3))


def test_real_model_file(workdir, tmp_path):
    """The engine's model format, loaded by the stage's default loader: tile labels = argmax of predict."""
    import s4seg.methods  # noqa: F401  (fills the method registry)
    from s4seg.config import ModelConfig, TrainConfig
    from s4seg.engine.checkpoint import model_artifact, save_torch_atomic
    from s4seg.engine.method import build_method
    from s4seg.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", weights=None)
    method = build_method("fixmatch", {}, build_model(cfg, K, load_pretrained=False), K).eval()
    save_torch_atomic(model_artifact(method, model_cfg=cfg, classes=CLASSES, palette=["#000000"] * K, step=3,
                                     train_cfg=TrainConfig(), precision="bf16"), tmp_path / "real.pt")
    args = argv(workdir, f"student={tmp_path / 'real.pt'}")
    args[args.index("--table") + 1] = str(tmp_path / "eval.parquet")
    args[args.index("--summary") + 1] = str(tmp_path / "summary.json")
    summary = stage.main(args)
    assert 0.0 <= summary["student.miou"] <= 1.0 and 0.0 <= summary["student.scene_oa"] <= 1.0
    group = zarr.open_group(str(tmp_path / "predictions.zarr"), mode="r")
    assert group.attrs["precision"] == {"evaluate": "fp32", "trained": {"student": "bf16"}}  # from the model file
    images = np.asarray(zarr.open_group(str(workdir / "tiles.zarr"), mode="r")["images"][6:9])
    with torch.no_grad():
        expected = method.predict(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(1)
    np.testing.assert_array_equal(group["student"][:3], expected.numpy())


def test_device_and_params_validation(workdir, tmp_path):
    with pytest.raises(ParamsError, match="evaluate.device: expected auto, cpu or cuda, found 'tpu'"):
        stage.resolve_device("tpu")
    assert stage.resolve_device("cpu") == torch.device("cpu")
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"evaluate": {"overlap": 1.0}}))
    args = argv(workdir, f"warmup={workdir / 'warmup.pt'}")
    args[args.index("--params") + 1] = str(bad)
    with pytest.raises(ParamsError, match=r"evaluate: overlap = 1.0: expected a fraction in \[0, 1\)"):
        stage.main(args, loader=fake_loader)
