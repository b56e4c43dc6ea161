"""End to end: the whole `dvc repro` on tiny params, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = {
    "dataset": {"name": "synthetic", "num_scenes": 3, "scene_size": 160},
    "tiling": {"tile_size": 64, "stride": 64},
    "split": {"labeled": 0.5},
    "model": {"encoder": "resnet18", "weights": None},
    "warmup": {"iterations": 3, "batch_size": 2, "crop": 48, "checkpoint_every": 2, "log_every": 1},
    "train": {"iterations": 3, "batch_size": 2, "crop": 48, "checkpoint_every": 2, "log_every": 1,
              "snapshot_every": 2, "snapshot_tiles": 2},
    "evaluate": {"batch_size": 4, "window": 64},
    "report": {"num_tiles": 2},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) and v else v
    return out


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "stages", work / "stages")
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(REPO / "data" / "raw", work / "data" / "raw")
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
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
