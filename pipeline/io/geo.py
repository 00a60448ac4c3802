"""GeoTIFF/COG through rasterio: lazy windowed reads and verified COG writes."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio._err import CPLE_BaseError
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from pipeline.data.geometry import GeoRef, check_same_geometry
from pipeline.errors import InvalidImageError, PipelineError, ReadError, WriteError
from pipeline.io import cog_tiles, remote, zarr_store
from pipeline.io.overviews import Resampling, allocate_overviews, check_resampling, fill_overviews
from pipeline.tiling import Box

# Rasters without georeference are refused unless a job allows them; once allowed, GDAL's
# warning about the missing geotransform says nothing new.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio")

# GDAL's block cache defaults to 5 % of RAM per process; finalize streams windows, so a small
# cache bounds the client's memory without slowing it (measured: 1087 -> 443 MiB on 1 GiB).
os.environ.setdefault("GDAL_CACHEMAX", "128")
COG_ENV = {"GDAL_CACHEMAX": 128, "GDAL_NUM_THREADS": "ALL_CPUS"}

RASTER_SUFFIXES = (
    ".tif",
    ".tiff",
    ".gtiff",
    ".geotiff",
    ".cog",
    ".vrt",
    ".img",
    ".jp2",
    ".png",
    ".jpg",
    ".jpeg",
)


def open_raster(path: Path | str) -> Any:
    """``rasterio.open`` for a local path or an http(s)/s3 URL.

    URLs are read through an fsspec file object (:func:`pipeline.io.remote.open_read`): each
    GDAL read becomes a range request, so a window costs its tiles and the header only.
    """
    if not remote.is_url(path):
        return rasterio.open(path)
    url = str(path)

    def opener(name: str, mode: str = "rb", **_: Any) -> Any:
        return remote.open_read(name, mode)

    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):  # no sidecar-file probes
        return rasterio.open(url, opener=opener)


def raster_info(path: Path | str, *, allow_missing_crs: bool = False) -> tuple[tuple[int, ...], str, GeoRef]:
    """Shape ``(bands, y, x)``, dtype and :class:`GeoRef` of a raster, checking it is readable."""
    try:
        with open_raster(path) as ds:
            _probe(ds, path)
            georef = _georef(ds, path, allow_missing_crs)
            return (ds.count, ds.height, ds.width), ds.dtypes[0], georef
    except RasterioError as e:
        if remote.is_url(path):
            remote.diagnose(str(path), "opening the raster")  # a clear error when unreachable
        raise ReadError(
            f"{path}: not a readable raster ({e}). The file is truncated, corrupt or not "
            "a GeoTIFF: Re-download or re-export it."
        ) from e


def _georef(ds: Any, path: Path | str, allow_missing_crs: bool) -> GeoRef:
    if ds.crs is None and not allow_missing_crs:
        raise InvalidImageError(
            f"{path}: the raster has no CRS, so outputs could not be georeferenced. Assign one "
            "(gdal_edit.py -a_srs EPSG:xxxx) or set input.allow_missing_crs: true in the job."
        )
    if len(set(ds.dtypes)) != 1:
        raise InvalidImageError(
            f"{path}: bands have different dtypes {ds.dtypes}; convert them to one dtype first"
        )
    names = tuple(d or str(i + 1) for i, d in enumerate(ds.descriptions))
    nodata = None if ds.nodata is None else float(ds.nodata)
    return GeoRef(ds.crs.to_wkt() if ds.crs else None, tuple(ds.transform)[:6], nodata, names)


def _probe(ds: Any, path: Path | str) -> None:
    """Read the first and the last block of every band, so a truncated file fails now."""
    bh, bw = ds.block_shapes[0]
    first = Window(0, 0, min(bw, ds.width), min(bh, ds.height))
    last = Window(max(ds.width - bw, 0), max(ds.height - bh, 0), min(bw, ds.width), min(bh, ds.height))
    for window in (first, last):
        ds.read(window=window)


def read_raster_box(path: Path | str, box: Box) -> np.ndarray:
    """Read the (y, x) ``box`` of every band: ``(bands, h, w)``."""
    (y0, x0), (y1, x1) = box.start, box.stop
    try:
        with open_raster(path) as ds:
            return ds.read(window=Window(x0, y0, x1 - x0, y1 - y0))
    except RasterioError as e:
        if remote.is_url(path):
            remote.diagnose(str(path), f"reading window rows {y0}:{y1}, cols {x0}:{x1}")
        raise ReadError(
            f"{path}: reading window rows {y0}:{y1}, cols {x0}:{x1} failed ({e}); the "
            "file is probably truncated or corrupt. Re-export it."
        ) from e


def same_crs(a: str, b: str) -> bool:
    """Whether two WKT strings name the same CRS."""
    return bool(rasterio.crs.CRS.from_user_input(a) == rasterio.crs.CRS.from_user_input(b))


def crs_label(crs_wkt: str | None) -> str:
    """A short name of a CRS: ``EPSG:32618`` when it has a code, else the WKT's name; ``none``."""
    if not crs_wkt:
        return "none"
    crs = rasterio.crs.CRS.from_user_input(crs_wkt)
    epsg = crs.to_epsg()
    if epsg:
        return f"EPSG:{epsg}"
    wkt = crs.to_wkt()
    return f"{wkt.split(chr(34))[1] if chr(34) in wkt else wkt[:60]} (no EPSG code)"


