"""One metrics row per chunk, and the Parquet table of a job."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.geometry import Geometry, GeoRef


def tile_row(
    chunk_id: str,
    start: tuple[int, ...],
    stop: tuple[int, ...],
    labels: np.ndarray,
    classes: dict[int, str],
    geometry: Geometry,
    *,
    nodata_label: int,
) -> dict[str, Any]:
    """Geometry and class statistics of one chunk's labels (its write box only)."""
    bounds = geometry.bounds(start, stop)
    counts = np.bincount(labels.ravel(), minlength=256)
    valid = int(labels.size - counts[nodata_label])
    row: dict[str, Any] = {
        "chunk_id": chunk_id,
        "start": list(start),
        "stop": list(stop),
        "bounds": list(bounds),
        "bounds_units": "crs" if isinstance(geometry, GeoRef) else "mm",
        "pixels": int(labels.size),
        "valid_pixels": valid,
    }
    for cid, name in classes.items():
        row[f"frac_{name}"] = float(counts[cid] / valid) if valid else 0.0
    return row


def write_tile_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write the per-tile rows as Parquet atomically, sorted by chunk id."""
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values("chunk_id", key=lambda s: s.map(_natural)).reset_index(drop=True)
    tmp = path.with_name(f".tmp-{path.name}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def _natural(chunk_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in chunk_id.split("_"))
