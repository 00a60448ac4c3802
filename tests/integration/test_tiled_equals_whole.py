"""Acceptance (spine 3): tiled threshold/otsu equal the whole-image skimage result, 0 pixels off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import SimpleITK as sitk
from scipy import ndimage
from skimage.filters import threshold_otsu

from tests.helpers import labels_of, run

CHUNKINGS_2D = [[512, 512], [128, 128], [100, 77], [333, 200], [64, 500]]
CHUNKINGS_3D = [[30, 101, 122], [8, 32, 32], [7, 50, 61], [16, 64, 64], [30, 20, 122]]


def _raster(path: Path, band: int) -> tuple[np.ndarray, np.ndarray]:
    """One band and rasterio's own validity mask (the reference, independent of segpipe)."""
    with rasterio.open(path) as ds:
        values = ds.read(band)
        valid = ds.dataset_mask() > 0
    if values.dtype.kind == "f":
        valid &= ~np.isnan(values)
    return values, valid


def _otsu_reference(values: np.ndarray, valid: np.ndarray, *, below: bool = False) -> np.ndarray:
    t = threshold_otsu(values[valid])
    out = (values <= t if below else values > t).astype(np.uint8)
    out[~valid] = 255
    return out


@pytest.mark.parametrize("chunk", CHUNKINGS_2D, ids=lambda c: "x".join(map(str, c)))
def test_otsu_sentinel2_nir_tiled_equals_whole(client, data, tmp_path, chunk) -> None:
    path = data / "geo" / "Spain_7370579_S2Hand.tif"
    result = run(client, path, tmp_path / "out", "otsu", {"band": "B8", "foreground": "below"}, chunk=chunk)
    values, valid = _raster(path, 8)
    expected = _otsu_reference(values, valid, below=True)
    assert result.segmenter.threshold == threshold_otsu(values[valid])
    assert np.count_nonzero(labels_of(result) != expected) == 0
    assert 0.05 < (expected == 1).mean() < 0.6  # a real water fraction, not a degenerate map


@pytest.mark.parametrize("chunk", CHUNKINGS_2D[1:], ids=lambda c: "x".join(map(str, c)))
def test_otsu_float_with_nan_nodata_tiled_equals_whole(client, data, tmp_path, chunk) -> None:
    path = data / "geo" / "Spain_7370579_S1Hand.tif"  # float32 dB, nodata NaN
    result = run(client, path, tmp_path / "out", "otsu", {"band": "VV"}, chunk=chunk)
    values, valid = _raster(path, 1)
    assert np.count_nonzero(labels_of(result) != _otsu_reference(values, valid)) == 0


@pytest.mark.parametrize(
    "chunk", [[128, 128], [100, 77], [333, 200], [64, 500]], ids=lambda c: "x".join(map(str, c))
)
def test_smoothed_otsu_halo_crop_is_exact(client, data, tmp_path, chunk) -> None:
    """A Gaussian pre-filter needs a halo; cropping it gives the whole-image result exactly."""
    path = data / "geo" / "Spain_7370579_S2Hand.tif"
    result = run(client, path, tmp_path / "out", "otsu", {"band": "B8", "smooth_sigma": 1.5}, chunk=chunk)
    assert result.plan.grid.halo == (6, 6)
    values, valid = _raster(path, 8)
    smooth = ndimage.gaussian_filter(values.astype(np.float64), 1.5, truncate=4.0)
    assert np.count_nonzero(labels_of(result) != _otsu_reference(smooth, valid)) == 0


@pytest.mark.parametrize("chunk", CHUNKINGS_2D[1:], ids=lambda c: "x".join(map(str, c)))
def test_fixed_threshold_tiled_equals_whole(client, data, tmp_path, chunk) -> None:
    path = data / "geo" / "Spain_7370579_S1Hand.tif"
    result = run(
        client,
        path,
        tmp_path / "out",
        "threshold",
        {"band": 1, "value": -15.0, "foreground": "below"},
        chunk=chunk,
    )
    values, valid = _raster(path, 1)
    expected = (values < -15.0).astype(np.uint8)
    expected[~valid] = 255
    assert np.count_nonzero(labels_of(result) != expected) == 0


def _ct(data: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(data / "medical" / "totalseg_example_ct_sm.nii.gz")))


@pytest.mark.parametrize("chunk", CHUNKINGS_3D, ids=lambda c: "x".join(map(str, c)))
def test_otsu_ct_volume_tiled_equals_whole(client, data, tmp_path, chunk) -> None:
    result = run(
        client, data / "medical" / "totalseg_example_ct_sm.nii.gz", tmp_path / "out", "otsu", {}, chunk=chunk
    )
    volume = _ct(data)
    expected = (volume > threshold_otsu(volume)).astype(np.uint8)
    assert np.count_nonzero(labels_of(result) != expected) == 0


@pytest.mark.parametrize("chunk", CHUNKINGS_3D[1:], ids=lambda c: "x".join(map(str, c)))
def test_hu_windows_ct_tiled_equals_whole(client, data, tmp_path, chunk) -> None:
    result = run(
        client,
        data / "medical" / "totalseg_example_ct_sm.nii.gz",
        tmp_path / "out",
        "threshold",
        {"preset": "ct_air_soft_bone"},
        chunk=chunk,
    )
    v = _ct(data)
    expected = np.zeros(v.shape, np.uint8)
    expected[v < -400] = 1
    expected[(v >= -200) & (v < 300)] = 2
    expected[v >= 300] = 3
    assert np.count_nonzero(labels_of(result) != expected) == 0
    assert set(np.unique(expected)) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "chunk",
    [[20, 512, 512], [8, 256, 256], [3, 200, 300], [20, 64, 512]],
    ids=lambda c: "x".join(map(str, c)),
)
def test_otsu_dicom_series_tiled_equals_whole(client, data, tmp_path, chunk) -> None:
    folder = data / "medical" / "totalseg_example_ct_dicom"
    result = run(client, folder, tmp_path / "out", "otsu", {}, chunk=chunk)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    volume = sitk.GetArrayFromImage(reader.Execute())
    expected = (volume > threshold_otsu(volume)).astype(np.uint8)
    assert np.count_nonzero(labels_of(result) != expected) == 0
