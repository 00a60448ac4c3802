"""Open any supported input as an :class:`~pipeline.data.Image` plus a picklable reader.

:class:`ImageSource` is what goes into Dask graphs: a path and a format, never an open file
handle. ``read(box)`` returns ``(C, *spatial)`` for a spatial box. A source's path may be an
``http(s)://`` or ``s3://`` URL of a GeoTIFF/COG or a segpipe zarr array (see
:mod:`pipeline.io.remote`): chunk tasks on the workers read it by region.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dask
import dask.array as dsa
import numpy as np
import xarray as xr

from pipeline.data import Image, wrap_image
from pipeline.data.geometry import Geometry, GeoRef
from pipeline.data.image import MAX_ELEMENTS
from pipeline.errors import InvalidImageError, ReadError
from pipeline.io import geo, medical, remote, zarr_store
from pipeline.tiling import Box, ChunkGrid

Format = Literal["raster", "volume", "zarr"]


@dataclass(frozen=True)
class ImageSource:
    """A readable input: its path, format, shape ``(C, *spatial)``, dtype and geometry.

    ``path`` is a local :class:`~pathlib.Path` or an http(s)/s3 :class:`~pipeline.io.remote.URL`.
    """

    path: Path | remote.URL
    format: Format
    shape: tuple[int, ...]
    dtype: str
    geometry: Geometry

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the channel axis."""
        return self.shape[1:]

    def read(self, box: Box) -> np.ndarray:
        """Read the spatial ``box`` as ``(C, *box.shape)``."""
        if self.format == "raster":
            return geo.read_raster_box(self.path, box)
        if self.format == "volume":
            return medical.read_volume_box(Path(self.path), box)
        return zarr_store.read_box(self.path, box, channels=True)

    @property
    def read_unit(self) -> str:
        """What a read costs: ``region`` (only the box), ``slab`` (whole slices: DICOM) or
        ``whole`` (the whole file: compressed volumes)."""
        if self.format != "volume":
            return "region"
        path = Path(self.path)  # volumes are local
        if path.is_dir():
            return "slab"
        return "region" if medical.is_streamable(path) else "whole"

    @property
    def streamable(self) -> bool:
        """Whether a region read costs only that region."""
        return self.read_unit == "region"


def open_source(path: str | Path, *, allow_missing_crs: bool = False) -> ImageSource:
    """Inspect ``path`` (headers only) and return its :class:`ImageSource`.

    ``path`` may be an ``http(s)://`` or ``s3://`` URL of a GeoTIFF/COG or a segpipe zarr array.
    """
    if remote.is_url(path):
        return _checked(_open_remote(str(path), allow_missing_crs=allow_missing_crs))
    p = Path(path)
    if not p.exists():
        raise ReadError(
            f"{p}: no such file or folder. Check input.path (relative paths are "
            "resolved against the job file's folder)."
        )
    name = p.name.lower()
    if name.endswith(".zarr") or (p / "zarr.json").exists():
        shape, dtype, geometry = zarr_store.array_info(p)
        return _checked(ImageSource(p, "zarr", shape, dtype, geometry))
    if medical.is_volume_path(p):
        (z, y, x), dtype, ref = medical.volume_info(p)
        return _checked(ImageSource(p, "volume", (1, z, y, x), dtype, ref))
    if name.endswith(geo.RASTER_SUFFIXES):
        shape, dtype, georef = geo.raster_info(p, allow_missing_crs=allow_missing_crs)
        return _checked(ImageSource(p, "raster", shape, dtype, georef))
    raise InvalidImageError(
        f"{p}: unknown input format; segpipe reads GeoTIFF/COG "
        f"{geo.RASTER_SUFFIXES}, volumes {medical.VOLUME_SUFFIXES}, DICOM "
        "series folders and segpipe zarr arrays"
    )


