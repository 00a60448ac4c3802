"""``connect(...) -> Client``: a local cluster of worker processes, or an existing scheduler."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distributed import Client, LocalCluster
from distributed.security import Security

from pipeline.cluster.profiles import ClusterProfile, TLSFiles
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
#: The module each worker imports when it starts (:mod:`pipeline.runner.preload`; named, not
#: imported, here: the cluster layer sits below the runner).
PRELOAD = "pipeline.runner.preload"


def security(tls: TLSFiles | None) -> Security | None:
    """A ``distributed.Security`` requiring encryption, from PEM files; ``None`` without TLS."""
    if tls is None:
        return None
    for name, path in tls.model_dump().items():
        if not Path(path).is_file():
            raise ConfigError(f"tls.{name} {path!r} does not exist; point it at a PEM file")
    return Security(
        tls_ca_file=tls.ca_file,
        tls_client_cert=tls.cert_file,
        tls_client_key=tls.key_file,
        require_encryption=True,
    )


@contextmanager
def _batch_client(profile: ClusterProfile) -> Iterator[Client]:
    """A client on a jobqueue or Kubernetes cluster built from ``profile`` (closed afterwards)."""
    from pipeline.cluster.batch import jobqueue_cluster, kubernetes_spec

    if profile.kind == "jobqueue" and profile.jobqueue is not None:
        cluster = jobqueue_cluster(profile.jobqueue)
        cluster.scale(jobs=profile.jobqueue.jobs)
    else:
        from dask_kubernetes.operator import KubeCluster

        assert profile.kubernetes is not None  # checked by load_profile
        cluster = KubeCluster(custom_cluster_spec=kubernetes_spec(profile.kubernetes))
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


@contextmanager
def connect(
    *,
    scheduler: str | None = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    memory_limit: str = "2GiB",
    dashboard: bool = True,
    profile: ClusterProfile | None = None,
) -> Iterator[Client]:
    """Yield a client: to ``scheduler`` (or the profile's address), else to a local cluster."""
    if profile is not None:
        scheduler = scheduler or profile.address
        n_workers, threads_per_worker = profile.n_workers, profile.threads_per_worker
        memory_limit = profile.memory_limit
    sec = security(profile.tls) if profile is not None else None
    if profile is not None and profile.kind in ("jobqueue", "kubernetes") and not scheduler:
        with _batch_client(profile) as client:
            yield client
        return
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s", security=sec)
        except (OSError, TimeoutError, TypeError, ValueError) as e:  # TypeError: tls:// without certificates
            raise ConfigError(
                f"cannot reach the Dask scheduler at {scheduler!r} ({e}); start one with `dask scheduler` "
                "(with its --tls-* options for tls://), check the profile's certificates, or drop "
                "--scheduler to use a local cluster"
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
        preload=[PRELOAD],
        scheduler_kwargs={"preload": [PRELOAD]},  # the scheduler unpickles tasks too
        dashboard_address=":0",  # a free port; None would still try 8787
        host="127.0.0.1",
    )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
