"""Benchmark segpipe's global-Otsu job against an in-memory skimage run and a raw zarr copy.

One command measures, side by side, on generated single-band int16 GeoTIFFs:

* ``segpipe``   the ``otsu`` job (ingest -> fit -> segment -> finalize) on a 2-worker cluster
* ``skimage``   ``threshold_otsu(image)`` + ``image > t`` on the whole band read into memory
* ``zarr-copy`` GeoTIFF -> zarr v3 with the staging store's chunks and codec, with dask on
  the same kind of 2-worker cluster: the I/O floor of the ingest stage

Every measurement runs in its own subprocess (``_child`` mode); the orchestrator samples the
RSS of that subprocess's whole tree (client, cluster host with scheduler and nannies, worker
processes) with psutil in a background thread. Run ``python benchmarks/bench_otsu.py -h``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SOURCE_TIF = Path("/work/shared/data/geo/Spain_7370579_S2Hand.tif")
SOURCE_BAND = 8  # Sentinel-2 B8 (NIR), int16
GIB = 2**30
MIB = 2**20
BYTES_PER_PX = 2  # int16
SAMPLE_EVERY_S = 0.1
SERIES_POINTS = 400
FOREIGN_WARN_PCT = 10


# --------------------------------------------------------------------------- input data


def raster_shape(size_gib: float, align: int = 512) -> tuple[int, int]:
    """A square shape (multiple of ``align``) of at least ``size_gib`` GiB of int16 pixels."""
    side = math.sqrt(size_gib * GIB / BYTES_PER_PX)
    n = math.ceil(side / align) * align
    return n, n


def mirror_period(tile: np.ndarray) -> np.ndarray:
    """A 2x2 mirrored arrangement of ``tile``: repeating it leaves no seams."""
    top = np.concatenate([tile, tile[:, ::-1]], axis=1)
    return np.concatenate([top, top[::-1]], axis=0)


def strip_rows(period: np.ndarray, row0: int, height: int, width: int) -> np.ndarray:
    """Rows ``row0 .. row0+height`` of the infinite mirrored tiling, ``width`` columns wide."""
    ph, pw = period.shape
    rows = period[np.arange(row0, row0 + height) % ph]
    reps = -(-width // pw)
    return np.tile(rows, (1, reps))[:, :width]


def generate_geotiff(path: Path, shape: tuple[int, int], strip: int = 512) -> None:
    """Write an int16 tiled GeoTIFF tiling the real B8 band, one row strip at a time."""
    with rasterio.open(SOURCE_TIF) as src:
        tile = src.read(SOURCE_BAND)
        crs, transform, nodata = src.crs, src.transform, src.nodata
    period = mirror_period(tile)
    profile = {
        "driver": "GTiff",
        "height": shape[0],
        "width": shape[1],
        "count": 1,
        "dtype": "int16",
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "none",
        "BIGTIFF": "YES",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.set_band_description(1, "B8")
        for row0 in range(0, shape[0], strip):
            h = min(strip, shape[0] - row0)
            dst.write(strip_rows(period, row0, h, shape[1]), 1, window=Window(0, row0, shape[1], h))


# --------------------------------------------------------------------------- RSS sampling


@dataclass
class ProcStat:
    """Peak memory of one process seen by the sampler."""

    pid: int
    ppid: int
    cmdline: str
    first_s: float
    last_s: float = 0.0
    peak_rss: int = 0
    hwm: int = 0
    cpu_s: float = 0.0
    series: list[tuple[float, int]] = field(default_factory=list)


class TreeSampler:
    """Background thread sampling RSS of a process and all its descendants."""

    def __init__(self, root_pid: int, every_s: float = SAMPLE_EVERY_S) -> None:
        self.root = psutil.Process(root_pid)
        self.every_s = every_s
        self.t0 = time.time()
        self.stats: dict[int, ProcStat] = {}
        self.busy0 = _busy_cpu_s()
        self.busy_s = 0.0
        self.duration_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.busy_s = _busy_cpu_s() - self.busy0
        self.duration_s = time.time() - self.t0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        """Record the RSS of every process in the tree now."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        now = time.time()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._record(proc, now)

    def _record(self, proc: psutil.Process, now: float) -> None:
        stat = self.stats.get(proc.pid)
        if stat is None:
            cmd = " ".join(proc.cmdline())[:160]
            stat = self.stats[proc.pid] = ProcStat(proc.pid, proc.ppid(), cmd, now)
        rss = proc.memory_info().rss
        stat.peak_rss = max(stat.peak_rss, rss)
        stat.hwm = max(stat.hwm, _vm_hwm(proc.pid))
        cpu = proc.cpu_times()
        stat.cpu_s = max(stat.cpu_s, cpu.user + cpu.system)
        stat.last_s = now
        stat.series.append((now, rss))


