"""Instance matching: one-to-one matches at an IoU threshold, precision, recall and F1."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Matching:
    """Counts of a one-to-one matching between predicted and reference instances."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        """tp / predicted."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """tp / reference."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        total = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / total if total else 1.0


def match_instances(pred: np.ndarray, ref: np.ndarray, iou_threshold: float = 0.5) -> Matching:
    """Match instances whose IoU exceeds ``iou_threshold`` (>= 0.5: matches are unique).

    Gathers both label arrays (this is a whole-array metric, for images that fit in memory).
    """
    if iou_threshold < 0.5:
        raise ValueError("iou_threshold below 0.5 needs an assignment solver; use >= 0.5")
    p, r = pred.ravel(), ref.ravel()
    ids_p, area_p = np.unique(p[p != 0], return_counts=True)
    ids_r, area_r = np.unique(r[r != 0], return_counts=True)
    both = (p != 0) & (r != 0)
    keys, inter = np.unique(np.stack([p[both], r[both]], axis=1), axis=0, return_counts=True)
    union = area_p[np.searchsorted(ids_p, keys[:, 0])] + area_r[np.searchsorted(ids_r, keys[:, 1])] - inter
    tp = int(((inter / union) > iou_threshold).sum()) if len(keys) else 0
    return Matching(tp, len(ids_p) - tp, len(ids_r) - tp)
