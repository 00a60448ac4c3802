"""Downsampling kernels for multiscale outputs: mode for labels (never interpolation), mean for images."""

from __future__ import annotations

import numpy as np


def _blocks(a: np.ndarray, factor: int) -> np.ndarray:
    """``a`` padded (edge) to multiples of ``factor`` and reshaped to (..., factor**ndim) blocks."""
    pad = [(0, (-s) % factor) for s in a.shape]
    a = np.pad(a, pad, mode="edge")
    shape: list[int] = []
    for s in a.shape:
        shape += [s // factor, factor]
    b = a.reshape(shape)
    nd = a.ndim
    b = b.transpose([2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)])
    return b.reshape([s // factor for s in a.shape] + [factor**nd])


def downsample_mode(labels: np.ndarray, factor: int = 2) -> np.ndarray:
    """Each ``factor**ndim`` block becomes its most frequent label (ties: the smallest label)."""
    blocks = _blocks(labels, factor)
    values = np.unique(blocks)
    counts = np.stack([(blocks == v).sum(axis=-1) for v in values], axis=-1)
    return values[np.argmax(counts, axis=-1)].astype(labels.dtype)


def downsample_mean(image: np.ndarray, factor: int = 2) -> np.ndarray:
    """Each block becomes its mean, cast back to the input dtype (rounded for integers)."""
    mean = _blocks(image, factor).astype(np.float64).mean(axis=-1)
    return np.rint(mean).astype(image.dtype) if image.dtype.kind in "iu" else mean.astype(image.dtype)
