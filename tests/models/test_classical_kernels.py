"""Fast tests of the classical kernels (no cluster): exactness against skimage, chunk
independence of the global fits, and the errors bad parameters give."""

from __future__ import annotations

from fractions import Fraction
from functools import reduce as fold
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import SimpleITK as sitk
from PIL import Image
from skimage import color, filters

import pipeline.models.classical  # noqa: F401  (registers the segmenters)
from pipeline.errors import ConfigError
from pipeline.models import ImageInfo, create_segmenter, describe
from pipeline.models.classical import autothreshold as auto
from pipeline.models.classical import histogram as hist
from pipeline.models.classical import li
from pipeline.models.classical.colour import range_labels, rgb_to_lab
from pipeline.models.classical.edges import defined_mask, gradient_magnitude
from pipeline.models.classical.indices import normalized_difference, resolve_roles
from pipeline.models.classical.kmeans import bin_colours, colour_codes, lightness_order, weighted_kmeans
from pipeline.models.classical.thresholds import box_mean

NEW = [
    "multi_otsu",
    "li",
    "yen",
    "triangle",
    "local",
    "index_threshold",
    "landcover_baseline",
    "colour_range",
    "kmeans_colour",
    "edges",
]
GREY = ImageInfo("raster", 1, "uint8")
S2_NAMES = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")


def core_values(block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]) -> np.ndarray:
    return block[0][core][valid[core]]


def split_reducer(values: np.ndarray, valid: np.ndarray, pieces: int) -> Any:
    """A reducer over ``pieces`` uneven row bands (no halo): what the engine does, in process."""
    n = values.shape[0]
    cuts = sorted({0, n, *(min(n, i * n // pieces + i % 3) for i in range(1, pieces))})
    bands = [slice(a, b) for a, b in pairwise(cuts)]
    whole = tuple(slice(None) for _ in valid.shape)

    def reduce(partial: Any, combine: Any) -> Any:
        return fold(combine, [partial(values[None, s], valid[s], whole) for s in bands])

    return reduce


@pytest.fixture(scope="module")
def images(data: Path) -> dict[str, np.ndarray]:
    with rasterio.open(data / "geo" / "Spain_7370579_S1Hand.tif") as ds:
        vv = ds.read(1)
    with rasterio.open(data / "geo" / "Spain_7370579_S2Hand.tif") as ds:
        b8 = ds.read(8)
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "medical" / "totalseg_example_ct_sm.nii.gz")))
    return {
        "coins": np.asarray(Image.open(data / "images" / "coins.png")),
        "cell": np.asarray(Image.open(data / "images" / "cell.png")),
        "ct": ct,
        "s1_vv": vv[~np.isnan(vv)].reshape(-1, 1),  # valid float values as a column
        "s2_b8": b8,
    }


# ---------------------------------------------------------------- histogram thresholds


@pytest.mark.parametrize("name", ["coins", "cell", "ct", "s1_vv", "s2_b8"])
def test_histogram_thresholds_equal_skimage_for_any_split(images, name) -> None:
    img = images[name]
    valid = np.ones(img.shape, bool)
    for pieces in (1, 3, 7):
        h = hist.fit_histogram(split_reducer(img, valid, pieces), core_values, 256, what="t")
        assert auto.otsu(h) == filters.threshold_otsu(img)
        assert auto.yen(h) == filters.threshold_yen(img)
        assert auto.triangle(h) == filters.threshold_triangle(img)
        np.testing.assert_array_equal(auto.multi_otsu(h, 3), filters.threshold_multiotsu(img, 3))
        if img.dtype.kind != "f":
            assert auto.li_integer(h) == filters.threshold_li(img)


def test_multi_otsu_needs_enough_values() -> None:
    h = hist.GlobalHistogram(np.array([5, 0, 7]), np.array([0, 1, 2]), 0, 2)
    with pytest.raises(ConfigError, match=r"classes 3: the image has only 2 distinct"):
        auto.multi_otsu(h, 3)


def test_constant_image_thresholds_are_its_value() -> None:
    img = np.full((4, 5), 7, np.uint8)
    h = hist.fit_histogram(split_reducer(img, np.ones(img.shape, bool), 2), core_values, 256, what="t")
    assert h.constant and auto.otsu(h) == auto.yen(h) == auto.triangle(h) == auto.li_integer(h) == 7


def test_all_nodata_fit_is_a_config_error() -> None:
    img = np.zeros((4, 4), np.uint8)
    with pytest.raises(ConfigError, match="no valid pixel"):
        hist.fit_histogram(split_reducer(img, np.zeros(img.shape, bool), 2), core_values, 256, what="yen")


# ---------------------------------------------------------------- Li on float data


def test_exact_sum_is_exact() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1e6, 5000), rng.normal(0, 1e-6, 5000), [5e-324, -1e300, 1e300, 0.0]])
    total = li.exact_sum(x)
    assert Fraction(total, 2**li.SCALE) == sum(Fraction(float(v)) for v in x)
    assert li.exact_sum(x[:3000]) + li.exact_sum(x[3000:]) == total  # chunk-additive, no rounding


