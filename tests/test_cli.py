"""The CLI prints an S4segError as one line and exits 2; presets expand to `dvc exp run -S` overrides."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from s4seg.cli import PRESETS_DIR, budget_note, main, preset_args

REPO = Path(__file__).resolve().parents[1]


def test_preset_paper_expands_to_dotted_overrides() -> None:
    args = preset_args("paper")
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert args[0::2] == ["-S"] * len(pairs)
    assert pairs["++model.encoder"] == "'resnet50'"
    assert pairs["++train.crop"] == "512" and pairs["++train.lr"] == "0.002" and pairs["++warmup.epochs"] == "80"


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_preset_survives_dvc_set_params(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What `s4seg preset NAME --run` hands to `dvc exp run -S` writes the preset's values, lists and strings
    with spaces or '#' included, into params.yaml."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` applies to params.yaml

    main(["preset", name])
    argv = shlex.split(capsys.readouterr().out)
    assert argv[0::2] == ["-S"] * (len(argv) // 2)
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_overrides(params, argv[1::2])
    written = yaml.safe_load(params.read_text())
    preset = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())
    for section, block in preset.items():
        for key, value in block.items():
            assert written[section][key] == value, f"{section}.{key}"


def test_unknown_preset_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["preset", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: preset 'nope' not found") and "paper" in err and "\n" not in err


def test_dubai_preset_states_an_explicit_train_budget(capsys: pytest.CaptureFixture[str]) -> None:
    preset = yaml.safe_load((PRESETS_DIR / "dubai.yaml").read_text())
    assert preset["train"]["iterations"] == 168  # not params.yaml's 8 epochs (~2,400 steps on Dubai)
    assert preset["warmup"]["iterations"] == 600  # not params.yaml's 200: Dubai's warmup converges later
    main(["preset", "dubai"])
    captured = capsys.readouterr()
    assert "train.iterations=168" in captured.out and "168" not in captured.out.replace("++train.iterations=168", "")
    assert "++warmup.iterations=600" in captured.out
    assert "preset dubai: warmup 600 steps (preset warmup.iterations), train 168 steps (preset train.iterations)" \
        in captured.err


def test_budget_note_names_where_each_value_comes_from() -> None:
    params = {"warmup": {"iterations": 200, "epochs": 80}, "train": {"epochs": 8, "iterations": None,
                                                                   "init": "warmup"}}
    note = budget_note("x", {"train": {"iterations": 168}}, params)
    assert note.startswith("preset x: warmup 200 steps (params.yaml warmup.iterations), train 168 steps (preset "
                           "train.iterations), train starts from warmup (params.yaml train.init).")
    paper = yaml.safe_load((PRESETS_DIR / "paper.yaml").read_text())
    note = budget_note("paper", paper, params)
    assert "warmup 80 epochs (preset warmup.epochs" in note
    assert "train starts from pretrained (preset train.init)" in note


def test_paper_preset_trains_from_pretrained() -> None:
    pairs = dict(a.split("=", 1) for a in preset_args("paper")[1::2])
    assert pairs["++train.init"] == "'pretrained'"


def test_baseline_command_writes_baselines_method_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    params = {"method": "supervised", "seed": 0, "train": {"init": "warmup"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "summary.json").write_text('{"student.miou": 0.5}')
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train.csv").write_text("step,loss\n5,1.0\n10,0.5\n")
    main(["baseline"])
    assert capsys.readouterr().out.strip() == "baselines/supervised.json"
    record = json.loads((tmp_path / "baselines" / "supervised.json").read_text())
    assert record["method"] == "supervised" and record["steps"] == 10 and record["metrics"] == {"student.miou": 0.5}
    assert record["params"] == {"seed": 0, "train": {"init": "warmup"}}
