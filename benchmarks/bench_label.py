"""Benchmark segpipe's exact connected components against dask-image and scipy on a 3-D volume.

One command generates a binary uint8 volume (default 1024^3 = 1.07 Gvoxel) of smooth random
blobs, chunk by chunk into a segpipe zarr input, and measures side by side:

* ``segpipe``    a ``components`` job (threshold value 0, connectivity 1, formats [zarr]) on a
  LocalCluster of 2 worker processes x 1 thread (``pipeline.cluster.connect``)
* ``dask-image`` ``dask_image.ndmeasure.label`` on ``dask.array.from_zarr`` of the same array
  (same chunks), on the same kind of cluster, stored to zarr
* ``scipy``      ``scipy.ndimage.label`` on the whole volume loaded in one process

Every measurement runs in its own subprocess; a background thread of the orchestrator samples
with psutil the RSS of that subprocess's whole tree (client, cluster host with scheduler and
nannies, worker processes). The three label maps are then compared chunk by chunk: two
labelings are the same partition iff they have the same foreground and the id pairs at the
foreground voxels form a bijection. Run ``python benchmarks/bench_label.py -h``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import (
    FOREIGN_WARN_PCT,
    GIB,
    MIB,
    REPO,
    RESULTS,
    SAMPLE_EVERY_S,
    add_usage,
    check_disk,
    cluster_host,
    cluster_roles,
    fmt,
    machine,
    peak,
    remove,
    run_sampled,
    say,
    tree_bytes,
    vm_hwm,
)

if str(REPO) not in sys.path:  # `python benchmarks/bench_label.py` from anywhere
    sys.path.insert(0, str(REPO))

from pipeline.data import VolumeRef
from pipeline.io import zarr_store
from pipeline.tiling import Box

KINDS = ("segpipe", "dask-image", "scipy")
VOLUME = VolumeRef((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))
#: (lattice spacing, Gaussian sigma, weight) of each octave of the random field, in voxels: large
#: blobs joining into structures that cross many chunks, plus many small blobs.
OCTAVES = ((64, 40.0, 0.8), (32, 16.0, 1.0), (8, 4.0, 1.0))
#: Foreground where the unit-variance field is above this level (about 11% of the voxels).
LEVEL = 0.74
TRUNCATE = 3.0


# --------------------------------------------------------------------------- input volume


def _mean_kernel_sum_sq(spacing: int, sigma: float) -> float:
    """Mean over positions of sum_j g(x - j*spacing)^2 for a 1-D unit Gaussian bump g."""
    xs = np.linspace(0.0, spacing, 32, endpoint=False)[:, None]
    centres = np.arange(-64, 65)[None, :] * spacing
    return float(np.exp(-(((xs - centres) / sigma) ** 2)).sum(axis=1).mean())


class Octave:
    """Seeded Gaussian bumps with N(0, 1) amplitudes on a lattice: a smooth random field."""

    def __init__(self, shape: tuple[int, ...], spacing: int, sigma: float, weight: float, seed: int) -> None:
        self.spacing, self.sigma = spacing, sigma
        self.margin = math.ceil(TRUNCATE * sigma / spacing) + 1
        lattice = [s // spacing + 1 + 2 * self.margin for s in shape]
        self.amp = np.random.default_rng(seed).standard_normal(lattice, dtype=np.float32)
        self.scale = weight / math.sqrt(_mean_kernel_sum_sq(spacing, sigma) ** 3)

    def weights(self, lo: int, hi: int) -> tuple[np.ndarray, slice]:
        """Bump weights ``(hi - lo, n)`` of the lattice points ``[j0, j1)`` reaching ``[lo, hi)``."""
        j0 = max(0, math.floor((lo - TRUNCATE * self.sigma) / self.spacing) + self.margin)
        j1 = math.ceil((hi + TRUNCATE * self.sigma) / self.spacing) + self.margin + 1
        centres = (np.arange(j0, j1) - self.margin) * self.spacing
        x = np.arange(lo, hi)[:, None]
        return np.exp(-0.5 * ((x - centres[None, :]) / self.sigma) ** 2).astype(np.float32), slice(j0, j1)

    def planes(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """``(wz scaled, t)`` with ``wz @ t`` this octave's field in ``box`` (separable sum)."""
        (wz, sz), (wy, sy), (wx, sx) = (self.weights(a, b) for a, b in zip(box.start, box.stop, strict=True))
        amp = np.ascontiguousarray(self.amp[sz, sy, sx])
        lz, ly, lx = amp.shape
        t = (amp.reshape(lz * ly, lx) @ wx.T).reshape(lz, ly, -1)
        t = np.matmul(wy[None], t)
        return wz * np.float32(self.scale), t.reshape(lz, -1)


