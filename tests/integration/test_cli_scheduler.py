"""Acceptance (spine 4): `segpipe run --scheduler` on a real `dask scheduler` + 2 `dask worker`s."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from pipeline.cluster.connect import PRELOAD
from tests.helpers import run

BIN = Path(sys.executable).parent
JOB = Path(__file__).resolve().parents[2] / "jobs" / "flood_water_otsu.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_workers(address: str, n: int, timeout: float = 60) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as c:
        c.wait_for_workers(n, timeout=timeout)


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(BIN / "dask"), *args], stdout=fh, stderr=subprocess.STDOUT, env=env)


@contextmanager
def cli_cluster(logs: Path, workers: dict[str, list[str]], memory_limit: str = "1GiB") -> Iterator[str]:
    """`dask scheduler` and one `dask worker` per name (with its extra options) on 127.0.0.1."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        _spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", "--preload", PRELOAD],
            logs / "s.log",
            env,
        )
    ]
    time.sleep(1.0)
    common = ["--nthreads", "1", "--nworkers", "1", "--memory-limit", memory_limit, "--preload", PRELOAD]
    for name, extra in workers.items():
        args = ["worker", address, *common, "--host", "127.0.0.1", "--no-dashboard", "--name", name, *extra]
        procs.append(_spawn(args, logs / f"{name}.log", env))
    try:
        _wait_for_workers(address, len(workers))
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def dask_cli_cluster(tmp_path_factory) -> Iterator[str]:
    with cli_cluster(tmp_path_factory.mktemp("dask-logs"), {"w0": [], "w1": []}) as address:
        yield address


def test_run_with_scheduler_equals_local_cluster_run(dask_cli_cluster, client, data, tmp_path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            str(BIN / "segpipe"),
            "run",
            str(JOB),
            "--scheduler",
            dask_cli_cluster,
            "--set",
            f"output.dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"complete -> {out}" in proc.stdout
    local = run(
        client,
        data / "geo" / "Spain_7370579_S2Hand.tif",
        tmp_path / "local",
        "otsu",
        {"band": "B8", "foreground": "below", "class_name": "water"},
        chunk=[192, 160],
        formats=["cog"],
    )
    with rasterio.open(out / "labels.tif") as a, rasterio.open(local.outputs["cog"]) as b:
        assert np.array_equal(a.read(1), b.read(1))
        assert a.crs == b.crs and a.transform == b.transform
    # the chunk tasks ran on the CLI-started workers, not in the client process
    workers = set(pd.read_parquet(out / "tiles.parquet")["worker"])
    assert len(workers) >= 1 and all(str(os.getpid()) not in w for w in workers)


def test_unreachable_scheduler_is_a_clear_error(tmp_path) -> None:
    proc = subprocess.run(
        [
            str(BIN / "segpipe"),
            "run",
            str(JOB),
            "--scheduler",
            f"tcp://127.0.0.1:{_free_port()}",
            "--set",
            f"output.dir={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cannot reach the Dask scheduler" in proc.stderr and "dask scheduler" in proc.stderr
    assert not (tmp_path / "o" / "summary.json").exists()


def test_segmenters_and_validate_commands() -> None:
    proc = subprocess.run(
        [str(BIN / "segpipe"), "segmenters", "--json"], capture_output=True, text=True, check=True
    )
    listed = {s["name"]: s for s in json.loads(proc.stdout)}
    assert {"otsu", "threshold"} <= set(listed)
    assert "smooth_sigma" in listed["otsu"]["params"] and listed["otsu"]["kind"] == "semantic"
    assert "smooth_sigma" in listed["otsu"]["halo"]
    jobs = sorted(str(p) for p in JOB.parent.glob("*.yaml"))
    proc = subprocess.run([str(BIN / "segpipe"), "validate", *jobs], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": ok (") == len(jobs)
