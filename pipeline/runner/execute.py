"""Run a planned job on a Dask client: ingest, fit, segment, finalize.

Chunk stages run in waves (:func:`run_waves`): small chunks are batched into tasks of about
``TASK_PIXELS`` pixels, and at most ``IN_FLIGHT_PER_THREAD`` tasks per worker thread are
submitted at a time, so the client and scheduler hold a bounded number of futures for a job of
any size. Tasks are keyed by stage and first chunk id; completed chunks (by their records) are
skipped on a rerun with the same fingerprint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, Future, as_completed, wait
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.errors import ChunkFailedError, OutputConflictError
from pipeline.io import zarr_store
from pipeline.models import Segmenter
from pipeline.models.base import CombineFn, PartialFn
from pipeline.runner import finalize, process, publish
from pipeline.runner.instances import run_instances
from pipeline.runner.plan import Plan

log = logging.getLogger(__name__)
FAN_IN = 8
#: Chunks per fit task: fewer tasks and one partial in memory per task (at least this many when
#: the grid is large, more for small chunks (``TASK_PIXELS``); small jobs still spread over every
#: worker).
REDUCE_BATCH = 32
#: Pixels (write boxes) a chunk task should handle: small chunks are batched, neighbours
#: together, until a task covers about this many, so the fixed cost of a task (scheduling, the
#: round trip, opening the staging arrays, a zarr call, a completion file) is paid once per
#: ~2 Mpx rather than per chunk. A task segments its chunks one after another; it reads their
#: blocks in one call and gathers their labels for one write when the union of their boxes is
#: under ``process.UNION_PIXELS``, chunk by chunk otherwise. 2 Mpx rather than 1: on
#: ``bench_scaling.py`` (1024^2 chunks) the segment stage took 5-20 % less on two workers and
#: the scheduler 20-25 % less CPU, for 128 tasks instead of 256.
TASK_PIXELS = 2**21
#: Pixels an ingest task copies. Ingest does little per pixel (a window read and a zarr write,
#: about 6 ms per Mpx), so the fixed cost of a task is most of a small task: 4 Mpx, one union
#: read of up to ``process.UNION_PIXELS``.
INGEST_TASK_PIXELS = 2**22
#: Tasks submitted per worker thread at a time (``run_waves``): enough to keep every thread
#: busy across the client's round trip, few enough that the scheduler holds O(threads) tasks
#: for a job of any number of chunks.
IN_FLIGHT_PER_THREAD = 4
#: Batches are made no larger than needed to give every worker thread this many tasks.
MIN_TASKS_PER_THREAD = 4


def _n_threads(client: Client) -> int:
    return max(1, sum(client.nthreads().values()))


@dataclass
class RunResult:
    """What a run produced: output paths, timings, counts and the fitted segmenter."""

    plan: Plan
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    chunks_computed: int = 0
    chunks_skipped: int = 0
    segmenter: Segmenter | None = None
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    instances: dict[str, Any] = field(default_factory=dict)


def check_output(plan: Plan, *, restart: bool = False) -> bool:
    """Whether the output folder can be resumed; raise if it (or the s3:// one) belongs to something else."""
    publish.check_remote(plan, restart=restart)
    job_file = plan.records / "job.json"
    if not (plan.out.exists() and any(plan.out.iterdir())):
        return False
    owner = json.loads(job_file.read_text()) if job_file.exists() else None
    if owner is None:
        raise OutputConflictError(
            f"{plan.out}: the output folder holds files that segpipe did not write; choose an "
            "empty or new folder (output.dir or --set output.dir=...)"
        )
    if owner["fingerprint"] != plan.fingerprint and not restart:
        raise OutputConflictError(
            f"{plan.out}: holds results of a different job ({owner['name']!r}, fingerprint "
            f"{owner['fingerprint']}, this job {plan.fingerprint}); results are never mixed. "
            "Use another output.dir, or rerun with --restart to discard the old results."
        )
    return not restart


def prepare_output(plan: Plan, *, restart: bool = False) -> bool:
    """Claim the output folder (and an s3:// one); return whether a previous run's records can be resumed."""
    resume = _prepare_local(plan, restart=restart)
    publish.claim_remote(plan, restart=restart)
    return resume


def _prepare_local(plan: Plan, *, restart: bool = False) -> bool:
    job_file = plan.records / "job.json"
    if check_output(plan, restart=restart):
        (plan.out / "summary.json").unlink(missing_ok=True)
        (plan.out / "failed.json").unlink(missing_ok=True)

        return True
    if plan.out.exists() and restart:
        _clear(plan.out)
    plan.records.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps({"name": plan.spec.name, "fingerprint": plan.fingerprint}))
    return False