class BlobField:
    """A deterministic unit-variance smooth random field, evaluated one box at a time."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        norm = math.sqrt(sum(w * w for _, _, w in OCTAVES))
        self.octaves = [
            Octave(shape, spacing, sigma, weight / norm, seed + i)
            for i, (spacing, sigma, weight) in enumerate(OCTAVES)
        ]

    def values(self, box: Box) -> np.ndarray:
        """The field in ``box`` (float32), one matrix product over all octaves."""
        parts = [o.planes(box) for o in self.octaves]
        wz = np.concatenate([p[0] for p in parts], axis=1)
        t = np.concatenate([p[1] for p in parts], axis=0)
        return (wz @ t).reshape(box.shape)

    def mask(self, box: Box) -> np.ndarray:
        """0/1 uint8 foreground of ``box``."""
        return (self.values(box) > LEVEL).astype(np.uint8)


def chunk_boxes(shape: tuple[int, ...], chunk: int) -> Iterator[Box]:
    """The boxes of a regular grid of ``chunk``-sized cubes over ``shape`` (C order)."""
    counts = [math.ceil(s / chunk) for s in shape]
    for index in np.ndindex(*counts):
        start = tuple(i * chunk for i in index)
        stop = tuple(min(a + chunk, s) for a, s in zip(start, shape, strict=True))
        yield Box(start, stop)


def generate_input(path: Path, shape: tuple[int, ...], chunk: int, seed: int) -> dict[str, Any]:
    """Write the 0/1 volume chunk by chunk into a segpipe zarr array; return its statistics."""
    t0 = time.perf_counter()
    zarr_store.create_array(path, shape=shape, chunks=(chunk,) * 3, dtype="uint8", geometry=VOLUME)
    blobs = BlobField(shape, seed)
    foreground = 0
    for box in chunk_boxes(shape, chunk):
        mask = blobs.mask(box)
        foreground += int(np.count_nonzero(mask))
        zarr_store.write_box(path, box, mask)
    voxels = math.prod(shape)
    return {
        "shape": list(shape),
        "voxels": voxels,
        "foreground_fraction": foreground / voxels,
        "seconds": time.perf_counter() - t0,
        "zarr_bytes": total_bytes(path),
        "seed": seed,
        "octaves": [list(o) for o in OCTAVES],
        "level": LEVEL,
    }


def total_bytes(path: Path) -> int:
    """Bytes of all files under ``path`` (0 if it does not exist)."""
    return sum(tree_bytes(path).values()) if path.is_dir() else 0


# --------------------------------------------------------------------------- orchestration


@dataclass
class Settings:
    """Options shared by the orchestrator and its children."""

    shape: tuple[int, int, int]
    chunk: int
    memory_limit: str
    run_timeout_s: float
    scratch: str
    n_workers: int = 2
    threads_per_worker: int = 1


def run_child(kind: str, source: Path, out: Path, settings: Settings, log: Path) -> dict[str, Any]:
    """Run one measurement in a subprocess, sampling its process tree; return its record.

    A run still going after ``settings.run_timeout_s`` is killed (its whole process tree) and
    recorded as timed out, with the memory it had used until then.
    """
    result = out.parent / f"{out.name}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, str(source), str(out), str(result)]
    cmd.append(json.dumps(asdict(settings)))
    rc, sampler = run_sampled(cmd, log, settings.run_timeout_s)
    if rc is None:
        record = timed_out_record(roles_file(result), settings.run_timeout_s)
    elif rc != 0 or not result.exists():
        raise RuntimeError(f"{kind} failed (exit {rc}); log {log}:\n{log.read_text()[-4000:]}")
    else:
        record = json.loads(result.read_text())
    add_usage(record, sampler, "started_at", scheduler="scheduler", tracker="mp-resource-tracker-{pid}")
    record["output_bytes"] = total_bytes(out)
    return record


def roles_file(result: Path) -> Path:
    """Where a child writes its process roles as soon as its cluster is up."""
    return result.with_name(f"{result.name}.roles")


def timed_out_record(roles: Path, timeout_s: float) -> dict[str, Any]:
    """The record of a run killed at ``timeout_s``."""
    known: dict[str, Any] = json.loads(roles.read_text()) if roles.exists() else {"roles": {"client": -1}}
    started = float(known.get("started_at", time.time() - timeout_s))
    return {
        "timed_out": True,
        "wall_s": time.time() - started,
        "started_at": started,
        "roles": known["roles"],
        "graph": known.get("graph"),
        "timings_s": {},
        "objects": None,
    }


def labels_path(kind: str, out: Path) -> Path:
    """Where the label map of a measurement lies."""
    return out / "staging.zarr" / "labels" if kind == "segpipe" else out


# --------------------------------------------------------------------------- partitions


class PairAccumulator:
    """Unique (a, b) id pairs at foreground voxels, gathered chunk by chunk."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: list[np.ndarray] = []
        self.fg_mismatch = 0
        self.max_a = self.max_b = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """Fold one chunk of both labelings in."""
        fa, fb = a != 0, b != 0
        self.fg_mismatch += int(np.count_nonzero(fa != fb))
        both = fa & fb
        pa, pb = a[both].astype(np.uint64), b[both].astype(np.uint64)
        if len(pa):
            self.max_a, self.max_b = max(self.max_a, int(pa.max())), max(self.max_b, int(pb.max()))
            if max(self.max_a, self.max_b) >= 2**32:
                raise ValueError(f"{self.name}: ids >= 2**32 are not supported by this check")
            self.keys.append(pd.unique((pa << np.uint64(32)) | pb))

    def verdict(self) -> dict[str, Any]:
        """Whether the two labelings are the same partition, with the counts behind it."""
        keys = np.unique(np.concatenate(self.keys)) if self.keys else np.zeros(0, np.uint64)
        n_a = len(np.unique(keys >> np.uint64(32)))
        n_b = len(np.unique(keys & np.uint64(2**32 - 1)))
        return {
            "identical": self.fg_mismatch == 0 and n_a == len(keys) == n_b,
            "foreground_mismatch_voxels": self.fg_mismatch,
            "id_pairs": len(keys),
            "ids": n_a,
            "reference_ids": n_b,
            "max_id": self.max_a,
            "sequential_ids": self.max_a == n_a,
        }


