"""COG overviews: every level read back with rasterio equals a 2x2 reduction computed here in
numpy from the full-resolution result (labels by mode, scores by block mean, NEAREST by sampling),
edge blocks of partial size and nodata included; a zero-filled overview fails these checks."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rio_cogeo.cogeo import cog_validate

from pipeline.data.geometry import GeoRef
from pipeline.errors import ConfigError
from pipeline.io.geo import write_cog
from pipeline.tiling import Box
from tests.helpers import labels_of, run

RGB = "geo/RGB.byte.tif"  # 718 x 791 px, nodata 0 in a collar around the scene


def _padded_blocks(a: np.ndarray, fill: float) -> np.ndarray:
    """``a`` padded with ``fill`` to even sides, as ``(h/2, w/2, 4)`` blocks."""
    h, w = a.shape
    p = np.full((h + h % 2, w + w % 2), fill, dtype=np.float64)
    p[:h, :w] = a
    h2, w2 = p.shape[0] // 2, p.shape[1] // 2
    return p.reshape(h2, 2, w2, 2).transpose(0, 2, 1, 3).reshape(h2, w2, 4)


def mode_reference(a: np.ndarray, nodata: int) -> np.ndarray:
    """Most frequent non-nodata value of each 2x2 block, ties to the smallest; nodata if none."""
    blocks = _padded_blocks(a, -1.0)  # -1: outside the raster
    values = np.unique(a[a != nodata])
    counts = np.stack([(blocks == v).sum(axis=-1) for v in values], axis=-1)
    out = values[np.argmax(counts, axis=-1)]  # argmax: first (smallest) of the tied values
    return np.where(counts.max(axis=-1) > 0, out, nodata).astype(a.dtype)


def mean_reference(a: np.ndarray, nodata: float) -> np.ndarray:
    """Mean of the valid pixels of each 2x2 block (NaN and ``nodata`` are not valid)."""
    data = np.where(np.isnan(a) | (a == nodata), np.nan, a.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks: nanmean warns, gives NaN
        mean = np.nanmean(_padded_blocks(data, np.nan), axis=-1)
    return np.where(np.isnan(mean), nodata, mean).astype(a.dtype)


def overview_levels(path: Path) -> list[np.ndarray]:
    with rasterio.open(path) as ds:
        n = len(ds.overviews(1))
        assert ds.overviews(1) == [2 ** (k + 1) for k in range(n)]
    levels = []
    for k in range(n):
        with rasterio.open(path, overview_level=k) as ov:
            levels.append(ov.read(1))
    return levels


def check_levels(path: Path, full: np.ndarray, reduce, compare) -> int:
    """Each overview level against ``reduce`` applied level after level, from ``full``."""
    levels = overview_levels(path)
    expected = full
    for k, level in enumerate(levels):
        expected = reduce(expected)
        h, w = math.ceil(full.shape[0] / 2 ** (k + 1)), math.ceil(full.shape[1] / 2 ** (k + 1))
        assert level.shape == expected.shape == (h, w), f"level {k + 1}"
        assert np.count_nonzero(level) > level.size // 4, f"level {k + 1} is (mostly) zero-filled"
        compare(level, expected, k + 1)
    return len(levels)


def _equal(level: np.ndarray, expected: np.ndarray, k: int) -> None:
    differ = int((level != expected).sum())
    assert differ == 0, f"level {k}: {differ} of {level.size} pixels differ from the numpy reference"


@pytest.fixture(scope="module")
def rgb_labels(client, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ovr") / "out"
    return run(
        client, data / RGB, out, "multi_otsu", {"band": 1, "classes": 4}, chunk=[256, 300], formats=["cog"]
    )


def test_label_cog_overviews_are_the_mode_of_each_block(rgb_labels) -> None:
    cog = Path(rgb_labels.outputs["cog"])
    valid, errors, _ = cog_validate(str(cog), strict=True)
    assert valid, errors
    labels = labels_of(rgb_labels)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 255}
    with rasterio.open(cog) as ds:
        assert ds.tags()["OVERVIEW_RESAMPLING"] == "MODE" and ds.nodata == 255
    # 718 x 791 -> 359 x 396 (a partial column of blocks) -> 180 x 198 (a partial row)
    assert check_levels(cog, labels, lambda a: mode_reference(a, 255), _equal) == 2
    blocks = _padded_blocks(labels, -1.0)
    nodata_in_block = (blocks == 255).sum(axis=-1)
    assert ((nodata_in_block > 0) & (nodata_in_block < 4)).sum() > 500  # the collar edge is exercised
    ties = np.sort(np.stack([(blocks == v).sum(-1) for v in range(4)], -1), -1)
    assert ((ties[..., -1] == ties[..., -2]) & (ties[..., -1] > 0)).sum() > 500  # so are ties


@pytest.mark.parametrize("shape", [(64, 64), (63, 65), (1, 7)])
@pytest.mark.parametrize("uniform", [0.0, 0.9, 1.0])
def test_mode_reduction_matches_the_reference_on_mixed_and_uniform_blocks(shape, uniform) -> None:
    """The mode kernel takes a shortcut where a block's four pixels agree: on maps that are all
    mixed, 90 % uniform or all uniform, nodata blocks and odd sides included, it still equals
    the reference on every block."""
    from pipeline.io.overviews import reduce_2x2

    rng = np.random.default_rng(int(uniform * 10) + shape[0])
    blocky = np.kron(rng.integers(0, 4, (shape[0] // 2 + 1, shape[1] // 2 + 1)), np.ones((2, 2), int))
    noisy = rng.integers(0, 4, shape)
    keep = np.kron(rng.random((shape[0] // 2 + 1, shape[1] // 2 + 1)) < uniform, np.ones((2, 2), bool))
    labels = np.where(keep[: shape[0], : shape[1]], blocky[: shape[0], : shape[1]], noisy).astype(np.uint8)
    labels[rng.random(shape) < 0.05] = 255
    labels[:4, :4] = 255  # whole nodata blocks
    assert np.array_equal(reduce_2x2(labels, "MODE", 255), mode_reference(labels, 255))


def _rgb(data: Path) -> tuple[np.ndarray, np.ndarray, GeoRef]:
    with rasterio.open(data / RGB) as ds:
        band, mask = ds.read(1), ds.read_masks(1) == 0
        return band, mask, GeoRef(ds.crs.to_wkt(), tuple(ds.transform)[:6])


def _windows(a: np.ndarray, step: tuple[int, int] = (200, 300)):
    def gen():
        for y in range(0, a.shape[-2], step[0]):
            for x in range(0, a.shape[-1], step[1]):
                box = Box((y, x), (min(y + step[0], a.shape[-2]), min(x + step[1], a.shape[-1])))
                yield box, a[(..., *box.slices())]

    return gen


@pytest.mark.parametrize("nodata", [math.nan, -1.0])
def test_score_cog_overviews_are_block_means(data, tmp_path, nodata) -> None:
    band, mask, georef = _rgb(data)
    score = (band / 255.0).astype(np.float32)  # a probability-like float raster from real pixels
    score[mask] = nodata
    cog = write_cog(
        tmp_path / "score.tif",
        georef,
        score.shape,
        "float32",
        _windows(score),
        nodata=nodata,
        resampling="AVERAGE",
        blocksize=64,  # four levels: 359x396, 180x198, 90x99, 45x50
    )
    assert cog_validate(str(cog), strict=True)[0]

    def close(level: np.ndarray, expected: np.ndarray, k: int) -> None:
        np.testing.assert_allclose(
            level, expected, rtol=2e-6, atol=1e-7, equal_nan=True, err_msg=f"level {k}"
        )
        empty = np.isnan(level) if math.isnan(nodata) else level == nodata
        assert 0.1 < empty.mean() < 0.5  # nodata only where a whole block is nodata

    assert check_levels(cog, score, lambda a: mean_reference(a, nodata), close) == 4


def test_nearest_overviews_sample_the_top_left_pixel(data, tmp_path) -> None:
    band, _, georef = _rgb(data)
    cog = write_cog(
        tmp_path / "n.tif",
        georef,
        band.shape,
        "uint8",
        _windows(band),
        nodata=0,
        resampling="NEAREST",
        blocksize=64,
    )
    for k, level in enumerate(overview_levels(cog)):
        step = 2 ** (k + 1)
        assert np.array_equal(level, band[::step, ::step]), f"level {k + 1}"
        assert np.count_nonzero(level) > level.size // 4


def test_multiband_scores_get_overviews_per_band(data, tmp_path) -> None:
    with rasterio.open(data / RGB) as ds:
        rgb, georef = ds.read().astype(np.float32) / 255, GeoRef(ds.crs.to_wkt(), tuple(ds.transform)[:6])
    cog = write_cog(
        tmp_path / "p.tif",
        georef,
        rgb.shape[1:],
        "float32",
        _windows(rgb),
        nodata=None,
        resampling="AVERAGE",
        bands=3,
    )
    with rasterio.open(cog) as ds, rasterio.open(cog, overview_level=0) as ov:
        assert ds.count == 3 and ds.nodata is None
        level = ov.read()
    for b in range(3):  # no nodata declared: zeros are values and count in the mean
        np.testing.assert_allclose(level[b], mean_reference(rgb[b], math.nan), rtol=2e-6)


def test_zero_filled_overviews_fail_the_check(data, tmp_path) -> None:
    """The known failure: overviews built before the data was written stay zero; the check sees it."""
    band, _, georef = _rgb(data)
    stage, cog = tmp_path / "stage.tif", tmp_path / "zero.tif"
    profile = {
        "driver": "GTiff",
        "height": band.shape[0],
        "width": band.shape[1],
        "count": 1,
        "dtype": "uint8",
    }
    with rasterio.open(
        stage, "w", **profile, crs=georef.crs_wkt, transform=rasterio.Affine(*georef.transform)
    ) as d:
        d.build_overviews([2, 4], Resampling.nearest)  # on the empty raster
        d.write(band, 1)
    rasterio.shutil.copy(stage, cog, driver="COG", OVERVIEWS="FORCE_USE_EXISTING")
    assert overview_levels(cog)[0].max() == 0  # the failure is real
    with pytest.raises(AssertionError, match="zero-filled"):
        check_levels(cog, band, lambda a: a[::2, ::2], _equal)


def test_unknown_resampling_is_refused(tmp_path) -> None:
    georef = GeoRef("EPSG:32630", (10.0, 0.0, 0.0, 0.0, -10.0, 0.0))
    a = np.zeros((4, 4), np.uint8)
    with pytest.raises(ConfigError, match=r"'BILINEAR' is not one of .*MODE or NEAREST for labels"):
        write_cog(
            tmp_path / "x.tif", georef, a.shape, "uint8", _windows(a), nodata=None, resampling="BILINEAR"
        )  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())
