"""Acceptance (operations 4): a scheduled multi-scene job processes nothing new the second time,
the ledger shows both runs, and a change report compares two dates of one area."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml

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
