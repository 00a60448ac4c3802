"""Big graphs: plan and run a job of 10^4 .. 10^5 tiny chunks; planning time, scheduler memory.

For each requested chunk count N the benchmark writes a square uint16 GeoTIFF of
``ceil(sqrt(N)) * chunk`` pixels a side (``pipeline.testing.blocks_field``: bimodal blocks plus
noise, written window by window), then runs the ``otsu`` job on it with ``tiling.chunk`` =
``chunk x chunk`` (default 32 x 32, so 10^5 chunks is a 10144^2 px raster) on a fresh
``LocalCluster`` of 2 worker processes x 1 thread. Every measurement runs in its own subprocess
(the client); the cluster runs in a subprocess of that client (scheduler and nannies), the
workers are its children, and the orchestrator samples the RSS and CPU of every process of that
tree with psutil (``benchmarks/common.py``), plus the CPU that other processes used meanwhile.

Measured per N: ``make_plan`` time and the time to build the segment stage's task list as the
engine does (grid indices of the chunks to do, grouped into batches): the planning time,
the wall time of ``execute`` and of each stage (``summary.json``), the peak RSS of the client, of
the scheduler process (and its growth over its RSS before the job), of each worker, the most
tasks the scheduler held at once (polled every 0.25 s), the completion-record files, the rows of
``tiles.parquet``, and the per-chunk overhead (wall / chunks). The check at the end: from the
smallest to the largest N, neither planning time nor the scheduler's memory growth may grow
faster than N (ratio of ratios <= 1, with 1.25 allowed for timer and sampling noise).

``python benchmarks/bench_graph.py -h``; results to ``benchmarks/results/bench_graph-*.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    FOREIGN_WARN_PCT,
    MIB,
    REPO,
    RESULTS,
    add_usage,
    cluster_host,
    cluster_roles,
    fmt,
    machine,
    peak,
    remove,
    run_sampled,
    say,
    worker_peaks,
)

#: Allowed ratio of ratios (growth of a cost / growth of N) before "faster than linear".
LINEAR_SLACK = 1.25
POLL_TASKS_S = 0.25


# --------------------------------------------------------------------------- input


def side_for(n_chunks: int, chunk: int) -> int:
    """Side (pixels) of the square raster whose grid has at least ``n_chunks`` chunks."""
    return math.ceil(math.sqrt(n_chunks)) * chunk


def generate(path: Path, side: int) -> None:
    """A uint16 tiled GeoTIFF of ``side`` x ``side`` px (cheap bimodal blocks plus noise)."""
    from pipeline.testing import write_raster
    from pipeline.testing.factories import blocks_field

    write_raster(path, (side, side), dtype="uint16", fill=blocks_field(seed=3, block=200))


# --------------------------------------------------------------------------- child


class TaskPoller:
    """Polls the number of tasks the scheduler holds (``len(scheduler.tasks)``) in a thread."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.peak = 0
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TaskPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.client.run_on_scheduler(_count_tasks)
            except Exception:  # the client closing at the end
                return
            self.peak = max(self.peak, n)
            self.samples.append(n)
            self._stop.wait(POLL_TASKS_S)


def _count_tasks(dask_scheduler: Any = None) -> int:
    return len(dask_scheduler.tasks)


def task_list_s(plan: Any, client: Any) -> float:
    """Seconds to build the segment stage's task list as the engine does (grid indices of the
    chunks not done, grouped into batches; no chunk specs in the client). An engine without
    ``ChunkGrid.groups`` enumerated every ``ChunkSpec`` instead; that is timed then."""
    from pipeline.io.zarr_store import CompletionLog

    t0 = time.perf_counter()
    grid = plan.grid
    if hasattr(grid, "groups"):
        from pipeline.runner.execute import chunks_per_task

        todo = grid.todo(grid.done_mask(CompletionLog(plan.records, "segment").done()))
        grid.groups(todo, chunks_per_task(plan, client, len(todo)))
    else:
        list(grid)
    return time.perf_counter() - t0


