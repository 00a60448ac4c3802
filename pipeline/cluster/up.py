"""``segpipe cluster up``: a local scheduler and workers that notebooks and jobs connect to.

CPU workers (one thread each), plus one worker per GPU with the resource ``GPU=1`` and
``CUDA_VISIBLE_DEVICES`` set to its device. It runs until interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from distributed import Nanny, Scheduler, SpecCluster

from pipeline.cluster.connect import PRELOAD, WORKER_ENV


def gpu_count() -> int:
    """CUDA devices visible to this process (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def worker_specs(n_workers: int, gpus: int, memory_limit: str) -> dict[str, dict[str, Any]]:
    """SpecCluster worker specs: CPU workers, then one ``GPU=1`` worker per device."""
    base = {"nthreads": 1, "memory_limit": memory_limit, "host": "127.0.0.1", "preload": [PRELOAD]}
    specs = {
        f"cpu-{i}": {"cls": Nanny, "options": {**base, "env": dict(WORKER_ENV)}} for i in range(n_workers)
    }
    for device in range(gpus):
        env = {**WORKER_ENV, "CUDA_VISIBLE_DEVICES": str(device)}
        specs[f"gpu-{device}"] = {"cls": Nanny, "options": {**base, "env": env, "resources": {"GPU": 1}}}
    return specs


def serve(
    *,
    n_workers: int,
    port: int,
    memory_limit: str,
    announce: Callable[[str], None],
    stop_after: float | None = None,
) -> None:
    """Start the cluster, announce its address, and wait (until Ctrl-C or ``stop_after`` s)."""
    gpus = gpu_count()
    options = {"host": "127.0.0.1", "port": port, "dashboard_address": ":0", "preload": [PRELOAD]}
    scheduler = {"cls": Scheduler, "options": options}
    cluster = SpecCluster(workers=worker_specs(n_workers, gpus, memory_limit), scheduler=scheduler)
    try:
        announce(
            f"scheduler: {cluster.scheduler_address}  dashboard: {cluster.dashboard_link}  "
            f"workers: {n_workers} CPU + {gpus} GPU (resource GPU=1)"
        )
        t0 = time.monotonic()
        while stop_after is None or time.monotonic() - t0 < stop_after:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
