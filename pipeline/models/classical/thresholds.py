"""Global automatic thresholds (multi-Otsu, Li, Yen, triangle) and the local (adaptive) one.

The global methods fit one threshold (or ``classes - 1`` thresholds) on the whole image
through the engine's reducer (see :mod:`~pipeline.models.classical.autothreshold`), so the
tiled result equals ``skimage.filters.threshold_*`` on the full array. The local threshold
is ``skimage.filters.threshold_local`` on each block with a halo of the neighbourhood's
radius, which makes the halo crop exact. All work on one band, in 2D and 3D, with the
optional Gaussian pre-smoothing of :class:`~pipeline.models.classical.threshold.BandSegmenter`.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from scipy import ndimage
from skimage.filters import threshold_local

from pipeline.errors import ConfigError
from pipeline.models.base import Reducer, Segmenter, register
from pipeline.models.classical import autothreshold as auto
from pipeline.models.classical import histogram as hist
from pipeline.models.classical.threshold import BandParams, BandSegmenter

Foreground = Literal["above", "below"]
MAX_CLASSES = 254  # labels are uint8 and 255 is nodata


def binary_labels(
    values: np.ndarray, valid: np.ndarray, threshold: float | np.ndarray, foreground: Foreground
) -> np.ndarray:
    """Pure kernel: 1 where ``values > threshold`` (``above``) or ``<=`` (``below``), 255 off ``valid``.

    ``threshold`` may be an array of the same shape (local thresholds).
    """
    above = values > threshold
    out = (above if foreground == "above" else ~above).astype(np.uint8)
    out[~valid] = Segmenter.nodata_label
    return out


def level_labels(values: np.ndarray, valid: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Pure kernel: class ``i`` where ``thresholds[i-1] <= v < thresholds[i]`` (``np.digitize``)."""
    out = np.digitize(values, bins=thresholds).astype(np.uint8)
    out[~valid] = Segmenter.nodata_label
    return out


class AutoParams(BandParams):
    foreground: Foreground = Field("above", description="foreground: value > threshold (above) or <= (below)")
    class_name: str = Field("foreground", description="name of the foreground class")
    nbins: int = Field(256, ge=2, description="histogram bins for float data (integers use 1 per value)")


class LiParams(AutoParams):
    max_iter: int = Field(100, ge=1, description="float data: most iterations (one pass over the image each)")


class _AutoThreshold(BandSegmenter):
    """One global threshold fitted by ``method`` on the whole image's values."""

    method: ClassVar[auto.AutoMethod]
    params: AutoParams
    threshold: float | None = None

    @property
    def classes(self) -> dict[int, str]:
        return {0: "background", 1: self.params.class_name}

    def fit(self, reduce: Reducer) -> _AutoThreshold:
        fitted = copy.copy(self)
        fitted.threshold = auto.fit_threshold(
            reduce,
            self.core_values,
            self.method,
            nbins=self.params.nbins,
            what=self.name,
            max_iter=getattr(self.params, "max_iter", 100),
        )
        return fitted

    def fitted_values(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise ConfigError(f"{self.name} must be fitted before it is applied (call fit first)")
        return binary_labels(self.feature(block), valid, self.threshold, self.params.foreground)


@register
class Li(_AutoThreshold):
    """Li's minimum cross-entropy threshold (``skimage.filters.threshold_li``), fitted globally.

    Integer data: exactly skimage's result (its integer branch on the exact histogram).
    Float data (or smoothed bands): the exact, chunking-independent fixed point of
    :mod:`~pipeline.models.classical.li`, one reduction per iteration.
    """

    name = "li"
    summary = "Li minimum cross-entropy threshold fitted on the whole image, applied per chunk"
    Params = LiParams
    method = "li"


@register
class Yen(_AutoThreshold):
    """Yen's maximum-correlation threshold (``skimage.filters.threshold_yen``), fitted globally."""

    name = "yen"
    summary = "Yen threshold fitted on the whole image's histogram, applied per chunk"
    Params = AutoParams
    method = "yen"


@register
class Triangle(_AutoThreshold):
    """Triangle threshold (``skimage.filters.threshold_triangle``), fitted globally."""

    name = "triangle"
    summary = "triangle threshold fitted on the whole image's histogram, applied per chunk"
    Params = AutoParams
    method = "triangle"


class MultiOtsuParams(BandParams):
    classes: int = Field(3, description=f"number of classes k (2..{MAX_CLASSES}); k - 1 thresholds")
    class_names: list[str] | None = Field(None, description="k names, darkest class first")
    nbins: int = Field(256, ge=2, description="histogram bins for float data (integers use 1 per value)")

    @field_validator("classes")
    @classmethod
    def _k(cls, k: int) -> int:
        if not 2 <= k <= MAX_CLASSES:
            raise ValueError(f"classes must be between 2 and {MAX_CLASSES} (got {k}); use e.g. classes: 3")
        return k

    @model_validator(mode="after")
    def _names(self) -> MultiOtsuParams:
        if self.class_names is not None and len(self.class_names) != self.classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names for {self.classes} classes; give "
                "one name per class (darkest first) or leave it out"
            )
        return self


