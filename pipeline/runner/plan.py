"""``make_plan(spec)``: resolve names, open headers, build the grid; nothing computed yet."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pipeline.models.classical  # registers the classical segmenters
import pipeline.models.torch.sam
import pipeline.models.torch.segmenter  # noqa: F401  (registers unet; torch is imported lazily)
from pipeline import __version__
from pipeline.data.geometry import check_same_geometry
from pipeline.errors import ConfigError, GeometryMismatchError, HaloTooSmallError
from pipeline.io import remote
from pipeline.io.geo import same_crs
from pipeline.io.sources import ImageSource, open_source
from pipeline.models import ImageInfo, Segmenter, create_segmenter
from pipeline.runner.spec import JobSpec, confine_output
from pipeline.tiling import ChunkGrid

FORMATS_BY_KIND = {
    "raster": {"zarr", "cog", "png", "gpkg", "geoparquet"},
    "volume": {"zarr", "nifti", "mha", "ome-zarr", "png"},
}


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, resolved and validated."""

    spec: JobSpec
    source: ImageSource
    segmenter: Segmenter
    grid: ChunkGrid
    out: Path
    fingerprint: str
    reference: ImageSource | None = None

    @property
    def kind(self) -> str:
        """``"raster"`` or ``"volume"``."""
        return "raster" if len(self.source.spatial_shape) == 2 else "volume"

    @property
    def publish(self) -> str | None:
        """The ``s3://`` folder the finished outputs are uploaded to (``out`` is then the local
        work folder of the staging store and records); ``None`` for a local output folder."""
        target = self.spec.output.dir
        return target if remote.is_url(target) else None

    @property
    def staging(self) -> Path:
        """The zarr staging store."""
        return self.out / "staging.zarr"

    @property
    def records(self) -> Path:
        """Folder of the job fingerprint and completion records."""
        return self.out / ".segpipe"


def make_plan(spec: JobSpec) -> Plan:
    """Validate ``spec`` against its input and segmenter and build the chunk grid."""
    confine_output(spec, os.environ.get("SEGPIPE_OUTPUT_ROOT"))
    source = open_source(spec.input.path, allow_missing_crs=spec.input.allow_missing_crs)
    kind: Literal["raster", "volume"] = "raster" if len(source.spatial_shape) == 2 else "volume"
    info = ImageInfo(
        kind,
        source.shape[0],
        source.dtype,
        tuple(getattr(source.geometry, "band_names", ())),
        source.spatial_shape,
        source.geometry,
    )

    segmenter = create_segmenter(spec.segmenter.name, spec.segmenter.params, info)
    _check_formats(spec, kind)
    halo = _halo(spec, segmenter)
    grid = ChunkGrid.build(source.spatial_shape, spec.tiling.chunk, halo, spec.tiling.edge_mode)
    out = Path(spec.output.work_dir or spec.output.dir or "")  # work_dir: with an s3:// output
    reference = _reference(spec, source, segmenter)
    identity = getattr(segmenter, "identity", None)
    return Plan(spec, source, segmenter, grid, out, fingerprint(spec, source, grid, identity), reference)


def _reference(spec: JobSpec, source: ImageSource, segmenter: Segmenter) -> ImageSource | None:
    """The reference labels, checked to lie on the input's grid."""
    if spec.reference is None:
        return None
    if segmenter.kind != "semantic":
        raise ConfigError(
            "reference: per-tile scores are for semantic jobs; score instance and panoptic "
            "outputs with `segpipe eval PRED REF --kind instance|panoptic`"
        )
    ref = open_source(spec.reference.path, allow_missing_crs=spec.input.allow_missing_crs)
    what = f"reference.path {ref.path}"
    check_same_geometry(source.geometry, ref.geometry, what=what, same_crs=same_crs)
    if ref.spatial_shape != source.spatial_shape or spec.reference.band > ref.shape[0]:
        raise GeometryMismatchError(
            f"{what}: shape {ref.shape} does not match the input's "
            f"{source.shape} (or band {spec.reference.band} is missing)"
        )
    return ref


def _check_formats(spec: JobSpec, kind: str) -> None:
    wrong = [f for f in spec.output.formats if f not in FORMATS_BY_KIND[kind]]
    if wrong:
        raise ConfigError(
            f"output.formats {wrong} do not apply to a {kind}; a {kind} can be "
            f"written as {sorted(FORMATS_BY_KIND[kind])}"
        )


def _halo(spec: JobSpec, segmenter: Segmenter) -> int | tuple[int, ...]:
    need = segmenter.halo  # an int, or one value per axis (e.g. a 3-D window)
    most = max(need) if isinstance(need, tuple) else need
    if spec.tiling.halo is None:
        return need
    if spec.tiling.halo < most:
        raise HaloTooSmallError(
            f"tiling.halo {spec.tiling.halo} is smaller than the {most} pixels segmenter "
            f"{segmenter.name!r} needs with these parameters; chunks would disagree at seams. Set "
            f"tiling.halo to at least {most} or remove it."
        )
    return spec.tiling.halo


def fingerprint(spec: JobSpec, source: ImageSource, grid: ChunkGrid, identity: Any = None) -> str:
    """Hash of input identity, segmenter (and its model's checksum), parameters and tile geometry."""
    record: dict[str, Any] = {
        "input": _identity(source.path),
        "segmenter": spec.segmenter.name,
        "params": spec.segmenter.params,
        "chunk": grid.chunk,
        "halo": grid.halo,
        "edge_mode": grid.edge_mode,
        "segpipe": __version__,
    }
    if identity is not None:
        record["model"] = identity
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _identity(path: Path | str) -> list[Any]:
    if isinstance(path, str):  # a URL: sizes and versions (ETag, date) from the server
        return remote.identity(path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [str(path)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
