"""Machinery shared by the benchmarks: input tiling, per-process RSS sampling, clusters, tables.

* :func:`mirror_period` / :func:`strip_rows`: tile a real image chip into a raster of any
  size, one row strip at a time, with no seams;
* :class:`TreeSampler` / :func:`run_sampled` / :func:`memory_report`: run a measurement in a
  subprocess while a background thread samples, with psutil, the RSS and CPU time of every
  process in its tree, and the CPU that processes outside the tree used meanwhile;
* :func:`cluster_host`: a ``LocalCluster`` built by :func:`pipeline.cluster.connect` in a
  subprocess of the caller (``python benchmarks/common.py _cluster SETTINGS``), so the
  measurement's client, the scheduler (with the nannies) and each worker are separate
  processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
#: The shared real data (its README gives provenance): beside the repository, or $SEGPIPE_DATA.
DATA = Path(os.environ.get("SEGPIPE_DATA", REPO.parent / "shared" / "data"))
SOURCE_TIF = DATA / "geo" / "Spain_7370579_S2Hand.tif"
GIB = 2**30
MIB = 2**20
SAMPLE_EVERY_S = 0.1
SERIES_POINTS = 400
FOREIGN_WARN_PCT = 10


# --------------------------------------------------------------------------- input data


def mirror_period(tile: np.ndarray) -> np.ndarray:
    """A 2x2 mirrored arrangement of ``tile`` (last two axes): repeating it leaves no seams."""
    top = np.concatenate([tile, tile[..., ::-1]], axis=-1)
    return np.concatenate([top, top[..., ::-1, :]], axis=-2)


def strip_rows(period: np.ndarray, row0: int, height: int, width: int) -> np.ndarray:
    """Rows ``row0 .. row0+height`` of the infinite tiling of ``period`` (last two axes)."""
    ph, pw = period.shape[-2:]
    rows = period[..., np.arange(row0, row0 + height) % ph, :]
    reps = -(-width // pw)
    return np.tile(rows, (1,) * (rows.ndim - 1) + (reps,))[..., :width]


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
        self.busy0 = busy_cpu_s()
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
        self.busy_s = busy_cpu_s() - self.busy0
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
        stat.hwm = max(stat.hwm, vm_hwm(proc.pid))
        cpu = proc.cpu_times()
        stat.cpu_s = max(stat.cpu_s, cpu.user + cpu.system)
        stat.last_s = now
        stat.series.append((now, rss))


def busy_cpu_s() -> float:
    """CPU seconds spent busy by the whole machine (all cores) since boot."""
    t = psutil.cpu_times()
    return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)


def vm_hwm(pid: int | str) -> int:
    """The kernel's peak RSS (VmHWM) of ``pid`` (or ``"self"``) in bytes, 0 if unreadable."""
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


def label_processes(
    stats: dict[int, ProcStat],
    roles: dict[str, Any],
    scheduler: str = "scheduler+nannies",
    tracker: str = "mp-resource-tracker",
) -> dict[int, str]:
    """Role of each sampled pid from the pids the child reported.

    ``scheduler`` names the cluster host process; ``tracker`` (a format string of ``pid``)
    names multiprocessing resource trackers.
    """
    labels = {int(roles["client"]): "client"}
    if roles.get("scheduler"):
        labels[int(roles["scheduler"])] = scheduler
    for i, (_addr, pid) in enumerate(sorted(roles.get("workers", {}).items()), start=1):
        labels[int(pid)] = f"worker-{i}"
    for pid, stat in stats.items():
        if pid in labels:
            continue
        if "resource_tracker" in stat.cmdline:
            labels[pid] = tracker.format(pid=pid)
        elif "spawn_main" in stat.cmdline:
            labels[pid] = f"worker-restarted-{pid}"
        else:
            labels[pid] = f"other-{pid}"
    return labels


def memory_report(sampler: TreeSampler, roles: dict[str, Any], t_job: float, **names: str) -> dict[str, Any]:
    """Per-role peak RSS (sampled, kernel VmHWM), CPU seconds, RSS series from job start.

    ``names``: the role names of :func:`label_processes` (``scheduler``, ``tracker``).
    """
    labels = label_processes(sampler.stats, roles, **names)
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


def run_sampled(cmd: list[str], log: Path, timeout_s: float | None = None) -> tuple[int | None, TreeSampler]:
    """Run ``cmd`` (output to ``log``) while sampling its process tree; exit status and sampler.

    With ``timeout_s``, a run still going after that many seconds is killed (its whole process
    tree) and its exit status is ``None``.
    """
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        with TreeSampler(proc.pid) as sampler:
            rc = wait_or_kill(proc, timeout_s)
    return rc, sampler


