"""Two CPU processes (gloo), launched the way torchrun does (RANK / WORLD_SIZE / MASTER_* env)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s4seg.data.loaders import PairedSchedule

sys.path.insert(0, str(Path(__file__).parent))
import engine_helpers as h  # noqa: E402

HELPER = Path(__file__).parent / "engine_helpers.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_read_disjoint_shards():
    split = h.make_split(num_labeled=3, num_unlabeled=9)
    shards = [PairedSchedule(split.labeled, split.unlabeled, 2, seed=0, rank=r, world_size=2).epoch_keys(0)
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4  # 9 tiles // (2 x 2) = 2 batches of 2 per rank
    slots = [{k.slot for k in shard} for shard in shards]
    assert not slots[0] & slots[1]
    single = PairedSchedule(split.labeled, split.unlabeled, 4, seed=0).epoch_keys(0)
    # the same global epoch list as one process with the total batch, dealt round-robin
    assert sorted((k.slot, k.unlabeled) for s in shards for k in s) == sorted((k.slot, k.unlabeled) for k in single)


@pytest.mark.slow
def test_two_process_training_ends_with_identical_weights(tmp_path):
    store = h.make_store(tmp_path / "tiles.zarr")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(HELPER), "--store", str(store.path), "--out", str(tmp_path / "out" / "model.pt"),
             "--log", str(tmp_path / "out" / "log.csv"), "--checkpoints", str(tmp_path / "out" / "ckpt"),
             "--iterations", "4", "--checkpoint-every", "2", "--dump-weights", str(tmp_path / "w")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
    w0 = torch.load(tmp_path / "w.rank0", weights_only=True)
    w1 = torch.load(tmp_path / "w.rank1", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    art = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert art["step"] == 4
    assert all(torch.equal(art["state_dict"][k], w0[k]) for k in w0)
    # rank 0 alone writes: one artifact, one log, one checkpoint, no temporaries
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ckpt", "log.csv", "model.pt"]
    assert list((tmp_path / "out" / "ckpt").iterdir()) == []  # a finished run leaves no resume point
