"""Per-object statistics as chunk-additive partials (pure numpy / pandas)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def object_partials(
    labels: np.ndarray, start: tuple[int, ...], classes: np.ndarray | None = None
) -> pd.DataFrame:
    """Count, coordinate sums and bounding box of every id in one chunk's labels.

    ``start`` is the chunk's origin in the image; ``classes`` (same shape) gives each pixel's
    class, or ``None`` for single-class outputs. Rows combine across chunks with
    :func:`combine_partials`.
    """
    flat = labels.ravel()
    fg = flat != 0
    ids, inverse, counts = np.unique(flat[fg], return_inverse=True, return_counts=True)
    frame = pd.DataFrame({"id": ids.astype(np.uint64), "count": counts.astype(np.int64)})
    coords = np.unravel_index(np.flatnonzero(fg), labels.shape)
    for axis, (c, s0) in enumerate(zip(coords, start, strict=True)):
        g = c.astype(np.int64) + s0
        frame[f"sum{axis}"] = np.bincount(inverse, weights=g.astype(np.float64), minlength=len(ids))
        lo = np.full(len(ids), np.iinfo(np.int64).max)
        hi = np.full(len(ids), -1, dtype=np.int64)
        np.minimum.at(lo, inverse, g)
        np.maximum.at(hi, inverse, g)
        frame[f"min{axis}"], frame[f"max{axis}"] = lo, hi
    frame["class"] = _majority_class(inverse, classes.ravel()[fg], len(ids)) if classes is not None else 1
    return frame


def _majority_class(inverse: np.ndarray, cls: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    np.maximum.at(out, inverse, cls.astype(np.int64))  # one class per id: max == the class
    return out


def combine_partials(parts: list[pd.DataFrame], ndim: int) -> pd.DataFrame:
    """Sum counts and coordinate sums, min/max the boxes, per id; centroids in pixel units."""
    frame = pd.concat(parts, ignore_index=True)
    agg: dict[str, str] = {"count": "sum", "class": "max"}
    for axis in range(ndim):
        agg.update({f"sum{axis}": "sum", f"min{axis}": "min", f"max{axis}": "max"})
    out = frame.groupby("id", sort=True).agg(agg).reset_index()
    for axis in range(ndim):
        out[f"centroid{axis}"] = out.pop(f"sum{axis}") / out["count"]
    return out
