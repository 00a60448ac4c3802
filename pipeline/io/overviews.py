"""COG overview levels built by segpipe from the full-resolution raster, 2x2 block by 2x2 block.

GDAL's own overview resampling does not reduce exact 2x2 blocks when a side is odd: the COG
driver makes levels of ``floor(n / 2)`` pixels and ``gdaladdo`` of ``ceil(n / 2)``, and both
then resample with the ratio ``n / m`` (1.996 for 513 -> 257), so along an odd axis almost every
overview pixel's window spans three source pixels and overlaps its neighbours' (MODE), or mixes
partial pixels by weight (AVERAGE). Here every level is defined exactly, so it can be checked:

- level ``k`` has ``ceil(n_{k-1} / 2)`` pixels per axis and is reduced from level ``k - 1``
  (level 0 is the full-resolution raster), as GDAL and OME-Zarr pyramids cascade;
- pixel ``(i, j)`` reduces the source block ``[2i, 2i + 2) x [2j, 2j + 2)``, cut by the raster's
  bottom and right edges (partial blocks of 2x1, 1x2 or 1x1 pixels);
- ``MODE``: the most frequent valid value of the block, ties to the smallest value;
  ``AVERAGE``: the mean of the valid values (float64 sums, cast to the raster's dtype, rounded
  for integers); ``NEAREST``: the block's top-left pixel, valid or not. Valid means not the
  nodata value and not NaN; a block without a valid pixel is nodata (NaN for a float raster
  without a declared nodata).

Levels are created in the hidden staging GeoTIFF before its pixels are written, filled tile by
tile (bounded memory) once they are, and the COG driver copies them as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import rasterio
from rasterio.enums import Resampling as GdalResampling
from rasterio.windows import Window

from pipeline.errors import ConfigError, WriteError

Resampling = Literal["NEAREST", "MODE", "AVERAGE"]
RESAMPLINGS: tuple[str, ...] = get_args(Resampling)

#: Output tile (pixels per side) of one reduction step: the source window is twice as large.
TILE = 1024


def check_resampling(resampling: str) -> Resampling:
    """``resampling`` if it is one segpipe builds, else a :class:`ConfigError`."""
    if resampling not in RESAMPLINGS:
        raise ConfigError(
            f"overview resampling {resampling!r} is not one of {RESAMPLINGS}: MODE or NEAREST "
            "for labels and classes, AVERAGE for scores such as probabilities"
        )
    return resampling  # type: ignore[return-value]


def level_shapes(shape: tuple[int, int], blocksize: int) -> list[tuple[int, int]]:
    """Overview shapes: halve (rounding up) until the level fits in one ``blocksize`` tile."""
    h, w = shape
    out = []
    while max(h, w) > blocksize:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        out.append((h, w))
    return out


def reduce_2x2(a: np.ndarray, resampling: Resampling, nodata: float | None) -> np.ndarray:
    """Reduce the last two axes of ``a`` by 2x2 blocks (partial at the bottom and right edges)."""
    if resampling == "NEAREST":
        return a[..., ::2, ::2].copy()
    values, valid = _quads(a, nodata)
    if resampling == "MODE":
        return _mode_mostly_uniform(values, valid, _fill(a.dtype, nodata))
    return _mean(values, valid, _fill(a.dtype, nodata), a.dtype)


def _valid(a: np.ndarray, nodata: float | None) -> np.ndarray:
    ok = ~np.isnan(a) if a.dtype.kind in "fc" else np.ones(a.shape, dtype=bool)
    if nodata is not None and not math.isnan(nodata):
        ok &= a != np.asarray(nodata).astype(a.dtype)
    return ok


def _fill(dtype: np.dtype, nodata: float | None) -> float:
    if nodata is not None:
        return nodata
    return math.nan if dtype.kind in "fc" else 0  # integers without nodata always have a valid pixel


def _quads(a: np.ndarray, nodata: float | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The four pixels of every 2x2 block and whether each is a valid pixel inside the raster."""
    h, w = a.shape[-2:]
    pad = [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)]
    padded = np.pad(a, pad, mode="edge")
    valid = _valid(padded, nodata)
    valid[..., h:, :] = False  # padding is never counted
    valid[..., :, w:] = False
    offsets = ((0, 0), (0, 1), (1, 0), (1, 1))
    return (
        [padded[..., i::2, j::2] for i, j in offsets],
        [valid[..., i::2, j::2] for i, j in offsets],
    )


