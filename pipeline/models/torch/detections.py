"""Instance detections with masks kept at box size, and pasting them into a label image.

Detectors (Mask R-CNN, YOLO-seg decoders, ...) return :class:`Detections` for one window:
boxes in the window's pixel coordinates, scores, class labels, and one mask of probabilities
per object covering only that object's integer box (``mask_boxes``). No per-object mask the
size of the window is ever built: memory grows with the objects' areas, not with their number
times the window. :func:`paste` turns detections into a ``uint32`` label image (higher score
wins where masks overlap); :func:`touches_cut_edges` finds detections a tile edge cuts.

Coordinates: pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``; boxes are
``x0, y0, x1, y1`` (columns then rows) with ``x1``/``y1`` exclusive pixel edges, as numpy slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Objects found in one window.

    ``boxes`` ``(N, 4)`` float32 ``x0, y0, x1, y1`` in window pixels; ``scores`` ``(N,)`` float32;
    ``labels`` ``(N,)`` int64 class ids; ``masks[i]`` float32 probabilities of shape
    ``(y1 - y0, x1 - x0)`` of ``mask_boxes[i]``, the integer box ``x0, y0, x1, y1`` (int64,
    inside the window) the mask covers.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: list[np.ndarray] = field(default_factory=list)
    mask_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if not (len(self.scores) == len(self.labels) == len(self.masks) == len(self.mask_boxes) == n):
            raise ValueError(
                f"Detections: {n} boxes, {len(self.scores)} scores, {len(self.labels)} labels, "
                f"{len(self.masks)} masks and {len(self.mask_boxes)} mask boxes; give one of each per object"
            )
        for m, (x0, y0, x1, y1) in zip(self.masks, self.mask_boxes, strict=True):
            if m.shape != (y1 - y0, x1 - x0):
                raise ValueError(f"mask of shape {m.shape} does not cover its box {(x0, y0, x1, y1)}")

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls) -> Detections:
        """No objects."""
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.int64),
            [],
            np.zeros((0, 4), np.int64),
        )

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        """All objects of ``parts`` (in the same frame), in order."""
        parts = [d for d in parts if len(d)]
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([d.boxes for d in parts]),
            np.concatenate([d.scores for d in parts]),
            np.concatenate([d.labels for d in parts]),
            [m for d in parts for m in d.masks],
            np.concatenate([d.mask_boxes for d in parts]),
        )

    def select(self, keep: np.ndarray | Sequence[int]) -> Detections:
        """The detections at ``keep`` (a boolean mask or indices), in that order."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
        return Detections(
            self.boxes[idx],
            self.scores[idx],
            self.labels[idx],
            [self.masks[i] for i in idx],
            self.mask_boxes[idx],
        )

    def shifted(self, rows: int, cols: int) -> Detections:
        """The same objects in a frame whose origin is ``(rows, cols)`` pixels before this one's."""
        off = np.array([cols, rows, cols, rows])
        return Detections(
            self.boxes + off.astype(np.float32),
            self.scores,
            self.labels,
            self.masks,
            self.mask_boxes + off.astype(np.int64),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the masks (at box size)."""
        return int(sum(m.nbytes for m in self.masks))


def integer_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels each float box touches: ``floor(x0), floor(y0), ceil(x1), ceil(y1)`` clipped to
    ``shape`` ``(rows, cols)``, at least one pixel wide and high (int64 ``(N, 4)``)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = shape
    x0 = np.clip(np.floor(b[:, 0]), 0, w - 1)
    y0 = np.clip(np.floor(b[:, 1]), 0, h - 1)
    x1 = np.clip(np.ceil(b[:, 2]), x0 + 1, w)
    y1 = np.clip(np.ceil(b[:, 3]), y0 + 1, h)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def _axis_weights(lo: float, hi: float, start: int, stop: int, m: int) -> np.ndarray:
    """Linear interpolation weights ``(stop - start, m)`` from ``m`` mask cells spanning
    ``[lo, hi)`` to the pixels ``start..stop``.

    Cell ``j`` is sampled at ``lo + (j + 0.5) * (hi - lo) / m`` where pixel ``i`` is at ``i``
    (torchvision's ``roi_align(aligned=False)``, which made the training targets); pixels past the
    first or last cell take its value.
    """
    step = max(hi - lo, 1e-6) / m
    u = (np.arange(start, stop, dtype=np.float64) - lo) / step - 0.5
    u = np.clip(u, 0.0, m - 1.0)
    j0 = np.floor(u).astype(np.int64)
    j1 = np.minimum(j0 + 1, m - 1)
    t = u - j0
    out = np.zeros((stop - start, m), np.float64)
    rows = np.arange(stop - start)
    np.add.at(out, (rows, j0), 1.0 - t)
    np.add.at(out, (rows, j1), t)
    return out


def masks_at_box_size(
    roi_masks: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Fixed-size mask probabilities ``(N, M, M)`` (e.g. Mask R-CNN's 28x28) resized to each box.

    Returns the masks (float32, one per object, at its integer box's size) and the integer boxes
    (:func:`integer_boxes`). Bilinear, separable: two small matrix products per object.
    """
    roi = np.asarray(roi_masks, np.float32).reshape(len(boxes), *np.shape(roi_masks)[-2:])
    ints = integer_boxes(boxes, shape)
    out = []
    for m, b, (x0, y0, x1, y1) in zip(roi, np.asarray(boxes, np.float64).reshape(-1, 4), ints, strict=True):
        ry = _axis_weights(b[1], b[3], int(y0), int(y1), m.shape[0])
        rx = _axis_weights(b[0], b[2], int(x0), int(x1), m.shape[1])
        out.append((ry @ m.astype(np.float64) @ rx.T).astype(np.float32))
    return out, ints


def paste(
    detections: Detections,
    shape: tuple[int, int],
    mask_threshold: float = 0.5,
    score_threshold: float = 0.0,
    min_visible: float = 0.0,
) -> np.ndarray:
    """A ``uint32`` label image of ``shape``: objects 1..n in order of decreasing score.

    Each detection scoring at least ``score_threshold`` claims the pixels of its mask at or
    above ``mask_threshold`` that no higher-scoring detection claimed; a detection left with no
    pixel, or with less than ``min_visible`` of its mask (a duplicate of higher-scoring ones), gets
    no id. Only box-sized arrays are touched per object.
    """
    labels = np.zeros(shape, np.uint32)
    order = np.argsort(-np.asarray(detections.scores, np.float64), kind="stable")
    next_id = 1
    for i in order:
        if detections.scores[i] < score_threshold:
            break
        x0, y0, x1, y1 = (int(v) for v in detections.mask_boxes[i])
        a0, b0 = max(y0, 0), max(x0, 0)
        a1, b1 = min(y1, shape[0]), min(x1, shape[1])
        if a1 <= a0 or b1 <= b0:
            continue
        region = labels[a0:a1, b0:b1]
        mask = detections.masks[i][a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] >= mask_threshold
        area = int(np.count_nonzero(mask))
        mask &= region == 0
        left = int(np.count_nonzero(mask))
        if left and left >= min_visible * area:
            region[mask] = next_id
            next_id += 1
    return labels


def touches_cut_edges(
    detections: Detections,
    shape: tuple[int, int],
    cut: Sequence[tuple[bool, bool]],
    margin: float = 1.0,
) -> np.ndarray:
    """Which detections reach within ``margin`` pixels of a window edge that cuts the image.

    ``cut`` is ``((top, bottom), (left, right))``: whether each edge of the window lies inside
    the image (a neighbouring tile continues there) rather than on its border. Such objects are
    probably cut off; the tile that holds them whole reports them. Edges on the image border
    never drop anything.
    """
    b = np.asarray(detections.boxes, np.float64).reshape(-1, 4)
    h, w = shape
    (top, bottom), (left, right) = cut
    out = np.zeros(len(b), bool)
    if top:
        out |= b[:, 1] < margin
    if bottom:
        out |= b[:, 3] > h - margin
    if left:
        out |= b[:, 0] < margin
    if right:
        out |= b[:, 2] > w - margin
    return out


def mask_iou(a: Detections, i: int, b: Detections, j: int, mask_threshold: float = 0.5) -> float:
    """IoU of two detections' thresholded masks (computed on their boxes only)."""
    mi, mj = a.masks[i] >= mask_threshold, b.masks[j] >= mask_threshold
    bi, bj = a.mask_boxes[i], b.mask_boxes[j]
    x0, y0 = max(bi[0], bj[0]), max(bi[1], bj[1])
    x1, y1 = min(bi[2], bj[2]), min(bi[3], bj[3])
    inter = 0
    if x1 > x0 and y1 > y0:
        pi = mi[y0 - bi[1] : y1 - bi[1], x0 - bi[0] : x1 - bi[0]]
        pj = mj[y0 - bj[1] : y1 - bj[1], x0 - bj[0] : x1 - bj[0]]
        inter = int(np.count_nonzero(pi & pj))
    union = int(mi.sum()) + int(mj.sum()) - inter
    return inter / union if union else 0.0


def suppress_duplicates(
    detections: Detections, iou_threshold: float = 0.5, mask_threshold: float = 0.5
) -> Detections:
    """Greedy non-maximum suppression by mask IoU: of detections whose thresholded masks overlap
    with IoU above ``iou_threshold``, the highest-scoring is kept (order: decreasing score).
    Only pairs whose boxes intersect are compared."""
    n = len(detections)
    if n < 2:
        return detections
    order = np.argsort(-np.asarray(detections.scores, np.float64), kind="stable")
    b = detections.mask_boxes
    kept: list[int] = []
    for i in order:
        if kept:
            k = np.asarray(kept)
            hit = (np.maximum(b[k, 0], b[i, 0]) < np.minimum(b[k, 2], b[i, 2])) & (
                np.maximum(b[k, 1], b[i, 1]) < np.minimum(b[k, 3], b[i, 3])
            )
            if any(
                mask_iou(detections, int(i), detections, int(j), mask_threshold) > iou_threshold
                for j in k[hit]
            ):
                continue
        kept.append(int(i))
    return detections.select(np.asarray(kept, np.int64))
