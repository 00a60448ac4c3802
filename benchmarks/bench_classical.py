"""Benchmark every classical segmenter: the tiled segpipe job against skimage/scipy on the whole array.

One command generates a 4-band uint16 GeoTIFF (default 1 GiB) by tiling the real Sentinel-2
bands B3, B4, B8 and B11 of the Sen1Floods11 chip, then for each segmenter measures:

* ``segpipe``  the job (formats [zarr]) on a LocalCluster of 2 worker processes x 1 thread
  (``pipeline.cluster.connect``), from plan to ``summary.json``
* ``skimage``  the same skimage/scipy functions on the whole bands read into one process

and compares the two label maps on a sample of windows (semantic: differing pixels; instance:
object counts, foreground and a one-to-one id map per window). Every measurement runs in its
own subprocess; a background thread samples the RSS of its whole process tree with psutil.
Run ``python benchmarks/bench_classical.py -h``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from common import (
    FOREIGN_WARN_PCT,
    GIB,
    REPO,
    RESULTS,
    SAMPLE_EVERY_S,
    SOURCE_TIF,
    add_usage,
    check_disk,
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
    tree_bytes,
)
from rasterio.windows import Window

#: Band name -> 1-based band of the Sentinel-2 source chip (B1..B12 with B8A and B10).
SOURCE_BANDS = {"B3": 3, "B4": 4, "B8": 8, "B11": 12}
BAND_NAMES = tuple(SOURCE_BANDS)
BYTES_PER_PX = 2 * len(SOURCE_BANDS)  # uint16
ROLES = {"green": "B3", "red": "B4", "nir": "B8", "swir": "B11"}
#: Colour-infrared composite (NIR, red, green as R, G, B); reflectance x 10^4 up to 4000 is white.
CIR = ("B8", "B4", "B3")
CIR_WHITE = 4000.0


# --------------------------------------------------------------------------- cases


def otsu_b8(foreground: str = "above") -> dict[str, Any]:
    """An inner ``otsu`` spec on B8 (NIR)."""
    return {"name": "otsu", "params": {"band": "B8", "foreground": foreground}}


COLOUR_RULES: list[dict[str, Any]] = [
    {"class_name": "dark", "ranges": {"v": [0.0, 0.3]}},
    {"class_name": "vegetation", "ranges": {"h": [0.9, 0.05], "s": [0.3, 1.0]}},  # red in CIR
    {"class_name": "bright", "ranges": {"v": [0.6, 1.0]}},
]
WATER_MASK = {
    "name": "pipeline",
    "params": {
        "first": otsu_b8("below"),
        "steps": [{"op": "fill_holes", "max_size": 32}, {"op": "remove_small", "max_size": 32}],
    },
}


@dataclass(frozen=True)
class Case:
    """One segmenter run: its job parameters and what the whole-array reference computes."""

    name: str
    segmenter: str
    params: dict[str, Any]
    kind: str = "semantic"
    reference: str = ""


CASES = [
    Case("threshold", "threshold", {"band": "B8", "value": 2000}, reference="B8 > 2000"),
    Case("otsu", "otsu", {"band": "B8"}, reference="threshold_otsu(B8)"),
    Case("multi_otsu", "multi_otsu", {"band": "B8", "classes": 3}, reference="threshold_multiotsu(B8, 3)"),
    Case("li", "li", {"band": "B8"}, reference="threshold_li(B8)"),
    Case("yen", "yen", {"band": "B8"}, reference="threshold_yen(B8)"),
    Case("triangle", "triangle", {"band": "B8"}, reference="threshold_triangle(B8)"),
    Case(
        "local",
        "local",
        {"band": "B8", "block_size": 35, "method": "gaussian", "offset": -100},
        reference="threshold_local(B8, 35, 'gaussian', offset=-100)",
    ),
    Case(
        "index_threshold",
        "index_threshold",
        {"index": "mndwi", "bands": {"green": "B3", "swir": "B11"}, "threshold": "otsu"},
        reference="MNDWI(B3, B11) > threshold_otsu(MNDWI)",
    ),
    Case(
        "landcover_baseline",
        "landcover_baseline",
        {"bands": {"green": "B3", "red": "B4", "nir": "B8"}, "water_ndwi": "otsu", "vegetation_ndvi": 0.3},
        reference="NDWI > threshold_otsu(NDWI) -> water, NDVI > 0.3 -> vegetation",
    ),
    Case(
        "colour_range",
        "colour_range",
        {"bands": list(CIR), "space": "hsv", "max_value": CIR_WHITE, "rules": COLOUR_RULES},
        reference="skimage.color.rgb2hsv(CIR) + range rules",
    ),
    Case(
        "kmeans_colour",
        "kmeans_colour",
        {"bands": list(CIR), "space": "rgb", "max_value": CIR_WHITE, "k": 4, "seed": 0},
        reference="whole-image colour histogram -> weighted k-means -> nearest centre",
    ),
    Case("edges", "edges", {"band": "B8", "operator": "sobel"}, reference="sobel(B8) > threshold_otsu"),
    Case(
        "pipeline",
        "pipeline",
        {
            "first": otsu_b8(),
            "steps": [{"op": "opening", "radius": 2}, {"op": "remove_small", "max_size": 64}],
        },
        reference="otsu -> binary_opening(disk(2)) -> remove_small_objects(max_size=64)",
    ),
    Case(
        "components",
        "components",
        {"semantic": otsu_b8("below"), "connectivity": 1},
        kind="instance",
        reference="scipy.ndimage.label(B8 <= otsu)",
    ),
    Case(
        "watershed",
        "watershed",
        {"mask": WATER_MASK, "min_distance": 7, "max_object_size": 64},
        kind="instance",
        reference="EDT peaks (peak_local_max) -> skimage.segmentation.watershed",
    ),
]
BY_NAME = {c.name: c for c in CASES}


# --------------------------------------------------------------------------- input data


def raster_shape(size_gb: float, align: int = 512) -> tuple[int, int]:
    """A square shape (multiple of ``align``) of at least ``size_gb`` GB (10^9 bytes) of 4-band uint16."""
    side = math.sqrt(size_gb * 1e9 / BYTES_PER_PX)
    n = math.ceil(side / align) * align
    return n, n


def generate_geotiff(path: Path, shape: tuple[int, int], strip: int = 512) -> None:
    """Write the tiled 4-band uint16 GeoTIFF (band-interleaved), one row strip at a time."""
    with rasterio.open(SOURCE_TIF) as src:
        tile = src.read(list(SOURCE_BANDS.values())).astype(np.uint16)  # int16 values 70..6060
        crs, transform = src.crs, src.transform
    period = mirror_period(tile)
    profile = {
        "driver": "GTiff",
        "height": shape[0],
        "width": shape[1],
        "count": len(SOURCE_BANDS),
        "dtype": "uint16",
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "interleave": "band",
        "compress": "none",
        "BIGTIFF": "YES",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for i, name in enumerate(BAND_NAMES, start=1):
            dst.set_band_description(i, name)
        for row0 in range(0, shape[0], strip):
            h = min(strip, shape[0] - row0)
            dst.write(strip_rows(period, row0, h, shape[1]), window=Window(0, row0, shape[1], h))


def sample_windows(shape: tuple[int, int], chunk: int, n: int, size: int, seed: int = 0) -> list[list[int]]:
    """``n`` windows ``[y0, x0, h, w]``: half centred on chunk-grid corners (seams), the
    bottom-right (ragged) corner, the rest at seeded random places."""
    size = min(size, *shape)

    def at(cy: int, cx: int) -> list[int]:
        y0 = min(max(cy - size // 2, 0), shape[0] - size)
        x0 = min(max(cx - size // 2, 0), shape[1] - size)
        return [y0, x0, size, size]

    corners = [(y, x) for y in range(chunk, shape[0], chunk) for x in range(chunk, shape[1], chunk)]
    picks = np.linspace(0, len(corners) - 1, min(len(corners), n // 2)).round().astype(int).tolist()
    windows = [at(*corners[i]) for i in dict.fromkeys(picks) if corners]
    windows.append(at(shape[0], shape[1]))
    rng = np.random.default_rng(seed)
    while len(windows) < n:
        windows.append(at(int(rng.integers(shape[0])), int(rng.integers(shape[1]))))
    return windows[:n]


# --------------------------------------------------------------------------- orchestration


@dataclass
class Settings:
    """Options shared by the orchestrator and its children."""

    workdir: Path
    chunk: int
    memory_limit: str
    windows: int
    window_size: int
    n_workers: int = 2
    threads_per_worker: int = 1
    formats: list[str] = field(default_factory=lambda: ["zarr"])

    def child_json(self) -> dict[str, Any]:
        """What a child process needs."""
        return {
            "chunk": self.chunk,
            "memory_limit": self.memory_limit,
            "n_workers": self.n_workers,
            "threads_per_worker": self.threads_per_worker,
            "formats": self.formats,
            "windows": self.windows,
            "window_size": self.window_size,
        }


def run_child(kind: str, case: Case, tif: Path, out: Path, settings: Settings) -> dict[str, Any]:
    """Run one measurement in a subprocess, sampling its process tree; return its record."""
    result = settings.workdir / f"{case.name}-{kind}.result.json"
    log = settings.workdir / f"{case.name}-{kind}.log"
    args = [str(tif), str(out), str(result), json.dumps(settings.child_json())]
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, case.name, *args]
    rc, sampler = run_sampled(cmd, log)
    if rc != 0 or not result.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{kind} {case.name} failed (exit {rc}); log {log}:\n{tail}")
    record = json.loads(result.read_text())
    add_usage(record, sampler)
    result.unlink()
    return record


def bench_case(case: Case, tif: Path, mpx: float, settings: Settings) -> dict[str, Any]:
    """segpipe, then skimage (which compares its result with segpipe's); the segpipe output is deleted."""
    out = settings.workdir / f"{case.name}-segpipe"
    record: dict[str, Any] = {"case": case.name, "kind": case.kind, "reference": case.reference}
    try:
        for kind in ("segpipe", "skimage"):
            say(f"[{case.name}] {kind} ...")
            run = run_child(kind, case, tif, out, settings)
            run["mpx_per_s"] = mpx / run["wall_s"]
            record[kind] = run
            say(f"[{case.name}]   {run['wall_s']:.1f} s, {run['mpx_per_s']:.1f} Mpx/s")
        record["seg_vs_ski"] = record["segpipe"]["mpx_per_s"] / record["skimage"]["mpx_per_s"]
        record["agreement"] = record["skimage"].pop("agreement")
        say(f"[{case.name}]   agreement: {agreement_text(record)}")
    except RuntimeError as e:
        say(f"[{case.name}]   FAILED: {e}")
        record["error"] = str(e)
    finally:
        remove(out)
    return record


# --------------------------------------------------------------------------- report


def agreement_text(record: dict[str, Any]) -> str:
    """Short agreement verdict: differing pixels, or object counts and per-window checks."""
    a = record.get("agreement")
    if a is None:
        return "-"
    px = f"{a['compared_px'] / 1e6:.1f}M"
    if record["kind"] == "semantic":
        return f"{a['differing_px']} of {px} px differ"
    return (
        f"objects {a['objects_segpipe']} vs {a['objects_skimage']}; of {px} px, "
        f"{a['foreground_differing_px']} differ in foreground, {a['id_differing_px']} in ids"
    )


def main_table(records: list[dict[str, Any]]) -> str:
    """The side-by-side table, one row per segmenter."""
    head = (
        f"{'segmenter':<18} {'kind':<4} {'seg s':>6} {'seg Mpx/s':>9} {'ski s':>6} {'ski Mpx/s':>9} "
        f"{'seg/ski':>7} {'w-1 MiB':>7} {'w-2 MiB':>7} {'ski MiB':>7} {'load %':>7}  agreement"
    )
    lines = [head, "-" * (len(head) + 40)]
    for r in records:
        if "error" in r:
            lines.append(f"{r['case']:<18} {r['kind'][:4]:<4} FAILED (see the JSON)")
            continue
        s, k = r["segpipe"], r["skimage"]
        load = f"{s['foreign_load_pct']:.0f}/{k['foreign_load_pct']:.0f}"
        lines.append(
            f"{r['case']:<18} {r['kind'][:4]:<4} {s['wall_s']:>6.1f} {s['mpx_per_s']:>9.2f} "
            f"{k['wall_s']:>6.1f} {k['mpx_per_s']:>9.2f} {r['seg_vs_ski']:>7.2f} "
            f"{fmt(peak(s, 'worker-1'), 7, '.0f')} {fmt(peak(s, 'worker-2'), 7, '.0f')} "
            f"{fmt(peak(k, 'client'), 7, '.0f')} {load:>7}  {agreement_text(r)}"
        )
    return "\n".join(lines)


def short(value: Any) -> str:
    """Fitted values, compactly (nested lists by their shape)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={short(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list) and value and isinstance(value[0], list):
        return "x".join(map(str, np.shape(value))) + " values"
    if isinstance(value, list):
        return "[" + ", ".join(short(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def fitted_text(seg: dict[str, Any], ski: dict[str, Any]) -> str:
    """segpipe's fitted values, and whether the whole-array fit found the same."""
    if not ski:
        return short(seg)
    same = all(k in seg and np.allclose(seg[k], v, rtol=0, atol=1e-12) for k, v in ski.items())
    return f"{short(seg)} ({'= skimage' if same else 'skimage: ' + short(ski)})"


def stage_table(records: list[dict[str, Any]]) -> str:
    """segpipe's stages, chunks and halo; fitted values of both sides; CPU and client/scheduler RSS."""
    head = (
        f"{'segmenter':<18} {'chunks':>6} {'halo':>4} {'ingest':>6} {'fit':>6} {'segment':>7} {'seams':>5} "
        f"{'final':>5} {'seg cpu':>7} {'ski cpu':>7} {'client':>6} {'sched':>6}  fitted by segpipe"
    )
    lines = [head, "-" * (len(head) + 20)]
    for r in (r for r in records if "error" not in r):
        s, k, t = r["segpipe"], r["skimage"], r["segpipe"]["timings_s"]
        seg_cpu = sum(v["cpu_s"] for v in s["memory"].values())
        lines.append(
            f"{r['case']:<18} {s['n_chunks']:>6} {s['halo']:>4} {t['ingest']:>6.1f} {t['fit']:>6.1f} "
            f"{t['segment']:>7.1f} {fmt(t.get('seam_check'), 5, '.1f')} {t['finalize']:>5.1f} "
            f"{seg_cpu:>7.1f} {k['cpu_s_tree']:>7.1f} "
            f"{fmt(peak(s, 'client'), 6, '.0f')} {fmt(peak(s, 'scheduler+nannies'), 6, '.0f')}  "
            f"{fitted_text(s['fitted'], k['fitted'])}"
        )
    return "\n".join(lines)


def notes(records: list[dict[str, Any]], settings: Settings, data: dict[str, Any]) -> list[str]:
    """Explanations and warnings printed under the tables."""
    lines = [
        f"input: {data['shape'][0]}x{data['shape'][1]} px x 4 bands uint16 (B3, B4, B8, B11) = "
        f"{data['bytes'] / GIB:.2f} GiB ({data['bytes'] / 1e9:.2f} GB), {data['mpx']:.0f} Mpx; the "
        f"Sen1Floods11 S2 chip {SOURCE_TIF.name} mirrored and repeated; tiled 512x512, band-interleaved, "
        "uncompressed, no nodata; read from a warm page cache.",
        "seams: segpipe's own seam_check stage (semantic only; windows on chunk corners re-segmented "
        "whole); segment includes label, seams and relabel for instance segmenters.",
        f"segpipe: chunk {settings.chunk}x{settings.chunk}, formats {settings.formats}, "
        f"{settings.n_workers} workers x {settings.threads_per_worker} thread, memory_limit "
        f"{settings.memory_limit} each; wall = run_job (plan .. summary.json), cluster start-up excluded.",
        "skimage: the same skimage/scipy functions on the whole bands in one process; wall = reading "
        "the bands it needs from the GeoTIFF + computing (imports excluded).",
        "seg/ski: segpipe throughput / skimage throughput (= skimage wall / segpipe wall); "
        ">1: segpipe faster.",
        f"MiB: peak RSS sampled every {SAMPLE_EVERY_S}s; w-1, w-2 = segpipe's worker processes, ski = "
        "the skimage process; client and scheduler(+nannies) RSS in the second table, VmHWM in the JSON.",
        "load %: CPU used by processes outside the benchmark, as a share of all cores, during "
        "segpipe/skimage.",
        f"agreement: {settings.windows} windows of {settings.window_size}x{settings.window_size} px "
        "(half centred on chunk-grid corners, one at the ragged bottom-right corner, the rest random) "
        "of segpipe's staging.zarr/labels against the whole-array result; instance objects = segpipe "
        "summary.json `instances.objects` vs the reference's label count; 'in ids': pixels of the "
        "common foreground that a one-to-one map between segpipe's and the reference's ids misses "
        "(0: the same partition).",
    ]
    busy = [
        f"{r['case']}/{kind}"
        for r in records
        if "error" not in r
        for kind in ("segpipe", "skimage")
        if r[kind]["foreign_load_pct"] > FOREIGN_WARN_PCT
    ]
    if busy:
        which = f"all {len(busy)}" if len(busy) == 2 * len(records) else f"{len(busy)} ({', '.join(busy)})"
        lines.append(
            f"WARNING: other processes used more than {FOREIGN_WARN_PCT}% of the machine's CPU during "
            f"{which} of the measurements; those timings are inflated."
        )
    return lines


def render(records: list[dict[str, Any]], settings: Settings, data: dict[str, Any]) -> str:
    """Everything printed at the end."""
    return "\n\n".join([main_table(records), stage_table(records), "\n".join(notes(records, settings, data))])


def write_json(
    path: Path, records: list[dict[str, Any]], settings: Settings, data: dict[str, Any], text: str
) -> None:
    """The records, settings and printed tables as JSON (rewritten after every segmenter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "segpipe_git": git_state(),
        "settings": {**settings.child_json(), "source": str(SOURCE_TIF), "bands": SOURCE_BANDS},
        "input": data,
        "cases": {c.name: {"segmenter": c.segmenter, "params": c.params} for c in CASES},
        "table": text,
        "records": records,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))


def git_state() -> dict[str, str]:
    """The commit the engine ran from, and ``git status`` of pipeline/ (others may edit it)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {"head": git("rev-parse", "HEAD"), "pipeline_status": git("status", "--porcelain", "pipeline")}


def rerender(path: Path) -> None:
    """Print the tables of a saved run again (``--from-json``)."""
    saved = json.loads(path.read_text())
    s = saved["settings"]
    settings = Settings(Path(), s["chunk"], s["memory_limit"], s["windows"], s["window_size"])
    print(render(saved["records"], settings, saved["input"]))
    total = saved["input"].get("total_s")
    print(f"\nwhole benchmark {total:.0f} s; saved {saved['created']}; JSON: {path}" if total else "")


# --------------------------------------------------------------------------- children: segpipe


def child_segpipe(case: Case, tif: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The segpipe job for ``case`` on the GeoTIFF, timed end to end (plan .. summary)."""
    from pipeline.cluster import connect
    from pipeline.runner.api import run_job
    from pipeline.runner.spec import parse_job, resolve_paths

    raw = {
        "name": f"bench-{case.name}",
        "input": {"path": str(tif)},
        "segmenter": {"name": case.segmenter, "params": case.params},
        "tiling": {"chunk": [settings["chunk"]] * 2},
        "output": {"dir": str(out), "formats": settings["formats"]},
        "cluster": {k: settings[k] for k in ("n_workers", "threads_per_worker", "memory_limit")},
    }
    spec = resolve_paths(parse_job(raw), base=REPO)
    with cluster_host(settings) as address, connect(scheduler=address) as client:
        roles = cluster_roles(client)
        started = time.time()
        t0 = time.perf_counter()
        result = run_job(spec, client=client)
        wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_s": wall,
        "job_started_at": started,
        "roles": roles,
        "timings_s": summary["timings_s"],
        "fitted": summary["segmenter"].get("fitted", {}),
        "instances": summary.get("instances", {}),
        "n_chunks": len(result.plan.grid),
        "halo": max(result.plan.grid.halo),
        "output_bytes": tree_bytes(out),
    }


# --------------------------------------------------------------------------- children: references


class Bands:
    """Whole bands of the benchmark GeoTIFF by name, read once on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.cache:
            with rasterio.open(self.path) as ds:
                self.cache[name] = ds.read(ds.descriptions.index(name) + 1)
        return self.cache[name]

    def unit_rgb(self, names: tuple[str, str, str], white: float) -> np.ndarray:
        """Three bands as float64 RGB in [0, 1], ``(3, H, W)``."""
        return np.clip(np.stack([self[n].astype(np.float64) for n in names]) / white, 0.0, 1.0)


@dataclass
class Reference:
    """A whole-array result: the label map, fitted values, and (instances) the object count."""

    labels: np.ndarray
    fitted: dict[str, Any] = field(default_factory=dict)
    objects: int | None = None


def nd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) / (a + b)`` in float64, 0 where ``a + b == 0``."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    total = a + b
    out = np.zeros(total.shape)
    np.divide(a - b, total, out=out, where=total != 0)
    return out


def ref_threshold(bands: Bands) -> Reference:
    return Reference((bands["B8"] > BY_NAME["threshold"].params["value"]).astype(np.uint8))


def ref_global(method: str) -> Callable[[Bands], Reference]:
    """``image > threshold_<method>(image)`` on B8."""

    def run(bands: Bands) -> Reference:
        from skimage import filters

        b8 = bands["B8"]
        t = float(getattr(filters, f"threshold_{method}")(b8))
        return Reference((b8 > t).astype(np.uint8), {"threshold": t})

    return run


def ref_multi_otsu(bands: Bands) -> Reference:
    from skimage import filters

    b8 = bands["B8"]
    t = filters.threshold_multiotsu(b8, classes=BY_NAME["multi_otsu"].params["classes"])
    return Reference(np.digitize(b8, t).astype(np.uint8), {"thresholds": t.tolist()})


def ref_local(bands: Bands) -> Reference:
    from skimage import filters

    p = BY_NAME["local"].params
    b8 = bands["B8"]
    local = filters.threshold_local(b8, p["block_size"], p["method"], offset=p["offset"], mode="reflect")
    return Reference((b8 > local).astype(np.uint8))


def ref_index(bands: Bands) -> Reference:
    from skimage import filters

    mndwi = nd(bands["B3"], bands["B11"])
    t = float(filters.threshold_otsu(mndwi))
    return Reference((mndwi > t).astype(np.uint8), {"threshold": t})


def ref_landcover(bands: Bands) -> Reference:
    from skimage import filters

    ndwi = nd(bands["B3"], bands["B8"])
    water_t = float(filters.threshold_otsu(ndwi))
    veg_t = BY_NAME["landcover_baseline"].params["vegetation_ndvi"]
    out = np.full(ndwi.shape, 3, np.uint8)
    out[nd(bands["B8"], bands["B4"]) > veg_t] = 2
    out[ndwi > water_t] = 1
    return Reference(out, {"water_ndwi": water_t})


def ref_colour_range(bands: Bands) -> Reference:
    from skimage import color

    hsv = color.rgb2hsv(bands.unit_rgb(CIR, CIR_WHITE), channel_axis=0)
    out = np.zeros(hsv.shape[1:], np.uint8)
    for cid, rule in reversed(list(enumerate(COLOUR_RULES, start=1))):  # the first rule wins
        hit = np.ones(out.shape, bool)
        for ch, (lo, hi) in rule["ranges"].items():
            x = hsv["hsv".index(ch)]
            hit &= ((x >= lo) & (x <= hi)) if lo <= hi else ((x >= lo) | (x <= hi))
        out[hit] = cid
    return Reference(out)


def ref_kmeans(bands: Bands) -> Reference:
    """skimage has no k-means: segpipe's fit kernels (colour histogram, weighted k-means) on the
    whole array's histogram, then every pixel to its nearest centre."""
    from pipeline.models.classical import kmeans as km
    from pipeline.models.classical.colour import rgb_to_lab

    p = BY_NAME["kmeans_colour"].params
    levels = 64
    rgb = bands.unit_rgb(CIR, CIR_WHITE)
    codes = np.zeros(rgb.shape[1:], np.int64)
    for c in range(3):
        codes = codes * levels + np.minimum((rgb[c] * levels).astype(np.int64), levels - 1)
    counts = np.bincount(codes.ravel(), minlength=levels**3)
    del codes
    occupied = np.flatnonzero(counts)
    colours, weights = km.bin_colours(occupied, levels), counts[occupied].astype(np.float64)
    points = km.cluster_features(colours, p["space"])
    centres = km.weighted_kmeans(points, weights, p["k"], seed=p["seed"], n_init=4, max_iter=100)
    centres = km.lightness_order(centres, points, weights, rgb_to_lab(colours)[0])
    features = km.cluster_features(rgb, p["space"])
    del rgb
    return Reference(km.nearest_centre(features, centres).astype(np.uint8), {"centres": centres.tolist()})


def ref_edges(bands: Bands) -> Reference:
    from skimage import filters

    mag = filters.sobel(bands["B8"].astype(np.float64))
    t = float(filters.threshold_otsu(mag))
    return Reference((mag > t).astype(np.uint8), {"threshold": t})


def ref_pipeline(bands: Bands) -> Reference:
    from skimage import filters, morphology

    b8 = bands["B8"]
    t = float(filters.threshold_otsu(b8))
    steps = BY_NAME["pipeline"].params["steps"]
    mask = morphology.binary_opening(b8 > t, footprint=morphology.disk(steps[0]["radius"]))
    mask = morphology.remove_small_objects(mask, max_size=steps[1]["max_size"])
    return Reference(mask.astype(np.uint8), {"threshold": t})


def ref_components(bands: Bands) -> Reference:
    from scipy import ndimage
    from skimage import filters

    b8 = bands["B8"]
    t = float(filters.threshold_otsu(b8))
    labels, n = ndimage.label(b8 <= t)
    return Reference(labels, {"threshold": t}, objects=int(n))


def ref_watershed(bands: Bands) -> Reference:
    from scipy import ndimage
    from skimage import filters, morphology, segmentation
    from skimage.feature import peak_local_max

    p = BY_NAME["watershed"].params
    steps = WATER_MASK["params"]["steps"]  # type: ignore[index]
    b8 = bands["B8"]
    t = float(filters.threshold_otsu(b8))
    mask = morphology.remove_small_holes(b8 <= t, max_size=steps[0]["max_size"])
    mask = morphology.remove_small_objects(mask, max_size=steps[1]["max_size"])
    distance = ndimage.distance_transform_edt(mask)
    objects, _ = ndimage.label(mask)
    peaks = peak_local_max(distance, min_distance=p["min_distance"], labels=objects, exclude_border=False)
    del objects
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-distance, markers, mask=mask)
    return Reference(labels, {"threshold": t}, objects=int(len(np.unique(labels)) - 1))