def compare_partitions(paths: dict[str, Path], shape: tuple[int, ...], chunk: int) -> dict[str, Any]:
    """Compare every labeling with scipy's, chunk by chunk, in one pass over the volume."""
    accs = {kind: PairAccumulator(kind) for kind in paths if kind != "scipy"}
    for box in chunk_boxes(shape, chunk):
        ref = zarr_store.read_box(paths["scipy"], box)
        for kind, acc in accs.items():
            acc.add(zarr_store.read_box(paths[kind], box), ref)
    return {kind: acc.verdict() for kind, acc in accs.items()}


# --------------------------------------------------------------------------- report


def same_text(record: dict[str, Any]) -> str:
    """The partition verdict of a record against scipy."""
    check = record.get("vs_scipy")
    if record.get("timed_out"):
        return "timed out"
    if check is None:
        return "reference" if record["kind"] == "scipy" else "-"
    return "yes" if check["identical"] else "NO"


def main_table(records: list[dict[str, Any]]) -> str:
    """Wall time, objects, partition check and peak RSS per process of every run."""
    head = (
        f"{'run':<11}{'wall s':>8}{'cpu s':>8}{'Mvox/s':>8}{'objects':>9}  {'same as scipy':<14}"
        f"{'client MiB':>11}{'sched MiB':>10}{'worker-1':>10}{'worker-2':>10}{'foreign %':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        wall = f">{r['wall_s']:.0f}" if r.get("timed_out") else f"{r['wall_s']:.1f}"
        rate = None if r.get("timed_out") else r["voxels"] / 1e6 / r["wall_s"]
        lines.append(
            f"{r['kind']:<11}{wall:>8}{r['cpu_s_tree']:>8.0f}{fmt(rate, 8, '.1f')}"
            f"{fmt(r['objects'], 9, 'd')}  {same_text(r):<14}{fmt(peak(r, 'client'), 11, '.0f')}"
            f"{fmt(peak(r, 'scheduler'), 10, '.0f')}{fmt(peak(r, 'worker-1'), 10, '.0f')}"
            f"{fmt(peak(r, 'worker-2'), 10, '.0f')}{r['foreign_load_pct']:>10.1f}"
        )
    return "\n".join(lines)


def detail_lines(records: list[dict[str, Any]]) -> list[str]:
    """Stage timings, spill, restarts and kernel peaks of each run."""
    lines = []
    for r in records:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items())
        extra = [f"stages s: {stages}"] if stages else []
        if r.get("timed_out"):
            extra.append(f"KILLED after {r['wall_s']:.0f} s (--run-timeout)")
        if r.get("spilled_bytes") is not None:
            extra.append(f"spilled to disk {r['spilled_bytes'] / MIB:.0f} MiB")
        if r.get("graph"):
            g = r["graph"]
            extra.append(
                f"graph {g['tasks']} tasks, {g['label_tasks']} scipy label tasks "
                f"(blocks + faces = {g['blocks'] + g['faces']})"
            )
        restarted = [k for k in r["memory"] if k.startswith("worker-restarted")]
        if restarted:
            extra.append(f"RESTARTED workers: {len(restarted)}")
        hwm = ", ".join(
            f"{k} {v['vm_hwm_mib']:.0f}" for k, v in r["memory"].items() if not k.startswith("mp-")
        )
        extra.append(f"VmHWM MiB: {hwm}")
        lines.append(f"{r['kind']:<11}" + "; ".join(extra))
    return lines


