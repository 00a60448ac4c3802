"""Per-tile reference scores, seam-band diagnostics and the tiled-vs-own-window seam check."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import rasterio
import zarr
from distributed import Client

from pipeline.runner import process
from tests.helpers import labels_of, run


def test_reference_scores_per_tile_and_around_seams(client, data, tmp_path) -> None:
    image = data / "geo" / "Spain_7370579_S2Hand.tif"
    label = data / "geo" / "Spain_7370579_LabelHand.tif"
    reference = {"path": str(label), "ignore": -1, "seam_band": 8}
    result = run(
        client,
        image,
        tmp_path / "out",
        "otsu",
        {"band": "B8", "foreground": "below", "class_name": "water"},
        chunk=[128, 128],
        reference=reference,
    )
    pred = labels_of(result)
    with rasterio.open(label) as ds:
        ref = ds.read(1)
    scored = ref != -1
    inter = ((pred == 1) & (ref == 1) & scored).sum()
    union = (((pred == 1) | (ref == 1)) & scored).sum()
    summary = json.loads((result.plan.out / "summary.json").read_text())
    assert summary["reference"]["overall"]["iou"]["water"] == pytest.approx(inter / union)
    assert summary["reference"]["overall"]["pixels"] == scored.sum()
    # the band around seams (8 px each side of every seam) and the interiors partition the pixels
    band, interior = summary["reference"]["seam_band"], summary["reference"]["interior"]
    seam_rows = (np.arange(512) % 128 < 8) | (np.arange(512) % 128 >= 120)
    seam_rows[:8] = seam_rows[-8:] = False
    in_band = seam_rows[:, None] | seam_rows[None, :]
    assert band["pixels"] == (scored & in_band).sum() and interior["pixels"] == (scored & ~in_band).sum()
    tiles = pd.read_parquet(result.outputs["tiles"])
    assert {"iou_water", "dice_water", "ref_pixels"} <= set(tiles.columns)
    first = tiles.set_index("chunk_id").loc["0_0"]
    p, r, s = pred[:128, :128] == 1, ref[:128, :128] == 1, ref[:128, :128] != -1
    assert first["iou_water"] == pytest.approx((p & r & s).sum() / ((p | r) & s).sum())
    assert summary["seam_check"]["windows"] == 4 and summary["seam_check"]["differing"] == 0


def test_seam_check_detects_a_seam(client: Client, data, tmp_path) -> None:
    """Damage the stitched map at a chunk corner: the windows re-segmented on their own disagree."""
    image = data / "geo" / "Spain_7370579_S2Hand.tif"
    result = run(client, image, tmp_path / "out", "otsu", {"band": "B8"}, chunk=[128, 128])
    labels = zarr.open_array(store=str(result.plan.staging / "labels"), mode="r+")
    labels[120:136, 120:136] = 1 - np.asarray(labels[120:136, 120:136])
    window = result.plan.grid.window(result.plan.grid.seam_windows()[0])
    check = client.submit(
        process.window_check,
        result.plan.staging / "input",
        result.plan.staging / "labels",
        window,
        "clip",
        0.0,
        result.segmenter,
    ).result()
    assert check["differing"] == 16 * 16
