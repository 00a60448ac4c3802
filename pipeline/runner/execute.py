"""Run a planned job on a Dask client: ingest, fit, segment, finalize.

Chunks are submitted as futures keyed by stage and chunk id; completed chunks (by their
records) are skipped on a rerun with the same fingerprint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client, Future, as_completed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.errors import ChunkFailedError, OutputConflictError
from pipeline.io import zarr_store
from pipeline.models import Segmenter
from pipeline.models.base import CombineFn, PartialFn
from pipeline.runner import finalize, process, publish
from pipeline.runner.instances import run_instances
from pipeline.runner.plan import Plan
from pipeline.tiling import ChunkSpec

log = logging.getLogger(__name__)
FAN_IN = 8
#: Chunks per fit task: fewer tasks and one partial in memory per task (at most; small jobs
#: still spread over every worker).
REDUCE_BATCH = 32


def _n_workers(client: Client) -> int:
    return max(1, len(client.nthreads()))


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
    _timed(result, "ingest", lambda: ingest(plan, client))
    fitted = _timed(result, "fit", lambda: plan.segmenter.fit(make_reducer(plan, client)))
    result.segmenter = fitted
    if fitted.kind != "semantic":
        result.instances = _timed(
            result,
            "segment",
            lambda: run_instances(
                plan,
                client,
                fitted,
                lambda futs, stage: _wait_all(
                    plan, futs, stage, result.failures if stage == "label" else None
                ),
                _token(),
            ),
        )
        result.chunks_computed = len(plan.grid)
    else:
        _timed(result, "segment", lambda: segment(plan, client, fitted, result))
        result.diagnostics["seam_check"] = _timed(
            result, "seam_check", lambda: seam_check(plan, client, fitted)
        )
    if result.failures:
        raise_failures(plan, result.failures)
    _timed(result, "finalize", lambda: result.outputs.update(finalize.finalize(plan, fitted)))
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


def _timed(result: RunResult, stage: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    value = fn()
    result.timings[stage] = round(time.perf_counter() - t0, 4)
    return value


def ingest(plan: Plan, client: Client) -> None:
    """Stream the source into the staging input, one read unit (chunk, slab or file) per task."""
    done = zarr_store.CompletionLog(plan.records, "ingest").done()
    todo = [s for s in plan.grid if s.chunk_id not in done]
    if not todo:
        return
    target, token = plan.staging / "input", _token()
    futures = {
        client.submit(
            process.ingest_group,
            plan.source,
            target,
            group,
            plan.records,
            key=f"ingest-{group[0].chunk_id}-{token}",
            retries=plan.spec.retries,
        ): group[0].chunk_id
        for group in ingest_groups(plan.source.read_unit, todo)
    }
    _wait_all(plan, futures, "ingest")


def ingest_groups(unit: str, specs: list[ChunkSpec]) -> list[list[ChunkSpec]]:
    """Chunks read together: one each (``region``), per z index (``slab``), or all (``whole``)."""
    if unit == "whole":
        return [specs]
    if unit == "slab":
        slabs: dict[int, list[ChunkSpec]] = {}
        for s in specs:
            slabs.setdefault(s.index[0], []).append(s)
        return list(slabs.values())
    return [[s] for s in specs]


def make_reducer(plan: Plan, client: Client) -> Callable[[PartialFn, CombineFn], Any]:
    """A reducer mapping a partial statistic over every chunk and combining it as a tree."""
    staged, edge, nodata = plan.staging / "input", plan.grid.edge_mode, plan.source.geometry
    nd = getattr(nodata, "nodata", None)

    specs = list(plan.grid)
    size = max(1, min(REDUCE_BATCH, -(-len(specs) // (4 * _n_workers(client)))))
    batches = [specs[i : i + size] for i in range(0, len(specs), size)]

    def reduce(partial: PartialFn, combine: CombineFn) -> Any:
        parts = [
            client.submit(process.reduce_chunks, staged, b, edge, nd, partial, combine, pure=False)
            for b in batches
        ]

        while len(parts) > 1:
            parts = [
                client.submit(process.combine_many, combine, *parts[i : i + FAN_IN], pure=False)
                for i in range(0, len(parts), FAN_IN)
            ]
        return parts[0].result()

    return reduce


def segment(plan: Plan, client: Client, segmenter: Segmenter, result: RunResult) -> None:
    """Segment every chunk not yet recorded as complete."""
    done = zarr_store.CompletionLog(plan.records, "segment").done()
    todo = [s for s in plan.grid if s.chunk_id not in done]
    result.chunks_skipped = len(plan.grid) - len(todo)
    result.chunks_computed = len(todo)
    nodata = getattr(plan.source.geometry, "nodata", None)
    token = _token()
    seg_future = client.scatter(segmenter, broadcast=True) if todo else None
    resources = gpu_resources(client, segmenter)
    futures = {
        client.submit(
            process.segment_chunk,
            plan.staging / "input",
            plan.staging / "labels",
            s,
            plan.grid.edge_mode,
            nodata,
            seg_future,
            plan.source.geometry,
            plan.records,
            _reference(plan),
            key=f"segment-{s.chunk_id}-{token}",
            retries=plan.spec.retries,
            resources=resources,
        ): s.chunk_id
        for s in todo
    }
    _wait_all(plan, futures, "segment", result.failures)


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


def _wait_all(
    plan: Plan, futures: dict[Future, str], stage: str, quarantine: dict[str, dict[str, str]] | None = None
) -> None:
    """Wait for every future; failed chunks go to ``quarantine``, or raise when there is none."""
    failures: dict[str, dict[str, str]] = {}
    with _progress(stage, len(futures)) as (progress, task):
        for fut in as_completed(list(futures)):
            if fut.status == "error":
                failures[futures[fut]] = {
                    "stage": stage,
                    "error": repr(fut.exception()),
                    "traceback": "".join(traceback.format_tb(fut.traceback())),
                }
            progress.advance(task)
    if quarantine is not None:
        quarantine.update(failures)
    elif failures:
        raise_failures(plan, failures)


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
