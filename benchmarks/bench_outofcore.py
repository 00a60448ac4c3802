"""Out of core: the Otsu and U-Net jobs on generated inputs of 1, 4 and 16 GiB, workers at 2 GiB.

Four cases, each a segpipe job on a generated input of ``--sizes-gb`` GiB (on disk, uncompressed):

* ``otsu-raster``  the ``otsu`` job (band 1, chunk 1024 x 1024, formats zarr + cog) on a
  single-band int16 GeoTIFF tiling the real Sentinel-2 B8 band (``bench_otsu.generate_geotiff``);
* ``unet-raster``  the ``unet`` job (crop stitching, chunk 1024, one window per chunk: 1072 px,
  formats zarr + cog) on a 13-band int16 GeoTIFF (all of Sentinel-2 L1C, 26 bytes per pixel, as
  the real chip) tiling the same real Sentinel-2 chip, with a random-weight 2-D U-Net card of
  depth 2 and width 4 that takes B2, B3, B4, B8, B11, B12 (as ``water_unet``) normalising like
  the chip (``tests/helpers.py tiny_unet``);
* ``otsu-volume``  the ``otsu`` job (chunk 128 x 256 x 256, formats zarr) on an int16 volume tiling
  the real TotalSegmentator example CT, written as an uncompressed MetaImage (``.mha``, read by
  region) slab by slab;
* ``unet-volume``  the ``unet`` job (crop stitching, chunk 64 x 160 x 160, one window per chunk:
  84 x 180 x 180, formats zarr) with a random-weight 3-D U-Net card of depth 1 and width 4 (HU
  window [-150, 250]) on the same CT tiling stored as float32 (4 bytes per voxel).

The U-Nets are random and tiny because of the CPU time: on 2 cores the shipped ``water_unet``
(depth 3, width 16) runs at ~0.3 Mpx/s and a width-4 3-D U-Net at ~2 Mvox/s per core, so 16 GiB
would take hours. What the engine holds per chunk (the block, its normalised float32 copy, the
class scores, the labels) does not depend on the weights; the network's activations grow with
the window and the width, which are the same at every size. Their labels mean nothing.


No input is ever held whole by the generator. Each run gets a fresh ``LocalCluster`` of 2 worker
processes x 1 thread with ``--memory-limit`` each (default 2GiB), started in a subprocess of the
client, and the orchestrator samples (psutil, every 0.1 s, plus the kernel's ``VmHWM``) the RSS of
the client, the scheduler (with the nannies) and each worker. Cluster start-up is not timed.

Output: per case and size, wall time, throughput (MB/s of input, Mpx or Mvox/s), stage times and
peak RSS of every process; then, per case, each worker's peak at every size over its peak at the
smallest size: the issue's acceptance is at most 1.2 at 16 GiB. The JSON (with RSS series) goes
to ``benchmarks/results/bench_outofcore-*.json`` after every run, so an interrupted run keeps
what it measured. Exit status 1 when a ratio is above ``--max-ratio``.

``python benchmarks/bench_outofcore.py -h``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    DATA,
    FOREIGN_WARN_PCT,
    GIB,
    REPO,
    RESULTS,
    SOURCE_TIF,
    add_usage,
    check_disk,
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
)

CT_NII = DATA / "medical" / "totalseg_example_ct_sm.nii.gz"
CT_CLIP = (-150.0, 250.0)
S2_BANDS = ["B2", "B3", "B4", "B8", "B11", "B12"]
S2_ALL = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]


CASES: dict[str, dict[str, Any]] = {
    "otsu-raster": {
        "input": "raster",
        "bands": ["B8"],
        "segmenter": {"name": "otsu", "params": {"band": 1}},
        "chunk": [1024, 1024],
        "formats": ["zarr", "cog"],
    },
    "unet-raster": {
        "input": "raster",
        "bands": S2_ALL,
        "segmenter": {"name": "unet", "params": {"model": "CARD2D", "stitch": "crop", "window": 1072}},
        "chunk": [1024, 1024],
        "formats": ["zarr", "cog"],
    },
    "otsu-volume": {
        "input": "volume",
        "dtype": "int16",
        "segmenter": {"name": "otsu", "params": {"band": 1}},
        "chunk": [128, 256, 256],
        "formats": ["zarr"],
    },
    "unet-volume": {
        "input": "volume",
        "dtype": "float32",
        "segmenter": {
            "name": "unet",
            "params": {"model": "CARD3D", "stitch": "crop", "window": [84, 180, 180]},
        },
        "chunk": [64, 160, 160],
        "formats": ["zarr"],
    },
}


# --------------------------------------------------------------------------- inputs


def raster_side(size_gib: float, n_bands: int, align: int = 512) -> int:
    """Side (multiple of ``align``) of a square int16 raster of ``n_bands`` of about ``size_gib``."""
    return max(align, round(math.sqrt(size_gib * GIB / (2 * n_bands)) / align) * align)


def write_raster(path: Path, bands: list[str], side: int, strip: int = 512) -> None:
    """A tiled, uncompressed int16 GeoTIFF of the named Sentinel-2 bands tiling the real chip."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(SOURCE_TIF) as src:
        index = [src.descriptions.index(b) + 1 for b in bands]
        chip = src.read(index)
        crs, transform, nodata = src.crs, src.transform, src.nodata
    period = mirror_period(chip)
    profile = {
        "driver": "GTiff",
        "height": side,
        "width": side,
        "count": len(bands),
        "dtype": "int16",
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "none",
        "interleave": "pixel",
        "BIGTIFF": "YES",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.descriptions = tuple(bands)
        for row0 in range(0, side, strip):
            h = min(strip, side - row0)
            dst.write(strip_rows(period, row0, h, side), window=Window(0, row0, side, h))


def volume_shape(size_gib: float, itemsize: int, align: int = 64) -> tuple[int, int, int]:
    """A cube (multiple of ``align``) of voxels of ``itemsize`` bytes of about ``size_gib``."""
    side = max(align, round((size_gib * GIB / itemsize) ** (1 / 3) / align) * align)
    return side, side, side


def write_volume(path: Path, shape: tuple[int, int, int], dtype: str = "int16", slab: int = 32) -> None:
    """An uncompressed MetaImage (``.mha``, data after the header) of voxels tiling the real CT
    (mirrored on every axis), written ``slab`` slices at a time with the CT's geometry."""
    import SimpleITK as sitk

    src = sitk.ReadImage(str(CT_NII))
    ct = sitk.GetArrayFromImage(src).astype(dtype)  # (z, y, x)
    period = mirror_period(ct)
    period = np.concatenate([period, period[::-1]], axis=0)
    nz, ny, nx = shape
    direction = " ".join(f"{v:g}" for v in np.array(src.GetDirection()).reshape(3, 3).T.ravel())
    header = "\n".join(
        [
            "ObjectType = Image",
            "NDims = 3",
            "BinaryData = True",
            "BinaryDataByteOrderMSB = False",
            "CompressedData = False",
            f"TransformMatrix = {direction}",
            "Offset = " + " ".join(f"{v:.6f}" for v in src.GetOrigin()),
            "CenterOfRotation = 0 0 0",
            "ElementSpacing = " + " ".join(f"{v:.6f}" for v in src.GetSpacing()),
            f"DimSize = {nx} {ny} {nz}",
            "ElementType = " + {"int16": "MET_SHORT", "float32": "MET_FLOAT"}[dtype],
            "ElementDataFile = LOCAL",
            "",
        ]
    )
    pz, py, px = period.shape
    rows = np.arange(ny) % py
    cols = np.arange(nx) % px
    plane_cache: dict[int, np.ndarray] = {}
    with path.open("wb") as fh:
        fh.write(header.encode())
        for z0 in range(0, nz, slab):
            zs = range(z0, min(nz, z0 + slab))
            for z in zs:
                k = z % pz
                if k not in plane_cache:
                    plane_cache[k] = np.ascontiguousarray(period[k][np.ix_(rows, cols)])
                fh.write(plane_cache[k].tobytes())


def tiny_cards(folder: Path) -> dict[str, str]:
    """Random-weight U-Net cards: 2-D (depth 2, width 4) on the six Sentinel-2 bands and 3-D
    (depth 1, width 4, HU window [-150, 250]), each normalising like its real source."""
    import rasterio
    import SimpleITK as sitk
    import yaml

    sys.path.insert(0, str(REPO))
    from tests.helpers import tiny_unet

    with rasterio.open(SOURCE_TIF) as src:
        chip = src.read([src.descriptions.index(b) + 1 for b in S2_BANDS]).astype(np.float64)
    flat = chip.reshape(len(S2_BANDS), -1)
    card2d = tiny_unet(
        folder / "unet2d",
        spatial_dims=2,
        bands=list(S2_BANDS),
        classes={0: "not_water", 1: "water"},
        depth=2,
        width=4,
        mean=flat.mean(axis=1).tolist(),
        std=flat.std(axis=1).tolist(),
        patch=[128, 128],
    )
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(CT_NII))).astype(np.float64)
    clipped = np.clip(ct, *CT_CLIP)
    card3d = tiny_unet(
        folder / "unet3d",
        spatial_dims=3,
        bands=[1],
        classes={0: "background", 1: "liver", 2: "spleen", 3: "kidney"},
        depth=1,
        width=4,
        mean=[float(clipped.mean())],
        std=[float(clipped.std())],
        patch=[16, 64, 64],
    )
    raw = yaml.safe_load(card3d.read_text())
    raw["inputs"]["clip"] = list(CT_CLIP)
    card3d.write_text(yaml.safe_dump(raw, sort_keys=False))
    return {"CARD2D": str(card2d), "CARD3D": str(card3d)}


