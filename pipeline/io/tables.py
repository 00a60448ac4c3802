"""Object tables in world units: areas in m², volumes in mm³/mL, centroids in CRS, lon/lat or mm."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from pyproj import CRS, Geod, Transformer

from pipeline.data.geometry import Geometry, GeoRef, VolumeRef


def world_objects(pixels: pd.DataFrame, geometry: Geometry, shape: tuple[int, ...]) -> pd.DataFrame:
    """Add world columns to per-object pixel statistics (``id, count, class, centroidK, minK, maxK``)."""
    frame = pixels.copy()
    ndim = len(shape)
    lows = np.stack([frame[f"min{k}"] for k in range(ndim)], axis=1)
    highs = np.stack([frame[f"max{k}"] for k in range(ndim)], axis=1)
    frame["touches_border"] = ((lows == 0) | (highs == np.asarray(shape) - 1)).any(axis=1)
    if isinstance(geometry, VolumeRef):
        return _volume_columns(frame, geometry)
    return _raster_columns(frame, geometry)


def _volume_columns(frame: pd.DataFrame, ref: VolumeRef) -> pd.DataFrame:
    mm = index_to_mm(np.stack([frame[f"centroid{k}"] for k in range(3)], axis=1), ref)
    frame["centroid_z_mm"], frame["centroid_y_mm"], frame["centroid_x_mm"] = mm.T
    frame["volume_mm3"] = frame["count"] * ref.voxel_volume_mm3
    frame["volume_ml"] = frame["volume_mm3"] / 1000.0
    corners = np.array([[z, y, x] for z in (0, 1) for y in (0, 1) for x in (0, 1)], dtype=float)
    for name, fn in (("min", np.min), ("max", np.max)):
        low = np.stack([frame[f"min{k}"] for k in range(3)], axis=1) - 0.5
        size = np.stack([frame[f"max{k}"] - frame[f"min{k}"] + 1 for k in range(3)], axis=1)
        pts = np.stack([index_to_mm(low + size * c, ref) for c in corners], axis=1)
        for k, axis in enumerate("zyx"):
            frame[f"bbox_{axis}{name}_mm"] = fn(pts[:, :, k], axis=1)
    return frame


def index_to_mm(index: np.ndarray, ref: VolumeRef) -> np.ndarray:
    """Physical (z, y, x) mm of continuous (z, y, x) indices (rows)."""
    m = np.asarray(ref.direction_zyx) * np.asarray(ref.spacing_zyx)[None, :]
    return np.asarray(ref.origin_zyx)[None, :] + index @ m.T


def _raster_columns(frame: pd.DataFrame, georef: GeoRef) -> pd.DataFrame:
    a, b, c, d, e, f = georef.transform
    row, col = frame["centroid0"] + 0.5, frame["centroid1"] + 0.5
    frame["centroid_x"], frame["centroid_y"] = a * col + b * row + c, d * col + e * row + f
    frame["area_m2"] = frame["count"] * pixel_area_m2(georef, frame["centroid_x"], frame["centroid_y"])
    corners = [(r, q) for r in (frame["min0"], frame["max0"] + 1) for q in (frame["min1"], frame["max1"] + 1)]
    xs = np.stack([a * q + b * r + c for r, q in corners], axis=1)
    ys = np.stack([d * q + e * r + f for r, q in corners], axis=1)
    frame["bbox_xmin"], frame["bbox_xmax"] = xs.min(axis=1), xs.max(axis=1)
    frame["bbox_ymin"], frame["bbox_ymax"] = ys.min(axis=1), ys.max(axis=1)

    if georef.crs_wkt:
        to_ll = Transformer.from_crs(CRS.from_user_input(georef.crs_wkt), "EPSG:4326", always_xy=True)
        frame["lon"], frame["lat"] = to_ll.transform(
            frame["centroid_x"].to_numpy(), frame["centroid_y"].to_numpy()
        )
    return frame


def pixel_area_m2(georef: GeoRef, x: pd.Series, y: pd.Series) -> np.ndarray:
    """Area of one pixel in m²: exact for projected CRSs, geodesic at the centroid otherwise."""
    a, b, _, d, e, _ = georef.transform
    if not georef.crs_wkt:
        return np.full(len(x), np.nan)
    crs = CRS.from_user_input(georef.crs_wkt)
    if not crs.is_geographic:
        unit = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
        return np.full(len(x), abs(a * e - b * d) * unit * unit)
    geod = Geod(ellps="WGS84")
    lons = np.stack([x, x + a, x + a + b, x + b], axis=1)
    lats = np.stack([y, y + d, y + d + e, y + e], axis=1)
    return np.array([abs(geod.polygon_area_perimeter(lo, la)[0]) for lo, la in zip(lons, lats, strict=True)])


def write_parquet(path: Path, frame: pd.DataFrame) -> Path:
    """Write a table atomically."""
    tmp = path.with_name(f".tmp-{path.name}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path
