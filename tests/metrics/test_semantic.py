"""Confusion matrix (chunk-additive, ignore value) and per-class scores, by hand and vs numpy."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InvalidImageError
from pipeline.metrics.contingency import Contingency, combine, contingency
from pipeline.metrics.semantic import class_scores, confusion_matrix, semantic_metrics


def test_hand_computed() -> None:
    ref = np.array([[0, 0, 1, 1], [1, 2, 2, -1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 1, 2]])
    m = confusion_matrix(pred, ref, classes=[0, 1, 2], ignore=-1)
    assert m.tolist() == [[1, 1, 0], [1, 2, 0], [0, 1, 1]]
    s = class_scores(m)
    assert s["iou"].tolist() == pytest.approx([1 / 3, 2 / 5, 1 / 2])
    assert s["dice"].tolist() == pytest.approx([2 / 4, 4 / 7, 2 / 3])
    assert s["precision"].tolist() == pytest.approx([1 / 2, 2 / 4, 1])
    assert s["recall"].tolist() == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    res = semantic_metrics(contingency(pred, ref, ignore=-1))
    assert res["mIoU"] == pytest.approx((1 / 3 + 2 / 5 + 1 / 2) / 3)
    assert res["pixel_accuracy"] == pytest.approx(4 / 7) and res["pixels"] == 7


def test_chunks_add_up_to_the_whole() -> None:
    rng = np.random.default_rng(3)
    ref = rng.integers(-1, 4, (37, 53)).astype(np.int16)
    pred = rng.integers(0, 5, (37, 53)).astype(np.uint8)
    whole = contingency(pred, ref, ignore=-1)
    parts = [
        contingency(pred[y : y + 10, x : x + 16], ref[y : y + 10, x : x + 16], ignore=-1)
        for y in range(0, 37, 10)
        for x in range(0, 53, 16)
    ]
    total = combine(parts)
    for a, b in zip((whole.ref, whole.pred, whole.count), (total.ref, total.pred, total.count), strict=True):
        assert np.array_equal(a, b)
    cls, m = total.dense()
    keep = ref != -1
    expected = np.zeros((5, 5), int)
    np.add.at(expected, (ref[keep], pred[keep]), 1)
    assert cls.tolist() == [0, 1, 2, 3, 4] and np.array_equal(m, expected)
    assert (Contingency.empty() + whole).total == whole.total


def test_classes_restrict_the_report_but_misses_count() -> None:
    ref = np.array([0, 0, 1, 1])
    pred = np.array([0, 255, 1, 1])  # 255: a nodata prediction is a miss of class 0
    res = semantic_metrics(contingency(pred, ref), classes=[0, 1])
    assert res["per_class"][0]["recall"] == 0.5 and res["per_class"][0]["iou"] == 0.5
    assert res["mIoU"] == pytest.approx(0.75)


def test_absent_class_is_none_and_float_labels_are_refused() -> None:
    res = semantic_metrics(contingency(np.array([1, 1]), np.array([1, 1])), classes=[1, 2])
    assert res["per_class"][2]["iou"] is None and res["mIoU"] == 1.0
    with pytest.raises(InvalidImageError, match="integer"):
        contingency(np.zeros(3), np.zeros(3))