def check_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per partition check against scipy."""
    lines = []
    for r in records:
        c = r.get("vs_scipy")
        if c is None:
            continue
        lines.append(
            f"{r['kind']} vs scipy: identical={c['identical']} (foreground mismatch "
            f"{c['foreground_mismatch_voxels']} voxels; {c['id_pairs']} id pairs between {c['ids']} "
            f"ids and {c['reference_ids']} scipy ids; ids 1..{c['max_id']} sequential={c['sequential_ids']})"
        )
    return lines


def scipy_label_s(records: list[dict[str, Any]]) -> str:
    """Seconds of ``scipy.ndimage.label`` alone (read and write excluded)."""
    return next((f"{r['timings_s']['label']:.1f}" for r in records if r["kind"] == "scipy"), "-")


def render(records: list[dict[str, Any]], settings: Settings, data: dict[str, Any]) -> str:
    """Everything printed at the end."""
    shape = "x".join(map(str, settings.shape))
    notes = [
        f"input: {shape} uint8 0/1 ({data['voxels'] / 1e9:.2f} Gvoxel, "
        f"{100 * data['foreground_fraction']:.1f}% foreground, seed {data['seed']}), zarr chunks "
        f"{settings.chunk}^3; connectivity 1 (6-neighbours) everywhere.",
        f"cluster runs: {settings.n_workers} workers x {settings.threads_per_worker} thread, "
        f"memory_limit {settings.memory_limit} each; cluster start-up not counted in wall s.",
        "wall s: segpipe = run_job (plan .. summary, output zarr only); dask-image = graph + "
        "compute + store to zarr; scipy = read zarr + label + write zarr (scipy's label alone: "
        f"{scipy_label_s(records)} s).",
        f"MiB columns: peak RSS sampled every {SAMPLE_EVERY_S}s per process; 'sched' is the "
        "LocalCluster host process (scheduler + nannies); scipy runs in one process (client).",
        "cpu s: CPU seconds of all the run's processes (cluster start-up included). "
        "foreign %: CPU used by processes outside the benchmark during the run, as a share of "
        "all cores. Other work shares this machine, so the timings are upper bounds.",
    ]
    busy = [r["kind"] for r in records if r["foreign_load_pct"] > FOREIGN_WARN_PCT]
    if busy:
        notes.append(
            f"WARNING: other processes used more than {FOREIGN_WARN_PCT}% of the CPU during "
            f"{', '.join(busy)}; those timings are inflated and not comparable to each other."
        )
    parts = [main_table(records), "\n".join(detail_lines(records)), "\n".join(check_lines(records))]
    return "\n\n".join([*parts, "\n".join(notes)])


def write_json(records: list[dict[str, Any]], settings: Settings, data: dict[str, Any], text: str) -> Path:
    """Settings, input statistics, records and the printed table under benchmarks/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_label-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": asdict(settings),
        "input": data,
        "table": text,
        "records": records,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


# --------------------------------------------------------------------------- children


def announce(roles_path: Path, roles: dict[str, Any]) -> float:
    """Write the roles and the start time (read back if the run is killed); return the start."""
    started = time.time()
    roles_path.write_text(json.dumps({"roles": roles, "started_at": started}))
    return started


