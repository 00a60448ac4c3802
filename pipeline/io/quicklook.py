"""Quicklook PNG: the label map over the image, with a legend (bounded memory)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

MAX_SIDE = 1024
PALETTE = [
    "#00000000",
    "#1f77b4",
    "#2ca02c",
    "#d62728",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
]


def write_quicklook(
    path: Path,
    image_zarr: Path,
    labels_zarr: Path,
    classes: dict[int, str],
    *,
    title: str,
    nodata_label: int = 255,
    band: int = 0,
) -> Path:
    """Render a decimated view (middle axial slice for volumes) of ``band`` to ``path`` atomically."""
    image, labels = _decimated(image_zarr, labels_zarr, band)
    if labels.dtype != np.uint8:  # instance ids: colour by id, count them in the title
        n = len(np.unique(labels[labels != 0]))
        labels = np.where(labels == 0, 0, (labels.astype(np.int64) - 1) % (len(PALETTE) - 1) + 1)
        classes = {0: "background", **dict.fromkeys(range(1, len(PALETTE)), "")}
        title = f"{title} ({n} objects in view)"
    fig = Figure(figsize=(8, 8 * labels.shape[0] / max(labels.shape[1], 1) + 0.6))
    FigureCanvasAgg(fig)  # no pyplot: the caller's matplotlib backend is left alone
    ax = fig.subplots()
    ax.imshow(_stretch(image), cmap="gray", interpolation="nearest")
    shown = np.ma.masked_where((labels == 0) | (labels == nodata_label), labels)
    cmap = ListedColormap([PALETTE[i % len(PALETTE)] for i in range(max(classes) + 1)])
    ax.imshow(shown, cmap=cmap, vmin=0, vmax=max(classes), alpha=0.55, interpolation="nearest")
    handles = [
        Patch(color=PALETTE[i % len(PALETTE)], label=f"{i} {n}") for i, n in classes.items() if i != 0 and n
    ]

    handles.append(Patch(facecolor="none", edgecolor="black", label=f"{nodata_label} nodata"))
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    os.replace(tmp, path)
    return path


def _decimated(image_zarr: Path, labels_zarr: Path, band: int) -> tuple[np.ndarray, np.ndarray]:
    img = zarr.open_array(store=str(image_zarr), mode="r")
    lab = zarr.open_array(store=str(labels_zarr), mode="r")
    if lab.ndim == 3:  # volume: the middle axial slice
        z = lab.shape[0] // 2
        step = max(1, -(-max(lab.shape[1:]) // MAX_SIDE))
        return (
            np.asarray(img[0, z, ::step, ::step]) if img.ndim == 4 else np.asarray(img[z, ::step, ::step])
        ), np.asarray(lab[z, ::step, ::step])
    step = max(1, -(-max(lab.shape) // MAX_SIDE))
    return np.asarray(img[band, ::step, ::step]), np.asarray(lab[::step, ::step])


def _stretch(image: np.ndarray) -> np.ndarray:
    data = image.astype(np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros_like(data)
    lo, hi = np.percentile(finite, [2, 98])
    return np.clip((data - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
