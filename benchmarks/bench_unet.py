"""Benchmark segpipe's ``unet`` segmenter against the bare network (2-D) and MONAI (3-D) (issue #5).

One command measures, side by side, in one run:

2-D, on a generated 4-band uint8 GeoTIFF (the real NAIP chip, mirrored and repeated):

* ``bare``          one process, ``torch.set_num_threads(2)``, the whole image in memory as
  normalised float32, non-overlapping tiles in batches through the same network under
  ``torch.inference_mode``; only the forward passes are timed. This is the ceiling.
* ``segpipe-crop``  ``segpipe run`` of a ``unet`` job (ingest, segment, finalize with a COG) on
  a LocalCluster of 2 worker processes x 1 thread, crop stitching, one forward pass per chunk
  (window = chunk + 2 halo), once per ``--chunks`` value.
* ``segpipe-blend`` the same job with blended windows (window 256, overlap 0.5, Gaussian), on a
  smaller image (``--blend-size``): an honest extra row, it computes ~4x the pixels.

Each throughput is in Mpx/s of the image; ``seg/bare`` is segpipe's divided by the bare forward
pass's (issue goal >= 0.85 for crop stitching).

3-D, on a generated CT-like int16 volume (the real TotalSegmentator example CT mirrored and
repeated), uncompressed NIfTI so that segpipe ingests it by region:

* ``segpipe-3d``    a ``unet`` job, blend stitching, Gaussian, on the same 2 x 1 cluster;
* ``monai``         ``monai.inferers.sliding_window_inference`` on the whole volume read with
  SimpleITK in one process with ``torch.set_num_threads(2)``, same weights, window, overlap,
  Gaussian mode, batch size and normalisation (the card's clip, mean, std), softmax predictor.

Reported: wall time ratio (segpipe / MONAI), peak RSS ratios (segpipe's largest worker, and the
sum of its processes' peaks, vs MONAI's process) and argmax agreement (fraction of voxels with
the same class in segpipe's labels zarr and MONAI's argmax). Every run also reports the CPU
seconds of its timed part, and the ratios in CPU per pixel, steadier than wall time when other
work shares the cores.

The 2-D network is the shipped ``landcover_unet`` when the engine has it; otherwise, and for 3-D,
random-weight U-Nets written by ``tests/helpers.py tiny_unet`` of the shipped models' shapes (2-D:
depth 3, width 16, 4 bands, 4 classes; 3-D: depth 2, width 16, 1 channel, 4 classes, HU clip
[-150, 250]); speed does not depend on the weights. Every measurement runs in its own subprocess
(``_child`` mode) while the orchestrator samples the RSS and CPU of its process tree and the CPU
used by foreign processes meanwhile. ``--engine-at REV`` runs segpipe as committed at REV rather
than the shared working tree. Run ``python benchmarks/bench_unet.py -h``; ``--quick`` is a ~2
minute smoke run (on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    DATA,
    FOREIGN_WARN_PCT,
    GIB,
    REPO,
    RESULTS,
    SAMPLE_EVERY_S,
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
    worker_peaks,
)

NAIP_TIF = DATA / "landcover" / "chesapeake_m_3907833_nw_17_1_naip-new.tif"
CT_NII = DATA / "medical" / "totalseg_example_ct_sm.nii.gz"
CLASSES_2D = {0: "water", 1: "tree_canopy", 2: "low_vegetation", 3: "barren_impervious"}
CLASSES_3D = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
CT_CLIP = (-150.0, 250.0)
BLEND_WINDOW_2D = 256
#: Set (to the snapshot folder) in the orchestrator and its children when ``--engine-at`` is given.
ENGINE_ENV = "BENCH_UNET_ENGINE"


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Options shared by the orchestrator and its children (children get them as JSON)."""

    workdir: str
    size: int = 4096
    chunks: list[int] = field(default_factory=lambda: [1536, 2048])
    blend_size: int = 2048
    blend_chunk: int = 1024
    bare_tile: int = 512
    batch_size: int = 4
    volume: list[int] = field(default_factory=lambda: [96, 256, 256])
    chunk_3d: list[int] = field(default_factory=lambda: [48, 256, 256])
    window_3d: list[int] = field(default_factory=lambda: [32, 96, 96])
    overlap: float = 0.5
    memory_limit: str = "4GiB"
    n_workers: int = 2
    threads_per_worker: int = 1
    run_timeout: float = 1200.0
    #: ``git archive`` snapshot of ``pipeline/`` the runs import (``--engine-at``); "" = working tree.
    engine: str = ""
    engine_rev: str = ""

    @property
    def cluster(self) -> dict[str, Any]:
        """Settings of :func:`common.cluster_host` (spill files under the workdir)."""
        return {
            "n_workers": self.n_workers,
            "threads_per_worker": self.threads_per_worker,
            "memory_limit": self.memory_limit,
            "scratch": str(Path(self.workdir) / "spill"),
        }

    @property
    def threads(self) -> int:
        """Cores segpipe's cluster computes on; the single-process baselines get as many."""
        return self.n_workers * self.threads_per_worker


QUICK = {
    "size": 1024,
    "chunks": [512],
    "blend_size": 512,
    "blend_chunk": 256,
    "volume": [64, 128, 128],
    "chunk_3d": [32, 128, 128],
}