def _mode_mostly_uniform(values: list[np.ndarray], valid: list[np.ndarray], fill: float) -> np.ndarray:
    """:func:`_mode`, computed only where a block's four pixels differ.

    In a label map most 2x2 blocks hold one value, and their mode is that value whatever its
    validity: four valid pixels, or four nodata pixels (the result is then ``fill``, which is
    nodata), or an edge block whose padding repeats its valid pixels. NaN never equals itself,
    so NaN blocks take the general path.
    """
    v0 = values[0]
    mixed = (v0 != values[1]) | (v0 != values[2]) | (v0 != values[3])
    if not mixed.any():
        return v0.copy()
    if not mixed.all():
        out = v0.copy()
        out[mixed] = _mode([v[mixed] for v in values], [k[mixed] for k in valid], fill)
        return out
    return _mode(values, valid, fill)


def _mode(values: list[np.ndarray], valid: list[np.ndarray], fill: float) -> np.ndarray:
    # counts[i]: how many valid pixels of the block equal pixel i (0 when pixel i is not valid)
    counts = [k.astype(np.uint8) for k in valid]
    for i, j in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)):
        same = (values[i] == values[j]) & valid[i] & valid[j]
        counts[i] += same
        counts[j] += same
    best, best_count = values[0].copy(), counts[0].copy()
    for v, count in zip(values[1:], counts[1:], strict=True):
        better = (count > best_count) | ((count == best_count) & (count > 0) & (v < best))
        np.copyto(best, v, where=better)
        np.copyto(best_count, count, where=better)
    return np.where(best_count > 0, best, np.asarray(fill).astype(best.dtype))


def _mean(values: list[np.ndarray], valid: list[np.ndarray], fill: float, dtype: np.dtype) -> np.ndarray:
    total = sum(np.where(ok, v.astype(np.float64), 0.0) for v, ok in zip(values, valid, strict=True))
    count = sum(ok.astype(np.int8) for ok in valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.asarray(total) / count, fill)
    if np.dtype(dtype).kind in "iu":
        mean = np.rint(mean)
    return mean.astype(dtype)


def allocate_overviews(ds: Any, resampling: Resampling, *, blocksize: int) -> list[tuple[int, int]]:
    """Create the overview levels of ``ds``, a GeoTIFF open for writing and still empty; return
    their shapes. Building them before any pixel is written reads nothing (the levels hold
    nodata) and costs nothing; :func:`fill_overviews` then writes every level."""
    shapes = level_shapes((ds.height, ds.width), blocksize)
    if shapes:
        ds.build_overviews([2 ** (k + 1) for k in range(len(shapes))], GdalResampling.nearest)
        ds.update_tags(OVERVIEW_RESAMPLING=resampling)
    return shapes


def fill_overviews(
    path: Path, shapes: list[tuple[int, int]], resampling: Resampling, nodata: float | None
) -> None:
    """Write every overview level of the GeoTIFF ``path``, tile by tile, each with
    :func:`reduce_2x2` of the level above it (level 0: the full-resolution raster)."""
    for k, shape in enumerate(shapes):
        above = {} if k == 0 else {"overview_level": k - 1}
        with rasterio.open(path, **above) as src, rasterio.open(path, "r+", overview_level=k) as dst:
            if (dst.height, dst.width) != shape:
                raise WriteError(
                    f"{path}: GDAL made overview level {k + 1} of {(dst.height, dst.width)} pixels, "
                    f"not the {shape} of a 2x2 reduction; the overviews would be misaligned"
                )
            for window in _tiles(shape):
                block = src.read(window=_source_window(window, src.height, src.width))
                dst.write(reduce_2x2(block, resampling, nodata), window=window)


def _tiles(shape: tuple[int, int]) -> Iterator[Window]:
    h, w = shape
    for row in range(0, h, TILE):
        for col in range(0, w, TILE):
            yield Window(col, row, min(TILE, w - col), min(TILE, h - row))


def _source_window(window: Window, height: int, width: int) -> Window:
    col, row = 2 * int(window.col_off), 2 * int(window.row_off)
    return Window(
        col, row, min(2 * int(window.width), width - col), min(2 * int(window.height), height - row)
    )
