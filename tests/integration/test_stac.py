"""STAC: a run writes one Item per output raster (projection and file extensions, links to the
summary and the metrics), read back and validated with pystac offline and checked against the
COG with rasterio and hashlib; a scheduled run writes a Collection linking every scene's Items."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pystac
import pytest
import rasterio
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.validation import RegisteredValidator
from rasterio.warp import transform_bounds

from pipeline.data.geometry import GeoRef
from pipeline.io.geo import write_cog
from pipeline.runner.api import run_scheduled_job
from pipeline.runner.catalog import write_items
from pipeline.runner.spec import parse_job, resolve_paths
from pipeline.tiling import Box
from tests.helpers import run

PROJ = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
FILE = "https://stac-extensions.github.io/file/v2.1.0/schema.json"


def validate_offline(path: Path) -> dict:
    """Core STAC validation with the schemas pystac ships (the extension schemas need a network)."""
    doc = json.loads(path.read_text())
    kind = pystac.STACObjectType.ITEM if doc["type"] == "Feature" else pystac.STACObjectType.COLLECTION
    RegisteredValidator.get_validator().validate_core(doc, kind, doc["stac_version"], str(path))
    return doc


@pytest.fixture(scope="module")
def rgb(client, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stac") / "out"
    return run(
        client,
        data / "geo" / "RGB.byte.tif",
        out,
        "multi_otsu",
        {"band": 1, "classes": 3},
        chunk=[256, 300],
        formats=["zarr", "cog"],
    )


def check_raster_item(item_path: Path, raster: Path) -> pystac.Item:
    """The Item's projection and file fields against the raster itself."""
    validate_offline(item_path)
    item = pystac.Item.from_file(item_path)
    assert set(item.stac_extensions) == {PROJ, FILE}
    asset = item.assets["data"]
    assert Path(asset.get_absolute_href()).resolve() == raster.resolve()
    assert not Path(asset.href).is_absolute()  # relative: the folder can move or be uploaded
    assert asset.media_type == pystac.MediaType.COG
    size, checksum = FileExtension.ext(asset).size, FileExtension.ext(asset).checksum
    assert size == raster.stat().st_size
    assert checksum == "1220" + hashlib.sha256(raster.read_bytes()).hexdigest()
    proj = ProjectionExtension.ext(item)
    with rasterio.open(raster) as ds:
        assert proj.code == f"EPSG:{ds.crs.to_epsg()}"
        assert rasterio.crs.CRS.from_wkt(proj.wkt2) == ds.crs
        assert proj.shape == [ds.height, ds.width]
        assert proj.transform == pytest.approx(list(ds.transform)[:6], rel=1e-12)
        assert proj.bbox == pytest.approx(list(ds.bounds), rel=1e-12)
        lonlat = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
    assert item.bbox == pytest.approx(list(lonlat), abs=1e-7)
    return item


def test_label_cog_item(rgb) -> None:
    out = rgb.plan.out
    item_path = Path(rgb.outputs["stac_labels"])
    assert item_path == out / "stac" / "item-labels.json"
    item = check_raster_item(item_path, Path(rgb.outputs["cog"]))
    assert item.id == "test-job-labels" and ProjectionExtension.ext(item).code == "EPSG:32618"
    assert "labels" in item.assets["data"].roles
    assert item.properties["segpipe:segmenter"] == "multi_otsu"
    assert item.properties["segpipe:classes"] == {"0": "class_0", "1": "class_1", "2": "class_2"}
    fields = item.assets["data"].extra_fields
    assert (fields["data_type"], fields["nodata"]) == ("uint8", 255)  # STAC 1.1 data values
    summary = json.loads((out / "summary.json").read_text())
    assert item.properties["segpipe:fingerprint"] == summary["fingerprint"]
    assert summary["outputs"]["stac_labels"] == str(item_path)  # the summary, written last, lists it
    links = {link.rel: Path(link.get_absolute_href()) for link in item.links}
    assert json.loads(links["describedby"].read_text())["status"] == "complete"
    assert len(pd.read_parquet(links["related"])) == len(rgb.plan.grid)
    assert not [p for p in (out / "stac").iterdir() if p.name.startswith(".tmp-")]


