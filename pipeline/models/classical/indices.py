"""Multispectral index thresholds (NDVI, NDWI, MNDWI) and a rule-based land-cover baseline.

Band roles (``green``, ``red``, ``nir``, ``swir``) come from the job (``bands: {nir: B8}``,
1-based index or band description) or are found in the raster's band descriptions:
role names (``nir``, ``swir1``, ...) always, Sentinel-2 numbers (``B3``/``B03`` green,
``B4`` red, ``B8`` NIR, ``B11`` SWIR) when the raster has a ``B8A`` band, the mark of a
Sentinel-2 stack (other sensors number their bands differently: give their roles).

Indices are pixelwise (halo 0); thresholds are fixed numbers or fitted on the whole image
(Otsu, Yen, triangle, Li) through the engine's reducer, so tiled equals whole-image.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.errors import ConfigError
from pipeline.models.base import ImageInfo, Reducer, Segmenter, SegmenterParams, register
from pipeline.models.classical.autothreshold import AutoMethod, GlobalThreshold, fit_threshold
from pipeline.models.classical.threshold import resolve_band
from pipeline.models.classical.thresholds import Foreground, binary_labels

Role = Literal["green", "red", "nir", "swir"]
IndexName = Literal["ndvi", "ndwi", "mndwi"]
#: index -> (a, b) band roles of ``(a - b) / (a + b)``.
INDEX_ROLES: dict[str, tuple[Role, Role]] = {
    "ndvi": ("nir", "red"),  # Rouse et al. 1974
    "ndwi": ("green", "nir"),  # McFeeters 1996
    "mndwi": ("green", "swir"),  # Xu 2006 (SWIR ~1.6 um: Sentinel-2 B11, Landsat 8 B6)
}
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "green": ("green",),
    "red": ("red",),
    "nir": ("nir", "nir08", "near-infrared", "near_infrared"),
    "swir": ("swir", "swir1", "swir_1", "swir16"),
}
SENTINEL2_NAMES: dict[str, tuple[str, ...]] = {
    "green": ("b3", "b03"),
    "red": ("b4", "b04"),
    "nir": ("b8", "b08"),
    "swir": ("b11",),
}
Threshold = float | AutoMethod
BandRoles = dict[Role, int | str]


def normalized_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pure kernel: ``(a - b) / (a + b)`` in float64, 0 where ``a + b == 0``."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    total = a + b
    out = np.zeros(total.shape, dtype=np.float64)
    np.divide(a - b, total, out=out, where=total != 0)
    return out


def spectral_index(block: np.ndarray, index: str, roles: Mapping[str, int]) -> np.ndarray:
    """Pure kernel: ``index`` of a ``(C, *spatial)`` block with bands at ``roles`` (0-based)."""
    a, b = INDEX_ROLES[index]
    return normalized_difference(block[roles[a]], block[roles[b]])


def resolve_roles(needed: tuple[str, ...], given: Mapping[Any, int | str], info: ImageInfo) -> dict[str, int]:
    """0-based band of each needed role: from ``given``, else from the band descriptions."""
    return {role: _resolve_role(role, given, info) for role in needed}


def _resolve_role(role: str, given: Mapping[Any, int | str], info: ImageInfo) -> int:
    if role in given:
        return resolve_band(given[role], info, where=f"segmenter.params.bands.{role}")
    names = [n.lower() for n in info.band_names]
    aliases = ROLE_NAMES[role] + (SENTINEL2_NAMES[role] if "b8a" in names else ())
    for alias in aliases:
        if alias in names:
            return names.index(alias)
    raise ConfigError(
        f"segmenter.params.bands: band role {role!r} is missing. No band of this image is named "
        f"{' / '.join(aliases)}; its {info.n_channels} band(s) are named "
        f"{list(info.band_names) or [str(i + 1) for i in range(info.n_channels)]}. Map the role "
        f"in the job, e.g. bands: {{{role}: 4}} (1-based index or band name)."
    )


class IndexParams(SegmenterParams):
    index: IndexName = Field(description="ndvi (nir, red), ndwi (green, nir) or mndwi (green, swir)")
    bands: BandRoles = Field({}, description="band roles, e.g. {green: B3, nir: B8}")
    threshold: Threshold = Field("otsu", description="a number, or otsu / yen / triangle / li (global fit)")
    foreground: Foreground = Field("above", description="foreground: index > threshold (above) or <=")
    class_name: str | None = Field(None, description="default: vegetation for ndvi, water otherwise")
    nbins: int = Field(256, ge=2, description="histogram bins of the global fit")


@register
class IndexThreshold(GlobalThreshold):
    """A normalised-difference index thresholded at a fixed or globally fitted value."""

    name = "index_threshold"
    summary = "NDVI / NDWI / MNDWI thresholded (fixed, or Otsu/Yen/triangle/Li on the whole image)"
    halo_rule: ClassVar[str] = "0 (pixelwise)"
    Params = IndexParams
    params: IndexParams

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        self.roles = resolve_roles(INDEX_ROLES[self.params.index], self.params.bands, info)
        t = self.params.threshold
        self.threshold: float | None = None if isinstance(t, str) else float(t)

    @property
    def classes(self) -> dict[int, str]:
        default = "vegetation" if self.params.index == "ndvi" else "water"
        return {0: "background", 1: self.params.class_name or default}

    def feature(self, block: np.ndarray) -> np.ndarray:
        """The index image of ``block``."""
        return spectral_index(block, self.params.index, self.roles)

    def core_values(self, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]) -> np.ndarray:
        """Valid index values of the chunk's core."""
        return self.feature(block[(slice(None), *core)])[valid[core]]

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        threshold = self.fitted_threshold()
        return binary_labels(self.feature(block), valid, threshold, self.params.foreground)