def write_cog(
    path: Path,
    georef: GeoRef,
    shape: tuple[int, int],
    dtype: str,
    windows: Callable[[], Iterator[tuple[Box, np.ndarray]]],
    *,
    nodata: float | None,
    resampling: Resampling = "MODE",
    bands: int = 1,
    blocksize: int = 256,
) -> Path:
    """Write a COG window by window, with overviews; verify it; move it into place.

    ``windows()`` yields ``(box, array)`` pairs covering the raster, arrays ``(h, w)`` or
    ``(bands, h, w)``. The data goes to a hidden tiled GeoTIFF, its overview levels are reduced
    from it 2x2 block by 2x2 block with ``resampling`` (``MODE`` or ``NEAREST`` for labels,
    ``AVERAGE`` for scores; see :mod:`pipeline.io.overviews`), then GDAL's COG driver copies it
    (internal ``blocksize`` tiles, those overviews, deflate) to a hidden name; only after the
    geometry is checked is it renamed to ``path``.
    """
    resampling = check_resampling(resampling)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.with_name(f".tmp-{path.stem}.stage.tif")
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with rasterio.Env(**COG_ENV):
            levels = _write_tiled(
                stage, georef, shape, (bands, dtype), windows, nodata, (resampling, blocksize)
            )
            fill_overviews(stage, levels, resampling, nodata)
            rasterio.shutil.copy(
                stage,
                tmp,
                driver="COG",
                COMPRESS="DEFLATE",
                BLOCKSIZE=blocksize,
                OVERVIEWS="FORCE_USE_EXISTING" if levels else "NONE",
                BIGTIFF="IF_SAFER",
            )

        _publish(tmp, path, georef, shape, nodata, len(levels))
    except WriteError:
        raise
    except (RasterioError, CPLE_BaseError, OSError) as e:  # GDAL write errors, EFBIG, ENOSPC
        raise WriteError(f"{path}: writing the COG failed ({e}); check free disk space and quotas") from e
    finally:
        for p in (stage, tmp):
            p.unlink(missing_ok=True)
    return path


