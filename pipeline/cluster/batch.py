"""dask-jobqueue (SLURM, PBS) and Kubernetes clusters built from a profile.

Building them submits nothing: a jobqueue cluster starts its scheduler here and writes job
scripts; jobs are submitted only when it is scaled. A Kubernetes profile becomes the
DaskCluster resource specification that dask-kubernetes' operator deploys.
"""

from __future__ import annotations

from typing import Any

from pipeline.cluster.connect import PRELOAD
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
    extra = ["--preload", PRELOAD, *(["--resources", "GPU=1"] if gpus else [])]
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
    """The DaskCluster resource (``kubernetes.dask.org/v1``) for the dask-kubernetes operator.

    Built here as plain data, so a profile can be checked and printed without a Kubernetes
    client; running it needs ``pip install 'segpipe[clusters]'`` and the operator in the cluster.
    """
    limits = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus_per_worker:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_worker)
    env = [{"name": k, "value": "1"} for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")]
    worker_args = [
        "dask-worker",
        "--name",
        "$(DASK_WORKER_NAME)",
        "--nthreads",
        "1",
        "--preload",
        PRELOAD,
        "--dashboard",
        "--dashboard-address",
        "8788",
    ]
    if spec.gpus_per_worker:
        worker_args += ["--resources", f"GPU={spec.gpus_per_worker}"]
    health = {"httpGet": {"port": "http-dashboard", "path": "/health"}}
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": spec.name},
        "spec": {
            "idleTimeout": 0,
            "worker": {
                "replicas": spec.n_workers,
                "spec": {
                    "containers": [
                        {
                            "name": "worker",
                            "image": spec.image,
                            "args": worker_args,
                            "env": env,
                            "resources": {
                                "requests": {"cpu": spec.cpu, "memory": spec.memory},
                                "limits": limits,
                            },
                            "ports": [{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}],
                        }
                    ]
                },
            },
            "scheduler": {
                "spec": {
                    "containers": [
                        {
                            "name": "scheduler",
                            "image": spec.image,
                            "args": ["dask-scheduler", "--host", "0.0.0.0", "--preload", PRELOAD],
                            "env": env,
                            "ports": [
                                {"name": "tcp-comm", "containerPort": 8786, "protocol": "TCP"},
                                {"name": "http-dashboard", "containerPort": 8787, "protocol": "TCP"},
                            ],
                            "readinessProbe": {**health, "initialDelaySeconds": 0, "periodSeconds": 1},
                            "livenessProbe": {**health, "initialDelaySeconds": 15, "periodSeconds": 20},
                        }
                    ]
                },
                "service": {
                    "type": "ClusterIP",
                    "selector": {"dask.org/cluster-name": spec.name, "dask.org/component": "scheduler"},
                    "ports": [
                        {"name": "tcp-comm", "protocol": "TCP", "port": 8786, "targetPort": "tcp-comm"},
                        {
                            "name": "http-dashboard",
                            "protocol": "TCP",
                            "port": 8787,
                            "targetPort": "http-dashboard",
                        },
                    ],
                },
            },
        },
    }
