"""K-means colour clustering with centres fitted once on the whole image, applied per chunk.

Fit (one pass through the engine's reducer): every chunk returns the histogram of its valid
pixels' colours quantised to ``levels`` steps per RGB channel, and the engine adds them up
into the whole image's colour histogram. That is the deterministic sample of the image:
it is the same for every chunking, where a random sample drawn per chunk would change
with the chunk boundaries (the reducer does not know where a chunk is) and so would the
centres. Weighted k-means (k-means++ seeded with ``seed``, ``n_init`` restarts, Lloyd
iterations) runs on the occupied bins' centre colours in the chosen space, weighted by
their pixel counts: k-means of all the image's pixels at 1/``levels`` colour resolution.

Apply: each pixel's own colour goes to the nearest centre (ties to the lower id). Classes
are ordered by lightness, darkest first: the mean CIE L* of the pixels of each cluster.
In ``hsv`` the features are the HSV cone ``(s cos 2 pi h, s sin 2 pi h, v)``, so hue wraps.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from pipeline.errors import ConfigError
from pipeline.models.base import Reducer, Segmenter, register
from pipeline.models.classical import histogram as hist
from pipeline.models.classical.colour import ColourParams, ColourSegmenter, convert, rgb_to_lab, unit_rgb


def cluster_features(rgb: np.ndarray, space: str) -> np.ndarray:
    """Pure kernel: ``(3, ...)`` RGB in [0, 1] to clustering features (HSV as its cone)."""
    values = np.ascontiguousarray(convert(rgb, space))
    if space != "hsv":
        return values
    angle = np.ascontiguousarray(2.0 * np.pi * values[0])
    return np.stack([values[1] * np.cos(angle), values[1] * np.sin(angle), values[2]])


def squared_distances(features: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Pure kernel: ``(k, ...)`` squared distances of ``(3, ...)`` features to ``(k, 3)`` centres."""
    return np.stack([sum((features[c] - centre[c]) ** 2 for c in range(len(centre))) for centre in centres])


