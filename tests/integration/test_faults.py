"""Acceptance (operations 1-3): worker loss, a killed run resumed, a chunk that always fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio
import yaml

from pipeline.errors import ChunkFailedError
from pipeline.io.zarr_store import CompletionLog
from pipeline.testing import write_raster
from tests.helpers import run
from tests.integration.test_cli_scheduler import _free_port, _spawn, _wait_for_workers

BIN = Path(sys.executable).parent
SLOW = {"band": 1, "smooth_sigma": 2.0}  # a little work per chunk, so a run can be cut half way


@pytest.fixture(scope="module")
def raster(tmp_path_factory) -> Path:
    return write_raster(tmp_path_factory.mktemp("faults") / "scene.tif", (3072, 3072), seed=11)


def _job_file(folder: Path, raster: Path, out: Path) -> Path:
    path = folder / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "faults",
                "input": {"path": str(raster)},
                "segmenter": {"name": "otsu", "params": SLOW},
                "tiling": {"chunk": [192, 192]},
                "output": {"dir": str(out), "formats": ["zarr", "cog"]},
                "cluster": {"n_workers": 2},
            }
        )
    )
    return path


def _done(out: Path) -> int:
    return len(CompletionLog(out / ".segpipe", "segment").done())


def _wait_until(predicate, timeout: float = 240) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def clean(client, raster, tmp_path_factory) -> np.ndarray:
    result = run(
        client,
        raster,
        tmp_path_factory.mktemp("clean") / "out",
        "otsu",
        SLOW,
        chunk=[192, 192],
        formats=["zarr", "cog"],
    )
    with rasterio.open(result.outputs["cog"]) as ds:
        return ds.read(1)


def _cog(out: Path) -> np.ndarray:
    with rasterio.open(out / "labels.tif") as ds:
        return ds.read(1)


@pytest.mark.slow
def test_killed_run_resumes_only_missing_chunks(raster, clean, tmp_path) -> None:
    out = tmp_path / "out"
    job = _job_file(tmp_path, raster, out)
    proc = subprocess.Popen(
        [str(BIN / "segpipe"), "run", str(job)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_until(lambda: _done(out) >= 100)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its local cluster die together
    proc.wait()
    done = _done(out)
    assert 0 < done < 256 and not (out / "summary.json").exists()
    rerun = subprocess.run(
        [str(BIN / "segpipe"), "run", str(job)], capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiling"]["computed"] == 256 - done and summary["tiling"]["skipped"] == done
    assert np.array_equal(_cog(out), clean)


@pytest.mark.slow
def test_worker_sigkilled_half_way_job_completes_identically(raster, clean, tmp_path) -> None:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        _spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            tmp_path / "s.log",
            env,
        )
    ]
    time.sleep(1.0)
    procs += [
        _spawn(
            [
                "worker",
                address,
                "--nthreads",
                "1",
                "--memory-limit",
                "2GiB",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            ],
            tmp_path / f"w{i}.log",
            env,
        )
        for i in range(2)
    ]
    try:
        _wait_for_workers(address, 2)
        out = tmp_path / "out"
        job = _job_file(tmp_path, raster, out)
        proc = subprocess.Popen(
            [str(BIN / "segpipe"), "run", str(job), "--scheduler", address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_until(lambda: _done(out) >= 100)
        victim = psutil.Process(procs[1].pid).children(recursive=True)[0]  # the nanny's worker
        victim.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE

        assert np.array_equal(_cog(out), clean)
        assert json.loads((out / "summary.json").read_text())["status"] == "complete"
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_chunk_that_always_fails_is_quarantined(client, tmp_path) -> None:
    ids = np.zeros((256, 256), dtype=np.int16)
    ids[10:40, 10:40], ids[150:200, 30:90], ids[100:120, 200:250] = 1, 2, 3
    ids[200, 200] = -5  # a broken label: chunk 1_1 (rows 128:256, cols 128:256) always raises
    path = write_raster(
        tmp_path / "ids.tif",
        (256, 256),
        dtype="int16",
        fill=lambda r, c, h, w: ids[None, r : r + h, c : c + w],
    )
    out = tmp_path / "out"
    with pytest.raises(ChunkFailedError, match=r"chunk 1_1: .*negative ids") as info:
        run(client, path, out, "label_map", {}, chunk=[128, 128], formats=["zarr", "cog"])
    assert "quarantined" in str(info.value) and "failed.json" in str(info.value)
    failed = json.loads((out / "failed.json").read_text())
    assert list(failed["failed_chunks"]) == ["1_1"]
    assert (
        "negative ids"
        in failed["failed_chunks"]["1_1"]["traceback"] + failed["failed_chunks"]["1_1"]["error"]
    )
    labels = labels_of_staging(out)
    assert set(np.unique(labels[:128, :128])) == {0, 1} and set(np.unique(labels[128:, :128])) == {0, 2}
    assert not (out / "summary.json").exists() and not (out / "labels.tif").exists()


def labels_of_staging(out: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(store=str(out / "staging.zarr" / "labels"), mode="r")[...])