def make_input(case: dict[str, Any], size_gib: float, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Write the case's input of ``size_gib``; its path and what it holds."""
    if case["input"] == "raster":
        side = raster_side(size_gib, len(case["bands"]))
        path = workdir / f"raster-{len(case['bands'])}b-{size_gib:g}gib.tif"
        write_raster(path, case["bands"], side)
        return path, {"shape": [len(case["bands"]), side, side], "pixels": side * side}
    dtype = case["dtype"]
    shape = volume_shape(size_gib, np.dtype(dtype).itemsize)
    path = workdir / f"volume-{dtype}-{size_gib:g}gib.mha"
    write_volume(path, shape, dtype)
    return path, {"shape": list(shape), "pixels": int(np.prod(shape))}


# --------------------------------------------------------------------------- runs


def run_case(name: str, size_gib: float, args: argparse.Namespace, cards: dict[str, str]) -> dict[str, Any]:
    """Generate the input, run the job in a sampled subprocess, delete input and output."""
    case = CASES[name]
    tag = f"{name}-{size_gib:g}gib"
    t0 = time.perf_counter()
    say(f"[{tag}] generating ...")
    path, meta = make_input(case, size_gib, args.workdir)
    gen_s = time.perf_counter() - t0
    size = path.stat().st_size
    say(f"[{tag}]   {size / GIB:.2f} GiB {meta['shape']} in {gen_s:.0f} s")
    out = args.workdir / f"out-{tag}"
    result = args.workdir / f"{tag}.result.json"
    log = args.workdir / f"{tag}.log"
    text = json.dumps(case["segmenter"])
    for key, card in cards.items():
        text = text.replace(f'"{key}"', json.dumps(card))
    segmenter = json.loads(text)
    settings = {
        "n_workers": args.workers,
        "threads_per_worker": 1,
        "memory_limit": args.memory_limit,
        "scratch": str(args.workdir / "spill"),
    }
    job = {
        "name": f"outofcore-{tag}",
        "input": {"path": str(path)},
        "segmenter": segmenter,
        "tiling": {"chunk": case["chunk"]},
        "output": {"dir": str(out), "formats": case["formats"]},
    }
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_child",
        json.dumps(job),
        json.dumps(settings),
        str(result),
    ]
    try:
        rc, sampler = run_sampled(cmd, log, timeout_s=args.run_timeout)
        if rc != 0 or not result.exists():
            say(log.read_text()[-3000:])
            record: dict[str, Any] = {
                "failed": f"exit {rc} (log {log})",
                "roles": {},
                "job_started_at": sampler.t0,
            }
        else:
            record = json.loads(result.read_text())
        add_usage(record, sampler)
    finally:
        remove(path)
        remove(out)
        remove(result)
    record.update(
        case=name,
        size_gib_requested=size_gib,
        input_bytes=size,
        generate_s=round(gen_s, 1),
        job=job,
        settings=settings,
        **meta,
    )
    if "wall_s" in record:
        record["mb_per_s"] = size / 1e6 / record["wall_s"]
        record["mpx_per_s"] = meta["pixels"] / 1e6 / record["wall_s"]
        peaks = ", ".join(f"{v:.0f}" for v in worker_peaks_mib(record))
        say(
            f"[{tag}]   {record['wall_s']:.1f} s, {record['mb_per_s']:.1f} MB/s, workers peak "
            f"{peaks} MiB, foreign {record['foreign_load_pct']}%"
        )

    return record


