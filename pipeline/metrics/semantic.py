"""Semantic metrics from a confusion matrix: per-class IoU, Dice, precision, recall and mIoU.

The matrix comes from a :class:`~pipeline.metrics.contingency.Contingency` (chunk-additive), so
these metrics never need the image. Rows are reference classes, columns predicted classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.metrics.contingency import Contingency, contingency

#: Most classes a semantic report takes without an explicit class list.
MAX_CLASSES = 4096


def confusion_matrix(
    pred: np.ndarray, ref: np.ndarray, *, classes: Sequence[int], ignore: int | None = None
) -> np.ndarray:
    """``matrix[i, j]``: pixels of reference class ``classes[i]`` predicted as ``classes[j]``.

    Pixels whose reference is ``ignore`` are not counted; matrices of chunks add up to the
    matrix of the image.
    """
    return contingency(pred, ref, ignore=ignore).dense(classes)[1]


def class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class ``iou``, ``dice``, ``precision``, ``recall`` and ``support`` of a confusion matrix.

    A score whose denominator is zero (a class neither in the reference nor predicted, or
    never predicted for precision) is NaN.
    """
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    return _scores_from_counts(tp, m.sum(axis=0) - tp, m.sum(axis=1) - tp)


def semantic_metrics(table: Contingency, *, classes: Sequence[int] | None = None) -> dict[str, Any]:
    """Confusion matrix, per-class scores, mIoU, mean Dice and pixel accuracy of ``table``.

    ``classes`` (default: every value in the reference or the prediction) are the classes
    reported and averaged; a pixel predicted as a value outside them is a miss of its reference
    class. Means skip NaN scores (classes absent from both images). NaN is written as ``None``.
    """
    seen = np.union1d(table.ref, table.pred)
    if classes is None and len(seen) > MAX_CLASSES:
        raise ConfigError(
            f"{len(seen)} distinct label values; a confusion matrix of more than {MAX_CLASSES} "
            "classes is not a semantic evaluation. Name the classes to report (classes=...) or "
            "evaluate the ids as instances."
        )
    keep = seen if classes is None else np.asarray(classes, dtype=np.int64)
    cls, matrix = table.dense(keep)
    # misses into values outside ``classes`` still count against their reference class
    ref_values, ref_totals = table.ref_counts()
    pred_values, pred_totals = table.pred_counts()
    fn = _lookup(cls, ref_values, ref_totals) - np.diag(matrix)
    fp = _lookup(cls, pred_values, pred_totals) - np.diag(matrix)
    scores = _scores_from_counts(np.diag(matrix).astype(np.float64), fp, fn)
    total = table.total
    return {
        "classes": cls.tolist(),
        "confusion_matrix": matrix.tolist(),
        "per_class": {int(c): {k: _num(v[i]) for k, v in scores.items()} for i, c in enumerate(cls)},
        "mIoU": _num(_nanmean(scores["iou"])),
        "mean_dice": _num(_nanmean(scores["dice"])),
        "pixel_accuracy": _num(table.count[table.ref == table.pred].sum() / total if total else np.nan),
        "pixels": total,
    }


def _scores_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "iou": tp / (tp + fp + fn),
            "dice": 2 * tp / (2 * tp + fp + fn),
            "precision": tp / (tp + fp),
            "recall": tp / (tp + fn),
            "support": tp + fn,
        }


def _lookup(cls: np.ndarray, values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    out = np.zeros(len(cls), dtype=np.float64)
    idx = np.searchsorted(values, cls)
    if len(values):
        ok = (idx < len(values)) & (values[np.minimum(idx, len(values) - 1)] == cls)
        out[ok] = totals[idx[ok]]
    return out


def _nanmean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if len(a) else float("nan")


def _num(v: float) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v
