"""Acceptance (operations 4): a scheduled multi-scene job (a glob or a local STAC file) processes
nothing new the second time, the ledger shows both runs, and a change report compares two dates of
one area."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml

from pipeline.errors import ConfigError
from pipeline.runner.api import run_scheduled_job
from pipeline.runner.schedule import history, is_multi_scene, scene_specs
from pipeline.runner.spec import JobSpec, parse_job, resolve_paths

BIN = Path(sys.executable).parent
DATES = {
    "leaf-on": "chesapeake_m_3907833_nw_17_1_landsat-leaf-on.tif",
    "leaf-off": "chesapeake_m_3907833_nw_17_1_landsat-leaf-off.tif",
}


def _segpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "segpipe"), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_scheduled_runs_skip_done_scenes_and_report_change(data, tmp_path) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for date, name in DATES.items():  # two dates of one area, as a folder of scenes
        (scenes / f"{date}.tif").symlink_to(data / "landcover" / name)
    out = tmp_path / "out"
    job = tmp_path / "weekly.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "weekly-vegetation",
                "input": {"path": "scenes/*.tif"},
                "segmenter": {
                    "name": "index_threshold",
                    "params": {"index": "ndvi", "bands": {"red": 4, "nir": 5}, "class_name": "vegetation"},
                },
                "tiling": {"chunk": [128, 100]},
                "output": {"dir": str(out), "formats": ["zarr", "cog"]},
            }
        )
    )
    first = _segpipe("run", str(job))
    assert first.returncode == 0, first.stderr
    assert "2 processed, 0 skipped, 0 failed" in first.stdout
    second = _segpipe("run", str(job))
    assert second.returncode == 0, second.stderr
    assert "0 processed, 2 skipped, 0 failed" in second.stdout
    runs = json.loads(_segpipe("runs", str(out), "--json").stdout)
    assert [r["processed"] for r in runs] == [2, 0] and [r["skipped"] for r in runs] == [0, 2]
    assert {i["item"] for i in runs[0]["items"]} == {"leaf-on", "leaf-off"}

    change = _segpipe(
        "change",
        str(out / "leaf-off" / "labels.tif"),
        str(out / "leaf-on" / "labels.tif"),
        "--out",
        str(tmp_path / "change"),
    )
    assert change.returncode == 0, change.stderr
    report = json.loads((tmp_path / "change" / "change.json").read_text())
    transitions = pd.read_parquet(report["transitions"])
    assert transitions["pixels"].sum() == report["pixels"] == 260 * 260
    with (
        rasterio.open(out / "leaf-off" / "labels.tif") as a,
        rasterio.open(out / "leaf-on" / "labels.tif") as b,
        rasterio.open(report["change_cog"]) as c,
    ):
        before, after, code = a.read(1).astype(int), b.read(1).astype(int), c.read(1)
        assert c.crs == a.crs and c.transform == a.transform
    assert np.array_equal(code, before * 256 + after)
    assert report["changed_pixels"] == int((before != after).sum()) > 0
    pixel_km2 = abs(a.transform.a * a.transform.e) / 1e6
    assert transitions["area_km2"].sum() == pytest.approx(260 * 260 * pixel_km2)


def _stac_job(collection: Path, out: Path, **input_keys: str) -> JobSpec:
    raw = {
        "name": "stac-vegetation",
        "input": {"path": str(collection), **input_keys},
        "segmenter": {
            "name": "index_threshold",
            "params": {"index": "ndvi", "bands": {"red": 4, "nir": 5}, "threshold": 0.5},
        },
        "tiling": {"chunk": [128, 100]},
        "output": {"dir": str(out), "formats": ["zarr", "cog"]},
    }
    return resolve_paths(parse_job(raw), base=collection.parent)


def _item(item_id: str, assets: dict[str, str]) -> dict[str, object]:
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "geometry": None,
        "properties": {"datetime": None},
        "links": [],
        "assets": {key: {"href": href, "type": "image/tiff"} for key, href in assets.items()},
    }


def _write(path: Path, doc: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _collection(tmp_path: Path, data: Path, key: str = "landsat") -> Path:
    """Leaf-on by a relative href (a symlink beside the JSON), leaf-off by an absolute one."""
    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenes" / "leaf-on.tif").symlink_to(data / "landcover" / DATES["leaf-on"])
    items = [
        _item("2019-07-leaf-on", {key: "./scenes/leaf-on.tif", "thumbnail": "missing.png"}),
        _item("2019-01-leaf-off", {key: str(data / "landcover" / DATES["leaf-off"])}),
    ]
    return _write(tmp_path / "landsat.json", {"type": "FeatureCollection", "features": items})


def test_stac_item_collection_runs_each_item_once_then_skips(client, data, tmp_path) -> None:
    out = tmp_path / "out"
    spec = _stac_job(_collection(tmp_path, data), out, asset="landsat")
    assert is_multi_scene(spec)
    first = run_scheduled_job(spec, client=client)
    assert (first["status"], first["processed"], first["skipped"], first["failed"]) == ("complete", 2, 0, 0)
    second = run_scheduled_job(spec, client=client)
    assert (second["processed"], second["skipped"], second["failed"]) == (0, 2, 0)
    runs = history(out / "ledger.sqlite")
    assert [r["processed"] for r in runs] == [2, 0] and [r["skipped"] for r in runs] == [0, 2]
    assert [i["item"] for i in runs[1]["items"]] == ["2019-01-leaf-off", "2019-07-leaf-on"]
    for item, date in (("2019-07-leaf-on", "leaf-on"), ("2019-01-leaf-off", "leaf-off")):
        with (
            rasterio.open(data / "landcover" / DATES[date]) as src,
            rasterio.open(out / item / "labels.tif") as lab,
        ):
            assert lab.crs == src.crs and lab.transform == src.transform
            red, nir = src.read(4).astype(np.float64), src.read(5).astype(np.float64)
            ndvi = (nir - red) / (nir + red)
            assert np.array_equal(lab.read(1) == 1, ndvi > 0.5)  # the item's own raster was segmented


def test_stac_catalog_links_are_followed(data, tmp_path) -> None:
    leaf_off = str(data / "landcover" / DATES["leaf-off"])
    _write(tmp_path / "items" / "a" / "a.json", _item("a", {"image": leaf_off}))
    _write(
        tmp_path / "sub" / "collection.json",
        {"type": "Collection", "id": "sub", "links": [{"rel": "item", "href": "../items/a/a.json"}]},
    )
    catalog = _write(
        tmp_path / "catalog.json",
        {
            "type": "Catalog",
            "id": "root",
            "links": [
                {"rel": "self", "href": "./catalog.json"},
                {"rel": "child", "href": "./sub/collection.json"},
                {"rel": "child", "href": "./catalog.json"},  # a cycle is not followed twice
            ],
        },
    )
    items = scene_specs(_stac_job(catalog, tmp_path / "out"))
    assert [(item, s.input.path) for item, s in items] == [("a", leaf_off)]
    assert items[0][1].output.dir == str(tmp_path / "out" / "a")


@pytest.mark.parametrize(
    ("doc", "asset", "message"),
    [
        (
            {"type": "FeatureCollection", "features": [_item("scene-1", {"visual": "x.tif", "B4": "y.tif"})]},
            "image",
            "STAC item 'scene-1' has no asset 'image'; its assets are ['B4', 'visual']",
        ),
        (
            {"type": "FeatureCollection", "features": [_item("scene-1", {"image": "nowhere/x.tif"})]},
            "image",
            "href 'nowhere/x.tif': file",
        ),
        (
            {"type": "FeatureCollection", "features": [_item("s", {"image": "https://example.com/s.tif"})]},
            "image",
            "is a https:// URL; only local files are read",
        ),
        ({"type": "FeatureCollection", "features": []}, "image", "holds no items"),
        ({"type": "Topology"}, "image", "STAC type 'Topology' is not one of"),
        (
            {"type": "Catalog", "links": [{"rel": "item", "href": "gone.json"}]},
            "image",
            "item link 'gone.json': file",
        ),
    ],
)
def test_stac_input_errors_name_the_item_asset_or_href(tmp_path, doc, asset, message) -> None:
    spec = _stac_job(_write(tmp_path / "scenes.json", doc), tmp_path / "out", asset=asset)
    with pytest.raises(ConfigError, match=re.escape(message)):
        scene_specs(spec)


def test_stac_file_missing_or_not_json(tmp_path) -> None:
    with pytest.raises(ConfigError, match="STAC file not found"):
        scene_specs(_stac_job(tmp_path / "absent.json", tmp_path / "out"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable STAC JSON file"):
        scene_specs(_stac_job(tmp_path / "bad.json", tmp_path / "out"))


def test_two_items_with_one_id_are_refused(data, tmp_path) -> None:
    href = str(data / "landcover" / DATES["leaf-on"])
    doc = {
        "type": "FeatureCollection",
        "features": [_item("a/b", {"image": href}), _item("a:b", {"image": href})],
    }
    with pytest.raises(ConfigError, match="both become item 'a_b'"):
        scene_specs(_stac_job(_write(tmp_path / "s.json", doc), tmp_path / "out"))


def test_overlapping_run_is_refused_while_one_holds_the_lock(client, data, tmp_path) -> None:
    """Cron may start a job while yesterday's run still works: the second start does nothing."""
    import fcntl

    from pipeline.errors import RunInProgressError
    from pipeline.runner.api import run_scheduled_job
    from pipeline.runner.spec import parse_job, resolve_paths

    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenes" / "a.tif").symlink_to(data / "landcover" / DATES["leaf-on"])
    out = tmp_path / "out"
    spec = resolve_paths(
        parse_job(
            {
                "name": "cron",
                "input": {"path": str(tmp_path / "scenes" / "*.tif")},
                "segmenter": {"name": "threshold", "params": {"band": 5, "value": 2000}},
                "output": {"dir": str(out), "formats": ["zarr"]},
            }
        ),
        base=tmp_path,
    )
    out.mkdir()
    with open(out / ".segpipe-run.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunInProgressError, match="another run of this job is in progress"):
            run_scheduled_job(spec, client=client)
    assert not (out / "a").exists()
    assert run_scheduled_job(spec, client=client)["processed"] == 1
