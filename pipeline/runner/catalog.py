"""STAC metadata of runs: one Item per output raster, one Collection per scheduled run.

Items are written by :func:`write_items` at the end of finalize, once every output file is
complete (the hrefs point at finished files, the checksums are theirs) and before
``summary.json``, which stays the last file of a run. Volumes (NIfTI, MHA, OME-Zarr) get no
Item: STAC describes data located on the Earth, and a patient's millimetre frame has no CRS.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.data.geometry import GeoRef
from pipeline.io import stac
from pipeline.models import Segmenter
from pipeline.runner.plan import Plan

#: Output keys whose raster is the label map; other ``*.tif`` outputs are scores.
LABEL_OUTPUTS = ("cog",)
PARQUET = "application/vnd.apache.parquet"


def stac_dir(out: Path) -> Path:
    """Where a run's Items go."""
    return out / "stac"


def write_items(plan: Plan, segmenter: Segmenter, outputs: dict[str, str]) -> dict[str, str]:
    """One STAC Item per raster among ``outputs`` (``stac_<name>``: its path); none for volumes."""
    if not isinstance(plan.source.geometry, GeoRef):
        return {}
    when = datetime.now(UTC)
    written = {}
    for key, value in outputs.items():
        raster = Path(value)
        if raster.suffix != ".tif" or not raster.is_file():
            continue
        dest = stac_dir(plan.out) / f"item-{raster.stem}.json"
        item = stac.raster_item(raster, dest, _spec(plan, segmenter, key, raster, when))
        written[f"stac_{raster.stem}"] = str(stac.write_stac(item, dest))
    return written


def _spec(plan: Plan, segmenter: Segmenter, key: str, raster: Path, when: datetime) -> stac.ItemSpec:
    labels = key in LABEL_OUTPUTS
    properties: dict[str, Any] = {
        "segpipe:job": plan.spec.name,
        "segpipe:fingerprint": plan.fingerprint,
        "segpipe:segmenter": segmenter.name,
        "segpipe:kind": segmenter.kind if labels else "scores",
        "segpipe:version": __version__,
        "segpipe:input": str(plan.source.path),
    }
    if labels:
        properties["segpipe:classes"] = {str(k): v for k, v in segmenter.classes.items()}
    links = (
        ("describedby", plan.out / "summary.json", "application/json", "segpipe job summary"),
        ("related", plan.out / "tiles.parquet", PARQUET, "per-tile metrics"),
    )
    what = "label map" if labels else raster.stem
    return stac.ItemSpec(
        item_id=f"{plan.spec.name}-{raster.stem}",
        when=when,
        title=f"{plan.spec.name}: {what} ({segmenter.name} on {plan.source.path.name})",
        roles=("data", "labels") if labels else ("data",),
        properties=properties,
        links=links,
    )


def write_run_collection(root: Path, job: str, run_id: str, item_files: Sequence[Path]) -> dict[str, str]:
    """The Collection of one scheduled run, linking the Items of every scene complete after it.

    Written twice: ``ROOT/stac/collection-<run id>.json`` (that run's, kept) and
    ``ROOT/collection.json`` (the latest run's: a stable entry point).
    """
    written = {}
    for dest in (stac_dir(root) / f"collection-{run_id}.json", root / "collection.json"):
        coll = stac.collection(
            job,
            f"segpipe scheduled job {job!r}: the output rasters of every scene complete after run {run_id}",
            item_files,
            dest,
            properties={"segpipe:run_id": run_id, "segpipe:version": __version__},
        )
        written[dest.name] = str(stac.write_stac(coll, dest))
    return written
