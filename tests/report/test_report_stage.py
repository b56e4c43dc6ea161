"""stages/report.py as DVC runs it: a subprocess, every argument of dvc.yaml, and no torch imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RUN_WITHOUT_TORCH = """
import runpy, sys
sys.argv = ["stages/report.py"] + sys.argv[1:]
runpy.run_path("stages/report.py", run_name="__main__")
assert "torch" not in sys.modules, "the report stage imported torch"
"""


def test_report_stage_runs_without_torch(artifacts, tmp_path):
    root = Path(artifacts.table).parent
    args = ["--params", str(artifacts.params), "--table", str(artifacts.table), "--summary", str(root / "s.json"),
            "--warmup-log", str(artifacts.warmup_log), "--train-log", str(artifacts.train_log),
            "--tiles", str(artifacts.tiles), "--split", str(root / "split.parquet"),
            "--predictions", str(artifacts.predictions), "--pseudo", str(root / "pseudo.parquet"),
            "--pseudo-summary", str(root / "pseudo.json"), "--dump", str(root / "pseudo.zarr"),
            "--snapshots", str(root / "snapshots.zarr"), "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# s4seg report: fixmatch on synthetic")
    assert (tmp_path / "out" / "figures" / "predictions.png").is_file()
    assert (tmp_path / "out" / "report.html").is_file()


def test_report_stage_bad_params_is_one_line_error(tmp_path):
    (tmp_path / "params.yaml").write_text("report:\n  num_tiles: many\n")
    proc = subprocess.run([sys.executable, "stages/report.py", "--params", str(tmp_path / "params.yaml"),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "report.num_tiles: expected an integer, found 'many'" in proc.stderr
