"""Medical surface metrics in mm: HD95, average symmetric surface distance, Hausdorff; volumes in mL.

Surfaces are the mask voxels removed by one binary erosion (face connectivity; voxels on the
array border count as surface), distances are Euclidean between voxel centres in mm
(``distance_transform_edt(..., sampling=spacing_zyx)``), as MONAI's
``compute_hausdorff_distance`` and ``compute_average_surface_distance`` define them:
HD95 is the larger of the two directed 95th percentiles, ASSD the mean of both directed sets.
These gather the masks (cropped to the bounding box of the label in either image).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` that have a background face neighbour (outside the array is background)."""
    m = mask.astype(bool)
    return m & ~ndi.binary_erosion(m, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each predicted surface voxel to the reference surface, and back."""
    sp, sr = surface(pred), surface(ref)
    to_ref = ndi.distance_transform_edt(~sr, sampling=spacing)
    to_pred = ndi.distance_transform_edt(~sp, sampling=spacing)
    return np.asarray(to_ref[sp]), np.asarray(to_pred[sr])


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], *, percentile: float = 95
) -> dict[str, float]:
    """Dice, HD (max), HD``percentile`` and ASSD (mm) of two binary masks.

    Distances are NaN when either mask is empty (Dice is 1.0 when both are).
    """
    p, r = crop_to_union(pred.astype(bool), ref.astype(bool))
    inter, total = int((p & r).sum()), int(p.sum() + r.sum())
    dice = 2 * inter / total if total else 1.0
    if not p.any() or not r.any():
        nan = float("nan")
        return {"dice": dice, "hd": nan, f"hd{percentile:g}": nan, "assd": nan}
    a, b = surface_distances(p, r, spacing)
    return {
        "dice": dice,
        "hd": float(max(a.max(), b.max())),
        f"hd{percentile:g}": float(max(np.percentile(a, percentile), np.percentile(b, percentile))),
        "assd": float(np.concatenate([a, b]).mean()),
    }


def crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union, padded by one background voxel.

    The padding stands in for the array border, so surfaces and distances are unchanged.
    """
    either = pred | ref
    if not either.any():
        return pred, ref
    idx = np.nonzero(either)
    sl = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    return np.pad(pred[sl], 1), np.pad(ref[sl], 1)


def label_surface_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    *,
    labels: Iterable[int] | None = None,
    percentile: float = 95,
) -> dict[int, dict[str, float]]:
    """:func:`surface_metrics` for every label (default: every non-zero value in either image)."""
    if labels is None:
        labels = np.union1d(np.unique(pred), np.unique(ref))
    return {
        int(k): surface_metrics(pred == k, ref == k, spacing, percentile=percentile) for k in labels if k != 0
    }


def volumes_ml(
    labels: np.ndarray, pred_voxels: np.ndarray, ref_voxels: np.ndarray, voxel_mm3: float
) -> dict[int, dict[str, Any]]:
    """Volume per label in mL in prediction and reference, and prediction minus reference.

    ``*_voxels`` are voxel counts aligned with ``labels`` (chunk-additive: from the confusion
    matrix's column and row sums).
    """
    out = {}
    for k, p, r in zip(labels.tolist(), pred_voxels.tolist(), ref_voxels.tolist(), strict=True):
        pv, rv = p * voxel_mm3 / 1000.0, r * voxel_mm3 / 1000.0
        out[int(k)] = {
            "pred_ml": pv,
            "ref_ml": rv,
            "diff_ml": pv - rv,
            "rel_diff": (pv - rv) / rv if rv else float("nan"),
        }
    return out
