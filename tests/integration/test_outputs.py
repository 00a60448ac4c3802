"""Acceptance (spine 1, 2): the outputs exist, are valid in their formats and keep the geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import SimpleITK as sitk
import yaml
from PIL import Image as PILImage
from rio_cogeo.cogeo import cog_validate

from pipeline.io.medical import read_volume, resample_to_grid
from tests.helpers import labels_of, run


@pytest.fixture(scope="module")
def flood(client, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("flood") / "out"
    return run(
        client,
        data / "geo" / "Spain_7370579_S2Hand.tif",
        out,
        "otsu",
        {"band": "B8", "foreground": "below", "class_name": "water"},
        chunk=[200, 150],
        formats=["zarr", "cog", "png"],
    )


def test_cog_is_valid_and_keeps_crs_transform_size_nodata(flood, data) -> None:
    cog = Path(flood.outputs["cog"])
    valid, errors, _ = cog_validate(str(cog), strict=True)
    assert valid, errors
    with rasterio.open(data / "geo" / "Spain_7370579_S2Hand.tif") as src, rasterio.open(cog) as out:
        assert out.crs == src.crs
        assert out.transform.almost_equals(src.transform, precision=1e-15)
        assert (out.height, out.width) == (src.height, src.width)
        assert out.nodata == 255 and out.overviews(1)  # nodata declared, overviews present
        # the label's nodata pixels are exactly the input's masked pixels
        assert np.array_equal(out.read_masks(1) > 0, src.dataset_mask() > 0)
        assert np.array_equal(out.read(1), labels_of(flood))


def test_quicklook_png_and_metrics_table(flood) -> None:
    png = PILImage.open(flood.outputs["png"])
    assert png.format == "PNG" and min(png.size) > 200
    tiles = pd.read_parquet(flood.outputs["tiles"])
    assert len(tiles) == len(flood.plan.grid) == 12
    assert {
        "chunk_id",
        "start",
        "stop",
        "bounds",
        "pixels",
        "frac_water",
        "frac_background",
        "seconds",
        "worker",
        "status",
    } <= set(tiles.columns)
    assert tiles["pixels"].sum() == 512 * 512
    water = (labels_of(flood) == 1).sum()
    assert np.isclose((tiles["frac_water"] * tiles["valid_pixels"]).sum(), water)
    # bounds are in CRS units (degrees here) and lie inside the raster's bounds
    x0, _y0, _x1, y1 = np.stack(tiles["bounds"].to_numpy()).T
    assert x0.min() == pytest.approx(-0.78189, abs=1e-4) and y1.max() == pytest.approx(38.12881, abs=1e-4)


def test_summary_and_resolved_job(flood) -> None:
    summary = json.loads((flood.plan.out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["segmenter"]["fitted"]["threshold"] == flood.segmenter.threshold
    assert {"ingest", "fit", "segment", "finalize"} <= set(summary["timings_s"])
    assert {"dask", "zarr", "rasterio", "SimpleITK"} <= set(summary["versions"])
    resolved = yaml.safe_load((flood.plan.out / "job.resolved.yaml").read_text())
    assert resolved["input"]["path"] == str(flood.plan.source.path)


def _geometry(path: Path) -> tuple:
    if path.is_dir():
        r = sitk.ImageSeriesReader()
        r.SetFileNames(r.GetGDCMSeriesFileNames(str(path)))
        img = r.Execute()
    else:
        img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


@pytest.mark.parametrize(
    "source", ["totalseg_example_ct_sm.nii.gz", "totalseg_example_ct_dicom", "brain1_image.nrrd"]
)
def test_volume_outputs_keep_spacing_origin_direction(client, data, tmp_path, source) -> None:
    path = data / "medical" / source
    result = run(
        client,
        path,
        tmp_path / "out",
        "threshold",
        {"preset": "ct_air_soft_bone"},
        chunk=[8, 64, 64],
        formats=["zarr", "nifti", "mha", "png"],
    )
    size, spacing, origin, direction = _geometry(path)
    for key in ("nifti", "mha"):
        written = sitk.ReadImage(result.outputs[key])
        assert written.GetSize() == size
        assert np.allclose(written.GetSpacing(), spacing, atol=1e-5)
        assert np.allclose(written.GetOrigin(), origin, atol=1e-4)
        assert np.allclose(written.GetDirection(), direction, atol=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(written), labels_of(result))


def test_dicom_label_volume_lines_up_in_physical_space_not_array_order(data) -> None:
    """The TotalSegmentator label of the DICOM series stores y flipped: align by geometry."""
    series, ref = read_volume(data / "medical" / "totalseg_example_ct_dicom")
    seg_path = data / "medical" / "totalseg_example_ct_dicom_seg.nii.gz"
    raw_seg, seg_ref = read_volume(seg_path)
    assert seg_ref.direction_zyx[1][1] == pytest.approx(-1.0)  # y axis flipped on disk
    aligned = resample_to_grid(seg_path, series.shape, ref)
    names = json.loads((data / "medical" / "totalseg_example_ct_dicom_seg.labels.json").read_text())
    bone_ids = [
        int(k)
        for k, v in names["labels"].items()
        if any(w in v for w in ("vertebra", "rib", "sternum", "costal"))
    ]
    assert bone_ids
    bone_hu_aligned = series[np.isin(aligned, bone_ids)].mean()
    bone_hu_raw = series[np.isin(raw_seg, bone_ids)].mean()
    body_air_aligned = (series[aligned > 0] < -400).mean()
    body_air_raw = (series[raw_seg > 0] < -400).mean()
    assert bone_hu_aligned > 200 and bone_hu_raw < 0, (bone_hu_aligned, bone_hu_raw)
    assert body_air_aligned < 0.05 < body_air_raw, (body_air_aligned, body_air_raw)
    # resampling by geometry equals flipping the stored y axis, voxel for voxel
    assert np.array_equal(aligned, raw_seg[:, ::-1, :])
