"""The region split: no training patch overlaps or touches the held-apart region."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.runner.train_data import stage_pairs
from pipeline.runner.train_spec import TrainJob, resolve_train_paths
from pipeline.runner.training import splits_for
from pipeline.tiling import Box
from pipeline.train.patches import Region, class_index, draw_origins
from pipeline.train.split import Split, split_region, strip_region
from tests.train.jobs import landcover_job


def _patch_box(origin: tuple[int, ...], patch: tuple[int, ...]) -> Box:
    return Box(origin, tuple(o + p for o, p in zip(origin, patch, strict=True)))


def _gap_between(a: Box, b: Box) -> int:
    """Chebyshev distance in pixels between two boxes (0: they overlap, 1: they touch)."""
    d = 0
    for a0, a1, b0, b1 in zip(a.start, a.stop, b.start, b.stop, strict=True):
        d = max(d, b0 - a1 + 1, a0 - b1 + 1)
    return d


def _assert_apart(split: Split, origin: tuple[int, ...], patch: tuple[int, ...]) -> None:
    box = _patch_box(origin, patch)
    assert Box.from_shape(split.shape).contains(box)
    assert _gap_between(box, split.val) > split.gap, (box, split.val, split.gap)


@st.composite
def _splits(draw: st.DrawFn) -> tuple[Split, tuple[int, ...]]:
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(8, 90)) for _ in range(ndim))
    patch = tuple(draw(st.integers(1, 12)) for _ in range(ndim))
    gap = draw(st.integers(1, 10))
    if draw(st.booleans()):
        val = strip_region(
            shape,
            val_fraction=draw(st.floats(0.05, 0.6)),
            axis=draw(st.integers(0, ndim - 1)),
            position=draw(st.sampled_from(["start", "end"])),
        )
    else:
        start = tuple(draw(st.integers(0, s - 1)) for s in shape)
        stop = tuple(draw(st.integers(a + 1, s)) for a, s in zip(start, shape, strict=True))
        val = Box(start, stop)
    try:
        return split_region(shape, val, gap=gap, patch=patch), patch
    except ConfigError:  # no slab a patch fits in: refused, nothing to check
        return draw(st.nothing())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=_splits(), seed=st.integers(0, 2**32 - 1))
def test_no_training_patch_overlaps_or_touches_the_held_apart_region(case, seed) -> None:
    split, patch = case
    rng = np.random.default_rng(seed)
    for slab in split.train:
        assert _gap_between(slab, split.val) > split.gap
        lo = slab.start
        hi = tuple(b - p for b, p in zip(slab.stop, patch, strict=True))
        corners = [tuple(c) for c in np.array(np.meshgrid(*zip(lo, hi, strict=True))).reshape(len(lo), -1).T]
        random = [tuple(int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True)) for _ in range(20)]
        for origin in corners + random:
            _assert_apart(split, origin, patch)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=_splits())
def test_slabs_cover_everything_outside_the_exclusion(case) -> None:
    """The slabs that fit a patch are disjoint pieces of the image minus the grown held-apart box."""
    split, _ = case
    cover = np.zeros(split.shape, dtype=np.int32)
    for slab in split.train:
        cover[slab.slices()] += 1
    assert cover.max() <= 1
    assert not cover[split.exclusion.slices()].any()


def test_sampled_patches_stay_apart_on_real_data(data, tmp_path) -> None:
    """Class-targeted and uniform draws from the staged Chesapeake tile all keep the gap."""
    raw = landcover_job(data, tmp_path, split={"val_fraction": 0.3, "axis": 1, "position": "start", "gap": 5})
    job = resolve_train_paths(TrainJob.model_validate(raw), base=tmp_path)
    staged = stage_pairs(job, tmp_path / "work", "fp")
    (split,) = splits_for(job, staged)
    regions = [Region(staged[0].image, staged[0].labels, split)]
    index = class_index(regions, 4)
    origins = draw_origins(
        np.random.default_rng(0),
        2000,
        regions,
        index,
        patch=(32, 32),
        foreground_fraction=0.7,
        balance=(0, 3),
    )
    labels = np.asarray(regions[0].labels()[...])
    hits = 0
    for r, origin in origins:
        assert r == 0
        _assert_apart(split, origin, (32, 32))
        hits += bool(np.isin(labels[_patch_box(origin, (32, 32)).slices()], (0, 3)).any())
    # rare classes (water 1.2 %, barren/impervious 4.9 % of the tile) are in most patches
    assert hits / len(origins) > 0.7


def test_impossible_split_is_refused() -> None:
    with pytest.raises(ConfigError, match="smaller patch_size"):
        split_region((40, 40), strip_region((40, 40), val_fraction=0.5, axis=0), gap=10, patch=(32, 32))
    with pytest.raises(ConfigError, match="gap"):
        split_region((40, 40), Box((0, 0), (5, 5)), gap=0, patch=(8, 8))