REFERENCES: dict[str, Callable[[Bands], Reference]] = {
    "threshold": ref_threshold,
    "otsu": ref_global("otsu"),
    "multi_otsu": ref_multi_otsu,
    "li": ref_global("li"),
    "yen": ref_global("yen"),
    "triangle": ref_global("triangle"),
    "local": ref_local,
    "index_threshold": ref_index,
    "landcover_baseline": ref_landcover,
    "colour_range": ref_colour_range,
    "kmeans_colour": ref_kmeans,
    "edges": ref_edges,
    "pipeline": ref_pipeline,
    "components": ref_components,
    "watershed": ref_watershed,
}


# --------------------------------------------------------------------------- children: comparison


def compare(case: Case, ref: Reference, seg_out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """segpipe's staging.zarr/labels against the whole-array result on a sample of windows."""
    import zarr

    seg = zarr.open_array(store=str(seg_out / "staging.zarr" / "labels"), mode="r")
    shape = (int(ref.labels.shape[0]), int(ref.labels.shape[1]))
    windows = sample_windows(shape, settings["chunk"], settings["windows"], settings["window_size"])
    acc: dict[str, Any] = {"windows": len(windows), "compared_px": 0, "differing_px": 0}
    if case.kind == "instance":
        acc |= {"foreground_differing_px": 0, "id_differing_px": 0}
    for y0, x0, h, w in windows:
        a, b = np.asarray(seg[y0 : y0 + h, x0 : x0 + w]), ref.labels[y0 : y0 + h, x0 : x0 + w]
        acc["compared_px"] += a.size
        if case.kind == "semantic":
            acc["differing_px"] += int(np.count_nonzero(a != b))
            continue
        acc["foreground_differing_px"] += int(np.count_nonzero((a > 0) != (b > 0)))
        acc["id_differing_px"] += id_mismatch(a, b)
    if case.kind == "instance":
        summary = json.loads((seg_out / "summary.json").read_text())
        acc["objects_segpipe"] = summary["instances"]["objects"]
        acc["objects_skimage"] = ref.objects
    acc["windows_yx_hw"] = windows
    return acc


def id_mismatch(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels of the common foreground of two label windows that a one-to-one id map misses.

    Each id is mapped to the id it shares most pixels with, in both directions; the result is
    the larger number of pixels left over (0 iff the two are the same partition up to ids).
    """
    both = (a > 0) & (b > 0)
    keys, counts = np.unique((a[both].astype(np.int64) << 32) | b[both].astype(np.int64), return_counts=True)
    total = int(counts.sum())
    return total - min(_best_matches(keys >> 32, counts), _best_matches(keys & 0xFFFFFFFF, counts))


def _best_matches(ids: np.ndarray, counts: np.ndarray) -> int:
    """Sum over distinct ``ids`` of the largest count paired with each."""
    if ids.size == 0:
        return 0
    order = np.argsort(ids, kind="stable")
    ids, counts = ids[order], counts[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return int(np.maximum.reduceat(counts, starts).sum())


def import_references() -> None:
    """Import every module the references use, so that imports stay out of the timing."""
    import importlib

    for name in ("scipy.ndimage", "skimage.color", "skimage.feature", "skimage.filters"):
        importlib.import_module(name)
    for name in ("skimage.morphology", "skimage.segmentation", "pipeline.models.classical.kmeans"):
        importlib.import_module(name)


def child_skimage(case: Case, tif: Path, seg_out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The whole-array reference, timed (read + compute); then the untimed comparison."""
    import os

    import_references()
    bands = Bands(tif)
    started = time.time()
    t0 = time.perf_counter()
    ref = REFERENCES[case.name](bands)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "job_started_at": started,
        "roles": {"client": os.getpid()},
        "fitted": ref.fitted,
        "objects": ref.objects,
        "agreement": compare(case, ref, seg_out, settings),
    }


CHILDREN = {"segpipe": child_segpipe, "skimage": child_skimage}


def child_main(argv: list[str]) -> None:
    """Entry of the ``_child KIND CASE TIF OUT RESULT SETTINGS`` subprocess."""
    kind, name, tif, out, result, settings = argv
    record = CHILDREN[kind](BY_NAME[name], Path(tif), Path(out), json.loads(settings))
    Path(result).write_text(json.dumps(record, default=str))


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ",".join(BY_NAME)
    p.add_argument("--only", default="", help=f"comma-separated segmenters (default all): {names}")
    p.add_argument("--size-gb", type=float, default=1.0, help="input size, GB = 10^9 bytes (at least)")
    p.add_argument("--chunk", type=int, default=2048, help="segpipe tiling.chunk (square)")
    p.add_argument("--memory-limit", default="2GiB", help="per-worker memory limit (segpipe default)")
    p.add_argument("--windows", type=int, default=16, help="windows compared per segmenter")
    p.add_argument("--window-size", type=int, default=1024, help="side of each compared window")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new /tmp dir)")
    p.add_argument("--from-json", type=Path, default=None, help="only print the tables of a saved run")
    return p.parse_args(argv)


