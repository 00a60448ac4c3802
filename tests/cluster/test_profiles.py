from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cluster.profiles import load_profile
from pipeline.cluster.up import worker_specs
from pipeline.errors import ConfigError, ReadError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "clusters"


def test_shipped_profiles_load_and_resolve_certificate_paths() -> None:
    assert load_profile(CONFIGS / "local.yaml").kind == "local"
    assert load_profile(CONFIGS / "address.yaml").address == "tcp://127.0.0.1:8786"
    tls = load_profile(CONFIGS / "tls.yaml").tls
    assert tls is not None and tls.ca_file == str((CONFIGS / "certs" / "ca.pem").resolve())


def test_bad_profiles_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ReadError, match="not found"):
        load_profile(tmp_path / "missing.yaml")
    (tmp_path / "p.yaml").write_text("kind: address\n")
    with pytest.raises(ConfigError, match="needs address"):
        load_profile(tmp_path / "p.yaml")
    (tmp_path / "q.yaml").write_text("kind: local\nworkers: 3\n")
    with pytest.raises(ConfigError, match="workers"):
        load_profile(tmp_path / "q.yaml")


def test_one_gpu_worker_per_device_with_the_gpu_resource() -> None:
    specs = worker_specs(2, 2, "4GiB")
    assert sorted(specs) == ["cpu-0", "cpu-1", "gpu-0", "gpu-1"]
    assert specs["gpu-1"]["options"]["resources"] == {"GPU": 1}
    assert specs["gpu-1"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert "resources" not in specs["cpu-0"]["options"]
    assert specs["cpu-0"]["options"]["env"]["OMP_NUM_THREADS"] == "1"


def test_slurm_profile_builds_a_jobqueue_cluster_without_submitting() -> None:
    from pipeline.cluster.batch import jobqueue_cluster

    profile = load_profile(CONFIGS / "slurm.yaml")
    assert profile.jobqueue is not None
    cluster = jobqueue_cluster(profile.jobqueue)
    try:
        script = cluster.job_script()
        assert "#SBATCH -p normal" in script and "#SBATCH -t 04:00:00" in script
        assert "--nworkers 8" in script and "--nthreads 1" in script  # 8 single-threaded workers
        assert "export OMP_NUM_THREADS=1" in script
        assert len(cluster.workers) == 0  # nothing submitted until scaled
    finally:
        cluster.close()


def test_gpu_and_pbs_jobqueue_profiles() -> None:
    from pipeline.cluster.batch import jobqueue_cluster

    gpu = load_profile(CONFIGS / "slurm-gpu.yaml").jobqueue
    pbs = load_profile(CONFIGS / "pbs.yaml").jobqueue
    assert gpu is not None and pbs is not None
    for spec, needles in (
        (gpu, ["--gres=gpu:4", "--resources GPU=1", "--nworkers 4", "--preload pipeline.runner.preload"]),
        (pbs, ["#PBS -q workq", "--nworkers 8", "--preload pipeline.runner.preload"]),
    ):
        cluster = jobqueue_cluster(spec)
        try:
            script = cluster.job_script()
            assert all(n in script for n in needles), script
        finally:
            cluster.close()


def test_kubernetes_profile_builds_the_daskcluster_resource() -> None:
    from pipeline.cluster.batch import kubernetes_spec

    profile = load_profile(CONFIGS / "kubernetes.yaml")
    assert profile.kubernetes is not None
    spec = kubernetes_spec(profile.kubernetes.model_copy(update={"gpus_per_worker": 1}))
    assert spec["kind"] == "DaskCluster" and spec["metadata"]["name"] == "segpipe"
    worker = spec["spec"]["worker"]
    container = worker["spec"]["containers"][0]
    assert worker["replicas"] == 8 and container["image"] == "registry.example.org/segpipe:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--nthreads" in container["args"] and "GPU=1" in container["args"]
    assert container["args"][container["args"].index("--preload") + 1] == "pipeline.runner.preload"
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]["args"]
    assert scheduler[scheduler.index("--preload") + 1] == "pipeline.runner.preload"
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in container["env"]


def test_local_cluster_workers_import_the_task_modules_at_start() -> None:
    """A fresh local cluster's workers have run the preload before any task: a job's first
    chunk does not pay the ~2 s of imports inside its first stage."""

    from pipeline.cluster import connect
    from pipeline.runner.preload import MODULES

    def loaded() -> list[str]:
        return [m for m in ("pipeline.runner.preload", *MODULES) if m in sys.modules]

    def malloc_tuned() -> bool:
        from pipeline.runner import preload

        return preload.MALLOC_TUNED

    with connect(n_workers=1, dashboard=False) as client:
        assert list(client.run(loaded).values()) == [["pipeline.runner.preload", *MODULES]]
        assert list(client.run(malloc_tuned).values()) == [sys.platform == "linux"]


FAULTS = """
import resource, sys
import numpy as np
from pipeline.runner.memory import reuse_arrays
if sys.argv[1] in ("reuse", "back"):
    assert reuse_arrays(True)
if sys.argv[1] == "back":  # what a chunk of a torch segmenter sets
    assert reuse_arrays(False)
np.ones(2**20)  # one 8 MiB float64 array, as a 1024^2 chunk's smoothed band
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc: the workers' platform")
def test_workers_reuse_freed_arrays_under_the_nannys_trim_threshold() -> None:
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc map and
    zero-fill every array over 128 KiB afresh (8 MiB: 2048 page faults, or 4 to 2048 with
    transparent huge pages); after the preload's ``reuse_arrays`` a freed array's memory is
    reused (measured here: 10321 faults for 20 arrays, and 0), and a torch chunk's
    ``reuse_arrays(False)`` goes back to the nanny's behaviour."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}

    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, check=True
        )
        return int(done.stdout)

    nanny = faults("nanny")
    assert nanny >= 20 * 4  # every array faults its pages in again
    assert faults("reuse") <= nanny / 20  # at most one array's worth, however many are made
    assert faults("back") >= 20 * 4  # every array faults its pages in again (huge pages or not)
