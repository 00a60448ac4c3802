"""Sparse pixel counts of (reference value, predicted value) pairs: the chunk-additive partial.

Every metric that decomposes over chunks derives from this table: the semantic confusion matrix
(values are classes), instance overlaps (values are object ids) and panoptic segment overlaps.
A chunk gives one :class:`Contingency`; tables of chunks add with ``+`` or :func:`combine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InvalidImageError


@dataclass(frozen=True)
class Contingency:
    """``count[k]`` pixels have reference value ``ref[k]`` and predicted value ``pred[k]``.

    Pairs are unique and sorted by (ref, pred); all three arrays are int64.
    """

    ref: np.ndarray
    pred: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls) -> Contingency:
        """The table of no pixels (the identity of ``+``)."""
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z)

    def __add__(self, other: Contingency) -> Contingency:
        return combine([self, other])

    @property
    def total(self) -> int:
        """Number of pixels counted."""
        return int(self.count.sum())

    def ref_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted reference values and their pixel counts."""
        return _sum_by(self.ref, self.count)

    def pred_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted predicted values and their pixel counts."""
        return _sum_by(self.pred, self.count)

    def dense(self, classes: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(classes, matrix)`` with ``matrix[i, j]`` = pixels of reference ``classes[i]``
        predicted as ``classes[j]``; by default the classes are every value seen in either.

        Pairs with a value outside ``classes`` are left out of the matrix.
        """
        cls = np.union1d(self.ref, self.pred) if classes is None else np.asarray(classes, np.int64)
        matrix = np.zeros((len(cls), len(cls)), dtype=np.int64)
        ri, pi = np.searchsorted(cls, self.ref), np.searchsorted(cls, self.pred)
        ok = _found(cls, self.ref, ri) & _found(cls, self.pred, pi)
        np.add.at(matrix, (ri[ok], pi[ok]), self.count[ok])
        return cls, matrix


def _found(cls: np.ndarray, values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    inside = idx < len(cls)
    return inside & (cls[np.minimum(idx, max(len(cls) - 1, 0))] == values) if len(cls) else inside


def _sum_by(values: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys, inverse = np.unique(values, return_inverse=True)
    sums = np.zeros(len(keys), dtype=np.int64)
    np.add.at(sums, inverse, count)
    return keys, sums


def contingency(pred: np.ndarray, ref: np.ndarray, *, ignore: int | None = None) -> Contingency:
    """Count the (reference, prediction) value pairs of two same-shaped integer blocks.

    Pixels whose reference equals ``ignore`` are not counted (the prediction's value there
    does not matter).
    """
    if pred.shape != ref.shape:
        raise InvalidImageError(f"prediction block {pred.shape} and reference block {ref.shape} differ")
    p, r = _as_int(pred, "prediction"), _as_int(ref, "reference")
    if ignore is not None:
        keep = r != ignore
        p, r = p[keep], r[keep]
    rv, ri = np.unique(r, return_inverse=True)
    pv, pi = np.unique(p, return_inverse=True)
    codes, counts = np.unique(ri.astype(np.int64) * len(pv) + pi, return_counts=True)
    return Contingency(rv[codes // max(len(pv), 1)], pv[codes % max(len(pv), 1)], counts.astype(np.int64))


def _as_int(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind not in "biu":
        raise InvalidImageError(
            f"{what} has dtype {a.dtype}; label metrics need integer labels (classes or ids). "
            "Round or cast the labels to an integer type first."
        )
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise InvalidImageError(f"{what} has ids above 2**63-1; relabel them sequentially")
    return a.ravel().astype(np.int64, copy=False)


def combine(tables: Sequence[Contingency]) -> Contingency:
    """Sum contingency tables (of chunks, batches or images)."""
    tables = [t for t in tables if len(t.count)]
    if not tables:
        return Contingency.empty()
    ref = np.concatenate([t.ref for t in tables])
    pred = np.concatenate([t.pred for t in tables])
    count = np.concatenate([t.count for t in tables])
    keys, inverse = np.unique(np.stack([ref, pred], axis=1), axis=0, return_inverse=True)
    sums = np.zeros(len(keys), dtype=np.int64)
    np.add.at(sums, inverse.ravel(), count)
    return Contingency(keys[:, 0].copy(), keys[:, 1].copy(), sums)