def _spilled(dask_worker: Any) -> float:
    """Bytes this worker has written to its spill directory so far."""
    metrics = getattr(dask_worker.data, "cumulative_metrics", {})
    return float(metrics.get(("disk-write", "bytes"), 0.0))


def spilled_bytes(client: Any) -> int:
    """Bytes spilled to disk by all workers."""
    return int(sum(client.run(_spilled).values()))


def child_segpipe(source: Path, out: Path, settings: dict[str, Any], roles_path: Path) -> dict[str, Any]:
    """The segpipe ``components`` job, timed end to end (plan .. summary)."""
    from pipeline.cluster import connect
    from pipeline.runner.api import run_job
    from pipeline.runner.spec import parse_job, resolve_paths

    raw = {
        "name": "bench-label",
        "input": {"path": str(source)},
        "segmenter": {
            "name": "components",
            "params": {"semantic": {"name": "threshold", "params": {"value": 0}}, "connectivity": 1},
        },
        "tiling": {"chunk": [settings["chunk"]] * 3},
        "output": {"dir": str(out), "formats": ["zarr"]},
    }
    spec = resolve_paths(parse_job(raw), base=REPO)
    with cluster_host(settings) as address, connect(scheduler=address) as client:
        roles = cluster_roles(client)
        started, t0 = announce(roles_path, roles), time.perf_counter()
        result = run_job(spec, client=client)
        wall = time.perf_counter() - t0
        spilled = spilled_bytes(client)
    return {
        "wall_s": wall,
        "started_at": started,
        "roles": roles,
        "timings_s": result.timings,
        "objects": int(result.instances["objects"]),
        "instances": result.instances,
        "spilled_bytes": spilled,
    }


def graph_stats(labels: Any, numblocks: tuple[int, ...]) -> dict[str, int]:
    """Size of a dask-image label graph: tasks, scipy label tasks, blocks and block faces."""
    from dask.utils import key_split

    keys = list(dict(labels.__dask_graph__()))
    faces = sum(math.prod(n - (i == axis) for i, n in enumerate(numblocks)) for axis in range(len(numblocks)))
    return {
        "tasks": len(keys),
        "label_tasks": sum(key_split(k) == "label" for k in keys),
        "blocks": math.prod(numblocks),
        "faces": faces,
    }


def child_dask_image(source: Path, out: Path, settings: dict[str, Any], roles_path: Path) -> dict[str, Any]:
    """``dask_image.ndmeasure.label`` of the zarr array, stored to zarr on the cluster, timed.

    The graph is counted (untimed) between building it and computing it.
    """
    import dask
    import dask.array as da
    import zarr
    from dask_image.ndmeasure import label

    from pipeline.cluster import connect

    with cluster_host(settings) as address, connect(scheduler=address) as client:
        roles = cluster_roles(client)
        started, t0 = announce(roles_path, roles), time.perf_counter()
        image = da.from_zarr(str(source))
        labels, count = label(image)
        zarr_store.create_array(
            out, shape=image.shape, chunks=image.chunksize, dtype=str(labels.dtype), geometry=VOLUME
        )
        target = zarr.open_array(store=str(out), mode="r+")
        stored = da.store(labels, target, lock=False, compute=False)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        graph = graph_stats(labels, image.numblocks)
        started += time.perf_counter() - t1  # the series and timeouts skip the counting
        roles_path.write_text(json.dumps({"roles": roles, "started_at": started, "graph": graph}))
        t2 = time.perf_counter()
        _, n = dask.compute(stored, count)
        t3 = time.perf_counter()
        spilled = spilled_bytes(client)
    return {
        "wall_s": (t1 - t0) + (t3 - t2),
        "started_at": started,
        "roles": roles,
        "graph": graph,
        "timings_s": {"graph": t1 - t0, "compute+store": t3 - t2},
        "objects": int(n),
        "label_dtype": str(labels.dtype),
        "spilled_bytes": spilled,
    }