def _clear(out: Path) -> None:
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def create_stores(plan: Plan) -> None:
    """Create the staging input and label arrays, chunked by the grid."""
    chunks = plan.grid.write_chunks()
    zarr_store.create_array(
        plan.staging / "input",
        shape=plan.source.shape,
        chunks=(plan.source.shape[0], *chunks),
        dtype=plan.source.dtype,
        geometry=plan.source.geometry,
        codec=plan.spec.tiling.staging_codec,
    )
    if plan.segmenter.kind != "semantic":
        local_dtype = "uint64" if plan.segmenter.merge == "none" else "uint32"
        zarr_store.create_array(
            plan.staging / "local",
            shape=plan.source.spatial_shape,
            chunks=chunks,
            dtype=local_dtype,
            geometry=plan.source.geometry,
        )
        if plan.segmenter.merge == "touch":
            zarr_store.create_array(
                plan.staging / "classes",
                shape=plan.source.spatial_shape,
                chunks=chunks,
                dtype="uint8",
                geometry=plan.source.geometry,
                fill_value=plan.segmenter.nodata_label,
            )
        return
    zarr_store.create_array(
        plan.staging / "labels",
        shape=plan.source.spatial_shape,
        chunks=chunks,
        dtype="uint8",
        geometry=plan.source.geometry,
        fill_value=plan.segmenter.nodata_label,
        attrs={"classes": {str(k): v for k, v in plan.segmenter.classes.items()}},
    )
    for name, bands in plan.segmenter.extra_outputs.items():
        lead = (bands,) if bands else ()
        zarr_store.create_array(
            process.extras_path(plan.staging / "labels", name),
            shape=(*lead, *plan.source.spatial_shape),
            chunks=(*lead, *chunks),
            dtype="float32",
            geometry=plan.source.geometry,
            fill_value=float("nan") if bands else -1.0,  # entropy's nodata is -1
            attrs={"classes": {str(k): v for k, v in plan.segmenter.classes.items()}} if bands else {},
        )


def execute(plan: Plan, client: Client, *, restart: bool = False) -> RunResult:
    """Run every stage of ``plan`` on ``client`` and finalize the outputs."""
    result = RunResult(plan)
    if not prepare_output(plan, restart=restart):
        create_stores(plan)
    scheduling = result.diagnostics.setdefault("scheduling", {})
    scheduling["ingest"] = _timed(result, "ingest", lambda: ingest(plan, client))
    fitted = _timed(result, "fit", lambda: fit_once(plan, client))
    result.segmenter = fitted
    if fitted.kind != "semantic":
        result.instances = _timed(
            result,
            "segment",
            lambda: run_instances(
                plan,
                client,
                fitted,
                lambda stage, items, submit, collect=False: run_each(
                    plan,
                    client,
                    stage,
                    items,
                    submit,
                    result.failures if stage == "label" else None,
                    collect=collect,
                    stats=scheduling.setdefault(stage, {}),
                ),
                _token(),
            ),
        )
        result.chunks_computed = len(plan.grid)
    else:
        scheduling["segment"] = _timed(result, "segment", lambda: segment(plan, client, fitted, result))
        result.diagnostics["seam_check"] = _timed(
            result, "seam_check", lambda: seam_check(plan, client, fitted)
        )
    if result.failures:
        raise_failures(plan, result.failures)
    run = cluster_map(client)
    _timed(result, "finalize", lambda: result.outputs.update(finalize.finalize(plan, fitted, run)))
    if plan.publish:  # s3:// output: upload from the work folder; write_summary uploads the summary last
        _timed(result, "publish", lambda: result.outputs.update(publish.upload(plan, result.outputs)))
    finalize.write_summary(
        plan,
        fitted,
        result.outputs,
        result.timings,
        {"computed": result.chunks_computed, "skipped": result.chunks_skipped},
        result.instances,
        result.diagnostics,
    )
    return result


