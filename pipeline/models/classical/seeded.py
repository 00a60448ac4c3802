"""Seeded (prompt-based) classical segmentation: clicks in world coordinates -> instances.

Each point prompt (CRS x/y or lon/lat for rasters, patient millimetres for volumes) becomes a
watershed marker; the flood runs inside a mask from any semantic segmenter, over the inverted
distance transform (separating touching objects) or the gradient magnitude. Only mask regions
holding a prompt are kept. Ids are the prompts' ids, so they are global: an object crossing
chunk borders keeps its id, provided ``max_object_size`` (the halo) covers it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage
from skimage import filters, segmentation

from pipeline.data.geometry import GeoRef, VolumeRef
from pipeline.errors import ConfigError
from pipeline.models.base import (
    ImageInfo,
    MergePolicy,
    Segmenter,
    SegmenterParams,
    register,
)
from pipeline.models.classical.components import InnerSpec
from pipeline.models.classical.watershed import MaskedInstances
from pipeline.tiling import BlockContext


class Point(SegmenterParams):
    x: float
    y: float
    z: float | None = Field(None, description="volumes: patient z in mm")
    id: int | None = Field(None, ge=1, description="object id (default: the prompt's position, 1-based)")


class SeededParams(SegmenterParams):
    points: list[Point] = Field(
        min_length=1, description="clicks: x/y in the raster CRS (or `crs`), mm for volumes"
    )
    crs: str | None = Field(None, description="CRS of the points when not the raster's, e.g. EPSG:4326")
    mask: InnerSpec = Field(description="semantic segmenter bounding the regions")
    mask_classes: list[int] = Field(default_factory=lambda: [1])
    flood: Literal["distance", "gradient"] = "distance"
    band: int | str = 1
    max_object_size: int = Field(64, ge=1, description="largest object extent in pixels (the halo)")


@register
class Seeded(MaskedInstances):
    """Marker watershed from point prompts in world coordinates; instance ids = prompt ids."""

    name = "seeded"
    merge: ClassVar[MergePolicy] = "none"
    summary = "seeded watershed from point prompts in world coordinates (CRS, lon/lat, mm)"
    Params = SeededParams
    params: SeededParams

    def __init__(self, params: SegmenterParams, info: ImageInfo, mask: Segmenter | None = None) -> None:
        super().__init__(params, info, mask)
        self.seeds = prompt_indices(self.params, info)
        self.ids = np.array([p.id or i + 1 for i, p in enumerate(self.params.points)], dtype=np.uint64)

    def fitted_values(self) -> dict[str, Any]:
        return {"seeds_index": self.seeds.tolist(), **super().fitted_values()}

    def __call__(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None = None) -> np.ndarray:
        origin = np.asarray(ctx.origin if ctx else (0,) * valid.ndim)
        local = self.seeds - origin
        inside = np.all((local >= 0) & (local < np.asarray(valid.shape)), axis=1)
        markers = np.zeros(valid.shape, dtype=np.int64)
        markers[tuple(local[inside].T)] = np.flatnonzero(inside) + 1
        return seeded_flood(
            self.mask(block, valid, ctx), markers, block[self.band_index], self.params.flood, self.ids
        )


def seeded_flood(
    mask: np.ndarray, markers: np.ndarray, image: np.ndarray, flood: str, ids: np.ndarray
) -> np.ndarray:
    """Pure kernel: watershed from ``markers`` (prompt index + 1) inside the seeded mask regions."""
    regions, _ = ndimage.label(mask)
    seeded = np.isin(regions, np.unique(regions[(markers > 0) & mask]))
    seeded &= regions > 0
    if flood == "distance":
        elevation = -ndimage.distance_transform_edt(mask)
    else:
        elevation = filters.sobel(image.astype(np.float64))
    labels = segmentation.watershed(elevation, np.where(mask, markers, 0), mask=seeded)
    lut = np.concatenate([[0], ids]).astype(np.uint64)
    return lut[labels]


def prompt_indices(p: SeededParams, info: ImageInfo) -> np.ndarray:
    """Pixel/voxel index (numpy order) of every prompt; ConfigError when one is outside."""
    shape = np.asarray(info.shape)
    if isinstance(info.geometry, VolumeRef):
        idx = np.array([_mm_to_index(info.geometry, pt) for pt in p.points])
    elif isinstance(info.geometry, GeoRef):
        idx = np.array([_xy_to_index(info.geometry, pt, p.crs) for pt in p.points])
    else:
        raise ConfigError("seeded: prompts need an image with geometry")
    for i, (pt, ix) in enumerate(zip(p.points, idx, strict=True)):
        if np.any(ix < 0) or np.any(ix >= shape):
            raise ConfigError(
                f"segmenter.params.points[{i}] {pt.model_dump(exclude_none=True)} is outside "
                f"the image (index {ix.tolist()}, shape {shape.tolist()}); give world "
                "coordinates inside the image's bounds (CRS units, lon/lat with crs, or mm)"
            )
    return idx.astype(np.int64)


def _xy_to_index(georef: GeoRef, pt: Point, crs: str | None) -> list[int]:
    x, y = pt.x, pt.y
    if crs:
        from pyproj import Transformer

        x, y = Transformer.from_crs(crs, georef.crs_wkt or crs, always_xy=True).transform(x, y)
    a, b, c, d, e, f = georef.transform
    det = a * e - b * d
    col = (e * (x - c) - b * (y - f)) / det
    row = (-d * (x - c) + a * (y - f)) / det
    return [int(np.floor(row)), int(np.floor(col))]


def _mm_to_index(ref: VolumeRef, pt: Point) -> list[int]:
    if pt.z is None:
        raise ConfigError(f"segmenter.params.points: {pt.model_dump()} needs z (mm) on a volume")
    m = np.asarray(ref.direction_zyx) * np.asarray(ref.spacing_zyx)[None, :]
    index = np.linalg.solve(m, np.array([pt.z, pt.y, pt.x]) - np.asarray(ref.origin_zyx))
    return [int(v) for v in np.rint(index)]