def child_main(job_json: str, settings_json: str, result: str) -> None:
    """Child mode: the job on a fresh cluster, timed from plan to summary."""
    settings = json.loads(settings_json)
    Path(settings["scratch"]).mkdir(parents=True, exist_ok=True)
    job = json.loads(job_json)
    record, summary = timed_job(job, settings)
    out = Path(job["output"]["dir"])
    record = {
        **record,
        "chunk": summary["tiling"]["chunk"],
        "halo": summary["tiling"]["halo"],
        "outputs": sorted(summary["outputs"]),
        "output_bytes": tree_bytes(out),
    }
    Path(result).write_text(json.dumps(record, default=str))


# --------------------------------------------------------------------------- report


def worker_peaks_mib(r: dict[str, Any], key: str = "peak_rss_mib") -> list[float]:
    """Peak RSS of each worker process of a record, in worker order."""
    return [v[key] for k, v in sorted(r.get("memory", {}).items()) if k.startswith("worker")]


def main_table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'case':<12} {'GiB':>6} {'shape':<22} {'chunks':>7} {'wall s':>8} {'MB/s':>6} {'Mpx/s':>6} "
        f"{'client':>7} {'sched':>7} {'worker-1':>8} {'worker-2':>8} {'hwm w max':>9} {'foreign%':>8}"
    )
    lines = ["peak RSS in MiB (sampled every 0.1 s; `hwm w max`: the largest worker's kernel VmHWM)", head]
    for r in records:
        shape = "x".join(str(v) for v in r["shape"])
        if "wall_s" not in r:
            lines.append(
                f"{r['case']:<12} {r['input_bytes'] / GIB:>6.2f} {shape:<22} failed: {r.get('failed')}"
            )
            continue
        w = [*worker_peaks_mib(r), None, None]
        hwm = worker_peaks_mib(r, "vm_hwm_mib")
        lines.append(
            f"{r['case']:<12} {r['input_bytes'] / GIB:>6.2f} {shape:<22} {r['n_chunks']:>7} "
            f"{r['wall_s']:>8.1f} {r['mb_per_s']:>6.1f} {r['mpx_per_s']:>6.2f} "
            f"{fmt(peak(r, 'client'), 7, '.0f')} {fmt(peak(r, 'scheduler+nannies'), 7, '.0f')} "
            f"{fmt(w[0], 8, '.0f')} {fmt(w[1], 8, '.0f')} {fmt(max(hwm) if hwm else None, 9, '.0f')} "
            f"{r['foreign_load_pct']:>8.1f}"
        )
    return "\n".join(lines)


