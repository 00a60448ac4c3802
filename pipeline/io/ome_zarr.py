"""OME-Zarr (NGFF 0.5, zarr v3) output for volumes: a multiscale image and a multiscale label group.

Levels halve every axis; labels are downsampled by mode, the image by mean. Each level is
written chunk by chunk from the one above (bounded memory). NGFF transformations hold scale
and translation only, so the volume's direction matrix is kept in the group's ``segpipe``
attributes (and the output is refused nowhere: napari and ome-zarr-py read it as is).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.data.geometry import VolumeRef
from pipeline.io import zarr_store
from pipeline.tiling import Box, ChunkGrid

Reduce = Callable[[np.ndarray], np.ndarray]
NGFF = "0.5"
AXES = [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")]


def levels_for(shape: tuple[int, ...], *, min_side: int = 8, most: int = 4) -> int:
    """How many levels (full resolution included) before an axis gets shorter than ``min_side``."""
    n = 1
    while n < most and min(-(-s // 2**n) for s in shape) >= min_side:
        n += 1
    return n


def write_ome_zarr(
    path: Path,
    image: Path,
    labels: Path,
    ref: VolumeRef,
    *,
    chunk: tuple[int, ...],
    reduce_image: Reduce,
    reduce_labels: Reduce,
    name: str = "segmentation",
) -> Path:
    """Write ``path`` (``*.ome.zarr``) from the staging image and label arrays; atomic rename.

    ``reduce_image`` / ``reduce_labels`` halve a block (mean / mode kernels from stitching).
    """
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    shape = tuple(zarr.open_array(store=str(labels), mode="r").shape)
    n = levels_for(shape)
    _pyramid(root, image, n, chunk, reduce_image, channel=True)
    root.attrs["ome"] = {"version": NGFF, "multiscales": [_multiscale("image", n, ref)]}
    root.attrs["segpipe"] = {"direction_zyx": [list(r) for r in ref.direction_zyx]}
    group = root.create_group("labels")
    group.attrs["ome"] = {"version": NGFF, "labels": [name]}
    lab = group.create_group(name)
    _pyramid(lab, labels, n, chunk, reduce_labels, channel=False)
    lab.attrs["ome"] = {
        "version": NGFF,
        "multiscales": [_multiscale(name, n, ref)],
        "image-label": {"source": {"image": "../../"}},
    }
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _multiscale(name: str, levels: int, ref: VolumeRef) -> dict[str, Any]:
    datasets = []
    for k in range(levels):
        scale = [s * 2**k for s in ref.spacing_zyx]
        shift = [o + (2**k - 1) * s / 2 for o, s in zip(ref.origin_zyx, ref.spacing_zyx, strict=True)]
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": shift},
                ],
            }
        )
    return {"name": name, "axes": AXES, "datasets": datasets}


def _pyramid(
    group: Any, source: Path, levels: int, chunk: tuple[int, ...], reduce: Any, *, channel: bool
) -> None:
    """Level 0 copied from ``source`` chunk by chunk, each next level reduced from the previous."""
    src = zarr.open_array(store=str(source), mode="r")
    shape = tuple(src.shape[1:] if channel else src.shape)
    prev = group.create_array("0", shape=shape, chunks=chunk, dtype=src.dtype, fill_value=0)
    for spec in ChunkGrid.build(shape, chunk, 0):
        data = zarr_store.read_box(source, spec.write)
        prev[spec.write.slices()] = data[0] if channel else data
    for k in range(1, levels):
        shape = tuple(-(-s // 2) for s in prev.shape)
        cur = group.create_array(str(k), shape=shape, chunks=chunk, dtype=prev.dtype, fill_value=0)
        for spec in ChunkGrid.build(shape, chunk, 0):
            box = Box(
                tuple(2 * a for a in spec.write.start),
                tuple(min(2 * b, s) for b, s in zip(spec.write.stop, prev.shape, strict=True)),
            )
            cur[spec.write.slices()] = reduce(np.asarray(prev[box.slices()]))[
                tuple(slice(0, b - a) for a, b in zip(spec.write.start, spec.write.stop, strict=True))
            ]
        prev = cur
