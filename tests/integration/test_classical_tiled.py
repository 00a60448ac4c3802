"""Acceptance (issue 3, semantic parts): tiled classical segmenters equal the whole-image result.

Every segmenter runs through the engine on the session cluster over three chunkings (uneven
ones included) of real shared data and is compared with the skimage/scipy function on the
full array, with the same globally fitted statistics: 0 differing pixels. The scoring tests
at the end measure the methods against the shared reference labels and print the figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import SimpleITK as sitk
from affine import Affine
from PIL import Image
from scipy import ndimage
from skimage import color, filters

from pipeline.models.classical.colour import rgb_to_lab
from pipeline.models.classical.kmeans import cluster_features, nearest_centre
from pipeline.models.classical.li import fit_li_float
from pipeline.models.classical.thresholds import box_mean
from tests.helpers import labels_of, run

CHUNKS_2D = [[128, 128], [100, 77], [64, 300]]
CHUNKS_3D = [[8, 32, 32], [7, 50, 61], [30, 20, 122]]
S2 = ("geo", "Spain_7370579_S2Hand.tif")
S1 = ("geo", "Spain_7370579_S1Hand.tif")
NAIP = ("landcover", "chesapeake_m_3907833_nw_17_1_naip-new.tif")
LANDSAT_RGB = ("geo", "RGB.byte.tif")
CT = ("medical", "totalseg_example_ct_sm.nii.gz")
ids2 = pytest.mark.parametrize("chunk", CHUNKS_2D, ids=lambda c: "x".join(map(str, c)))
ids3 = pytest.mark.parametrize("chunk", CHUNKS_3D, ids=lambda c: "x".join(map(str, c)))


# ---------------------------------------------------------------- data and references


@pytest.fixture(scope="module")
def pngs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """coins.png and cell.png as GeoTIFFs with a synthetic CRS (1 m pixels, EPSG:3857)."""
    out = tmp_path_factory.mktemp("png")
    paths = {}
    for name in ("coins", "cell"):
        arr = np.asarray(Image.open(data / "images" / f"{name}.png"))
        paths[name] = out / f"{name}.tif"
        profile = {"driver": "GTiff", "height": arr.shape[0], "width": arr.shape[1], "count": 1}
        profile |= {"dtype": arr.dtype, "crs": "EPSG:3857", "transform": Affine(1, 0, 5e5, 0, -1, 4e6)}
        with rasterio.open(paths[name], "w", **profile) as ds:
            ds.write(arr, 1)
    return paths


def raster(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All bands and rasterio's validity mask (NaN counts as nodata)."""
    with rasterio.open(path) as ds:
        values = ds.read()
        valid = ds.dataset_mask() > 0
    if values.dtype.kind == "f":
        valid &= ~np.isnan(values).any(axis=0)
    return values, valid


def ct(data: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(data.joinpath(*CT))))


