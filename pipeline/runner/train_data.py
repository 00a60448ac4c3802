"""Stage a training job's image/label pairs into zarr, chunk by chunk, through segpipe's readers.

Per pair: ``WORK/staging.zarr/<i>/image`` (selected bands, float32, ``(C, *spatial)``) and
``.../labels`` (class ids, uint8, :data:`~pipeline.train.labels.IGNORE` where unlabelled or where
the image is no-data). Labels must lie on the image grid (rasters: same size, CRS and transform;
volumes: same geometry, or ``resample_labels``); polygons are burnt onto it. A ``staged.json``
marker, written last, lets a rerun (a resumed training) skip staging.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.geometry import Geometry, GeoRef, VolumeRef, check_same_geometry
from pipeline.errors import ConfigError, GeometryMismatchError, InvalidImageError
from pipeline.io import geo, medical, rasterize, zarr_store
from pipeline.io.sources import ImageSource, open_source
from pipeline.runner.train_spec import PairSpec, TrainJob
from pipeline.tiling import Box
from pipeline.train.labels import IGNORE, ValueMap, instances_to_classes
from pipeline.train.patches import chunk_boxes

#: zarr chunk edge of the staged arrays (2-D, 3-D).
STAGE_CHUNK = {2: 256, 3: 64}


@dataclass(frozen=True)
class StagedPair:
    """Where one pair was staged, with its geometry and the bands fed to the model."""

    image: Path
    labels: Path
    shape: tuple[int, ...]
    geometry: Geometry
    bands: list[int | str]


def stage_pairs(job: TrainJob, work: Path, fingerprint: str) -> list[StagedPair]:
    """Stage every pair (skipped when already staged for this ``fingerprint``)."""
    return [
        _stage_pair(job, i, pair, work / "staging.zarr" / str(i), fingerprint)
        for i, pair in enumerate(job.data)
    ]


def _stage_pair(job: TrainJob, i: int, pair: PairSpec, folder: Path, fingerprint: str) -> StagedPair:
    src = open_source(pair.image, allow_missing_crs=pair.allow_missing_crs)
    channels, bands = select_bands(src, pair.bands, where=f"data[{i}].bands")
    spatial = src.spatial_shape
    if len(spatial) != len(job.patch_size):
        raise ConfigError(
            f"data[{i}].image {src.path}: {len(spatial)}-D image but patch_size {job.patch_size} has "
            f"{len(job.patch_size)} axes; give one patch edge per spatial axis"
        )
    staged = StagedPair(folder / "image", folder / "labels", spatial, src.geometry, bands)
    marker = folder / "staged.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return staged
    labels = _label_reader(job, pair, src)
    chunk = (STAGE_CHUNK[len(spatial)],) * len(spatial)
    folder.mkdir(parents=True, exist_ok=True)
    zarr_store.create_array(
        staged.image,
        shape=(len(channels), *spatial),
        chunks=(len(channels), *chunk),
        dtype="float32",
        geometry=src.geometry,
    )
    zarr_store.create_array(
        staged.labels, shape=spatial, chunks=chunk, dtype="uint8", geometry=src.geometry, fill_value=IGNORE
    )
    read = _reader(src)
    for box in chunk_boxes(spatial, chunk, Box.from_shape(spatial)):
        image = read(box)[channels]
        classes = labels(box)
        classes[_nodata(image, src)] = IGNORE
        zarr_store.write_box(staged.image, box, image.astype(np.float32))
        zarr_store.write_box(staged.labels, box, classes)
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint}))
    os.replace(tmp, marker)
    return staged


def select_bands(
    src: ImageSource, bands: list[int | str] | None, *, where: str
) -> tuple[list[int], list[int | str]]:
    """0-based channel indices and the bands as the card names them (1-based indices or names)."""
    count = src.shape[0]
    names = list(src.geometry.band_names) if isinstance(src.geometry, GeoRef) else []
    if bands is None:
        return list(range(count)), list(range(1, count + 1))
    out = []
    for b in bands:
        if isinstance(b, int) and 1 <= b <= count:
            out.append(b - 1)
        elif isinstance(b, str) and b in names:
            out.append(names.index(b))
        else:
            raise ConfigError(
                f"{where}: band {b!r} is not in {src.path} ({count} bands, 1-based"
                f"{', names ' + ', '.join(names) if names else ''}); list existing bands"
            )
    return out, list(bands)


def _reader(src: ImageSource) -> Callable[[Box], np.ndarray]:
    """``src.read``, or one whole read sliced, for files that cannot be read by region."""
    if src.read_unit != "whole":
        return src.read
    whole = src.read(Box.from_shape(src.spatial_shape))
    return lambda box: whole[(slice(None), *box.slices())]


def _nodata(image: np.ndarray, src: ImageSource) -> np.ndarray:
    """Pixels that are no-data (or NaN) in every selected band."""
    bad = np.isnan(image) if image.dtype.kind == "f" else np.zeros(image.shape, bool)
    nodata = src.geometry.nodata if isinstance(src.geometry, GeoRef) else None
    if nodata is not None and not np.isnan(nodata):
        bad |= image == nodata
    return np.asarray(bad.all(axis=0), dtype=bool)


def _label_reader(job: TrainJob, pair: PairSpec, src: ImageSource) -> Callable[[Box], np.ndarray]:
    """A function giving the class ids (uint8) of a box of the image grid."""
    path = Path(pair.labels)
    spec = job.labels
    to_class = ValueMap(spec.map, tuple(spec.ignore), spec.default, tuple(job.classes))
    values = _label_values(pair, src, path)
    if spec.source == "instances":
        whole = Box.from_shape(src.spatial_shape)

        def classes(box: Box) -> np.ndarray:
            grown = box.grow((1,) * box.ndim).intersect(whole)
            out = instances_to_classes(values(grown), interior=spec.interior, boundary=spec.boundary)
            return out[box.relative_to(grown).slices()]

        return classes
    return lambda box: to_class.apply(values(box), source=str(path))


def _label_values(pair: PairSpec, src: ImageSource, path: Path) -> Callable[[Box], np.ndarray]:
    if rasterize.is_vector_path(path):
        if not isinstance(src.geometry, GeoRef):
            raise ConfigError(f"{path}: polygon labels need a raster image, {src.path} is a volume")
        georef = src.geometry
        shapes = rasterize.load_shapes(path, georef, class_field=pair.class_field, burn=pair.burn)
        return lambda box: rasterize.burn_box(shapes, georef, box)
    lab = open_source(path, allow_missing_crs=pair.allow_missing_crs)
    if lab.shape[0] != 1:
        raise InvalidImageError(f"{path}: labels must have one band, it has {lab.shape[0]}; split it first")
    if lab.spatial_shape == src.spatial_shape and _same_grid(src, lab):
        read = _reader(lab)
        return lambda box: read(box)[0]
    if isinstance(src.geometry, VolumeRef) and pair.resample_labels:
        grid = medical.resample_to_grid(path, src.spatial_shape, src.geometry)  # type: ignore[arg-type]
        return lambda box: grid[box.slices()]
    fix = (
        "set resample_labels: true in this data entry to resample them by physical position"
        if isinstance(src.geometry, VolumeRef)
        else "warp or rasterise the labels onto the image grid (gdalwarp with its extent and resolution)"
    )
    raise GeometryMismatchError(
        f"{path}: the labels are not on the grid of the image {src.path} (shape {lab.spatial_shape} vs "
        f"{src.spatial_shape}, or another CRS/transform/spacing/origin/direction); {fix}"
    )


def _same_grid(src: ImageSource, lab: ImageSource) -> bool:
    try:
        check_same_geometry(src.geometry, lab.geometry, what=str(lab.path), same_crs=geo.same_crs, rtol=1e-6)
    except GeometryMismatchError:
        return False
    return True
