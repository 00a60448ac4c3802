"""Acceptance (instances 1, 3, 5): tiled connected components equal scipy.ndimage.label; polygons
and object tables match the reference libraries."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from pipeline.data import GeoRef, VolumeRef
from pipeline.io.zarr_store import create_array, write_box
from pipeline.tiling import Box
from tests.helpers import labels_of, run

RASTER = GeoRef("EPSG:32633", (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0))
VOLUME = VolumeRef((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))
FG = {"semantic": {"name": "threshold", "params": {"value": 0}}}


def assert_same_partition(tiled: np.ndarray, reference: np.ndarray) -> None:
    """Same foreground and a one-to-one map between the ids of the two labelings."""
    assert np.array_equal(tiled != 0, reference != 0)
    pairs = np.unique(np.stack([tiled.ravel(), reference.ravel()], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))
    assert tiled.max() == len(np.unique(tiled)) - 1  # sequential ids 1..n


def _write_zarr(path: Path, mask: np.ndarray) -> Path:
    geometry = RASTER if mask.ndim == 2 else VOLUME
    create_array(path, shape=mask.shape, chunks=mask.shape, dtype="uint8", geometry=geometry)
    write_box(path, Box.from_shape(mask.shape), mask.astype(np.uint8))
    return path


def _spiral(shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    top, left, bottom, right = 0, 0, shape[0] - 1, shape[1] - 1
    while top <= bottom and left <= right:
        out[top, left : right + 1] = True
        out[top : bottom + 1, right] = True
        if bottom - top >= 2:
            out[bottom, left : right + 1] = True
        if right - left >= 2:
            out[top + 2 : bottom + 1, left] = True
        if top + 2 <= bottom:
            out[top + 2, left : left + 3] = True
        top, left, bottom, right = top + 4, left + 4, bottom - 2, right - 2
    return out


@st.composite
def masks(draw: st.DrawFn) -> tuple[np.ndarray, list[int], int]:
    ndim = draw(st.sampled_from([2, 2, 3]))
    shape = tuple(draw(st.integers(6, 48 if ndim == 2 else 14)) for _ in range(ndim))
    chunk = [draw(st.integers(2, s)) for s in shape]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "spiral", "lines", "corners"]))
    mask = rng.random(shape) < draw(st.floats(0.2, 0.65))
    if kind == "spiral" and ndim == 2:
        mask = _spiral(shape)
    elif kind == "lines":  # lines crossing every chunk, plus a sparse background
        mask = rng.random(shape) < 0.1
        mask[(shape[0] // 2,) + (slice(None),) * (ndim - 1)] = True
        mask[(slice(None), shape[1] // 3) + (slice(None),) * (ndim - 2)] = True
    elif kind == "corners":  # objects meeting only diagonally at four-chunk corners
        mask = np.zeros(shape, bool)
        for corner in np.ndindex(*[max(1, s // c) for s, c in zip(shape, chunk, strict=True)]):
            at = tuple(min(i * c, s - 1) for i, c, s in zip(corner, chunk, shape, strict=True))
            before = tuple(max(a - 1, 0) for a in at)
            mask[at] = mask[before] = True
    connectivity = draw(st.integers(1, ndim))
    return mask, chunk, connectivity


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=masks())
def test_tiled_components_equal_scipy_label(client, tmp_path_factory, case) -> None:
    mask, chunk, connectivity = case
    folder = tmp_path_factory.mktemp("cc")
    src = _write_zarr(folder / "mask.zarr", mask)
    result = run(client, src, folder / "out", "components", {**FG, "connectivity": connectivity}, chunk=chunk)
    reference, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, connectivity))
    tiled = labels_of(result)
    assert_same_partition(tiled, reference)
    assert result.instances["objects"] == n


@pytest.mark.parametrize(
    ("chunk", "connectivity"), [([128, 128], 1), ([100, 77], 2), ([333, 45], 2), ([64, 500], 1)]
)
def test_sen1floods11_water_components(client, data, tmp_path, chunk, connectivity) -> None:
    path = data / "geo" / "Spain_7370579_LabelHand.tif"
    result = run(
        client,
        path,
        tmp_path / "out",
        "components",
        {"semantic": {"name": "threshold", "params": {"value": 0.5}}, "connectivity": connectivity},
        chunk=chunk,
        formats=["zarr", "geoparquet"],
    )
    with rasterio.open(path) as ds:
        water = ds.read(1) == 1
    reference, n = ndimage.label(water, structure=ndimage.generate_binary_structure(2, connectivity))
    assert_same_partition(labels_of(result), reference)
    assert n > 50 and result.instances["merged_ids"] > 0  # many objects, and seams were crossed
    polys = gpd.read_parquet(result.outputs["geoparquet"])
    assert len(polys) == n and polys["id"].is_unique and polys.geometry.is_valid.all()
    pixel_area = abs(ds.transform.a * ds.transform.e)
    # areas in the raster's own units (degrees² here), so raster and polygons compare exactly
    assert shapely.area(polys.geometry.values).sum() == pytest.approx(water.sum() * pixel_area, rel=1e-3)


@pytest.mark.parametrize(
    "field",
    [
        "IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E847D9B42CB",
        "IXMtest_G13_s9_w19606195E-12B4-46FF-9B83-1F7FE11B3AFB",
    ],
)
def test_bbbc039_mask_components(client, data, tmp_path, field) -> None:
    path = data / "images" / "bbbc039" / f"{field}_instances.tif"
    result = run(
        client,
        path,
        tmp_path / "out",
        "components",
        {**FG, "connectivity": 2},
        chunk=[130, 100],
        input={"path": str(path), "allow_missing_crs": True},
    )
    with rasterio.open(path) as ds:
        fg = ds.read(1) > 0
    reference, _ = ndimage.label(fg, structure=np.ones((3, 3)))
    assert_same_partition(labels_of(result), reference)


def test_spacenet_buildings_round_trip_to_43_polygons(client, data, tmp_path) -> None:
    path = data / "geo" / "spacenet_atlanta_buildings_instances.tif"
    # building 20 has one pixel attached only diagonally: 8-connectivity keeps it one building
    result = run(
        client,
        path,
        tmp_path / "out",
        "components",
        {**FG, "connectivity": 2},
        chunk=[256, 200],
        formats=["zarr", "cog", "gpkg"],
    )

    polys = gpd.read_file(result.outputs["gpkg"])
    with rasterio.open(path) as ds:
        truth = ds.read(1)
        assert polys.crs == ds.crs
        pixel_area = abs(ds.transform.a * ds.transform.e)
    assert len(polys) == 43 == result.instances["objects"]
    assert result.instances["merged_ids"] > 0  # buildings were cut by the grid and merged back
    assert polys.geometry.is_valid.all()
    assert polys.geometry.area.sum() == pytest.approx((truth > 0).sum() * pixel_area, rel=1e-3)
    # one object per building: the stitched ids map one-to-one onto the 43 ground-truth ids
    assert_same_partition(labels_of(result), truth)
    # the object table's world bounding boxes are the polygons' bounds; areas in m² (UTM)
    table = pd.read_parquet(result.outputs["objects"]).set_index("id")
    bounds = polys.set_index("id").geometry.bounds
    for col in ("xmin", "ymin", "xmax", "ymax"):
        assert np.allclose(
            table[f"bbox_{col}"],
            bounds.loc[table.index, {"xmin": "minx", "ymin": "miny", "xmax": "maxx", "ymax": "maxy"}[col]],
        )
    assert np.allclose(table["area_m2"], polys.set_index("id").geometry.area.loc[table.index])
    seams = pd.read_parquet(result.outputs["seams"])
    assert seams["merged_pairs"].sum() >= result.instances["merged_ids"] > 0


def test_polygon_simplification_in_map_units(client, data, tmp_path) -> None:
    path = data / "geo" / "spacenet_atlanta_buildings_instances.tif"
    out = {}
    for tol in (0.0, 1.0):
        result = run(
            client,
            path,
            tmp_path / f"s{tol}",
            "components",
            {**FG, "connectivity": 2},
            chunk=[300, 300],
            formats=["zarr", "geoparquet"],
            output={"dir": str(tmp_path / f"s{tol}"), "formats": ["zarr", "geoparquet"], "simplify": tol},
        )
        out[tol] = gpd.read_parquet(result.outputs["geoparquet"])
    vertices = {t: shapely.get_num_coordinates(f.geometry.values).sum() for t, f in out.items()}
    assert len(out[1.0]) == len(out[0.0]) == 43 and vertices[1.0] < 0.7 * vertices[0.0]
    assert out[1.0].geometry.is_valid.all()


def test_object_table_volumes_equal_simpleitk(client, data, tmp_path) -> None:
    path = data / "medical" / "totalseg_example_ct_sm_seg.nii.gz"
    result = run(client, path, tmp_path / "out", "label_map", {}, chunk=[8, 40, 50])
    table = pd.read_parquet(result.outputs["objects"]).set_index("id")
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.ReadImage(str(path)))
    names = json.loads((data / "medical" / "totalseg_example_ct_sm_seg.labels.json").read_text())
    assert sorted(table.index) == sorted(stats.GetLabels()) and len(table) == 41
    for label in stats.GetLabels():
        assert table.loc[label, "volume_mm3"] == pytest.approx(stats.GetPhysicalSize(label), rel=1e-6)
        x, y, z = stats.GetCentroid(label)
        row = table.loc[label]
        assert (row.centroid_z_mm, row.centroid_y_mm, row.centroid_x_mm) == pytest.approx((z, y, x), abs=1e-6)
    assert table.loc[5, "volume_ml"] > 100  # the liver, in mL
    assert "liver" in json.dumps(names)
