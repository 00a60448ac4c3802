"""Volumes through SimpleITK: NIfTI, MHA/MHD, NRRD and DICOM series; verified writes.

SimpleITK orders axes x, y, z; segpipe orders them z, y, x. The conversion happens only in
:func:`to_volume_ref` and :func:`apply_volume_ref`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.data.geometry import VolumeRef, check_same_geometry
from pipeline.errors import InvalidImageError, ReadError, WriteError
from pipeline.tiling import Box

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
STREAMABLE_SUFFIXES = (".mha", ".mhd", ".nii", ".nrrd", ".nhdr")  # uncompressed region reads
WRITE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")


def to_volume_ref(
    spacing_xyz: tuple[float, ...], origin_xyz: tuple[float, ...], direction_xyz: tuple[float, ...]
) -> VolumeRef:
    """The one x,y,z -> z,y,x conversion: SimpleITK geometry to :class:`VolumeRef`."""
    d = np.asarray(direction_xyz, dtype=float).reshape(3, 3)[::-1, ::-1]
    return VolumeRef(
        tuple(float(v) for v in spacing_xyz[::-1]),  # type: ignore[arg-type]
        tuple(float(v) for v in origin_xyz[::-1]),  # type: ignore[arg-type]
        tuple(tuple(float(v) for v in row) for row in d),  # type: ignore[misc]
    )


def apply_volume_ref(image: sitk.Image, ref: VolumeRef) -> sitk.Image:
    """The inverse conversion: set ``ref`` on a SimpleITK image."""
    image.SetSpacing(tuple(ref.spacing_zyx[::-1]))
    image.SetOrigin(tuple(ref.origin_zyx[::-1]))
    d = np.asarray(ref.direction_zyx, dtype=float)[::-1, ::-1]
    image.SetDirection(tuple(d.ravel().tolist()))
    return image


def is_volume_path(path: Path) -> bool:
    """Whether ``path`` names a volume file or a DICOM series folder."""
    return path.is_dir() or path.name.lower().endswith(VOLUME_SUFFIXES)


def volume_info(path: Path) -> tuple[tuple[int, int, int], str, VolumeRef]:
    """Shape (z, y, x), numpy dtype and geometry, reading headers only."""
    if path.is_dir():
        return _series_info(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ReadError(
            f"{path}: not a readable volume ({_first_line(e)}). Check that the file is "
            "a complete NIfTI/MHA/NRRD file."
        ) from e
    size = reader.GetSize()
    if len(size) != 3:
        raise InvalidImageError(f"{path}: {len(size)}-D image; a volume must be 3-D (z, y, x)")
    if reader.GetNumberOfComponents() != 1:
        raise InvalidImageError(
            f"{path}: {reader.GetNumberOfComponents()} components per voxel; "
            "split the channels into separate volumes"
        )
    dtype = sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).dtype.str
    ref = to_volume_ref(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    return (size[2], size[1], size[0]), dtype, ref


def series_files(folder: Path) -> list[str]:
    """The sorted files of the single DICOM series in ``folder``."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise ReadError(
            f"{folder}: no DICOM series found in this folder; point input.path at a "
            "folder of .dcm files of one series, or at a volume file"
        )
    if len(ids) > 1:
        raise InvalidImageError(
            f"{folder}: holds {len(ids)} DICOM series {list(ids)}; move each series to its own folder"
        )
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def _series_info(folder: Path) -> tuple[tuple[int, int, int], str, VolumeRef]:
    files = series_files(folder)
    head = _read_series(folder, files[:2])
    arr = sitk.GetArrayViewFromImage(head)
    ref = to_volume_ref(head.GetSpacing(), head.GetOrigin(), head.GetDirection())
    return (len(files), arr.shape[1], arr.shape[2]), arr.dtype.str, ref


def _read_series(folder: Path, files: list[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise ReadError(f"{folder}: reading the DICOM series failed ({_first_line(e)})") from e


def read_volume_box(path: Path, box: Box) -> np.ndarray:
    """Read the (z, y, x) ``box``: ``(1, d, h, w)``. Compressed files are decoded whole."""
    if path.is_dir():
        files = series_files(path)[box.start[0] : box.stop[0]]
        arr = sitk.GetArrayFromImage(_read_series(path, files))
        return arr[None, :, box.start[1] : box.stop[1], box.start[2] : box.stop[2]]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetExtractIndex([box.start[2], box.start[1], box.start[0]])
    reader.SetExtractSize([box.shape[2], box.shape[1], box.shape[0]])
    try:
        return sitk.GetArrayFromImage(reader.Execute())[None]
    except RuntimeError as e:
        raise ReadError(
            f"{path}: reading voxels {box.start}..{box.stop} failed "
            f"({_first_line(e)}); the file is probably truncated. Re-export it."
        ) from e


def is_streamable(path: Path) -> bool:
    """Whether region reads avoid decoding the whole file."""
    return path.is_dir() or path.name.lower().endswith(STREAMABLE_SUFFIXES)


def write_volume(path: Path, labels: np.ndarray, ref: VolumeRef) -> Path:
    """Write ``labels`` (z, y, x) with geometry ``ref``; verify it; move it into place.

    The label volume is gathered into this process (1 byte per voxel for uint8 labels);
    OME-Zarr is the output that never gathers.
    """
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise WriteError(f"{path}: unknown volume format; use one of {WRITE_SUFFIXES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        sitk.WriteImage(apply_volume_ref(sitk.GetImageFromArray(labels), ref), str(tmp), True)
        _, _, written = volume_info(tmp)
        check_same_geometry(ref, written, what=str(path))
        os.replace(tmp, path)
    except RuntimeError as e:
        raise WriteError(f"{path}: writing failed ({_first_line(e)}); check free disk space") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _first_line(err: Exception) -> str:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    return lines[-1] if lines else type(err).__name__


def read_volume(path: Path) -> tuple[np.ndarray, VolumeRef]:
    """Read a whole volume file or series (z, y, x) with its geometry (for small references)."""
    shape, _, ref = volume_info(path)
    return read_volume_box(path, Box.from_shape(shape))[0], ref


def resample_to_grid(path: Path, shape_zyx: tuple[int, int, int], ref: VolumeRef) -> np.ndarray:
    """Resample the label volume at ``path`` onto another grid through physical space.

    Nearest neighbour, so labels stay labels; voxels outside the source are 0. This aligns
    volumes by their geometry (direction, origin, spacing), never by array order.
    """
    moving = sitk.ReadImage(str(path)) if not path.is_dir() else _read_series(path, series_files(path))
    grid = apply_volume_ref(sitk.Image([shape_zyx[2], shape_zyx[1], shape_zyx[0]], moving.GetPixelID()), ref)
    out = sitk.Resample(moving, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    return sitk.GetArrayFromImage(out)
