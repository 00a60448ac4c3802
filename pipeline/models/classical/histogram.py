"""Chunk-additive histograms that reproduce ``skimage.exposure.histogram`` exactly.

Integer data: one bin per integer between the global minimum and maximum (skimage's
``bincount`` path). Float data: ``nbins`` equal bins over ``[min, max]`` (skimage's
``np.histogram`` path). Both are sums over chunks, so a Dask reduction gives the same
histogram as the whole array, and :func:`skimage.filters.threshold_otsu` on it gives the
same threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.models.base import Reducer

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


#: ``values(block, valid, core) -> 1-D values`` of one chunk's core (picklable).
ValuesFn = Callable[[np.ndarray, np.ndarray, tuple[slice, ...]], np.ndarray]


@dataclass(frozen=True)
class GlobalHistogram:
    """The whole image's histogram, equal to ``skimage.exposure.histogram`` of all valid values.

    ``lo == hi`` (a constant image) leaves ``counts`` and ``centers`` with one bin.
    """

    counts: np.ndarray
    centers: np.ndarray
    lo: Any
    hi: Any

    @property
    def constant(self) -> bool:
        """True when every valid value is the same."""
        return bool(self.lo == self.hi)

    @property
    def integer(self) -> bool:
        """True for integer data (one bin per integer value)."""
        return bool(np.issubdtype(np.asarray(self.lo).dtype, np.integer))


def fit_histogram(reduce: Reducer, values: ValuesFn, nbins: int, *, what: str) -> GlobalHistogram:
    """Global histogram of ``values`` over every chunk: one min/max pass, one counting pass.

    Raises :class:`ConfigError` naming ``what`` when the image has no valid value.
    """
    rng = reduce(partial(_partial_minmax, values), combine_minmax)
    if rng is None:
        raise ConfigError(
            f"{what}: the image has no valid pixel (all nodata); nothing to fit. "
            "Check the nodata value and the bands."
        )
    lo, hi = rng
    if lo == hi:
        return GlobalHistogram(np.ones(1, np.int64), np.asarray([lo]), lo, hi)
    counts = reduce(partial(_partial_hist, values, lo, hi, nbins), add)
    return GlobalHistogram(counts, bin_centers(np.asarray(lo).dtype, lo, hi, nbins), lo, hi)


def _partial_minmax(
    values: ValuesFn, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]
) -> MinMax:
    return minmax(values(block, valid, core))


def _partial_hist(
    values: ValuesFn,
    lo: Any,
    hi: Any,
    nbins: int,
    block: np.ndarray,
    valid: np.ndarray,
    core: tuple[slice, ...],
) -> np.ndarray:
    return histogram(values(block, valid, core), lo, hi, nbins)
