"""The lazy image wrapper every reader returns and every segmenter consumes.

An :class:`Image` is a dask-backed ``xarray.DataArray`` in numpy order plus its geometry.
Rasters are ``("band", "y", "x")``; volumes are ``("z", "y", "x")`` and are presented to
segmenters with a leading channel axis of length one, so every block is ``(C, *spatial)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from pipeline.data.geometry import Geometry, GeoRef, VolumeRef
from pipeline.errors import InvalidImageError

RASTER_DIMS = ("band", "y", "x")
VOLUME_DIMS = ("z", "y", "x")
MAX_ELEMENTS = 2**48  # absurd declared sizes (a corrupt header) are refused before any work


@dataclass(frozen=True)
class Image:
    """A lazy image and its geometry.

    Parameters
    ----------
    data
        Dask-backed array with dims :data:`RASTER_DIMS` or :data:`VOLUME_DIMS`.
    geometry
        :class:`GeoRef` for rasters, :class:`VolumeRef` for volumes.
    source
        Where it came from (a path or URI), used in messages.
    """

    data: xr.DataArray
    geometry: Geometry
    source: str

    @property
    def kind(self) -> str:
        """``"raster"`` or ``"volume"``."""
        return "raster" if isinstance(self.geometry, GeoRef) else "volume"

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the band axis: (y, x) or (z, y, x)."""
        return tuple(int(s) for s in (self.data.shape[1:] if self.kind == "raster" else self.data.shape))

    @property
    def n_channels(self) -> int:
        """Bands of a raster; 1 for a volume."""
        return int(self.data.shape[0]) if self.kind == "raster" else 1

    @property
    def nodata(self) -> float | None:
        """Nodata value of a raster (``None`` for volumes and rasters without one)."""
        return self.geometry.nodata if isinstance(self.geometry, GeoRef) else None


def wrap_image(array: object, geometry: Geometry, *, source: str = "<array>") -> Image:
    """Wrap a numpy/dask array (or DataArray) and its geometry into a validated :class:`Image`.

    A 2-D array given with a :class:`GeoRef` becomes a single-band raster.
    """
    if isinstance(array, xr.DataArray):
        da = array
    else:
        arr = array if hasattr(array, "ndim") else np.asarray(array)
        if isinstance(geometry, GeoRef) and arr.ndim == 2:  # type: ignore[attr-defined]
            arr = arr[None]  # type: ignore[index]
        dims = RASTER_DIMS if isinstance(geometry, GeoRef) else VOLUME_DIMS
        _check_ndim(arr.ndim, len(dims), source)  # type: ignore[attr-defined]
        da = xr.DataArray(arr, dims=dims)
    image = Image(da, geometry, source)
    validate_image(image)
    return image


def validate_image(image: Image) -> None:
    """Raise :class:`InvalidImageError` unless ``image`` meets the contract."""
    dims = RASTER_DIMS if isinstance(image.geometry, GeoRef) else VOLUME_DIMS
    _check_ndim(image.data.ndim, len(dims), image.source)
    if tuple(image.data.dims) != dims:
        raise InvalidImageError(f"{image.source}: dims {tuple(image.data.dims)} must be {dims}")
    if any(s == 0 for s in image.data.shape):
        raise InvalidImageError(
            f"{image.source}: the image is empty (shape {image.data.shape}); "
            "give a file with at least one pixel"
        )
    if int(np.prod(image.data.shape, dtype=np.float64)) > MAX_ELEMENTS:
        raise InvalidImageError(
            f"{image.source}: declared shape {image.data.shape} is absurdly "
            "large; the header is probably corrupt"
        )
    kind = image.data.dtype.kind
    if kind not in "uif" or image.data.dtype.itemsize > 8:
        raise InvalidImageError(
            f"{image.source}: dtype {image.data.dtype} is not supported; convert to an integer or float type"
        )
    if isinstance(image.geometry, VolumeRef) and image.data.ndim != 3:
        raise InvalidImageError(f"{image.source}: a volume must be 3-D (z, y, x)")


def _check_ndim(ndim: int, expected: int, source: str) -> None:
    if ndim != expected:
        what = "raster (band, y, x)" if expected == 3 else "image"
        raise InvalidImageError(
            f"{source}: {ndim}-D data is not supported; a raster is (band, y, x) or (y, x) and a "
            f"volume is (z, y, x). Got {ndim} dimensions, expected a {expected}-D {what}. "
            "Squeeze or split extra axes (time, channels) before segmenting."
        )


def valid_mask(block: np.ndarray, nodata: float | None) -> np.ndarray:
    """Spatial mask of usable pixels of a ``(C, *spatial)`` block.

    A pixel is invalid when every band equals ``nodata`` (rasterio's dataset-mask rule) or
    any band is NaN or infinite (no threshold or statistic is defined for it).
    """
    valid = np.ones(block.shape[1:], dtype=bool)
    if nodata is not None and not np.isnan(nodata):
        valid &= ~np.all(block == nodata, axis=0)
    if block.dtype.kind == "f":
        valid &= np.all(np.isfinite(block), axis=0)
    return valid
