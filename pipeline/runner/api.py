"""Python entry points: run job specs on a local cluster or an existing scheduler."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from distributed import Client

import pipeline.models.classical  # registers the classical segmenters
import pipeline.models.torch.segmenter  # noqa: F401  (registers unet; torch is imported lazily)
from pipeline.cluster import connect
from pipeline.cluster.profiles import ClusterProfile, load_profile
from pipeline.runner.execute import RunResult, check_output, execute
from pipeline.runner.plan import make_plan
from pipeline.runner.spec import JobSpec


def run_job(
    spec: JobSpec, *, client: Client | None = None, scheduler: str | None = None, restart: bool = False
) -> RunResult:
    """Plan and run one job; with no ``client`` a cluster is started (or ``scheduler`` used)."""
    return next(run_jobs([spec], client=client, scheduler=scheduler, restart=restart))


def _profile(spec: JobSpec, path: str | None) -> ClusterProfile | None:
    chosen = path or spec.cluster.profile
    return load_profile(chosen) if chosen else None


def run_jobs(
    specs: Sequence[JobSpec],
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    restart: bool = False,
    announce: Callable[[str], None] | None = None,
    profile: str | None = None,
) -> Iterator[RunResult]:
    """Plan every job first (so bad input fails before any cluster starts), then run them."""
    plans = [make_plan(s) for s in specs]
    for plan in plans:
        check_output(plan, restart=restart)
    if client is not None:
        for plan in plans:
            yield execute(plan, client, restart=restart)
        return
    c = specs[0].cluster
    with connect(
        scheduler=scheduler or c.scheduler,
        n_workers=c.n_workers,
        threads_per_worker=c.threads_per_worker,
        memory_limit=c.memory_limit,
        dashboard=c.dashboard,
        profile=_profile(specs[0], profile),
    ) as own:
        if announce is not None and own.dashboard_link:
            announce(own.dashboard_link)
        for plan in plans:
            yield execute(plan, own, restart=restart)


def run_scheduled_job(
    spec: JobSpec, *, client: Client | None = None, scheduler: str | None = None, profile: str | None = None
) -> dict[str, Any]:
    """Run a multi-scene job (``input.path`` is a glob): new or changed scenes only, with a ledger."""
    from pipeline.runner.schedule import run_scheduled

    def go(c: Client) -> dict[str, Any]:
        return run_scheduled(spec, lambda plan: execute(plan, c).outputs, make_plan)

    if client is not None:
        return go(client)
    cs = spec.cluster
    with connect(
        scheduler=scheduler or cs.scheduler,
        n_workers=cs.n_workers,
        threads_per_worker=cs.threads_per_worker,
        memory_limit=cs.memory_limit,
        dashboard=cs.dashboard,
        profile=_profile(spec, profile),
    ) as own:
        return go(own)
