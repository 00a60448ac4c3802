"""Geometry of rasters (CRS + affine transform) and volumes (spacing, origin, direction).

Field names say the axis order. SimpleITK's x,y,z order is converted to z,y,x in exactly one
place, :mod:`pipeline.io.medical`; everything here is numpy (z, y, x) order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import GeometryMismatchError, InvalidImageError


@dataclass(frozen=True)
class GeoRef:
    """Georeference of a raster.

    Parameters
    ----------
    crs_wkt
        The CRS as WKT, or ``None`` for a raster without one (allowed only when a job says so).
    transform
        GDAL-order affine ``(a, b, c, d, e, f)``: ``x = a*col + b*row + c``, ``y = d*col + e*row + f``.
    nodata
        The nodata value of the bands, or ``None``.
    band_names
        One name per band (band descriptions, or ``"1"``, ``"2"``, ... when the file has none).
    """

    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None = None
    band_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.transform) != 6 or not all(math.isfinite(v) for v in self.transform):
            raise InvalidImageError(f"transform {self.transform!r} must be six finite numbers")
        a, b, _, d, e, _ = self.transform
        if a * e - b * d == 0:
            raise InvalidImageError(f"transform {self.transform!r} is singular (zero pixel size)")

    def xy(self, row: float, col: float) -> tuple[float, float]:
        """World coordinates of a (row, col) pixel-corner position."""
        a, b, c, d, e, f = self.transform
        return a * col + b * row + c, d * col + e * row + f

    def bounds(self, start: Sequence[int], stop: Sequence[int]) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of the pixel region ``[start, stop)`` given as (y, x)."""
        corners = [self.xy(r, c) for r in (start[0], stop[0]) for c in (start[1], stop[1])]
        xs, ys = zip(*corners, strict=True)
        return min(xs), min(ys), max(xs), max(ys)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for job summaries and zarr attributes)."""
        return {
            "kind": "raster",
            "crs_wkt": self.crs_wkt,
            "transform": list(self.transform),
            "nodata": self.nodata,
            "band_names": list(self.band_names),
        }


@dataclass(frozen=True)
class VolumeRef:
    """Physical geometry of a volume in numpy (z, y, x) order.

    ``direction_zyx[i][j]`` is the physical (z, y, x) component ``i`` of array axis ``j``;
    the physical point of index ``k`` is ``origin + direction @ (spacing * k)``.
    """

    spacing_zyx: tuple[float, float, float]
    origin_zyx: tuple[float, float, float]
    direction_zyx: tuple[tuple[float, float, float], ...]

    def __post_init__(self) -> None:
        if len(self.spacing_zyx) != 3 or any(not s > 0 for s in self.spacing_zyx):
            raise InvalidImageError(f"spacing {self.spacing_zyx!r} must be three positive numbers")
        m = np.asarray(self.direction_zyx, dtype=float)
        if m.shape != (3, 3) or not np.allclose(m @ m.T, np.eye(3), atol=1e-4):
            raise InvalidImageError(f"direction {self.direction_zyx!r} is not a 3x3 rotation")

    def physical(self, index_zyx: Sequence[float]) -> np.ndarray:
        """Physical (z, y, x) position in mm of a continuous index."""
        m = np.asarray(self.direction_zyx, dtype=float)
        scaled = np.asarray(self.spacing_zyx) * np.asarray(index_zyx, dtype=float)
        return np.asarray(self.origin_zyx) + m @ scaled

    def bounds(self, start: Sequence[int], stop: Sequence[int]) -> tuple[float, ...]:
        """Physical ``(zmin, ymin, xmin, zmax, ymax, xmax)`` in mm of ``[start, stop)`` voxels."""
        corners = np.array(
            [
                self.physical([z, y, x])
                for z in (start[0], stop[0])
                for y in (start[1], stop[1])
                for x in (start[2], stop[2])
            ]
        )
        return (*corners.min(axis=0).tolist(), *corners.max(axis=0).tolist())

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³."""
        return float(np.prod(self.spacing_zyx))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "kind": "volume",
            "spacing_zyx": list(self.spacing_zyx),
            "origin_zyx": list(self.origin_zyx),
            "direction_zyx": [list(r) for r in self.direction_zyx],
        }


Geometry = GeoRef | VolumeRef


def geometry_from_json(data: dict[str, Any]) -> Geometry:
    """Inverse of ``to_json`` for either geometry kind."""
    if data.get("kind") == "raster":
        return GeoRef(
            data["crs_wkt"],
            tuple(data["transform"]),
            data.get("nodata"),  # type: ignore[arg-type]
            tuple(data.get("band_names", ())),
        )
    if data.get("kind") == "volume":
        return VolumeRef(
            tuple(data["spacing_zyx"]),
            tuple(data["origin_zyx"]),  # type: ignore[arg-type]
            tuple(tuple(r) for r in data["direction_zyx"]),
        )
    raise InvalidImageError(f"geometry record {data!r} has no known 'kind' (raster or volume)")


def check_same_geometry(
    expected: Geometry, actual: Geometry, *, what: str, same_crs: Any = None, rtol: float = 1e-9
) -> None:
    """Raise :class:`GeometryMismatchError` naming ``what`` when two geometries differ.

    ``same_crs(a_wkt, b_wkt) -> bool`` compares CRSs (the io layer passes a rasterio-based
    comparison); without it the WKT strings must be equal.
    """
    if type(expected) is not type(actual):
        raise GeometryMismatchError(
            f"{what}: geometry kind {type(actual).__name__} "
            f"differs from the input's {type(expected).__name__}"
        )
    if isinstance(expected, GeoRef) and isinstance(actual, GeoRef):
        _check_raster(expected, actual, what, same_crs, rtol)
    elif isinstance(expected, VolumeRef) and isinstance(actual, VolumeRef):
        _check_volume(expected, actual, what, rtol)


def _check_raster(exp: GeoRef, act: GeoRef, what: str, same_crs: Any, rtol: float) -> None:
    eq = same_crs or (lambda a, b: a == b)
    if (exp.crs_wkt is None) != (act.crs_wkt is None) or (
        exp.crs_wkt is not None and not eq(exp.crs_wkt, act.crs_wkt)
    ):
        raise GeometryMismatchError(
            f"{what}: CRS {act.crs_wkt!r} differs from the input's "
            f"{exp.crs_wkt!r}; the output was not published"
        )
    if not np.allclose(exp.transform, act.transform, rtol=rtol, atol=0):
        raise GeometryMismatchError(
            f"{what}: transform {act.transform} differs from the "
            f"input's {exp.transform}; the output was not published"
        )


def _check_volume(exp: VolumeRef, act: VolumeRef, what: str, rtol: float) -> None:
    for name in ("spacing_zyx", "origin_zyx", "direction_zyx"):
        a, b = np.asarray(getattr(exp, name)), np.asarray(getattr(act, name))
        if not np.allclose(a, b, rtol=max(rtol, 1e-6), atol=1e-5):
            raise GeometryMismatchError(
                f"{what}: {name} {b.tolist()} differs from the input's "
                f"{a.tolist()}; the output was not published"
            )
