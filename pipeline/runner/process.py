"""The tasks that run on workers: ingest, reduce and segment a batch of chunks.

Arguments are paths, the grid, grid indices and small parameter objects: never file handles or
arrays of the whole image. A task builds its chunks' specs from the grid and its indices, and
handles them one at a time: each chunk's read box is read, and one aligned write box written.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.data import valid_mask
from pipeline.data.geometry import Geometry
from pipeline.errors import PipelineError
from pipeline.io import zarr_store
from pipeline.io.sources import ImageSource
from pipeline.metrics import tile_row
from pipeline.metrics.tiles import reference_row, seam_band
from pipeline.models import Segmenter
from pipeline.models.base import PartialFn
from pipeline.runner import memory
from pipeline.stitching import crop_to_core
from pipeline.tiling import Box, ChunkGrid, ChunkSpec


def worker_name() -> str:
    """``host:pid`` of the process running the task."""
    return f"{socket.gethostname()}:{os.getpid()}"


def ingest_group(
    source: ImageSource, target: Path, grid: ChunkGrid, indices: np.ndarray, records: Path
) -> int:
    """Copy the write boxes of the chunks at grid ``indices`` into the staging input, reading
    their union once; record them all in one completion file.

    A group is a block of neighbouring chunks for region-readable sources, a z-slab of chunks
    for DICOM series (a slice is read whole) and every chunk for compressed volumes (decoded
    whole).
    """
    specs = grid.specs(indices)
    union = _union([s.write for s in specs])
    data = source.read(union)
    out = zarr_store.open_array(target, write=True)
    if sum(s.write.size for s in specs) == union.size:  # a full block: one write of whole chunks
        zarr_store.write_box(out, union, data)
    else:
        for spec in specs:
            zarr_store.write_box(
                out, spec.write, data[(slice(None), *spec.write.relative_to(union).slices())]
            )
    zarr_store.CompletionLog(records, "ingest").mark_many([{"chunk_id": s.chunk_id} for s in specs])
    return len(specs)


#: Largest union (pixels) of a batch's boxes read or written in one zarr call; above it (large
#: chunks) every chunk is read and written on its own, so a task's memory stays one chunk's.
UNION_PIXELS = 2**22


def _union(boxes: list[Box]) -> Box:
    start = tuple(min(b.start[a] for b in boxes) for a in range(boxes[0].ndim))
    stop = tuple(max(b.stop[a] for b in boxes) for a in range(boxes[0].ndim))
    return Box(start, stop)


class BlockReader:
    """The read blocks of a batch of neighbouring chunks from the staging input.

    A zarr call costs about a millisecond whatever it reads, as much as a 32 x 32 chunk's
    segmentation: when the union of the read boxes is small (``UNION_PIXELS``) it is read in one
    call and each chunk's block is cut from it; otherwise each chunk is read on its own.
    """

    def __init__(self, staged: Path | zarr.Array, specs: list[ChunkSpec], edge_mode: str) -> None:
        self.arr = zarr_store.open_array(staged) if isinstance(staged, Path | str) else staged
        self.edge_mode = edge_mode
        self.box = _union([s.read for s in specs]) if len(specs) > 1 else None
        self.data: np.ndarray | None = None
        if self.box is not None and self.box.size <= UNION_PIXELS:
            self.data = zarr_store.read_box(self.arr, self.box, channels=True)

    def block(self, spec: ChunkSpec) -> np.ndarray:
        """The chunk's read block, padded at image edges per the edge mode."""
        if self.data is None or self.box is None:
            return read_block(self.arr, spec, self.edge_mode)
        part = self.data[(slice(None), *spec.read.relative_to(self.box).slices())]
        return spec.pad_block(part, self.edge_mode)


class BlockWriter:
    """Write boxes of a batch of chunks into one staging array: gathered in memory and written in
    one call when they tile their union exactly and it is small (``UNION_PIXELS``), else written
    chunk by chunk. :meth:`flush` writes what was gathered (chunks not put keep the fill value)."""

    def __init__(self, path: Path, specs: list[ChunkSpec]) -> None:
        self.arr = zarr_store.open_array(path, write=True)
        self.box = _union([s.write for s in specs])
        whole = len(specs) > 1 and sum(s.write.size for s in specs) == self.box.size
        self.gather = whole and self.box.size <= UNION_PIXELS
        self.buf: np.ndarray | None = None

    def put(self, spec: ChunkSpec, data: np.ndarray) -> None:
        """The chunk's write box (trailing axes; leading ones as the array's)."""
        if not self.gather:
            zarr_store.write_box(self.arr, spec.write, data)
            return
        if self.buf is None:
            lead = self.arr.shape[: self.arr.ndim - self.box.ndim]
            self.buf = np.full((*lead, *self.box.shape), self.arr.fill_value, dtype=self.arr.dtype)
        index: tuple[Any, ...] = (Ellipsis, *spec.write.relative_to(self.box).slices())
        self.buf[index] = data

    def flush(self) -> None:
        """Write the gathered union (no-op when writing chunk by chunk)."""
        if self.buf is not None:
            zarr_store.write_box(self.arr, self.box, self.buf)
            self.buf = None