# --------------------------------------------------------------------------- input data


def generate_geotiff(path: Path, side: int, strip: int = 512) -> dict[str, Any]:
    """A ``side`` x ``side`` 4-band uint8 tiled GeoTIFF tiling the real NAIP chip, strip by strip."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(NAIP_TIF) as src:
        chip = src.read()
        crs, transform = src.crs, src.transform
    period = mirror_period(chip)
    profile = {
        "driver": "GTiff",
        "height": side,
        "width": side,
        "count": chip.shape[0],
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "none",
        "interleave": "pixel",
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.descriptions = ("R", "G", "B", "NIR")
        for row0 in range(0, side, strip):
            h = min(strip, side - row0)
            dst.write(strip_rows(period, row0, h, side), window=Window(0, row0, side, h))
    flat = chip.reshape(chip.shape[0], -1).astype(np.float64)
    return {"mean": flat.mean(axis=1).tolist(), "std": flat.std(axis=1).tolist()}


def generate_volume(path: Path, shape: list[int]) -> dict[str, Any]:
    """An int16 volume tiling the real CT (mirrored on every axis), as uncompressed NIfTI."""
    import SimpleITK as sitk

    src = sitk.ReadImage(str(CT_NII))
    ct = sitk.GetArrayFromImage(src)  # (z, y, x)
    period = mirror_period(ct)
    period = np.concatenate([period, period[::-1]], axis=0)
    idx = [np.arange(n) % p for n, p in zip(shape, period.shape, strict=True)]
    vol = np.ascontiguousarray(period[np.ix_(*idx)]).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(src.GetSpacing())
    img.SetOrigin(src.GetOrigin())
    img.SetDirection(src.GetDirection())
    sitk.WriteImage(img, str(path), useCompression=False)
    clipped = np.clip(ct.astype(np.float64), *CT_CLIP)
    return {"mean": [float(clipped.mean())], "std": [float(clipped.std())]}


def shipped_card(name: str) -> str | None:
    """The card path of a shipped model (``pipeline/models/zoo/NAME``), if the engine has it."""
    from pipeline.errors import ConfigError
    from pipeline.models.torch.card import resolve_card

    try:
        return str(resolve_card(name))
    except ConfigError:
        return None


def make_cards(
    folder: Path, stats_2d: dict[str, Any] | None, stats_3d: dict[str, Any] | None
) -> dict[str, str]:
    """Model cards: the shipped ``landcover_unet`` for 2-D when present, else random-weight cards
    (tests/helpers.py ``tiny_unet``) of the shipped models' shapes, normalising like the data."""
    import yaml

    if not os.environ.get(ENGINE_ENV):  # with an engine snapshot, tests/ comes from it (PYTHONPATH)
        sys.path.insert(0, str(REPO))
    from tests.helpers import tiny_unet

    cards = {}
    if stats_2d is not None and (shipped := shipped_card("landcover_unet")) is not None:
        cards["2d"] = shipped
    elif stats_2d is not None:
        cards["2d"] = str(
            tiny_unet(
                folder / "unet2d",
                spatial_dims=2,
                bands=[1, 2, 3, 4],
                classes=CLASSES_2D,
                depth=3,
                width=16,
                mean=stats_2d["mean"],
                std=stats_2d["std"],
                patch=[64, 64],
            )
        )
    if stats_3d is not None:
        path = tiny_unet(
            folder / "unet3d",
            spatial_dims=3,
            bands=[1],
            classes=CLASSES_3D,
            depth=2,
            width=16,
            mean=stats_3d["mean"],
            std=stats_3d["std"],
            patch=[16, 64, 64],
        )
        raw = yaml.safe_load(path.read_text())
        raw["inputs"]["clip"] = list(CT_CLIP)  # the CT model's HU window (weights unchanged)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        cards["3d"] = str(path)
    return cards


# --------------------------------------------------------------------------- orchestration


def run_child(kind: str, args: dict[str, Any], settings: Settings, log: Path) -> dict[str, Any]:
    """Run one measurement in a subprocess, sampling its process tree; return its record."""
    result = log.with_suffix(".result.json")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_child",
        kind,
        json.dumps(args),
        str(result),
        json.dumps(asdict(settings)),
    ]
    rc, sampler = run_sampled(cmd, log, timeout_s=settings.run_timeout)
    if rc != 0 or not result.exists():
        why = f"timed out after {settings.run_timeout:.0f} s" if rc is None else f"exit {rc}"
        say(f"  {kind} FAILED ({why}); log {log}:\n{log.read_text()[-3000:]}")
        record = {"error": why, "log": str(log), "job_started_at": sampler.t0}
        record["roles"] = {"client": sampler.root.pid}
    else:
        record = json.loads(result.read_text())
    add_usage(record, sampler)
    record["kind"] = kind
    return record


