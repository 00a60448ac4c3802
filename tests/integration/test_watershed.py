"""Acceptance (classical 3, 4; instances 2): Otsu + watershed on coins and BBBC039, tiled vs whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image as PILImage
from scipy import ndimage
from skimage import filters, morphology, segmentation
from skimage.feature import peak_local_max

from pipeline.metrics.instances import match_instances
from tests.helpers import labels_of, run

BBBC = [
    "IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E847D9B42CB",
    "IXMtest_G13_s9_w19606195E-12B4-46FF-9B83-1F7FE11B3AFB",
]


def as_geotiff(array: np.ndarray, path: Path) -> Path:
    """Write a plain image as a single-band GeoTIFF without CRS (the job allows it)."""
    with rasterio.open(
        path, "w", driver="GTiff", height=array.shape[0], width=array.shape[1], count=1, dtype=array.dtype
    ) as dst:
        dst.write(array, 1)
    return path


def coins_params(background_radius: int = 30) -> dict:
    otsu = {"name": "otsu", "params": {"background_radius": background_radius}}
    mask = {
        "name": "pipeline",
        "params": {
            "first": otsu,
            "steps": [
                {"op": "fill_holes", "max_size": 400, "max_extent": 40},
                {"op": "remove_small", "max_size": 100, "max_extent": 20},
            ],
        },
    }
    return {"mask": mask, "min_distance": 20, "max_object_size": 70}


def _job(client, src: Path, out: Path, params: dict, chunk: list[int]):
    return run(
        client,
        src,
        out,
        "watershed",
        params,
        chunk=chunk,
        input={"path": str(src), "allow_missing_crs": True},
    )


@pytest.fixture(scope="module")
def coins(data, tmp_path_factory) -> tuple[np.ndarray, Path]:
    image = np.asarray(PILImage.open(data / "images" / "coins.png"))
    return image, as_geotiff(image, tmp_path_factory.mktemp("coins") / "coins.tif")


@pytest.fixture(scope="module")
def coins_whole(client, coins, tmp_path_factory) -> np.ndarray:
    """The untiled engine result (one chunk holding the whole image)."""
    image, src = coins
    return labels_of(
        _job(client, src, tmp_path_factory.mktemp("cw") / "w", coins_params(), list(image.shape))
    )


def test_single_chunk_engine_equals_skimage_by_hand(coins, coins_whole) -> None:
    image, _ = coins
    whole = coins_whole
    top = morphology.white_tophat(image.astype(np.float64), footprint=morphology.disk(30))
    mask = top > filters.threshold_otsu(top)
    mask = morphology.remove_small_holes(mask, max_size=400)
    mask = morphology.remove_small_objects(mask, max_size=100)
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=20, labels=ndimage.label(mask)[0], exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    reference = segmentation.watershed(-distance, markers, mask=mask)
    assert match_instances(whole, reference, 0.5).f1 == 1.0
    assert np.array_equal(whole > 0, reference > 0)


@pytest.mark.parametrize("chunk", [[190, 192], [300, 190]], ids=lambda c: "x".join(map(str, c)))
def test_coins_tiled_gives_24_and_matches_whole(client, coins, coins_whole, tmp_path, chunk) -> None:
    _, src = coins
    whole = coins_whole
    result = _job(client, src, tmp_path / "t", coins_params(), chunk)

    tiled = labels_of(result)
    assert len(result.plan.grid) >= 4
    assert result.instances["objects"] == 24 == tiled.max() == whole.max()
    assert result.instances["merged_ids"] > 0  # coins cut by the grid were joined back
    assert match_instances(tiled, whole, 0.5).f1 >= 0.99


@pytest.mark.parametrize("field", BBBC)
def test_bbbc039_nuclei_f1_tiled_and_untiled(client, data, tmp_path, field, record_property) -> None:
    folder = data / "images" / "bbbc039"
    src = folder / f"{field}.tif"
    with rasterio.open(folder / f"{field}_instances.tif") as ds:
        truth = ds.read(1)
    mask = {
        "name": "pipeline",
        "params": {
            "first": {"name": "otsu", "params": {}},
            "steps": [
                {"op": "fill_holes", "max_size": 60, "max_extent": 16},
                {"op": "remove_small", "max_size": 30, "max_extent": 12},
            ],
        },
    }
    params = {"mask": mask, "min_distance": 7, "max_object_size": 60}
    whole = labels_of(_job(client, src, tmp_path / "w", params, [520, 696]))
    tiled_result = _job(client, src, tmp_path / "t", params, [180, 250])
    tiled = labels_of(tiled_result)
    f1_whole = match_instances(whole, truth, 0.5).f1
    f1_tiled = match_instances(tiled, truth, 0.5).f1
    record_property("f1", {"whole": f1_whole, "tiled": f1_tiled})
    print(f"{field}: F1@0.5 vs ground truth: untiled {f1_whole:.3f}, tiled {f1_tiled:.3f}")
    assert f1_whole > 0.75 and f1_tiled > 0.75
    assert match_instances(tiled, whole, 0.5).f1 >= 0.99