def selected(only: str) -> list[Case]:
    """The cases named in ``--only`` (all when empty), in the benchmark's order."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise SystemExit(f"--only: unknown segmenter(s) {unknown}; choose from {', '.join(BY_NAME)}")
    return [c for c in CASES if not names or c.name in names]


def main(argv: list[str]) -> None:
    """Generate the input, run every selected case, print the tables, write the JSON."""
    args = parse_args(argv)
    if args.from_json is not None:
        rerender(args.from_json)
        return
    cases = selected(args.only)
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_classical-", dir="/tmp")) if own else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(workdir, args.chunk, args.memory_limit, args.windows, args.window_size)
    shape = raster_shape(args.size_gb)
    px = shape[0] * shape[1]
    data: dict[str, Any] = {"shape": list(shape), "bytes": px * BYTES_PER_PX, "mpx": px / 1e6}
    check_disk(workdir, 2.5 * data["bytes"])
    tif = workdir / "s2-b3-b4-b8-b11.tif"
    path = RESULTS / f"bench_classical-{time.strftime('%Y%m%d-%H%M%S')}.json"
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    try:
        say(f"generating {tif.name}: {shape[0]}x{shape[1]} x 4 bands uint16 ...")
        generate_geotiff(tif, shape)
        data["generate_s"] = round(time.perf_counter() - t0, 1)
        say(f"  {data['bytes'] / 1e9:.2f} GB in {data['generate_s']} s")
        for case in cases:
            records.append(bench_case(case, tif, data["mpx"], settings))
            write_json(path, records, settings, data, f"(partial: {len(records)} of {len(cases)})")
    finally:
        remove(tif)
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    data["total_s"] = round(time.perf_counter() - t0, 1)
    text = render(records, settings, data)
    print(text)
    write_json(path, records, settings, data, text)
    print(f"\nwhole benchmark {data['total_s']:.0f} s; JSON: {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