def test_every_output_raster_gets_an_item(rgb, data, tmp_path) -> None:
    """A float score raster next to the labels (as learned segmenters write) gets its own Item."""
    with rasterio.open(data / "geo" / "RGB.byte.tif") as ds:
        score = ds.read(2).astype(np.float32) / 255
        georef = GeoRef(ds.crs.to_wkt(), tuple(ds.transform)[:6])

    def windows():
        yield Box((0, 0), score.shape), score

    out = rgb.plan.out
    scores = write_cog(
        out / "entropy.tif", georef, score.shape, "float32", windows, nodata=-1.0, resampling="AVERAGE"
    )
    try:
        written = write_items(rgb.plan, rgb.segmenter, {"cog": rgb.outputs["cog"], "entropy": str(scores)})
        assert set(written) == {"stac_labels", "stac_entropy"}
        item = check_raster_item(Path(written["stac_entropy"]), scores)
        assert item.properties["segpipe:kind"] == "scores" and item.assets["data"].roles == ["data"]
        fields = item.assets["data"].extra_fields
        assert (fields["data_type"], fields["nodata"]) == ("float32", -1)
    finally:
        scores.unlink()
        (out / "stac" / "item-entropy.json").unlink(missing_ok=True)


def test_volumes_get_no_item(client, data, tmp_path) -> None:
    result = run(
        client,
        data / "medical" / "brain1_image.nrrd",
        tmp_path / "out",
        "threshold",
        {"value": 300},
        chunk=[16, 64, 64],
        formats=["zarr", "nifti"],
    )
    assert not [k for k in result.outputs if k.startswith("stac")]
    assert not (tmp_path / "out" / "stac").exists()


def test_scheduled_run_writes_a_collection_of_the_scene_items(client, data, tmp_path) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for date in ("leaf-on", "leaf-off"):
        (scenes / f"{date}.tif").symlink_to(
            data / "landcover" / f"chesapeake_m_3907833_nw_17_1_landsat-{date}.tif"
        )
    raw = {
        "name": "weekly",
        "input": {"path": str(scenes / "*.tif")},
        "segmenter": {"name": "index_threshold", "params": {"index": "ndvi", "bands": {"red": 4, "nir": 5}}},
        "tiling": {"chunk": [130, 130]},
        "output": {"dir": str(tmp_path / "out"), "formats": ["zarr", "cog"]},
    }
    spec = resolve_paths(parse_job(raw), base=tmp_path)
    first = run_scheduled_job(spec, client=client)
    second = run_scheduled_job(spec, client=client)  # skips both scenes, still links their Items
    assert (first["processed"], second["skipped"]) == (2, 2)
    root = tmp_path / "out"
    for record in (first, second):
        per_run = root / "stac" / f"collection-{record['run_id']}.json"
        for path in (per_run, Path(record["collection"])):
            doc = validate_offline(path)
            assert doc["type"] == "Collection" and doc["id"] == "weekly"
            assert doc["segpipe:run_id"] == (record["run_id"] if path == per_run else second["run_id"])
            coll = pystac.Collection.from_file(path)
            items = [Path(link.get_absolute_href()) for link in coll.get_links("item")]
            assert sorted(p.parent.parent.name for p in items) == ["leaf-off", "leaf-on"]
            for item_path in items:
                item = check_raster_item(item_path, item_path.parent.parent / "labels.tif")
                assert coll.extent.spatial.bboxes[0][0] <= item.bbox[0]
                assert coll.extent.spatial.bboxes[0][2] >= item.bbox[2]
    assert Path(second["collection"]) == root / "collection.json"


def test_an_invalid_item_is_refused_and_not_written(tmp_path) -> None:
    from datetime import UTC, datetime

    from pipeline.errors import WriteError
    from pipeline.io.stac import write_stac

    item = pystac.Item("bad", None, None, datetime.now(UTC), {})
    item.add_asset("data", pystac.Asset("x.tif", extra_fields={"data_type": "uint7"}))
    with pytest.raises(WriteError, match=r"i\.json: the STAC Feature is not valid STAC .*uint7"):
        write_stac(item, tmp_path / "i.json")
    assert not list(tmp_path.iterdir())
