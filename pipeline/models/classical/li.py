"""Li's minimum cross-entropy threshold for float data, exact and independent of the chunking.

``skimage.filters.threshold_li`` iterates on the raw float values: each step needs the mean
of the values above and below the current threshold. Summing floats chunk by chunk would
make those means (and so the threshold) depend on the chunking, in the last bits. Here
every chunk returns its sums *exactly* (as integers scaled by ``2**SCALE``, see
:func:`exact_sum`), the engine adds them, and each mean is rounded once. The iteration is
skimage's (shift to a minimum of 0, start at the mean, ``t = (mb - mf) / (ln mb - ln mf)``),
run until the partition of the pixels stops changing: a true fixed point, where skimage
stops once a step is below half the smallest gap between values. The result equals
skimage's up to that stopping rule and float32 rounding in its sums (tested on real data).
"""

from __future__ import annotations

import logging
import math
from functools import partial

import numpy as np

from pipeline.models.base import Reducer
from pipeline.models.classical import histogram as hist

log = logging.getLogger(__name__)

#: ``x * 2**SCALE`` is an integer for every finite float64 ``x`` (smallest exponent -1074).
SCALE = 1126
_HALF = 26
#: ``(n_fg, sum_fg, n_bg, sum_bg)``: counts and exact scaled sums above/below a threshold.
Sums = tuple[int, int, int, int]


def exact_sum(values: np.ndarray) -> int:
    """``sum(values) * 2**SCALE`` as an exact Python integer (finite values only).

    Each value is ``mantissa * 2**(exponent - 53)`` with an integer mantissa; mantissas are
    split in two 26/27-bit halves and summed in int64 per exponent, which cannot overflow
    below 2**36 values, then shifted into place as Python integers.
    """
    if values.size == 0:
        return 0
    frac, exp = np.frexp(values.astype(np.float64, copy=False).ravel())
    mant = (frac * 2.0**53).astype(np.int64)
    order = np.argsort(exp, kind="stable")
    exp_sorted = exp[order]
    starts = np.flatnonzero(np.r_[True, exp_sorted[1:] != exp_sorted[:-1]])
    high = np.add.reduceat(mant[order] >> _HALF, starts)
    low = np.add.reduceat(mant[order] & ((1 << _HALF) - 1), starts)
    total = 0
    for e, h, lo in zip(exp_sorted[starts].tolist(), high.tolist(), low.tolist(), strict=True):
        total += ((h << _HALF) + lo) << (e - 53 + SCALE)
    return total


def split_sums(values: np.ndarray, threshold: float) -> Sums:
    """Counts and exact sums of ``values > threshold`` and of the rest."""
    fg = values > threshold
    return int(fg.sum()), exact_sum(values[fg]), int(fg.size - fg.sum()), exact_sum(values[~fg])


def add_sums(a: Sums, b: Sums) -> Sums:
    """Combine two partial :data:`Sums`."""
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])


def shifted_mean(count: int, total: int, vmin: float) -> float:
    """Mean of values minus ``vmin``, from an exact scaled sum, rounded once."""
    return (total - count * exact_sum(np.asarray([vmin]))) / (count << SCALE)


def li_step(sums: Sums, vmin: float) -> float | None:
    """Next threshold (in image units) from the current partition, or None to stop."""
    n_fg, s_fg, n_bg, s_bg = sums
    if n_fg == 0 or n_bg == 0:
        return None
    mean_fore, mean_back = shifted_mean(n_fg, s_fg, vmin), shifted_mean(n_bg, s_bg, vmin)
    if mean_back == 0:
        return None
    t = (mean_back - mean_fore) / (math.log(mean_back) - math.log(mean_fore))
    return t + vmin


def fit_li_float(reduce: Reducer, values: hist.ValuesFn, vmin: float, *, max_iter: int = 100) -> float:
    """Li's threshold of ``values`` over the whole image (one reduction per iteration)."""
    n, total, _, _ = reduce(partial(_partial_sums, values, -math.inf), add_sums)
    threshold = shifted_mean(n, total, vmin) + vmin
    previous = -1
    for _ in range(max_iter):
        sums = reduce(partial(_partial_sums, values, threshold), add_sums)
        if sums[0] == previous:
            return threshold
        step = li_step(sums, vmin)
        if step is None:
            return threshold
        threshold, previous = step, sums[0]
    log.warning("li: no fixed point after %d iterations; using the last threshold %g", max_iter, threshold)
    return threshold


def _partial_sums(
    values: hist.ValuesFn, threshold: float, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]
) -> Sums:
    return split_sums(values(block, valid, core), threshold)
