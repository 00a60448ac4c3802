"""COCO AP/AP50/AP75/AR equal pycocotools' on hand-made label maps and BBBC039 predictions."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from pipeline.metrics.coco import coco_summary, evaluate_image, f1_scores, overlaps


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def pycoco(
    images: list[tuple[np.ndarray, np.ndarray, dict[int, float] | None]], max_dets: int = 100
) -> dict[str, float]:
    """pycocotools' segm AP/AP50/AP75/AR for (pred, ref, scores) label maps, ids in ascending order."""
    gts, dts, imgs = [], [], []
    for img_id, (pred, ref, scores) in enumerate(images, start=1):
        imgs.append({"id": img_id, "height": ref.shape[0], "width": ref.shape[1]})
        for i in np.unique(ref[ref != 0]):
            m = ref == i
            gts.append(
                {
                    "id": len(gts) + 1,
                    "image_id": img_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": _rle(m),
                    "area": int(m.sum()),
                    "bbox": list(mask_utils.toBbox(_rle(m))),
                }
            )
        for i in np.unique(pred[pred != 0]):
            score = 1.0 if scores is None else scores[int(i)]
            dts.append(
                {"image_id": img_id, "category_id": 1, "segmentation": _rle(pred == i), "score": score}
            )
    gt = COCO()
    gt.dataset = {"images": imgs, "annotations": gts, "categories": [{"id": 1, "name": "obj"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dts) if dts else COCO()
        ev = COCOeval(gt, dt, "segm")
        ev.params.maxDets = [1, 10, 100] if max_dets == 100 else [max_dets]
        ev.evaluate()
        ev.accumulate()
        if max_dets == 100:
            ev.summarize()
            return {"AP": ev.stats[0], "AP50": ev.stats[1], "AP75": ev.stats[2], "AR": ev.stats[8]}
    # summarize() hard-codes maxDets=100 for stats[0]; read the accumulated arrays instead
    prec, rec = ev.eval["precision"][:, :, :, 0, -1], ev.eval["recall"][:, :, 0, -1]
    return {
        "AP": prec[prec > -1].mean(),
        "AP50": prec[0][prec[0] > -1].mean(),
        "AP75": prec[5][prec[5] > -1].mean(),
        "AR": rec[rec > -1].mean(),
    }


def ours(images: list[tuple[np.ndarray, np.ndarray, dict[int, float] | None]], max_dets: int = 100) -> dict:
    evals = [evaluate_image(overlaps(p, r), s, max_dets=max_dets) for p, r, s in images]
    return coco_summary(evals)


def _close(a: dict, b: dict) -> None:
    for k in ("AP", "AP50", "AP75", "AR"):
        assert a[k] == pytest.approx(b[k], abs=1e-6), (k, a, b)


def _squares() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((40, 40), np.int32)
    ref[2:12, 2:12] = 1
    ref[2:12, 20:30] = 2
    ref[20:30, 2:12] = 3
    ref[25:35, 25:35] = 7
    pred = np.zeros_like(ref)
    pred[2:12, 3:12] = 4  # IoU 0.9 with 1
    pred[2:12, 23:30] = 2  # IoU 0.7 with 2
    pred[20:25, 2:12] = 9  # IoU 0.5 with 3
    pred[36:40, 0:4] = 5  # false positive
    pred[25:35, 25:31] = 6  # IoU 0.6 with 7
    pred[25:35, 31:35] = 8  # second half of 7 (IoU 0.4)
    return pred, ref


@pytest.mark.parametrize(
    "scores",
    [
        None,
        {2: 0.9, 4: 0.3, 5: 0.95, 6: 0.5, 8: 0.6, 9: 0.8},
        {2: 0.5, 4: 0.5, 5: 0.2, 6: 0.5, 8: 0.5, 9: 0.1},
    ],
)
def test_hand_made_equal_pycocotools(scores: dict[int, float] | None) -> None:
    pred, ref = _squares()
    _close(ours([(pred, ref, scores)]), pycoco([(pred, ref, scores)]))


def test_max_dets_cut_and_several_images() -> None:
    pred, ref = _squares()
    scores = {2: 0.9, 4: 0.3, 5: 0.95, 6: 0.5, 8: 0.6, 9: 0.8}
    images = [(pred, ref, scores), (ref, ref, None), (np.zeros_like(ref), ref, None)]
    for md in (2, 3, 100):
        _close(ours(images, md), pycoco(images, md))


def test_no_predictions_and_perfect() -> None:
    _, ref = _squares()
    res = ours([(np.zeros_like(ref), ref, None)])
    assert res["AP"] == 0 and res["AR"] == 0
    res = ours([(ref, ref, None)])
    assert res["AP"] == pytest.approx(1.0) and res["AR"] == 1.0


def test_f1_one_to_one() -> None:
    pred, ref = _squares()
    f1 = f1_scores(overlaps(pred, ref), (0.5, 0.75, 0.3))
    assert (f1["0.5"]["tp"], f1["0.5"]["fp"], f1["0.5"]["fn"]) == (4, 2, 0)
    assert (f1["0.75"]["tp"], f1["0.75"]["fp"], f1["0.75"]["fn"]) == (1, 5, 3)
    assert f1["0.3"]["tp"] == 4  # 8 also overlaps 7 at 0.4, but 7 is taken: one-to-one
    assert f1["0.5"]["f1"] == pytest.approx(2 * 4 / (2 * 4 + 2))


def _bbbc(data: Path) -> list[tuple[np.ndarray, np.ndarray, dict[int, float]]]:
    out = []
    for path in sorted((data / "images" / "bbbc039").glob("*_instances.tif")):
        ref = tifffile.imread(path).astype(np.int64)
        image = tifffile.imread(str(path).replace("_instances.tif", ".tif")).astype(np.float64)
        mask = image > threshold_otsu(image)
        dist = ndi.distance_transform_edt(mask)
        markers, _ = ndi.label((dist == ndi.maximum_filter(dist, size=9)) & mask)
        pred = watershed(-dist, markers, mask=mask)
        ids = np.unique(pred[pred != 0])
        sizes = ndi.sum_labels(np.ones_like(pred), pred, ids)
        rng = np.random.default_rng(0)
        scores = {
            int(i): float(np.round(rng.uniform(0.1, 1.0), 3) if s > 50 else 0.05)
            for i, s in zip(ids, sizes, strict=True)
        }
        out.append((pred, ref, scores))
    return out


def test_bbbc039_watershed_equals_pycocotools(data: Path) -> None:
    images = _bbbc(data)
    assert len(images) == 2
    for img in images:
        _close(ours([img]), pycoco([img]))
        _close(ours([img], 1000), pycoco([img], 1000))
        _close(ours([(img[0], img[1], None)], 1000), pycoco([(img[0], img[1], None)], 1000))
    _close(ours(images, 1000), pycoco(images, 1000))
