"""Window arithmetic for tiled inference: crop stitching, blended windows, weights, batched forward.

Two ways to cover a block with network windows:

* **crop**: windows that overlap by twice the receptive reach ``h``; each keeps only the pixels at
  least ``h`` from its inner edges, so every kept pixel saw its whole receptive field. With window
  starts on multiples of the network's alignment (``2**depth``) the result equals whole-image
  inference, wherever the windows and chunks fall.
* **blend**: windows on one *global* grid of the image (stride ``window * (1 - overlap)``, the last
  window shifted to end at the image edge), each prediction weighted by a Hann or Gaussian window
  and averaged. A chunk computes exactly the global windows that lie inside its read block (the
  halo is ``window - 1``, so those are the windows touching its core): the blended value of a pixel
  is the same whichever chunk computes it.

Memory is bounded by the block: accumulators are ``(classes, *block)``, never the image.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CropWindow:
    """One axis: the window ``[start, stop)`` and the part ``[keep_lo, keep_hi)`` it contributes."""

    start: int
    stop: int
    keep_lo: int
    keep_hi: int


def crop_windows(n: int, window: int, reach: int, align: int) -> list[CropWindow]:
    """Windows along an axis of length ``n`` whose kept parts tile ``[0, n)`` exactly.

    ``window`` and ``reach`` are rounded up to multiples of ``align`` so window starts stay aligned.
    """
    reach = -(-reach // align) * align
    window = max(-(-window // align) * align, 2 * reach + align)
    if n <= window:
        return [CropWindow(0, n, 0, n)]
    step = window - 2 * reach
    out: list[CropWindow] = []
    start = 0
    while True:
        stop = min(start + window, n)
        last = stop == n
        out.append(CropWindow(start, stop, 0 if start == 0 else start + reach, n if last else stop - reach))
        if last:
            return out
        start += step


def blend_starts(n: int, window: int, stride: int) -> list[int]:
    """Global window starts along an image axis of length ``n`` (the last one ends at ``n``)."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window, stride))
    return [*starts, n - window]


def blend_weights(shape: Sequence[int], mode: str) -> np.ndarray:
    """Separable window weights (max 1, floor 1e-3 so image-edge pixels stay defined)."""
    w = np.ones((), dtype=np.float32)
    for size in shape:
        if mode == "gaussian":
            sigma = 0.125 * size
            x = np.arange(size, dtype=np.float64) - (size - 1) / 2
            axis = np.exp(-0.5 * (x / sigma) ** 2)
        elif mode == "hann":
            axis = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
        else:
            raise ValueError(f"blend mode {mode!r}: use 'gaussian' or 'hann'")
        w = np.multiply.outer(w, (axis / axis.max()).astype(np.float32))
    return np.maximum(np.asarray(w, dtype=np.float32), np.float32(1e-3))


def blend_windows(
    image_shape: Sequence[int],
    origin: Sequence[int],
    block_shape: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
) -> list[tuple[slice, ...]]:
    """Block-relative slices of the global windows lying wholly inside the block."""
    per_axis = []
    for n, o, b, w, s in zip(image_shape, origin, block_shape, window, stride, strict=True):
        size = min(w, n)
        starts = [p - o for p in blend_starts(n, size, s) if p >= o and p + size <= o + b]
        per_axis.append([slice(p, p + size) for p in starts])
    return [tuple(c) for c in itertools.product(*per_axis)]


def batches(items: list[tuple[slice, ...]], size: int) -> Iterator[list[int]]:
    """Indices of consecutive runs of windows of one shape, at most ``size`` long."""
    run: list[int] = []
    shape: tuple[int, ...] | None = None
    for i, sl in enumerate(items):
        s = tuple(x.stop - x.start for x in sl)
        if run and (s != shape or len(run) == size):
            yield run
            run = []
        run.append(i)
        shape = s
    if run:
        yield run
