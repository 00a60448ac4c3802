"""SAM prompts: world -> index mapping against rasterio and SimpleITK, windows, the overlap rule,
checkpoint and prompt errors (acceptance 4, unit part). Random weights: plumbing only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import SimpleITK as sitk
from pyproj import Transformer

import pipeline.models.torch.sam  # noqa: F401  (registers sam)
from pipeline.errors import ConfigError
from pipeline.io.sources import open_source
from pipeline.models import ImageInfo, create_segmenter
from pipeline.models.prompts import Prompt, PromptMask, map_prompts, paste_masks
from pipeline.tiling import Box

RANDOM = {"checkpoint": "random", "variant": "tiny_test"}


def _info(path: Path) -> ImageInfo:
    s = open_source(str(path))
    kind = "raster" if len(s.spatial_shape) == 2 else "volume"
    return ImageInfo(kind, s.shape[0], s.dtype, (), s.spatial_shape, s.geometry)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["RGB.byte.tif", "Spain_7370579_S2Hand.tif"])
def test_lonlat_lands_on_rasterio_pixel(data: Path, name: str) -> None:
    path = data / "geo" / name
    info = _info(path)
    with rasterio.open(path) as src:
        to_crs = Transformer.from_crs("EPSG:4326", src.crs, always_xy=True)
        to_ll = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
        rng = np.random.default_rng(1)
        rows, cols = rng.uniform(0, src.height, 25), rng.uniform(0, src.width, 25)
        a, b, c, d, e, f = src.transform[:6]
        xs, ys = a * cols + b * rows + c, d * cols + e * rows + f
        lons, lats = to_ll.transform(xs, ys)
        prompts = [Prompt(point=[lo, la]) for lo, la in zip(lons, lats, strict=True)]
        mapped = map_prompts(prompts, info.geometry, info.shape, crs="EPSG:4326", window=64)
        for p, lo, la in zip(mapped, lons, lats, strict=True):
            x, y = to_crs.transform(lo, la)
            assert p.region.start == tuple(src.index(x, y))
            assert p.region.shape == (1, 1)


@pytest.mark.parametrize("name", ["totalseg_example_ct_sm.nii.gz", "brain1_image.nrrd"])
def test_mm_lands_on_simpleitk_voxel(data: Path, name: str) -> None:
    path = data / "medical" / name
    info = _info(path)
    img = sitk.ReadImage(str(path))
    rng = np.random.default_rng(2)
    size = np.array(img.GetSize())  # x, y, z
    pts = [
        img.TransformContinuousIndexToPhysicalPoint(list(rng.uniform(-0.4, size - 0.6))) for _ in range(25)
    ]
    mapped = map_prompts(
        [Prompt(point=list(p)) for p in pts], info.geometry, info.shape, crs="LPS", window=32
    )
    for p, pt in zip(mapped, pts, strict=True):
        assert p.region.start == tuple(img.TransformPhysicalPointToIndex(pt))[::-1]
    ras = [[-p[0], -p[1], p[2]] for p in pts]
    again = map_prompts([Prompt(point=r) for r in ras], info.geometry, info.shape, crs="RAS", window=32)
    assert [p.region for p in again] == [p.region for p in mapped]


def test_windows_are_centred_and_shifted_inside(data: Path) -> None:
    info = _info(data / "medical" / "totalseg_example_ct_sm.nii.gz")  # shape (30, 101, 122)
    img = sitk.ReadImage(str(data / "medical" / "totalseg_example_ct_sm.nii.gz"))
    centre = img.TransformIndexToPhysicalPoint((60, 50, 10))
    corner = img.TransformIndexToPhysicalPoint((1, 99, 3))
    lo, hi = img.TransformIndexToPhysicalPoint((50, 40, 4)), img.TransformIndexToPhysicalPoint((55, 48, 6))
    prompts = [Prompt(point=list(centre)), Prompt(point=list(corner)), Prompt(box=[*lo, *hi])]
    a, b, c = map_prompts(prompts, info.geometry, info.shape, crs="LPS", window=32)
    assert a.window == Box((10, 34, 44), (11, 66, 76))  # pixel at local (16, 16)
    assert b.window == Box((3, 69, 0), (4, 101, 32))  # shifted to stay inside
    assert c.region == Box((4, 40, 50), (7, 49, 56)) and c.window.start[0] == 4 and c.window.stop[0] == 7
    assert c.window.shape == (3, 32, 32)


def test_overlap_rule_and_window_confinement() -> None:
    ones = np.ones((4, 4), bool)
    masks = [
        PromptMask(1, Box((0, 0), (4, 4)), ones, 0.5),
        PromptMask(2, Box((2, 2), (6, 6)), ones, 0.9),  # higher IoU wins the overlap
        PromptMask(3, Box((2, 2), (6, 6)), ones, 0.9),  # same IoU: the lower number (2) wins
    ]
    out = paste_masks((8, 8), (0, 0), masks)
    assert (out[2:6, 2:6] == 2).all() and (out[:2, :4] == 1).all() and (out[:2, :2] == 1).all()
    assert (out[6:, :] == 0).all() and (out[:, 6:] == 0).all() and not (out == 3).any()
    shifted = paste_masks((4, 4), (4, 4), masks)  # a block elsewhere: only the window's part lands
    assert (shifted[:2, :2] == 2).all() and (shifted[2:, :] == 0).all()


def test_prompt_outside_the_image_names_prompt_and_bounds(data: Path) -> None:
    info = _info(data / "geo" / "RGB.byte.tif")
    params = {**RANDOM, "prompts": [{"point": [-77.9, 24.6]}, {"point": [2.35, 48.85], "name": "paris"}]}
    with pytest.raises(ConfigError, match=r"prompts\[1\] \('paris'\).*outside the image.*x -78\.\d+\.\.-7\d"):
        create_segmenter("sam", params, info)
    vol = _info(data / "medical" / "totalseg_example_ct_sm.nii.gz")
    with pytest.raises(ConfigError, match=r"prompts\[0\].*outside the image.*mm LPS"):
        create_segmenter("sam", {**RANDOM, "prompts": [{"point": [0, 0, 5000]}]}, vol)
    with pytest.raises(ConfigError, match="patient frame"):
        create_segmenter("sam", {**RANDOM, "prompts": [{"point": [0, 0]}], "prompts_crs": "LPS"}, info)
    big = {**RANDOM, "window": 16, "prompts": [{"box": [-78.2, 24.3, -78.1, 24.4]}]}
    with pytest.raises(ConfigError, match=r"raise segmenter\.params\.window to at least"):
        create_segmenter("sam", big, info)


def test_checkpoint_errors(data: Path, tmp_path: Path) -> None:
    info = _info(data / "geo" / "RGB.byte.tif")
    prompts = [{"point": [-77.9, 24.6]}]
    with pytest.raises(
        ConfigError, match=r"sam_vit_b_01ec64\.pth.*dl\.fbaipublicfiles\.com.*downloads nothing"
    ):
        create_segmenter("sam", {"prompts": prompts}, info)
    missing = tmp_path / "sam_vit_h.pth"
    with pytest.raises(ConfigError, match=r"sam_vit_h\.pth'?: file not found.*sam_vit_h_4b8939\.pth"):
        create_segmenter("sam", {"prompts": prompts, "checkpoint": str(missing), "variant": "vit_h"}, info)
    import torch

    from pipeline.models.torch.sam import build_sam

    tiny = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny_test", "random").state_dict(), tiny)
    with pytest.raises(ConfigError, match=r"32 wide.*tiny_test checkpoint.*variant is 'vit_b'"):
        create_segmenter("sam", {"prompts": prompts, "checkpoint": str(tiny)}, info)


def test_saved_checkpoint_reproduces_the_random_network(data: Path, tmp_path: Path) -> None:
    """The file route (weights_only load) gives the same masks as the seeded random network."""
    import torch

    from pipeline.models.torch.sam import build_sam

    tiny = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny_test", "random").state_dict(), tiny)
    path = data / "geo" / "RGB.byte.tif"
    info = _info(path)
    with rasterio.open(path) as src:
        img = src.read(window=((280, 420), (300, 440)))
    prompts = [{"point": [-77.9, 24.6]}]
    a = create_segmenter("sam", {**RANDOM, "window": 64, "prompts": prompts}, info)
    b = create_segmenter(
        "sam", {"variant": "tiny_test", "checkpoint": str(tiny), "window": 64, "prompts": prompts}, info
    )
    window = a.prompts[0].window  # type: ignore[attr-defined]
    assert Box((280, 300), (420, 440)).contains(window)

    class Ctx:
        origin = (280, 300)
        cut = ((True, True), (True, True))

    la = a.run(img, np.ones(img.shape[1:], bool), Ctx())  # type: ignore[arg-type]
    lb = b.run(img, np.ones(img.shape[1:], bool), Ctx())  # type: ignore[arg-type]
    assert np.array_equal(la, lb) and 0 < (la == 1).sum() < window.size
    assert not la[~_inside(window, (280, 300), img.shape[1:])].any()  # nothing outside the window


def _inside(window: Box, origin: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[window.relative_to(Box(origin, tuple(o + s for o, s in zip(origin, shape, strict=True)))).slices()] = (
        True
    )
    return m