def crop_window(chunk: int, card: str) -> int:
    """Crop-stitching window covering a whole read block (chunk + 2 halo): one pass per chunk."""
    from pipeline.models.torch.card import load_card
    from pipeline.models.torch.unet import receptive_extent

    depth = load_card(card).network.depth
    align = 2**depth
    halo = -(-max(receptive_extent(depth)) // align) * align
    return chunk + 2 * halo


def bench_2d(settings: Settings, workdir: Path, records: list[dict[str, Any]]) -> None:
    """Generate the GeoTIFFs and run bare, segpipe crop (each chunk) and segpipe blend."""
    tif = workdir / f"naip-{settings.size}.tif"
    t0 = time.perf_counter()
    say(f"[2d] generating {tif.name}: {settings.size}x{settings.size} x 4 bands uint8 ...")
    stats = generate_geotiff(tif, settings.size)
    blend_tif = tif
    if settings.blend_size and settings.blend_size != settings.size:
        blend_tif = workdir / f"naip-{settings.blend_size}.tif"
        generate_geotiff(blend_tif, settings.blend_size)
    card = make_cards(workdir / "models", stats, None)["2d"]
    say(f"[2d]   inputs and model card in {time.perf_counter() - t0:.1f} s")

    runs: list[tuple[str, dict[str, Any]]] = [("bare", {"tif": str(tif), "card": card})]
    for chunk in settings.chunks:
        params = {"stitch": "crop", "window": crop_window(chunk, card)}
        runs.append(("segpipe-2d", {"tif": str(tif), "card": card, "chunk": chunk, "params": params}))
    if settings.blend_size:
        params = {
            "stitch": "blend",
            "window": BLEND_WINDOW_2D,
            "overlap": settings.overlap,
            "blend": "gaussian",
        }
        runs.append(
            (
                "segpipe-2d",
                {"tif": str(blend_tif), "card": card, "chunk": settings.blend_chunk, "params": params},
            )
        )
    for i, (kind, args) in enumerate(runs):
        label = kind if kind == "bare" else f"{kind}-{args['params']['stitch']}-{args['chunk']}"
        say(f"[2d] {label} ...")
        args["out"] = str(workdir / f"out-{i}-{label}")
        record = run_child(kind, args, settings, workdir / f"{i}-{label}.log")
        record.update(label=label, dims=2, model=card)
        records.append(record)
        if "error" not in record:
            say(f"[2d]   {record['wall_s']:.1f} s, {record['mpx_per_s']:.3f} Mpx/s")
        remove(Path(args["out"]))


def bench_3d(settings: Settings, workdir: Path, records: list[dict[str, Any]]) -> None:
    """Generate the volume and run segpipe blend and MONAI on it; compare their argmax."""
    vol = workdir / ("ct-" + "x".join(map(str, settings.volume)) + ".nii")
    t0 = time.perf_counter()
    say(f"[3d] generating {vol.name}: int16 ...")
    stats = generate_volume(vol, settings.volume)
    card = make_cards(workdir / "models", None, stats)["3d"]
    say(f"[3d]   input and model card in {time.perf_counter() - t0:.1f} s")
    common = {"vol": str(vol), "card": card}
    out_seg, out_monai = workdir / "out-segpipe-3d", workdir / "out-monai"
    say("[3d] segpipe-3d ...")
    seg = run_child("segpipe-3d", {**common, "out": str(out_seg)}, settings, workdir / "segpipe-3d.log")
    say("[3d] monai ...")
    mon = run_child("monai", {**common, "out": str(out_monai)}, settings, workdir / "monai.log")
    for rec in (seg, mon):
        rec.update(label=rec["kind"], dims=3, model=card, mvox=math.prod(settings.volume) / 1e6)
    records += [seg, mon]
    if "error" in seg or "error" in mon:
        return
    say(f"[3d]   segpipe {seg['wall_s']:.1f} s, MONAI {mon['wall_s']:.1f} s")
    seg_labels = read_zarr_labels(out_seg / "staging.zarr" / "labels")
    monai_labels = np.load(out_monai / "argmax.npy")
    if seg_labels.shape != monai_labels.shape:
        raise RuntimeError(f"label shapes differ: segpipe {seg_labels.shape}, monai {monai_labels.shape}")
    same = seg_labels == monai_labels
    seg["agreement"] = float(same.mean())
    seg["differing_voxels"] = int(same.size - np.count_nonzero(same))
    seg["class_fractions"] = class_fractions(seg_labels, len(CLASSES_3D))
    mon["class_fractions"] = class_fractions(monai_labels, len(CLASSES_3D))
    seg["windows"] = segpipe_blend_windows(settings)
    remove(out_seg)
    remove(out_monai)


def read_zarr_labels(path: Path) -> np.ndarray:
    """segpipe's stitched label map from its staging store, without a leading band axis."""
    import zarr

    arr = np.asarray(zarr.open_array(store=str(path), mode="r")[...])
    return arr.reshape(arr.shape[-3:]) if arr.ndim > 3 else arr


def class_fractions(labels: np.ndarray, n: int) -> list[float]:
    """Fraction of voxels of each class ``0 .. n-1``."""
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=n)[:n]
    return [round(float(c) / labels.size, 4) for c in counts]