def wait_or_kill(proc: subprocess.Popen[bytes], timeout_s: float | None) -> int | None:
    """Exit status of ``proc``; ``None`` when it ran past ``timeout_s`` and was killed."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        return None


def kill_tree(pid: int) -> None:
    """Kill ``pid`` (a process this benchmark started) and all its descendants, by pid."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for proc in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def add_usage(
    record: dict[str, Any], sampler: TreeSampler, start_key: str = "job_started_at", **names: str
) -> None:
    """Memory per role, CPU of the tree, and the CPU used by foreign processes meanwhile.

    The RSS series count from ``record[start_key]``; ``names`` as for :func:`label_processes`.
    """
    record["memory"] = memory_report(sampler, record.pop("roles"), record[start_key], **names)
    tree_cpu = sum(s.cpu_s for s in sampler.stats.values())
    record["cpu_s_tree"] = round(tree_cpu, 2)
    record["cpu_s_foreign"] = round(max(0.0, sampler.busy_s - tree_cpu), 2)
    capacity = sampler.duration_s * (os.cpu_count() or 1)
    record["foreign_load_pct"] = round(100 * record["cpu_s_foreign"] / capacity, 1)


def peak(record: dict[str, Any], role: str, key: str = "peak_rss_mib") -> float | None:
    """Sampled peak RSS (MiB), or another ``key``, of process ``role`` in a record."""
    entry = record["memory"].get(role)
    return None if entry is None else entry[key]


def worker_peaks(record: dict[str, Any]) -> list[float]:
    """Sampled peak RSS (MiB) of every worker process (restarted ones included)."""
    return [v["peak_rss_mib"] for k, v in record["memory"].items() if k.startswith("worker")]


# --------------------------------------------------------------------------- clusters


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
    """Child mode ``_cluster``: hold a LocalCluster open until stdin closes.

    With ``settings["scratch"]``, the workers spill under that folder.
    """
    from pipeline.cluster import connect

    if settings.get("scratch"):  # spill files under the benchmark's workdir, deleted with it
        import dask

        os.environ["DASK_TEMPORARY_DIRECTORY"] = settings["scratch"]
        dask.config.set({"temporary-directory": settings["scratch"]})
    with connect(
        n_workers=settings["n_workers"],
        threads_per_worker=settings["threads_per_worker"],
        memory_limit=settings["memory_limit"],
        dashboard=False,
    ) as client:
        client.wait_for_workers(settings["n_workers"])
        print(client.scheduler_info()["address"], flush=True)
        sys.stdin.read()


def timed_job(raw: dict[str, Any], settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the job ``raw`` (a job file's content) on a fresh cluster (:func:`cluster_host`),
    timed from plan to summary; the measurement's record (wall, start, process roles, stage
    times, chunks) and the job's ``summary.json``."""
    from pipeline.cluster import connect
    from pipeline.runner.api import run_job
    from pipeline.runner.spec import parse_job, resolve_paths

    spec = resolve_paths(parse_job(raw), base=REPO)
    with cluster_host(settings) as address, connect(scheduler=address) as client:
        roles = cluster_roles(client)
        started = time.time()
        t0 = time.perf_counter()
        run_job(spec, client=client)
        wall = time.perf_counter() - t0
    summary = json.loads((Path(str(spec.output.dir)) / "summary.json").read_text())
    record = {
        "wall_s": wall,
        "job_started_at": started,
        "roles": roles,
        "timings_s": summary["timings_s"],
        "n_chunks": summary["tiling"]["n_chunks"],
    }
    return record, summary


def cluster_roles(client: Any) -> dict[str, Any]:
    """Pids of this client, the scheduler and each worker."""
    return {
        "client": os.getpid(),
        "scheduler": client.run_on_scheduler(os.getpid),
        "workers": client.run(os.getpid),
    }


# --------------------------------------------------------------------------- misc


def tree_bytes(path: Path) -> dict[str, int]:
    """Bytes on disk of each top-level entry of ``path``."""
    sizes = {}
    for child in path.iterdir():
        files = [child] if child.is_file() else [p for p in child.rglob("*") if p.is_file()]
        sizes[child.name] = sum(p.stat().st_size for p in files)
    return sizes


def remove(path: Path) -> None:
    """Delete a file or a folder tree, if present."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def say(text: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


def fmt(value: float | None, width: int, spec: str) -> str:
    """``value`` formatted with ``spec`` right-aligned in ``width``, or ``-`` when missing."""
    return ("-" if value is None else format(value, spec)).rjust(width)


def machine() -> dict[str, Any]:
    """CPU count, RAM, Python and platform of this machine (for the JSON results)."""
    return {
        "cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def check_disk(workdir: Path, need_bytes: float) -> None:
    """Refuse to start when the scratch disk has less than ``need_bytes`` free."""
    free = shutil.disk_usage(workdir).free
    if free < need_bytes:
        raise SystemExit(f"{workdir}: {free / GIB:.1f} GiB free, need about {need_bytes / GIB:.1f} GiB")


if __name__ == "__main__" and sys.argv[1:2] == ["_cluster"]:
    serve_cluster(json.loads(sys.argv[2]))
