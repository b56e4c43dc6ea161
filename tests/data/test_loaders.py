"""Tile datasets, paired sampling (epoch = pass over unlabeled tiles), partner stream, collation."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from s4seg.config import IGNORE_INDEX
from s4seg.data.augment import strong_augment, weak_augment
from s4seg.data.loaders import (
    STREAM_UNLABELED,
    LabeledTiles,
    PairedSchedule,
    UnlabeledTiles,
    make_loader,
    sample_generator,
)
from s4seg.engine.method import Batch
from s4seg.errors import DataError

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
import engine_helpers as h  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return h.make_store(tmp_path_factory.mktemp("tiles") / "tiles.zarr", num_tiles=12, tile=16)


def test_labeled_tiles(store):
    ds = LabeledTiles(store, [0, 1, 2], crop=12, scale_range=(1.0, 1.0), seed=0)
    sample = ds[1]
    assert sample["image"].shape == (3, 12, 12) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (12, 12) and sample["mask"].dtype == torch.int64
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
    assert sample["id"] == 1
    # at unit scale the mask is still the dominant colour of the image (store's construction)
    m = sample["mask"]
    ok = m != IGNORE_INDEX
    assert torch.equal(sample["image"].argmax(0)[ok], m[ok])


def test_unlabeled_tiles_views_share_geometry(store):
    ds = UnlabeledTiles(store, [5, 6], crop=20, scale_range=(1.0, 1.0), seed=0)
    s = ds[0]
    assert {"u_w", "u_s1", "u_s2", "valid", "box1", "box2", "y_u", "id"} <= set(s)
    assert s["valid"].dtype == torch.bool and s["valid"].sum() == 16 * 16  # 16 px tile padded to 20
    assert s["box1"].shape == (20, 20) and s["box1"].dtype == torch.bool
    assert (s["y_u"][~s["valid"]] == IGNORE_INDEX).all()
    # replay the sample's draws: the strong views are photometric changes of exactly the weak view
    g = sample_generator(0, STREAM_UNLABELED, epoch=0, slot=0)
    image, mask = ds.read(5)
    u_w, y_u, valid = weak_augment(image, mask, 20, (1.0, 1.0), g)
    assert torch.equal(u_w, s["u_w"]) and torch.equal(y_u, s["y_u"]) and torch.equal(valid, s["valid"])
    assert torch.equal(strong_augment(u_w, g), s["u_s1"])
    assert not torch.equal(s["u_s1"], s["u_s2"])


def test_epoch_is_a_pass_over_unlabeled_tiles():
    split = h.make_split(num_labeled=3, num_unlabeled=10)
    sched = PairedSchedule(split.labeled, split.unlabeled, batch_size=3, seed=0)
    assert sched.batches_per_epoch == 3 and sched.samples_per_epoch == 9  # drop_last
    keys = sched.epoch_keys(0)
    unl = [k.unlabeled for k in keys]
    assert len(set(unl)) == 9 and set(unl) <= set(split.unlabeled.tolist())
    # labeled ids repeated to the epoch length: each appears 3 times
    assert Counter(k.labeled for k in keys) == {i: 3 for i in split.labeled.tolist()}
    # the partner stream is an independent shuffle of the unlabeled tiles
    partner = [k.partner for k in keys]
    assert set(partner) <= set(split.unlabeled.tolist()) and len(set(partner)) == 9 and partner != unl
    assert [k.unlabeled for k in sched.epoch_keys(1)] != unl  # reshuffled every epoch


def test_labeled_repetition_is_balanced():
    split = h.make_split(num_labeled=4, num_unlabeled=10)
    keys = PairedSchedule(split.labeled, split.unlabeled, batch_size=1, seed=3).epoch_keys(0)
    counts = Counter(k.labeled for k in keys)
    assert sorted(counts.values()) == [2, 2, 3, 3]


def test_labeled_only_and_supervised_schedules():
    split = h.make_split(num_labeled=5, num_unlabeled=10)
    warm = PairedSchedule(split.labeled, split.unlabeled, batch_size=2, seed=0, labeled_only=True)
    assert warm.batches_per_epoch == 2 and all(k.unlabeled == -1 for k in warm.epoch_keys(0))
    sup = PairedSchedule(split.labeled, split.unlabeled, batch_size=2, seed=0, load_unlabeled=False)
    assert sup.batches_per_epoch == 5 and all(k.unlabeled == k.partner == -1 for k in sup.epoch_keys(0))
    tiny = PairedSchedule(split.labeled, split.unlabeled, batch_size=8, seed=0, labeled_only=True)
    assert tiny.batches_per_epoch == 1 and len(tiny.batch_keys(0)) == 8  # fewer tiles than a batch: repeated


def test_schedule_errors():
    with pytest.raises(DataError, match="no labeled tiles"):
        PairedSchedule([], [1, 2], 1, 0)
    with pytest.raises(DataError, match="no unlabeled tiles"):
        PairedSchedule([1], [], 1, 0)


def test_loader_batches_and_resume_position(store):
    split = h.make_split(num_labeled=3, num_unlabeled=7)
    sched = PairedSchedule(split.labeled, split.unlabeled, batch_size=2, seed=0)
    kw = dict(crop=12, scale_range=(0.5, 2.0), seed=0)
    full = list(make_loader(store, sched, start=0, stop=5, **kw))
    assert len(full) == 5 and all(isinstance(b, Batch) for b in full)
    b = full[0]
    assert b.x.shape == (2, 3, 12, 12) and b.y.shape == (2, 12, 12) and b.y.dtype == torch.int64
    assert b.u_w.shape == b.u_s1.shape == b.u_s2.shape == b.u_w_mix.shape == b.u_s2_mix.shape == (2, 3, 12, 12)
    assert b.valid_u.dtype == b.box1.dtype == b.valid_u_mix.dtype == torch.bool
    assert b.y_u.shape == b.y_u_mix.shape == (2, 12, 12) and b.ids_u.tolist() == [k.unlabeled for k in
                                                                                  sched.batch_keys(0)]
    # starting at micro-batch 3 (a resume) yields exactly batches 3 and 4 of the full run
    resumed = list(make_loader(store, sched, start=3, stop=5, **kw))
    for x, y in zip(full[3:], resumed, strict=True):
        assert torch.equal(x.x, y.x) and torch.equal(x.u_s1, y.u_s1) and torch.equal(x.box2, y.box2)


def test_loader_without_unlabeled_stream(store):
    split = h.make_split(num_labeled=3, num_unlabeled=7)
    sched = PairedSchedule(split.labeled, split.unlabeled, batch_size=2, seed=0, load_unlabeled=False)
    (b,) = list(make_loader(store, sched, crop=12, scale_range=(1.0, 1.0), seed=0, start=0, stop=1))
    assert b.u_w is None and b.y_u is None and b.x.shape == (2, 3, 12, 12)


def test_workers_give_the_same_batches(store):
    split = h.make_split(num_labeled=3, num_unlabeled=7)
    sched = PairedSchedule(split.labeled, split.unlabeled, batch_size=2, seed=0)
    kw = dict(crop=12, scale_range=(0.5, 2.0), seed=0, start=0, stop=3)
    serial = list(make_loader(store, sched, num_workers=0, **kw))
    parallel = list(make_loader(store, sched, num_workers=2, **kw))
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.u_s2_mix, b.u_s2_mix) and torch.equal(a.ids_u, b.ids_u)
    assert np.unique(np.concatenate([b.ids_u.numpy() for b in serial])).size > 1
