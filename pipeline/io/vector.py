"""Polygons per chunk, merged across seams, written as GeoPackage or GeoParquet.

Chunks are vectorised in integer pixel coordinates of the whole image, so the edges two
chunks share are identical and the union of an object's pieces has no slivers; the affine
transform is applied once, after the union.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from rasterio import features
from rasterio.transform import Affine
from shapely import affinity, make_valid, unary_union
from shapely.geometry import shape as to_shape

from pipeline.data.geometry import GeoRef
from pipeline.io import zarr_store
from pipeline.tiling import ChunkSpec


def chunk_polygons(labels_path: Path, spec: ChunkSpec) -> list[tuple[int, object]]:
    """``(id, polygon)`` pieces of one chunk in global pixel coordinates (x = col, y = row)."""
    ids = zarr_store.read_box(labels_path, spec.write)
    dtype = "int32" if ids.max(initial=0) < 2**31 else "float64"
    shift = Affine.translation(spec.write.start[1], spec.write.start[0])
    return [
        (int(v), to_shape(g))
        for g, v in features.shapes(ids.astype(dtype), mask=ids != 0, connectivity=4, transform=shift)
    ]


def polygons_from_chunks(
    labels_path: Path, specs: list[ChunkSpec], georef: GeoRef, attrs: pd.DataFrame, *, simplify: float = 0.0
) -> gpd.GeoDataFrame:
    """One (multi)polygon per object: pieces of all chunks unioned, then georeferenced."""
    pieces: dict[int, list[object]] = defaultdict(list)
    for spec in specs:
        for oid, poly in chunk_polygons(labels_path, spec):
            pieces[oid].append(poly)
    a, b, c, d, e, f = georef.transform
    ids = sorted(pieces)
    geoms = [affinity.affine_transform(make_valid(unary_union(pieces[i])), [a, b, d, e, c, f]) for i in ids]
    frame = gpd.GeoDataFrame({"id": np.asarray(ids, dtype=np.int64)}, geometry=geoms, crs=georef.crs_wkt)
    if simplify > 0:
        frame["geometry"] = frame.geometry.simplify(simplify, preserve_topology=True)
    return frame.merge(attrs.astype({"id": np.int64}), on="id", how="left")


def write_polygons(path: Path, frame: gpd.GeoDataFrame, fmt: str) -> Path:
    """Write GeoPackage (``gpkg``) or GeoParquet (``geoparquet``) atomically."""
    tmp = path.with_name(f".tmp-{path.name}")
    if fmt == "gpkg":
        frame.to_file(tmp, driver="GPKG", layer="objects")
    else:
        frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path
