"""Vector labels (GeoJSON, GeoPackage, ...) burnt onto a raster's grid, window by window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
from pyogrio.errors import DataSourceError
from rasterio import features
from rasterio.transform import Affine

from pipeline.data.geometry import GeoRef
from pipeline.errors import ConfigError, InvalidImageError, ReadError
from pipeline.tiling import Box

VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".parquet")

Shapes = list[tuple[Any, int]]


def is_vector_path(path: Path) -> bool:
    """Whether ``path`` names a vector file (polygons to rasterise)."""
    return path.name.lower().endswith(VECTOR_SUFFIXES)


def load_shapes(path: Path, georef: GeoRef, *, class_field: str | None, burn: int) -> Shapes:
    """``(polygon, value)`` pairs in the raster's CRS: ``class_field``'s value, or ``burn``."""
    try:
        frame = gpd.read_parquet(path) if path.suffix.lower() == ".parquet" else gpd.read_file(path)
    except (DataSourceError, OSError, ValueError) as e:
        raise ReadError(f"{path}: not a readable vector file ({e}); give GeoJSON or GeoPackage") from e
    if frame.crs is not None and georef.crs_wkt is not None:
        frame = frame.to_crs(georef.crs_wkt)
    elif frame.crs is None and georef.crs_wkt is not None:
        raise InvalidImageError(f"{path}: the polygons have no CRS; write them with one (e.g. EPSG:4326)")
    if class_field is None:
        values = np.full(len(frame), burn, dtype=np.int64)
    elif class_field not in frame.columns:
        raise ConfigError(
            f"{path}: no attribute {class_field!r}; its attributes are "
            f"{[c for c in frame.columns if c != 'geometry']}. Fix class_field in the data entry"
        )
    else:
        try:
            values = frame[class_field].to_numpy().astype(np.int64)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"{path}: attribute {class_field!r} must hold integer label values ({e}); map names "
                "to numbers in the file or burn one value for every polygon (burn: N)"
            ) from e
    return [
        (g, int(v)) for g, v in zip(frame.geometry, values, strict=True) if g is not None and not g.is_empty
    ]


def burn_box(shapes: Shapes, georef: GeoRef, box: Box, *, fill: int = 0) -> np.ndarray:
    """Label values (int64) of the (y, x) ``box`` of the raster grid; pixel centres inside count."""
    (y0, x0) = box.start
    transform = Affine(*georef.transform) @ Affine.translation(x0, y0)
    if not shapes:
        return np.full(box.shape, fill, dtype=np.int64)
    return features.rasterize(
        shapes, out_shape=box.shape, transform=transform, fill=fill, dtype="int64", all_touched=False
    )
