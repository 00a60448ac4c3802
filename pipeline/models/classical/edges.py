"""Edge maps: Sobel / Scharr / Prewitt gradient magnitude thresholded into a binary map, 2D and 3D.

The magnitude is ``skimage.filters.sobel`` (``scharr``, ``prewitt``) of one band in float64
(data units, not rescaled to [0, 1]) after an optional Gaussian pre-smoothing: in n-D the
root mean square of the per-axis derivatives. The threshold is a fixed number or fitted on
the whole image's magnitudes (Otsu by default) through the engine's reducer. The halo is
the smoothing radius plus the 3-pixel footprint's radius, so cropping it is exact.

Pixels whose footprint reaches a nodata pixel have no defined gradient: they are not edges
(class 0) and take no part in the fit; nodata pixels themselves are 255. Hysteresis (the
second half of Canny) links edges across the whole image and is not a per-chunk operation.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage
from skimage import filters

from pipeline.models.base import ImageInfo, Segmenter, SegmenterParams, register
from pipeline.models.classical.autothreshold import AutoMethod, GlobalThreshold
from pipeline.models.classical.threshold import TRUNCATE, resolve_band

Operator = Literal["sobel", "scharr", "prewitt"]
OPERATORS = {"sobel": filters.sobel, "scharr": filters.scharr, "prewitt": filters.prewitt}
FOOTPRINT_RADIUS = 1


def gradient_magnitude(values: np.ndarray, operator: str, *, smooth_sigma: float = 0.0) -> np.ndarray:
    """Pure kernel: gradient magnitude of ``values`` (any n-D), float64, reflect mode at edges."""
    v = values.astype(np.float64)
    if smooth_sigma > 0:
        v = ndimage.gaussian_filter(v, smooth_sigma, truncate=TRUNCATE, mode="reflect")
    return np.asarray(OPERATORS[operator](v, mode="reflect"))


def defined_mask(valid: np.ndarray, radius: int) -> np.ndarray:
    """Pure kernel: pixels with no invalid pixel within ``radius`` (a cube); image edges do not count."""
    if valid.all():
        return valid
    low = ndimage.minimum_filter(valid.astype(np.uint8), size=2 * radius + 1, mode="constant", cval=1)
    return low.astype(bool)


def edge_labels(
    magnitude: np.ndarray, defined: np.ndarray, valid: np.ndarray, threshold: float
) -> np.ndarray:
    """Pure kernel: 1 where ``magnitude > threshold`` and defined, 0 elsewhere, 255 off ``valid``."""
    out = ((magnitude > threshold) & defined).astype(np.uint8)
    out[~valid] = Segmenter.nodata_label
    return out


class EdgesParams(SegmenterParams):
    band: int | str = Field(1, description="1-based band index or band name")
    operator: Operator = Field("sobel", description="sobel, scharr or prewitt (2D and 3D)")
    smooth_sigma: float = Field(0.0, ge=0, description="Gaussian pre-smoothing sigma in pixels")
    threshold: float | AutoMethod = Field("otsu", description="a magnitude, or otsu / yen / triangle / li")
    nbins: int = Field(256, ge=2, description="histogram bins of the global fit")
    class_name: str = Field("edge", description="name of the edge class")


@register
class Edges(GlobalThreshold):
    """Binary edge map from the gradient magnitude, threshold fixed or fitted on the whole image."""

    name = "edges"
    summary = "Sobel/Scharr/Prewitt gradient magnitude > threshold (fixed or global Otsu), 2D/3D"
    halo_rule: ClassVar[str] = "int(4 * smooth_sigma + 0.5) + 1"
    Params = EdgesParams
    params: EdgesParams

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        self.band_index = resolve_band(self.params.band, info)
        t = self.params.threshold
        self.threshold: float | None = None if isinstance(t, str) else float(t)

    @property
    def halo(self) -> int:
        s = self.params.smooth_sigma
        return (int(TRUNCATE * s + 0.5) if s > 0 else 0) + FOOTPRINT_RADIUS

    @property
    def classes(self) -> dict[int, str]:
        return {0: "background", 1: self.params.class_name}

    def magnitude(self, block: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gradient magnitude of the block and where it is defined."""
        p = self.params
        mag = gradient_magnitude(block[self.band_index], p.operator, smooth_sigma=p.smooth_sigma)
        return mag, defined_mask(valid, self.halo)

    def core_values(self, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]) -> np.ndarray:
        """Defined magnitudes of the chunk's core."""
        mag, defined = self.magnitude(block, valid)
        return mag[core][defined[core]]

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        threshold = self.fitted_threshold()
        mag, defined = self.magnitude(block, valid)
        return edge_labels(mag, defined, valid, threshold)
