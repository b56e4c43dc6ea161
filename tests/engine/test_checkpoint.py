"""Model artifact round trip (`load_method`), its error paths, and the resume-checkpoint checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import s4seg.models
from s4seg.config import ModelConfig, TrainConfig
from s4seg.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    load_method,
    load_training_state,
    model_artifact,
    run_hash,
    save_torch_atomic,
)
from s4seg.errors import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
import engine_helpers as h  # noqa: E402


@pytest.fixture
def tiny_models(monkeypatch):
    """build_model -> TinySegmenter, whatever the config."""
    monkeypatch.setattr(s4seg.models, "build_model", lambda cfg, k, load_pretrained=True: h.TinySegmenter(k))


def _artifact(method):
    return model_artifact(method, model_cfg=ModelConfig(weights=None), classes=list(h.CLASSES),
                          palette=list(h.PALETTE), step=5, train_cfg=TrainConfig())


def test_model_round_trip(tmp_path, tiny_models):
    method = h.build("supervised", seed=1)
    with torch.no_grad():
        method.model.head.weight.add_(1.0)
        method.model.encoder[1].running_mean.fill_(0.25)
    save_torch_atomic(_artifact(method), tmp_path / "m.pt")
    loaded = load_method(tmp_path / "m.pt")
    assert loaded.name == "supervised" and not loaded.training
    for (k, v), (k2, v2) in zip(method.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    x = torch.rand(1, 3, 8, 8)
    method.eval()
    assert torch.allclose(method.predict(x), loaded.predict(x))


def test_artifact_content(tmp_path):
    art = _artifact(h.build("supervised"))
    assert art["format"] == "s4seg-model/1" and art["num_classes"] == 3 and art["step"] == 5
    assert art["classes"] == list(h.CLASSES) and art["method"] == "supervised"
    assert art["model_config"]["weights"] is None and art["train_config"]["batch_size"] == 8


def test_load_method_errors(tmp_path, tiny_models):
    with pytest.raises(CheckpointError, match="missing.pt: model file not found"):
        load_method(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read the model file"):
        load_method(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an s4seg model file"):
        load_method(tmp_path / "foreign.pt")
    art = _artifact(h.build("supervised"))
    art["method"] = "no_such_method"
    torch.save(art, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="cannot rebuild the method: .*'no_such_method' is not registered"):
        load_method(tmp_path / "unknown.pt")
    art = _artifact(h.build("supervised"))
    art["state_dict"].pop("model.head.bias")
    torch.save(art, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="state dict does not match"):
        load_method(tmp_path / "partial.pt")


def test_training_state_checks(tmp_path):
    path = tmp_path / "last.pt"
    assert load_training_state(path, "abc") is None  # missing
    save_torch_atomic({"format": CHECKPOINT_FORMAT, "run_hash": "abc", "step": 3}, path)
    assert load_training_state(path, "abc")["step"] == 3
    assert load_training_state(path, "other") is None  # stale: another config
    path.write_bytes(b"\x00garbage")
    assert load_training_state(path, "abc") is None  # unreadable


def test_run_hash_is_stable_and_sensitive():
    a = run_hash({"train": TrainConfig(), "seed": 0})
    assert a == run_hash({"seed": 0, "train": TrainConfig()})
    assert a != run_hash({"train": TrainConfig(lr=0.02), "seed": 0})
