"""Acceptance (classical 8, 9): clicks in world coordinates separate touching objects across seams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import SimpleITK as sitk
from affine import Affine
from pyproj import Transformer

from pipeline.errors import ConfigError
from tests.helpers import labels_of, run

TRANSFORM = Affine(0.5, 0.0, 733600.0, 0.0, -0.5, 3725140.0)  # UTM 16N, 0.5 m pixels
CENTRES = [(60, 50), (60, 86)]  # (row, col): two disks of radius 20 that touch and overlap
MASK = {"name": "threshold", "params": {"value": 100}}


def _disks(shape: tuple[int, ...], centres: list[tuple[int, ...]], radius: float) -> list[np.ndarray]:
    grid = np.indices(shape)
    return [sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2 for centre in centres]


@pytest.fixture(scope="module")
def two_disks(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    disks = _disks((128, 140), CENTRES, 20)
    rng = np.random.default_rng(3)
    image = (20 + rng.normal(0, 3, (128, 140)) + 180 * (disks[0] | disks[1])).astype(np.uint8)
    path = tmp_path_factory.mktemp("seeded") / "two_disks.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=128,
        width=140,
        count=1,
        dtype="uint8",
        crs="EPSG:32616",
        transform=TRANSFORM,
    ) as dst:
        dst.write(image, 1)
    return path, disks


def _clicks(crs: str | None = None) -> list[dict[str, float]]:
    points = []
    for i, (row, col) in enumerate(CENTRES):
        x, y = TRANSFORM @ (col + 0.5, row + 0.5)
        if crs:
            x, y = Transformer.from_crs("EPSG:32616", crs, always_xy=True).transform(x, y)
        points.append({"x": x, "y": y, "id": 10 + i})
    return points


@pytest.mark.parametrize("crs", [None, "EPSG:4326"], ids=["utm", "lonlat"])
def test_two_touching_disks_separated_across_a_seam(client, two_disks, tmp_path, crs) -> None:
    path, disks = two_disks
    params = {"points": _clicks(crs), "crs": crs, "mask": MASK, "max_object_size": 45}
    tiled_result = run(client, path, tmp_path / "t", "seeded", params, chunk=[64, 70])
    whole = labels_of(run(client, path, tmp_path / "w", "seeded", params, chunk=[128, 140]))
    tiled = labels_of(tiled_result)
    assert np.array_equal(tiled, whole)
    assert set(np.unique(tiled).tolist()) == {0, 10, 11}
    for oid, disk in zip((10, 11), disks, strict=True):
        own = tiled == oid
        # each object crosses the row-64 seam, and covers most of its own disk only
        assert own[:64].any() and own[64:].any()
        assert (own & disk).sum() / disk.sum() > 0.85 and (own & ~(disks[0] | disks[1])).sum() == 0
    assert tiled_result.plan.grid.counts == (2, 2)


def test_prompt_in_mm_on_a_flipped_volume(client, tmp_path) -> None:
    shape = (30, 40, 50)
    balls = _disks(shape, [(15, 20, 14), (15, 20, 34)], 10.5)
    volume = (100 * (balls[0] | balls[1])).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin((120.0, 80.0, -300.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # LPS flip in x and y
    path = tmp_path / "balls.nii.gz"
    sitk.WriteImage(image, str(path))
    points = []
    for z, y, x in [(15, 20, 14), (15, 20, 34)]:
        px, py, pz = image.TransformIndexToPhysicalPoint((x, y, z))
        points.append({"x": px, "y": py, "z": pz})
    result = run(
        client,
        path,
        tmp_path / "out",
        "seeded",
        {"points": points, "mask": {"name": "threshold", "params": {"value": 50}}, "max_object_size": 24},
        chunk=[25, 40, 25],
    )
    labels = labels_of(result)
    assert labels[15, 20, 14] == 1 and labels[15, 20, 34] == 2
    assert (labels[balls[0]] == 1).mean() > 0.9 and (labels[balls[1]] == 2).mean() > 0.9


def test_prompt_outside_the_image_is_refused(client, two_disks, tmp_path) -> None:
    path, _ = two_disks
    points = [{"x": 0.0, "y": 0.0}]
    with pytest.raises(ConfigError, match=r"points\[0\].*outside the image"):
        run(client, path, tmp_path / "o", "seeded", {"points": points, "mask": MASK}, chunk=[64, 70])
    assert not (tmp_path / "o" / "summary.json").exists()
