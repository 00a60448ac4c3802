"""``connect(...) -> Client``: a local cluster of worker processes, or an existing scheduler."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
#: One math thread per worker process: torch/BLAS threads in several workers on the same cores
#: oversubscribe them and starve the Dask heartbeat.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "GDAL_CACHEMAX": "64",
}


@contextmanager
def connect(
    *,
    scheduler: str | None = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    memory_limit: str = "2GiB",
    dashboard: bool = True,
) -> Iterator[Client]:
    """Yield a client: to ``scheduler`` when given, else to a fresh local cluster of processes."""
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as e:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {scheduler!r} ({e}); start one "
                "with `dask scheduler` or drop --scheduler to use a local cluster"
            ) from e
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        memory_limit=memory_limit,
        env=WORKER_ENV,
        dashboard_address=":0" if dashboard else None,
        host="127.0.0.1",
    )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
