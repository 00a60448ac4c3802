"""Patches from the zarr staging store: a coarse class index, seeded positions, normalisation.

Nothing here holds a whole image: the class index counts classes per zarr chunk (intersected
with the training slabs), positions are drawn from it, and each patch is one region read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import product
from pathlib import Path

import numpy as np
import zarr

from pipeline.tiling import Box
from pipeline.train.labels import IGNORE
from pipeline.train.split import Split, clamp_origin, origin_range


@dataclass(frozen=True)
class Region:
    """One staged image/label pair and its split: ``image`` is ``(C, *spatial)``, labels ``(*spatial)``."""

    image_path: Path
    labels_path: Path
    split: Split

    @cached_property
    def _arrays(self) -> tuple[zarr.Array, zarr.Array]:
        return (
            zarr.open_array(store=str(self.image_path), mode="r"),
            zarr.open_array(store=str(self.labels_path), mode="r"),
        )

    def image(self) -> zarr.Array:
        """The staged image ``(C, *spatial)`` (opened once)."""
        return self._arrays[0]

    def labels(self) -> zarr.Array:
        """The staged class map ``(*spatial)``, :data:`IGNORE` where not labelled."""
        return self._arrays[1]


@dataclass(frozen=True)
class Normaliser:
    """``(clip(x, *clip) - mean) / std`` per channel (the model card's ``inputs``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    clip: tuple[float, float] | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.clip is not None:
            x = np.clip(x, self.clip[0], self.clip[1])
        shape = (-1,) + (1,) * (x.ndim - 1)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        return ((x - mean) / std).astype(np.float32)


@dataclass(frozen=True)
class IndexEntry:
    """Class counts of one zarr chunk of one training slab."""

    region: int
    slab: int
    box: Box
    counts: np.ndarray


def chunk_boxes(shape: Sequence[int], chunks: Sequence[int], within: Box) -> Iterator[Box]:
    """The zarr chunks of an array of ``shape`` intersected with ``within`` (non-empty only)."""
    ranges = [range(a // c, -(-b // c)) for a, b, c in zip(within.start, within.stop, chunks, strict=True)]
    for idx in product(*ranges):
        start = tuple(i * c for i, c in zip(idx, chunks, strict=True))
        stop = tuple(min(s + c, n) for s, c, n in zip(start, chunks, shape, strict=True))
        box = Box(start, stop).intersect(within)
        if box.size:
            yield box


def class_index(regions: Sequence[Region], n_classes: int) -> list[IndexEntry]:
    """Per (region, slab, zarr chunk) class counts; ignored pixels are not counted."""
    out: list[IndexEntry] = []
    for r, region in enumerate(regions):
        labels = region.labels()
        for s, slab in enumerate(region.split.train):
            for box in chunk_boxes(labels.shape, labels.chunks, slab):
                values = np.asarray(labels[box.slices()]).ravel()
                counts = np.bincount(values[values != IGNORE], minlength=n_classes)[:n_classes]
                out.append(IndexEntry(r, s, box, counts.astype(np.int64)))
    return out


def channel_stats(
    regions: Sequence[Region], clip: tuple[float, float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation per channel over the training slabs' labelled pixels."""
    total = sums = squares = None
    for region in regions:
        image, labels = region.image(), region.labels()
        for slab in region.split.train:
            for box in chunk_boxes(labels.shape, labels.chunks, slab):
                keep = np.asarray(labels[box.slices()]) != IGNORE
                x = np.asarray(image[(slice(None), *box.slices())], dtype=np.float64)[:, keep]
                if clip is not None:
                    x = np.clip(x, *clip)
                n, s, q = x.shape[1], x.sum(axis=1), (x * x).sum(axis=1)
                total = n if total is None else total + n
                sums = s if sums is None else sums + s
                squares = q if squares is None else squares + q
    if not total or sums is None or squares is None:
        raise ValueError("no labelled training pixels to compute normalisation statistics from")
    mean = sums / total
    std = np.sqrt(np.maximum(squares / total - mean * mean, 0.0))
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-6)) for v in std)


def draw_origins(
    rng: np.random.Generator,
    n: int,
    regions: Sequence[Region],
    index: Sequence[IndexEntry],
    *,
    patch: Sequence[int],
    foreground_fraction: float,
    balance: Sequence[int],
) -> list[tuple[int, tuple[int, ...]]]:
    """``n`` (region, patch origin) pairs; a share ``foreground_fraction`` centred on a class pixel.

    Class-targeted draws pick a class uniformly from ``balance`` (those present in training),
    a chunk in proportion to its count of that class, a pixel of that class in the chunk, and
    a patch holding it; the rest are uniform over every valid origin of every slab.
    """
    counts = np.stack([e.counts for e in index]) if index else np.zeros((0, 0), np.int64)
    present = [c for c in balance if counts.size and counts[:, c].sum() > 0]
    slabs = [(r, s) for r, region in enumerate(regions) for s in range(len(region.split.train))]
    weights = np.array([_n_origins(regions[r].split.train[s], patch) for r, s in slabs], np.float64)
    out = []
    for _ in range(n):
        if present and rng.random() < foreground_fraction:
            out.append(_targeted(rng, regions, index, counts, present, patch))
        else:
            r, s = slabs[int(rng.choice(len(slabs), p=weights / weights.sum()))]
            lo, hi = origin_range(regions[r].split.train[s], patch)
            out.append((r, tuple(int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True))))
    return out


def _n_origins(slab: Box, patch: Sequence[int]) -> float:
    lo, hi = origin_range(slab, patch)
    return float(np.prod([b - a + 1 for a, b in zip(lo, hi, strict=True)]))


def _targeted(
    rng: np.random.Generator,
    regions: Sequence[Region],
    index: Sequence[IndexEntry],
    counts: np.ndarray,
    present: Sequence[int],
    patch: Sequence[int],
) -> tuple[int, tuple[int, ...]]:
    c = present[int(rng.integers(len(present)))]
    p = counts[:, c] / counts[:, c].sum()
    entry = index[int(rng.choice(len(index), p=p))]
    labels = np.asarray(regions[entry.region].labels()[entry.box.slices()])
    hits = np.flatnonzero(labels.ravel() == c)
    pixel = np.unravel_index(int(hits[rng.integers(len(hits))]), labels.shape)
    at = [int(a) + int(i) for a, i in zip(entry.box.start, pixel, strict=True)]
    origin = [a - int(rng.integers(0, p)) for a, p in zip(at, patch, strict=True)]
    slab = regions[entry.region].split.train[entry.slab]
    return entry.region, clamp_origin(origin, slab, patch)


def read_patch(region: Region, origin: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(C, *patch)`` float32 and labels ``(*patch)`` uint8 at ``origin``."""
    box = Box(tuple(origin), tuple(o + p for o, p in zip(origin, patch, strict=True)))
    image = np.asarray(region.image()[(slice(None), *box.slices())], dtype=np.float32)
    return image, np.asarray(region.labels()[box.slices()], dtype=np.uint8)
