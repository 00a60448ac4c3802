"""Fixed-value, window and global-Otsu thresholds, 2D and 3D, nodata-aware.

Optional Gaussian pre-smoothing (``smooth_sigma``) sets the halo to the filter radius, so
tiled output equals the whole-image output exactly.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator
from scipy import ndimage
from skimage.filters import threshold_otsu

from pipeline.errors import ConfigError
from pipeline.models.base import ImageInfo, Reducer, Segmenter, SegmenterParams, register
from pipeline.models.classical import histogram as hist

TRUNCATE = 4.0
CT_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    # Hounsfield-unit windows, half-open [lo, hi); voxels in no window are class 0.
    "ct_air_soft_bone": {
        "air": (-math.inf, -400.0),
        "soft_tissue": (-200.0, 300.0),
        "bone": (300.0, math.inf),
    },
}


class _BandParams(SegmenterParams):
    band: int | str = Field(1, description="1-based band index or band name (rasters)")
    smooth_sigma: float = Field(0.0, ge=0, description="Gaussian pre-smoothing sigma in pixels")


class ThresholdParams(_BandParams):
    value: float | None = Field(None, description="foreground where band > value (or < with below)")
    window: tuple[float, float] | None = Field(None, description="foreground where lo <= v < hi")
    windows: dict[str, tuple[float, float]] | None = Field(
        None, description="one class per named window [lo, hi), in order"
    )
    preset: Literal["ct_air_soft_bone"] | None = Field(None, description="named windows")
    foreground: Literal["above", "below"] = "above"
    class_name: str = "foreground"

    @model_validator(mode="after")
    def _one_rule(self) -> ThresholdParams:
        given = [k for k in ("value", "window", "windows", "preset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of value, window, windows or preset (got {given or 'none'})")
        for name, (lo, hi) in self.rule_windows().items():
            if not lo < hi:
                raise ValueError(f"window {name!r} [{lo}, {hi}) is empty: lo must be below hi")
        return self

    def rule_windows(self) -> dict[str, tuple[float, float]]:
        """The windows of a multi-class rule (empty for value rules)."""
        if self.preset is not None:
            return CT_PRESETS[self.preset]
        if self.windows is not None:
            return dict(self.windows)
        if self.window is not None:
            return {self.class_name: self.window}
        return {}


class OtsuParams(_BandParams):
    foreground: Literal["above", "below"] = "above"
    class_name: str = "foreground"
    nbins: int = Field(256, ge=2, description="histogram bins for float data (ints use 1 per value)")


class _BandSegmenter(Segmenter):
    halo_rule: ClassVar[str] = "ceil(4 * smooth_sigma) (0 without smoothing)"
    params: _BandParams

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        self.band_index = resolve_band(self.params.band, info)

    @property
    def halo(self) -> int:
        s = self.params.smooth_sigma
        return int(TRUNCATE * s + 0.5) if s > 0 else 0

    def feature(self, block: np.ndarray) -> np.ndarray:
        """The selected band, smoothed when asked (float64 then)."""
        band = block[self.band_index]
        if self.params.smooth_sigma > 0:
            band = ndimage.gaussian_filter(
                band.astype(np.float64), self.params.smooth_sigma, truncate=TRUNCATE, mode="reflect"
            )
        return band


def resolve_band(band: int | str, info: ImageInfo) -> int:
    """0-based channel index of ``band`` (1-based int or band name); ConfigError if absent."""
    names = info.band_names or tuple(str(i + 1) for i in range(info.n_channels))
    if isinstance(band, str) and band in names:
        return names.index(band)
    if isinstance(band, int) or band.isdigit():
        idx = int(band)
        if 1 <= idx <= info.n_channels:
            return idx - 1
    raise ConfigError(
        f"segmenter.params.band {band!r} is not in this image; it has "
        f"{info.n_channels} band(s) named {list(names)}. Give a 1-based index or one "
        "of those names."
    )


@register
class Threshold(_BandSegmenter):
    """Fixed value, window or multi-class windows (e.g. Hounsfield units) on one band."""

    name = "threshold"
    summary = "fixed value / window / multi-class windows (CT HU presets) on one band"
    Params = ThresholdParams
    params: ThresholdParams

    @property
    def classes(self) -> dict[int, str]:
        windows = self.params.rule_windows()
        names = list(windows) if windows else [self.params.class_name]
        return {0: "background", **{i + 1: n for i, n in enumerate(names)}}

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return apply_rule(self.feature(block), self.params, valid)


def apply_rule(values: np.ndarray, p: ThresholdParams, valid: np.ndarray) -> np.ndarray:
    """Pure kernel: class map of ``values`` under a threshold rule, 255 where not ``valid``."""
    out = np.zeros(values.shape, dtype=np.uint8)
    windows = p.rule_windows()
    if windows:
        for cid, (lo, hi) in reversed(list(enumerate(windows.values(), start=1))):
            out[(values >= lo) & (values < hi)] = cid
    else:
        out[(values > p.value) if p.foreground == "above" else (values < p.value)] = 1
    out[~valid] = Segmenter.nodata_label
    return out


@register
class Otsu(_BandSegmenter):
    """Global Otsu threshold: the histogram is fitted over the whole image, applied per chunk."""

    name = "otsu"
    summary = "Otsu threshold fitted on the whole image's histogram, applied per chunk"
    Params = OtsuParams
    params: OtsuParams
    threshold: float | None = None

    @property
    def classes(self) -> dict[int, str]:
        return {0: "background", 1: self.params.class_name}

    def fit(self, reduce: Reducer) -> Otsu:
        rng = reduce(partial(_partial_minmax, self), hist.combine_minmax)
        if rng is None:
            raise ConfigError(
                "otsu: the image has no valid pixel (all nodata); nothing to fit. "
                "Check the nodata value and the band."
            )
        lo, hi = rng
        if lo == hi:
            value = lo
        else:
            counts = reduce(partial(_partial_hist, self, lo, hi), hist.add)
            centers = hist.bin_centers(np.asarray(lo).dtype, lo, hi, self.params.nbins)
            value = threshold_otsu(hist=(counts.astype(np.float32), centers))
        fitted = Otsu(self.params, self.info)
        fitted.threshold = float(value)
        return fitted

    def fitted_values(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise ConfigError("otsu must be fitted before it is applied (call fit first)")
        values = self.feature(block)
        out = np.zeros(values.shape, dtype=np.uint8)
        fg = values > self.threshold if self.params.foreground == "above" else values <= self.threshold
        out[fg] = 1
        out[~valid] = self.nodata_label
        return out


def _core_values(
    seg: _BandSegmenter, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]
) -> np.ndarray:
    return seg.feature(block)[core][valid[core]]


def _partial_minmax(
    seg: _BandSegmenter, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]
) -> hist.MinMax:
    return hist.minmax(_core_values(seg, block, valid, core))


def _partial_hist(
    seg: Otsu, lo: Any, hi: Any, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]
) -> np.ndarray:
    return hist.histogram(_core_values(seg, block, valid, core), lo, hi, seg.params.nbins)