def child_scipy(source: Path, out: Path, settings: dict[str, Any], roles_path: Path) -> dict[str, Any]:
    """Read the whole volume, ``scipy.ndimage.label`` it, write the labels to zarr, timed."""
    import zarr
    from scipy import ndimage

    started, t0 = announce(roles_path, {"client": os.getpid()}), time.perf_counter()
    volume = np.asarray(zarr.open_array(store=str(source), mode="r")[...])
    t1 = time.perf_counter()
    labels, n = ndimage.label(volume, structure=ndimage.generate_binary_structure(3, 1))
    t2 = time.perf_counter()
    hwm_label = vm_hwm("self")
    del volume
    chunks = (settings["chunk"],) * 3
    zarr_store.create_array(out, shape=labels.shape, chunks=chunks, dtype=str(labels.dtype), geometry=VOLUME)
    zarr_store.write_box(out, Box.from_shape(labels.shape), labels)
    t3 = time.perf_counter()
    return {
        "wall_s": t3 - t0,
        "started_at": started,
        "roles": {"client": os.getpid()},
        "timings_s": {"read": t1 - t0, "label": t2 - t1, "write": t3 - t2},
        "objects": int(n),
        "label_dtype": str(labels.dtype),
        "vm_hwm_after_label_mib": round(hwm_label / MIB, 1),
    }


CHILDREN = {"segpipe": child_segpipe, "dask-image": child_dask_image, "scipy": child_scipy}


def child_main(argv: list[str]) -> None:
    """Entry of the ``_child KIND SOURCE OUT RESULT SETTINGS`` subprocess."""
    kind, source, out, result, settings = argv
    record = CHILDREN[kind](Path(source), Path(out), json.loads(settings), roles_file(Path(result)))
    Path(result).write_text(json.dumps(record, default=str))


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="edge of the cubic volume in voxels (1024)")
    p.add_argument("--chunk", type=int, default=256, help="zarr chunk and segpipe tiling.chunk (cube)")
    p.add_argument("--memory-limit", default="4GiB", help="per-worker memory limit (4GiB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random field (0)")
    p.add_argument(
        "--run-timeout", type=float, default=600, help="kill a run still going after this many s (600)"
    )
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new /tmp dir)")
    p.add_argument(
        "--only", nargs="+", choices=KINDS, default=list(KINDS), help="runs to do (scipy is always run)"
    )
    return p.parse_args(argv)


def run_all(kinds: list[str], source: Path, settings: Settings, workdir: Path) -> list[dict[str, Any]]:
    """Every measurement in turn (scipy last); returns their records."""
    records = []
    for kind in kinds:
        out = workdir / (kind if kind == "segpipe" else f"{kind}.zarr")
        say(f"{kind} ...")
        record = run_child(kind, source, out, settings, workdir / f"{kind}.log")
        record.update(kind=kind, voxels=math.prod(settings.shape), labels=str(labels_path(kind, out)))
        record["scratch_bytes"] = total_bytes(workdir)
        remove(Path(settings.scratch))  # spill files of this run
        done = "timed out" if record.get("timed_out") else f"{record['objects']} objects"
        say(f"  {record['wall_s']:.1f} s, {done}")
        records.append(record)
    return records


def main(argv: list[str]) -> None:
    """Generate the input, run every measurement, compare partitions, print and save."""
    args = parse_args(argv)
    kinds = [k for k in KINDS if k in args.only or k == "scipy"]
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_label-", dir="/tmp")) if own else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "dask-scratch"
    settings = Settings((args.size,) * 3, args.chunk, args.memory_limit, args.run_timeout, str(scratch))
    # room for the input and three label maps; generous: compressed labels take far less than 4 B/voxel
    check_disk(workdir, max(2 * GIB, math.prod(settings.shape) * 4))
    t0 = time.perf_counter()
    try:
        say(f"generating {args.size}^3 input (chunks {args.chunk}^3) ...")
        data = generate_input(workdir / "input.zarr", settings.shape, args.chunk, args.seed)
        say(f"  {data['seconds']:.1f} s, {100 * data['foreground_fraction']:.1f}% foreground")
        records = run_all(kinds, workdir / "input.zarr", settings, workdir)
        data["scratch_bytes"] = total_bytes(workdir)
        say("comparing partitions chunk by chunk ...")
        checks = compare_partitions(
            {r["kind"]: Path(r["labels"]) for r in records if not r.get("timed_out")},
            settings.shape,
            args.chunk,
        )
    finally:
        if own:
            remove(workdir)
    for r in records:
        r["vs_scipy"] = checks.get(r["kind"])
    text = render(records, settings, data)
    print(text)
    path = write_json(records, settings, data, text)
    print(f"\nwhole benchmark {time.perf_counter() - t0:.0f} s; JSON: {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