def _open_remote(url: str, *, allow_missing_crs: bool) -> ImageSource:
    """A remote GeoTIFF/COG (read by range requests) or segpipe zarr array."""
    remote.check_url(url, what="input")
    name = remote.url_name(url).lower()
    if name.endswith(".zarr") or (
        not name.endswith(geo.RASTER_SUFFIXES) and remote.exists(remote.join(url, "zarr.json"))
    ):
        shape, dtype, geometry = zarr_store.array_info(url)
        return ImageSource(remote.URL(url), "zarr", shape, dtype, geometry)
    if name.endswith(geo.RASTER_SUFFIXES):
        shape, dtype, georef = geo.raster_info(url, allow_missing_crs=allow_missing_crs)
        return ImageSource(remote.URL(url), "raster", shape, dtype, georef)
    remote.diagnose(url, "opening the input")  # missing or unreachable: say so first
    if name.endswith(medical.VOLUME_SUFFIXES):
        raise InvalidImageError(
            f"{remote.redact(url)}: volumes (NIfTI, MHA, NRRD, DICOM) are read from local or shared "
            "paths only; copy the file to a folder the workers see, or give a segpipe zarr array URL"
        )
    raise InvalidImageError(
        f"{remote.redact(url)}: unknown remote input format; segpipe reads GeoTIFF/COG "
        f"{geo.RASTER_SUFFIXES} and segpipe zarr arrays over http(s):// and s3://"
    )


def _checked(src: ImageSource) -> ImageSource:
    expected = 2 if isinstance(src.geometry, GeoRef) else 3
    if len(src.shape) != expected + 1:
        raise InvalidImageError(
            f"{src.path}: {len(src.shape) - 1}-D data is not supported; its geometry says "
            f"{'raster (y, x)' if expected == 2 else 'volume (z, y, x)'} with a channel axis "
            f"first, but the array has shape {src.shape}. Squeeze or split the extra axes."
        )
    if any(s == 0 for s in src.shape):
        raise InvalidImageError(
            f"{src.path}: the image is empty (shape {src.shape}); give a file with pixels"
        )
    if float(np.prod(src.shape, dtype=np.float64)) > MAX_ELEMENTS:
        raise InvalidImageError(
            f"{src.path}: declared shape {src.shape} is absurdly large (over 2^48 "
            "elements); the header is probably corrupt. Re-export the file."
        )
    return src


def open_image(path: str | Path, *, chunk: int = 512, allow_missing_crs: bool = False) -> Image:
    """Open ``path`` lazily as an :class:`Image` (dask-backed, nothing read yet)."""
    src = open_source(path, allow_missing_crs=allow_missing_crs)
    return image_from_source(src, chunk=chunk)


def image_from_source(src: ImageSource, *, chunk: int = 512) -> Image:
    """A lazy :class:`Image` whose blocks are ``src.read`` calls."""
    spatial = src.spatial_shape
    grid = ChunkGrid.build(spatial, (chunk,) * len(spatial), 0)
    blocks = np.empty(grid.counts, dtype=object)
    for spec in grid:
        shape = (src.shape[0], *spec.write.shape)
        blocks[spec.index] = dsa.from_delayed(dask.delayed(src.read)(spec.write), shape, src.dtype)
    arr = dsa.block(_nest(blocks, src.shape[0]))
    if src.format != "raster" and not isinstance(src.geometry, GeoRef):
        arr = arr[0]
    image = wrap_image(arr, src.geometry, source=str(src.path))
    return Image(_with_coords(image.data, src.geometry), src.geometry, image.source)


def _nest(blocks: np.ndarray, _channels: int) -> list:
    """Turn an object array of blocks into the nested list ``dask.array.block`` wants."""
    if blocks.ndim == 1:
        return [b for b in blocks]
    return [_nest(b, _channels) for b in blocks]


def _with_coords(data: xr.DataArray, geometry: Geometry) -> xr.DataArray:
    if not isinstance(geometry, GeoRef):
        return data
    a, _, c, _, e, f = geometry.transform
    data = data.assign_coords(
        x=c + a * (np.arange(data.sizes["x"]) + 0.5),
        y=f + e * (np.arange(data.sizes["y"]) + 0.5),
        band=list(geometry.band_names),
    )
    if geometry.crs_wkt:
        import rioxarray  # noqa: F401  (registers .rio)

        data = data.rio.write_crs(geometry.crs_wkt)
    return data