def binary(above: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    out = above.astype(np.uint8)
    if valid is not None:
        out[~valid] = 255
    return out


def nd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    out = np.zeros(a.shape)
    np.divide(a - b, a + b, out=out, where=(a + b) != 0)
    return out


def tiled(client: Any, path: Path, tmp: Path, name: str, params: dict[str, Any], chunk: list[int]) -> Any:
    return run(client, path, tmp / "out", name, params, chunk=chunk)


def assert_same(result: Any, expected: np.ndarray) -> None:
    got = labels_of(result)
    assert got.shape == expected.shape
    assert np.count_nonzero(got != expected) == 0


# ---------------------------------------------------------------- global thresholds


@ids2
def test_multi_otsu_coins(client, pngs, tmp_path, chunk) -> None:
    result = tiled(client, pngs["coins"], tmp_path, "multi_otsu", {"classes": 3}, chunk)
    img = np.asarray(Image.open(pngs["coins"]))
    t = filters.threshold_multiotsu(img, classes=3)
    np.testing.assert_array_equal(result.segmenter.thresholds, t)
    assert_same(result, np.digitize(img, t).astype(np.uint8))


@ids3
def test_multi_otsu_ct_volume(client, data, tmp_path, chunk) -> None:
    result = tiled(client, data.joinpath(*CT), tmp_path, "multi_otsu", {"classes": 3}, chunk)
    v = ct(data)
    assert_same(result, np.digitize(v, filters.threshold_multiotsu(v, classes=3)).astype(np.uint8))


@ids2
def test_li_integer_cell_is_skimage_exact(client, pngs, tmp_path, chunk) -> None:
    result = tiled(client, pngs["cell"], tmp_path, "li", {}, chunk)
    img = np.asarray(Image.open(pngs["cell"]))
    t = filters.threshold_li(img)
    assert result.segmenter.threshold == t
    assert_same(result, binary(img > t))


def whole_reducer(values: np.ndarray, valid: np.ndarray) -> Any:
    core = tuple(slice(None) for _ in valid.shape)
    return lambda partial, combine: partial(values[None], valid, core)


@pytest.mark.parametrize("chunk", [[256, 256], [200, 150], [512, 100]], ids=lambda c: "x".join(map(str, c)))
def test_li_float_s1_fixed_point(client, data, tmp_path, chunk) -> None:
    """Float Li: the same exact threshold for every chunking and the whole array, near skimage's."""
    result = tiled(client, data.joinpath(*S1), tmp_path, "li", {"band": "VV"}, chunk)
    values, valid = raster(data.joinpath(*S1))
    vv = values[0]
    whole = fit_li_float(whole_reducer(vv, valid), lambda b, v, c: b[0][c][v[c]], float(vv[valid].min()))
    assert result.segmenter.threshold == whole
    assert abs(whole - filters.threshold_li(vv[valid])) < 1e-4
    assert_same(result, binary(vv > whole, valid))


@ids3
def test_yen_ct_volume(client, data, tmp_path, chunk) -> None:
    result = tiled(client, data.joinpath(*CT), tmp_path, "yen", {}, chunk)
    v = ct(data)
    assert_same(result, binary(v > filters.threshold_yen(v)))


@ids2
def test_yen_coins(client, pngs, tmp_path, chunk) -> None:
    result = tiled(client, pngs["coins"], tmp_path, "yen", {}, chunk)
    img = np.asarray(Image.open(pngs["coins"]))
    assert_same(result, binary(img > filters.threshold_yen(img)))


@ids2
def test_triangle_cell_below(client, pngs, tmp_path, chunk) -> None:
    result = tiled(client, pngs["cell"], tmp_path, "triangle", {"foreground": "below"}, chunk)
    img = np.asarray(Image.open(pngs["cell"]))
    assert_same(result, binary(img <= filters.threshold_triangle(img)))


@ids3
def test_triangle_smoothed_ct_volume(client, data, tmp_path, chunk) -> None:
    """Smoothing makes the CT float: triangle on the smoothed volume, halo = filter radius."""
    result = tiled(client, data.joinpath(*CT), tmp_path, "triangle", {"smooth_sigma": 1.0}, chunk)
    assert result.plan.grid.halo == (4, 4, 4)
    smooth = ndimage.gaussian_filter(ct(data).astype(np.float64), 1.0, truncate=4.0)
    assert_same(result, binary(smooth > filters.threshold_triangle(smooth)))


# ---------------------------------------------------------------- local thresholds and presets


@ids2
def test_local_gaussian_coins(client, pngs, tmp_path, chunk) -> None:
    result = tiled(client, pngs["coins"], tmp_path, "local", {"block_size": 35, "offset": -5}, chunk)
    assert result.plan.grid.halo == (23, 23)
    img = np.asarray(Image.open(pngs["coins"]))
    assert_same(result, binary(img > filters.threshold_local(img, 35, "gaussian", offset=-5)))


@ids2
def test_local_mean_cell(client, pngs, tmp_path, chunk) -> None:
    """Mean: exact box sums (skimage's running sum differs between a block and the image)."""
    result = tiled(client, pngs["cell"], tmp_path, "local", {"block_size": 25, "method": "mean"}, chunk)
    img = np.asarray(Image.open(pngs["cell"]))
    expected = binary(img > box_mean(img, 25))
    assert_same(result, expected)
    skimage_mean = binary(img > filters.threshold_local(img, 25, "mean"))
    assert np.count_nonzero(skimage_mean != expected) < 0.001 * img.size  # ties only, see unit tests


@ids3
def test_local_median_ct_volume(client, data, tmp_path, chunk) -> None:
    result = tiled(
        client, data.joinpath(*CT), tmp_path, "local", {"block_size": 3, "method": "median"}, chunk
    )
    v = ct(data)
    assert_same(result, binary(v > filters.threshold_local(v, 3, "median")))


CT_TISSUES = [(-np.inf, -950), (-950, -500), (-190, -30), (-30, 150), (150, np.inf)]


@ids3
def test_ct_tissues_preset(client, data, tmp_path, chunk) -> None:
    result = tiled(client, data.joinpath(*CT), tmp_path, "threshold", {"preset": "ct_tissues"}, chunk)
    v = ct(data)
    expected = np.zeros(v.shape, np.uint8)
    for cid, (lo, hi) in enumerate(CT_TISSUES, start=1):
        expected[(v >= lo) & (v < hi)] = cid
    assert_same(result, expected)
    assert set(np.unique(expected)) == {0, 1, 2, 3, 4, 5}
    assert result.segmenter.classes == {
        0: "background",
        1: "air",
        2: "lung",
        3: "fat",
        4: "soft_tissue",
        5: "bone",
    }


# ---------------------------------------------------------------- spectral indices


@ids2
def test_ndwi_otsu_sentinel2(client, data, tmp_path, chunk) -> None:
    """Band roles found in the band descriptions (B3, B8); Otsu fitted on the whole image."""
    result = tiled(client, data.joinpath(*S2), tmp_path, "index_threshold", {"index": "ndwi"}, chunk)
    bands, valid = raster(data.joinpath(*S2))
    ndwi = nd(bands[2], bands[7])
    t = filters.threshold_otsu(ndwi[valid])
    assert result.segmenter.threshold == t
    assert_same(result, binary(ndwi > t, valid))


@ids2
def test_ndvi_fixed_and_mndwi_yen_sentinel2(client, data, tmp_path, chunk) -> None:
    path = data.joinpath(*S2)
    bands, valid = raster(path)
    params = {"index": "ndvi", "threshold": 0.3, "bands": {"red": "B4", "nir": 8}}
    assert_same(
        tiled(client, path, tmp_path / "ndvi", "index_threshold", params, chunk),
        binary(nd(bands[7], bands[3]) > 0.3, valid),
    )
    mndwi = nd(bands[2], bands[11])
    result = tiled(
        client, path, tmp_path / "mndwi", "index_threshold", {"index": "mndwi", "threshold": "yen"}, chunk
    )
    assert_same(result, binary(mndwi > filters.threshold_yen(mndwi[valid]), valid))


NAIP_ROLES = {"red": 1, "green": 2, "nir": 4}
NAIP_LANDCOVER = {"bands": NAIP_ROLES, "water_ndwi": 0.2, "water_max_nir": 50, "vegetation_ndvi": -0.1}


def landcover_reference(naip: np.ndarray, water: float, veg: float, max_nir: float | None) -> np.ndarray:
    r, g, n = naip[0], naip[1], naip[3]
    out = np.full(r.shape, 3, np.uint8)
    out[nd(n, r) > veg] = 2
    w = nd(g, n) > water
    if max_nir is not None:
        w &= n <= max_nir
    out[w] = 1
    return out


@ids2
def test_landcover_baseline_naip(client, data, tmp_path, chunk) -> None:
    naip, _ = raster(data.joinpath(*NAIP))
    result = tiled(client, data.joinpath(*NAIP), tmp_path, "landcover_baseline", NAIP_LANDCOVER, chunk)
    assert_same(result, landcover_reference(naip, 0.2, -0.1, 50))
    fits = {"bands": NAIP_ROLES, "water_ndwi": "otsu", "vegetation_ndvi": "triangle"}
    result = tiled(client, data.joinpath(*NAIP), tmp_path / "fit", "landcover_baseline", fits, chunk)
    water = filters.threshold_otsu(nd(naip[1], naip[3]))
    veg = filters.threshold_triangle(nd(naip[3], naip[0]))
    assert result.segmenter.fitted == {"water_ndwi": water, "vegetation_ndvi": veg}
    assert_same(result, landcover_reference(naip, water, veg, None))


# ---------------------------------------------------------------- colour


def unit(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb.astype(np.float64) / 255.0, 0, 1)


@ids2
def test_colour_range_hsv_naip(client, data, tmp_path, chunk) -> None:
    rules = [
        {"class_name": "dark", "ranges": {"v": [0.0, 0.25]}},
        {"class_name": "green", "ranges": {"h": [0.17, 0.45], "s": [0.15, 1.0]}},
        {"class_name": "warm", "ranges": {"h": [0.9, 0.12]}},  # hue wraps through red
    ]
    result = tiled(client, data.joinpath(*NAIP), tmp_path, "colour_range", {"rules": rules}, chunk)
    naip, _ = raster(data.joinpath(*NAIP))
    h, s, v = color.rgb2hsv(unit(naip[:3]), channel_axis=0)
    expected = np.zeros(h.shape, np.uint8)
    expected[((h >= 0.9) | (h <= 0.12))] = 3
    expected[(h >= 0.17) & (h <= 0.45) & (s >= 0.15) & (s <= 1.0)] = 2
    expected[v <= 0.25] = 1
    assert_same(result, expected)
    assert len(np.unique(expected)) == 4


@ids2
def test_colour_range_lab_landsat_with_nodata(client, data, tmp_path, chunk) -> None:
    rules = [
        {"class_name": "water", "ranges": {"L": [0, 40], "b": [-100, 0]}},
        {"class_name": "bright", "ranges": {"L": [60, 100]}},
    ]
    path = data.joinpath(*LANDSAT_RGB)
    result = tiled(client, path, tmp_path, "colour_range", {"space": "lab", "rules": rules}, chunk)
    rgb, valid = raster(path)
    lab = rgb_to_lab(unit(rgb))
    np.testing.assert_allclose(lab, color.rgb2lab(unit(rgb), channel_axis=0), atol=1e-9)
    L, b = lab[0], lab[2]
    expected = np.zeros(L.shape, np.uint8)
    expected[(L >= 60) & (L <= 100)] = 2
    expected[(L >= 0) & (L <= 40) & (b >= -100) & (b <= 0)] = 1
    expected[~valid] = 255
    assert_same(result, expected)


@pytest.mark.parametrize("space", ["lab", "hsv"])
def test_kmeans_colour_naip(client, data, tmp_path, space) -> None:
    """Centres fitted once: the same for every chunking (and one whole-image chunk)."""
    path = data.joinpath(*NAIP)
    params = {"k": 4, "space": space, "seed": 3}
    results = [
        tiled(client, path, tmp_path / str(i), "kmeans_colour", params, c)
        for i, c in enumerate([[260, 260], *CHUNKS_2D])
    ]
    centres = results[0].segmenter.centres
    naip, _ = raster(path)
    expected = nearest_centre(cluster_features(unit(naip[:3]), space), centres).astype(np.uint8)
    for r in results:
        np.testing.assert_array_equal(r.segmenter.centres, centres)
        assert_same(r, expected)
    lightness = [rgb_to_lab(unit(naip[:3]))[0][expected == c].mean() for c in range(4)]
    assert lightness == sorted(lightness)  # darkest cluster first


# ---------------------------------------------------------------- edges


@ids2
def test_edges_scharr_smoothed_otsu_sentinel2(client, data, tmp_path, chunk) -> None:
    params = {"band": "B8", "operator": "scharr", "smooth_sigma": 1.0}
    result = tiled(client, data.joinpath(*S2), tmp_path, "edges", params, chunk)
    assert result.plan.grid.halo == (5, 5)
    bands, valid = raster(data.joinpath(*S2))
    smooth = ndimage.gaussian_filter(bands[7].astype(np.float64), 1.0, truncate=4.0)
    mag = filters.scharr(smooth)
    defined = ndimage.minimum_filter(valid.astype(np.uint8), size=11, mode="constant", cval=1).astype(bool)
    t = filters.threshold_otsu(mag[defined])
    assert result.segmenter.threshold == t
    assert_same(result, binary((mag > t) & defined, valid))


@ids3
def test_edges_sobel_ct_volume(client, data, tmp_path, chunk) -> None:
    result = tiled(client, data.joinpath(*CT), tmp_path, "edges", {}, chunk)
    mag = filters.sobel(ct(data).astype(np.float64))
    assert_same(result, binary(mag > filters.threshold_otsu(mag)))


@ids2
def test_edges_prewitt_fixed_coins(client, pngs, tmp_path, chunk) -> None:
    result = tiled(
        client, pngs["coins"], tmp_path, "edges", {"operator": "prewitt", "threshold": 20.0}, chunk
    )
    img = np.asarray(Image.open(pngs["coins"])).astype(np.float64)
    assert_same(result, binary(filters.prewitt(img) > 20.0))


# ---------------------------------------------------------------- scores against reference labels


def iou(pred: np.ndarray, truth: np.ndarray, keep: np.ndarray) -> float:
    p, t = pred[keep], truth[keep]
    return float((p & t).sum() / (p | t).sum())


def test_score_sen1floods11_water_index_vs_single_band_otsu(client, data, tmp_path) -> None:
    path = data.joinpath(*S2)
    with rasterio.open(data / "geo" / "Spain_7370579_LabelHand.tif") as ds:
        label = ds.read(1)
    keep = label != -1
    scores = {}
    runs = {
        "mndwi_otsu": ("index_threshold", {"index": "mndwi"}),
        "ndwi_otsu": ("index_threshold", {"index": "ndwi"}),
        "b8_otsu_below": ("otsu", {"band": "B8", "foreground": "below"}),
    }
    for key, (name, params) in runs.items():
        pred = labels_of(run(client, path, tmp_path / key, name, params, chunk=[192, 160]))
        scores[key] = iou(pred == 1, label == 1, keep & (pred != 255))
    print(f"\nSen1Floods11 Spain_7370579 water IoU vs LabelHand: {json.dumps(scores)}")
    assert scores["mndwi_otsu"] > 0.65 and scores["ndwi_otsu"] > 0.6
    assert scores["mndwi_otsu"] > scores["b8_otsu_below"]


#: Chesapeake lc class -> baseline class (1 water, 2 vegetation, 3 bare/built).
CHESAPEAKE_TO_BASELINE = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 3}