def segpipe_blend_windows(settings: Settings) -> int:
    """Windows segpipe's blend computes over all chunks (those straddling chunk cores twice)."""
    from pipeline.models.torch.infer import blend_windows

    shape, chunk, window = settings.volume, settings.chunk_3d, settings.window_3d
    halo = [min(w, n) - 1 for w, n in zip(window, shape, strict=True)]
    stride = [max(1, round(w * (1 - settings.overlap))) for w in window]
    per_axis = []
    for n, c, h in zip(shape, chunk, halo, strict=True):
        per_axis.append([(max(0, s - h), min(n, s + c + h)) for s in range(0, n, c)])
    total = 0
    for boxes in _product(per_axis):
        origin = [b[0] for b in boxes]
        block = [b[1] - b[0] for b in boxes]
        total += len(blend_windows(shape, origin, block, window, stride))
    return total


def monai_windows(settings: Settings) -> int:
    """Windows of MONAI's sliding window (one global grid, each window once)."""
    from pipeline.models.torch.infer import blend_starts

    total = 1
    for n, w in zip(settings.volume, settings.window_3d, strict=True):
        total *= len(blend_starts(n, min(w, n), max(1, round(w * (1 - settings.overlap)))))
    return total


def _product(axes: list[list[Any]]) -> list[tuple[Any, ...]]:
    import itertools

    return [tuple(c) for c in itertools.product(*axes)]


# --------------------------------------------------------------------------- report


def rss_cells(r: dict[str, Any]) -> str:
    """Peak RSS (MiB) of client, scheduler+nannies, each worker."""
    return (
        f"{fmt(peak(r, 'client'), 7, '.0f')} {fmt(peak(r, 'scheduler+nannies'), 7, '.0f')} "
        f"{fmt(peak(r, 'worker-1'), 8, '.0f')} {fmt(peak(r, 'worker-2'), 8, '.0f')}"
    )


def sum_peaks(r: dict[str, Any]) -> float:
    """Sum of the per-process peak RSS (MiB) of a measurement's process tree."""
    return sum(v["peak_rss_mib"] for v in r["memory"].values())


def failed_line(r: dict[str, Any], width: int) -> str:
    """The row of a run that failed or timed out (foreign load still shown)."""
    return (
        f"{r['label']:<{width}} FAILED: {r['error']} (log {r['log']}); foreign {r['foreign_load_pct']:.1f}%"
    )


