"""The CLI prints an S4segError as one line and exits 2; presets expand to `dvc exp run -S` overrides."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from s4seg.cli import PRESETS_DIR, main, preset_args

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
