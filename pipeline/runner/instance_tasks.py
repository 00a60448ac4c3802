"""Worker tasks of instance stitching: label a chunk, pair ids across its seams, relabel it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.geometry import Geometry
from pipeline.io import zarr_store
from pipeline.metrics.objects import object_partials
from pipeline.models import Segmenter
from pipeline.runner.process import segment_block, worker_name
from pipeline.stitching import crop_to_core
from pipeline.stitching.instance import Relabel, label_classes, overlap_pairs, seam_pairs
from pipeline.tiling import Box, ChunkGrid, ChunkSpec


def label_chunk(
    staged: Path,
    local: Path,
    spec: ChunkSpec,
    edge_mode: str,
    nodata: float | None,
    segmenter: Segmenter,
    geometry: Geometry,
    records: Path,
) -> dict[str, Any]:
    """Label one chunk's core with chunk-local ids 1..n; keep what seams and relabel need."""
    t0 = time.perf_counter()
    out, valid = segment_block(staged, spec, edge_mode, nodata, segmenter)
    padded = edge_mode != "clip"
    if segmenter.merge == "touch":
        core_classes = crop_to_core(out, spec, padded=padded)
        zarr_store.write_box(local.parent / "classes", spec.write, core_classes)
        ids, owners = label_classes(core_classes, segmenter.instance_classes, segmenter.connectivity)
        n = top = len(owners)
    elif segmenter.merge == "overlap":
        ids, n = _core_first(out, spec.core(padded=padded), records, spec.chunk_id)
        top = n
    else:
        ids = crop_to_core(out, spec, padded=padded)
        n, top = 0, int(ids.max(initial=0))
    zarr_store.write_box(local, spec.write, ids)

    row = {
        "chunk_id": spec.chunk_id,
        "start": list(spec.write.start),
        "stop": list(spec.write.stop),
        "bounds": list(geometry.bounds(spec.write.start, spec.write.stop)),
        "pixels": spec.write.size,
        "valid_pixels": int(crop_to_core(valid, spec, padded=padded).sum()),
        "local_ids": n,
        "max_id": top,
        "seconds": time.perf_counter() - t0,
        "worker": worker_name(),
        "status": "done",
    }
    zarr_store.CompletionLog(records, "label").mark(spec.chunk_id, row)
    return row


def _core_first(
    labels: np.ndarray, core: tuple[slice, ...], records: Path, chunk_id: str
) -> tuple[np.ndarray, int]:
    """Renumber so ids present in the core are 1..n; ids only in the halo become 0.

    The whole read block (core ids only) is saved for matching in the halo overlap.
    """
    present = np.unique(labels[core])
    present = present[present != 0]
    lut_keys = np.sort(present)
    flat = labels.ravel()
    pos = np.searchsorted(lut_keys, flat)
    hit = (
        (pos < len(lut_keys)) & (lut_keys[np.minimum(pos, max(len(lut_keys) - 1, 0))] == flat)
        if len(lut_keys)
        else np.zeros(flat.shape, bool)
    )
    renum = np.where(hit, pos + 1, 0).astype(np.uint32).reshape(labels.shape)
    np.save(_path(records, "halo", chunk_id), renum)
    return renum[core], len(lut_keys)


def _path(records: Path, kind: str, chunk_id: str) -> Path:
    folder = records / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{chunk_id}.npy"