def test_li_float_is_a_fixed_point_independent_of_the_split_and_near_skimage(images) -> None:
    vv = images["s1_vv"]
    valid = np.ones(vv.shape, bool)
    vmin = float(vv.min())
    results = {p: li.fit_li_float(split_reducer(vv, valid, p), core_values, vmin) for p in (1, 4, 9)}
    t = results[1]
    assert set(results.values()) == {t}
    assert abs(t - filters.threshold_li(vv)) < 1e-4  # skimage: float32 sums, looser stopping rule
    # the partition at t gives t back: a fixed point of Li's iteration
    step = li.li_step(li.split_sums(vv, t), vmin)
    assert np.count_nonzero(vv > step) == np.count_nonzero(vv > t)
    differing = np.count_nonzero((vv > t) != (vv > filters.threshold_li(vv)))
    assert differing < 1e-4 * vv.size


# ---------------------------------------------------------------- local thresholds


def test_box_mean_is_block_independent_and_differs_from_skimage_only_at_ties(images) -> None:
    img = images["cell"]
    whole = box_mean(img, 15)
    for x0 in (20, 77, 301):
        part = box_mean(img[:, x0:], 15)
        np.testing.assert_array_equal(part[:, 15:], whole[:, x0 + 15 :])
    sk = filters.threshold_local(img, 15, "mean")
    flips = (img > sk) != (img > whole)
    assert 0 < np.count_nonzero(flips) < 0.001 * img.size
    exact_mean = box_mean(img, 15)
    assert np.all(np.abs(img[flips] - exact_mean[flips]) < 1e-9)  # only pixels equal to their mean


@pytest.mark.parametrize(
    ("params", "halo"),
    [
        ({"block_size": 35}, 23),
        ({"block_size": 35, "sigma": 2.0}, 8),
        ({"block_size": 35, "method": "mean"}, 17),
        ({"block_size": 7, "method": "median", "smooth_sigma": 1.0}, 7),
    ],
)
def test_local_halo(params, halo) -> None:
    assert create_segmenter("local", params, GREY).halo == halo


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("local", {"block_size": -5}, r"block_size must be odd and >= 3 \(got -5\)"),
        ("local", {"block_size": 16}, r"block_size must be odd \(got 16\); use 15 or 17"),
        ("multi_otsu", {"classes": 1}, r"classes must be between 2 and 254 \(got 1\)"),
        ("multi_otsu", {"classes": 3, "class_names": ["a"]}, r"class_names has 1 names for 3 classes"),
        ("kmeans_colour", {"k": 1}, r"k must be between 2 and 254 \(got 1\)"),
        ("li", {"nbins": 1}, r"segmenter.params.nbins"),
        ("edges", {"operator": "canny"}, r"segmenter.params.operator"),
        ("index_threshold", {"index": "evi"}, r"segmenter.params.index"),
        (
            "colour_range",
            {"rules": [{"class_name": "x", "ranges": {"q": [0, 1]}}]},
            r"'q' is not a hsv channel",
        ),
        (
            "colour_range",
            {"rules": [{"class_name": "x", "ranges": {"s": [0.8, 0.2]}}]},
            r"only hue h may wrap",
        ),
    ],
)
def test_bad_parameters_are_config_errors_naming_them(name, params, message) -> None:
    info = ImageInfo("raster", 3, "uint8")
    with pytest.raises(ConfigError, match=message):
        create_segmenter(name, params, info)


# ---------------------------------------------------------------- indices


def test_normalized_difference_zero_denominator() -> None:
    a, b = np.array([0, 3, 1], np.uint8), np.array([0, 1, 3], np.uint8)
    np.testing.assert_array_equal(normalized_difference(a, b), [0.0, 0.5, -0.5])


def test_band_roles_from_sentinel2_descriptions_and_from_the_job() -> None:
    s2 = ImageInfo("raster", 13, "int16", S2_NAMES)
    assert resolve_roles(("green", "nir", "swir"), {}, s2) == {"green": 2, "nir": 7, "swir": 11}
    assert resolve_roles(("nir",), {"nir": "B8A"}, s2) == {"nir": 8}
    named = ImageInfo("raster", 3, "float32", ("Red", "NIR", "green"))
    assert resolve_roles(("red", "nir", "green"), {}, named) == {"red": 0, "nir": 1, "green": 2}