def table_2d(records: list[dict[str, Any]]) -> str:
    """Throughput of every 2-D run and its ratios to the bare forward pass (wall and CPU)."""
    runs = [r for r in records if r["dims"] == 2]
    bare = next((r for r in runs if r["kind"] == "bare" and "error" not in r), None)
    head = (
        f"{'2-D run':<24} {'Mpx':>5} {'wall s':>6} {'Mpx/s':>6} {'seg/bare':>8} {'job cpu':>7} "
        f"{'cpu/bare':>8} {'client':>7} {'sched':>7} {'worker-1':>8} {'worker-2':>8} {'foreign%':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        if "error" in r:
            lines.append(failed_line(r, 24))
            continue
        ratio = cpu_ratio = None
        if bare is not None and r is not bare:
            ratio = r["mpx_per_s"] / bare["mpx_per_s"]
            cpu_ratio = (bare["job_cpu_s"] / bare["mpx"]) / (r["job_cpu_s"] / r["mpx"])
        lines.append(
            f"{r['label']:<24} {r['mpx']:>5.1f} {r['wall_s']:>6.1f} {r['mpx_per_s']:>6.3f} "
            f"{fmt(ratio, 8, '.3f')} {r['job_cpu_s']:>7.1f} {fmt(cpu_ratio, 8, '.3f')} {rss_cells(r)} "
            f"{r['foreign_load_pct']:>8.1f}"
        )
    return "\n".join(lines)


def stage_cells(r: dict[str, Any]) -> str:
    """``stage s`` for each segpipe stage (summary.json timings_s), then the rest of the wall time."""
    t = r["timings_s"]
    parts = [f"{k} {v:.1f}" for k, v in t.items() if v >= 0.05]
    return ", ".join([*parts, f"other {r['wall_s'] - sum(t.values()):.1f}"]) + " s"


def cpu_cells(r: dict[str, Any]) -> str:
    """CPU seconds of each process during the job."""
    by = r["job_cpu_s_by_process"]
    return " / ".join(
        f"{by[k]:.0f}" for k in ("client", "scheduler+nannies", "worker-1", "worker-2") if k in by
    )


def stages_2d(records: list[dict[str, Any]]) -> str:
    """segpipe's stage timings (summary.json timings_s), chunks, forward-pass pixels, CPU by process."""
    runs = [r for r in records if r["dims"] == 2 and "error" not in r]
    head = f"{'2-D run':<24} {'chunks':>6} {'window':>6} {'fwd Mpx':>7}  {'job cpu s c/s/w1/w2':<20} stages"
    lines = [head, "-" * (len(head) + 60)]
    for r in runs:
        if r["kind"] == "bare":
            t = r["timings_s"]
            lines.append(
                f"{'bare':<24} {r['n_batches']:>6} {r['tile']:>6} {r['mpx']:>7.1f}  {r['job_cpu_s']:<20.0f} "
                f"read {t['read']:.1f}, normalise {t['normalise']:.1f}, forward {t['forward']:.1f} (timed), "
                f"softmax+argmax {t['softmax_argmax']:.1f} s"
            )
            continue
        lines.append(
            f"{r['label']:<24} {r['n_chunks']:>6} {r['window']:>6} {r['forward_mpx']:>7.1f}  "
            f"{cpu_cells(r):<20} {stage_cells(r)}"
        )
    return "\n".join(lines)


def table_3d(records: list[dict[str, Any]], settings: Settings) -> str:
    """segpipe vs MONAI on the volume: wall, CPU, RSS, ratios, agreement."""
    runs = [r for r in records if r["dims"] == 3]
    if not runs:
        return ""
    seg = next((r for r in runs if r["kind"] == "segpipe-3d"), None)
    mon = next((r for r in runs if r["kind"] == "monai"), None)
    head = (
        f"{'3-D run':<12} {'Mvox':>5} {'wall s':>6} {'job cpu':>7} {'windows':>7} {'client':>7} {'sched':>7} "
        f"{'worker-1':>8} {'worker-2':>8} {'sum MiB':>7} {'foreign%':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        if "error" in r:
            lines.append(failed_line(r, 12))
            continue
        windows = seg["windows"] if r is seg and "windows" in r else monai_windows(settings)
        lines.append(
            f"{r['label']:<12} {r['mvox']:>5.1f} {r['wall_s']:>6.1f} {r['job_cpu_s']:>7.1f} {windows:>7} "
            f"{rss_cells(r)} {sum_peaks(r):>7.0f} {r['foreign_load_pct']:>8.1f}"
        )
    if seg is None or mon is None or "error" in seg or "error" in mon:
        return "\n".join(lines)
    m = mon["timings_s"]
    mon_peak = peak(mon, "client") or float("nan")
    lines += [
        "",
        f"wall ratio segpipe/MONAI: {seg['wall_s'] / mon['wall_s']:.3f} end to end "
        f"(MONAI read+normalise+infer+argmax {mon['wall_s']:.1f} s; against its inference alone, "
        f"{m['sliding_window']:.1f} s: {seg['wall_s'] / m['sliding_window']:.3f})",
        f"CPU ratio segpipe/MONAI: {seg['job_cpu_s'] / mon['job_cpu_s']:.3f} (job CPU seconds; segpipe by "
        f"process c/s/w1/w2 {cpu_cells(seg)})",
        f"peak RSS ratio: largest worker / MONAI {max(worker_peaks(seg)) / mon_peak:.3f}, "
        f"sum of segpipe processes / MONAI {sum_peaks(seg) / mon_peak:.3f} (MONAI {mon_peak:.0f} MiB)",
        f"argmax agreement: {seg['agreement']:.6f} ({seg['differing_voxels']} of "
        f"{round(seg['mvox'] * 1e6)} voxels differ); class fractions segpipe {seg['class_fractions']}, "
        f"MONAI {mon['class_fractions']}",
        f"segpipe stages: {stage_cells(seg)}; {seg['n_chunks']} chunks of {seg['chunk']}",
        f"MONAI stages: read {m['read']:.1f}, normalise {m['normalise']:.1f}, sliding window "
        f"{m['sliding_window']:.1f}, argmax {m['argmax']:.1f} s",
    ]
    return "\n".join(lines)


def render(records: list[dict[str, Any]], settings: Settings) -> str:
    """Everything printed at the end."""
    notes = [
        f"segpipe: `segpipe run JOB --scheduler ADDR` on a LocalCluster of {settings.n_workers} worker "
        f"processes x {settings.threads_per_worker} thread (memory_limit {settings.memory_limit}), "
        "timed from the CLI call to its return (plan .. summary.json; cluster start-up not counted). "
        f"Baselines: one process, torch.set_num_threads({settings.threads}).",
        "Mpx/s: image pixels per second. bare: forward passes only (image already in memory as "
        "normalised float32); segpipe: end to end (GeoTIFF read, staging zarr, labels, COG). "
        "seg/bare: throughput ratio (issue #5 goal >= 0.85 for crop).",
        "job cpu: CPU seconds of the timed part (bare: its forward passes; segpipe: client + scheduler "
        "+ workers from CLI call to return; MONAI: read .. argmax). cpu/bare: bare CPU per Mpx / segpipe "
        "CPU per Mpx, less sensitive to foreign load than wall time (but a 2-thread process's OpenMP "
        "threads may spin while waiting for a core, which inflates the baselines' CPU).",
        f"MiB columns: peak RSS sampled every {SAMPLE_EVERY_S}s per process ('sched' = scheduler + "
        "nannies); baselines run in the 'client' process. sum MiB: sum of per-process peaks.",
        "foreign%: CPU used by processes outside the benchmark during the run, % of all cores.",
        "windows: network windows computed (segpipe computes windows that straddle two chunk cores "
        "in both chunks).",
    ]
    models = sorted({f"{r['dims']}-D {r['model']}" for r in records})
    engine = f"commit {settings.engine_rev[:12]} (--engine-at)" if settings.engine_rev else "the working tree"
    notes.append(f"segpipe engine: {engine}; models: {', '.join(models)}.")
    busy = [r["label"] for r in records if r["foreign_load_pct"] > FOREIGN_WARN_PCT]
    if busy:
        notes.append(
            f"WARNING: other processes used more than {FOREIGN_WARN_PCT}% of the machine's CPU during "
            f"{', '.join(busy)}; those timings are inflated and the ratios only as good as the load was even."
        )
    parts = []
    if any(r["dims"] == 2 for r in records):
        parts += [table_2d(records), stages_2d(records)]
    parts.append(table_3d(records, settings))
    return "\n\n".join([p for p in parts if p] + ["\n".join(notes)])


def git_state() -> dict[str, str]:
    """The commit the engine ran from, and ``git status`` of pipeline/ (others may edit it)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {"head": git("rev-parse", "HEAD"), "pipeline_status": git("status", "--porcelain", "pipeline")}


def write_json(records: list[dict[str, Any]], settings: Settings, text: str, total_s: float) -> Path:
    """The records, settings and printed tables as JSON under benchmarks/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_unet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "segpipe_git": git_state(),
        "engine": settings.engine_rev or "working tree",
        "settings": {**asdict(settings), "naip": str(NAIP_TIF), "ct": str(CT_NII)},
        "total_s": round(total_s, 1),
        "table": text,
        "records": records,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


# --------------------------------------------------------------------------- children


def _torch_threads(n: int) -> Any:
    import torch

    torch.set_num_threads(n)
    return torch


def _load_network(card_path: str) -> tuple[Any, Any]:
    """The card and its network in eval mode, loaded as the segmenter loads it."""
    from pipeline.models.torch.card import load_card
    from pipeline.models.torch.unet import UNet
    from pipeline.models.torch.weights import load_weights

    card = load_card(card_path)
    net = UNet(**card.network.network())
    net.load_state_dict(load_weights(card.weights_path))
    return card, net.eval()


def _normalise(x: np.ndarray, inputs: Any) -> np.ndarray:
    """``(channels, *spatial)`` float32, clipped and standardised as the segmenter does."""
    x = x.astype(np.float32)
    if inputs.clip is not None:
        np.clip(x, inputs.clip[0], inputs.clip[1], out=x)
    shape = (-1,) + (1,) * (x.ndim - 1)
    x -= np.asarray(inputs.mean, np.float32).reshape(shape)
    x /= np.asarray(inputs.std, np.float32).reshape(shape)
    return x


def child_bare(args: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Whole image in memory; batched non-overlapping tiles through the network, forward timed."""
    import rasterio

    torch = _torch_threads(s.threads)
    card, net = _load_network(args["card"])
    started = time.time()
    t0 = time.perf_counter()
    with rasterio.open(args["tif"]) as ds:
        raw = ds.read([int(b) for b in card.inputs.bands])
    t1 = time.perf_counter()
    x = _normalise(raw, card.inputs)
    del raw
    t2 = time.perf_counter()
    tile, batch = s.bare_tile, s.batch_size
    _, h, w = x.shape
    tiles = [(y, xx) for y in range(0, h, tile) for xx in range(0, w, tile)]
    labels = np.empty((h, w), np.uint8)
    forward = post = forward_cpu = 0.0
    with torch.inference_mode():
        net(torch.from_numpy(np.ascontiguousarray(x[None, :, :tile, :tile])))  # warm-up, untimed
        i = 0
        while i < len(tiles):
            # one batch: consecutive tiles of one shape (edge tiles may be smaller)
            first = tiles[i]
            size = (min(tile, h - first[0]), min(tile, w - first[1]))
            run = [first]
            while len(run) < batch and i + len(run) < len(tiles):
                nxt = tiles[i + len(run)]
                if (min(tile, h - nxt[0]), min(tile, w - nxt[1])) != size:
                    break
                run.append(nxt)
            xb = torch.from_numpy(np.stack([x[:, y : y + size[0], c : c + size[1]] for y, c in run]))
            ta, ca = time.perf_counter(), time.process_time()
            logits = net(xb)
            tb = time.perf_counter()
            forward_cpu += time.process_time() - ca
            cls = torch.softmax(logits, dim=1).argmax(dim=1).to(torch.uint8).numpy()
            for (y, c), lab in zip(run, cls, strict=True):
                labels[y : y + size[0], c : c + size[1]] = lab
            post += time.perf_counter() - tb
            forward += tb - ta
            i += len(run)
    mpx = h * w / 1e6
    return {
        "wall_s": forward,
        "job_cpu_s": forward_cpu,
        "job_started_at": started,
        "roles": {"client": os.getpid()},
        "timings_s": {"read": t1 - t0, "normalise": t2 - t1, "forward": forward, "softmax_argmax": post},
        "total_s": time.perf_counter() - t0,
        "mpx": mpx,
        "mpx_per_s": mpx / forward,
        "tile": tile,
        "batch": batch,
        "n_batches": math.ceil(len(tiles) / batch),
        "torch_threads": torch.get_num_threads(),
        "class_fractions": class_fractions(labels, len(CLASSES_2D)),
        "pipeline_imported_from": _pipeline_file(),
    }


def _run_cli_job(raw: dict[str, Any], out: Path, s: Settings) -> dict[str, Any]:
    """Write the job YAML, then ``segpipe run JOB --scheduler ADDR`` on a fresh cluster, timed."""
    import yaml

    from pipeline.cluster import connect
    from pipeline.runner.cli import main as segpipe

    job = out.parent / f"{out.name}.job.yaml"
    job.write_text(yaml.safe_dump(raw, sort_keys=False))
    Path(s.cluster["scratch"]).mkdir(parents=True, exist_ok=True)
    with cluster_host(s.cluster) as address, connect(scheduler=address) as client:
        roles = cluster_roles(client)
        imported = {"client": _pipeline_file(), "workers": sorted(set(client.run(_pipeline_file).values()))}
        cpu0 = _cluster_cpu(client)
        started = time.time()
        t0 = time.perf_counter()
        rc = segpipe(["run", str(job), "--scheduler", address])
        wall = time.perf_counter() - t0
        cpu1 = _cluster_cpu(client)
    if rc != 0:
        raise SystemExit(f"segpipe run {job} exited {rc}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_s": wall,
        "job_started_at": started,
        "roles": roles,
        "job": raw,
        "pipeline_imported_from": imported,
        "job_cpu_s": sum(cpu1.values()) - sum(cpu0.values()),
        "job_cpu_s_by_process": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0},
        "timings_s": summary["timings_s"],
        "n_chunks": summary["tiling"]["n_chunks"],
        "chunk": summary["tiling"]["chunk"],
        "halo": summary["tiling"]["halo"],
        "outputs": sorted(summary["outputs"]),
    }


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) used so far by this process."""
    import psutil

    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def _cluster_cpu(client: Any) -> dict[str, float]:
    """CPU seconds so far of this client process, the scheduler (with nannies) and each worker."""
    cpu = {"client": _cpu_s(), "scheduler+nannies": client.run_on_scheduler(_cpu_s)}
    for i, (_addr, value) in enumerate(sorted(client.run(_cpu_s).items()), start=1):
        cpu[f"worker-{i}"] = value
    return cpu


def _pipeline_file() -> str:
    """Where this process imported ``pipeline`` from (working tree or ``--engine-at`` snapshot)."""
    import pipeline

    return str(Path(pipeline.__file__).parent)


def child_segpipe_2d(args: dict[str, Any], s: Settings) -> dict[str, Any]:
    """The 2-D unet job (crop or blend) on the GeoTIFF: ingest, segment, COG."""
    import rasterio

    out = Path(args["out"])
    params = {"model": args["card"], "batch_size": s.batch_size, "device": "cpu", **args["params"]}
    raw = {
        "name": f"bench-unet-{out.name}",
        "input": {"path": args["tif"]},
        "segmenter": {"name": "unet", "params": params},
        "tiling": {"chunk": [args["chunk"]] * 2},
        "output": {"dir": str(out), "formats": ["zarr", "cog"]},
    }
    record = _run_cli_job(raw, out, s)
    with rasterio.open(args["tif"]) as ds:
        h, w = ds.height, ds.width
    record["mpx"] = h * w / 1e6
    record["mpx_per_s"] = record["mpx"] / record["wall_s"]
    record["window"] = params["window"]
    record["forward_mpx"] = forward_pixels_2d(h, w, args["chunk"], record["halo"], params) / 1e6
    return record


def forward_pixels_2d(h: int, w: int, chunk: int, halo: list[int], params: dict[str, Any]) -> int:
    """Pixels segpipe feeds through the network (halos and redundant blend windows included)."""
    from pipeline.models.torch.infer import blend_windows

    total = 0
    for y0 in range(0, h, chunk):
        for x0 in range(0, w, chunk):
            ya, yb = max(0, y0 - halo[0]), min(h, y0 + chunk + halo[0])
            xa, xb = max(0, x0 - halo[1]), min(w, x0 + chunk + halo[1])
            if params["stitch"] == "crop":
                total += (yb - ya) * (xb - xa)  # one window per block (window = chunk + 2 halo)
            else:
                win = params["window"]
                stride = max(1, round(win * (1 - params["overlap"])))
                wins = blend_windows((h, w), (ya, xa), (yb - ya, xb - xa), (win, win), (stride, stride))
                total += sum((a.stop - a.start) * (b.stop - b.start) for a, b in wins)
    return total


def child_segpipe_3d(args: dict[str, Any], s: Settings) -> dict[str, Any]:
    """The 3-D unet job, blend stitching, Gaussian weights, labels in the staging zarr."""
    out = Path(args["out"])
    params = {
        "model": args["card"],
        "stitch": "blend",
        "window": s.window_3d,
        "overlap": s.overlap,
        "blend": "gaussian",
        "batch_size": s.batch_size,
        "device": "cpu",
    }
    raw = {
        "name": "bench-unet-3d",
        "input": {"path": args["vol"]},
        "segmenter": {"name": "unet", "params": params},
        "tiling": {"chunk": s.chunk_3d},
        "output": {"dir": str(out), "formats": ["zarr"]},
    }
    return _run_cli_job(raw, out, s)


def child_monai(args: dict[str, Any], s: Settings) -> dict[str, Any]:
    """MONAI sliding_window_inference on the whole volume: read, normalise, infer, argmax."""
    import SimpleITK as sitk
    from monai.inferers import sliding_window_inference

    torch = _torch_threads(s.threads)
    card, net = _load_network(args["card"])
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)

    def predictor(x: Any) -> Any:
        return torch.softmax(net(x), dim=1)  # segpipe blends probabilities too

    started = time.time()
    t0, c0 = time.perf_counter(), time.process_time()
    vol = sitk.GetArrayFromImage(sitk.ReadImage(args["vol"]))  # (z, y, x)
    t1 = time.perf_counter()
    x = torch.from_numpy(_normalise(vol[None], card.inputs)[None])  # (1, 1, z, y, x)
    del vol
    t2, c2 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        probs = sliding_window_inference(
            x, s.window_3d, s.batch_size, predictor, overlap=s.overlap, mode="gaussian"
        )
    t3, c3 = time.perf_counter(), time.process_time()
    labels = probs[0].argmax(dim=0).to(torch.uint8).numpy()
    t4, c4 = time.perf_counter(), time.process_time()
    np.save(out / "argmax.npy", labels)
    import monai

    return {
        "wall_s": t4 - t0,
        "job_cpu_s": c4 - c0,
        "inference_cpu_s": c3 - c2,
        "job_started_at": started,
        "roles": {"client": os.getpid()},
        "timings_s": {"read": t1 - t0, "normalise": t2 - t1, "sliding_window": t3 - t2, "argmax": t4 - t3},
        "monai": monai.__version__,
        "pipeline_imported_from": _pipeline_file(),
        "torch_threads": torch.get_num_threads(),
    }


CHILDREN = {
    "bare": child_bare,
    "segpipe-2d": child_segpipe_2d,
    "segpipe-3d": child_segpipe_3d,
    "monai": child_monai,
}


def child_main(argv: list[str]) -> None:
    """Entry of the ``_child KIND ARGS RESULT SETTINGS`` subprocess."""
    kind, args, result, settings = argv
    record = CHILDREN[kind](json.loads(args), Settings(**json.loads(settings)))
    Path(result).write_text(json.dumps(record, default=str))


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    d = Settings(workdir="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of ~2 minutes")
    p.add_argument("--from-json", type=Path, help="print the tables of a saved results JSON again")
    p.add_argument("--only", choices=["2d", "3d"], help="run only the 2-D or the 3-D comparison")
    p.add_argument("--size", type=int, default=d.size, help="2-D image side, px (default %(default)s)")
    p.add_argument("--chunks", type=int, nargs="+", default=d.chunks, help="segpipe crop chunk sides")
    p.add_argument(
        "--blend-size", type=int, default=d.blend_size, help="2-D blend row: image side (0: skip the row)"
    )
    p.add_argument("--blend-chunk", type=int, default=d.blend_chunk, help="2-D blend row: chunk side")
    p.add_argument("--bare-tile", type=int, default=d.bare_tile, help="bare forward pass: tile side")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per forward pass (all runs)")
    p.add_argument("--volume", type=int, nargs=3, default=d.volume, help="3-D volume z y x")
    p.add_argument("--chunk-3d", type=int, nargs=3, default=d.chunk_3d, help="segpipe 3-D chunk z y x")
    p.add_argument("--window-3d", type=int, nargs=3, default=d.window_3d, help="3-D window z y x")
    p.add_argument("--overlap", type=float, default=d.overlap, help="blend overlap (2-D blend row and 3-D)")
    p.add_argument("--memory-limit", default=d.memory_limit, help="per-worker memory limit")
    p.add_argument("--run-timeout", type=float, default=d.run_timeout, help="seconds before a run is killed")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new /tmp dir)")
    p.add_argument(
        "--engine-at",
        metavar="REV",
        help="run segpipe as committed at REV (git archive of pipeline/ and tests/helpers.py into the "
        "workdir, first on PYTHONPATH) instead of the working tree, which others may be editing",
    )
    return p.parse_args(argv)


def snapshot_engine(rev: str, folder: Path) -> tuple[str, str]:
    """Extract ``pipeline/`` and the test helpers at ``rev`` into ``folder`` and put it first on
    the import path of this process and every child (PYTHONPATH); return the commit and folder."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", commit, "pipeline", "tests/__init__.py", "tests/helpers.py"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    os.environ[ENGINE_ENV] = str(folder)
    sys.path.insert(0, str(folder))
    say(f"engine: pipeline/ at {commit[:12]} ({rev}) from {folder}")
    return commit, str(folder)


def main(argv: list[str]) -> None:
    """Run every measurement, print the tables, write the JSON."""
    args = parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        fields = {k: v for k, v in saved["settings"].items() if k in Settings.__dataclass_fields__}
        print(render(saved["records"], Settings(**fields)))
        print(f"\nwhole benchmark {saved['total_s']:.0f} s; saved {saved['created']}")
        return
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_unet-", dir="/tmp")) if own else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    values = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    if args.quick:
        values.update({k: v for k, v in QUICK.items() if k not in given})
    settings = Settings(**{**values, "workdir": str(workdir)})
    if args.engine_at:
        settings.engine_rev, settings.engine = snapshot_engine(args.engine_at, workdir / "engine")
    check_disk(workdir, 3 * (settings.size**2 * 4 + math.prod(settings.volume) * 2) + GIB / 2)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        if args.only in (None, "2d"):
            bench_2d(settings, workdir, records)
        if args.only in (None, "3d"):
            bench_3d(settings, workdir, records)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    text = render(records, settings)
    print(text)
    total = time.perf_counter() - t0
    path = write_json(records, settings, text, total)
    print(f"\nwhole benchmark {total:.0f} s; JSON: {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
