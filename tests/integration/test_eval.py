"""``segpipe eval`` / ``evaluate``: metrics as Dask reductions equal whole-array numpy; geometry checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from pipeline.errors import GeometryMismatchError
from pipeline.metrics.coco import coco_metrics, f1_scores, overlaps
from pipeline.metrics.surface import label_surface_metrics
from pipeline.runner.cli import main
from pipeline.runner.evaluate import EvalOptions, evaluate


def _write_like(path: Path, like: Path, data: np.ndarray, **changes: object) -> Path:
    with rasterio.open(like) as src:
        profile = src.profile | {"dtype": data.dtype.name, "count": 1, "nodata": None} | changes
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


def _otsu_water(data: Path, tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    label = data / "geo" / "Spain_7370579_LabelHand.tif"
    with rasterio.open(data / "geo" / "Spain_7370579_S2Hand.tif") as ds:
        nir = ds.read(8).astype(np.float64)
    with rasterio.open(label) as ds:
        ref = ds.read(1)
    pred = (nir < threshold_otsu(nir)).astype(np.uint8)
    pred[nir == 0] = 255  # S2 nodata: a prediction that is never right
    return _write_like(tmp_path / "pred.tif", label, pred), label, pred, ref


def test_cli_semantic_confusion_equals_numpy(client, data: Path, tmp_path: Path) -> None:
    pred_path, label, pred, ref = _otsu_water(data, tmp_path)
    addr = client.scheduler.address
    out = tmp_path / "eval"
    argv = [str(pred_path), str(label), "--out", str(out), "--ignore", "-1", "--chunk", "200"]
    assert main(["eval", *argv, "--scheduler", addr]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    keep = ref != -1
    classes = np.union1d(np.unique(ref[keep]), np.unique(pred[keep]))
    expected = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(expected, (np.searchsorted(classes, ref[keep]), np.searchsorted(classes, pred[keep])), 1)
    assert metrics["classes"] == classes.tolist()
    assert metrics["confusion_matrix"] == expected.tolist()
    tp, fp, fn = expected[1, 1], expected[:, 1].sum() - expected[1, 1], expected[1].sum() - expected[1, 1]
    assert metrics["per_class"]["1"]["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert metrics["per_class"]["1"]["iou"] > 0.5  # otsu on NIR finds the flood water
    assert (out / "per_class.csv").read_text().startswith("class,iou,dice,precision,recall,support")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"transform": rasterio.Affine(0.0001, 0, 0, 0, -0.0001, 0)}, "transform"),
        ({"crs": "EPSG:3857"}, "CRS"),
    ],
)
def test_geometry_mismatch_names_the_field(client, data: Path, tmp_path: Path, changes, field) -> None:
    label = data / "geo" / "Spain_7370579_LabelHand.tif"
    with rasterio.open(label) as ds:
        ref = ds.read(1)
    pred = _write_like(tmp_path / "bad.tif", label, (ref > 0).astype(np.uint8), **changes)
    with pytest.raises(GeometryMismatchError, match=rf"prediction .*bad\.tif.*: {field} .* reference's"):
        evaluate(pred, label, client=client)


def test_cli_reports_geometry_mismatch(data: Path, tmp_path: Path, capsys) -> None:
    label = data / "geo" / "Spain_7370579_LabelHand.tif"
    pred = _write_like(tmp_path / "bad.tif", label, np.zeros((512, 512), np.uint8), crs="EPSG:3857")
    assert main(["eval", str(pred), str(label)]) == 2
    assert "GeometryMismatchError" in capsys.readouterr().err


def test_instance_eval_equals_whole_array_kernels(client, data: Path, tmp_path: Path) -> None:
    ref_path = sorted((data / "images" / "bbbc039").glob("*_instances.tif"))[0]
    with rasterio.open(str(ref_path).replace("_instances.tif", ".tif")) as ds:
        image = ds.read(1).astype(np.float64)
    with rasterio.open(ref_path) as ds:
        ref = ds.read(1)
    mask = image > threshold_otsu(image)
    dist = ndi.distance_transform_edt(mask)
    pred = watershed(-dist, ndi.label((dist == ndi.maximum_filter(dist, size=9)) & mask)[0], mask=mask)
    pred_path = tmp_path / "pred.tif"
    with rasterio.open(pred_path, "w", driver="GTiff", width=pred.shape[1], height=pred.shape[0],
                       count=1, dtype="uint16") as dst:  # fmt: skip
        dst.write(pred.astype(np.uint16), 1)
    opts = EvalOptions(allow_missing_crs=True, chunk=160, max_dets=None, iou_thresholds=(0.5, 0.3))
    got = evaluate(pred_path, ref_path, kind="instance", client=client, options=opts)
    ov = overlaps(pred, ref)
    expected = coco_metrics(ov, max_dets=None)
    for k in ("AP", "AP50", "AP75", "AR"):
        assert got[k] == expected[k]
    assert got["f1"] == f1_scores(ov, (0.5, 0.3))
    assert got["n_ref"] == len(np.unique(ref)) - 1 and got["AP50"] > 0.2


def test_medical_eval_on_ct_labels(client, data: Path, tmp_path: Path) -> None:
    ref_path = data / "medical" / "totalseg_example_ct_sm_seg.nii.gz"
    img = sitk.ReadImage(str(ref_path))
    seg = sitk.GetArrayFromImage(img)
    pred = np.roll(seg, 2, axis=2)
    pred[pred == 1] = 0  # spleen missed entirely
    out = sitk.GetImageFromArray(pred)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(tmp_path / "pred.nii.gz"))
    got = evaluate(tmp_path / "pred.nii.gz", ref_path, kind="medical", client=client)
    spacing = img.GetSpacing()[::-1]
    expected = label_surface_metrics(pred, seg, spacing, labels=[2, 5])
    for label in (2, 5):
        row = got["per_label"][label]
        for k in ("hd", "hd95", "assd", "dice"):
            assert row[k] == pytest.approx(expected[label][k], abs=1e-9)
        assert row["ref_ml"] == pytest.approx((seg == label).sum() * np.prod(spacing) / 1000)
    assert got["per_label"][1]["pred_ml"] == 0 and np.isnan(got["per_label"][1]["hd95"])
    out.SetSpacing([s * 1.5 for s in img.GetSpacing()])
    sitk.WriteImage(out, str(tmp_path / "scaled.nii.gz"))
    with pytest.raises(GeometryMismatchError, match="spacing_zyx"):
        evaluate(tmp_path / "scaled.nii.gz", ref_path, kind="medical", client=client)


def test_cli_panoptic_with_segments_tables(client, data: Path, tmp_path: Path) -> None:
    label = data / "geo" / "Spain_7370579_LabelHand.tif"
    ref = np.zeros((512, 512), np.uint16)
    ref[:, :256], ref[10:50, 300:340], ref[100:140, 300:340] = 1, 2, 3  # stuff 1, things 2 and 3
    pred = ref.copy()
    pred[100:140, 300:340] = 0  # thing 3 missed
    pred[200:220, 400:420] = 4  # a thing on void: not a false positive
    pred[300:320, 100:120] = 5  # a thing that is not there: a false positive
    for name, arr in (("ref", ref), ("pred", pred)):
        _write_like(tmp_path / f"{name}.tif", label, arr)
        segs = [{"id": int(i), "category_id": 1 if i == 1 else 7} for i in np.unique(arr) if i]
        cats = [{"id": 1, "isthing": 0}, {"id": 7, "isthing": 1}]
        (tmp_path / f"{name}.json").write_text(json.dumps({"segments": segs, "categories": cats}))
    argv = ["eval", str(tmp_path / "pred.tif"), str(tmp_path / "ref.tif"), "--kind", "panoptic"]
    argv += ["--pred-segments", str(tmp_path / "pred.json"), "--ref-segments", str(tmp_path / "ref.json")]
    assert main([*argv, "--scheduler", client.scheduler.address, "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "metrics.json").read_text())
    stuff_iou = (512 * 256 - 400) / (512 * 256)
    assert res["per_class"]["1"] == pytest.approx(
        {"pq": stuff_iou, "sq": stuff_iou, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0}
    )
    # things: 2 matched (IoU 1), 3 missed (FN), 5 not there (FP), 4 on void (ignored)
    assert res["per_class"]["7"] == pytest.approx(
        {"pq": 0.5, "sq": 1.0, "rq": 0.5, "tp": 1, "fp": 1, "fn": 1}
    )
    assert res["all"]["pq"] == pytest.approx((stuff_iou + 0.5) / 2) and res["things"]["pq"] == 0.5


@pytest.mark.slow
def test_2gb_raster_confusion_with_1gib_workers(client, tmp_path: Path) -> None:
    from pipeline.testing import write_raster
    from tests.integration.test_memory import GIB, PeakRSS

    def classes(row: int, col: int, h: int, w: int) -> np.ndarray:  # 0, 1, 2 in diagonal bands
        rr, cc = np.arange(row, row + h)[:, None] // 97, np.arange(col, col + w)[None, :] // 89
        return ((rr + cc) % 3).astype(np.uint16)[None]

    # cheap to generate (the default smooth field took ~95 s of this test for 2 GiB)
    big = write_raster(tmp_path / "big.tif", (32768, 32768), dtype="uint16", block=1024, fill=classes)
    assert big.stat().st_size >= 2 * GIB
    assert {w["memory_limit"] for w in client.scheduler_info()["workers"].values()} == {GIB}
    pids = list(client.run(lambda: __import__("os").getpid()).values())
    with PeakRSS(pids) as rss:
        got = evaluate(big, big, client=client, options=EvalOptions(classes=(0, 1, 2)))
    assert max(rss.peak.values()) < GIB, rss.peak
    assert got["pixels"] == 32768 * 32768 and got["pixel_accuracy"] == 1.0
    assert all(got["per_class"][k]["iou"] == 1.0 for k in (0, 1, 2)), got["per_class"]
