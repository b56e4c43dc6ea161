"""The embedded synthetic dataset: deterministic, every ISPRS class present with plausible shares."""

from __future__ import annotations

import numpy as np
import pytest

from s4seg.config import DatasetConfig
from s4seg.data.sources import build_source
from s4seg.data.sources.synthetic import render_scene
from s4seg.errors import ParamsError


def test_scenes_are_deterministic_and_independent_of_the_count():
    a = build_source(DatasetConfig(num_scenes=3, scene_size=128, seed=4))
    b = build_source(DatasetConfig(num_scenes=5, scene_size=128, seed=4))
    scenes_a, scenes_b = list(a.scenes()), list(b.scenes())
    assert [s.name for s in scenes_a] == ["scene_00", "scene_01", "scene_02"]
    for sa, sb in zip(scenes_a, scenes_b[:3], strict=True):
        np.testing.assert_array_equal(sa.image, sb.image)
        np.testing.assert_array_equal(sa.mask, sb.mask)
    assert not np.array_equal(scenes_a[0].image, scenes_a[1].image)
    other = render_scene(5, 0, 128)
    assert not np.array_equal(other[0], scenes_a[0].image)
    assert a.default_test_scenes == ("scene_02",) and b.default_test_scenes == ("scene_03", "scene_04")


def test_all_classes_with_plausible_shares():
    counts = np.zeros(256)
    for i in range(3):
        image, mask = render_scene(0, i, 512)
        assert image.shape == (512, 512, 3) and image.dtype == np.uint8 and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= set(range(6))
        counts += np.bincount(mask.ravel(), minlength=256)
        # sensor-like: the full range is used but not saturated
        assert 20 < image.mean() < 200 and (image == 255).mean() < 0.01
    share = counts[:6] / counts.sum()
    low = [0.10, 0.08, 0.15, 0.03, 0.005, 0.005]
    high = [0.50, 0.45, 0.55, 0.30, 0.10, 0.20]
    assert all(lo < s < hi for lo, s, hi in zip(low, share, high, strict=True)), share


def test_class_appearance_shifts_between_scenes():
    """The same class has a different mean colour in different scenes (the domain shift)."""
    means = []
    for i in range(2):
        image, mask = render_scene(0, i, 256)
        means.append(image[mask == 2].mean(axis=0))  # low vegetation
    assert np.abs(means[0] - means[1]).max() > 5


@pytest.mark.parametrize(("kw", "match"), [({"num_scenes": 1}, "dataset.num_scenes = 1: need at least 2"),
                                            ({"scene_size": 64}, "dataset.scene_size = 64: need at least 128")])
def test_bad_synthetic_params(kw, match):
    with pytest.raises(ParamsError, match=match):
        build_source(DatasetConfig(**kw))
