"""params.yaml loading: the shipped file loads; unknown keys and wrong types are named by dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from s4seg.config import Params, TrainConfig, from_dict, load_params, to_dict
from s4seg.errors import ParamsError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.method in params.methods
    assert len(params.train.scale_range) == 2


def test_round_trip_through_dict() -> None:
    params = load_params(REPO / "params.yaml")
    assert from_dict(Params, to_dict(params), where="x") == params


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_named_with_its_section(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"params.yaml: train: unknown key\(s\) epocs; expected some of: .*epochs"):
        load_params(_write(tmp_path, {"train": {"epocs": 3}}))


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ({"train": {"batch_size": "8"}}, None, r"train.batch_size: expected an integer, found '8'"),
        ({"evaluate": {"scenes": 1}}, None, r"evaluate.scenes: expected true or false, found 1"),
        ({"train": {"scale_range": [0.5]}}, None, r"train.scale_range: expected a list of 2 values"),
        ({"model": {"weights": 3}}, None, r"model.weights: expected"),
        ({"seed": 1.5}, None, r"seed: expected an integer, found 1.5"),
    ],
)
def test_wrong_types_are_rejected(tmp_path: Path, section: dict, value: None, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(_write(tmp_path, section))


def test_train_seed_defaults_to_the_top_level_seed() -> None:
    assert from_dict(Params, {"seed": 4}, where="p").train_seed == 4
    assert from_dict(Params, {"seed": 4, "train": {"seed": 1}}, where="p").train_seed == 1
    with pytest.raises(ParamsError, match=r"train.seed: expected int \| None, found 'x'"):
        from_dict(Params, {"train": {"seed": "x"}}, where="p")


def test_ints_are_accepted_as_floats_and_none_for_optional() -> None:
    cfg = from_dict(TrainConfig, {"lr": 1, "iterations": None}, where="train")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.iterations is None


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
