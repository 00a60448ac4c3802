"""The zarr v3 staging store: aligned region writes, region reads, completion records.

Layout of an output folder::

    OUT/staging.zarr/input    the ingested image (C, *spatial), chunked by the grid
    OUT/staging.zarr/labels   the stitched label map (*spatial), chunked by the grid
    OUT/.segpipe/job.json     fingerprint of the job that owns the folder
    OUT/.segpipe/done/STAGE/ID.json   the completion record of a chunk done by a task of its own
    OUT/.segpipe/done/STAGE/ID+N.jsonl   the records (metrics rows) of the N chunks of one batch
                                         task, from chunk ID on: one file per task, not per chunk

Writes are aligned with zarr chunks, so concurrent chunk tasks never touch one zarr chunk.
Records are written to a temporary name and renamed, so a record exists only for a chunk
whose data is fully written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.data.geometry import Geometry, geometry_from_json
from pipeline.errors import PipelineError, ReadError
from pipeline.io import remote
from pipeline.tiling import Box

GEOMETRY_ATTR = "segpipe_geometry"


#: Chunk compressors of the staging arrays by name. The staged input defaults to ``none``
#: (``tiling.staging_codec``): a chunk read with its halo decodes its neighbours' chunks whole,
#: and on the 1024 px chunks of ``benchmarks/bench_scaling.py`` zstd cost ~25 % of the job's time.
CODECS: dict[str, list[BloscCodec] | None] = {
    "zstd": [BloscCodec(cname="zstd", clevel=3)],
    "lz4": [BloscCodec(cname="lz4", clevel=5)],
    "none": None,
}


def create_array(
    path: Path,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    geometry: Geometry,
    fill_value: float | int = 0,
    attrs: dict[str, Any] | None = None,
    codec: str = "zstd",
) -> None:
    """Create (or replace) a chunked zarr v3 array at ``path`` holding its geometry, its chunks
    compressed with ``codec`` (:data:`CODECS`)."""
    arr = zarr.create_array(
        store=str(path),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
        compressors=CODECS[codec],
        overwrite=True,
    )
    arr.attrs.update({GEOMETRY_ATTR: geometry.to_json(), **(attrs or {})})


def open_array(path: Path | str, *, write: bool = False) -> zarr.Array:
    """The zarr array at ``path`` (local path or URL), opened once for many region reads or writes.

    :func:`read_box` and :func:`write_box` take it in place of a path; opening an array costs
    about as much as reading a small chunk, so a task handling many chunks opens it once.
    """
    return zarr.open_array(store=str(path) if write else _store(path), mode="r+" if write else "r")


def write_box(path: Path | zarr.Array, box: Box, data: np.ndarray) -> None:
    """Write ``data`` into the trailing (spatial) axes ``box`` of the array at ``path`` (or open array)."""
    arr = path if isinstance(path, zarr.Array) else zarr.open_array(store=str(path), mode="r+")
    lead = (slice(None),) * (arr.ndim - box.ndim)
    arr[lead + box.slices()] = data


def _store(path: Path | str) -> Any:
    """What ``zarr.open_array`` reads: a local path, or an fsspec store for an http(s)/s3 URL."""
    return remote.zarr_store(str(path)) if remote.is_url(path) else str(path)


def read_box(path: Path | str | zarr.Array, box: Box, *, channels: bool = False) -> np.ndarray:
    """Read the spatial ``box``; with ``channels`` a 3-D volume gains a leading channel axis.

    ``path`` may be an http(s)/s3 URL: only the zarr chunks under ``box`` are fetched; or an
    array from :func:`open_array`.
    """
    try:
        if not isinstance(path, zarr.Array) and remote.is_url(path):
            with remote.explained(str(path), f"reading {box.start}..{box.stop}"):
                data = _read(path, box)
        else:
            data = _read(path, box)
    except PipelineError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: a chunk fails to decode
        raise ReadError(
            f"{path}: reading {box.start}..{box.stop} failed ({e}); a chunk of this zarr array is "
            "damaged. Re-create the array (for segpipe's staging store: rerun the job with --restart)."
        ) from e
    return data[None] if channels and data.ndim == box.ndim else data


def _read(path: Path | str | zarr.Array, box: Box) -> np.ndarray:
    arr = path if isinstance(path, zarr.Array) else zarr.open_array(store=_store(path), mode="r")
    lead = (slice(None),) * (arr.ndim - box.ndim)
    return np.asarray(arr[lead + box.slices()])


def array_info(path: Path | str) -> tuple[tuple[int, ...], str, Geometry]:
    """Shape ``(C, *spatial)``, dtype and geometry of a segpipe zarr array (path or URL)."""
    if remote.is_url(path):
        remote.diagnose(remote.join(str(path), "zarr.json"), "opening the zarr array")
    try:
        arr = zarr.open_array(store=_store(path), mode="r")
        geometry = geometry_from_json(dict(arr.attrs)[GEOMETRY_ATTR])  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReadError(
            f"{path}: not a segpipe zarr array with geometry ({e}); give the path of "
            "an array segpipe wrote (OUT/staging.zarr/input or .../labels)"
        ) from e
    shape = tuple(arr.shape)
    spatial = 2 if geometry.to_json()["kind"] == "raster" else 3
    if len(shape) == spatial:  # a label map: no channel axis
        shape = (1, *shape)

    return shape, str(arr.dtype), geometry


class CompletionLog:
    """Completion records of one stage, each holding a chunk's metrics row.

    A task that did one chunk writes ``ID.json``; a batch task writes the rows of all its chunks
    as one ``ID+N.jsonl`` file once every one of them is written, so a job of 10^5 chunks leaves
    one file per task, not per chunk. A chunk is done when any file holds its row.
    """

    def __init__(self, root: Path, stage: str) -> None:
        self.dir = root / "done" / stage

    def mark(self, chunk_id: str, row: dict[str, Any]) -> None:
        """Record ``chunk_id`` as complete (atomic)."""
        self._write(f"{chunk_id}.json", json.dumps(row, default=_jsonable))

    def mark_many(self, rows: list[dict[str, Any]]) -> None:
        """Record the chunks of ``rows`` (each with its ``chunk_id``) as complete, in one file (atomic)."""
        if len(rows) <= 1:
            for row in rows:
                self.mark(row["chunk_id"], row)
            return
        text = "\n".join(json.dumps(row, default=_jsonable) for row in rows)
        self._write(f"{rows[0]['chunk_id']}+{len(rows)}.jsonl", text + "\n")

    def _write(self, name: str, text: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.dir / name)

    def done(self) -> set[str]:
        """Ids of completed chunks."""
        if not self.dir.exists():
            return set()
        ids = {p.stem for p in self.dir.glob("*.json")}
        for path in self.dir.glob("*.jsonl"):
            ids.update(json.loads(line)["chunk_id"] for line in path.read_text().splitlines() if line)
        return ids

    def rows(self) -> list[dict[str, Any]]:
        """All completion records, one per chunk (sorted by file name, then as written)."""
        if not self.dir.exists():
            return []
        by_id: dict[str, dict[str, Any]] = {}
        for path in sorted([*self.dir.glob("*.json"), *self.dir.glob("*.jsonl")]):
            if path.suffix == ".json":
                row = json.loads(path.read_text())
                by_id[row.get("chunk_id", path.stem)] = row
            else:
                for line in path.read_text().splitlines():
                    if line:
                        row = json.loads(line)
                        by_id[row["chunk_id"]] = row
        return list(by_id.values())


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
