"""``segpipe inspect INPUT``: an input's size and geometry, the chunk grid a job would use, and
estimates of worker memory and wall time from the benchmark figures below. Reads headers only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from dask.utils import format_bytes, parse_bytes

import pipeline.models.classical  # noqa: F401  (registers the classical segmenters)
from pipeline.data.geometry import GeoRef
from pipeline.errors import ConfigError, ReadError, UnknownNameError
from pipeline.io.geo import crs_label
from pipeline.io.sources import ImageSource, open_source
from pipeline.models import ImageInfo, Segmenter, create_segmenter
from pipeline.tiling import ChunkGrid

# Benchmark figures, measured on the 2-core development machine with 2 workers x 1 thread and a
# 2 GiB memory limit each; job wall time from plan to summary.json, cluster start-up excluded.
#
# benchmarks/bench_otsu.py (benchmarks/results/bench_otsu-20261122-021043.json): the `otsu` job,
# 1-band int16 raster, chunk 512, formats zarr + cog: 10.1 Mpx/s at 1 GiB and 11.7 Mpx/s at
# 4 GiB for the 2 workers, i.e. 5.0-5.9 Mpx/s per worker; worker peak RSS 340-373 MiB, flat in
# the input size (the chunk's own data is under 1 MiB there).
OTSU_MPX_S = (5.0, 5.9)
WORKER_BASE_MIB = (340.0, 373.0)
#
# benchmarks/bench_classical.py (benchmarks/results/bench_classical-20261122-012646.json): every
# classical segmenter on a 4-band uint16 127 Mpx raster, chunk 2048, formats zarr, 2 workers
# under 50-80 % foreign CPU load: 0.68 (watershed) to 4.9 (li, yen) Mpx/s for the 2 workers,
# about 0.3-3 Mpx/s per worker. Worker peaks of 456-745 MiB over blocks of 4.2-5.3 Mpx (chunk plus
# halo) are, above the base, 34 (otsu) to 101 (kmeans_colour) bytes per block pixel, of which 8
# are the input's own 4 x 2 bytes: the segmenter's working arrays take 26-93 bytes per pixel.
CLASSICAL_MPX_S = (0.3, 3.0)
WORK_BYTES_PER_PX = (26.0, 93.0)

#: Chunk edge used when none is given: the job file's default.
DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class Cluster:
    """The cluster a job would run on: worker count and memory limit per worker."""

    workers: int = 2
    memory: str = "2GiB"


def inspect_input(
    path: str | Path,
    *,
    chunk: list[int] | None = None,
    segmenter: str | None = None,
    params: dict[str, Any] | None = None,
    cluster: Cluster | None = None,
) -> dict[str, Any]:
    """Everything ``segpipe inspect`` prints, as a JSON-ready dict."""
    cluster = cluster or Cluster()
    source = _open(path)
    seg = _segmenter(source, segmenter, params or {})
    grid = _grid(source, chunk, seg)
    return {
        "path": str(source.path),
        "format": source.format,
        "shape": list(source.shape),
        "dtype": _dtype_name(source.dtype),
        "bands": source.shape[0],
        "pixels": math.prod(source.spatial_shape),
        "bytes": _bytes(source),
        "read_unit": source.read_unit,
        "geometry": _geometry(source),
        "segmenter": None if seg is None else {"name": seg.name, "kind": seg.kind, "halo": seg.halo},
        "grid": _grid_json(grid),
        "estimate": _estimate(source, grid, seg, cluster),
    }


def _open(path: str | Path) -> ImageSource:
    if not Path(path).exists():
        raise ReadError(
            f"{path}: no such file or folder. Give the path of a GeoTIFF/COG, a NIfTI, MHA or "
            "NRRD volume, a DICOM series folder or a segpipe zarr array."
        )
    return open_source(path, allow_missing_crs=True)


def _segmenter(source: ImageSource, name: str | None, params: dict[str, Any]) -> Segmenter | None:
    if name is None:
        return None
    kind: Literal["raster", "volume"] = "raster" if isinstance(source.geometry, GeoRef) else "volume"
    info = ImageInfo(
        kind,
        source.shape[0],
        source.dtype,
        tuple(getattr(source.geometry, "band_names", ())),
        source.spatial_shape,
        source.geometry,
    )
    try:
        return create_segmenter(name, params, info)
    except UnknownNameError:
        raise
    except ConfigError as e:
        raise ConfigError(f"{e} Give parameters with --param KEY=VALUE (repeatable).") from None


def _grid(source: ImageSource, chunk: list[int] | None, seg: Segmenter | None) -> ChunkGrid:
    ndim = len(source.spatial_shape)
    sizes = chunk or [DEFAULT_CHUNK]
    if len(sizes) not in (1, ndim):
        raise ConfigError(
            f"--chunk {' '.join(map(str, sizes))}: give one size for every axis or {ndim} sizes, "
            f"one per spatial axis of {source.path} (shape {source.spatial_shape})"
        )
    chunks = sizes * ndim if len(sizes) == 1 else sizes
    return ChunkGrid.build(source.spatial_shape, chunks, 0 if seg is None else seg.halo)


def _grid_json(grid: ChunkGrid) -> dict[str, Any]:
    return {
        "chunk": list(grid.chunk),
        "halo": list(grid.halo),
        "chunks_per_axis": list(grid.counts),
        "n_chunks": len(grid),
        "read_block": [min(c + 2 * h, s) for c, h, s in zip(grid.chunk, grid.halo, grid.shape, strict=True)],
    }


def _bytes(source: ImageSource) -> int:
    return math.prod(source.shape) * _itemsize(source.dtype)


def _itemsize(dtype: str) -> int:
    return int(np.dtype(dtype).itemsize)


def _dtype_name(dtype: str) -> str:
    return str(np.dtype(dtype).name)


def _geometry(source: ImageSource) -> dict[str, Any]:
    geometry = source.geometry.to_json()
    if isinstance(source.geometry, GeoRef):
        geometry["crs"] = crs_label(source.geometry.crs_wkt)
        a, _, _, _, e, _ = source.geometry.transform
        geometry["pixel_size"] = [abs(a), abs(e)]
    return geometry


def _estimate(
    source: ImageSource, grid: ChunkGrid, seg: Segmenter | None, cluster: Cluster
) -> dict[str, Any]:
    """Worker memory and wall time from the benchmark figures at the top of this module."""
    limit = _memory_limit(cluster.memory)
    block_px = math.prod(min(c + 2 * h, s) for c, h, s in zip(grid.chunk, grid.halo, grid.shape, strict=True))
    in_px = source.shape[0] * _itemsize(source.dtype)
    low = WORKER_BASE_MIB[0] + block_px * (in_px + WORK_BYTES_PER_PX[0]) / 2**20
    high = WORKER_BASE_MIB[1] + block_px * (in_px + WORK_BYTES_PER_PX[1]) / 2**20
    if source.read_unit != "region":  # one ingest task decodes the whole file (or slab) at once
        share = 1.0 if source.read_unit == "whole" else grid.chunk[0] / grid.shape[0]
        high = max(high, WORKER_BASE_MIB[1] + _bytes(source) * share / 2**20)
    rates, basis = _rates(seg)
    pixels = math.prod(source.spatial_shape)
    wall = None if rates is None else [pixels / 1e6 / (cluster.workers * r) for r in reversed(rates)]
    return {
        "workers": cluster.workers,
        "memory_per_worker": format_bytes(limit),
        "worker_memory_mib": [round(low), round(high)],
        "fits": high * 2**20 <= limit,
        "largest_chunk": _largest_chunk(grid, in_px, limit),
        "wall_s": None if wall is None else [float(f"{w:.2g}") for w in wall],
        "mpx_s_per_worker": None if rates is None else list(rates),
        "basis": basis,
    }


def _memory_limit(text: str) -> int:
    try:
        return int(parse_bytes(text))
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"--memory-per-worker {text!r} is not a size; write it as 2GiB, 1500MB or 4e9"
        ) from e


def _rates(seg: Segmenter | None) -> tuple[tuple[float, float] | None, str]:
    if seg is not None and getattr(seg, "uses_torch", False):
        return None, f"no benchmark of {seg.name!r} yet: wall time not estimated"
    if seg is not None and seg.name == "otsu":
        return OTSU_MPX_S, "benchmarks/bench_otsu.py: otsu job, 5.0-5.9 Mpx/s per worker"
    return CLASSICAL_MPX_S, "benchmarks/bench_classical.py: classical segmenters, 0.3-3 Mpx/s per worker"


def _largest_chunk(grid: ChunkGrid, in_px: int, limit: int) -> int | None:
    """The largest chunk edge (same on every axis) whose block fits ``limit`` at the high estimate."""
    room = (limit / 2**20 - WORKER_BASE_MIB[1]) * 2**20 / (in_px + WORK_BYTES_PER_PX[1])
    if room <= 0:
        return None
    side = int(room ** (1 / len(grid.shape))) - 2 * max(grid.halo)
    return side if side > 0 else None


def format_report(report: dict[str, Any]) -> str:
    """The human-readable text of :func:`inspect_input`'s dict."""
    g, e, geo = report["grid"], report["estimate"], report["geometry"]
    lines = [
        f"{report['path']} ({report['format']}, read by {report['read_unit']})",
        f"  size      {' x '.join(map(str, report['shape'][1:]))} px, {report['bands']} band(s) "
        f"{report['dtype']}, {format_bytes(report['bytes'])}",
    ]
    if geo["kind"] == "raster":
        names = ", ".join(geo["band_names"])
        lines += [
            f"  bands     {names}",
            f"  crs       {geo['crs']}; pixel {geo['pixel_size'][0]:g} x {geo['pixel_size'][1]:g}; "
            f"nodata {geo['nodata']}",
            f"  transform {geo['transform']}",
        ]
    else:
        lines += [
            f"  spacing   {geo['spacing_zyx']} (z, y, x)",
            f"  origin    {geo['origin_zyx']}",
            f"  direction {geo['direction_zyx']}",
        ]
    seg = report["segmenter"]
    lines += [
        f"  segmenter {seg['name']} ({seg['kind']}), halo {seg['halo']}"
        if seg
        else "  segmenter none given (halo 0)",
        f"  grid      {g['n_chunks']} chunk(s) ({' x '.join(map(str, g['chunks_per_axis']))}) of "
        f"{g['chunk']}, halo {g['halo']}, read blocks up to {g['read_block']}",
        f"  memory    ~{e['worker_memory_mib'][0]}-{e['worker_memory_mib'][1]} MiB per worker of "
        f"{e['memory_per_worker']}: " + ("fits" if e["fits"] else _advice(e["largest_chunk"])),
    ]
    if e["wall_s"] is not None:
        lines.append(
            f"  time      ~{e['wall_s'][0]:g}-{e['wall_s'][1]:g} s on {e['workers']} worker(s) "
            "(large-job throughput; every job also takes a few seconds of fixed cost)"
        )
    lines.append(f"  basis     {e['basis']}")
    return "\n".join(lines)


def _advice(largest: int | None) -> str:
    if largest is None:
        return "may not fit even with small chunks; give the workers more memory"
    return f"may not fit; use --chunk {largest} or less, or more memory per worker"
