"""HD95, ASSD and Hausdorff in mm equal a SimpleITK distance-map reference on the shared labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.metrics.surface import label_surface_metrics, surface_metrics, volumes_ml


def sitk_reference(pred: np.ndarray, ref: np.ndarray, like: sitk.Image) -> dict[str, float]:
    """Surface distances from SimpleITK alone: face-connected contours (outside the image is
    background: padded), a Maurer distance map in mm to each contour, read at the other's."""
    maps, contours = [], []
    for arr in (pred, ref):
        img = sitk.GetImageFromArray(arr.astype(np.uint8))
        img.CopyInformation(like)
        padded = sitk.ConstantPad(img, [1, 1, 1], [1, 1, 1], 0)
        contour = sitk.BinaryContour(padded, fullyConnected=False, backgroundValue=0, foregroundValue=1)
        dist = sitk.SignedMaurerDistanceMap(
            contour, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
        contours.append(sitk.GetArrayFromImage(contour).astype(bool))
        maps.append(np.maximum(sitk.GetArrayFromImage(dist).astype(np.float64), 0))  # 0 on the contour
    a, b = maps[1][contours[0]], maps[0][contours[1]]
    return {
        "hd": max(a.max(), b.max()),
        "hd95": max(np.percentile(a, 95), np.percentile(b, 95)),
        "assd": np.concatenate([a, b]).mean(),
    }


def _check(ours: dict[str, float], ref: dict[str, float]) -> None:
    for k in ("hd", "hd95", "assd"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-3), (k, ours, ref)


def _load(path: Path) -> tuple[np.ndarray, sitk.Image, tuple[float, float, float]]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img, img.GetSpacing()[::-1]


def test_brain_lesion_dilated_and_shifted(data: Path) -> None:
    arr, img, spacing = _load(data / "medical" / "brain1_label.nrrd")
    ref = arr == 1
    dilated = sitk.GetArrayFromImage(
        sitk.BinaryDilate(sitk.GetImageFromArray(ref.astype(np.uint8)), [2, 1, 0])
    )
    pred = np.roll(dilated.astype(bool), (1, 2), axis=(0, 2))  # one 6.5 mm slice, two columns
    ours = surface_metrics(pred, ref, spacing)
    _check(ours, sitk_reference(pred, ref, img))
    assert ours["hd"] > ours["hd95"] > ours["assd"] > 0


def test_ct_labels_eroded_and_shifted(data: Path) -> None:
    seg, img, spacing = _load(data / "medical" / "totalseg_example_ct_sm_seg.nii.gz")
    liver = sitk.BinaryErode(sitk.GetImageFromArray((seg == 5).astype(np.uint8)), [1, 1, 1])
    pred = np.roll(seg, 1, axis=2)
    pred[pred == 5] = 0
    pred[np.roll(sitk.GetArrayFromImage(liver), 3, axis=2).astype(bool)] = 5
    got = label_surface_metrics(pred, seg, spacing, labels=[1, 2, 5])
    for label in (1, 2, 5):
        _check(got[label], sitk_reference(pred == label, seg == label, img))
    assert got[5]["hd95"] > 3.0  # the shift is 9 mm


def test_empty_and_identical_masks() -> None:
    a = np.zeros((4, 5, 6), bool)
    a[1:3, 1:4, 2:5] = True
    same = surface_metrics(a, a, (2.0, 1.0, 1.0))
    assert same == {"dice": 1.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0}
    empty = surface_metrics(np.zeros_like(a), a, (1.0, 1.0, 1.0))
    assert empty["dice"] == 0.0 and np.isnan(empty["hd95"])


def test_volumes_ml() -> None:
    v = volumes_ml(np.array([1, 2]), np.array([1000, 0]), np.array([500, 10]), voxel_mm3=2.0)
    assert v[1] == {"pred_ml": 2.0, "ref_ml": 1.0, "diff_ml": 1.0, "rel_diff": 1.0}
    assert v[2]["diff_ml"] == pytest.approx(-0.02)
