"""End to end: the whole `dvc repro` on tiny params, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from s4seg.config import Params, to_dict

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# The test's own params: the defaults of s4seg.config plus these, never the workspace's params.yaml
# (which `dvc exp run -S` rewrites).
TINY = {
    "method": "fixmatch",
    "methods": {"fixmatch": {}, "unimatch_v2": {}},
    "dataset": {"name": "synthetic", "root": "data/raw", "num_scenes": 3, "scene_size": 160},
    "tiling": {"tile_size": 64, "stride": 64},
    "split": {"labeled": 0.5},
    "model": {"encoder": "resnet18", "weights": None},
    "warmup": {"iterations": 3, "batch_size": 2, "crop": 48, "checkpoint_every": 2, "log_every": 1},
    "train": {"iterations": 10, "batch_size": 2, "crop": 48, "checkpoint_every": 2, "log_every": 3,
              "snapshot_every": 2, "snapshot_tiles": 2},
    "evaluate": {"batch_size": 4, "window": 64},
    "report": {"num_tiles": 2},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) and v else v
    return out


def _env(work: Path) -> dict[str, str]:
    # the copy's own sources run (not those the editable install points to), as in a user's checkout
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(work / "src")}


def _run(cmd: list[str], cwd: Path) -> str:
    env = _env(cwd)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "stages", work / "stages")
    shutil.copytree(REPO / "baselines", work / "baselines")  # a dependency of report (report.baseline files)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(REPO / "data" / "raw", work / "data" / "raw")
    params = _merge(to_dict(Params()), TINY)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], work)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], work)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], work)
    _run([str(BIN / "dvc"), "repro"], work)
    return work


@pytest.mark.slow
def test_repro_builds_every_artifact(pipeline: Path) -> None:
    for rel in ("data/tiles.zarr", "data/split.parquet", "models/warmup.pt", "models/student.pt",
                "dumps/pseudo.zarr", "dumps/snapshots.zarr", "metrics/eval.parquet", "metrics/pseudo.parquet",
                "reports/report.md", "reports/report.html", "logs/warmup.csv", "logs/train.csv"):
        assert (pipeline / rel).exists(), rel
    summary = json.loads((pipeline / "metrics/summary.json").read_text())
    for key in ("warmup.miou", "student.miou", "gain.miou"):
        assert isinstance(summary.get(key), float), (key, summary)
    assert abs(summary["gain.miou"] - (summary["student.miou"] - summary["warmup.miou"])) < 1e-6
    assert (pipeline / "metrics/pseudo.json").is_file()
    assert list((pipeline / "reports/figures").glob("*.png"))


def _changed_stages(pipeline: Path) -> set[str]:
    out = _run([str(BIN / "dvc"), "status"], pipeline)
    return {line.rstrip().rstrip(":") for line in out.splitlines()
            if line.rstrip().endswith(":") and not line.startswith((" ", "\t"))}


def _set_param(pipeline: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params[section][key] = value
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_raw_data_folder_is_a_dependency_of_tile(pipeline: Path) -> None:
    extra = pipeline / "data" / "raw" / "new_scene.txt"
    extra.write_text("a new raw file")
    try:
        assert "tile" in _changed_stages(pipeline)
    finally:
        extra.unlink()
    assert "tile" not in _changed_stages(pipeline)


@pytest.mark.slow
def test_second_repro_changes_nothing_and_eval_param_reruns_only_tail(pipeline: Path) -> None:
    out = _run([str(BIN / "dvc"), "status"], pipeline)
    assert "up to date" in out, out
    _set_param(pipeline, "dump", "min_region_pixels", 3)
    assert _changed_stages(pipeline) == {"dump"}  # report follows through its deps once dump has run
    _set_param(pipeline, "dump", "min_region_pixels", 1)
    _set_param(pipeline, "evaluate", "overlap", 0.5)
    assert _changed_stages(pipeline) == {"evaluate"}
    out = _run([str(BIN / "dvc"), "repro"], pipeline)
    for stage in ("tile", "warmup", "train", "dump"):
        assert f"Stage '{stage}' didn't change" in out, out
    assert "Running stage 'evaluate'" in out and "Running stage 'report'" in out


def _kill_stage_at_checkpoint(pipeline: Path, stage: str, min_step: int, *repro_args: str) -> int:
    """`dvc repro <repro_args>`, then SIGKILL of the stage's own process (as `kill -9` of stages/<stage>.py)
    once it has written a checkpoint of step >= min_step. Returns that step."""
    import psutil

    dvc = subprocess.Popen([str(BIN / "dvc"), "repro", *repro_args], cwd=pipeline, env=_env(pipeline),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = pipeline / "checkpoints" / stage / "last.pt"
    deadline = time.time() + 300
    step = None
    while time.time() < deadline and dvc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= min_step:
            step = torch.load(ckpt, weights_only=False)["step"]
            for child in psutil.Process(dvc.pid).children(recursive=True):
                if f"stages/{stage}.py" in " ".join(child.cmdline()):
                    child.kill()
            break
        time.sleep(0.02)
    out, _ = dvc.communicate(timeout=120)
    assert step is not None, f"no checkpoint of step >= {min_step} appeared before the stage ended:\n{out[-3000:]}"
    assert dvc.returncode != 0, out[-3000:]  # the stage was killed, so dvc failed
    return step


def _state_dict(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_killed_train_resumes_to_the_same_model_log_and_metrics(pipeline: Path) -> None:
    _set_param(pipeline, "train", "lr", 0.02)  # an experiment, as `dvc exp run -S train.lr=0.02` would
    try:
        step = _kill_stage_at_checkpoint(pipeline, "train", 2)
        assert 2 <= step < 10 and not (pipeline / "models/student.pt").exists()
        out = _run([str(BIN / "dvc"), "repro"], pipeline)
        assert f"resumed from checkpoints/train/last.pt at step {step} of 10" in out, out
        assert not (pipeline / "checkpoints/train/last.pt").exists()
        resumed, log = _state_dict(pipeline / "models/student.pt"), (pipeline / "logs/train.csv").read_text()
        summary = (pipeline / "metrics/summary.json").read_text()

        out = _run([str(BIN / "dvc"), "repro", "-f", "-s", "train"], pipeline)  # the uninterrupted run
        assert "resumed" not in out, out
        model = _state_dict(pipeline / "models/student.pt")
        assert resumed.keys() == model.keys() and all(torch.equal(resumed[k], model[k]) for k in model)
        assert (pipeline / "logs/train.csv").read_text() == log  # every row, not only those after the checkpoint
        out = _run([str(BIN / "dvc"), "repro"], pipeline)
        assert "Stage 'evaluate' didn't change" in out, out  # same model, so the same metrics
        assert (pipeline / "metrics/summary.json").read_text() == summary
    finally:
        _set_param(pipeline, "train", "lr", TINY["train"].get("lr", Params().train.lr))
        _run([str(BIN / "dvc"), "repro"], pipeline)


@pytest.mark.slow
def test_changed_method_source_trains_from_step_0(pipeline: Path) -> None:
    source = pipeline / "src/s4seg/methods/fixmatch.py"
    original = source.read_text()
    _kill_stage_at_checkpoint(pipeline, "train", 2, "-f", "-s", "train")  # leaves a resume point of the old code
    try:
        source.write_text(original + "\n# an edit that changes no behaviour\n")
        out = _run([str(BIN / "dvc"), "repro", "-s", "train"], pipeline)
        assert "not resumed, starting from step 0" in out and "resumed from" not in out, out
        rows = (pipeline / "logs/train.csv").read_text().splitlines()
        assert rows[1].startswith("3,") and len(rows) == 1 + 4  # header + steps 3, 6, 9, 10
    finally:
        source.write_text(original)
    out = _run([str(BIN / "dvc"), "repro"], pipeline)
    assert "resumed from" not in out, out


@pytest.mark.slow
def test_forced_repro_trains_again_and_the_report_is_complete(pipeline: Path) -> None:
    out = _run([str(BIN / "dvc"), "repro", "-f"], pipeline)
    assert "Running stage 'warmup'" in out and "Running stage 'train'" in out and "resumed" not in out, out
    for name, steps in (("warmup", 3), ("train", 10)):
        log = (pipeline / "logs" / f"{name}.csv").read_text().splitlines()
        assert log[-1].startswith(f"{steps},"), (name, log)
    md = (pipeline / "reports/report.md").read_text()
    assert "Training curves" in md and "No curve" not in md
    assert "up to date" in _run([str(BIN / "dvc"), "status"], pipeline)


@pytest.mark.slow
def test_train_seed_trains_another_seed_from_the_same_warmup(pipeline: Path) -> None:
    seed0 = torch.load(pipeline / "models/student.pt", weights_only=True)
    warmup = (pipeline / "models/warmup.pt").read_bytes()
    _set_param(pipeline, "train", "seed", 1)  # as `dvc exp run -S train.seed=1` would
    try:
        out = _run([str(BIN / "dvc"), "repro"], pipeline)
        assert "Stage 'warmup' didn't change" in out and "Running stage 'train'" in out, out
        assert (pipeline / "models/warmup.pt").read_bytes() == warmup
        seed1 = torch.load(pipeline / "models/student.pt", weights_only=True)
        assert seed0["seed"] == Params().seed and seed1["seed"] == 1
        assert any(not torch.equal(seed0["state_dict"][k], seed1["state_dict"][k]) for k in seed0["state_dict"])
    finally:
        _set_param(pipeline, "train", "seed", None)
        _run([str(BIN / "dvc"), "repro"], pipeline)


@pytest.mark.slow
def test_switching_method_reuses_tile_and_warmup(pipeline: Path) -> None:
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["method"] = "unimatch_v2"
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([str(BIN / "dvc"), "repro"], pipeline)
    assert "Stage 'tile' didn't change" in out and "Stage 'warmup' didn't change" in out, out
    assert "Running stage 'train'" in out and "Running stage 'dump'" in out
    import zarr

    assert zarr.open_group(str(pipeline / "dumps/pseudo.zarr"), mode="r").attrs["method"] == "unimatch_v2"