def stage_table(records: list[dict[str, Any]]) -> str:
    stages = ["ingest", "fit", "segment", "seam_check", "finalize"]

    lines = [f"{'case':<12} {'GiB':>6} " + " ".join(f"{s:>10}" for s in stages)]
    for r in records:
        t = r.get("timings_s", {})
        lines.append(
            f"{r['case']:<12} {r['input_bytes'] / GIB:>6.2f} "
            + " ".join(fmt(t.get(s), 10, ".1f") for s in stages)
        )
    return "\n".join(lines)


def flatness(records: list[dict[str, Any]], max_ratio: float) -> tuple[str, bool]:
    """Per case: the largest worker peak at each size over the one at the smallest size."""
    lines = [f"largest worker peak RSS at each size / at the smallest size (acceptance <= {max_ratio})"]
    ok = True
    for name in CASES:
        rows = sorted(
            (r for r in records if r["case"] == name and "wall_s" in r), key=lambda r: r["input_bytes"]
        )
        if len(rows) < 2:
            continue
        base = max(worker_peaks_mib(rows[0]))
        cells = []
        for r in rows:
            ratio = max(worker_peaks_mib(r)) / base
            ok &= ratio <= max_ratio
            cells.append(
                f"{r['input_bytes'] / GIB:.1f} GiB: {max(worker_peaks_mib(r)):.0f} MiB (x{ratio:.2f})"
            )
        lines.append(f"  {name:<12} " + "; ".join(cells))
    return "\n".join(lines), ok


