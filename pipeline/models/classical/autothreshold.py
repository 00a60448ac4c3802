"""Automatic global thresholds computed from the whole image's exact histogram.

Each kernel takes a :class:`~pipeline.models.classical.histogram.GlobalHistogram` (the
histogram ``skimage.exposure.histogram`` would compute on all valid values) and returns the
value the matching ``skimage.filters.threshold_*`` function returns on the whole array:

- Otsu, Yen and multi-Otsu call skimage with ``hist=``;
- triangle re-implements ``skimage.filters.threshold_triangle`` (0.26), which takes no
  histogram argument, line for line on the same histogram;
- Li on integer data re-implements skimage's integer branch (it already iterates on the
  integer histogram); float data goes through :mod:`pipeline.models.classical.li`.

:func:`fit_threshold` is the glue a segmenter calls from ``fit``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, cast

import numpy as np
from skimage.filters import threshold_multiotsu, threshold_otsu, threshold_yen

from pipeline.errors import ConfigError
from pipeline.models.base import Reducer, Segmenter
from pipeline.models.classical import histogram as hist
from pipeline.models.classical import li

#: Methods usable wherever a parameter accepts "a number or a fitted method".
AutoMethod = Literal["otsu", "yen", "triangle", "li"]
HIST_METHODS = ("otsu", "yen", "triangle")


def otsu(h: hist.GlobalHistogram) -> float:
    """``threshold_otsu`` of the whole image."""
    if h.constant:
        return float(h.lo)
    return float(threshold_otsu(hist=(h.counts.astype(np.float32), h.centers)))


def yen(h: hist.GlobalHistogram) -> float:
    """``threshold_yen`` of the whole image."""
    if h.constant:
        return float(h.lo)
    return float(threshold_yen(hist=(h.counts, h.centers)))


def multi_otsu(h: hist.GlobalHistogram, classes: int) -> np.ndarray:
    """``threshold_multiotsu(image, classes)`` of the whole image (``classes - 1`` values).

    skimage normalises the histogram it computes from an image (but not one passed as
    ``hist``), so the probabilities are passed here exactly as it would compute them.
    """
    present = int(np.count_nonzero(h.counts))
    if present < classes:
        raise ConfigError(
            f"segmenter.params.classes {classes}: the image has only {present} distinct "
            f"value(s) after binning, so it cannot be split into {classes} classes. Use fewer "
            "classes, or more nbins for float data."
        )
    prob = h.counts / np.sum(h.counts)
    return np.asarray(threshold_multiotsu(hist=(prob, h.centers), classes=classes), dtype=np.float64)


def triangle(h: hist.GlobalHistogram) -> float:
    """``threshold_triangle`` of the whole image (skimage 0.26 algorithm on this histogram)."""
    if h.constant:
        return float(h.lo)
    counts, nbins = h.counts, len(h.counts)
    arg_peak = int(np.argmax(counts))
    peak_height = counts[arg_peak]
    arg_low, arg_high = np.flatnonzero(counts)[[0, -1]]
    flip = arg_peak - arg_low < arg_high - arg_peak
    if flip:
        counts = counts[::-1]
        arg_low = nbins - arg_high - 1
        arg_peak = nbins - arg_peak - 1
    width = arg_peak - arg_low
    x1 = np.arange(width)
    y1 = counts[x1 + arg_low]
    norm = np.sqrt(peak_height**2 + width**2)
    length = (peak_height / norm) * x1 - (width / norm) * y1
    arg_level = int(np.argmax(length)) + arg_low
    if flip:
        arg_level = nbins - arg_level - 1
    return float(h.centers[arg_level])


def li_integer(h: hist.GlobalHistogram) -> float:
    """``threshold_li`` of an integer image, from its exact integer histogram.

    skimage shifts the image to start at 0, starts at its mean, and iterates on the
    integer histogram (float32 counts) with tolerance 0.5: the same steps run here. The
    mean of integers is an exact integer sum divided by the count, as in ``np.mean``.
    """
    if h.constant:
        return float(h.lo)
    centers = np.arange(0, int(h.hi) - int(h.lo) + 1)
    counts = h.counts.astype(np.float32)
    t_next = float(int(np.sum(centers * h.counts))) / int(np.sum(h.counts))
    t_curr, tolerance = -1.0, 0.5
    while abs(t_next - t_curr) > tolerance:
        t_curr = t_next
        fg = centers > t_curr
        mean_fore = np.average(centers[fg], weights=counts[fg])
        mean_back = np.average(centers[~fg], weights=counts[~fg])
        if mean_back == 0:
            break
        t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
    return float(t_next + h.lo)


def fit_threshold(
    reduce: Reducer, values: hist.ValuesFn, method: AutoMethod, *, nbins: int, what: str, max_iter: int = 100
) -> float:
    """One global threshold of ``values`` over the whole image by ``method``.

    Otsu, Yen and triangle use the exact histogram (``nbins`` bins for float data, one
    per integer otherwise); Li uses the integer histogram or, for float data, the exact
    fixed-point iteration of :func:`pipeline.models.classical.li.fit_li_float`.
    """
    h = hist.fit_histogram(reduce, values, nbins, what=what)
    if method == "li":
        if h.integer or h.constant:
            return li_integer(h)
        return li.fit_li_float(reduce, values, float(h.lo), max_iter=max_iter)
    return {"otsu": otsu, "yen": yen, "triangle": triangle}[method](h)


class GlobalThreshold(Segmenter):
    """Base of segmenters whose ``params.threshold`` is a number or a method fitted globally.

    Subclasses set ``self.threshold`` for a fixed number and provide ``core_values``.
    """

    threshold: float | None = None
    params: Any

    def core_values(self, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]) -> np.ndarray:
        """The values the global threshold is fitted on (a chunk's core)."""
        raise NotImplementedError

    def fit(self, reduce: Reducer) -> GlobalThreshold:
        t = self.params.threshold
        if not isinstance(t, str):
            return self
        fitted = copy.copy(self)
        method = cast(AutoMethod, t)  # validated by the params model
        fitted.threshold = fit_threshold(
            reduce, self.core_values, method, nbins=self.params.nbins, what=self.name
        )
        return fitted

    def fitted_values(self) -> dict[str, Any]:
        return {"threshold": self.threshold} if isinstance(self.params.threshold, str) else {}

    def fitted_threshold(self) -> float:
        """The threshold to apply; an error before a method-named threshold is fitted."""
        if self.threshold is None:
            raise ConfigError(f"{self.name} must be fitted before it is applied (call fit first)")
        return self.threshold
