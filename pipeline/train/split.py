"""Train/validation split by region: a held-apart box, a gap around it, training slabs elsewhere.

A training patch lies wholly inside one training slab. The slabs are the image minus the
held-apart box grown by ``gap`` pixels on every side, cut into at most ``2 * ndim`` boxes, so
no training patch overlaps or touches the held-apart region (``gap >= 1``), and neighbouring
patches cannot leak validation pixels into training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.errors import ConfigError
from pipeline.tiling import Box

Position = Literal["start", "end"]


@dataclass(frozen=True)
class Split:
    """The held-apart box, the gap around it, and the training slabs of one image."""

    shape: tuple[int, ...]
    val: Box
    gap: int
    train: tuple[Box, ...]

    @property
    def exclusion(self) -> Box:
        """The held-apart box grown by the gap, clipped to the image: no training pixel is in it."""
        return self.val.grow((self.gap,) * self.val.ndim).intersect(Box.from_shape(self.shape))


def strip_region(
    shape: Sequence[int], *, val_fraction: float, axis: int | None = None, position: Position = "end"
) -> Box:
    """A strip across the image: ``val_fraction`` of ``axis`` (default: the longest) at one end."""
    shape = tuple(int(s) for s in shape)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"split.val_fraction {val_fraction} must be between 0 and 1 (e.g. 0.2)")
    ax = int(np.argmax(shape)) if axis is None else axis
    if not 0 <= ax < len(shape):
        raise ConfigError(f"split.axis {axis} is not a spatial axis of an image of shape {shape}")
    width = max(1, round(shape[ax] * val_fraction))
    start, stop = [0] * len(shape), list(shape)
    if position == "end":
        start[ax] = shape[ax] - width
    else:
        stop[ax] = width
    return Box(tuple(start), tuple(stop))


def split_region(shape: Sequence[int], val: Box, *, gap: int, patch: Sequence[int]) -> Split:
    """Cut the image minus ``val`` grown by ``gap`` into slabs a ``patch`` fits in.

    Slabs too thin for a patch are dropped; if none is left, the split is refused.
    """
    shape = tuple(int(s) for s in shape)
    whole = Box.from_shape(shape)
    if gap < 1:
        raise ConfigError(f"split.gap {gap} must be >= 1 pixel so no training patch touches validation")
    if val.ndim != len(shape) or not whole.contains(val) or val.size == 0:
        raise ConfigError(
            f"held-apart region {val.start}..{val.stop} is not a non-empty box inside the image "
            f"of shape {shape}; give split.region within the image"
        )
    excl = val.grow((gap,) * len(shape)).intersect(whole)
    slabs = [b for b in _complement(whole, excl) if all(s >= p for s, p in zip(b.shape, patch, strict=True))]
    if not slabs:
        raise ConfigError(
            f"no training patch of size {tuple(patch)} fits in an image of shape {shape} outside the "
            f"held-apart region {val.start}..{val.stop} and its gap of {gap} pixels; use a smaller "
            "patch_size, a smaller split.val_fraction or split.gap"
        )
    return Split(shape, val, gap, tuple(slabs))


def _complement(whole: Box, hole: Box) -> list[Box]:
    """Disjoint boxes covering ``whole`` minus ``hole`` (peeled axis by axis)."""
    out: list[Box] = []
    start, stop = list(whole.start), list(whole.stop)
    for ax in range(whole.ndim):
        if hole.start[ax] > start[ax]:
            hi = stop.copy()
            hi[ax] = hole.start[ax]
            out.append(Box(tuple(start), tuple(hi)))
        if hole.stop[ax] < stop[ax]:
            lo = start.copy()
            lo[ax] = hole.stop[ax]
            out.append(Box(tuple(lo), tuple(stop)))
        start[ax], stop[ax] = hole.start[ax], hole.stop[ax]
    return out


def origin_range(slab: Box, patch: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Inclusive ``(lo, hi)`` patch origins that keep a ``patch`` inside ``slab``."""
    return slab.start, tuple(b - p for b, p in zip(slab.stop, patch, strict=True))


def clamp_origin(origin: Sequence[int], slab: Box, patch: Sequence[int]) -> tuple[int, ...]:
    """``origin`` moved the least so the patch lies inside ``slab``."""
    lo, hi = origin_range(slab, patch)
    return tuple(min(max(int(o), a), b) for o, a, b in zip(origin, lo, hi, strict=True))
