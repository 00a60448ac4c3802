"""The tasks that run on workers: ingest a chunk, reduce a chunk, segment a chunk.

Arguments are paths, boxes and small parameter objects: never file handles or arrays of the
whole image. Every task touches one chunk's read box and writes one aligned write box.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import valid_mask
from pipeline.data.geometry import Geometry
from pipeline.errors import PipelineError
from pipeline.io import zarr_store
from pipeline.io.sources import ImageSource
from pipeline.metrics import tile_row
from pipeline.metrics.tiles import reference_row, seam_band
from pipeline.models import Segmenter
from pipeline.models.base import PartialFn
from pipeline.stitching import crop_to_core
from pipeline.tiling import Box, ChunkSpec


def worker_name() -> str:
    """``host:pid`` of the process running the task."""
    return f"{socket.gethostname()}:{os.getpid()}"


def ingest_group(source: ImageSource, target: Path, specs: list[ChunkSpec], records: Path) -> int:
    """Copy the write boxes of ``specs`` into the staging input, reading their union once.

    A group is one chunk for region-readable sources, a z-slab of chunks for DICOM series (a
    slice is read whole) and every chunk for compressed volumes (decoded whole).
    """
    start = tuple(min(s.write.start[a] for s in specs) for a in range(specs[0].write.ndim))
    stop = tuple(max(s.write.stop[a] for s in specs) for a in range(specs[0].write.ndim))
    union = Box(start, stop)
    data = source.read(union)
    log = zarr_store.CompletionLog(records, "ingest")
    for spec in specs:
        part = data[(slice(None), *spec.write.relative_to(union).slices())]
        zarr_store.write_box(target, spec.write, part)
        log.mark(spec.chunk_id, {"chunk_id": spec.chunk_id})
    return len(specs)


def read_block(staged: Path, spec: ChunkSpec, edge_mode: str) -> np.ndarray:
    """The chunk's read box from the staging input, padded at image edges per ``edge_mode``."""
    return spec.pad_block(zarr_store.read_box(staged, spec.read, channels=True), edge_mode)


def setup_torch_worker() -> None:
    """Once per worker process: torch's device (the worker's ``GPU`` resource) and CPU threads."""
    from pipeline.models.torch import runtime

    if runtime.configured():
        return
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:  # not on a worker (whole-image runs in the client)
        return
    gpu = worker.state.total_resources.get("GPU", 0) > 0
    runtime.configure(gpu=gpu, threads=worker.state.nthreads)


def segment_block(
    staged: Path,
    spec: ChunkSpec,
    edge_mode: str,
    nodata: float | None,
    segmenter: Segmenter,
    extras: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``segmenter`` on the chunk's read block: ``(output over the block, valid mask)``.

    When ``extras`` is a dict, the segmenter's extra outputs over the block are put into it.
    """
    if getattr(segmenter, "uses_torch", False):
        setup_torch_worker()
    block = read_block(staged, spec, edge_mode)
    valid = valid_mask(block, nodata)
    ctx = spec.context(padded=edge_mode != "clip")
    if extras is not None and segmenter.extra_outputs:
        out, more = segmenter.run_extra(block, valid, ctx)
        extras.update(more)
    else:
        out = segmenter.run(block, valid, ctx)
    if out.shape != block.shape[1:]:
        raise PipelineError(
            f"chunk {spec.chunk_id}: segmenter {segmenter.name!r} returned shape "
            f"{out.shape} for a block of spatial shape {block.shape[1:]}"
        )
    return out, valid


def reduce_chunks(
    staged: Path,
    specs: list[ChunkSpec],
    edge_mode: str,
    nodata: float | None,
    partial: PartialFn,
    combine: Any,
) -> Any:
    """A batch of chunks' contribution to a global statistic (a segmenter's fit pass).

    Partials are folded as they are made, so a task holds one partial at a time.
    """
    acc = None
    for i, spec in enumerate(specs):
        block = read_block(staged, spec, edge_mode)
        part = partial(block, valid_mask(block, nodata), spec.core(padded=edge_mode != "clip"))
        acc = part if i == 0 else combine(acc, part)
    return acc


def combine_many(combine: Any, *parts: Any) -> Any:
    """Fold partial results with ``combine``."""
    acc = parts[0]
    for part in parts[1:]:
        acc = combine(acc, part)
    return acc


@dataclass(frozen=True)
class Reference:
    """Reference labels scored per tile (paths and small values only: it goes into the graph)."""

    source: ImageSource
    band: int
    ignore: int | None
    seam_band: int
    shape: tuple[int, ...]

    def seams(self, spec: ChunkSpec) -> tuple[tuple[bool, bool], ...]:
        """Per axis, whether the write box shares its (start, stop) edge with a neighbour."""
        return tuple(
            (a > 0, b < s) for a, b, s in zip(spec.write.start, spec.write.stop, self.shape, strict=True)
        )


def segment_chunk(
    staged: Path,
    labels_path: Path,
    spec: ChunkSpec,
    edge_mode: str,
    nodata: float | None,
    segmenter: Segmenter,
    geometry: Geometry,
    records: Path,
    reference: Reference | None = None,
) -> dict[str, Any]:
    """Segment one chunk, write its write box, record completion; return its metrics row."""
    t0 = time.perf_counter()
    extras: dict[str, np.ndarray] = {}
    labels, _ = segment_block(staged, spec, edge_mode, nodata, segmenter, extras)
    core = crop_to_core(labels, spec, padded=edge_mode != "clip")
    for name, values in extras.items():  # written before the labels: the chunk is marked done last
        index: tuple[Any, ...] = (Ellipsis, *spec.core(padded=edge_mode != "clip"))
        cropped = values[index]

        zarr_store.write_box(extras_path(labels_path, name), spec.write, cropped)

    zarr_store.write_box(labels_path, spec.write, core)
    row = tile_row(
        spec.chunk_id,
        spec.write.start,
        spec.write.stop,
        core,
        segmenter.classes,
        geometry,
        nodata_label=segmenter.nodata_label,
    )
    if reference is not None:
        ref = reference.source.read(spec.write)[reference.band - 1]
        band = seam_band(spec.write.shape, reference.seams(spec), reference.seam_band)
        row.update(
            reference_row(
                core,
                ref,
                segmenter.classes,
                ignore=reference.ignore,
                nodata_label=segmenter.nodata_label,
                band=band,
            )
        )
    row.update(seconds=time.perf_counter() - t0, worker=worker_name(), status="done")
    zarr_store.CompletionLog(records, "segment").mark(spec.chunk_id, row)
    return row


def extras_path(labels_path: Path, name: str) -> Path:
    """Staging array of a segmenter's extra output (next to the labels)."""
    return labels_path.with_name(f"extra-{name}")


def window_check(
    staged: Path,
    labels_path: Path,
    spec: ChunkSpec,
    edge_mode: str,
    nodata: float | None,
    segmenter: Segmenter,
) -> dict[str, Any]:
    """Segment a window straddling seams on its own and count pixels that differ from the stitched map."""
    labels, _ = segment_block(staged, spec, edge_mode, nodata, segmenter)
    own = crop_to_core(labels, spec, padded=edge_mode != "clip")
    stitched = zarr_store.read_box(labels_path, spec.write)
    return {
        "start": list(spec.write.start),
        "stop": list(spec.write.stop),
        "pixels": int(own.size),
        "differing": int(np.count_nonzero(own != stitched)),
    }
