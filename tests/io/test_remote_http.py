"""A COG read over HTTP range requests from a real nginx on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from pipeline.errors import ReadError
from pipeline.io import zarr_store
from pipeline.io.sources import open_source
from pipeline.runner.plan import make_plan
from pipeline.tiling import Box
from tests.helpers import job, labels_of, run
from tests.servers import Nginx, free_port, nginx

OTSU = {"band": "B8", "foreground": "below", "class_name": "water"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, data: Path) -> object:
    """nginx serving a COG (128 px tiles, overviews) made from the Spain Sentinel-2 chip."""
    with nginx(tmp_path_factory.mktemp("nginx")) as srv:
        rasterio.shutil.copy(
            data / "geo" / "Spain_7370579_S2Hand.tif",
            srv.www / "s2.tif",
            driver="COG",
            COMPRESS="DEFLATE",
            BLOCKSIZE=128,
        )
        shutil.copy(data / "geo" / "Spain_7370579_LabelHand.tif", srv.www / "labels.tif")
        (srv.www / "not-a-tiff.tif").write_text("plain text, not a GeoTIFF\n")
        yield srv


def _requests(srv: Nginx, since: int, uri: str) -> list[tuple[str, int, int, str]]:
    """(method, status, body bytes, range header) of the requests for ``uri`` after line ``since``."""
    rows = []
    for line in srv.log_lines()[since:]:
        method, path, status, sent, rng = line.split(" ", 4)
        if path == uri:
            rows.append((method, int(status), int(sent), rng.strip('"')))
    return rows


def _all_requests(srv: Nginx, since: int) -> list[list[str]]:
    return [line.split(" ", 4) for line in srv.log_lines()[since:]]


def test_window_read_fetches_only_its_tiles_by_range_requests(server: Nginx) -> None:
    url = f"{server.url}/s2.tif"
    size = (server.www / "s2.tif").stat().st_size
    before = len(server.log_lines())
    src = open_source(url)
    assert (src.format, src.shape, src.path.name) == ("raster", (13, 512, 512), "s2.tif")
    got = src.read(Box((0, 0), (64, 64)))
    with rasterio.open(server.www / "s2.tif") as ds:
        want = ds.read(window=Window(0, 0, 64, 64))
    np.testing.assert_array_equal(got, want)

    gets = [r for r in _requests(server, before, "/s2.tif") if r[0] == "GET"]
    assert gets, "no GET reached nginx"
    assert all(status == 206 and rng.startswith("bytes=") for _, status, _, rng in gets), gets
    sent = sum(r[2] for r in gets)
    # header + first and last tile (open's probe) + the window's tile, not the 13-band file
    assert sent < 0.2 * size, f"{sent} bytes of a {size}-byte file for a 64x64 window: {gets}"


def test_http_job_equals_the_local_job_and_reads_by_range(
    client, server: Nginx, data: Path, tmp_path: Path
) -> None:
    url = f"{server.url}/s2.tif"
    local = run(
        client,
        data / "geo" / "Spain_7370579_S2Hand.tif",
        tmp_path / "local",
        "otsu",
        OTSU,
        chunk=[192, 160],
        formats=["zarr", "cog"],
        reference={"path": str(data / "geo" / "Spain_7370579_LabelHand.tif"), "ignore": -1},
    )
    before = len(server.log_lines())
    reference = {"path": f"{server.url}/labels.tif", "ignore": -1}  # scored per tile on the workers
    spec = job(
        data / "geo" / "x.tif",
        tmp_path / "http",
        "otsu",
        OTSU,
        chunk=[192, 160],
        formats=["zarr", "cog"],
        reference=reference,
    )
    spec = spec.model_copy(update={"input": spec.input.model_copy(update={"path": url})})
    from pipeline.runner.api import run_job

    remote = run_job(spec, client=client)

    np.testing.assert_array_equal(labels_of(remote), labels_of(local))
    assert remote.segmenter.fitted_values() == local.segmenter.fitted_values()
    summary = json.loads((tmp_path / "http" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["input"]["path"] == url
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert summary["reference"]["path"] == reference["path"]
    assert {k: v for k, v in summary["reference"].items() if k != "path"} == {
        k: v for k, v in local_summary["reference"].items() if k != "path"
    }
    assert summary["reference"]["overall"]  # scores were computed
    with rasterio.open(remote.outputs["cog"]) as a, rasterio.open(local.outputs["cog"]) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
        assert a.crs == b.crs and a.transform == b.transform
    gets = [r for r in _requests(server, before, "/s2.tif") if r[0] == "GET"]
    assert len(gets) >= 12, gets  # 12 chunks ingested by the workers, each by its own ranges
    assert all(status == 206 and rng.startswith("bytes=") for _, status, _, rng in gets), gets
    size = (server.www / "s2.tif").stat().st_size
    assert max(r[2] for r in gets) < size / 4, "a request fetched most of the file"


def test_fingerprint_follows_the_served_file(server: Nginx, data: Path, tmp_path: Path) -> None:
    shutil.copy(server.www / "s2.tif", server.www / "moving.tif")
    spec = job(data / "geo" / "x.tif", tmp_path / "out", "otsu", OTSU, chunk=[256, 256])
    spec = spec.model_copy(
        update={"input": spec.input.model_copy(update={"path": f"{server.url}/moving.tif"})}
    )
    first = make_plan(spec).fingerprint
    assert make_plan(spec).fingerprint == first
    time.sleep(1.1)  # nginx's ETag holds the modification time in seconds
    shutil.copy(data / "geo" / "Spain_7370579_S2Hand.tif", server.www / "moving.tif")
    os.utime(server.www / "moving.tif")
    assert make_plan(spec).fingerprint != first


def test_http_errors_name_the_url_and_the_cause(server: Nginx) -> None:
    missing = f"{server.url}/nowhere/missing.tif"
    with pytest.raises(ReadError, match=r"missing\.tif: opening the raster failed: not found"):
        open_source(missing)
    with pytest.raises(ReadError, match=r"not-a-tiff\.tif: not a readable raster"):
        open_source(f"{server.url}/not-a-tiff.tif")
    dead = f"http://127.0.0.1:{free_port()}/s2.tif"
    with pytest.raises(ReadError, match=r"s2\.tif: opening the raster failed: cannot reach 127\.0\.0\.1"):
        open_source(dead)


def test_zarr_array_over_http(server: Nginx, data: Path) -> None:
    local = open_source(data / "geo" / "Spain_7370579_S2Hand.tif")
    box = Box((0, 0), (512, 512))
    target = server.www / "arrays" / "s2"  # no .zarr suffix: recognised by its zarr.json
    zarr_store.create_array(
        target, shape=local.shape, chunks=(13, 128, 128), dtype=local.dtype, geometry=local.geometry
    )
    zarr_store.write_box(target, box, local.read(box))
    before = len(server.log_lines())

    src = open_source(f"{server.url}/arrays/s2")
    window = Box((100, 300), (164, 364))
    assert (src.format, src.shape, src.geometry) == ("zarr", local.shape, local.geometry)
    np.testing.assert_array_equal(src.read(window), local.read(window))
    chunks = {uri for method, uri, *_ in _all_requests(server, before) if method == "GET" and "/c/" in uri}
    assert chunks == {"/arrays/s2/c/0/0/2", "/arrays/s2/c/0/1/2"}, chunks  # only the window's chunks
