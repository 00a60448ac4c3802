"""COGs encoded tile by tile by region tasks and assembled by the client (``pipeline.io.cog_tiles``)
hold, at every level, exactly the pixels of the COG GDAL's driver writes from the same raster
(``geo.write_cog``), on real data, in a file GDAL and rio-cogeo take for a valid COG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
from rio_cogeo.cogeo import cog_validate

from pipeline.data.geometry import GeoRef
from pipeline.errors import ReadError
from pipeline.io import cog_tiles, zarr_store
from pipeline.io.geo import write_cog, write_cog_from_zarr
from pipeline.runner.execute import cluster_map
from pipeline.tiling import Box

RGB = "geo/RGB.byte.tif"  # 718 x 791 px, nodata 0 in a collar around the scene


def _rgb(data: Path) -> tuple[np.ndarray, np.ndarray, GeoRef]:
    with rasterio.open(data / RGB) as ds:
        return ds.read(1), ds.read_masks(1) == 0, GeoRef(ds.crs.to_wkt(), tuple(ds.transform)[:6])


def _zarr(path: Path, a: np.ndarray, georef: GeoRef, chunk: int = 100) -> Path:
    zarr_store.create_array(path, shape=a.shape, chunks=(chunk, chunk), dtype=a.dtype.name, geometry=georef)
    zarr_store.write_box(path, Box.from_shape(a.shape), a)
    return path


def _windows(a: np.ndarray):
    def gen():
        for y in range(0, a.shape[0], 200):
            for x in range(0, a.shape[1], 300):
                box = Box((y, x), (min(y + 200, a.shape[0]), min(x + 300, a.shape[1])))
                yield box, a[box.slices()]

    return gen


def _levels(path: Path) -> list[np.ndarray]:
    with rasterio.open(path) as ds:
        out = [ds.read(1)]
        n = len(ds.overviews(1))
    for k in range(n):
        with rasterio.open(path, overview_level=k) as ov:
            out.append(ov.read(1))
    return out


def _same_file_contents(ours: Path, gdal: Path) -> int:
    valid, errors, warnings = cog_validate(str(ours), strict=True)
    assert valid, (errors, warnings)
    with rasterio.open(ours) as a, rasterio.open(gdal) as b:
        assert a.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert a.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert a.crs == b.crs and a.transform == b.transform and a.shape == b.shape
        assert a.dtypes == b.dtypes and a.block_shapes == b.block_shapes
        assert a.nodata == b.nodata or (math.isnan(a.nodata) and math.isnan(b.nodata))
        assert a.overviews(1) == b.overviews(1) and a.tags() == b.tags()
    ours_levels, gdal_levels = _levels(ours), _levels(gdal)
    assert len(ours_levels) == len(gdal_levels)
    for k, (x, y) in enumerate(zip(ours_levels, gdal_levels, strict=True)):
        np.testing.assert_array_equal(x, y, err_msg=f"level {k}")
    return len(ours_levels)


@pytest.mark.parametrize(
    ("kind", "resampling", "nodata", "tile"),
    [
        ("labels", "MODE", 255, 16),  # 6 x 7 regions of 128 px, levels 0-3, then one region: 4-6
        ("labels", "NEAREST", 255, 32),
        ("scores", "AVERAGE", math.nan, 16),
        ("scores", "AVERAGE", -1.0, 128),  # one region: every level encoded by one task
        ("int16", "MODE", None, 16),
    ],
)
def test_worker_encoded_cog_equals_gdals_at_every_level(
    data, tmp_path, kind, resampling, nodata, tile
) -> None:
    band, mask, georef = _rgb(data)
    if kind == "labels":
        a = (band // 64).astype(np.uint8)
        a[mask] = 255
    elif kind == "scores":
        a = (band / 255.0).astype(np.float32)
        a[mask] = nodata
    else:
        a = (band.astype(np.int16) - 128) * 7
    source = _zarr(tmp_path / "src.zarr", a, georef)
    ours = write_cog_from_zarr(
        tmp_path / "ours.tif", georef, source, nodata=nodata, resampling=resampling, blocksize=tile
    )
    gdal = write_cog(
        tmp_path / "gdal.tif", georef, a.shape, a.dtype.name, _windows(a), nodata=nodata,
        resampling=resampling, blocksize=tile,
    )  # fmt: skip
    levels = _same_file_contents(ours, gdal)
    assert levels == 1 + len(cog_tiles.level_shapes(a.shape, tile)) >= 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gdal.tif", "ours.tif", "src.zarr"]  # no scratch


def test_bigtiff_layout_reads_back_the_same(data, tmp_path) -> None:
    band, mask, georef = _rgb(data)
    a = (band // 64).astype(np.uint8)
    a[mask] = 255
    source = _zarr(tmp_path / "src.zarr", a, georef)
    pyramid = cog_tiles.Pyramid.of(a.shape, "uint8", 16, "MODE", 255)
    tags = {"OVERVIEW_RESAMPLING": "MODE"}
    big = cog_tiles.write(
        tmp_path / "big.tif", georef, source, pyramid, tmp_path / "s1", tags=tags, bigtiff=True
    )
    small = cog_tiles.write(tmp_path / "small.tif", georef, source, pyramid, tmp_path / "s2", tags=tags)
    with tifffile.TiffFile(big) as t, tifffile.TiffFile(small) as s:
        assert t.is_bigtiff and not s.is_bigtiff
    assert _same_file_contents(big, small) == len(pyramid.shapes)


def test_region_tasks_run_on_the_cluster_workers(client, data, tmp_path) -> None:
    from distributed import get_task_stream

    band, mask, georef = _rgb(data)
    a = (band // 64).astype(np.uint8)
    a[mask] = 255
    source = _zarr(tmp_path / "src.zarr", a, georef)
    with get_task_stream(client) as stream:
        ours = write_cog_from_zarr(
            tmp_path / "ours.tif", georef, source, nodata=255, blocksize=16, run=cluster_map(client)
        )
    gdal = write_cog(tmp_path / "gdal.tif", georef, a.shape, "uint8", _windows(a), nodata=255, blocksize=16)
    assert _same_file_contents(ours, gdal) == 7
    encoded = [t for t in stream.data if str(t["key"]).startswith("encode_region")]
    assert len(encoded) == 42  # the first round's 6 x 7 regions; the second round (one region) runs here
    assert {t["worker"] for t in encoded} <= set(client.scheduler_info()["workers"])


def test_a_damaged_source_chunk_names_the_array_and_leaves_no_file(data, tmp_path) -> None:
    band, _, georef = _rgb(data)
    source = _zarr(tmp_path / "src.zarr", (band // 64).astype(np.uint8), georef)
    (source / "c" / "3" / "2").write_bytes(b"not a blosc frame")
    with pytest.raises(ReadError, match=r"src\.zarr: reading .* a chunk of this zarr array is damaged"):
        write_cog_from_zarr(tmp_path / "labels.tif", georef, source, nodata=255, blocksize=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.zarr"]
