"""Cloud-optimised GeoTIFFs encoded by the workers and assembled by the client.

GDAL's COG driver compresses every tile of a file and of its overviews in the one process that
calls it: on a 92672^2 label map that copy took 209 of the job's 567 s on the client while the
workers waited (``benchmarks/scale.md``), and it is the part of a job that more workers cannot
shorten. Here the work is split as a Dask job splits any other:

1. **Encode** (:func:`encode_region`, one task per region): a region is ``tile << SPAN`` pixels a side
   (8 x 8 tiles of 256) of a level held in a zarr array. The task encodes the region's tiles
   (DEFLATE: the zlib stream of TIFF compression 8, libdeflate at GDAL's default level 6),
   reduces the region 2x2 block by 2x2 block with :func:`pipeline.io.overviews.reduce_2x2` and
   encodes the next level's tiles, while the region still spans whole tiles (``SPAN`` + 1
   levels); then it writes the reduction after that into a small zarr array, the input of the
   next round. Regions start at multiples of their side, so every 2x2 block of every level lies
   in one region and the levels are exactly those of :func:`pipeline.io.overviews.fill_overviews`.
2. **Assemble** (:func:`assemble`, the client): the file is laid out as GDAL's COG driver lays
   it out (``LAYOUT=IFDS_BEFORE_DATA`` ghost header, every IFD before any tile, the smallest
   overview's tiles first, row-major tiles each led by its size and trailed by its last 4
   bytes), with the GeoTIFF tags GDAL writes for the geometry, and the encoded tiles are copied
   into place: megabytes of bytes, whatever the number of workers.

Blob files and round arrays live in a scratch folder the caller removes; the file is written
under a hidden name and renamed by the caller once checked.
"""

from __future__ import annotations

import math
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import deflate
import numpy as np
import rasterio
import tifffile

from pipeline.data.geometry import GeoRef
from pipeline.io import zarr_store
from pipeline.io.overviews import Resampling, level_shapes, reduce_2x2
from pipeline.tiling import Box

#: Halvings encoded by one region task after its first level (levels ``base .. base + SPAN``):
#: regions of 2048^2 px for 256 px tiles, 4 Mpx like an ingest task (16 MB of float32 scores).
SPAN = 3
#: DEFLATE level: GDAL's default ``ZLEVEL`` for the COG driver.
ZLEVEL = 6

#: ``map(fn, items) -> results`` run somewhere (Dask workers in a job; in process by default).
Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]

_GHOST = (
    "LAYOUT=IFDS_BEFORE_DATA\n"
    "BLOCK_ORDER=ROW_MAJOR\n"
    "BLOCK_LEADER=SIZE_AS_UINT4\n"
    "BLOCK_TRAILER=LAST_4_BYTES_REPEATED\n"
    "KNOWN_INCOMPATIBLE_EDITION=NO\n "
)
GHOST = f"GDAL_STRUCTURAL_METADATA_SIZE={len(_GHOST):06d} bytes\n{_GHOST}".encode("ascii")

#: GeoTIFF and GDAL tags copied from a template GDAL writes for the same geometry.
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42112, 42113)
_SHORT, _LONG, _LONG8 = 3, 4, 16
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}


def local_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """Run ``fn`` over ``items`` in this process."""
    return [fn(item) for item in items]


@dataclass(frozen=True)
class Pyramid:
    """A raster's levels (level 0: full resolution) cut into ``tile`` x ``tile`` tiles."""

    shapes: tuple[tuple[int, int], ...]
    dtype: str
    tile: int
    resampling: Resampling
    nodata: float | None

    @classmethod
    def of(
        cls, shape: tuple[int, int], dtype: str, tile: int, resampling: Resampling, nodata: float | None
    ) -> Pyramid:
        if tile % 16:
            raise ValueError(f"COG tiles must be a multiple of 16 pixels a side, not {tile}")
        shapes = ((int(shape[0]), int(shape[1])), *level_shapes(shape, tile))
        return cls(shapes, np.dtype(dtype).str, tile, resampling, nodata)

    @property
    def region(self) -> int:
        """Side of a region task at its first level: whole tiles down ``SPAN`` halvings."""
        return self.tile << SPAN

    def tiles(self, level: int) -> tuple[int, int]:
        h, w = self.shapes[level]
        return math.ceil(h / self.tile), math.ceil(w / self.tile)

    def regions(self, level: int) -> list[tuple[int, int]]:
        h, w = self.shapes[level]
        r = self.region
        return [(y, x) for y in range(math.ceil(h / r)) for x in range(math.ceil(w / r))]