def child_run(tif: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Plan and run the job on a fresh cluster; time planning and every stage."""
    import pandas as pd

    from pipeline.cluster import connect
    from pipeline.runner.execute import execute
    from pipeline.runner.plan import make_plan
    from pipeline.runner.spec import parse_job, resolve_paths

    raw = {
        "name": f"bench-graph-{tif.stem}",
        "input": {"path": str(tif)},
        "segmenter": {"name": settings["segmenter"], "params": {"band": 1}},
        "tiling": {"chunk": [settings["chunk"]] * 2},
        "output": {"dir": str(out), "formats": settings["formats"]},
    }
    spec = resolve_paths(parse_job(raw), base=REPO)
    with cluster_host(settings) as address, connect(scheduler=address) as client:
        roles = cluster_roles(client)
        started = time.time()
        t0 = time.perf_counter()
        plan = make_plan(spec)
        t_plan = time.perf_counter() - t0
        n_chunks = len(plan.grid)
        t_specs = task_list_s(plan, client)
        t1 = time.perf_counter()
        with TaskPoller(client) as poller:
            result = execute(plan, client)
        wall = time.perf_counter() - t1
    summary = json.loads((out / "summary.json").read_text())
    records = [p for p in (out / ".segpipe" / "done").rglob("*") if p.is_file()]
    tiles = pd.read_parquet(out / "tiles.parquet", columns=["chunk_id"])
    return {
        "n_chunks": n_chunks,
        "plan_s": t_plan,
        "specs_s": t_specs,
        "planning_s": t_plan + t_specs,
        "wall_s": wall,
        "job_started_at": started,
        "roles": roles,
        "timings_s": summary["timings_s"],
        "threshold": summary["segmenter"]["fitted"]["threshold"],
        "computed": result.chunks_computed,
        "scheduler_tasks_peak": poller.peak,
        "record_files": len(records),
        "tiles_rows": len(tiles),
        "tiles_unique": int(tiles["chunk_id"].nunique()),
    }


def child_main(argv: list[str]) -> None:
    """Entry of the ``_child TIF OUT RESULT SETTINGS`` subprocess."""
    tif, out, result, settings = argv
    record = child_run(Path(tif), Path(out), json.loads(settings))
    Path(result).write_text(json.dumps(record, default=str))


# --------------------------------------------------------------------------- orchestration


def measure(n_target: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Generate the input for ``n_target`` chunks, run the job in a sampled subprocess."""
    side = side_for(n_target, args.chunk)
    tif = workdir / f"graph-{n_target}.tif"
    out = workdir / f"out-{n_target}"
    log = workdir / f"run-{n_target}.log"
    say(f"[{n_target}] generating {side}x{side} uint16 ...")
    generate(tif, side)
    settings = {
        "chunk": args.chunk,
        "formats": args.formats,
        "segmenter": args.segmenter,
        "n_workers": args.workers,
        "threads_per_worker": 1,
        "memory_limit": args.memory_limit,
    }
    result = workdir / f"result-{n_target}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(tif), str(out), str(result)]
    say(f"[{n_target}] running ...")
    try:
        rc, sampler = run_sampled([*cmd, json.dumps(settings)], log, timeout_s=args.timeout)
        if rc != 0 or not result.exists():
            raise RuntimeError(
                f"run for {n_target} chunks failed (exit {rc}); log {log}:\n{log.read_text()[-3000:]}"
            )
        record = json.loads(result.read_text())
        add_usage(record, sampler)
    finally:
        remove(out)
        remove(tif)
    record["n_target"] = n_target
    record["side_px"] = side
    record["per_chunk_ms"] = 1000 * record["wall_s"] / record["n_chunks"]
    sched = record["memory"].get("scheduler+nannies", {})
    series = sched.get("rss_series_s_mib") or [[0, 0]]
    before = [m for t, m in series if t <= 0] or [series[0][1]]
    record["scheduler_base_mib"] = before[-1]
    record["scheduler_growth_mib"] = round(sched.get("peak_rss_mib", 0) - before[-1], 1)
    say(
        f"[{n_target}] {record['n_chunks']} chunks: plan {record['planning_s']:.2f} s, run "
        f"{record['wall_s']:.1f} s ({record['per_chunk_ms']:.2f} ms/chunk), scheduler peak "
        f"{sched.get('peak_rss_mib')} MiB, foreign CPU {record['foreign_load_pct']}%"
    )
    return record


# --------------------------------------------------------------------------- report


def table(records: list[dict[str, Any]]) -> str:
    """Chunks x planning time x scheduler memory x wall x per-chunk overhead."""
    head = (
        f"{'chunks':>8} {'plan s':>7} {'wall s':>7} {'ms/chunk':>8} {'sched MiB':>9} {'sched +MiB':>10} "
        f"{'tasks max':>9} {'client MiB':>10} {'worker MiB':>10} {'records':>7} {'tiles':>7} {'foreign %':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['n_chunks']:>8} {r['planning_s']:>7.3f} {r['wall_s']:>7.1f} {r['per_chunk_ms']:>8.2f} "
            f"{fmt(peak(r, 'scheduler+nannies'), 9, '.0f')} {r['scheduler_growth_mib']:>10.1f} "
            f"{r['scheduler_tasks_peak']:>9} {fmt(peak(r, 'client'), 10, '.0f')} "
            f"{max(worker_peaks(r) or [0]):>10.0f} {r['record_files']:>7} {r['tiles_rows']:>7} "
            f"{r['foreign_load_pct']:>9.1f}"
        )
    return "\n".join(lines)


def stage_table(records: list[dict[str, Any]]) -> str:
    """Seconds per stage (summary.json timings_s) and per chunk."""
    stages = ("ingest", "fit", "segment", "seam_check", "finalize")
    head = f"{'chunks':>8} " + " ".join(f"{s + ' s':>12}" for s in stages)
    lines = [head, "-" * len(head)]
    for r in records:
        t = r["timings_s"]
        cells = [f"{t.get(s, 0):>6.1f} ({1000 * t.get(s, 0) / r['n_chunks']:.2f})".rjust(12) for s in stages]
        lines.append(f"{r['n_chunks']:>8} " + " ".join(cells))
    return "\n".join(lines) + "\n(seconds, and ms per chunk in brackets)"


def linearity(records: list[dict[str, Any]]) -> tuple[str, bool]:
    """Growth of planning time and scheduler memory growth vs growth of chunks (first -> last)."""
    if len(records) < 2:
        return "(one size only: no growth check)", True
    a, b = records[0], records[-1]
    n = b["n_chunks"] / a["n_chunks"]
    lines, ok = [], True
    for key, what in (
        ("planning_s", "planning time"),
        ("scheduler_growth_mib", "scheduler RSS growth"),
        ("wall_s", "wall time"),
    ):
        lo, hi = max(a[key], 1e-3), max(b[key], 1e-3)
        growth = hi / lo
        rr = growth / n
        passed = rr <= LINEAR_SLACK
        if key != "wall_s":
            ok &= passed
        lines.append(
            f"{what}: x{growth:.2f} for x{n:.1f} chunks (ratio of ratios {rr:.2f}; "
            f"{'linear or better' if passed else 'FASTER THAN LINEAR'})"
        )
    return "\n".join(lines), ok


def render(records: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, bool]:
    """Tables, the linearity check and notes."""
    check, ok = linearity(records)
    notes = [
        f"otsu job, chunk {args.chunk}x{args.chunk}, formats {args.formats}, {args.workers} worker "
        f"processes x 1 thread, memory_limit {args.memory_limit}.",
        "plan s: make_plan + building the segment stage's task list (grid indices grouped into "
        "batches); sched MiB: peak RSS of the cluster host "
        "process (scheduler + nannies); sched +MiB: its growth over the RSS before the job; tasks max: "
        "most tasks the scheduler held at once; records: completion-record files; tiles: rows of "
        "tiles.parquet.",
    ]
    busy = [str(r["n_chunks"]) for r in records if r["foreign_load_pct"] > FOREIGN_WARN_PCT]
    if busy:
        notes.append(
            f"WARNING: other processes used more than {FOREIGN_WARN_PCT}% of the machine's CPU during "
            f"the runs of {', '.join(busy)} chunks (foreign %); those wall times are inflated."
        )
    return "\n\n".join([table(records), stage_table(records), check, "\n".join(notes)]), ok


def main(argv: list[str]) -> None:
    """Run every size, print the tables, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, nargs="+", default=[10_000, 100_000], help="chunk counts")
    p.add_argument("--chunk", type=int, default=32, help="chunk side in pixels")
    p.add_argument("--formats", default="zarr,cog", help="output formats (comma-separated)")
    p.add_argument("--segmenter", default="otsu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_graph-", dir="/tmp")) if own else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        records = [measure(n, args, workdir) for n in sorted(args.chunks)]
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    text, ok = render(records, args)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_graph-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "linear_ok": ok,
        "table": text,
        "records": records,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwhole benchmark {time.perf_counter() - t0:.0f} s; JSON: {path}; MiB = {MIB} bytes")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
