"""Instance metrics in the COCO definitions: AP@[.50:.95], AP50, AP75, AR; F1 at IoU thresholds.

Everything starts from :class:`Overlaps` (areas of ids and intersections of id pairs), which
:meth:`Overlaps.from_table` builds from a chunk-additive
:class:`~pipeline.metrics.contingency.Contingency` of (reference id, predicted id) pairs, so
no image is gathered. Id 0 is background in both. COCO's rules as pycocotools applies them to
segmentation masks: one image, one category, no crowd regions, area range "all"; detections
sorted by score (stable) and cut to ``max_dets``; each detection in turn takes the unmatched
reference of highest IoU >= t; precision interpolated at 101 recall points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from pipeline.metrics.contingency import Contingency, contingency
from pipeline.metrics.instances import Matching

#: COCO's IoU thresholds .50:.05:.95 and recall points 0:.01:1, built as pycocotools builds them.
IOU_THRESHOLDS: tuple[float, ...] = tuple(
    np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True).tolist()
)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


@dataclass(frozen=True)
class Overlaps:
    """Predicted and reference ids with their areas, and the intersecting pairs.

    ``pair_pred[k]``/``pair_ref[k]`` index ``pred_ids``/``ref_ids``; ``inter[k]`` is their
    intersection in pixels.
    """

    pred_ids: np.ndarray
    pred_area: np.ndarray
    ref_ids: np.ndarray
    ref_area: np.ndarray
    pair_pred: np.ndarray
    pair_ref: np.ndarray
    inter: np.ndarray

    @classmethod
    def from_table(cls, table: Contingency) -> Overlaps:
        """Overlaps of the ids in a (reference id, predicted id) contingency table."""
        pred_ids, pred_area = table.pred_counts()
        ref_ids, ref_area = table.ref_counts()
        pk, rk = pred_ids != 0, ref_ids != 0
        pred_ids, pred_area, ref_ids, ref_area = pred_ids[pk], pred_area[pk], ref_ids[rk], ref_area[rk]
        both = (table.pred != 0) & (table.ref != 0)
        return cls(
            pred_ids,
            pred_area,
            ref_ids,
            ref_area,
            np.searchsorted(pred_ids, table.pred[both]),
            np.searchsorted(ref_ids, table.ref[both]),
            table.count[both],
        )

    @property
    def iou(self) -> np.ndarray:
        """IoU of every intersecting pair."""
        a, b = self.pred_area[self.pair_pred], self.ref_area[self.pair_ref]
        return self.inter / (a + b - self.inter).astype(np.float64)


def overlaps(pred: np.ndarray, ref: np.ndarray) -> Overlaps:
    """:class:`Overlaps` of two whole label arrays (0 = background)."""
    return Overlaps.from_table(contingency(pred, ref))


@dataclass(frozen=True)
class ImageEval:
    """One image's detections after COCO matching: scores (sorted, cut to ``max_dets``),
    ``matched[t, d]`` per IoU threshold, and the number of references."""

    scores: np.ndarray
    matched: np.ndarray
    n_ref: int


def score_array(ov: Overlaps, scores: Mapping[int, float] | None) -> np.ndarray:
    """Scores aligned with ``ov.pred_ids``: from a per-id table, else 1.0 for every id."""
    if scores is None:
        return np.ones(len(ov.pred_ids))
    missing = [int(i) for i in ov.pred_ids if int(i) not in scores]
    if missing:
        raise ValueError(f"no score for predicted ids {missing[:10]}; give a score for every id")
    return np.array([float(scores[int(i)]) for i in ov.pred_ids], dtype=np.float64)


def evaluate_image(
    ov: Overlaps,
    scores: Mapping[int, float] | None = None,
    *,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    max_dets: int | None = 100,
) -> ImageEval:
    """Greedy COCO matching of one image's detections, best score first."""
    s = score_array(ov, scores)
    order = np.argsort(-s, kind="mergesort")[:max_dets]
    rank = np.full(len(s), -1)
    rank[order] = np.arange(len(order))
    candidates = _candidates(ov, rank, len(order))
    matched = np.zeros((len(thresholds), len(order)), dtype=bool)
    for ti, t in enumerate(thresholds):
        taken = np.zeros(len(ov.ref_ids), dtype=bool)
        for d, (refs, ious) in enumerate(candidates):
            best, best_iou = -1, min(t, 1 - 1e-10)
            for g, iou in zip(refs, ious, strict=True):
                if not taken[g] and iou >= best_iou:
                    best, best_iou = g, iou
            if best >= 0:
                taken[best] = matched[ti, d] = True
    return ImageEval(s[order], matched, len(ov.ref_ids))


