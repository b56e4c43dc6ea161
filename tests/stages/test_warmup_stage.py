"""`stages/warmup.py` (and `stages/train.py` after it) on a tiny tile store built in tmp_path."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from s4seg.cli import run_stage
from s4seg.engine.checkpoint import load_method

REPO = Path(__file__).resolve().parents[2]
TILE = 32


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, toy_tiles) -> Path:
    work = tmp_path_factory.mktemp("stage")
    toy_tiles(work, TILE)
    schedule = {"batch_size": 2, "crop": 24, "checkpoint_every": 1, "log_every": 1, "device": "cpu"}
    params = {
        "seed": 0,
        "model": {"arch": "deeplabv3plus", "encoder": "resnet18", "weights": None},
        "warmup": {**schedule, "epochs": 2},
        "method": "fixmatch",
        "train": {**schedule, "iterations": 2, "snapshot_every": 1, "snapshot_tiles": 2},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def _warmup_args(work: Path) -> list[str]:
    return ["--params", str(work / "params.yaml"), "--tiles", str(work / "tiles.zarr"), "--split",
            str(work / "split.parquet"), "--out", str(work / "models" / "warmup.pt"), "--log",
            str(work / "logs" / "warmup.csv"), "--checkpoints", str(work / "checkpoints" / "warmup")]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_warmup_stage_trains_and_reruns_resume(workdir):
    warmup = _stage("warmup")
    warmup.main(_warmup_args(workdir))
    method = load_method(workdir / "models" / "warmup.pt")
    assert method.name == "supervised"
    art = torch.load(workdir / "models" / "warmup.pt", weights_only=True)
    assert art["step"] == 2  # 2 labeled tiles, batch 2 -> 1 step per epoch, 2 epochs
    assert art["model_config"]["encoder"] == "resnet18" and art["classes"] == ["r", "g", "b"]
    logits = method.predict(torch.rand(1, 3, TILE, TILE))
    assert logits.shape == (1, 3, TILE, TILE) and torch.isfinite(logits).all()
    rows = _rows(workdir / "logs" / "warmup.csv")
    assert [r["step"] for r in rows] == ["1", "2"] and all(np.isfinite(float(r["loss_x"])) for r in rows)
    # a finished run leaves no resume point: a second run (`dvc repro -f`) trains again, to the same result
    assert not list((workdir / "checkpoints" / "warmup").glob("*.pt"))
    first = torch.load(workdir / "models" / "warmup.pt", weights_only=True)["state_dict"]
    warmup.main(_warmup_args(workdir))
    again = torch.load(workdir / "models" / "warmup.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert len(_rows(workdir / "logs" / "warmup.csv")) == 2


def test_train_stage_runs_method_from_warmup(workdir):
    if not (workdir / "models" / "warmup.pt").exists():
        _stage("warmup").main(_warmup_args(workdir))
    train = _stage("train")
    train.main(["--params", str(workdir / "params.yaml"), "--tiles", str(workdir / "tiles.zarr"), "--split",
                str(workdir / "split.parquet"), "--init", str(workdir / "models" / "warmup.pt"), "--out",
                str(workdir / "models" / "student.pt"), "--log", str(workdir / "logs" / "train.csv"),
                "--checkpoints", str(workdir / "checkpoints" / "train"), "--snapshots",
                str(workdir / "dumps" / "snapshots.zarr")])
    student = load_method(workdir / "models" / "student.pt")
    assert student.name == "fixmatch"
    assert torch.load(workdir / "models" / "student.pt", weights_only=True)["step"] == 2
    rows = _rows(workdir / "logs" / "train.csv")
    assert len(rows) == 2 and "pseudo_kept_share" in rows[0] and "loss_x" in rows[0]
    snaps = zarr.open_group(str(workdir / "dumps" / "snapshots.zarr"), mode="r")
    assert list(np.asarray(snaps["steps"][:])) == [0, 1, 2]


def test_bad_input_is_one_line_and_exit_2(workdir, capsys):
    args = _warmup_args(workdir)
    args[args.index("--tiles") + 1] = str(workdir / "missing.zarr")
    with pytest.raises(SystemExit) as exc:
        run_stage(_stage("warmup").main, args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.zarr: tile store not found" in err and "\n" not in err
