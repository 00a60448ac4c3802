"""Finalize a run: outputs from the staging store, metrics table, summary, resolved job.

Every file is written under a hidden temporary name, checked, then renamed; the summary
(status ``complete``) is written last, so a folder without it never looks finished.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, cast

import pandas as pd

from pipeline.data.geometry import GeoRef, VolumeRef
from pipeline.io import cog_tiles, geo, medical, tables, vector, zarr_store
from pipeline.io.ome_zarr import write_ome_zarr
from pipeline.io.overviews import Resampling
from pipeline.io.quicklook import write_quicklook
from pipeline.metrics import write_tile_table
from pipeline.metrics.tiles import seam_scores
from pipeline.models import Segmenter
from pipeline.runner import catalog, publish
from pipeline.runner.plan import Plan
from pipeline.runner.process import extras_path
from pipeline.runner.spec import dump_job
from pipeline.stitching.pyramid import downsample_mean, downsample_mode
from pipeline.tiling import Box

LIBRARIES = (
    "segpipe",
    "dask",
    "distributed",
    "zarr",
    "xarray",
    "rioxarray",
    "rasterio",
    "SimpleITK",
    "scikit-image",
    "numpy",
    "scipy",
    "torch",
)

#: Overviews of label maps: MODE, the most frequent valid label of each 2x2 block (ties to the
#: smallest). A zoomed-out view then shows the class covering most of each block, class areas
#: stay close to the full-resolution ones, and a block is nodata only when all of it is. NEAREST
#: keeps one pixel in four: thin classes (rivers, roads) alias and flicker between levels.
#: Float score rasters (probabilities, uncertainty) take AVERAGE.
LABEL_OVERVIEWS: Resampling = "MODE"


def finalize(plan: Plan, segmenter: Segmenter, run: cog_tiles.Mapper = cog_tiles.local_map) -> dict[str, str]:
    """Write the requested outputs and the metrics table; return ``{name: path}``.

    ``run`` maps the COG tile-encoding tasks (:mod:`pipeline.io.cog_tiles`): onto the job's
    Dask workers when the engine calls this, in this process otherwise."""
    outputs = {"zarr": str(plan.staging / "labels")}
    labels = plan.staging / "labels"
    formats = plan.spec.output.formats
    if "cog" in formats and isinstance(plan.source.geometry, GeoRef):
        outputs["cog"] = str(_write_cog(plan, labels, segmenter, run))
    for fmt, suffix in (("nifti", ".nii.gz"), ("mha", ".mha")):
        if fmt in formats and isinstance(plan.source.geometry, VolumeRef):
            data = zarr_store.read_box(labels, Box.from_shape(plan.source.spatial_shape))
            outputs[fmt] = str(medical.write_volume(plan.out / f"labels{suffix}", data, plan.source.geometry))
    if "ome-zarr" in formats and isinstance(plan.source.geometry, VolumeRef):
        outputs["ome-zarr"] = str(
            write_ome_zarr(
                plan.out / "labels.ome.zarr",
                plan.staging / "input",
                labels,
                plan.source.geometry,
                chunk=plan.grid.chunk,
                reduce_image=downsample_mean,
                reduce_labels=downsample_mode,
            )
        )
    if "png" in formats:
        outputs["png"] = str(
            write_quicklook(
                plan.out / "quicklook.png",
                plan.staging / "input",
                labels,
                segmenter.classes,
                title=f"{plan.spec.name}: {segmenter.name} on {plan.source.path.name}",
                nodata_label=segmenter.nodata_label,
                band=int(getattr(segmenter, "band_index", 0)),  # the band the segmenter looks at
            )
        )
    outputs.update(_extra_outputs(plan, labels, segmenter, run))
    if segmenter.kind != "semantic":
        outputs.update(_instance_outputs(plan, labels))
    if segmenter.kind == "panoptic":
        outputs["segments"] = str(_panoptic_segments(plan, segmenter))
    stage = "segment" if segmenter.kind == "semantic" else "label"
    rows = zarr_store.CompletionLog(plan.records, stage).rows()
    outputs["tiles"] = str(write_tile_table(plan.out / "tiles.parquet", rows))
    outputs["job"] = str(_atomic_text(plan.out / "job.resolved.yaml", dump_job(plan.spec)))
    outputs.update(catalog.write_items(plan, segmenter, outputs))  # last: every raster is complete
    return outputs


def _panoptic_segments(plan: Plan, segmenter: Segmenter) -> Path:
    """COCO-panoptic-style segments: id, category, area (pixels), bbox [x, y, w, h] in pixels."""
    table = pd.read_parquet(plan.out / "objects.parquet")
    things = set(segmenter.instance_classes)
    ndim = len(plan.source.spatial_shape)
    segments = []
    for row in table.itertuples(index=False):
        lo = [int(getattr(row, f"min{k}")) for k in range(ndim)][::-1]
        hi = [int(getattr(row, f"max{k}")) for k in range(ndim)][::-1]
        segments.append(
            {
                "id": int(row.id),
                "category_id": int(row[table.columns.get_loc("class")]),
                "area": int(row.count),
                "bbox": lo + [h - a + 1 for a, h in zip(lo, hi, strict=True)],
                "iscrowd": 0,
            }
        )
    categories = [
        {"id": c, "name": n, "isthing": int(c in things)}
        for c, n in segmenter.classes.items()
        if c != segmenter.nodata_label
    ]
    text = json.dumps({"categories": categories, "segments": segments}, indent=1)
    return _atomic_text(plan.out / "segments.json", text)


def _instance_outputs(plan: Plan, labels: Path) -> dict[str, str]:

    pixel_table = pd.read_parquet(plan.records / "objects.parquet")
    table = tables.world_objects(pixel_table, plan.source.geometry, plan.source.spatial_shape)
    out = {"objects": str(tables.write_parquet(plan.out / "objects.parquet", table))}
    seams = pd.read_parquet(plan.records / "seams.parquet")
    out["seams"] = str(tables.write_parquet(plan.out / "seams.parquet", seams))
    formats = plan.spec.output.formats
    if isinstance(plan.source.geometry, GeoRef) and ({"gpkg", "geoparquet"} & set(formats)):
        polys = vector.polygons_from_chunks(
            labels,
            list(plan.grid),
            plan.source.geometry,
            table[["id", "class"]],
            simplify=plan.spec.output.simplify,
        )
        for fmt, name in (("gpkg", "objects.gpkg"), ("geoparquet", "objects_polygons.parquet")):
            if fmt in formats:
                out[fmt] = str(vector.write_polygons(plan.out / name, polys, fmt))
    return out


def _extra_outputs(plan: Plan, labels: Path, segmenter: Segmenter, run: cog_tiles.Mapper) -> dict[str, str]:
    """A segmenter's extra float outputs: the zarr arrays; one-band ones also as COG or NIfTI/MHA."""
    out: dict[str, str] = {}
    formats = plan.spec.output.formats
    shape = plan.source.spatial_shape
    for name, bands in segmenter.extra_outputs.items():
        path = extras_path(labels, name)
        out[f"{name}_zarr"] = str(path)
        if bands:
            continue
        if "cog" in formats and isinstance(plan.source.geometry, GeoRef):
            out[name] = str(
                geo.write_cog_from_zarr(
                    plan.out / f"{name}.tif",
                    plan.source.geometry,
                    path,
                    nodata=-1.0,
                    resampling="AVERAGE",
                    run=run,
                )
            )
        for fmt, suffix in (("nifti", ".nii.gz"), ("mha", ".mha")):
            if fmt in formats and isinstance(plan.source.geometry, VolumeRef):
                data = zarr_store.read_box(path, Box.from_shape(shape))
                out[f"{name}_{fmt}"] = str(
                    medical.write_volume(plan.out / f"{name}{suffix}", data, plan.source.geometry)
                )
    return out


