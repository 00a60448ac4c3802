"""Seeded patch augmentation: flips, quarter turns, per-channel intensity scale and shift."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augment:
    """What to vary. Axes are spatial (0 = first spatial axis); turns are in the last two axes."""

    flip_axes: tuple[int, ...] = ()
    rot90: bool = False
    scale: float = 0.0
    shift: float = 0.0


def augment(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, aug: Augment
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a normalised ``image`` ``(C, *spatial)`` and its ``labels`` ``(*spatial)`` alike."""
    for ax in aug.flip_axes:
        if rng.random() < 0.5:
            image, labels = np.flip(image, ax + 1), np.flip(labels, ax)
    if aug.rot90 and labels.shape[-1] == labels.shape[-2]:
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k, axes=(-2, -1)), np.rot90(labels, k, axes=(-2, -1))
    shape = (image.shape[0],) + (1,) * (image.ndim - 1)
    if aug.scale:
        image = image * rng.uniform(1 - aug.scale, 1 + aug.scale, size=shape).astype(np.float32)
    if aug.shift:
        image = image + rng.uniform(-aug.shift, aug.shift, size=shape).astype(np.float32)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels)
