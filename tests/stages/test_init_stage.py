"""`train.init: pretrained`: the `init` stage, the train stage starting from it, and the dvc.yaml wiring."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from s4seg.engine.checkpoint import load_method
from s4seg.errors import CheckpointError
from s4seg.models import build_encoder

REPO = Path(__file__).resolve().parents[2]
TILE = 32


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_params(work: Path, method: str, init: str) -> Path:
    schedule = {"batch_size": 2, "crop": 24, "checkpoint_every": 1, "log_every": 1, "device": "cpu"}
    params = {
        "seed": 0,
        # a local encoder file stands in for the ImageNet weights
        "model": {"arch": "deeplabv3plus", "encoder": "resnet18", "weights": str(work / "encoder.pth")},
        "warmup": {**schedule, "iterations": 2},
        "method": method,
        "train": {**schedule, "iterations": 2, "init": init},
    }
    path = work / f"params_{method}_{init}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, toy_tiles) -> Path:
    work = tmp_path_factory.mktemp("init")
    toy_tiles(work, TILE)
    torch.manual_seed(123)  # not the stages' seed: the file's weights differ from any init they draw
    torch.save(build_encoder("resnet18").state_dict(), work / "encoder.pth")

    params = _write_params(work, "fixmatch", "pretrained")
    _stage("init").main(["--params", str(params), "--tiles", str(work / "tiles.zarr"),
                         "--out", str(work / "models" / "pretrained.pt")])
    _stage("warmup").main(["--params", str(params), "--tiles", str(work / "tiles.zarr"), "--split",
                           str(work / "split.parquet"), "--out", str(work / "models" / "warmup.pt"), "--log",
                           str(work / "logs" / "warmup.csv"), "--checkpoints", str(work / "checkpoints" / "warmup")])
    return work


def _model_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def _train_args(work: Path, params: Path, init: str) -> list[str]:
    return ["--params", str(params), "--tiles", str(work / "tiles.zarr"), "--split", str(work / "split.parquet"),
            "--init", str(work / "models" / f"{init}.pt"), "--out", str(work / "models" / "student.pt"),
            "--log", str(work / "logs" / "train.csv"), "--checkpoints", str(work / "checkpoints" / "train"),
            "--snapshots", str(work / "dumps" / "snapshots.zarr")]


def test_init_stage_writes_the_untrained_pretrained_model(workdir):
    art = torch.load(workdir / "models" / "pretrained.pt", weights_only=True)
    assert art["step"] == 0 and art["method"] == "supervised" and art["classes"] == ["r", "g", "b"]
    encoder_file = torch.load(workdir / "encoder.pth", weights_only=True)
    weights = _model_weights(workdir / "models" / "pretrained.pt")
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    assert backbone.keys() == encoder_file.keys()
    assert all(torch.equal(backbone[k], encoder_file[k]) for k in backbone)
    # the warmup's own step 0: the same seed draws the same decoder
    from s4seg.config import ModelConfig
    from s4seg.models import build_model

    torch.manual_seed(0)
    fresh = build_model(ModelConfig(encoder="resnet18", weights=str(workdir / "encoder.pth")), 3).state_dict()
    assert fresh.keys() == weights.keys() and all(torch.equal(fresh[k], weights[k]) for k in fresh)
    method = load_method(workdir / "models" / "pretrained.pt")
    assert method.predict(torch.rand(1, 3, TILE, TILE)).shape == (1, 3, TILE, TILE)


@pytest.mark.parametrize("method_name", ["fixmatch", "unimatch_v2"])  # unimatch_v2: the EMA teacher too
def test_train_with_pretrained_starts_from_pretrained_not_warmup(workdir, monkeypatch, method_name):
    train = _stage("train")
    real_fit = train.fit
    before: dict[str, dict[str, torch.Tensor]] = {}

    def capture_then_fit(method, *args, **kwargs):
        # the state the method holds before its step 0
        before["model"] = {k: v.clone() for k, v in method.model.state_dict().items()}
        if method.teacher() is not None:
            before["teacher"] = {k: v.clone() for k, v in method.teacher().state_dict().items()}
        return real_fit(method, *args, **kwargs) if method_name == "fixmatch" else None

    monkeypatch.setattr(train, "fit", capture_then_fit)
    params = _write_params(workdir, method_name, "pretrained")
    train.main(_train_args(workdir, params, "pretrained"))

    pretrained = _model_weights(workdir / "models" / "pretrained.pt")
    warmup = _model_weights(workdir / "models" / "warmup.pt")
    for net in ["model"] + (["teacher"] if method_name == "unimatch_v2" else []):
        state = before[net]
        assert state.keys() == pretrained.keys()
        assert all(torch.equal(state[k], pretrained[k]) for k in state), net
        encoder = [k for k in state if k.startswith("backbone.") and state[k].is_floating_point()]
        assert encoder and any(not torch.equal(state[k], warmup[k]) for k in encoder), net
    if method_name == "fixmatch":  # the run itself went through
        student = torch.load(workdir / "models" / "student.pt", weights_only=True)
        assert student["step"] == 2 and student["train_config"]["init"] == "pretrained"


def test_train_rejects_an_init_file_that_contradicts_train_init(workdir):
    train = _stage("train")
    with pytest.raises(CheckpointError, match=r"warmup.pt: a model saved at step 2, but train.init is 'pretrained'"):
        train.main(_train_args(workdir, _write_params(workdir, "fixmatch", "pretrained"), "warmup"))
    with pytest.raises(CheckpointError, match=r"pretrained.pt: a model saved at step 0, but train.init is 'warmup'"):
        train.main(_train_args(workdir, _write_params(workdir, "fixmatch", "warmup"), "pretrained"))


@pytest.mark.parametrize(("init", "other"), [("pretrained", "warmup"), ("warmup", "pretrained")])
def test_dvc_yaml_train_depends_on_the_chosen_init_only(tmp_path, init, other):
    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["init"] = init
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    Repo.init(str(tmp_path), no_scm=True)
    stages = {stage.name: stage for stage in Repo(str(tmp_path)).index.stages}
    deps = {name: {str(d.def_path) for d in stage.deps} for name, stage in stages.items()}
    assert f"models/{init}.pt" in deps["train"] and f"models/{other}.pt" not in deps["train"]
    assert f"--init models/{init}.pt" in stages["train"].cmd
    assert {str(o.def_path) for o in stages["init"].outs} == {"models/pretrained.pt"}
    assert not any(d.startswith("models/") for d in deps["init"])
    # the warmup stays the labeled-only reference of dump and evaluate, whatever train starts from
    assert "models/warmup.pt" in deps["evaluate"] and "models/warmup.pt" in deps["dump"]
