"""One metrics row per chunk, and the Parquet table of a job."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.geometry import Geometry, GeoRef


def tile_row(
    chunk_id: str,
    start: tuple[int, ...],
    stop: tuple[int, ...],
    labels: np.ndarray,
    classes: dict[int, str],
    geometry: Geometry,
    *,
    nodata_label: int,
) -> dict[str, Any]:
    """Geometry and class statistics of one chunk's labels (its write box only)."""
    bounds = geometry.bounds(start, stop)
    counts = np.bincount(labels.ravel(), minlength=256)
    valid = int(labels.size - counts[nodata_label])
    row: dict[str, Any] = {
        "chunk_id": chunk_id,
        "start": list(start),
        "stop": list(stop),
        "bounds": list(bounds),
        "bounds_units": "crs" if isinstance(geometry, GeoRef) else "mm",
        "pixels": int(labels.size),
        "valid_pixels": valid,
    }
    for cid, name in classes.items():
        row[f"frac_{name}"] = float(counts[cid] / valid) if valid else 0.0
    return row


def write_tile_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write the per-tile rows as Parquet atomically, sorted by chunk id."""
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values("chunk_id", key=lambda s: s.map(_natural)).reset_index(drop=True)
    tmp = path.with_name(f".tmp-{path.name}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def _natural(chunk_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in chunk_id.split("_"))


def seam_band(shape: tuple[int, ...], seams: tuple[tuple[bool, bool], ...], width: int) -> np.ndarray:
    """Pixels of a write box within ``width`` of one of its seams (edges shared with a neighbour)."""
    band = np.zeros(shape, dtype=bool)
    for axis, (before, after) in enumerate(seams):
        index = [slice(None)] * len(shape)
        if before:
            index[axis] = slice(0, width)
            band[tuple(index)] = True
        if after:
            index[axis] = slice(max(shape[axis] - width, 0), None)
            band[tuple(index)] = True
    return band


def reference_row(
    pred: np.ndarray,
    ref: np.ndarray,
    classes: dict[int, str],
    *,
    ignore: int | None,
    nodata_label: int,
    band: np.ndarray,
) -> dict[str, Any]:
    """Per-tile IoU/Dice against a reference, and confusion matrices in the seam band and inside.

    Pixels whose reference is ``ignore`` or whose prediction is nodata are not scored.
    """
    ids = sorted(c for c in classes if c != nodata_label)
    scored = pred != nodata_label
    if ignore is not None:
        scored &= ref != ignore
    row: dict[str, Any] = {"ref_pixels": int(scored.sum())}
    band_cm = _confusion(pred[scored & band], ref[scored & band], ids)
    inner_cm = _confusion(pred[scored & ~band], ref[scored & ~band], ids)
    tp = np.diag(band_cm + inner_cm).astype(float)
    total = band_cm + inner_cm
    fp, fn = total.sum(axis=0) - tp, total.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, dice = tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)
    for k, cid in enumerate(ids):
        row[f"iou_{classes[cid]}"] = float(iou[k])
        row[f"dice_{classes[cid]}"] = float(dice[k])
    row["cm_band"], row["cm_interior"] = band_cm.ravel().tolist(), inner_cm.ravel().tolist()
    return row


def _confusion(pred: np.ndarray, ref: np.ndarray, ids: list[int]) -> np.ndarray:
    """``m[i, j]``: reference ``ids[i]`` predicted as ``ids[j]`` (sorted ids; others not counted)."""
    k, table = len(ids), np.asarray(ids)
    ri, pi = np.searchsorted(table, ref), np.searchsorted(table, pred)
    ok = (ri < k) & (pi < k)
    ok &= (table[np.minimum(ri, k - 1)] == ref) & (table[np.minimum(pi, k - 1)] == pred)
    return np.bincount(ri[ok] * k + pi[ok], minlength=k * k).reshape(k, k)


def seam_scores(rows: list[dict[str, Any]], classes: dict[int, str], nodata_label: int) -> dict[str, Any]:
    """Reference scores summed over tiles: overall, in the seam band, and inside the tiles."""
    ids = sorted(c for c in classes if c != nodata_label)
    out: dict[str, Any] = {}
    for key in ("cm_band", "cm_interior"):
        cms = [np.asarray(r[key]) for r in rows if key in r]
        total = np.sum(np.stack(cms), axis=0) if cms else np.zeros(len(ids) ** 2, dtype=np.int64)
        out[key] = total.reshape(len(ids), len(ids))
    summary = {}
    for name, cm in (
        ("overall", out["cm_band"] + out["cm_interior"]),
        ("seam_band", out["cm_band"]),
        ("interior", out["cm_interior"]),
    ):
        tp = np.diag(cm).astype(float)
        fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = tp / (tp + fp + fn)
        summary[name] = {
            "pixels": int(cm.sum()),
            "iou": {classes[c]: _num(v) for c, v in zip(ids, iou, strict=True)},
            "miou": _num(float(np.nanmean(iou))) if np.isfinite(iou).any() else None,
            "accuracy": _num(float(tp.sum() / cm.sum())) if cm.sum() else None,
        }
    return summary


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)