def test_score_chesapeake_landcover_baseline(client, data, tmp_path) -> None:
    pred = labels_of(
        run(
            client,
            data.joinpath(*NAIP),
            tmp_path / "out",
            "landcover_baseline",
            NAIP_LANDCOVER,
            chunk=[100, 77],
        )
    )
    with rasterio.open(data / "landcover" / "chesapeake_m_3907833_nw_17_1_lc.tif") as ds:
        lc = ds.read(1)
    truth = np.zeros(lc.shape, np.uint8)
    for src, dst in CHESAPEAKE_TO_BASELINE.items():
        truth[lc == src] = dst
    keep = truth > 0
    scores = {
        name: iou(pred == c, truth == c, keep)
        for c, name in {1: "water", 2: "vegetation", 3: "bare_built"}.items()
    }
    print(f"\nChesapeake landcover baseline IoU per class: {json.dumps(scores)}")
    assert scores["water"] > 0.15 and scores["vegetation"] > 0.85 and scores["bare_built"] > 0.35


BONE_PREFIXES = (
    "vertebrae",
    "rib",
    "sternum",
    "costal_cartilages",
    "hip",
    "sacrum",
    "femur",
    "humerus",
    "scapula",
    "clavicula",
    "skull",
)


def test_score_ct_bone_dice(client, data, tmp_path) -> None:
    pred = labels_of(
        run(
            client,
            data.joinpath(*CT),
            tmp_path / "out",
            "threshold",
            {"preset": "ct_tissues"},
            chunk=[16, 64, 64],
        )
    )
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "medical" / "totalseg_example_ct_sm_seg.nii.gz")))
    names = json.loads((data / "medical" / "totalseg_example_ct_sm_seg.labels.json").read_text())["labels"]
    bone_ids = [int(i) for i, n in names.items() if n.startswith(BONE_PREFIXES)]
    truth, bone = np.isin(seg, bone_ids), pred == 5
    dice = float(2 * (truth & bone).sum() / (truth.sum() + bone.sum()))
    print(f"\nTotalSegmentator CT: Dice of HU bone (>= 150 HU) vs {len(bone_ids)} bone labels: {dice:.3f}")
    assert dice > 0.5
