"""Post-processing chains are exact when tiled: otsu -> opening -> closing -> remove_small -> fill_holes."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from skimage import filters, morphology

from tests.helpers import labels_of, run

STEPS = [
    {"op": "opening", "radius": 2},
    {"op": "closing", "radius": 1},
    {"op": "remove_small", "max_size": 60},
    {"op": "fill_holes", "max_size": 40},
]


def reference(values: np.ndarray, valid: np.ndarray, *, below: bool) -> np.ndarray:
    t = filters.threshold_otsu(values[valid])
    mask = (values <= t) if below else (values > t)
    mask &= valid
    mask = morphology.opening(mask, morphology.disk(2))
    mask = morphology.closing(mask, morphology.disk(1))
    mask = morphology.remove_small_objects(mask, max_size=60)
    mask = morphology.remove_small_holes(mask, max_size=40)
    out = mask.astype(np.uint8)
    out[~valid] = 255
    return out


@pytest.mark.parametrize("chunk", [[128, 128], [110, 177], [333, 250]], ids=lambda c: "x".join(map(str, c)))
def test_water_mask_cleanup_tiled_equals_whole(client, data, tmp_path, chunk) -> None:
    path = data / "geo" / "Spain_7370579_S2Hand.tif"
    params = {"first": {"name": "otsu", "params": {"band": "B8", "foreground": "below"}}, "steps": STEPS}
    result = run(client, path, tmp_path / "out", "pipeline", params, chunk=chunk)
    assert result.plan.grid.halo == (4 + 2 + 60 + 40,) * 2
    with rasterio.open(path) as ds:
        values, valid = ds.read(8), ds.dataset_mask() > 0
    expected = reference(values, valid, below=True)
    raw = (values <= filters.threshold_otsu(values[valid])) & valid
    assert np.count_nonzero(expected[valid] != raw[valid]) > 100  # the steps really change the mask
    assert np.count_nonzero(labels_of(result) != expected) == 0


@pytest.mark.parametrize("chunk", [[30, 60, 61], [30, 52, 70]], ids=lambda c: "x".join(map(str, c)))
def test_3d_opening_and_size_filters_tiled_equals_whole(client, data, tmp_path, chunk) -> None:
    import SimpleITK as sitk

    path = data / "medical" / "totalseg_example_ct_sm.nii.gz"
    steps = [
        {"op": "opening", "radius": 1},
        {"op": "remove_small", "max_size": 30, "max_extent": 30},
        {"op": "fill_holes", "max_size": 20},
    ]
    params = {"first": {"name": "threshold", "params": {"value": 300}}, "steps": steps}
    result = run(client, path, tmp_path / "out", "pipeline", params, chunk=chunk)
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    mask = morphology.opening(volume > 300, morphology.ball(1))
    mask = morphology.remove_small_objects(mask, max_size=30)
    mask = morphology.remove_small_holes(mask, max_size=20)
    assert np.count_nonzero(labels_of(result) != mask.astype(np.uint8)) == 0
