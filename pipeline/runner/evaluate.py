"""``evaluate(pred, ref)``: compare a prediction with a reference on a Dask cluster.

Both inputs are opened by :func:`~pipeline.io.sources.open_source` (any raster or volume
segpipe reads) and their geometry is checked before anything is computed. The chunk-additive
partial, a :class:`~pipeline.metrics.contingency.Contingency` of (reference, prediction) value
pairs, is computed chunk by chunk on the workers and tree-summed there; only the (small) table
comes back to the client. Semantic, instance and panoptic metrics and volumes all derive from
it. Surface distances (``kind="medical"``) gather both volumes into one worker task.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from distributed import Client

from pipeline.cluster import connect
from pipeline.data.geometry import GeoRef, VolumeRef, check_same_geometry
from pipeline.errors import ConfigError, GeometryMismatchError
from pipeline.io import geo
from pipeline.io.sources import ImageSource, open_source
from pipeline.metrics import coco, panoptic, surface
from pipeline.metrics.contingency import Contingency, combine, contingency
from pipeline.metrics.semantic import semantic_metrics
from pipeline.runner.execute import FAN_IN, REDUCE_BATCH
from pipeline.tiling import Box, ChunkGrid

log = logging.getLogger(__name__)
Kind = Literal["semantic", "instance", "panoptic", "medical"]
KINDS: tuple[Kind, ...] = ("semantic", "instance", "panoptic", "medical")


@dataclass(frozen=True)
class EvalOptions:
    """Options of :func:`evaluate` beyond the kind and the ignore value.

    Parameters
    ----------
    classes
        Semantic/medical: the classes reported and averaged (default: every value seen).
    iou_thresholds
        Instance: IoU thresholds of the one-to-one F1 matching.
    max_dets
        Instance: detections per image kept by score for AP/AR (COCO's 100; ``None``: all).
    scores
        Instance: a score per predicted id (default 1.0 for every id).
    pred_categories, ref_categories
        Panoptic: category of every segment id (e.g. from a segpipe ``segments.json``).
    label_divisor
        Panoptic: ids encode ``category * label_divisor + instance`` (instead of tables).
    things
        Panoptic: thing categories (adds things / stuff averages).
    chunk
        Chunk edge in pixels/voxels (default 1024 for rasters, 128 for volumes).
    allow_missing_crs
        Accept rasters without a CRS (e.g. microscopy TIFFs); both must then lack one.
    """

    classes: tuple[int, ...] | None = None
    iou_thresholds: tuple[float, ...] = (0.5, 0.75)
    max_dets: int | None = 100
    scores: Mapping[int, float] | None = None
    pred_categories: Mapping[int, int] | None = None
    ref_categories: Mapping[int, int] | None = None
    label_divisor: int | None = None
    things: tuple[int, ...] | None = None
    chunk: int | None = None
    allow_missing_crs: bool = False


def evaluate(
    pred_path: str | Path,
    ref_path: str | Path,
    *,
    kind: Kind = "semantic",
    ignore: int | None = None,
    client: Client | None = None,
    scheduler: str | None = None,
    options: EvalOptions | None = None,
) -> dict[str, Any]:
    """Metrics of the prediction at ``pred_path`` against the reference at ``ref_path``.

    ``ignore``: reference value whose pixels are not counted (semantic, instance, medical;
    default: the reference raster's nodata), or the void id (panoptic; default 0). With no
    ``client`` a local cluster is started (or ``scheduler`` used). Raises
    :class:`GeometryMismatchError` naming the field (CRS, transform, spacing, origin,
    direction, shape) when the two are not on the same grid.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r} is not one of {list(KINDS)}")
    opts = options or EvalOptions()
    pred, ref = open_pair(pred_path, ref_path, allow_missing_crs=opts.allow_missing_crs)
    if client is None:
        with connect(scheduler=scheduler, dashboard=False) as own:
            return _evaluate(own, pred, ref, kind, ignore, opts)
    return _evaluate(client, pred, ref, kind, ignore, opts)


def open_pair(
    pred_path: str | Path, ref_path: str | Path, *, allow_missing_crs: bool = False
) -> tuple[ImageSource, ImageSource]:
    """Open both inputs (headers only) and check that they share one grid."""
    pred = open_source(pred_path, allow_missing_crs=allow_missing_crs)
    ref = open_source(ref_path, allow_missing_crs=allow_missing_crs)
    what = f"prediction {pred.path} (compared with reference {ref.path})"
    try:
        check_same_geometry(ref.geometry, pred.geometry, what=what, same_crs=geo.same_crs)
    except GeometryMismatchError as e:
        msg = str(e).replace("the input's", "the reference's").removesuffix("; the output was not published")
        raise GeometryMismatchError(f"{msg}. Resample the prediction onto the reference grid.") from e
    if pred.spatial_shape != ref.spatial_shape:
        raise GeometryMismatchError(
            f"{what}: shape {pred.spatial_shape} differs from the reference's {ref.spatial_shape}"
        )
    for src in (pred, ref):
        if src.shape[0] != 1:
            raise ConfigError(f"{src.path}: has {src.shape[0]} bands; labels must be one band")
    return pred, ref


def _evaluate(
    client: Client, pred: ImageSource, ref: ImageSource, kind: Kind, ignore: int | None, opts: EvalOptions
) -> dict[str, Any]:
    if ignore is None and kind != "panoptic" and isinstance(ref.geometry, GeoRef):
        nodata = ref.geometry.nodata
        ignore = int(nodata) if nodata is not None and float(nodata).is_integer() else None
    void = 0 if ignore is None else ignore
    table = reduce_table(client, pred, ref, ignore=None if kind == "panoptic" else ignore, chunk=opts.chunk)
    out: dict[str, Any] = {
        "kind": kind,
        "prediction": str(pred.path),
        "reference": str(ref.path),
        "ignore": ignore,
        "shape": list(ref.spatial_shape),
    }
    if kind == "semantic":
        out.update(semantic_metrics(table, classes=opts.classes))
    elif kind == "instance":
        out.update(instance_metrics(table, opts))
    elif kind == "panoptic":
        out.update(panoptic_metrics(table, opts, void))
    else:
        out.update(medical_metrics(client, pred, ref, table, opts, ignore))
    return out


def reduce_table(
    client: Client, pred: ImageSource, ref: ImageSource, *, ignore: int | None, chunk: int | None = None
) -> Contingency:
    """The contingency table of the whole image pair as a Dask tree reduction over chunks.

    Each task reads its chunks of both inputs and returns their summed table; tables are
    summed ``FAN_IN`` at a time on the workers. Inputs that cannot be read by region
    (compressed volumes) are read whole by one task.
    """
    shape = ref.spatial_shape
    edge = chunk or (1024 if len(shape) == 2 else 128)
    if pred.streamable and ref.streamable:
        boxes = [s.write for s in ChunkGrid.build(shape, (edge,) * len(shape), 0)]
    else:
        boxes = [Box.from_shape(shape)]
    n_workers = max(1, len(client.nthreads()))
    size = max(1, min(REDUCE_BATCH, -(-len(boxes) // (4 * n_workers))))
    parts = [
        client.submit(chunk_table, pred, ref, boxes[i : i + size], ignore, pure=False)
        for i in range(0, len(boxes), size)
    ]
    while len(parts) > 1:
        parts = [
            client.submit(combine_tables, *parts[i : i + FAN_IN], pure=False)
            for i in range(0, len(parts), FAN_IN)
        ]
    return parts[0].result()


def chunk_table(pred: ImageSource, ref: ImageSource, boxes: list[Box], ignore: int | None) -> Contingency:
    """Worker task: the summed contingency table of a batch of chunks."""
    return combine([contingency(pred.read(b)[0], ref.read(b)[0], ignore=ignore) for b in boxes])


def combine_tables(*tables: Contingency) -> Contingency:
    """Worker task: sum partial tables."""
    return combine(list(tables))


def instance_metrics(table: Contingency, opts: EvalOptions) -> dict[str, Any]:
    """COCO AP/AP50/AP75/AR and F1 at ``opts.iou_thresholds`` from the id-pair table.

    Gathers nothing but the table (one row per overlapping id pair and per id).
    """
    ov = coco.Overlaps.from_table(table)
    return {
        "n_pred": len(ov.pred_ids),
        "n_ref": len(ov.ref_ids),
        "max_dets": opts.max_dets,
        **coco.coco_metrics(ov, opts.scores, max_dets=opts.max_dets),
        "f1": coco.f1_scores(ov, opts.iou_thresholds),
    }


def panoptic_metrics(table: Contingency, opts: EvalOptions, void: int) -> dict[str, Any]:
    """PQ/SQ/RQ per category and averaged, from the segment-pair table (nothing else gathered)."""
    if opts.label_divisor:
        pc = panoptic.categories_from_divisor(table.pred_counts()[0], opts.label_divisor, void)
        rc = panoptic.categories_from_divisor(table.ref_counts()[0], opts.label_divisor, void)
    elif opts.pred_categories is not None and opts.ref_categories is not None:
        pc, rc = dict(opts.pred_categories), dict(opts.ref_categories)
    else:
        raise ConfigError(
            "panoptic evaluation needs the category of every segment: give segments tables "
            "(--pred-segments/--ref-segments, segpipe's segments.json) or --label-divisor"
        )
    return panoptic.panoptic_quality(table, pc, rc, void=void, things=opts.things)


def medical_metrics(
    client: Client,
    pred: ImageSource,
    ref: ImageSource,
    table: Contingency,
    opts: EvalOptions,
    ignore: int | None,
) -> dict[str, Any]:
    """Dice and volumes (from the table) and HD95/ASSD/HD in mm per label.

    Surface distances gather both whole volumes into one worker task (the client receives
    only the numbers).
    """
    if not isinstance(ref.geometry, VolumeRef):
        raise ConfigError(f"{ref.path}: medical metrics need volumes (spacing in mm); use semantic")
    sem = semantic_metrics(table, classes=opts.classes)
    labels = [c for c in sem["classes"] if c != 0 and c != ignore]
    values, ref_n = table.ref_counts()
    pvalues, pred_n = table.pred_counts()
    volumes = surface.volumes_ml(
        np.asarray(labels, dtype=np.int64),
        _counts_at(pvalues, pred_n, labels),
        _counts_at(values, ref_n, labels),
        ref.geometry.voxel_volume_mm3,
    )
    dist = client.submit(surface_task, pred, ref, labels, ref.geometry.spacing_zyx, pure=False).result()
    per_label = {k: {"dice": sem["per_class"][k]["dice"], **dist[k], **volumes[k]} for k in labels}
    return {"spacing_zyx": list(ref.geometry.spacing_zyx), "per_label": per_label, "semantic": sem}


def _counts_at(values: np.ndarray, counts: np.ndarray, labels: list[int]) -> np.ndarray:
    lookup = dict(zip(values.tolist(), counts.tolist(), strict=True))
    return np.array([lookup.get(k, 0) for k in labels], dtype=np.int64)


def surface_task(
    pred: ImageSource, ref: ImageSource, labels: list[int], spacing: tuple[float, float, float]
) -> dict[int, dict[str, float]]:
    """Worker task: read both volumes whole and compute surface distances per label."""
    box = Box.from_shape(ref.spatial_shape)
    p, r = pred.read(box)[0], ref.read(box)[0]
    res = surface.label_surface_metrics(p, r, spacing, labels=labels)
    return {k: {n: v for n, v in m.items() if n != "dice"} for k, m in res.items()}


def read_segments(path: str | Path) -> tuple[dict[int, int], tuple[int, ...]]:
    """Segment id -> category, and the thing categories, of a segpipe ``segments.json``."""
    try:
        doc = json.loads(Path(path).read_text())
        cats = {int(s["id"]): int(s["category_id"]) for s in doc["segments"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path}: not a segments table ({e}); expected segpipe's segments.json: "
            '{"segments": [{"id": ..., "category_id": ...}], "categories": [...]}'
        ) from e
    things = tuple(int(c["id"]) for c in doc.get("categories", []) if c.get("isthing"))
    return cats, things


def write_report(metrics: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``metrics.json`` and a per-class (or per-label) CSV table into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json"}
    paths["json"].write_text(json.dumps(_jsonable(metrics), indent=1))
    rows = metrics.get("per_class") or metrics.get("per_label")
    if rows:
        paths["csv"] = out / "per_class.csv"
        frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("class").reset_index()
        frame.to_csv(paths["csv"], index=False)
    return paths


def _jsonable(value: Any) -> Any:
    """NaN/inf become ``None`` and dict keys strings, so the file is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