def nearest_centre(features: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Pure kernel: index of the nearest centre per pixel (the lower index on ties)."""
    return np.argmin(squared_distances(features, centres), axis=0)


def colour_codes(rgb: np.ndarray, levels: int) -> np.ndarray:
    """Pure kernel: quantised colour bin ``(r * levels + g) * levels + b`` of each pixel."""
    q = np.minimum((rgb * levels).astype(np.int64), levels - 1)
    return (q[0] * levels + q[1]) * levels + q[2]


def bin_colours(codes: np.ndarray, levels: int) -> np.ndarray:
    """Pure kernel: ``(3, n)`` RGB centre of each colour bin."""
    q = np.stack([codes // (levels * levels), (codes // levels) % levels, codes % levels])
    return (q + 0.5) / levels


def kmeans_plus_plus(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted k-means++ seeding on ``(3, n)`` points: ``(k, 3)`` centres."""
    first = rng.choice(points.shape[1], p=weights / weights.sum())
    centres = [points[:, first]]
    d2 = squared_distances(points, np.asarray(centres))[0]
    for _ in range(1, k):
        p = weights * d2
        pick = rng.choice(points.shape[1], p=p / p.sum())
        centres.append(points[:, pick])
        d2 = np.minimum(d2, squared_distances(points, points[:, pick][None])[0])
    return np.asarray(centres)


def lloyd(
    points: np.ndarray, weights: np.ndarray, centres: np.ndarray, max_iter: int
) -> tuple[np.ndarray, float]:
    """Weighted Lloyd iterations until the centres stop moving: ``(centres, inertia)``."""
    for _ in range(max_iter):
        assign = nearest_centre(points, centres)
        moved = centres.copy()
        for j in range(len(centres)):
            w = weights[assign == j]
            if w.sum() > 0:
                moved[j] = (points[:, assign == j] * w).sum(axis=1) / w.sum()
        if np.array_equal(moved, centres):
            break
        centres = moved
    inertia = float((weights * squared_distances(points, centres).min(axis=0)).sum())
    return centres, inertia


def weighted_kmeans(
    points: np.ndarray, weights: np.ndarray, k: int, *, seed: int, n_init: int, max_iter: int
) -> np.ndarray:
    """Best of ``n_init`` seeded k-means runs on ``(3, n)`` weighted points: ``(k, 3)`` centres."""
    rng = np.random.default_rng(seed)
    starts = [kmeans_plus_plus(points, weights, k, rng) for _ in range(n_init)]
    runs = [lloyd(points, weights, centres, max_iter) for centres in starts]
    return min(runs, key=lambda run: run[1])[0]


def lightness_order(
    centres: np.ndarray, points: np.ndarray, weights: np.ndarray, lightness: np.ndarray
) -> np.ndarray:
    """Centres sorted by the weighted mean ``lightness`` of their points, darkest first."""
    assign = nearest_centre(points, centres)
    mean = [np.average(lightness[assign == j], weights=weights[assign == j]) for j in range(len(centres))]
    return centres[np.argsort(mean, kind="stable")]


class KMeansParams(ColourParams):
    k: int = Field(3, description="number of colour clusters (2..254)")
    levels: int = Field(64, ge=8, le=128, description="histogram steps per RGB channel for the fit")
    seed: int = Field(0, description="seed of the k-means++ initialisations")
    n_init: int = Field(4, ge=1, description="k-means restarts; the lowest inertia wins")
    max_iter: int = Field(100, ge=1, description="most Lloyd iterations per restart")

    @field_validator("k")
    @classmethod
    def _k(cls, k: int) -> int:
        if not 2 <= k <= 254:
            raise ValueError(f"k must be between 2 and 254 (got {k}); e.g. k: 4")
        return k


@register
class KMeansColour(ColourSegmenter):
    """K-means colour clusters fitted on the whole image's colour histogram, nearest centre per pixel."""

    name = "kmeans_colour"
    summary = "k-means colour clusters (RGB/HSV/Lab) fitted once on the whole image, darkest first"
    Params = KMeansParams
    params: KMeansParams
    centres: np.ndarray | None = None

    @property
    def classes(self) -> dict[int, str]:
        return {i: f"cluster_{i}" for i in range(self.params.k)}

    def features(self, block: np.ndarray) -> np.ndarray:
        """Clustering features of every pixel of ``block``."""
        bands = (self.rgb_bands[0], self.rgb_bands[1], self.rgb_bands[2])
        return cluster_features(unit_rgb(block, bands, self.max_value), self.params.space)

    def fit(self, reduce: Reducer) -> KMeansColour:
        p = self.params
        counts = reduce(partial(_partial_colour_hist, self), hist.add)
        occupied = np.flatnonzero(counts)
        if occupied.size < p.k:
            raise ConfigError(
                f"segmenter.params.k {p.k}: the image has only {occupied.size} distinct colour(s) "
                f"at levels={p.levels}; use a smaller k or more levels"
            )
        rgb, weights = bin_colours(occupied, p.levels), counts[occupied].astype(np.float64)
        points = cluster_features(rgb, p.space)
        centres = weighted_kmeans(points, weights, p.k, seed=p.seed, n_init=p.n_init, max_iter=p.max_iter)
        fitted = copy.copy(self)
        fitted.centres = lightness_order(centres, points, weights, rgb_to_lab(rgb)[0])
        return fitted

    def fitted_values(self) -> dict[str, Any]:
        return {"centres": None if self.centres is None else self.centres.tolist()}

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self.centres is None:
            raise ConfigError(f"{self.name} must be fitted before it is applied (call fit first)")
        out = nearest_centre(self.features(block), self.centres).astype(np.uint8)
        out[~valid] = Segmenter.nodata_label
        return out


def _partial_colour_hist(
    seg: KMeansColour, block: np.ndarray, valid: np.ndarray, core: tuple[slice, ...]
) -> np.ndarray:
    bands = (seg.rgb_bands[0], seg.rgb_bands[1], seg.rgb_bands[2])
    rgb = unit_rgb(block[(slice(None), *core)], bands, seg.max_value)
    codes = colour_codes(rgb, seg.params.levels)[valid[core]]
    return np.bincount(codes, minlength=seg.params.levels**3).astype(np.int64)
