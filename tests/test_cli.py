"""The CLI prints an S4segError as one line and exits 2; presets expand to `-S` pairs."""

from __future__ import annotations

import pytest

from s4seg.cli import main, preset_args


def test_preset_paper_expands_to_dotted_set_params() -> None:
    args = preset_args("paper")
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert args[0::2] == ["-S"] * len(pairs)
    assert pairs["model.encoder"] == "resnet50"
    assert pairs["train.crop"] == "512" and pairs["train.lr"] == "0.002" and pairs["warmup.epochs"] == "80"


def test_unknown_preset_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["preset", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: preset 'nope' not found") and "paper" in err and "\n" not in err
