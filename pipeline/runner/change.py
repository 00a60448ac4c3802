"""Change report between two land-cover maps of one area: transitions, areas, a change COG.

Both maps are read window by window (bounded memory); their grids must match exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.geometry import GeoRef, check_same_geometry
from pipeline.errors import InvalidImageError
from pipeline.io import geo, tables
from pipeline.io.sources import open_source
from pipeline.tiling import ChunkGrid

NODATA_CLASS = 255
NODATA_CODE = 65535


def change_report(before: Path, after: Path, out: Path, *, window: int = 1024) -> dict[str, Any]:
    """Transition matrix and areas (km²) from ``before`` to ``after``, and ``change.tif``.

    The change COG holds ``before_class * 256 + after_class`` (uint16; 65535 where either map
    is nodata), so every transition can be mapped; ``changed`` counts pixels whose class moved.
    """
    a, b = open_source(before), open_source(after)
    if not isinstance(a.geometry, GeoRef) or a.shape[0] != 1:
        raise InvalidImageError(f"{before}: a change report needs single-band label rasters")
    check_same_geometry(a.geometry, b.geometry, what=str(after), same_crs=geo.same_crs)
    if a.shape != b.shape:
        raise InvalidImageError(f"{after}: shape {b.shape} differs from {before}'s {a.shape}")
    grid = ChunkGrid.build(a.spatial_shape, (window, window), 0)
    counts = np.zeros((256, 256), dtype=np.int64)

    def windows():  # type: ignore[no-untyped-def]
        for spec in grid:
            x, y = a.read(spec.write)[0].astype(np.int64), b.read(spec.write)[0].astype(np.int64)
            ok = (x != NODATA_CLASS) & (y != NODATA_CLASS) & (x < 256) & (y < 256)
            np.add.at(counts, (x[ok], y[ok]), 1)
            yield spec.write, np.where(ok, x * 256 + y, NODATA_CODE).astype(np.uint16)

    out.mkdir(parents=True, exist_ok=True)
    georef = GeoRef(a.geometry.crs_wkt, a.geometry.transform)
    cog = geo.write_cog(
        out / "change.tif", georef, (a.shape[1], a.shape[2]), "uint16", windows, nodata=NODATA_CODE
    )
    return _tables(counts, georef, out, cog)


def _tables(counts: np.ndarray, georef: GeoRef, out: Path, cog: Path) -> dict[str, Any]:
    a_cls, b_cls = np.nonzero(counts)
    centre = pd.Series([georef.transform[2]]), pd.Series([georef.transform[5]])
    pixel_m2 = float(tables.pixel_area_m2(georef, *centre)[0])
    frame = pd.DataFrame({"before": a_cls, "after": b_cls, "pixels": counts[a_cls, b_cls]})
    frame["area_km2"] = frame["pixels"] * pixel_m2 / 1e6
    tables.write_parquet(out / "transitions.parquet", frame)
    changed = int(frame.loc[frame.before != frame.after, "pixels"].sum())
    report = {
        "change_cog": str(cog),
        "transitions": str(out / "transitions.parquet"),
        "pixels": int(frame.pixels.sum()),
        "changed_pixels": changed,
        "changed_km2": changed * pixel_m2 / 1e6,
        "pixel_area_m2": pixel_m2,
        "matrix": {f"{int(r.before)}->{int(r.after)}": int(r.pixels) for r in frame.itertuples()},
    }
    (out / "change.json").write_text(json.dumps(report, indent=2))
    return report
