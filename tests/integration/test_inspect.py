"""``segpipe inspect``: size, dtype, bands and geometry of real inputs as their readers see them,
the chunk grid a job would build, estimates from the benchmark constants, and clear errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

from pipeline.io.medical import volume_info
from pipeline.runner import inspection
from pipeline.runner.cli import main
from pipeline.runner.plan import make_plan
from tests.helpers import job

S2 = "geo/Spain_7370579_S2Hand.tif"
DICOM = "medical/totalseg_example_ct_dicom"


def inspect_json(capsys, *args: str) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_raster_facts_and_the_grid_a_job_would_use(capsys, data, tmp_path) -> None:
    args = [str(data / S2), "--chunk", "192", "160", "--segmenter", "local", "--param", "block_size=35"]
    report = inspect_json(capsys, *args, "--param", "band=B8")
    with rasterio.open(data / S2) as ds:
        assert report["shape"] == [ds.count, ds.height, ds.width] == [13, 512, 512]
        assert report["dtype"] == "int16" and report["bands"] == 13
        assert report["geometry"]["band_names"][7] == "B8"
        assert report["geometry"]["crs"] == "EPSG:4326"
        assert report["geometry"]["transform"] == list(ds.transform)[:6]
        assert report["geometry"]["nodata"] == ds.nodata == 0
    assert report["bytes"] == 13 * 512 * 512 * 2
    plan = make_plan(
        job(data / S2, tmp_path / "out", "local", {"block_size": 35, "band": "B8"}, chunk=[192, 160])
    )
    grid = report["grid"]
    assert grid["chunks_per_axis"] == list(plan.grid.counts) == [3, 4]
    assert grid["n_chunks"] == len(plan.grid) == 12
    assert grid["halo"] == list(plan.grid.halo) and grid["halo"][0] > 0
    assert grid["read_block"] == [192 + 2 * grid["halo"][0], 160 + 2 * grid["halo"][1]]
    assert report["segmenter"] == {"name": "local", "kind": "semantic", "halo": plan.segmenter.halo}
    estimate = report["estimate"]
    mpx = 512 * 512 / 1e6
    low, high = inspection.CLASSICAL_MPX_S
    assert estimate["wall_s"] == pytest.approx([mpx / (2 * high), mpx / (2 * low)], rel=0.05)
    block = (192 + 2 * grid["halo"][0]) * (160 + 2 * grid["halo"][1])
    expected_high = inspection.WORKER_BASE_MIB[1] + block * (26 + inspection.WORK_BYTES_PER_PX[1]) / 2**20
    assert estimate["worker_memory_mib"][1] == round(expected_high) and estimate["fits"]

    assert main(["inspect", *args, "--param", "band=B8"]) == 0
    text = capsys.readouterr().out
    for fact in ("512 x 512 px, 13 band(s) int16", "EPSG:4326", "12 chunk(s) (3 x 4)", "bench_classical"):
        assert fact in text


def test_otsu_uses_the_otsu_benchmark_and_memory_can_be_short(capsys, data) -> None:
    report = inspect_json(
        capsys,
        str(data / S2),
        "--segmenter",
        "otsu",
        "--param",
        "band=B8",
        "--workers",
        "4",
        "--memory-per-worker",
        "300MiB",
    )
    estimate = report["estimate"]
    low, high = inspection.OTSU_MPX_S
    mpx = 512 * 512 / 1e6
    assert estimate["wall_s"] == pytest.approx([mpx / (4 * high), mpx / (4 * low)], rel=0.05)
    assert "bench_otsu" in estimate["basis"]
    assert not estimate["fits"] and estimate["largest_chunk"] is None  # 300 MiB is below the base
    short = inspect_json(capsys, str(data / S2), "--chunk", "4096", "--memory-per-worker", "390MiB")[
        "estimate"
    ]
    assert not short["fits"] and 0 < short["largest_chunk"] < 512
    assert main(["inspect", str(data / S2), "--chunk", "4096", "--memory-per-worker", "390MiB"]) == 0
    assert f"may not fit; use --chunk {short['largest_chunk']} or less" in capsys.readouterr().out
    chunk = str(short["largest_chunk"])
    assert inspect_json(capsys, str(data / S2), "--chunk", chunk, "--memory-per-worker", "390MiB")[
        "estimate"
    ]["fits"]


def test_volume_facts_and_grid(capsys, data) -> None:
    report = inspect_json(capsys, str(data / DICOM), "--chunk", "8", "256", "256")
    (z, y, x), _, ref = volume_info(data / DICOM)
    assert report["shape"] == [1, z, y, x] and report["format"] == "volume"
    assert report["geometry"]["spacing_zyx"] == pytest.approx(list(ref.spacing_zyx))
    assert report["geometry"]["origin_zyx"] == pytest.approx(list(ref.origin_zyx))
    assert report["read_unit"] == "slab"
    assert report["grid"]["chunks_per_axis"] == [math.ceil(z / 8), math.ceil(y / 256), math.ceil(x / 256)]
    assert report["segmenter"] is None and report["grid"]["halo"] == [0, 0, 0]
    assert main(["inspect", str(data / "medical" / "totalseg_example_ct_sm.nii.gz")]) == 0
    text = capsys.readouterr().out
    assert (
        "read by whole" in text and "spacing   [3.0, 3.0, 3.0]" in text and "1 chunk(s) (1 x 1 x 1)" in text
    )


def _segpipe(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "segpipe"
    return subprocess.run([str(exe), "inspect", *args], capture_output=True, text=True, timeout=300)


def test_bad_inputs_are_clear_errors(capsys, data, tmp_path) -> None:
    missing = _segpipe(str(tmp_path / "nope.tif"))
    assert missing.returncode == 2 and not missing.stdout
    assert f"{tmp_path / 'nope.tif'}: no such file or folder" in missing.stderr
    broken = tmp_path / "broken.tif"
    broken.write_bytes((data / S2).read_bytes()[:4000])  # a truncated GeoTIFF
    cases = [
        ([str(broken)], f"{broken}: not a readable raster"),
        ([str(data / DICOM), "--chunk", "8", "256"], "give one size for every axis or 3 sizes"),
        ([str(data / S2), "--memory-per-worker", "lots"], "--memory-per-worker 'lots' is not a size"),
        ([str(data / S2), "--segmenter", "otsu", "--param", "colour=red"], "Give parameters with --param"),
        ([str(data / S2), "--segmenter", "otsux"], "Did you mean 'otsu'?"),
    ]
    for args, message in cases:
        assert main(["inspect", *args]) == 2, args
        assert message in capsys.readouterr().err