def cluster_map(client: Client) -> Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]:
    """``map(fn, items)`` as one Dask task per item (the COG tile encoding of finalize)."""

    def run(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(client.gather(client.map(fn, list(items), pure=False)))

    return run


#: The fitted segmenter of a run, kept with its completion records (same fingerprint).
FITTED = "fitted.pkl"


def fit_once(plan: Plan, client: Client) -> Segmenter:
    """The segmenter fitted over the whole input (Otsu's threshold, k-means centres, ...), once
    per run: a rerun that resumes the job (same fingerprint) takes the one kept with the
    completion records instead of passing over the whole input again. A kept one that does not
    load (another segpipe version) is fitted again; one whose fit does nothing is not kept."""
    kept = plan.records / FITTED
    if kept.exists():
        try:
            segmenter = pickle.loads(kept.read_bytes())
            if isinstance(segmenter, type(plan.segmenter)):
                return segmenter
        except Exception as e:  # any unpickling failure means: fit again
            log.info("fitting again: %s did not load (%s)", kept, e)
    fitted = plan.segmenter.fit(make_reducer(plan, client))
    if fitted is plan.segmenter:  # nothing fitted (a fixed threshold, a trained network): nothing to keep
        return fitted
    try:
        data = pickle.dumps(fitted)
    except (pickle.PicklingError, TypeError, AttributeError) as e:  # not kept: a rerun fits again
        log.info("the fitted segmenter is not kept for resume (%s)", e)
        return fitted
    tmp = kept.with_name(f".tmp-{kept.name}")
    tmp.write_bytes(data)
    os.replace(tmp, kept)
    return fitted


def _timed(result: RunResult, stage: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    value = fn()
    result.timings[stage] = round(time.perf_counter() - t0, 4)
    return value


def ingest(plan: Plan, client: Client) -> dict[str, Any]:
    """Stream the source into the staging input, one read unit (a block of chunks, a slab or the
    file) per task, in waves; return the scheduling figures (:func:`run_waves`)."""
    log = zarr_store.CompletionLog(plan.records, "ingest")
    todo = plan.grid.todo(plan.grid.done_mask(log.done()))
    target, grid, records = plan.staging / "input", plan.grid, plan.records
    groups = ingest_groups(plan, todo, chunks_per_task(plan, client, len(todo), INGEST_TASK_PIXELS))

    def submit(group: np.ndarray, key: str) -> Future:
        return client.submit(
            process.ingest_group,
            plan.source,
            target,
            grid,
            group,
            records,
            key=key,
            retries=plan.spec.retries,
        )

    # A slab or a whole compressed file is read for any chunk of it: a failed group is not split.
    return run_waves(plan, client, "ingest", groups, submit, split=plan.source.read_unit == "region")


def ingest_groups(plan: Plan, todo: np.ndarray, per_task: int) -> list[np.ndarray]:
    """Chunks read together: blocks of neighbouring chunks (``region``: their union is one read),
    per z index (``slab``: DICOM slices are read whole), or all (``whole``: compressed volumes)."""
    if len(todo) == 0:
        return []
    unit = plan.source.read_unit
    if unit == "whole":
        return [todo]
    if unit == "slab":
        cuts = np.flatnonzero(todo[1:, 0] != todo[:-1, 0]) + 1  # todo is in grid order
        return np.split(todo, cuts)
    return plan.grid.groups(todo, per_task)


def chunks_per_task(plan: Plan, client: Client, n_chunks: int, pixels: int | None = None) -> int:
    """Chunks one task handles: enough for ``pixels`` (default ``TASK_PIXELS``), but no fewer
    than ``MIN_TASKS_PER_THREAD`` tasks per worker thread (load balance); 1 for chunks of
    ``pixels`` and up."""
    by_size = max(1, (pixels or TASK_PIXELS) // math.prod(plan.grid.chunk))
    spread = max(1, -(-n_chunks // (MIN_TASKS_PER_THREAD * _n_threads(client))))
    return min(by_size, spread)


def make_reducer(plan: Plan, client: Client) -> Callable[[PartialFn, CombineFn], Any]:
    """A reducer mapping a partial statistic over every chunk and combining it as a tree.

    Leaf tasks take batches of neighbouring chunks (at least ``REDUCE_BATCH``, more when chunks
    are small); the tree is built over segments of ``FAN_IN**3`` leaves submitted one after
    another (at most two segments in flight), so the scheduler holds a bounded number of tasks
    and the combination order depends only on the grid, never on completion order.
    """
    staged, edge, nodata = plan.staging / "input", plan.grid.edge_mode, plan.source.geometry
    nd, grid = getattr(nodata, "nodata", None), plan.grid
    todo = grid.todo()
    spread = max(1, -(-len(todo) // (MIN_TASKS_PER_THREAD * _n_threads(client))))
    size = min(spread, max(REDUCE_BATCH, TASK_PIXELS // math.prod(grid.chunk)))
    batches = grid.groups(todo, size)
    segment = FAN_IN**3

    def tree(parts: list[Future], combine: CombineFn) -> Future:
        while len(parts) > 1:
            parts = [
                client.submit(process.combine_many, combine, *parts[i : i + FAN_IN], pure=False)
                for i in range(0, len(parts), FAN_IN)
            ]
        return parts[0]

    def reduce(partial: PartialFn, combine: CombineFn) -> Any:
        finished: list[Future] = []
        live: deque[Future] = deque()
        for i in range(0, len(batches), segment):
            leaves = [
                client.submit(process.reduce_chunks, staged, grid, b, edge, nd, partial, combine, pure=False)
                for b in batches[i : i + segment]
            ]
            live.append(tree(leaves, combine))
            if len(live) >= 2:
                wait(live[0])
                finished.append(live.popleft())
        return tree([*finished, *live], combine).result()

    return reduce


def segment(plan: Plan, client: Client, segmenter: Segmenter, result: RunResult) -> dict[str, Any]:
    """Segment every chunk not yet recorded as complete, in waves of batched tasks."""
    log = zarr_store.CompletionLog(plan.records, "segment")
    todo = plan.grid.todo(plan.grid.done_mask(log.done()))
    result.chunks_skipped = len(plan.grid) - len(todo)
    result.chunks_computed = len(todo)
    nodata = getattr(plan.source.geometry, "nodata", None)
    seg_future = client.scatter(segmenter, broadcast=True) if len(todo) else None
    resources = gpu_resources(client, segmenter)
    reference = _reference(plan)

    def submit(group: np.ndarray, key: str) -> Future:
        return client.submit(
            process.segment_chunks,
            plan.staging / "input",
            plan.staging / "labels",
            plan.grid,
            group,
            seg_future,
            nodata,
            plan.source.geometry,
            plan.records,
            reference,
            catch=len(group) > 1,
            key=key,
            retries=plan.spec.retries,
            resources=resources,
        )

    groups = plan.grid.groups(todo, chunks_per_task(plan, client, len(todo)))
    return run_waves(plan, client, "segment", groups, submit, result.failures)


def run_waves(
    plan: Plan,
    client: Client,
    stage: str,
    groups: list[np.ndarray],
    submit: Callable[[np.ndarray, str], Future],
    quarantine: dict[str, dict[str, str]] | None = None,
    *,
    split: bool = True,
) -> dict[str, Any]:
    """Run one task per group of grid indices, a bounded number in flight (:func:`_in_flight`);
    return the scheduling figures.

    A task's result is the list of positions of its chunks that failed (or anything else when
    none did); those chunks, and every chunk of a task that itself failed (a lost worker, a
    damaged read), are resubmitted one per task, so a chunk that keeps failing is retried by Dask
    and reported under its own id: to ``quarantine``, or raised (:func:`raise_failures`) when
    there is none. Without ``split`` a failed group is reported under its first chunk's id.
    """
    stats: dict[str, Any] = {"chunks_per_task_max": max((len(g) for g in groups), default=0)}
    failures: dict[str, dict[str, str]] = {}
    token = _token()

    def send(group: np.ndarray) -> Future:
        first = _chunk_id(group[0]) + ("" if len(group) == 1 else f"+{len(group)}")
        return submit(group, f"{stage}-{first}-{token}")

    def done(fut: Future, group: np.ndarray, pending: deque[np.ndarray]) -> int:
        if fut.status == "error" and len(group) > 1 and split:
            pending.extendleft(group[i : i + 1] for i in reversed(range(len(group))))
            return 0
        if fut.status == "error":
            failures[_chunk_id(group[0])] = _failure(stage, fut, len(group))
            return len(group)
        value = fut.result()
        bad = value if isinstance(value, list) else []
        pending.extendleft(group[i : i + 1] for i in reversed(bad))
        return len(group) - len(bad)

    _in_flight(client, stage, deque(groups), sum(len(g) for g in groups), send, done, stats)
    _report(plan, failures, quarantine)
    return stats


def _in_flight(
    client: Client,
    stage: str,
    pending: deque[Any],
    n_chunks: int,
    submit: Callable[[Any], Future],
    done: Callable[[Future, Any, deque[Any]], int],
    stats: dict[str, Any],
) -> None:
    """Submit the items of ``pending`` one task each, at most ``IN_FLIGHT_PER_THREAD`` per
    worker thread at a time, the next one as each finishes, so the scheduler and the client hold
    O(workers) futures however many chunks the job has. ``done(future, item, pending)`` handles
    a finished task (it may put items back at the front of ``pending``) and returns how many
    chunks it completed, for the progress bar. ``stats`` gets the scheduling figures."""
    window = max(2, IN_FLIGHT_PER_THREAD * _n_threads(client))
    stats.update(chunks=n_chunks, tasks=0, window=window, in_flight_max=0)
    live: dict[Future, Any] = {}
    futures = as_completed()

    def top_up() -> None:
        while pending and len(live) < window:
            item = pending.popleft()
            fut = submit(item)
            live[fut] = item
            futures.add(fut)
            stats["tasks"] += 1
        stats["in_flight_max"] = max(stats["in_flight_max"], len(live))

    with _progress(stage, n_chunks) as (progress, task):
        top_up()
        for fut in futures:
            progress.advance(task, done(fut, live.pop(fut), pending))
            del fut
            top_up()


def _failure(stage: str, fut: Future, n_chunks: int = 1) -> dict[str, str]:
    """The record of a task that failed (for ``failed.json``)."""
    return {
        "stage": stage,
        "error": repr(fut.exception()) + (f" (a task of {n_chunks} chunks)" if n_chunks > 1 else ""),
        "traceback": "".join(traceback.format_tb(fut.traceback())),
    }


def _report(
    plan: Plan, failures: dict[str, dict[str, str]], quarantine: dict[str, dict[str, str]] | None
) -> None:
    """Failed chunks to ``quarantine``, or raised when there is none."""
    if quarantine is not None:
        quarantine.update(failures)
    elif failures:
        raise_failures(plan, failures)


def _chunk_id(index: np.ndarray) -> str:
    return "_".join(str(int(i)) for i in index)


def gpu_resources(client: Client, segmenter: Segmenter) -> dict[str, float] | None:
    """``{"GPU": 1}`` for learned segmenters when the cluster has workers with the GPU resource.

    Tasks then go only to GPU workers, one per device at a time. Without GPU workers they are not
    annotated (an annotation no worker can satisfy would wait forever) and run on the CPU.
    """
    if not getattr(segmenter, "uses_torch", False):
        return None
    workers = client.scheduler_info().get("workers", {}).values()
    if any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers):
        return {"GPU": 1}
    return None


def seam_check(plan: Plan, client: Client, segmenter: Segmenter) -> dict[str, Any]:
    """Re-segment windows centred on chunk corners on their own; count pixels that differ."""
    windows = [plan.grid.window(box) for box in plan.grid.seam_windows()]
    if not windows:
        return {"windows": 0, "pixels": 0, "differing": 0}
    nodata = getattr(plan.source.geometry, "nodata", None)
    futures = [
        client.submit(
            process.window_check,
            plan.staging / "input",
            plan.staging / "labels",
            w,
            plan.grid.edge_mode,
            nodata,
            segmenter,
            pure=False,
        )
        for w in windows
    ]
    checks = client.gather(futures)
    return {
        "windows": len(checks),
        "pixels": sum(c["pixels"] for c in checks),
        "differing": sum(c["differing"] for c in checks),
        "details": checks,
    }


def _reference(plan: Plan) -> process.Reference | None:
    ref = plan.spec.reference
    if plan.reference is None or ref is None:
        return None
    return process.Reference(plan.reference, ref.band, ref.ignore, ref.seam_band, plan.grid.shape)


def _token() -> str:
    return uuid.uuid4().hex[:8]


def run_each(
    plan: Plan,
    client: Client,
    stage: str,
    items: Sequence[Any],
    submit: Callable[[Any], Future],
    quarantine: dict[str, dict[str, str]] | None = None,
    *,
    collect: bool = False,
    stats: dict[str, Any] | None = None,
) -> list[Any]:
    """One task per item (a :class:`ChunkSpec`, named by its ``chunk_id``), a bounded number in
    flight (:func:`_in_flight`; the instance stages, whose tasks carry per-chunk inputs). Failed
    chunks go to ``quarantine``, or raise when there is none. With ``collect``, the results of
    the tasks that succeeded, in completion order; otherwise they are dropped as they arrive.
    ``stats`` receives the scheduling figures, as :func:`run_waves` returns them."""
    stats = {} if stats is None else stats
    stats["chunks_per_task_max"] = 1
    failures: dict[str, dict[str, str]] = {}
    results: list[Any] = []

    def done(fut: Future, item: Any, pending: deque[Any]) -> int:
        if fut.status == "error":
            failures[item.chunk_id] = _failure(stage, fut)
        elif collect:
            results.append(fut.result())
        return 1

    _in_flight(client, stage, deque(items), len(items), submit, done, stats)
    _report(plan, failures, quarantine)
    return results


def raise_failures(plan: Plan, failures: dict[str, dict[str, str]]) -> None:
    """Record quarantined chunks in ``failed.json`` and raise :class:`ChunkFailedError`."""
    finalize.write_failure(plan, failures)
    chunk, info = next(iter(failures.items()))
    raise ChunkFailedError(
        f"{len(failures)} chunk(s) failed in stage {info['stage']!r} after {plan.spec.retries} "
        f"retries and were quarantined; first: chunk {chunk}: {info['error']}. Every other chunk "
        f"was written to {plan.staging}. Details in {plan.out / 'failed.json'}; fix the cause and "
        "rerun (completed chunks are kept)."
    )


class _progress:
    """A rich progress bar on stderr (quiet when there is nothing to do)."""

    def __init__(self, stage: str, total: int) -> None:
        self.stage = stage
        self.bar = Progress(
            TextColumn(f"[bold]{stage:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
            disable=total == 0,
            console=Console(stderr=True, force_jupyter=False),  # plain text in notebooks too
        )
        self.total = total

    def __enter__(self) -> tuple[Progress, Any]:
        self.bar.start()
        return self.bar, self.bar.add_task("chunks", total=self.total)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()
