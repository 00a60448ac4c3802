"""Chunk-additive histograms that reproduce ``skimage.exposure.histogram`` exactly.

Integer data: one bin per integer between the global minimum and maximum (skimage's
``bincount`` path). Float data: ``nbins`` equal bins over ``[min, max]`` (skimage's
``np.histogram`` path). Both are sums over chunks, so a Dask reduction gives the same
histogram as the whole array, and :func:`skimage.filters.threshold_otsu` on it gives the
same threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MinMax = tuple[Any, Any] | None


def minmax(values: np.ndarray) -> MinMax:
    """``(min, max)`` of a 1-D array as numpy scalars, or ``None`` when it is empty."""
    if values.size == 0:
        return None
    return values.min(), values.max()


def combine_minmax(a: MinMax, b: MinMax) -> MinMax:
    """Combine two partial ``(min, max)`` results."""
    if a is None or b is None:
        return a if b is None else b
    return min(a[0], b[0]), max(a[1], b[1])


def histogram(values: np.ndarray, lo: Any, hi: Any, nbins: int) -> np.ndarray:
    """Counts of ``values`` in the bins that skimage would use for global range ``[lo, hi]``."""
    if np.issubdtype(values.dtype, np.integer):
        offset = values.astype(np.int64) - int(lo)
        return np.bincount(offset, minlength=int(hi) - int(lo) + 1).astype(np.int64)
    counts, _ = np.histogram(values, bins=nbins, range=(lo, hi))
    return counts.astype(np.int64)


def bin_centers(dtype: np.dtype, lo: Any, hi: Any, nbins: int) -> np.ndarray:
    """Bin centres matching :func:`histogram`."""
    if np.issubdtype(dtype, np.integer):
        return np.arange(int(lo), int(hi) + 1)
    _, edges = np.histogram(np.asarray([lo, hi], dtype=dtype), bins=nbins, range=(lo, hi))
    return (edges[:-1] + edges[1:]) / 2.0


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Combine two partial histograms."""
    return a + b