@register
class MultiOtsu(BandSegmenter):
    """Multi-Otsu: ``k - 1`` thresholds fitted on the whole image, classes ``0..k-1`` darkest first.

    Equal to ``np.digitize(image, skimage.filters.threshold_multiotsu(image, classes=k))``.
    Cost grows as ``bins ** (k - 1)``: keep ``k`` small for wide integer ranges (e.g. CT).
    """

    name = "multi_otsu"
    summary = "multi-Otsu: k classes by k-1 thresholds fitted on the whole image's histogram"
    Params = MultiOtsuParams
    params: MultiOtsuParams
    thresholds: np.ndarray | None = None

    @property
    def classes(self) -> dict[int, str]:
        names = self.params.class_names or [f"class_{i}" for i in range(self.params.classes)]
        return dict(enumerate(names))

    def fit(self, reduce: Reducer) -> MultiOtsu:
        h = hist.fit_histogram(reduce, self.core_values, self.params.nbins, what=self.name)
        fitted = copy.copy(self)
        fitted.thresholds = auto.multi_otsu(h, self.params.classes)
        return fitted

    def fitted_values(self) -> dict[str, Any]:
        return {"thresholds": None if self.thresholds is None else self.thresholds.tolist()}

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self.thresholds is None:
            raise ConfigError("multi_otsu must be fitted before it is applied (call fit first)")
        return level_labels(self.feature(block), valid, self.thresholds)


class LocalParams(BandParams):
    block_size: int = Field(..., description="odd neighbourhood side in pixels (3, 5, ...); sets the halo")
    method: Literal["gaussian", "mean", "median"] = Field("gaussian", description="local statistic")
    offset: float = Field(0.0, description="subtracted from the local statistic")
    sigma: float | None = Field(None, gt=0, description="gaussian: sigma (default (block_size - 1) / 6)")
    foreground: Foreground = Field("above", description="value > local threshold (above) or <= (below)")
    class_name: str = Field("foreground", description="name of the foreground class")

    @field_validator("block_size")
    @classmethod
    def _odd(cls, b: int) -> int:
        if b < 3:
            raise ValueError(f"block_size must be odd and >= 3 (got {b}); e.g. block_size: 35")
        if b % 2 == 0:
            raise ValueError(f"block_size must be odd (got {b}); use {b - 1} or {b + 1}")
        return b


@register
class LocalThreshold(BandSegmenter):
    """Adaptive threshold: ``value > skimage.filters.threshold_local(image, block_size, method)``.

    Nodata pixels take part in their neighbours' statistics, as they would on the whole
    array; they are labelled 255 themselves.
    """

    name = "local"
    summary = "adaptive threshold (gaussian/mean/median of a block_size neighbourhood)"
    halo_rule = "gaussian: int(4 * sigma + 0.5); mean/median: block_size // 2; plus smoothing"
    Params = LocalParams
    params: LocalParams

    @property
    def sigma(self) -> float:
        """Gaussian sigma of the ``gaussian`` method."""
        return self.params.sigma if self.params.sigma is not None else (self.params.block_size - 1) / 6.0

    @property
    def halo(self) -> int:
        p = self.params
        local = int(4.0 * self.sigma + 0.5) if p.method == "gaussian" else p.block_size // 2
        return local + super().halo

    @property
    def classes(self) -> dict[int, str]:
        return {0: "background", 1: self.params.class_name}

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        values = self.feature(block)
        p = self.params
        local = local_threshold(values, p.block_size, p.method, offset=p.offset, sigma=self.sigma)
        return binary_labels(values, valid, local, p.foreground)


def local_threshold(
    values: np.ndarray, block_size: int, method: str, *, offset: float, sigma: float
) -> np.ndarray:
    """Pure kernel: the local threshold image of ``values`` (reflect mode at the edges).

    ``gaussian`` and ``median`` are ``skimage.filters.threshold_local``. ``mean`` uses
    :func:`box_mean` instead of skimage's running-sum ``uniform_filter``, whose rounding
    depends on where each line starts, so it is not the same on a block and on the whole
    image (tens of pixels flip on ``cell.png`` where a pixel equals its local mean).
    """
    if method == "mean":
        return box_mean(values, block_size) - offset
    return np.asarray(threshold_local(values, block_size, method, offset=offset, mode="reflect", param=sigma))


def box_mean(values: np.ndarray, size: int) -> np.ndarray:
    """Mean over a ``size``-wide box per pixel, summed afresh at every pixel (reflect mode).

    Each output is a fixed-order sum of its own window divided once, so it does not depend
    on the array's extent; on integer-valued data the sums are exact.
    """
    out = values.astype(np.float64)
    ones = np.ones(size, dtype=np.float64)
    for axis in range(out.ndim):
        out = ndimage.correlate1d(out, ones, axis=axis, mode="reflect")
    return out / float(size**out.ndim)
