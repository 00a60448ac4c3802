"""dask-jobqueue (SLURM, PBS) and Kubernetes clusters built from a profile.

Building them submits nothing: a jobqueue cluster starts its scheduler here and writes job
scripts; jobs are submitted only when it is scaled. A Kubernetes profile becomes the
DaskCluster resource specification that dask-kubernetes' operator deploys.
"""

from __future__ import annotations

from typing import Any

from pipeline.cluster.profiles import JobqueueSpec, KubernetesSpec
from pipeline.errors import ConfigError

THREAD_ENV = ["export OMP_NUM_THREADS=1", "export MKL_NUM_THREADS=1", "export OPENBLAS_NUM_THREADS=1"]


def jobqueue_cluster(spec: JobqueueSpec) -> Any:
    """A ``SLURMCluster`` or ``PBSCluster``: ``cores`` single-threaded workers per job."""
    try:
        from dask_jobqueue import PBSCluster, SLURMCluster
    except ImportError as e:
        raise ConfigError("kind: jobqueue needs dask-jobqueue: pip install 'segpipe[clusters]'") from e
    cls = SLURMCluster if spec.system == "slurm" else PBSCluster
    gpus = spec.gpus_per_job
    processes = gpus or spec.cores
    extra = ["--resources", "GPU=1"] if gpus else []
    directives = list(spec.job_extra_directives)
    if gpus:
        directives.append(f"--gres=gpu:{gpus}" if spec.system == "slurm" else f"-l ngpus={gpus}")
    return cls(
        cores=spec.cores,
        processes=processes,
        memory=spec.memory,
        queue=spec.queue,
        account=spec.account,
        walltime=spec.walltime,
        job_script_prologue=THREAD_ENV,
        worker_extra_args=extra,
        job_extra_directives=directives,
        scheduler_options={"dashboard_address": ":0"},
        interface=spec.interface,
    )


def kubernetes_spec(spec: KubernetesSpec) -> dict[str, Any]:
    """The DaskCluster resource for the dask-kubernetes operator (single-threaded workers)."""
    try:
        from dask_kubernetes.operator import make_cluster_spec
    except ImportError as e:
        raise ConfigError("kind: kubernetes needs dask-kubernetes: pip install 'segpipe[clusters]'") from e
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": spec.cpu, "memory": spec.memory},
        "limits": {"cpu": spec.cpu, "memory": spec.memory},
    }
    if spec.gpus_per_worker:
        resources["limits"]["nvidia.com/gpu"] = str(spec.gpus_per_worker)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cluster = make_cluster_spec(
        name=spec.name, image=spec.image, n_workers=spec.n_workers, resources=resources, env=env
    )
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    worker["args"] = [*worker.get("args", []), "--nthreads", "1"]
    if spec.gpus_per_worker:
        worker["args"] += ["--resources", f"GPU={spec.gpus_per_worker}"]
    return dict(cluster)
