"""Seeded synthetic data written in real formats (GeoTIFF), window by window."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

Fill = Callable[[int, int, int, int], np.ndarray]


def smooth_field(seed: int = 0, *, count: int = 1, dtype: str = "uint16") -> Fill:
    """Seeded smooth blobs plus noise: ``fill(row, col, h, w) -> (count, h, w)``, any window."""
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(0.002, 0.02, size=(count, 4, 2))
    phases = rng.uniform(0, 2 * np.pi, size=(count, 4))

    def fill(row: int, col: int, h: int, w: int) -> np.ndarray:
        yy, xx = np.mgrid[row : row + h, col : col + w].astype(np.float32)
        out = np.empty((count, h, w), dtype=dtype)
        for b in range(count):
            wave = sum(np.sin(yy * f[0] + xx * f[1] + p) for f, p in zip(freqs[b], phases[b], strict=False))
            noise = np.random.default_rng((seed, b, row, col)).normal(0, 0.3, size=(h, w))
            out[b] = np.clip((wave + noise + 4.5) * 1000, 0, 9000).astype(dtype)
        return out

    return fill


def blocks_field(seed: int = 0, *, block: int = 256, dtype: str = "uint16") -> Fill:
    """Cheap bimodal data for big rasters: each ``block`` square is dark or bright, plus noise."""

    def fill(row: int, col: int, h: int, w: int) -> np.ndarray:
        rr = (np.arange(row, row + h) // block)[:, None]
        cc = (np.arange(col, col + w) // block)[None, :]
        bright = ((rr * 7919 + cc * 104729 + seed) % 5) < 2
        noise = np.random.default_rng((seed, row, col)).normal(0, 300, size=(h, w))
        return np.clip(np.where(bright, 6000, 2000) + noise, 0, 9000).astype(dtype)[None]

    return fill


def write_raster(
    path: Path,
    shape: tuple[int, int],
    *,
    count: int = 1,
    dtype: str = "uint16",
    crs: str | None = "EPSG:32633",
    nodata: float | None = None,
    seed: int = 0,
    block: int = 512,
    fill: Fill | None = None,
) -> Path:
    """Write a tiled GeoTIFF of ``shape`` (rows, cols) window by window (bounded memory)."""
    fill = fill or smooth_field(seed, count=count, dtype=dtype)
    profile = {
        "driver": "GTiff",
        "height": shape[0],
        "width": shape[1],
        "count": count,
        "dtype": dtype,
        "crs": crs,
        "transform": Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0),
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "nodata": nodata,
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, shape[0], block):
            for col in range(0, shape[1], block):
                h, w = min(block, shape[0] - row), min(block, shape[1] - col)
                dst.write(fill(row, col, h, w), window=Window(col, row, w, h))
    return path
