"""Watershed instances from a semantic mask: markers from distance-transform peaks or gradient minima.

Instances are computed on each chunk's whole read block and matched across seams by IoU in
the halo overlap (merge policy ``overlap``). The halo is the mask's halo plus
``max_object_size``: objects up to that extent are seen whole by every chunk they touch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage
from skimage import filters, morphology, segmentation
from skimage.feature import peak_local_max

from pipeline.errors import ConfigError
from pipeline.models.base import (
    ImageInfo,
    MergePolicy,
    Reducer,
    Segmenter,
    SegmenterParams,
    create_segmenter,
    register,
)
from pipeline.models.classical.components import InnerSpec
from pipeline.models.classical.threshold import resolve_band
from pipeline.tiling import BlockContext


class WatershedParams(SegmenterParams):
    mask: InnerSpec = Field(description="semantic segmenter giving the foreground")
    mask_classes: list[int] = Field(default_factory=lambda: [1])
    markers: Literal["distance", "gradient"] = "distance"
    min_distance: int = Field(5, ge=1, description="distance markers: minimum peak separation")
    h: float = Field(10.0, gt=0, description="gradient markers: depth of the minima (h-minima)")
    band: int | str = Field(1, description="band whose gradient is flooded (gradient markers)")
    compactness: float = Field(0.0, ge=0)
    connectivity: int = Field(1, ge=1, le=3)
    max_object_size: int = Field(64, ge=1, description="largest object extent in pixels (sets the halo)")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="seam match: IoU in the halo overlap")


class MaskedInstances(Segmenter):
    """Base of instance segmenters that flood a mask given by an inner semantic segmenter.

    Parameters need ``mask``, ``mask_classes``, ``band`` and ``max_object_size`` (the halo
    added to the mask's: objects up to that extent are seen whole by every chunk they touch).
    """

    kind = "instance"
    uses_context: ClassVar[bool] = True
    halo_rule: ClassVar[str] = "mask halo + max_object_size"
    params: Any

    def __init__(self, params: SegmenterParams, info: ImageInfo, mask: Segmenter | None = None) -> None:
        super().__init__(params, info)
        self.mask_segmenter = mask or create_segmenter(self.params.mask.name, self.params.mask.params, info)
        self.band_index = resolve_band(self.params.band, info)

    @property
    def halo(self) -> int:
        return self.mask_segmenter.halo + self.params.max_object_size

    @property
    def classes(self) -> dict[int, str]:
        return {0: "background", 1: "object"}

    def fit(self, reduce: Reducer) -> MaskedInstances:
        return type(self)(self.params, self.info, self.mask_segmenter.fit(reduce))

    def fitted_values(self) -> dict[str, Any]:
        return self.mask_segmenter.fitted_values()

    def mask(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None) -> np.ndarray:
        """The foreground to flood: the inner segmenter's ``mask_classes``."""
        return np.isin(self.mask_segmenter.run(block, valid, ctx), self.params.mask_classes)


@register
class Watershed(MaskedInstances):
    """Marker-controlled watershed: touching objects separated; instance output."""

    name = "watershed"
    merge: ClassVar[MergePolicy] = "overlap"
    summary = "watershed of a mask, markers from distance peaks or gradient minima"
    Params = WatershedParams
    params: WatershedParams

    def __init__(self, params: SegmenterParams, info: ImageInfo, mask: Segmenter | None = None) -> None:
        super().__init__(params, info, mask)
        if self.params.connectivity > info.spatial_ndim:
            raise ConfigError(f"segmenter.params.connectivity must be <= {info.spatial_ndim}")

    @property
    def connectivity(self) -> int:
        return self.params.connectivity

    @property
    def iou_threshold(self) -> float:
        return self.params.iou_threshold

    def __call__(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None = None) -> np.ndarray:
        return watershed_instances(self.mask(block, valid, ctx), block[self.band_index], self.params)


def watershed_instances(mask: np.ndarray, image: np.ndarray, p: WatershedParams) -> np.ndarray:
    """Pure kernel: watershed instance labels (uint32) of ``mask``."""
    footprint = ndimage.generate_binary_structure(mask.ndim, p.connectivity)
    if p.markers == "distance":
        distance = ndimage.distance_transform_edt(mask)
        objects, _ = ndimage.label(mask, structure=footprint)
        peaks = peak_local_max(distance, min_distance=p.min_distance, labels=objects, exclude_border=False)
        markers = np.zeros(mask.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        elevation = -distance
    else:
        elevation = filters.sobel(image.astype(np.float64))
        minima = morphology.h_minima(elevation, p.h) & mask
        markers, _ = ndimage.label(minima, structure=footprint)
    labels = segmentation.watershed(
        elevation, markers, mask=mask, compactness=p.compactness, connectivity=p.connectivity
    )
    return labels.astype(np.uint32)
