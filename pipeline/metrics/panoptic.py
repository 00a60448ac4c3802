"""Panoptic quality (Kirillov et al., 2019): PQ, SQ and RQ per category and averaged.

Inputs are segment-id maps and a category per id, counted in a chunk-additive
:class:`~pipeline.metrics.contingency.Contingency`, so no image is gathered. The rules follow
the COCO panoptic reference code: id ``void`` (default 0) is unlabelled; a predicted and a
reference segment of the same category match when IoU > 0.5, where the union leaves out the
predicted pixels on reference void; unmatched reference segments are false negatives;
unmatched predicted segments are false positives unless more than half of them lies on void.
A category with no reference and no predicted segment is left out of the averages.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from pipeline.errors import InvalidImageError
from pipeline.metrics.contingency import Contingency


def panoptic_quality(
    table: Contingency,
    pred_categories: Mapping[int, int],
    ref_categories: Mapping[int, int],
    *,
    void: int = 0,
    things: Collection[int] | None = None,
) -> dict[str, Any]:
    """PQ, SQ, RQ (and TP, FP, FN) per category, and their means over all / things / stuff.

    ``table`` counts (reference id, predicted id) pixels; ``*_categories`` map every non-void
    id to its category. ``things`` (category ids) splits the averages into things and stuff.
    """
    pred_ids, pred_area = table.pred_counts()
    ref_ids, ref_area = table.ref_counts()
    pcat = _categories(pred_ids, pred_categories, void, "prediction")
    rcat = _categories(ref_ids, ref_categories, void, "reference")
    void_in_pred = _void_overlap(table, pred_ids, void)
    stats: dict[int, dict[str, float]] = {
        int(c): {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for c in {*pcat.values(), *rcat.values()}
    }
    matched_pred, matched_ref = _match(
        table, pred_ids, pred_area, ref_ids, ref_area, pcat, rcat, void_in_pred, stats
    )
    for r in ref_ids:
        if r != void and int(r) not in matched_ref:
            stats[rcat[int(r)]]["fn"] += 1
    for i, p in enumerate(pred_ids):
        if p == void or int(p) in matched_pred:
            continue
        if void_in_pred[i] / pred_area[i] > 0.5:
            continue
        stats[pcat[int(p)]]["fp"] += 1
    per_class = {c: _pq(s) for c, s in sorted(stats.items())}
    out: dict[str, Any] = {"per_class": per_class, "all": _average(per_class, None)}
    if things is not None:
        th = set(things)
        out["things"] = _average(per_class, th)
        out["stuff"] = _average(per_class, set(per_class) - th)
    return out


def _categories(ids: np.ndarray, table: Mapping[int, int], void: int, what: str) -> dict[int, int]:
    missing = [int(i) for i in ids if i != void and int(i) not in table]
    if missing:
        raise InvalidImageError(
            f"{what} segment ids {missing[:10]} have no category; give a category for every id "
            "(a segments.json table or a label divisor)"
        )
    return {int(i): int(table[int(i)]) for i in ids if i != void}


def _void_overlap(table: Contingency, pred_ids: np.ndarray, void: int) -> np.ndarray:
    out = np.zeros(len(pred_ids), dtype=np.int64)
    on_void = table.ref == void
    np.add.at(out, np.searchsorted(pred_ids, table.pred[on_void]), table.count[on_void])
    return out


def _match(
    table: Contingency,
    pred_ids: np.ndarray,
    pred_area: np.ndarray,
    ref_ids: np.ndarray,
    ref_area: np.ndarray,
    pcat: dict[int, int],
    rcat: dict[int, int],
    void_in_pred: np.ndarray,
    stats: dict[int, dict[str, float]],
) -> tuple[set[int], set[int]]:
    """Count true positives (same category, IoU > 0.5) into ``stats``; return matched ids."""
    matched_pred: set[int] = set()
    matched_ref: set[int] = set()
    for r, p, inter in zip(table.ref.tolist(), table.pred.tolist(), table.count.tolist(), strict=True):
        if r not in rcat or p not in pcat or rcat[r] != pcat[p]:
            continue
        pi, ri = np.searchsorted(pred_ids, p), np.searchsorted(ref_ids, r)
        union = pred_area[pi] + ref_area[ri] - inter - void_in_pred[pi]
        iou = inter / union
        if iou > 0.5:
            stats[rcat[r]]["tp"] += 1
            stats[rcat[r]]["iou"] += float(iou)
            matched_pred.add(p)
            matched_ref.add(r)
    return matched_pred, matched_ref


def _pq(s: dict[str, float]) -> dict[str, float]:
    tp, fp, fn, iou = s["tp"], s["fp"], s["fn"], s["iou"]
    denom = tp + 0.5 * fp + 0.5 * fn
    return {
        "pq": iou / denom if denom else 0.0,
        "sq": iou / tp if tp else 0.0,
        "rq": tp / denom if denom else 0.0,
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
    }


def _average(per_class: dict[int, dict[str, float]], subset: set[int] | None) -> dict[str, float]:
    rows = [
        v for c, v in per_class.items() if (subset is None or c in subset) and v["tp"] + v["fp"] + v["fn"]
    ]
    if not rows:
        return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "n": 0}
    return {k: float(np.mean([r[k] for r in rows])) for k in ("pq", "sq", "rq")} | {"n": len(rows)}


def categories_from_divisor(ids: np.ndarray, divisor: int, void: int = 0) -> dict[int, int]:
    """Categories of ids encoded as ``category * divisor + instance`` (Cityscapes style)."""
    return {int(i): int(i) // divisor for i in ids if i != void}
