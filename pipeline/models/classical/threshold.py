"""Fixed-value, window and global-Otsu thresholds, 2D and 3D, nodata-aware.

Optional Gaussian pre-smoothing (``smooth_sigma``) sets the halo to the filter radius, so
tiled output equals the whole-image output exactly.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator
from scipy import ndimage
from skimage import morphology

from pipeline.errors import ConfigError
from pipeline.models.base import ImageInfo, Reducer, Segmenter, SegmenterParams, register
from pipeline.models.classical.autothreshold import fit_threshold

TRUNCATE = 4.0
CT_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    # Hounsfield-unit windows, half-open [lo, hi); voxels in no window are class 0.
    "ct_air_soft_bone": {
        "air": (-math.inf, -400.0),
        "soft_tissue": (-200.0, 300.0),
        "bone": (300.0, math.inf),
    },
    # Five tissues. Air/lung split at -950 HU (the usual "low attenuation area" cut-off:
    # lung voxels below it are air-like), lung up to -500 HU (parenchyma with its small
    # vessels), fat and soft tissue as in body-composition CT (the "Alberta protocol":
    # adipose -190..-30 HU, skeletal muscle and organs -29..150 HU), bone from 150 HU (the
    # top of the soft-tissue window; at 3 mm cancellous bone is mostly 150-500 HU).
    # [-500, -190) is left as class 0: partial volumes at lung, bowel-gas and skin borders.
    "ct_tissues": {
        "air": (-math.inf, -950.0),
        "lung": (-950.0, -500.0),
        "fat": (-190.0, -30.0),
        "soft_tissue": (-30.0, 150.0),
        "bone": (150.0, math.inf),
    },
}


class BandParams(SegmenterParams):
    band: int | str = Field(1, description="1-based band index or band name (rasters)")
    smooth_sigma: float = Field(0.0, ge=0, description="Gaussian pre-smoothing sigma in pixels")
    background_radius: int = Field(
        0, ge=0, description="white top-hat radius removing slowly varying background (0 = off)"
    )


class ThresholdParams(BandParams):
    value: float | None = Field(None, description="foreground where band > value (or < with below)")
    window: tuple[float, float] | None = Field(None, description="foreground where lo <= v < hi")
    windows: dict[str, tuple[float, float]] | None = Field(
        None, description="one class per named window [lo, hi), in order"
    )
    preset: Literal["ct_air_soft_bone", "ct_tissues"] | None = Field(
        None, description="HU windows: ct_air_soft_bone, or ct_tissues (air, lung, fat, soft tissue, bone)"
    )
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


class OtsuParams(BandParams):
    foreground: Literal["above", "below"] = "above"
    class_name: str = "foreground"
    nbins: int = Field(256, ge=2, description="histogram bins for float data (ints use 1 per value)")


class BandSegmenter(Segmenter):
    halo_rule: ClassVar[str] = "2 * background_radius + ceil(4 * smooth_sigma)"
    params: BandParams

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        self.band_index = resolve_band(self.params.band, info)

    @property
    def halo(self) -> int:
        s = self.params.smooth_sigma
        return 2 * self.params.background_radius + (int(TRUNCATE * s + 0.5) if s > 0 else 0)

    def feature(self, block: np.ndarray) -> np.ndarray:
        """The selected band, background-corrected and smoothed when asked (float64 then)."""
        band = block[self.band_index]
        if self.params.background_radius > 0:
            fp = (
                morphology.disk(self.params.background_radius)
                if band.ndim == 2
                else morphology.ball(self.params.background_radius)
            )
            band = morphology.white_tophat(band.astype(np.float64), footprint=fp)
        if self.params.smooth_sigma > 0:
            band = ndimage.gaussian_filter(
                band.astype(np.float64), self.params.smooth_sigma, truncate=TRUNCATE, mode="reflect"
            )
        return band

    def core_values(self, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]) -> np.ndarray:
        """Valid feature values of the chunk's core (the sample a global fit sees)."""
        return self.feature(block)[core][valid[core]]


def resolve_band(band: int | str, info: ImageInfo, *, where: str = "segmenter.params.band") -> int:
    """0-based channel index of ``band`` (1-based int or band name); ConfigError if absent."""
    names = info.band_names or tuple(str(i + 1) for i in range(info.n_channels))
    if isinstance(band, str) and band in names:
        return names.index(band)
    if isinstance(band, int) or band.isdigit():
        idx = int(band)
        if 1 <= idx <= info.n_channels:
            return idx - 1
    raise ConfigError(
        f"{where} {band!r} is not in this image; it has "
        f"{info.n_channels} band(s) named {list(names)}. Give a 1-based index or one "
        "of those names."
    )


@register
class Threshold(BandSegmenter):
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
class Otsu(BandSegmenter):
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
        value = fit_threshold(reduce, self.core_values, "otsu", nbins=self.params.nbins, what="otsu")
        fitted = Otsu(self.params, self.info)
        fitted.threshold = value
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