def encode_region(
    pyramid: Pyramid, base: int, source: Path, blobs: Path, after: Path | None, region: tuple[int, int]
) -> dict[int, np.ndarray]:
    """Encode the tiles of one region of level ``base`` (held in the zarr array ``source``) and
    of its next ``SPAN`` levels; write each level's tiles, row-major within the region, to
    ``blobs/L<level>/<y>_<x>.bin``; write the reduction after the last one into the zarr array
    ``after`` (the next round's level) when there is one. Return ``{level: payload sizes}``."""
    ry, rx = region
    r = pyramid.region
    h, w = pyramid.shapes[base]
    box = Box((ry * r, rx * r), (min(h, (ry + 1) * r), min(w, (rx + 1) * r)))
    data = zarr_store.read_box(source, box).reshape(box.shape)  # a (1, h, w) array: one band
    last = min(base + SPAN, len(pyramid.shapes) - 1)
    sizes: dict[int, np.ndarray] = {}
    for level in range(base, last + 1):
        if level > base:
            data = reduce_2x2(data, pyramid.resampling, pyramid.nodata)
        sizes[level] = _write_tiles(pyramid, data, blobs / f"L{level:02d}" / f"{ry}_{rx}.bin")
    if after is not None:
        piece = reduce_2x2(data, pyramid.resampling, pyramid.nodata)
        side = r >> (SPAN + 1)
        y0, x0 = ry * side, rx * side
        zarr_store.write_box(after, Box((y0, x0), (y0 + piece.shape[0], x0 + piece.shape[1])), piece)
    return sizes


def _write_tiles(pyramid: Pyramid, data: np.ndarray, path: Path) -> np.ndarray:
    t = pyramid.tile
    dtype = np.dtype(pyramid.dtype).newbyteorder("<")
    fill = np.asarray(0 if pyramid.nodata is None else pyramid.nodata).astype(dtype)
    h, w = data.shape
    sizes = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for y in range(0, h, t):
            for x in range(0, w, t):
                block = data[y : y + t, x : x + t]
                if block.shape != (t, t):
                    padded = np.full((t, t), fill, dtype)
                    padded[: block.shape[0], : block.shape[1]] = block
                    block = padded
                payload = deflate.zlib_compress(np.ascontiguousarray(block, dtype=dtype).tobytes(), ZLEVEL)
                f.write(struct.pack("<I", len(payload)) + payload + payload[-4:])
                sizes.append(len(payload))
    return np.asarray(sizes, np.uint64)