def test_missing_band_role_names_the_role_and_the_bands() -> None:
    landsat = ImageInfo("raster", 7, "int16", ("B1", "B2", "B3", "B4", "B5", "B6", "B7"))  # no B8A
    with pytest.raises(ConfigError) as err:
        create_segmenter("index_threshold", {"index": "ndwi"}, landsat)
    text = str(err.value)
    assert "band role 'green' is missing" in text and "'B7'" in text and "bands: {green: 4}" in text
    with pytest.raises(ConfigError, match=r"segmenter.params.bands.nir 9 is not in this image"):
        create_segmenter("index_threshold", {"index": "ndvi", "bands": {"red": 4, "nir": 9}}, landsat)


# ---------------------------------------------------------------- colour


def test_lab_matches_skimage_and_is_the_same_on_any_block(data) -> None:
    with rasterio.open(data / "landcover" / "chesapeake_m_3907833_nw_17_1_naip-new.tif") as ds:
        rgb = ds.read([1, 2, 3]) / 255.0
    whole = rgb_to_lab(rgb)
    np.testing.assert_allclose(whole, color.rgb2lab(rgb, channel_axis=0), atol=1e-9)
    for ys, xs in [
        (slice(0, 50), slice(0, 77)),
        (slice(13, 200), slice(5, 260)),
        (slice(7, 160), slice(100, 101)),
    ]:
        np.testing.assert_array_equal(rgb_to_lab(rgb[:, ys, xs]), whole[:, ys, xs])


def test_range_labels_first_rule_wins_and_hue_wraps() -> None:
    hsv = np.array([[[0.95, 0.05, 0.5, 0.5]], [[1, 1, 1, 0.1]], [[1, 1, 1, 1]]])
    rules = [(1, {0: (0.9, 0.1)}), (2, {1: (0.5, 1.0)}), (2, {2: (0.0, 0.5)})]
    valid = np.array([[True, True, True, False]])
    np.testing.assert_array_equal(range_labels(hsv, rules, valid), [[1, 1, 2, 255]])


# ---------------------------------------------------------------- k-means


def test_colour_codes_round_trip() -> None:
    rgb = np.array([[0.0, 1.0, 0.3], [0.5, 0.999, 0.0], [1.0, 0.0, 0.7]])
    codes = colour_codes(rgb, 16)
    np.testing.assert_allclose(bin_colours(codes, 16), rgb, atol=0.5 / 16)


def test_weighted_kmeans_finds_separated_clusters_and_orders_them_darkest_first() -> None:
    rng = np.random.default_rng(1)
    true = np.array([[0.9, 0.9, 0.9], [0.1, 0.1, 0.1], [0.5, 0.5, 0.5]])
    points = np.concatenate([c[:, None] + rng.normal(0, 0.01, (3, 200)) for c in true], axis=1)
    weights = rng.integers(1, 5, points.shape[1]).astype(float)
    centres = weighted_kmeans(points, weights, 3, seed=7, n_init=3, max_iter=50)
    again = weighted_kmeans(points, weights, 3, seed=7, n_init=3, max_iter=50)
    np.testing.assert_array_equal(centres, again)  # seeded: deterministic
    ordered = lightness_order(centres, points, weights, points[0])
    np.testing.assert_allclose(ordered, true[[1, 2, 0]], atol=0.01)


# ---------------------------------------------------------------- edges


@pytest.mark.parametrize("operator", ["sobel", "scharr", "prewitt"])
def test_gradient_magnitude_is_skimage_in_data_units(images, operator) -> None:
    ct = images["ct"]
    expected = getattr(filters, operator)(ct.astype(np.float64))
    np.testing.assert_array_equal(gradient_magnitude(ct, operator), expected)
    assert expected.max() > 100  # HU per voxel, not rescaled to [0, 1]


def test_defined_mask_keeps_image_edges_and_drops_pixels_near_nodata() -> None:
    valid = np.ones((6, 7), bool)
    valid[3, 5] = False
    defined = defined_mask(valid, 1)
    assert defined[0, 0] and defined[5, 0] and not defined[2, 4] and not defined[4, 6] and defined[0, 3]


def test_edges_halo_is_smoothing_radius_plus_one() -> None:
    assert create_segmenter("edges", {}, GREY).halo == 1
    assert create_segmenter("edges", {"smooth_sigma": 2.0}, GREY).halo == 9


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name", NEW)
def test_every_new_segmenter_is_described(name) -> None:
    info = describe(name)
    assert info["kind"] == "semantic" and info["summary"] and info["halo"]
    assert all(p["help"] for p in info["params"].values()), info["params"]


def test_unfitted_segmenters_refuse_to_run() -> None:
    seg = create_segmenter("yen", {}, GREY)
    with pytest.raises(ConfigError, match="must be fitted"):
        seg(np.zeros((1, 4, 4), np.uint8), np.ones((4, 4), bool))
    assert create_segmenter("edges", {"threshold": 3.0}, GREY).fit(lambda p, c: None).threshold == 3.0
