"""PQ, SQ, RQ on hand-computed cases: void, empty categories, unmatched segments."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InvalidImageError
from pipeline.metrics.contingency import contingency
from pipeline.metrics.panoptic import categories_from_divisor, panoptic_quality

#            0  1  2  3  4  5  6  7   8  9 10 11  12 13 14 15  16 17  18 19
REF = np.array([[10, 10, 10, 10, 10, 10, 10, 10, 20, 20, 20, 20, 21, 21, 21, 21, 0, 0, 40, 40]])
PRED = np.array([[1, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 3, 3, 3, 4, 4, 6, 6, 5, 5]])
REF_CATS = {10: 1, 20: 2, 21: 2, 40: 4, 99: 7}  # 99: a category with no segment anywhere
PRED_CATS = {1: 1, 2: 2, 3: 2, 4: 3, 5: 1, 6: 5}


def test_hand_computed() -> None:
    res = panoptic_quality(contingency(PRED, REF), PRED_CATS, REF_CATS, things={2, 3})
    pc = res["per_class"]
    # category 1: 1 vs 10 IoU 7/8 (pred 0 is no segment); 5 lies on 40 (category 4): FP
    assert pc[1] == pytest.approx({"pq": 0.875 / 1.5, "sq": 0.875, "rq": 1 / 1.5, "tp": 1, "fp": 1, "fn": 0})
    # category 2: 2 vs 20 IoU 3/4; 3 vs 21 IoU 2/5 (no match): 3 FP, 21 FN
    assert pc[2] == pytest.approx({"pq": 0.375, "sq": 0.75, "rq": 0.5, "tp": 1, "fp": 1, "fn": 1})
    # category 3 only predicted (FP), category 4 only in the reference (FN)
    assert pc[3] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1, "fn": 0}
    assert pc[4] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 1}
    # category 5: its only segment lies on void, so it is not a FP; empty -> not averaged
    assert pc[5]["tp"] + pc[5]["fp"] + pc[5]["fn"] == 0
    assert 7 not in pc
    assert res["all"] == pytest.approx(
        {"pq": (0.875 / 1.5 + 0.375) / 4, "sq": (0.875 + 0.75) / 4, "rq": (1 / 1.5 + 0.5) / 4, "n": 4}
    )
    assert res["things"]["pq"] == pytest.approx(0.375 / 2)
    assert res["stuff"]["pq"] == pytest.approx(0.875 / 1.5 / 2)


def test_void_pixels_leave_the_union() -> None:
    ref, pred = np.array([[7, 7, 7, 0, 0]]), np.array([[1, 1, 1, 1, 1]])
    res = panoptic_quality(contingency(pred, ref), {1: 3}, {7: 3})
    assert res["per_class"][3] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0}


def test_iou_exactly_half_is_no_match_and_chunks_add() -> None:
    ref, pred = np.array([[7, 7, 7, 7, 0, 0]]), np.array([[1, 1, 5, 5, 0, 0]])
    table = contingency(pred[:, :3], ref[:, :3]) + contingency(pred[:, 3:], ref[:, 3:])
    res = panoptic_quality(table, {1: 3, 5: 3}, {7: 3})
    assert res["per_class"][3] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 2, "fn": 1}
    assert res["all"]["n"] == 1


def test_nothing_at_all_and_missing_category() -> None:
    z = np.zeros((3, 3), int)
    assert np.isnan(panoptic_quality(contingency(z, z), {}, {})["all"]["pq"])
    with pytest.raises(InvalidImageError, match="no category"):
        panoptic_quality(contingency(z + 4, z), {}, {})


def test_divisor_categories() -> None:
    assert categories_from_divisor(np.array([0, 1001, 1002, 3000]), 1000) == {1001: 1, 1002: 1, 3000: 3}