def _write_cog(plan: Plan, labels: Path, segmenter: Segmenter, run: cog_tiles.Mapper) -> Path:
    georef = cast(GeoRef, plan.source.geometry)
    has_nodata = georef.nodata is not None or plan.source.dtype.lstrip("<>=|")[0] == "f"
    nodata = segmenter.nodata_label if has_nodata and segmenter.kind == "semantic" else None
    return geo.write_cog_from_zarr(
        plan.out / "labels.tif",
        georef,
        labels,
        nodata=nodata,
        resampling=LABEL_OVERVIEWS,
        run=run,
    )


def write_summary(
    plan: Plan,
    segmenter: Segmenter,
    outputs: dict[str, str],
    timings: dict[str, float],
    chunks: dict[str, int],
    instances: dict[str, Any] | None = None,
    diagnostics: dict[str, Any] | None = None,
) -> Path:
    """The job summary JSON, written last: its ``status: complete`` marks a finished run."""
    summary = {
        "status": "complete",
        "job": plan.spec.name,
        "fingerprint": plan.fingerprint,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": {
            "path": str(plan.source.path),
            "format": plan.source.format,
            "shape": list(plan.source.shape),
            "dtype": plan.source.dtype,
            "geometry": plan.source.geometry.to_json(),
        },
        "segmenter": {
            "name": segmenter.name,
            "kind": segmenter.kind,
            "params": plan.spec.segmenter.params,
            "halo": segmenter.halo,
            "classes": {str(k): v for k, v in segmenter.classes.items()},
            "fitted": segmenter.fitted_values(),
        },
        "tiling": {
            "chunk": list(plan.grid.chunk),
            "halo": list(plan.grid.halo),
            "edge_mode": plan.grid.edge_mode,
            "n_chunks": len(plan.grid),
            **chunks,
        },
        "instances": instances or None,
        **(diagnostics or {}),
        **_reference_summary(plan, segmenter),
        "timings_s": timings,
        **({"work_dir": str(plan.out)} if plan.publish else {}),
        "outputs": outputs,
        "versions": _versions(),
    }
    text = json.dumps(summary, indent=2, default=str)
    publish.put_summary(plan, text)  # s3:// output: after every other output was uploaded
    return _atomic_text(plan.out / "summary.json", text)


def _reference_summary(plan: Plan, segmenter: Segmenter) -> dict[str, Any]:
    """Scores against the job's reference: overall, in the band around seams, inside tiles."""
    if plan.spec.reference is None:
        return {}
    rows = zarr_store.CompletionLog(plan.records, "segment").rows()
    scores = seam_scores(rows, segmenter.classes, segmenter.nodata_label)
    return {
        "reference": {
            "path": plan.spec.reference.path,
            "ignore": plan.spec.reference.ignore,
            "seam_band_px": plan.spec.reference.seam_band,
            **scores,
        }
    }


def write_failure(plan: Plan, failures: dict[str, dict[str, str]]) -> Path:
    """Record quarantined chunks (the run is not complete; no summary is written)."""
    record = {"status": "failed", "failed_chunks": failures}
    return _atomic_text(plan.out / "failed.json", json.dumps(record, indent=2))


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
