"""Unit tests of the instance-stitching kernels (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.stitching.instance import label_classes, offsets, overlap_pairs, seam_pairs, solve


def test_seam_pairs_respect_connectivity() -> None:
    slab = np.array([[1, 0, 0], [0, 2, 0]], dtype=np.uint64)  # 1 and 2 meet only diagonally
    assert seam_pairs(slab, axis=0, connectivity=1).shape == (0, 2)
    assert seam_pairs(slab, axis=0, connectivity=2).tolist() == [[1, 2]]
    face = np.array([[0, 5, 7], [0, 9, 7]], dtype=np.uint64)  # 7-7 is the same id: no pair
    assert seam_pairs(face, axis=0, connectivity=1).tolist() == [[5, 9]]
    vol = np.zeros((3, 2, 3), np.uint64)
    vol[0, 0, 0], vol[1, 1, 1] = 4, 8  # a corner-only contact in 3-D, across axis 1
    assert seam_pairs(vol, axis=1, connectivity=2).shape == (0, 2)
    assert seam_pairs(vol, axis=1, connectivity=3).tolist() == [[4, 8]]


def test_solve_relabels_sequentially_with_small_tables() -> None:
    relabel = solve(np.array([[2, 5], [5, 9], [3, 4]], dtype=np.uint64), total=10)
    assert relabel.merged.tolist() == [4, 5, 9] and relabel.roots.tolist() == [3, 2, 2]
    assert relabel.n_objects == 7
    ids = np.arange(11, dtype=np.uint64)
    assert relabel.apply(ids).tolist() == [0, 1, 2, 3, 3, 2, 4, 5, 6, 2, 7]


def test_offsets_are_uint64_and_exclusive() -> None:
    big = [2**31, 2**31, 5]
    assert offsets(big).tolist() == [0, 2**31, 2**32]
    assert offsets(big).dtype == np.uint64


def test_label_classes_never_joins_classes() -> None:
    cls = np.array([[1, 1, 2], [0, 2, 2]], dtype=np.uint8)
    ids, owners = label_classes(cls, [1, 2], 1)
    assert ids.max() == 2 and sorted(owners.tolist()) == [1, 2]
    assert len(np.unique(ids[cls == 1])) == 1 and len(np.unique(ids[cls == 2])) == 1
    with pytest.raises(ConfigError, match="connectivity 3"):
        label_classes(cls, [1], 3)


def test_overlap_pairs_mutual_best_and_threshold() -> None:
    mine = np.array([[1, 1, 1, 2, 2, 0]])
    theirs = np.array([[7, 7, 7, 7, 0, 8]])
    pairs, conflicts = overlap_pairs(mine, theirs, 0.5)
    assert pairs.tolist() == [[1, 7]]  # IoU(1,7) = 3/4; 2 overlaps 7 but 7 prefers 1
    assert conflicts == 1
    assert overlap_pairs(mine, theirs, 0.8)[0].shape == (0, 2)
