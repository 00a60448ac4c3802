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


@pytest.fixture(scope="session")
def client() -> Iterator[object]:
    """One local cluster for the whole session: 2 worker processes, 1 thread, 1 GiB each."""
    from distributed import Client, LocalCluster

    from pipeline.cluster.connect import WORKER_ENV

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit="1GiB",
        env=WORKER_ENV,
        dashboard_address=":0",
        host="127.0.0.1",
    )
    with Client(cluster) as c:
        yield c
    cluster.close()
