"""Acceptance 4 (issue 8, SAM): prompts in lon/lat on a raster and in mm on a volume land in the
right chunk and pixel/voxel, and their masks come back at the right place of the stitched output.

The network is the randomly initialised ``tiny_test`` SAM: these tests check the plumbing
(mapping, windows, stitching), not mask quality, which needs the real checkpoints. With
``mask_threshold`` far below any logit a prompt's mask is its whole window, so placement can be
checked pixel for pixel; with the default threshold the random masks check the overlap rule
and that tiled equals untiled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import SimpleITK as sitk
from pyproj import Transformer

from pipeline.tiling import Box
from tests.helpers import labels_of, run

RANDOM = {"checkpoint": "random", "variant": "tiny_test"}
#: Raster targets (row, col) on a 160-px grid: near a column seam, at a four-chunk corner (480, 480),
#: a box inside one chunk, and a point near the image edge (its window is shifted inside).
RASTER_POINTS = [(250, 318), (481, 478)]
RASTER_BOX = ((100, 560), (110, 575))
W = 64
V = 32  # the volume's window


def _lonlat(src: rasterio.DatasetReader, rows: list[float], cols: list[float]) -> list[list[float]]:
    to_ll = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
    xs, ys = rasterio.transform.xy(src.transform, rows, cols)  # pixel centres
    lon, lat = to_ll.transform(xs, ys)
    return [[float(a), float(b)] for a, b in zip(lon, lat, strict=True)]


def _raster_prompts(src: rasterio.DatasetReader) -> tuple[list[dict[str, Any]], list[Box]]:
    """Prompts in lon/lat and the windows they must name (from rasterio's index, independently)."""
    to_crs = Transformer.from_crs("EPSG:4326", src.crs, always_xy=True)
    pts = _lonlat(src, [r for r, _ in RASTER_POINTS], [c for _, c in RASTER_POINTS])
    (r0, c0), (r1, c1) = RASTER_BOX
    corners = _lonlat(src, [r0 + 0.1, r1 - 1.1], [c0 + 0.1, c1 - 1.1])
    prompts = [{"point": p} for p in pts] + [{"box": [*corners[0], *corners[1]]}]
    windows = []
    for p in pts:
        row, col = src.index(*to_crs.transform(*p))
        assert (row, col) in RASTER_POINTS  # lon/lat round trip lands on the pixel it came from
        windows.append(_win((row, col), (row + 1, col + 1), (src.height, src.width)))
    windows.append(_win((r0, c0), (r1, c1), (src.height, src.width)))
    return prompts, windows


def _win(start: tuple[int, ...], stop: tuple[int, ...], shape: tuple[int, ...], size: int = W) -> Box:
    """The window of side ``size`` centred on ``[start, stop)``, shifted inside the image."""
    lo = []
    for a, b, n in zip(start, stop, shape, strict=True):
        lo.append(min(max((a + b - 1) // 2 - size // 2, 0), n - size))
    return Box(tuple(lo), tuple(v + size for v in lo))


def _summary_windows(result: Any) -> list[Box]:
    summary = json.loads((result.plan.out / "summary.json").read_text())
    found = []
    for p in summary["segmenter"]["fitted"]["prompts"]:
        found.append(Box(tuple(p["window_start"]), tuple(p["window_stop"])))
    return found


def test_lonlat_prompts_fill_their_windows_in_the_cog(torch_client: Any, data: Path, tmp_path: Path) -> None:
    path = data / "geo" / "RGB.byte.tif"
    with rasterio.open(path) as src:
        prompts, windows = _raster_prompts(src)
        image = src.read()
    params = {**RANDOM, "window": W, "prompts": prompts, "mask_threshold": -1e9}
    result = run(
        torch_client, path, tmp_path / "out", "sam", params, chunk=[160, 160], formats=["zarr", "cog"]
    )
    assert _summary_windows(result) == windows
    with rasterio.open(result.outputs["cog"]) as cog:
        out = cog.read(1)
        assert cog.crs == src.crs and cog.transform == src.transform
    expected = np.zeros(out.shape, np.uint64)
    valid = ~np.all(image == 0, axis=0)  # the file's nodata is 0
    for i, w in enumerate(windows):
        expected[w.slices()] = i + 1
    expected[~valid] = 0
    assert np.array_equal(out, expected)
    for (row, col), label in zip(RASTER_POINTS, (1, 2), strict=True):  # right chunk, right pixel
        chunk = Box((row // 160 * 160, col // 160 * 160), (row // 160 * 160 + 160, col // 160 * 160 + 160))
        assert out[row, col] == label and np.any(out[chunk.slices()] == label)
    assert len({(r // 160, c // 160) for r, c in [(481, 478), (481, 478 + 32), (481 - 32, 478)]}) >= 2


def test_random_masks_tiled_equal_untiled(torch_client: Any, data: Path, tmp_path: Path) -> None:
    path = data / "geo" / "RGB.byte.tif"
    with rasterio.open(path) as src:
        prompts, windows = _raster_prompts(src)
        near = _lonlat(src, [470], [490])  # window overlaps the corner prompt's: the overlap rule
        prompts.append({"point": near[0]})
        windows.append(_win((470, 490), (471, 491), (src.height, src.width)))
    params = {**RANDOM, "window": W, "prompts": prompts}
    tiled = labels_of(run(torch_client, path, tmp_path / "t", "sam", params, chunk=[160, 160]))
    whole = labels_of(run(torch_client, path, tmp_path / "w", "sam", params, chunk=[718, 791]))
    assert np.array_equal(tiled, whole)
    for i, w in enumerate(windows):
        inside = np.zeros(tiled.shape, bool)
        inside[w.slices()] = True
        assert (tiled == i + 1).any() and not (tiled[~inside] == i + 1).any()
    assert set(np.unique(tiled)) <= set(range(len(windows) + 1))

    from pipeline.models.torch import sam

    loads = torch_client.run(lambda: {str(k): v for k, v in sam.LOADS.items()})
    assert all(v == 1 for per in loads.values() for v in per.values())  # once per worker process


def test_mm_prompts_on_ct_fill_their_slices_in_the_nifti(
    torch_client: Any, data: Path, tmp_path: Path
) -> None:
    path = data / "medical" / "totalseg_example_ct_sm.nii.gz"  # (z, y, x) = (30, 101, 122), 3 mm
    img = sitk.ReadImage(str(path))
    shape = img.GetSize()[::-1]
    targets = [(10, 46, 70), (20, 49, 47)]  # near a y seam (48); at a y/x four-chunk corner (48, 48)
    box = ((6, 70, 20), (10, 80, 30))  # z 6..9 crosses the z seam at 8
    pts = [img.TransformIndexToPhysicalPoint((x, y, z)) for z, y, x in targets]
    lo = img.TransformIndexToPhysicalPoint(box[0][::-1])
    hi = img.TransformIndexToPhysicalPoint(tuple(v - 1 for v in box[1][::-1]))
    prompts = [{"point": list(p)} for p in pts] + [{"box": [*lo, *hi]}]
    windows = []
    for p in pts:
        z, y, x = img.TransformPhysicalPointToIndex(p)[::-1]
        assert (z, y, x) in targets
        w = _win((y, x), (y + 1, x + 1), shape[1:], V)
        windows.append(Box((z, *w.start), (z + 1, *w.stop)))
    w = _win(box[0][1:], box[1][1:], shape[1:], V)
    windows.append(Box((box[0][0], *w.start), (box[1][0], *w.stop)))
    params = {**RANDOM, "window": V, "prompts": prompts, "value_range": [-160, 240], "mask_threshold": -1e9}
    result = run(
        torch_client, path, tmp_path / "out", "sam", params, chunk=[8, 48, 48], formats=["zarr", "nifti"]
    )
    assert _summary_windows(result) == windows
    written = sitk.ReadImage(result.outputs["nifti"])
    assert written.GetSize() == img.GetSize()
    assert np.allclose(written.GetOrigin(), img.GetOrigin()) and np.allclose(
        written.GetSpacing(), img.GetSpacing()
    )
    assert np.allclose(written.GetDirection(), img.GetDirection())
    out = sitk.GetArrayFromImage(written)
    expected = np.zeros(shape, np.uint64)
    for i, b in enumerate(windows):
        expected[b.slices()] = i + 1
    assert np.array_equal(out, expected)

    params["mask_threshold"] = 0.0
    tiled = labels_of(run(torch_client, path, tmp_path / "t", "sam", params, chunk=[8, 48, 48]))
    whole = labels_of(run(torch_client, path, tmp_path / "w", "sam", params, chunk=list(shape)))
    assert np.array_equal(tiled, whole) and all((tiled == i + 1).any() for i in range(3))
    assert not (tiled[expected == 0]).any()  # every mask inside its prompt's window
