"""Acceptance (instances 4): panoptic output: every pixel in one segment, one category per id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from scipy import ndimage

from tests.helpers import labels_of, run

CLASSES = {
    "water": [1, 2],
    "tree": [2, 3],
    "low_vegetation": [3, 4],
    "barren": [4, 5],
    "impervious": [5, 6],
    "road": [6, 7],
}


@pytest.mark.parametrize("chunk", [[100, 90], [64, 200]], ids=["100x90", "64x200"])
def test_chesapeake_panoptic(client, data, tmp_path, chunk) -> None:
    path = data / "landcover" / "chesapeake_m_3907833_nw_17_1_lc.tif"
    params = {
        "semantic": {"name": "threshold", "params": {"windows": CLASSES}},
        "things": [5],
        "connectivity": 2,
    }
    result = run(
        client, path, tmp_path / "out", "panoptic", params, chunk=chunk, formats=["zarr", "cog", "png"]
    )
    ids = labels_of(result)
    with rasterio.open(path) as ds:
        lc = ds.read(1)
    assert (ids > 0).all()  # every pixel belongs to a segment (no void: all pixels are valid)
    pairs = np.unique(np.stack([ids.ravel(), lc.ravel()], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs)  # one category per id
    segments = json.loads(Path(result.outputs["segments"]).read_text())
    cats = {c["id"]: c for c in segments["categories"]}
    assert cats[5]["isthing"] == 1 and cats[2]["isthing"] == 0
    by_id = {s["id"]: s for s in segments["segments"]}
    assert set(by_id) == set(np.unique(ids).tolist())
    counts = np.bincount(ids.ravel())
    for sid, seg in by_id.items():
        assert seg["area"] == counts[sid]
        assert lc[ids == sid][0] == seg["category_id"]  # window i+1 holds lc value i+1
    # stuff: exactly one segment per stuff class present; things: the connected components
    stuff_ids = [s for s in by_id.values() if not cats[s["category_id"]]["isthing"]]
    assert len(stuff_ids) == len({s["category_id"] for s in stuff_ids}) == 5
    things = np.where(lc == 5, ids, 0)
    reference, n = ndimage.label(lc == 5, structure=np.ones((3, 3)))
    assert len(np.unique(things[things > 0])) == n

    pairs = np.unique(np.stack([things[lc == 5], reference[lc == 5]], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1])) == n