def globalize(local: np.ndarray, box: Box, grid: ChunkGrid, offsets: np.ndarray) -> np.ndarray:
    """Chunk-local ids of a region spanning several chunks -> global ids (0 stays 0)."""
    idx = [np.arange(a, b) // c for a, b, c in zip(box.start, box.stop, grid.chunk, strict=True)]
    offs = offsets[np.ix_(*idx)]
    out = local.astype(np.uint64)
    return np.where(out != 0, out + offs, np.uint64(0))


def touch_seams(
    local: Path, spec: ChunkSpec, grid: ChunkGrid, offsets: np.ndarray, connectivity: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Pairs of global ids touching across the upper seams of one chunk (one per axis)."""
    found, rows = [], []
    image = Box.from_shape(grid.shape)
    for axis in range(len(grid.shape)):
        if spec.index[axis] + 1 >= grid.counts[axis]:
            continue
        seam = spec.write.stop[axis]
        margin = 0 if connectivity == 1 else 1  # diagonal contacts reach one voxel past the face
        start = [s - margin for s in spec.write.start]
        stop = [s + margin for s in spec.write.stop]
        start[axis], stop[axis] = seam - 1, seam + 1
        box = Box(tuple(start), tuple(stop)).intersect(image)
        slab = globalize(zarr_store.read_box(local, box), box, grid, offsets)
        pairs = seam_pairs(slab, axis, connectivity)
        found.append(pairs)
        rows.append(_seam_row(spec, axis, pairs, 0))
    return _stack(found), rows


def overlap_seams(
    local: Path, records: Path, spec: ChunkSpec, grid: ChunkGrid, offsets: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Pairs of global ids matched by IoU where this chunk's halo overlaps later neighbours."""
    found, rows = [], []
    mine_halo = np.load(_path(records, "halo", spec.chunk_id))
    mine_off = offsets[spec.index]
    for other in _later_neighbours(spec, grid):
        theirs_halo = np.load(_path(records, "halo", other.chunk_id))
        pairs, conflicts = [], 0
        for zone, halo, halo_spec, halo_off in (
            (spec.read.intersect(other.write), mine_halo, spec, mine_off),
            (other.read.intersect(spec.write), theirs_halo, other, offsets[other.index]),
        ):
            if zone.size == 0:
                continue
            halo_ids = _shift(halo[zone.relative_to(halo_spec.read).slices()], halo_off)
            core_ids = globalize(zarr_store.read_box(local, zone), zone, grid, offsets)
            p, c = overlap_pairs(halo_ids, core_ids, iou_threshold)
            pairs.append(p)
            conflicts += c
        merged = _stack(pairs)
        found.append(merged)
        rows.append(_seam_row(spec, other.chunk_id, merged, conflicts))
    return _stack(found), rows


def _shift(ids: np.ndarray, offset: np.uint64) -> np.ndarray:
    out = ids.astype(np.uint64)
    return np.where(out != 0, out + offset, np.uint64(0))


def _later_neighbours(spec: ChunkSpec, grid: ChunkGrid) -> list[ChunkSpec]:
    import itertools

    out = []
    for step in itertools.product((-1, 0, 1), repeat=len(grid.shape)):
        idx = tuple(i + s for i, s in zip(spec.index, step, strict=True))
        if idx > spec.index and all(0 <= i < n for i, n in zip(idx, grid.counts, strict=True)):
            out.append(grid.spec(idx))
    return out


def _seam_row(spec: ChunkSpec, other: int | str, pairs: np.ndarray, conflicts: int) -> dict[str, Any]:
    return {
        "chunk_id": spec.chunk_id,
        "seam": str(other),
        "merged_pairs": len(pairs),
        "conflicts": int(conflicts),
    }


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)


def relabel_chunk(
    local: Path,
    labels: Path,
    records: Path,
    spec: ChunkSpec,
    offset: np.uint64,
    relabel: Relabel,
    merge: str,
    parts_dir: Path,
    stuff: dict[int, int] | None = None,
) -> int:
    """Write final ids of one chunk and its object partials; return its object count.

    With ``stuff`` (panoptic: stuff class -> segment id 1..n_stuff), thing ids follow the
    stuff ids and every stuff pixel gets its class's segment id.
    """
    ids = zarr_store.read_box(local, spec.write)
    if merge == "none":
        final = ids.astype(np.uint64)
    else:  # chunk-local ids are 1..n: relabel the n ids once, then look every voxel up
        lut = relabel.apply(np.arange(int(ids.max(initial=0)) + 1, dtype=np.uint64) + np.uint64(offset))
        lut[0] = 0
        final = lut[ids]
    classes = None
    if merge == "touch":
        classes = zarr_store.read_box(local.parent / "classes", spec.write)
    elif merge == "overlap":
        classes = (ids != 0).astype(np.uint8)
    if stuff is not None and classes is not None:
        final = _panoptic(final, classes, stuff)
    zarr_store.write_box(labels, spec.write, final)
    classes = None if classes is None else np.where(final != 0, classes, 0)

    frame = object_partials(final, spec.write.start, classes)
    parts_dir.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(parts_dir / f"{spec.chunk_id}.parquet", index=False)
    return len(frame)


def _panoptic(things: np.ndarray, classes: np.ndarray, stuff: dict[int, int]) -> np.ndarray:
    """Thing ids shifted past the stuff ids; stuff pixels get their class's segment id."""
    out = np.where(things != 0, things + np.uint64(len(stuff)), np.uint64(0))
    for cls, segment in stuff.items():
        out[classes == cls] = segment
    return out