LANDCOVER_CLASSES = {1: "water", 2: "vegetation", 3: "bare_built"}


def landcover_rules(
    ndwi: np.ndarray,
    ndvi: np.ndarray,
    nir: np.ndarray,
    valid: np.ndarray,
    *,
    water_ndwi: float,
    vegetation_ndvi: float,
    water_max_nir: float | None,
) -> np.ndarray:
    """Pure kernel: 1 water (NDWI above, NIR dark), else 2 vegetation (NDVI above), else 3."""
    out = np.full(ndwi.shape, 3, dtype=np.uint8)
    out[ndvi > vegetation_ndvi] = 2
    water = ndwi > water_ndwi
    if water_max_nir is not None:
        water &= nir <= water_max_nir
    out[water] = 1
    out[~valid] = Segmenter.nodata_label
    return out


class LandcoverParams(SegmenterParams):
    bands: BandRoles = Field({}, description="roles green, red, nir, e.g. {red: 1, nir: 4}")
    water_ndwi: Threshold = Field(0.0, description="water where NDWI > this (a number or a global fit)")
    vegetation_ndvi: Threshold = Field(0.2, description="vegetation where NDVI > this (number or fit)")
    water_max_nir: float | None = Field(None, description="water also needs NIR <= this (data units)")
    nbins: int = Field(256, ge=2, description="histogram bins of global fits")


@register
class LandcoverBaseline(Segmenter):
    """Classical land cover from NDWI and NDVI: 1 water, 2 vegetation, 3 bare/built.

    Rules, in order: water where NDWI > ``water_ndwi`` (and NIR <= ``water_max_nir`` when
    set: water is dark in the near infrared, built surfaces are not); otherwise vegetation
    where NDVI > ``vegetation_ndvi``; otherwise bare/built. Defaults suit reflectance
    (McFeeters' NDWI > 0, NDVI > 0.2); uncalibrated sensors need their own values (see
    ``jobs/chesapeake_landcover_baseline.yaml`` for NAIP).

    Mapping to the Chesapeake Land Cover classes used to score it: water <- 1 water;
    vegetation <- 2 tree canopy + 3 low vegetation; bare/built <- 4 barren + 5 impervious
    (other) + 6 impervious (road).
    """

    name = "landcover_baseline"
    summary = "water / vegetation / bare-built from NDWI and NDVI rules (fixed or fitted)"
    halo_rule: ClassVar[str] = "0 (pixelwise)"
    Params = LandcoverParams
    params: LandcoverParams

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        self.roles = resolve_roles(("green", "red", "nir"), self.params.bands, info)
        p = self.params
        self.fitted: dict[str, float | None] = {
            "water_ndwi": None if isinstance(p.water_ndwi, str) else float(p.water_ndwi),
            "vegetation_ndvi": None if isinstance(p.vegetation_ndvi, str) else float(p.vegetation_ndvi),
        }

    @property
    def classes(self) -> dict[int, str]:
        return dict(LANDCOVER_CLASSES)

    def fit(self, reduce: Reducer) -> LandcoverBaseline:
        fitted = copy.copy(self)
        fitted.fitted = dict(self.fitted)
        for key, index in (("water_ndwi", "ndwi"), ("vegetation_ndvi", "ndvi")):
            method: Threshold = getattr(self.params, key)
            if isinstance(method, str):
                values = partial(_index_core_values, self.roles, index)
                what = f"{self.name} {key}"
                fitted.fitted[key] = fit_threshold(reduce, values, method, nbins=self.params.nbins, what=what)
        return fitted

    def fitted_values(self) -> dict[str, Any]:
        return {k: v for k, v in self.fitted.items() if isinstance(getattr(self.params, k), str)}

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        water, veg = self.fitted["water_ndwi"], self.fitted["vegetation_ndvi"]
        if water is None or veg is None:
            raise ConfigError(f"{self.name} must be fitted before it is applied (call fit first)")
        return landcover_rules(
            spectral_index(block, "ndwi", self.roles),
            spectral_index(block, "ndvi", self.roles),
            block[self.roles["nir"]],
            valid,
            water_ndwi=water,
            vegetation_ndvi=veg,
            water_max_nir=self.params.water_max_nir,
        )


def _index_core_values(
    roles: dict[str, int], index: str, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]
) -> np.ndarray:
    return spectral_index(block[(slice(None), *core)], index, roles)[valid[core]]
