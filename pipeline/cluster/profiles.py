"""Cluster profiles (``configs/clusters/*.yaml``): where and how a job's Dask cluster runs.

A profile names a ``kind``: ``local`` (a cluster of worker processes started for the job),
``address`` (an existing scheduler, ``tcp://`` or ``tls://``), ``jobqueue`` (SLURM or PBS jobs
through dask-jobqueue) or ``kubernetes`` (a DaskCluster resource through dask-kubernetes'
operator), with optional TLS certificates. Certificates are file paths; keys never live in
profiles or job files. Every worker runs one thread per process; GPU workers carry ``GPU=1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError, ReadError


class TLSFiles(BaseModel):
    """PEM files for ``distributed.Security`` (mutual TLS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ca_file: str
    cert_file: str
    key_file: str


class JobqueueSpec(BaseModel):
    """Batch jobs, each running ``cores`` single-threaded worker processes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    system: Literal["slurm", "pbs"] = "slurm"
    cores: int = Field(4, ge=1)
    memory: str = "16GB"
    queue: str | None = None
    account: str | None = None
    walltime: str = "02:00:00"
    jobs: int = Field(1, ge=1)
    gpus_per_job: int = Field(0, ge=0, description="GPU jobs: one worker per GPU, resource GPU=1")
    job_extra_directives: list[str] = Field(default_factory=list)
    interface: str | None = Field(None, description="network interface the workers reach the scheduler on")


class KubernetesSpec(BaseModel):
    """A DaskCluster custom resource (dask-kubernetes operator)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "segpipe"
    image: str = Field(description="an image with segpipe installed (built by you; nothing is pulled here)")
    n_workers: int = Field(2, ge=1)
    cpu: str = "1"
    memory: str = "4Gi"
    gpus_per_worker: int = Field(0, ge=0)


class ClusterProfile(BaseModel):
    """One cluster profile."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["local", "address", "jobqueue", "kubernetes"] = "local"
    address: str | None = Field(None, description="scheduler address for kind: address")
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "2GiB"
    tls: TLSFiles | None = None
    jobqueue: JobqueueSpec | None = None
    kubernetes: KubernetesSpec | None = None


def load_profile(path: str | Path) -> ClusterProfile:
    """Read a profile file; relative certificate paths resolve against its folder."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ReadError(f"{p}: cluster profile not found; see configs/clusters/ for examples") from None
    try:
        profile = ClusterProfile.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{p}: invalid cluster profile: {problems}") from None
    if profile.kind == "address" and not profile.address:
        raise ConfigError(f"{p}: kind: address needs address: tcp://host:8786 (or tls://...)")
    for kind in ("jobqueue", "kubernetes"):
        if profile.kind == kind and getattr(profile, kind) is None:
            raise ConfigError(f"{p}: kind: {kind} needs a '{kind}:' section (see configs/clusters/)")
    if profile.tls is not None:
        files = {k: str((p.parent / v).resolve()) for k, v in profile.tls.model_dump().items()}
        profile = profile.model_copy(update={"tls": TLSFiles(**files)})
    return profile