def _busy_cpu_s() -> float:
    """CPU seconds spent busy by the whole machine (all cores) since boot."""
    t = psutil.cpu_times()
    return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)


def _vm_hwm(pid: int) -> int:
    """The kernel's peak RSS (VmHWM) of ``pid`` in bytes, 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def downsample(series: list[tuple[float, int]], t0: float, points: int) -> list[list[float]]:
    """``[[seconds since t0, MiB], ...]`` keeping at most ~``points`` samples (max per bucket)."""
    if not series:
        return []
    step = max(1, len(series) // points)
    out = []
    for i in range(0, len(series), step):
        part = series[i : i + step]
        t, rss = max(part, key=lambda p: p[1])
        out.append([round(t - t0, 2), round(rss / MIB, 1)])
    return out


def label_processes(stats: dict[int, ProcStat], roles: dict[str, Any]) -> dict[int, str]:
    """Role of each sampled pid from the pids the child reported."""
    labels = {int(roles["client"]): "client"}
    if roles.get("scheduler"):
        labels[int(roles["scheduler"])] = "scheduler+nannies"
    for i, (_addr, pid) in enumerate(sorted(roles.get("workers", {}).items()), start=1):
        labels[int(pid)] = f"worker-{i}"
    for pid, stat in stats.items():
        if pid in labels:
            continue
        if "resource_tracker" in stat.cmdline:
            labels[pid] = "mp-resource-tracker"
        elif "spawn_main" in stat.cmdline:
            labels[pid] = f"worker-restarted-{pid}"
        else:
            labels[pid] = f"other-{pid}"
    return labels


def memory_report(sampler: TreeSampler, roles: dict[str, Any], t_job: float) -> dict[str, Any]:
    """Per-role peak RSS (sampled, kernel VmHWM), CPU seconds, RSS series from job start."""
    labels = label_processes(sampler.stats, roles)
    report: dict[str, Any] = {}
    for pid, stat in sorted(sampler.stats.items()):
        report[labels[pid]] = {
            "pid": pid,
            "peak_rss_mib": round(stat.peak_rss / MIB, 1),
            "vm_hwm_mib": round(stat.hwm / MIB, 1),
            "cpu_s": round(stat.cpu_s, 2),
            "cmdline": stat.cmdline,
            "rss_series_s_mib": downsample(stat.series, t_job, SERIES_POINTS),
        }
    return report


# --------------------------------------------------------------------------- orchestration


@dataclass
class Settings:
    """Options shared by the orchestrator and its children."""

    workdir: Path
    formats: list[str]
    chunk: int
    memory_limit: str
    n_workers: int = 2
    threads_per_worker: int = 1


def run_child(kind: str, tif: Path, out: Path, settings: Settings, log: Path) -> dict[str, Any]:
    """Run one measurement in a subprocess, sampling its process tree; return its record."""
    result = out.parent / f"{out.name}.result.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_child",
        kind,
        str(tif),
        str(out),
        str(result),
        json.dumps(_settings_json(settings)),
    ]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        with TreeSampler(proc.pid) as sampler:
            rc = proc.wait()
    if rc != 0 or not result.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{kind} on {tif.name} failed (exit {rc}); log {log}:\n{tail}")
    record = json.loads(result.read_text())
    record["memory"] = memory_report(sampler, record.pop("roles"), record["job_started_at"])
    tree_cpu = sum(s.cpu_s for s in sampler.stats.values())
    record["cpu_s_tree"] = round(tree_cpu, 2)
    record["cpu_s_foreign"] = round(max(0.0, sampler.busy_s - tree_cpu), 2)
    capacity = sampler.duration_s * (os.cpu_count() or 1)
    record["foreign_load_pct"] = round(100 * record["cpu_s_foreign"] / capacity, 1)
    return record


def _settings_json(s: Settings) -> dict[str, Any]:
    return {
        "formats": s.formats,
        "chunk": s.chunk,
        "memory_limit": s.memory_limit,
        "n_workers": s.n_workers,
        "threads_per_worker": s.threads_per_worker,
    }


def bench_size(size_gib: float, settings: Settings, run_skimage: bool) -> list[dict[str, Any]]:
    """Generate one input, run every measurement on it, delete it; return the records."""
    shape = raster_shape(size_gib)
    tag = f"{size_gib:g}gib"
    tif = settings.workdir / f"otsu-{tag}.tif"
    t0 = time.perf_counter()
    say(f"[{tag}] generating {tif.name}: {shape[0]}x{shape[1]} int16 ...")
    generate_geotiff(tif, shape)
    say(f"[{tag}]   {tif.stat().st_size / GIB:.2f} GiB in {time.perf_counter() - t0:.1f} s")
    kinds = ["segpipe", "zarr-copy"] + (["skimage"] if run_skimage else [])
    records = []
    try:
        for kind in kinds:
            out = settings.workdir / f"{kind}-{tag}"
            say(f"[{tag}] {kind} ...")
            record = run_child(kind, tif, out, settings, settings.workdir / f"{kind}-{tag}.log")
            record.update(kind=kind, size_gib_requested=size_gib, shape=list(shape))
            record["input_gib"] = shape[0] * shape[1] * BYTES_PER_PX / GIB
            record["mpx"] = shape[0] * shape[1] / 1e6
            record["mpx_per_s"] = record["mpx"] / record["wall_s"]
            say(f"[{tag}]   {record['wall_s']:.1f} s, {record['mpx_per_s']:.1f} Mpx/s")
            records.append(record)
            _remove(out)
    finally:
        _remove(tif)
    return records


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def say(text: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- report


def find(records: list[dict[str, Any]], kind: str, size: float) -> dict[str, Any] | None:
    """The record of ``kind`` at requested size ``size``."""
    return next((r for r in records if r["kind"] == kind and r["size_gib_requested"] == size), None)


def add_ratios(records: list[dict[str, Any]]) -> None:
    """segpipe throughput / skimage's and / zarr copy's, on the segpipe records."""
    skimage_runs = [r for r in records if r["kind"] == "skimage"]
    for rec in (r for r in records if r["kind"] == "segpipe"):
        size = rec["size_gib_requested"]
        sk = find(records, "skimage", size) or (skimage_runs[0] if skimage_runs else None)
        zc = find(records, "zarr-copy", size)
        if sk is not None:
            rec["vs_skimage"] = rec["mpx_per_s"] / sk["mpx_per_s"]
            rec["vs_skimage_at_gib"] = sk["size_gib_requested"]
        if zc is not None:
            rec["vs_zarr_copy"] = rec["mpx_per_s"] / zc["mpx_per_s"]


def peak(record: dict[str, Any], role: str, key: str = "peak_rss_mib") -> float | None:
    """Sampled peak RSS (MiB), or another ``key``, of process ``role`` in a record."""
    entry = record["memory"].get(role)
    return None if entry is None else entry[key]


def worker_peaks(record: dict[str, Any]) -> list[float]:
    """Sampled peak RSS (MiB) of every worker process (restarted ones included)."""
    return [v["peak_rss_mib"] for k, v in record["memory"].items() if k.startswith("worker")]


def _fmt(value: float | None, width: int, spec: str) -> str:
    """``value`` formatted with ``spec`` right-aligned in ``width``, or ``-`` when missing."""
    return ("-" if value is None else format(value, spec)).rjust(width)


def main_table(records: list[dict[str, Any]]) -> str:
    """The side-by-side table of every measurement."""
    head = (
        f"{'run':<10} {'size GiB':>8} {'Mpx':>7} {'wall s':>7} {'Mpx/s':>7} {'seg/ski':>8} "
        f"{'seg/zarr':>8} {'client MiB':>10} {'sched MiB':>9} {'worker-1':>9} {'worker-2':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        ratio_sk = r.get("vs_skimage")
        mark = "*" if ratio_sk is not None and r["vs_skimage_at_gib"] != r["size_gib_requested"] else " "
        lines.append(
            f"{r['kind']:<10} {r['input_gib']:>8.2f} {r['mpx']:>7.0f} {r['wall_s']:>7.1f} "
            f"{r['mpx_per_s']:>7.1f} {_fmt(ratio_sk, 7, '.3f')}{mark}"
            f"{_fmt(r.get('vs_zarr_copy'), 8, '.3f')} {_fmt(peak(r, 'client'), 10, '.0f')} "
            f"{_fmt(peak(r, 'scheduler+nannies'), 9, '.0f')} {_fmt(peak(r, 'worker-1'), 9, '.0f')} "
            f"{_fmt(peak(r, 'worker-2'), 9, '.0f')}"
        )
    return "\n".join(lines)


def cpu_table(records: list[dict[str, Any]]) -> str:
    """CPU seconds per process role over each measurement subprocess's life."""
    roles = ("client", "scheduler+nannies", "worker-1", "worker-2")
    head = (
        f"{'cpu s':<10} {'size GiB':>8} {'client':>7} {'sched':>7} {'worker-1':>8} "
        f"{'worker-2':>8} {'foreign':>8} {'foreign %':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        c, sc, w1, w2 = (peak(r, role, "cpu_s") for role in roles)
        lines.append(
            f"{r['kind']:<10} {r['input_gib']:>8.2f} {_fmt(c, 7, '.1f')} {_fmt(sc, 7, '.1f')} "
            f"{_fmt(w1, 8, '.1f')} {_fmt(w2, 8, '.1f')} {r['cpu_s_foreign']:>8.1f} "
            f"{r['foreign_load_pct']:>9.1f}"
        )
    return "\n".join(lines)


def stage_table(records: list[dict[str, Any]]) -> str:
    """segpipe per-stage timings (summary.json timings_s) and fitted thresholds."""
    head = (
        f"{'segpipe':<10} {'chunks':>7} {'ingest s':>9} {'fit s':>7} {'segment s':>9} "
        f"{'finalize s':>10} {'threshold':>9} {'skimage t':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in (r for r in records if r["kind"] == "segpipe"):
        t = r["timings_s"]
        sk = find(records, "skimage", r["size_gib_requested"])
        lines.append(
            f"{r['size_gib_requested']:<6g}GiB {r['n_chunks']:>7} {t['ingest']:>9.1f} {t['fit']:>7.1f} "
            f"{t['segment']:>9.1f} {t['finalize']:>10.1f} {r['threshold']:>9g} "
            f"{_fmt(sk['threshold'] if sk else None, 9, 'g')}"
        )
    return "\n".join(lines)


def flatness(records: list[dict[str, Any]]) -> str:
    """One line per kind: max worker peak RSS at each size."""
    lines = []
    for kind in ("segpipe", "zarr-copy"):
        runs = [r for r in records if r["kind"] == kind]
        if len(runs) < 2:
            continue
        parts = [f"{r['input_gib']:.2f} GiB -> {max(worker_peaks(r)):.0f} MiB" for r in runs]
        ratio = max(worker_peaks(runs[-1])) / max(worker_peaks(runs[0]))
        growth = runs[-1]["input_gib"] / runs[0]["input_gib"]
        lines.append(f"{kind} worker peak RSS: {', '.join(parts)} (x{ratio:.2f} for x{growth:.1f} input)")
    return "\n".join(lines)


def render(records: list[dict[str, Any]], settings: Settings) -> str:
    """Everything printed at the end."""
    notes = [
        f"segpipe output formats: {settings.formats}; chunk {settings.chunk}x{settings.chunk}; "
        f"{settings.n_workers} workers x {settings.threads_per_worker} thread, memory_limit "
        f"{settings.memory_limit} each; input read from a warm page cache.",
        "seg/ski, seg/zarr: segpipe throughput / baseline throughput "
        "(* = skimage measured at a smaller size).",
        "MiB columns: peak RSS sampled every "
        f"{SAMPLE_EVERY_S}s per process; 'sched' is the LocalCluster host process "
        "(scheduler + nannies); skimage runs in one process (client column).",
        "cpu s: CPU seconds per process over the measurement subprocess's life (cluster start "
        "included); foreign = CPU used meanwhile by processes outside the benchmark (% of all cores).",
    ]
    tables = [main_table(records), stage_table(records), cpu_table(records), flatness(records)]
    busy = [f"{r['kind']}@{r['input_gib']:.2f}" for r in records if r["foreign_load_pct"] > FOREIGN_WARN_PCT]
    if busy:
        notes.append(
            f"WARNING: other processes used more than {FOREIGN_WARN_PCT}% of the machine's CPU "
            f"during {', '.join(busy)}; those timings are inflated."
        )
    return "\n\n".join([t for t in tables if t] + ["\n".join(notes)])


def write_json(records: list[dict[str, Any]], settings: Settings, text: str) -> Path:
    """The records, settings and printed table as JSON under benchmarks/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_otsu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {**_settings_json(settings), "source": str(SOURCE_TIF), "band": SOURCE_BAND},
        "table": text,
        "records": records,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


# --------------------------------------------------------------------------- children


@contextlib.contextmanager
def cluster_host(settings: dict[str, Any]) -> Iterator[str]:
    """Start a LocalCluster (pipeline.cluster.connect) in a subprocess; yield its address."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_cluster", json.dumps(settings)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        if not address:
            raise RuntimeError("the cluster host process did not start")
        yield address
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_cluster(settings: dict[str, Any]) -> None:
    """Child mode ``_cluster``: hold a LocalCluster open until stdin closes."""
    from pipeline.cluster import connect

    with connect(
        n_workers=settings["n_workers"],
        threads_per_worker=settings["threads_per_worker"],
        memory_limit=settings["memory_limit"],
        dashboard=False,
    ) as client:
        client.wait_for_workers(settings["n_workers"])
        print(client.scheduler_info()["address"], flush=True)
        sys.stdin.read()


def cluster_roles(client: Any) -> dict[str, Any]:
    """Pids of this client, the scheduler and each worker."""
    return {
        "client": os.getpid(),
        "scheduler": client.run_on_scheduler(os.getpid),
        "workers": client.run(os.getpid),
    }


def child_segpipe(tif: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The segpipe otsu job on the GeoTIFF, timed end to end (plan .. summary)."""
    from pipeline.cluster import connect
    from pipeline.runner.api import run_job
    from pipeline.runner.spec import parse_job, resolve_paths

    raw = {
        "name": f"bench-otsu-{tif.stem}",
        "input": {"path": str(tif)},
        "segmenter": {"name": "otsu", "params": {"band": 1}},
        "tiling": {"chunk": [settings["chunk"]] * 2},
        "output": {"dir": str(out), "formats": settings["formats"]},
        "cluster": {
            "n_workers": settings["n_workers"],
            "threads_per_worker": settings["threads_per_worker"],
            "memory_limit": settings["memory_limit"],
        },
    }
    spec = resolve_paths(parse_job(raw), base=REPO)
    with cluster_host(settings) as address, connect(scheduler=address) as client:
        roles = cluster_roles(client)
        started = time.time()
        t0 = time.perf_counter()
        run_job(spec, client=client)
        wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_s": wall,
        "job_started_at": started,
        "roles": roles,
        "timings_s": summary["timings_s"],
        "threshold": summary["segmenter"]["fitted"]["threshold"],
        "n_chunks": summary["tiling"]["n_chunks"],
        "outputs": sorted(summary["outputs"]),
        "output_bytes": _tree_bytes(out),
    }


def _tree_bytes(path: Path) -> dict[str, int]:
    """Bytes on disk of each top-level entry of ``path``."""
    sizes = {}
    for child in path.iterdir():
        files = [child] if child.is_file() else [p for p in child.rglob("*") if p.is_file()]
        sizes[child.name] = sum(p.stat().st_size for p in files)
    return sizes


class WindowReader:
    """Array-like ``(1, y, x)`` view of band 1 of a GeoTIFF; each slice is a windowed read."""

    def __init__(self, path: str, shape: tuple[int, int], dtype: str) -> None:
        self.path = path
        self.shape = (1, *shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        _, ys, xs = key
        window = Window(xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start)
        with rasterio.open(self.path) as ds:
            return ds.read(1, window=window)[None]


def child_zarr_copy(tif: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """GeoTIFF -> zarr v3 (staging chunks and codec) with dask on the cluster, timed."""
    import dask.array as da
    import zarr

    from pipeline.cluster import connect
    from pipeline.io import zarr_store
    from pipeline.io.sources import open_source

    source = open_source(tif)
    chunk = settings["chunk"]
    with cluster_host(settings) as address, connect(scheduler=address) as client:
        roles = cluster_roles(client)
        started = time.time()
        t0 = time.perf_counter()
        zarr_store.create_array(
            out, shape=source.shape, chunks=(1, chunk, chunk), dtype=source.dtype, geometry=source.geometry
        )
        reader = WindowReader(str(tif), source.spatial_shape, source.dtype)  # type: ignore[arg-type]
        lazy = da.from_array(
            reader, chunks=(1, chunk, chunk), lock=False, meta=np.empty((0, 0, 0), source.dtype)
        )
        da.store(lazy, zarr.open_array(store=str(out), mode="r+"), lock=False, compute=True)  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "job_started_at": started,
        "roles": roles,
        "n_chunks": math.prod(-(-s // chunk) for s in source.spatial_shape),
        "output_bytes": {"zarr": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())},
    }


def child_skimage(tif: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Read the band into memory, ``threshold_otsu`` + ``image > t``, timed (no cluster)."""
    from skimage.filters import threshold_otsu

    started = time.time()
    t0 = time.perf_counter()
    with rasterio.open(tif) as ds:
        image = ds.read(1)
    t1 = time.perf_counter()
    threshold = threshold_otsu(image)
    t2 = time.perf_counter()
    mask = image > threshold
    t3 = time.perf_counter()
    return {
        "wall_s": t3 - t0,
        "job_started_at": started,
        "roles": {"client": os.getpid()},
        "timings_s": {"read": t1 - t0, "threshold_otsu": t2 - t1, "compare": t3 - t2},
        "threshold": float(threshold),
        "foreground_px": int(np.count_nonzero(mask)),
    }


CHILDREN = {"segpipe": child_segpipe, "zarr-copy": child_zarr_copy, "skimage": child_skimage}


def child_main(argv: list[str]) -> None:
    """Entry of the ``_child KIND TIF OUT RESULT SETTINGS`` subprocess."""
    kind, tif, out, result, settings = argv
    record = CHILDREN[kind](Path(tif), Path(out), json.loads(settings))
    Path(result).write_text(json.dumps(record, default=str))


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 4.0], help="input sizes, GiB")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new /tmp dir)")
    p.add_argument("--formats", default="zarr,cog", help="segpipe output formats: zarr,cog or zarr")
    p.add_argument("--chunk", type=int, default=512, help="segpipe tiling.chunk (square)")
    p.add_argument("--memory-limit", default="2GiB", help="per-worker memory limit (segpipe default)")
    p.add_argument(
        "--skimage-max-gb", type=float, default=1.5, help="run the in-memory baseline up to this size"
    )
    return p.parse_args(argv)


def check_disk(workdir: Path, sizes: list[float]) -> None:
    """Refuse to start when the scratch disk cannot hold the largest input and its copies."""
    need = max(sizes) * GIB * 3
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"{workdir}: {free / GIB:.1f} GiB free, need about {need / GIB:.1f} GiB")


def main(argv: list[str]) -> None:
    """Run every measurement, print the table, write the JSON."""
    args = parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if formats not in (["zarr", "cog"], ["zarr"]):
        raise SystemExit("--formats must be zarr,cog or zarr")
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_otsu-", dir="/tmp")) if own else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    check_disk(workdir, args.sizes_gb)
    settings = Settings(workdir, formats, args.chunk, args.memory_limit)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        for size in sorted(args.sizes_gb):
            records += bench_size(size, settings, run_skimage=size <= args.skimage_max_gb)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    add_ratios(records)
    text = render(records, settings)
    print(text)
    path = write_json(records, settings, text)
    print(f"\nwhole benchmark {time.perf_counter() - t0:.0f} s; JSON: {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child_main(sys.argv[2:])
    elif sys.argv[1:2] == ["_cluster"]:
        serve_cluster(json.loads(sys.argv[2]))
    else:
        main(sys.argv[1:])
