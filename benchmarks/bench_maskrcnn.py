"""Benchmark segpipe's tiled Mask R-CNN against SAHI-style slicing with full-image NMS (issue #8).

One command, one run, same model, same input:

* input: a >= 8k x 8k uint16 GeoTIFF mosaic of the two real BBBC039 fields (flipped so that
  neighbouring fields mirror each other), with the matching instance-label mosaic as truth;
* ``segpipe``  ``segpipe run`` of a ``maskrcnn`` job with the shipped ``nuclei_maskrcnn`` card on
  the embedded local cluster (2 worker processes x 1 thread, 2 GiB each): detections whose box a
  block edge cuts are dropped, masks stay at box size, ids meet across seams by IoU in the halo;
* ``sahi``     one process, ``torch.set_num_threads(2)``: the image sliced into ``--slice`` px
  slices with SAHI's default overlap ratio 0.2, every slice through the same network (the same
  normalisation and ``detect`` call), every detection kept and shifted to image coordinates
  (its mask at box size, which is kinder to memory than SAHI's full-image masks), then one
  class-aware NMS over all boxes of the image (IoU 0.5, ``torchvision.ops.batched_nms``, SAHI's
  ``NMS`` postprocess) and the survivors pasted (higher score wins) for scoring.

Reported per method: wall time, peak RSS (largest process and the sum of the tree's peaks), the
number of objects, F1 at IoU 0.5 against the truth mosaic, and, for the truth objects that cross a
tile seam of that method (segpipe chunk edges; SAHI slice edges), how many are reported twice
(two or more predicted objects each lying mostly, >= 50 % of its area, inside the truth object)
and how many are missed (no prediction with IoU >= 0.5), next to the same rates away from seams.
Duplicates are counted on the object list before pasting, so SAHI's overlapping survivors count.

Run: ``python benchmarks/bench_maskrcnn.py`` (``--side 8192`` default; ``--quick`` is 2048).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, MIB, REPO, RESULTS, run_sampled

FIELDS = DATA / "images" / "bbbc039"
NAMES = [
    "IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E847D9B42CB",
    "IXMtest_G13_s9_w19606195E-12B4-46FF-9B83-1F7FE11B3AFB",
]
MODEL = "nuclei_maskrcnn"
MAX_OBJECT = 64


# --------------------------------------------------------------------------- input


def make_mosaic(side: int, work: Path) -> tuple[Path, Path]:
    """A ``side``-px (at least) mosaic of the BBBC039 fields and its truth ids (int32 .npy)."""
    import rasterio
    import tifffile

    fields = [tifffile.imread(FIELDS / f"{n}.tif") for n in NAMES]
    truths = [tifffile.imread(FIELDS / f"{n}_instances.tif").astype(np.int64) for n in NAMES]
    h, w = fields[0].shape
    rows, cols = -(-side // h), -(-side // w)
    image = np.zeros((rows * h, cols * w), np.uint16)
    truth = np.zeros((rows * h, cols * w), np.int32)
    top = 0
    for r in range(rows):
        for c in range(cols):
            k = (r + c) % 2
            img, lab = fields[k], truths[k]
            if r % 2:
                img, lab = img[::-1], lab[::-1]
            if c % 2:
                img, lab = img[:, ::-1], lab[:, ::-1]
            image[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
            ids = np.where(lab > 0, lab + top, 0)
            truth[r * h : (r + 1) * h, c * w : (c + 1) * w] = ids
            top += int(lab.max())
    path = work / "mosaic.tif"
    profile = {
        "driver": "GTiff",
        "height": image.shape[0],
        "width": image.shape[1],
        "count": 1,
        "dtype": "uint16",
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image, 1)
    tpath = work / "truth.npy"
    np.save(tpath, truth)
    return path, tpath


# --------------------------------------------------------------------------- children


def child_sahi(args: dict[str, Any]) -> None:
    """SAHI-style slicing + full-image NMS in this process; objects saved to ``args['out']``."""
    import rasterio
    import torch
    from torchvision.ops import batched_nms

    from pipeline.models import ImageInfo
    from pipeline.models.base import create_segmenter
    from pipeline.models.torch.detections import Detections
    from pipeline.models.torch.maskrcnn_segmenter import MaskRCNNSegmenter  # noqa: F401  (registers it)

    torch.set_num_threads(2)
    with rasterio.open(args["image"]) as src:
        image = src.read()
    info = ImageInfo(kind="raster", n_channels=1, dtype="uint16", shape=image.shape[1:])
    seg: Any = create_segmenter(
        "maskrcnn", {"model": MODEL, "max_object_size": MAX_OBJECT, "batch_size": 1}, info
    )
    size, step = args["slice"], round(args["slice"] * (1 - 0.2))
    h, w = image.shape[1:]
    starts_r = sorted({*range(0, max(h - size, 0) + 1, step), max(h - size, 0)})
    starts_c = sorted({*range(0, max(w - size, 0) + 1, step), max(w - size, 0)})
    valid = np.ones((size, size), bool)
    found: list[Detections] = []
    t0 = time.perf_counter()
    for r0 in starts_r:
        for c0 in starts_c:
            block = image[:, r0 : r0 + size, c0 : c0 + size]
            x = seg.normalise(block, valid[: block.shape[1], : block.shape[2]])
            det = seg._forward(x[None])[0]
            det = det.select(det.scores >= seg.params.score_threshold)
            found.append(det.shifted(r0, c0))
    allx = Detections.concat(found)
    keep = batched_nms(
        torch.from_numpy(allx.boxes), torch.from_numpy(allx.scores), torch.from_numpy(allx.labels), 0.5
    ).numpy()
    kept = allx.select(np.sort(keep))
    wall = time.perf_counter() - t0
    _save_objects(Path(args["out"]), kept, seg.params.mask_threshold)
    Path(args["out"], "run.json").write_text(
        json.dumps({"wall_s": wall, "slices": len(starts_r) * len(starts_c), "before_nms": len(allx)})
    )


def _save_objects(out: Path, det: Any, threshold: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    crops = [m >= threshold for m in det.masks]
    np.save(out / "boxes.npy", det.mask_boxes)
    np.save(out / "scores.npy", det.scores)
    flat = np.concatenate([c.ravel() for c in crops]) if crops else np.zeros(0, bool)
    np.save(out / "masks.npy", np.packbits(flat))


# --------------------------------------------------------------------------- scoring


def objects_from_labels(labels: np.ndarray) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """``(x0, y0, x1, y1), bool crop`` of every id of a label image."""
    from scipy import ndimage

    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl] == i
        out.append(((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), crop))
    return out


def objects_from_saved(folder: Path) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    boxes = np.load(folder / "boxes.npy")
    bits = np.unpackbits(np.load(folder / "masks.npy")).astype(bool)
    out, pos = [], 0
    for x0, y0, x1, y1 in boxes:
        n = int((y1 - y0) * (x1 - x0))
        out.append(((int(x0), int(y0), int(x1), int(y1)), bits[pos : pos + n].reshape(y1 - y0, x1 - x0)))
        pos += n
    return out


def score(
    objects: list[tuple[tuple[int, int, int, int], np.ndarray]],
    truth: np.ndarray,
    seams: tuple[list[int], list[int]],
) -> dict[str, Any]:
    """F1@0.5 and duplicates / misses among truth objects on and off seams."""
    n_truth = int(truth.max())
    t_area = np.bincount(truth.ravel(), minlength=n_truth + 1)
    best_iou = np.zeros(n_truth + 1)
    inside = np.zeros(n_truth + 1, np.int64)  # predictions lying mostly inside each truth object
    matched_pred = 0
    for (x0, y0, x1, y1), crop in objects:
        area = int(crop.sum())
        if area == 0:
            continue
        under = truth[y0:y1, x0:x1][crop]
        counts = np.bincount(under, minlength=n_truth + 1)
        counts[0] = 0
        t = int(np.argmax(counts))
        if counts[t] == 0:
            continue
        iou = counts[t] / (area + t_area[t] - counts[t])
        best_iou[t] = max(best_iou[t], iou)
        matched_pred += iou >= 0.5
        if counts[t] >= 0.5 * area:
            inside[t] += 1
    present = t_area > 0
    present[0] = False
    tp = int((best_iou[present] >= 0.5).sum())
    n_pred = len(objects)
    f1 = 2 * tp / (n_pred + int(present.sum())) if n_pred + present.sum() else 1.0
    on_seam = _seam_objects(truth, seams, n_truth) & present
    off_seam = present & ~on_seam

    def rates(sel: np.ndarray) -> dict[str, Any]:
        return {
            "objects": int(sel.sum()),
            "duplicated": int((inside[sel] >= 2).sum()),
            "missed": int((best_iou[sel] < 0.5).sum()),
        }

    return {
        "n_pred": n_pred,
        "n_truth": int(present.sum()),
        "f1": f1,
        "seam": rates(on_seam),
        "off": rates(off_seam),
    }


def _seam_objects(truth: np.ndarray, seams: tuple[list[int], list[int]], n: int) -> np.ndarray:
    """Truth ids that cross a row or column seam (pixels on both sides of it)."""
    hit = np.zeros(n + 1, bool)
    for r in seams[0]:
        if 0 < r < truth.shape[0]:
            a, b = truth[r - 1], truth[r]
            hit[a[(a == b) & (a > 0)]] = True
    for c in seams[1]:
        if 0 < c < truth.shape[1]:
            a, b = truth[:, c - 1], truth[:, c]
            hit[a[(a == b) & (a > 0)]] = True
    return hit


# --------------------------------------------------------------------------- orchestration


def peaks(sampler: Any) -> dict[str, float]:
    rss = [s.peak_rss / MIB for s in sampler.stats.values()]
    return {"largest_mib": round(max(rss), 1), "sum_mib": round(sum(rss), 1), "processes": len(rss)}


def main(argv: list[str]) -> None:
    if argv and argv[0] == "_sahi":
        child_sahi(json.loads(argv[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--slice", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="a 2048 px image")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    side = 2048 if a.quick else a.side
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_maskrcnn_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}")
    image, tpath = make_mosaic(side, work)
    truth = np.load(tpath)
    h, w = truth.shape
    print(f"image {h} x {w}, {int(truth.max())} truth objects")
    py = sys.executable
    rows: dict[str, Any] = {}

    import yaml

    job = {
        "name": "bench-maskrcnn",
        "input": {"path": str(image), "allow_missing_crs": True},
        "segmenter": {"name": "maskrcnn", "params": {"model": MODEL, "max_object_size": MAX_OBJECT}},
        "tiling": {"chunk": [a.chunk, a.chunk]},
        "output": {"dir": str(work / "segpipe"), "formats": ["zarr"]},
    }
    jpath = work / "job.yaml"
    jpath.write_text(yaml.safe_dump(job, sort_keys=False))
    t0 = time.perf_counter()
    rc, sampler = run_sampled([py, "-m", "pipeline.runner.cli", "run", str(jpath)], work / "segpipe.log")
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"segpipe run failed ({rc}); see {work / 'segpipe.log'}")
    labels = _read_labels(work / "segpipe")
    seams = (list(range(a.chunk, h, a.chunk)), list(range(a.chunk, w, a.chunk)))
    rows["segpipe"] = {"wall_s": wall, **peaks(sampler), **score(objects_from_labels(labels), truth, seams)}
    del labels

    args = {"image": str(image), "slice": a.slice, "out": str(work / "sahi")}
    t0 = time.perf_counter()
    rc, sampler = run_sampled([py, __file__, "_sahi", json.dumps(args)], work / "sahi.log")
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"SAHI-style run failed ({rc}); see {work / 'sahi.log'}")
    step = round(a.slice * 0.8)
    edges_r = sorted({e for s in range(0, h - a.slice + 1, step) for e in (s, s + a.slice)})
    edges_c = sorted({e for s in range(0, w - a.slice + 1, step) for e in (s, s + a.slice)})
    extra = json.loads((work / "sahi" / "run.json").read_text())
    rows["sahi"] = {
        "wall_s": wall,
        **peaks(sampler),
        **extra,
        **score(objects_from_saved(work / "sahi"), truth, (edges_r, edges_c)),
    }
    text = render(rows, h, w, a)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"maskrcnn_{h}x{w}.json"
    out.write_text(json.dumps({"rows": rows, "table": text}, indent=1, default=float))
    print(f"wrote {out}")


def _read_labels(folder: Path) -> np.ndarray:
    """The stitched ids from the run's summary (its ``zarr`` output)."""
    import zarr

    summary = json.loads((folder / "summary.json").read_text())
    arr = np.asarray(zarr.open_array(store=summary["outputs"]["zarr"], mode="r")[...])
    return arr.reshape(arr.shape[-2:]).astype(np.int64)


def render(rows: dict[str, Any], h: int, w: int, a: argparse.Namespace) -> str:
    s, b = rows["segpipe"], rows["sahi"]
    lines = [
        f"Mask R-CNN ({MODEL}) on a {h} x {w} BBBC039 mosaic; segpipe chunk {a.chunk}, "
        f"SAHI slice {a.slice} (overlap 0.2)",
        "| method | wall s | peak RSS largest / sum (MiB) | objects | F1@0.5 | seam objects "
        "| dup at seams | missed at seams | missed off seams |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("segpipe", s), ("SAHI-style + NMS", b)):
        off = r["off"]
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['largest_mib']:.0f} / {r['sum_mib']:.0f} | {r['n_pred']} | "
            f"{r['f1']:.3f} | {r['seam']['objects']} | {r['seam']['duplicated']} | {r['seam']['missed']} | "
            f"{off['missed']} of {off['objects']} |"
        )
    lines.append(
        f"ratios segpipe/SAHI: wall {s['wall_s'] / b['wall_s']:.2f}, peak RSS largest "
        f"{s['largest_mib'] / b['largest_mib']:.2f}, sum {s['sum_mib'] / b['sum_mib']:.2f}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])
