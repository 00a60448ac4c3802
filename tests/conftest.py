"""Shared fixtures: one Dask cluster of processes per test session, the shared data, paths."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEGPIPE_DATA", REPO.parent / "shared" / "data"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="also run tests marked slow (as CI does)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            no_device = pytest.mark.skip(reason="gpu: no CUDA device on this machine (runs where one exists)")
            for item in gpu_items:
                item.add_marker(no_device)
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="slow: runs with --full (the README test command and CI)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data() -> Path:
    """The shared real data folder (../shared/data); its absence is an error, not a skip."""
    if not (DATA / "README.md").exists():
        pytest.fail(f"shared data not found at {DATA}; clone next to shared/ or set SEGPIPE_DATA")
    return DATA


def _local_cluster(memory_limit: str) -> Iterator[object]:
    """A client of a local cluster of 2 worker processes with 1 thread each, on 127.0.0.1."""
    from distributed import Client, LocalCluster

    from pipeline.cluster.connect import PRELOAD, WORKER_ENV

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        env=WORKER_ENV,
        preload=[PRELOAD],
        dashboard_address=":0",
        host="127.0.0.1",
    )
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="session")
def client() -> Iterator[object]:
    """One local cluster for the whole session: 2 worker processes, 1 thread, 1 GiB each."""
    yield from _local_cluster("1GiB")


@pytest.fixture(scope="session")
def torch_client() -> Iterator[object]:
    """One cluster for the session's learned-model jobs: 2 processes, 1 thread, 2 GiB each.

    Importing torch (the CUDA build) costs a worker process about 500 MiB of RSS, so torch jobs
    get their own workers with the 2 GiB a local cluster gives by default; the 1 GiB workers of
    ``client`` stay torch-free for the memory tests.
    """
    yield from _local_cluster("2GiB")