def write_cog_from_zarr(
    path: Path,
    georef: GeoRef,
    source: Path,
    *,
    nodata: float | None,
    resampling: Resampling = "MODE",
    blocksize: int = 256,
    run: cog_tiles.Mapper = cog_tiles.local_map,
    scratch: Path | None = None,
) -> Path:
    """Write the COG of the 2-D zarr array ``source`` with its tiles and overviews encoded by
    ``run`` (Dask workers in a job) and assembled here (:mod:`pipeline.io.cog_tiles`): the same
    pixels at every level as :func:`write_cog`, which writes from windows with GDAL's COG driver
    in this process. Verified, then renamed to ``path``; ``scratch`` (a folder the workers can
    reach; default beside ``path``) holds the encoded tiles meanwhile."""
    resampling = check_resampling(resampling)
    shape, dtype = zarr_store.array_info(source)[:2]
    if len(shape) < 2 or math.prod(shape[:-2]) != 1:
        raise WriteError(f"{path}: a one-band COG is written from a 2-D array; {source} has shape {shape}")
    pyramid = cog_tiles.Pyramid.of((shape[-2], shape[-1]), dtype, blocksize, resampling, nodata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    work = scratch if scratch is not None else path.with_name(f".tmp-{path.stem}.tiles")
    try:
        tags: dict[str, str] = {"OVERVIEW_RESAMPLING": resampling} if len(pyramid.shapes) > 1 else {}
        cog_tiles.write(tmp, georef, source, pyramid, work, run=run, tags=tags)
        _publish(tmp, path, georef, pyramid.shapes[0], nodata, len(pyramid.shapes) - 1)
    except PipelineError:  # a damaged source chunk (ReadError) says so itself
        raise
    except (RasterioError, CPLE_BaseError, OSError) as e:  # GDAL write errors, EFBIG, ENOSPC
        raise WriteError(f"{path}: writing the COG failed ({e}); check free disk space and quotas") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _publish(
    tmp: Path, path: Path, georef: GeoRef, shape: tuple[int, int], nodata: float | None, levels: int
) -> None:
    """Check the hidden COG ``tmp`` (geometry, size, nodata, overview count), then rename it."""
    verify_raster(tmp, georef, shape, nodata)
    _check_overviews(tmp, levels)
    os.replace(tmp, path)


def _check_overviews(path: Path, expected: int) -> None:
    with rasterio.open(path) as ds:
        found = len(ds.overviews(1))
    if found != expected:
        raise WriteError(
            f"{path}: the COG holds {found} overview levels, not the {expected} segpipe built; "
            "GDAL did not copy them. Check the GDAL version (3.2+ is needed for OVERVIEWS)"
        )


def _write_tiled(
    stage: Path,
    georef: GeoRef,
    shape: tuple[int, int],
    layout: tuple[int, str],
    windows: Callable[[], Iterator[tuple[Box, np.ndarray]]],
    nodata: float | None,
    overviews: tuple[Resampling, int],
) -> list[tuple[int, int]]:
    bands, dtype = layout
    profile = {
        "driver": "GTiff",
        "height": shape[0],
        "width": shape[1],
        "count": bands,
        "dtype": dtype,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        **_stage_compression(dtype),
        "transform": rasterio.Affine(*georef.transform),
        "crs": georef.crs_wkt,
        "nodata": nodata,
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(stage, "w", **profile) as dst:
        levels = allocate_overviews(dst, overviews[0], blocksize=overviews[1])
        for box, data in windows():
            (y0, x0), (y1, x1) = box.start, box.stop
            block = data if data.ndim == 3 else data[None]
            dst.write(block, window=Window(x0, y0, x1 - x0, y1 - y0))
    return levels


def _stage_compression(dtype: str) -> dict[str, Any]:
    """How the hidden staging GeoTIFF is compressed: it is written once, read back level by level
    while the overviews are filled, then once more by the COG copy. Label maps (integers) are
    mostly runs of one value and take PACKBITS: on the 16384^2 labels of ``bench_scaling.py``
    the staging file writes and fills in 2.1-2.7 s against 3.7 s with zstd level 1 (2.3 s
    uncompressed, 15 times the disk), and a PACKBITS tile never exceeds its raw size by more
    than 1/128. Float scores compress poorly with runs and take zstd."""
    if np.dtype(dtype).kind in "iub":
        return {"compress": "packbits"}
    return {"compress": "zstd", "zstd_level": 1}


def verify_raster(path: Path, georef: GeoRef, shape: tuple[int, int], nodata: float | None) -> None:
    """Re-open ``path`` and check CRS, transform, size and nodata against the input's."""
    with rasterio.open(path) as ds:
        actual = GeoRef(ds.crs.to_wkt() if ds.crs else None, tuple(ds.transform)[:6])
        check_same_geometry(georef, actual, what=str(path), same_crs=same_crs)
        if (ds.height, ds.width) != tuple(shape) or not _same_nodata(ds.nodata, nodata):
            raise WriteError(
                f"{path}: size {(ds.height, ds.width)} / nodata {ds.nodata} differ "
                f"from the expected {tuple(shape)} / {nodata}"
            )


def _same_nodata(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))
