"""The PNG figures of ``segpipe report``; each returns its path.

Built on :class:`matplotlib.figure.Figure` (Agg canvas) without pyplot, so importing this
module leaves a notebook's backend and pyplot state alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

#: Tiles annotated with their value on the map when there are at most this many.
MAX_ANNOTATED = 64
LABEL_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "lw": 0}


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight", format="png")
    return path


def bar_figure(path: Path, values: dict[str, float], xlabel: str, ylabel: str) -> Path:
    fig = Figure(figsize=(7, 0.8 + 0.32 * max(len(values), 1)))
    ax = fig.subplots()
    keys = list(values)[::-1]
    ax.barh(keys, [values[k] for k in keys], color="#1f77b4")
    for i, k in enumerate(keys):
        ax.text(values[k], i, f" {values[k]:.3g}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.margins(x=0.15)
    return _save(fig, path)


def grouped_bars(path: Path, scores: dict[str, dict[str, float]]) -> Path:
    metrics = list(scores)
    classes = list(next(iter(scores.values())))
    fig = Figure(figsize=(max(5, 1.2 * len(classes) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    x = np.arange(len(classes))
    for i, m in enumerate(metrics):
        ax.bar(x + i * width, [scores[m][c] for c in classes], width, label=m)
    ax.set_xticks(x + width * (len(metrics) - 1) / 2, classes, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.legend()
    return _save(fig, path)


def confusion_figure(path: Path, matrix: np.ndarray, labels: list[str]) -> Path:
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = 2.5 + 0.6 * len(labels)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(labels) <= 12:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                f"{int(v)}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    fig.colorbar(im, ax=ax, label="fraction of reference row")
    return _save(fig, path)


def tile_map_figure(
    path: Path,
    tiles: pd.DataFrame,
    label: str,
    values: pd.Series,
    background: np.ndarray | None,
    z: int | None,
) -> Path:
    """Tile write boxes over ``background``, coloured by ``values`` (scores in [0, 1] or seconds)."""
    starts = np.array(tiles["start"].tolist(), dtype=np.int64)
    stops = np.array(tiles["stop"].tolist(), dtype=np.int64)
    keep = np.ones(len(tiles), bool) if z is None else (starts[:, 0] <= z) & (z < stops[:, 0])
    starts, stops = starts[keep, -2:], stops[keep, -2:]
    shown = values.to_numpy(np.float64)[keep]
    height, width = int(stops[:, 0].max()), int(stops[:, 1].max())
    fig = Figure(figsize=(8, 0.8 + 8 * height / max(width, 1)))
    ax = fig.subplots()
    if background is not None:
        ax.imshow(_stretch(background), cmap="gray", extent=(0, width, height, 0), interpolation="nearest")
    score = label != "seconds"
    cmap = matplotlib.colormaps["RdYlGn" if score else "viridis"]
    finite = shown[np.isfinite(shown)]
    lo, hi = (0.0, 1.0) if score or not finite.size else (float(finite.min()), float(finite.max()))
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
    for (y0, x0), (y1, x1), v in zip(starts, stops, shown, strict=True):
        colour = cmap(norm(v)) if np.isfinite(v) else (0.5, 0.5, 0.5, 1.0)
        ax.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=colour, alpha=0.4, edgecolor=colour, lw=1.5)
        )
        if len(shown) <= MAX_ANNOTATED:
            text = f"{v:.3g}" if np.isfinite(v) else "n/a"
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, text, ha="center", va="center", fontsize=7, bbox=LABEL_BOX)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label, shrink=0.8)
    ax.set_title(
        f"tiles coloured by {label} (grey: no score)" if score else "tiles coloured by seconds", fontsize=10
    )
    return _save(fig, path)


def _stretch(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image)
    lo, hi = np.percentile(finite, [2, 98])
    return np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