def render(records: list[dict[str, Any]], max_ratio: float) -> tuple[str, bool]:
    flat, ok = flatness(records, max_ratio)
    parts = [main_table(records), "", "stage seconds", stage_table(records), "", flat]
    busy = [r for r in records if r.get("foreign_load_pct", 0) > FOREIGN_WARN_PCT]
    if busy:
        parts.append(
            f"\nwarning: {len(busy)} run(s) shared the machine with >{FOREIGN_WARN_PCT}% foreign CPU"
        )
    return "\n".join(parts), ok


def write_json(path: Path, records: list[dict[str, Any]], args: argparse.Namespace, text: str) -> None:
    payload = {
        "benchmark": "bench_outofcore",
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "records": records,
        "table": text,
    }
    path.write_text(json.dumps(payload, indent=1, default=str))


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 4.0, 16.0], help="input sizes, GiB")
    p.add_argument("--memory-limit", default="2GiB", help="per-worker memory limit")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-ratio", type=float, default=1.2)
    p.add_argument("--run-timeout", type=float, default=3600, help="seconds before a run is killed")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new /tmp dir)")
    p.add_argument(
        "--from-json", type=Path, nargs="+", default=None, help="re-print the tables of results files"
    )
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.from_json:
        records = [r for f in args.from_json for r in json.loads(f.read_text())["records"]]
        text, ok = render(records, args.max_ratio)
        print(text)
        raise SystemExit(0 if ok else 1)
    own = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix="bench_outofcore-", dir="/tmp")) if own else args.workdir
    args.workdir.mkdir(parents=True, exist_ok=True)
    check_disk(args.workdir, max(args.sizes_gb) * GIB * 2.1)  # input, uncompressed staged copy, outputs

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_outofcore-{time.strftime('%Y%m%d-%H%M%S')}.json"
    cards = tiny_cards(args.workdir / "cards")
    records: list[dict[str, Any]] = []
    try:
        for size in sorted(args.sizes_gb):  # size-major: every case at 1 GiB before any at 16
            for name in args.cases:
                records.append(run_case(name, size, args, cards))

                write_json(path, records, args, render(records, args.max_ratio)[0])
    finally:
        if own:
            remove(args.workdir)
    text, ok = render(records, args.max_ratio)
    print(text)
    write_json(path, records, args, text)
    say(f"results: {path}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if sys.argv[1:2] == ["_child"]:
        child_main(*sys.argv[2:5])
    else:
        main(sys.argv[1:])