def read_block(staged: Path | zarr.Array, spec: ChunkSpec, edge_mode: str) -> np.ndarray:
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
    staged: Path | zarr.Array,
    spec: ChunkSpec,
    edge_mode: str,
    nodata: float | None,
    segmenter: Segmenter,
    extras: dict[str, np.ndarray] | None = None,
    block: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``segmenter`` on the chunk's read block: ``(output over the block, valid mask)``.

    When ``extras`` is a dict, the segmenter's extra outputs over the block are put into it.
    ``block``: the read block when the caller has it (a :class:`BlockReader`), else it is read.
    """
    uses_torch = getattr(segmenter, "uses_torch", False)
    memory.reuse_arrays(not uses_torch)  # classical: reuse freed temporaries; torch: hand back
    if uses_torch:
        setup_torch_worker()
    if block is None:
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
    grid: ChunkGrid,
    indices: np.ndarray,
    edge_mode: str,
    nodata: float | None,
    partial: PartialFn,
    combine: Any,
) -> Any:
    """A batch of chunks' contribution to a global statistic (a segmenter's fit pass).

    Partials are folded as they are made, so a task holds one partial at a time.
    """
    acc = None
    specs = grid.specs(indices)
    reader = BlockReader(staged, specs, edge_mode)
    for i, spec in enumerate(specs):
        block = reader.block(spec)
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


def segment_chunks(
    staged: Path,
    labels_path: Path,
    grid: ChunkGrid,
    indices: np.ndarray,
    segmenter: Segmenter,
    nodata: float | None,
    geometry: Geometry,
    records: Path,
    reference: Reference | None = None,
    *,
    catch: bool = False,
) -> list[int]:
    """Segment the chunks at grid ``indices``, write their write boxes, record them; return the
    positions (in ``indices``) of the chunks that raised.

    The staging arrays are opened once for the batch, and the metrics rows of every chunk go
    into one completion file after the last one is written. With ``catch`` a chunk that raises
    is left out (its position returned) and the others go on: the client re-runs it in a task of
    its own, where it raises and is retried, then quarantined, as any single chunk. Without
    ``catch`` the first error propagates.
    """
    specs = grid.specs(indices)
    reader = BlockReader(staged, specs, grid.edge_mode)
    writers = {"": BlockWriter(labels_path, specs)}
    rows: list[dict[str, Any]] = []
    failed: list[int] = []
    for pos, spec in enumerate(specs):
        try:
            rows.append(
                _segment_one(reader, writers, labels_path, spec, segmenter, nodata, geometry, reference)
            )
        except Exception:
            if not catch:
                raise
            failed.append(pos)
    for name in sorted(writers, reverse=True):  # the labels ("") last
        writers[name].flush()
    zarr_store.CompletionLog(records, "segment").mark_many(rows)
    return failed


def _segment_one(
    reader: BlockReader,
    writers: dict[str, BlockWriter],
    labels_path: Path,
    spec: ChunkSpec,
    segmenter: Segmenter,
    nodata: float | None,
    geometry: Geometry,
    reference: Reference | None,
) -> dict[str, Any]:
    """Segment one chunk and put its write box (labels under ``""``, extra outputs by name) to
    ``writers``; return its metrics row."""
    t0 = time.perf_counter()
    edge_mode = reader.edge_mode
    extras: dict[str, np.ndarray] = {}
    out, _ = segment_block(reader.arr, spec, edge_mode, nodata, segmenter, extras, reader.block(spec))
    core = crop_to_core(out, spec, padded=edge_mode != "clip")
    for name, values in extras.items():  # written before the labels: the chunk is marked done last
        index: tuple[Any, ...] = (Ellipsis, *spec.core(padded=edge_mode != "clip"))
        if name not in writers:
            writers[name] = BlockWriter(extras_path(labels_path, name), [spec])
        writers[name].put(spec, values[index])
    writers[""].put(spec, core)
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