def _candidates(ov: Overlaps, rank: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per kept detection (in rank order): its intersecting references (ascending) and IoUs."""
    iou = ov.iou
    r = rank[ov.pair_pred]
    keep = r >= 0
    order = np.lexsort((ov.pair_ref[keep], r[keep]))
    rk, refs, ious = r[keep][order], ov.pair_ref[keep][order], iou[keep][order]
    bounds = np.searchsorted(rk, np.arange(n + 1))
    return [(refs[bounds[d] : bounds[d + 1]], ious[bounds[d] : bounds[d + 1]]) for d in range(n)]


def coco_summary(evals: Sequence[ImageEval], *, thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict:
    """AP (mean over IoU .50:.95), AP50, AP75 and AR of one or more images, as pycocotools.

    With no reference object in any image the scores are NaN (pycocotools prints -1).
    """
    n_ref = sum(e.n_ref for e in evals)
    scores = np.concatenate([e.scores for e in evals]) if evals else np.zeros(0)
    matched = np.concatenate([e.matched for e in evals], axis=1) if evals else np.zeros((len(thresholds), 0))
    order = np.argsort(-scores, kind="mergesort")
    precision = np.zeros((len(thresholds), len(RECALL_POINTS)))
    recall = np.zeros(len(thresholds))
    if n_ref == 0:
        nan = float("nan")
        return {"AP": nan, "AP50": nan, "AP75": nan, "AR": nan}
    for ti in range(len(thresholds)):
        precision[ti], recall[ti] = _interpolated(matched[ti, order], n_ref)
    th = np.asarray(thresholds)
    return {
        "AP": float(precision.mean()),
        "AP50": _at(precision, th, 0.5),
        "AP75": _at(precision, th, 0.75),
        "AR": float(recall.mean()),
    }


def _at(precision: np.ndarray, thresholds: np.ndarray, t: float) -> float:
    hit = np.flatnonzero(np.isclose(thresholds, t))
    return float(precision[hit[0]].mean()) if len(hit) else float("nan")


def _interpolated(tps: np.ndarray, n_ref: int) -> tuple[np.ndarray, float]:
    """101-point interpolated precision and final recall of detections sorted by score."""
    tp = np.cumsum(tps).astype(np.float64)
    fp = np.cumsum(~tps).astype(np.float64)
    q = np.zeros(len(RECALL_POINTS))
    if len(tp) == 0:
        return q, 0.0
    rc = tp / n_ref
    pr = tp / (fp + tp + np.spacing(1))
    pr = np.maximum.accumulate(pr[::-1])[::-1]
    idx = np.searchsorted(rc, RECALL_POINTS, side="left")
    ok = idx < len(pr)
    q[ok] = pr[idx[ok]]
    return q, float(rc[-1])


def coco_metrics(
    ov: Overlaps, scores: Mapping[int, float] | None = None, *, max_dets: int | None = 100
) -> dict:
    """AP, AP50, AP75 and AR of one image (see :func:`coco_summary`)."""
    return coco_summary([evaluate_image(ov, scores, max_dets=max_dets)])


def match_at(ov: Overlaps, threshold: float) -> Matching:
    """Largest one-to-one matching of pairs with IoU >= ``threshold`` (any threshold > 0).

    Above 0.5 the matching is unique; below, a maximum bipartite matching gives the most pairs.
    """
    ok = ov.iou >= threshold
    graph = csr_matrix(
        (np.ones(int(ok.sum())), (ov.pair_pred[ok], ov.pair_ref[ok])),
        shape=(len(ov.pred_ids), len(ov.ref_ids)),
    )
    tp = int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum()) if ok.any() else 0
    return Matching(tp, len(ov.pred_ids) - tp, len(ov.ref_ids) - tp)


def f1_scores(ov: Overlaps, thresholds: Sequence[float] = (0.5, 0.75)) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and counts of the one-to-one matching at each IoU threshold."""
    out = {}
    for t in thresholds:
        m = match_at(ov, t)
        out[f"{t:g}"] = {
            "tp": m.tp,
            "fp": m.fp,
            "fn": m.fn,
            "precision": m.precision,
            "recall": m.recall,
            "f1": m.f1,
        }
    return out