def encode(pyramid: Pyramid, source: Path, scratch: Path, run: Mapper = local_map) -> dict[int, np.ndarray]:
    """Encode every level of ``pyramid`` from the level-0 zarr array ``source``, in rounds of
    region tasks given to ``run``; return each level's payload sizes as a 2-D tile grid."""
    grids = {k: np.zeros(pyramid.tiles(k), np.uint64) for k in range(len(pyramid.shapes))}
    base = 0
    while base < len(pyramid.shapes):
        following = base + SPAN + 1
        after = None
        if following < len(pyramid.shapes):
            after = scratch / f"level{following:02d}.zarr"
            half = pyramid.tile // 2
            zarr_store.create_array(
                after,
                shape=pyramid.shapes[following],
                chunks=(half, half),
                dtype=pyramid.dtype,
                geometry=GeoRef(None, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
            )
        regions = pyramid.regions(base)
        fn = partial(encode_region, pyramid, base, source, scratch / "tiles", after)
        results = (run if len(regions) > 1 else local_map)(fn, regions)
        per_side = 1 << SPAN
        for (ry, rx), sizes in zip(regions, results, strict=True):
            for level, flat in sizes.items():
                n = per_side >> (level - base)
                ny, nx = grids[level].shape
                rows, cols = min(n, ny - ry * n), min(n, nx - rx * n)
                grids[level][ry * n : ry * n + rows, rx * n : rx * n + cols] = flat.reshape(rows, cols)
        if after is None:
            break
        source, base = after, following
    return grids


def assemble(
    path: Path,
    pyramid: Pyramid,
    georef: GeoRef,
    sizes: dict[int, np.ndarray],
    scratch: Path,
    tags: dict[str, str],
    bigtiff: bool | None = None,
) -> Path:
    """Write the COG ``path`` from the encoded tiles in ``scratch`` (see the module docstring):
    a BigTIFF when ``bigtiff``, or when ``None`` and a classic TIFF's 32-bit offsets could not
    reach every byte."""
    geo_tags = _geo_tags(georef, pyramid, scratch / "template.tif", tags)
    if bigtiff is None:
        data_bytes = sum(int(s.sum()) + 8 * s.size for s in sizes.values())
        bigtiff = data_bytes + 64 * 1024 + 16 * sum(s.size for s in sizes.values()) >= 2**32
    fmt = _Format(bigtiff)
    levels = range(len(pyramid.shapes))
    # IFDs follow the header and the ghost area; their sizes do not depend on the offsets
    ifd_at, offset = [], fmt.header + len(GHOST)
    for k in levels:
        offset += offset % 2
        ifd_at.append(offset)
        offset += fmt.ifd_size(_entries(pyramid, k, sizes[k], geo_tags, fmt))
    # tile data: the smallest overview first, each level row-major, each tile led by 4 bytes
    starts: dict[int, np.ndarray] = {}
    for k in reversed(levels):
        flat = sizes[k].ravel()
        records = flat + 8
        starts[k] = (offset + 4 + np.concatenate([[0], np.cumsum(records)[:-1]])).astype(np.uint64)
        offset += int(records.sum())
    with open(path, "wb") as f:
        f.write(fmt.header_bytes(ifd_at[0]) + GHOST)
        for k in levels:
            f.write(b"\0" * (ifd_at[k] - f.tell()))
            nxt = ifd_at[k + 1] if k + 1 < len(ifd_at) else 0
            entries = _entries(pyramid, k, sizes[k], geo_tags, fmt, starts[k])
            f.write(fmt.ifd_bytes(entries, ifd_at[k], nxt))
        for k in reversed(levels):
            _copy_level(f, k, sizes[k], scratch / "tiles" / f"L{k:02d}")
    return path


def _copy_level(f: Any, level: int, sizes: np.ndarray, folder: Path) -> None:
    """Append level ``level``'s tile records (row-major over the whole level) from its region
    blobs (row-major within each region): each tile row of a region is one contiguous read."""
    base = next(b for b in range(0, level + 1, SPAN + 1) if level - b <= SPAN)
    per_side = (1 << SPAN) >> (level - base)
    records = sizes + 8
    ny, nx = sizes.shape
    for ry in range(math.ceil(ny / per_side)):
        blobs = [open(folder / f"{ry}_{rx}.bin", "rb") for rx in range(math.ceil(nx / per_side))]  # noqa: SIM115
        try:
            for row in range(ry * per_side, min(ny, (ry + 1) * per_side)):
                for rx, blob in enumerate(blobs):
                    f.write(blob.read(int(records[row, rx * per_side : (rx + 1) * per_side].sum())))
        finally:
            for blob in blobs:
                blob.close()


class _Format:
    """Classic TIFF, or BigTIFF past 4 GiB."""

    def __init__(self, big: bool) -> None:
        self.big = big
        self.header = 16 if big else 8
        self.offset_type = _LONG8 if big else _LONG

    def header_bytes(self, first_ifd: int) -> bytes:
        if self.big:
            return b"II+\0" + struct.pack("<HHQ", 8, 0, first_ifd)
        return b"II*\0" + struct.pack("<I", first_ifd)

    def ifd_size(self, entries: list[tuple[int, int, int, bytes]]) -> int:
        inline = 8 if self.big else 4
        head = (8 + 20 * len(entries) + 8) if self.big else (2 + 12 * len(entries) + 4)
        return head + sum(len(v) + len(v) % 2 for *_, v in entries if len(v) > inline)

    def ifd_bytes(self, entries: list[tuple[int, int, int, bytes]], at: int, nxt: int) -> bytes:
        inline = 8 if self.big else 4
        head = (8 + 20 * len(entries) + 8) if self.big else (2 + 12 * len(entries) + 4)
        table = [struct.pack("<Q", len(entries)) if self.big else struct.pack("<H", len(entries))]
        extra, pos = [], at + head
        for tag, typ, count, value in entries:
            if len(value) <= inline:
                field = value.ljust(inline, b"\0")
            else:
                field = struct.pack("<Q" if self.big else "<I", pos)
                extra.append(value + b"\0" * (len(value) % 2))
                pos += len(extra[-1])
            table.append(struct.pack("<HHQ" if self.big else "<HHI", tag, typ, count) + field)
        table.append(struct.pack("<Q" if self.big else "<I", nxt))
        return b"".join(table + extra)


def _entries(
    pyramid: Pyramid,
    level: int,
    sizes: np.ndarray,
    geo_tags: dict[int, tuple[int, int, bytes]],
    fmt: _Format,
    starts: np.ndarray | None = None,
) -> list[tuple[int, int, int, bytes]]:
    dtype = np.dtype(pyramid.dtype)
    h, w = pyramid.shapes[level]
    n = sizes.size
    word = "<u8" if fmt.big else "<u4"
    offsets = (np.zeros(n, np.uint64) if starts is None else starts).astype(word)
    counts = sizes.ravel().astype(word)

    def short(v: int) -> tuple[int, int, bytes]:
        return _SHORT, 1, struct.pack("<H", v)

    def long(v: int) -> tuple[int, int, bytes]:
        return _LONG, 1, struct.pack("<I", v)

    fields: dict[int, tuple[int, int, bytes]] = {
        256: long(w),
        257: long(h),
        258: short(dtype.itemsize * 8),
        259: short(8),  # Adobe DEFLATE
        262: short(1),  # min-is-black
        277: short(1),
        284: short(1),
        317: short(1),  # no predictor
        322: short(pyramid.tile),
        323: short(pyramid.tile),
        324: (fmt.offset_type, n, offsets.tobytes()),
        325: (fmt.offset_type, n, counts.tobytes()),
        339: short({"u": 1, "b": 1, "i": 2, "f": 3}[dtype.kind]),
    }
    if level:
        fields[254] = long(1)  # reduced-resolution image
        if 42113 in geo_tags:
            fields[42113] = geo_tags[42113]
    else:
        fields.update(geo_tags)
    return [(tag, *fields[tag]) for tag in sorted(fields)]


def _geo_tags(
    georef: GeoRef, pyramid: Pyramid, template: Path, tags: dict[str, str]
) -> dict[int, tuple[int, int, bytes]]:
    """The GeoTIFF, GDAL metadata and nodata tags GDAL writes for this geometry, read raw from a
    1 x 1 GeoTIFF it writes with the same CRS, transform, nodata and dataset tags."""
    profile = {
        "driver": "GTiff",
        "height": 1,
        "width": 1,
        "count": 1,
        "dtype": np.dtype(pyramid.dtype).name,
        "transform": rasterio.Affine(*georef.transform),
        "crs": georef.crs_wkt,
        "nodata": pyramid.nodata,
    }
    with rasterio.open(template, "w", **profile) as ds:
        if tags:
            ds.update_tags(**tags)
    found: dict[int, tuple[int, int, bytes]] = {}
    with tifffile.TiffFile(template) as tif, open(template, "rb") as raw:
        for tag in tif.pages.first.tags.values():
            if tag.code in GEO_TAGS:
                raw.seek(tag.valueoffset)
                found[tag.code] = (
                    int(tag.dtype),
                    tag.count,
                    raw.read(tag.count * _TYPE_SIZE[int(tag.dtype)]),
                )
    template.unlink()
    return found


def write(
    path: Path,
    georef: GeoRef,
    source: Path,
    pyramid: Pyramid,
    scratch: Path,
    *,
    run: Mapper = local_map,
    tags: dict[str, str] | None = None,
    bigtiff: bool | None = None,
) -> Path:
    """Encode (with ``run``) and assemble the COG of the 2-D zarr array ``source`` at ``path``;
    ``scratch`` is emptied first and removed after."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        sizes = encode(pyramid, source, scratch, run)
        return assemble(path, pyramid, georef, sizes, scratch, tags or {}, bigtiff)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
