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
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from common import (
    FOREIGN_WARN_PCT,
    GIB,
    RESULTS,
    SAMPLE_EVERY_S,
    SOURCE_TIF,
    add_usage,
    cluster_host,
    cluster_roles,
    fmt,
    machine,
    mirror_period,
    peak,
    remove,
    run_sampled,
    say,
    strip_rows,
    timed_job,
    tree_bytes,
    worker_peaks,
)
from common import check_disk as check_free
from rasterio.windows import Window

SOURCE_BAND = 8  # Sentinel-2 B8 (NIR), int16
BYTES_PER_PX = 2  # int16


# --------------------------------------------------------------------------- input data


def raster_shape(size_gib: float, align: int = 512) -> tuple[int, int]:
    """A square shape (multiple of ``align``) of at least ``size_gib`` GiB of int16 pixels."""
    side = math.sqrt(size_gib * GIB / BYTES_PER_PX)
    n = math.ceil(side / align) * align
    return n, n


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
    rc, sampler = run_sampled(cmd, log)
    if rc != 0 or not result.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{kind} on {tif.name} failed (exit {rc}); log {log}:\n{tail}")
    record = json.loads(result.read_text())
    add_usage(record, sampler)
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
            remove(out)
    finally:
        remove(tif)
    return records


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
            f"{r['mpx_per_s']:>7.1f} {fmt(ratio_sk, 7, '.3f')}{mark}"
            f"{fmt(r.get('vs_zarr_copy'), 8, '.3f')} {fmt(peak(r, 'client'), 10, '.0f')} "
            f"{fmt(peak(r, 'scheduler+nannies'), 9, '.0f')} {fmt(peak(r, 'worker-1'), 9, '.0f')} "
            f"{fmt(peak(r, 'worker-2'), 9, '.0f')}"
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
            f"{r['kind']:<10} {r['input_gib']:>8.2f} {fmt(c, 7, '.1f')} {fmt(sc, 7, '.1f')} "
            f"{fmt(w1, 8, '.1f')} {fmt(w2, 8, '.1f')} {r['cpu_s_foreign']:>8.1f} "
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
            f"{fmt(sk['threshold'] if sk else None, 9, 'g')}"
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
        "machine": machine(),
        "settings": {**_settings_json(settings), "source": str(SOURCE_TIF), "band": SOURCE_BAND},
        "table": text,
        "records": records,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


# --------------------------------------------------------------------------- children


def child_segpipe(tif: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The segpipe otsu job on the GeoTIFF, timed end to end (plan .. summary)."""
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
    record, summary = timed_job(raw, settings)
    return {
        **record,
        "threshold": summary["segmenter"]["fitted"]["threshold"],
        "outputs": sorted(summary["outputs"]),
        "output_bytes": tree_bytes(out),
    }


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
    check_free(workdir, max(sizes) * GIB * 3)


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
    else:
        main(sys.argv[1:])
