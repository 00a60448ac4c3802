"""Chunk grids: write boxes that tile an image exactly, and read boxes with halos."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from pipeline.errors import ChunkTooSmallError, ConfigError
from pipeline.tiling.box import Box

EdgeMode = Literal["clip", "reflect", "symmetric", "edge", "constant"]
EDGE_MODES: tuple[str, ...] = get_args(EdgeMode)


@dataclass(frozen=True)
class BlockContext:
    """Where a block lies in its image: what context-aware segmenters may know.

    ``origin`` is the image index of the block's first element (negative where edge padding
    extends past the image); ``cut[axis] = (before, after)`` says which block edges cut through
    the image rather than lie on its border.
    """

    origin: tuple[int, ...]
    cut: tuple[tuple[bool, bool], ...]


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk: where it reads (with halo), where it writes, and how to pad at image edges.

    ``pad`` holds ``(before, after)`` per axis: how far the halo sticks out of the image. With
    edge mode ``clip`` it is ignored (the segmenter sees a smaller block at image edges and its
    own boundary rule applies, exactly as on the whole image); other modes pad the block with
    ``numpy.pad`` so every block has the full halo.
    """

    index: tuple[int, ...]
    read: Box
    write: Box
    pad: tuple[tuple[int, int], ...]
    #: Per axis, whether the read box's (start, stop) edge cuts through the image (is not its border).
    cut: tuple[tuple[bool, bool], ...] = ()

    @property
    def chunk_id(self) -> str:
        """Stable text id, e.g. ``"0_3"``."""
        return "_".join(str(i) for i in self.index)

    def core(self, *, padded: bool = False) -> tuple[slice, ...]:
        """Slices of the write box inside the read block (after edge padding if ``padded``)."""
        rel = self.write.relative_to(self.read)
        if not padded:
            return rel.slices()
        return tuple(slice(a + p[0], b + p[0]) for a, b, p in zip(rel.start, rel.stop, self.pad, strict=True))

    def context(self, *, padded: bool) -> BlockContext:
        """The :class:`BlockContext` of this chunk's block."""
        origin = tuple(r - (p[0] if padded else 0) for r, p in zip(self.read.start, self.pad, strict=True))
        return BlockContext(origin, self.cut)

    def pad_block(self, block: np.ndarray, mode: str) -> np.ndarray:
        """Pad the trailing (spatial) axes of ``block`` out to the full halo with ``mode``."""
        if mode == "clip" or not any(a or b for a, b in self.pad):
            return block
        widths = [(0, 0)] * (block.ndim - len(self.pad)) + list(self.pad)
        return np.pad(block, widths, mode=mode)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ChunkGrid:
    """A regular grid of chunks over ``shape`` with uneven last chunks.

    Parameters
    ----------
    shape
        Spatial shape of the image.
    chunk
        Chunk size per axis (the last chunk along an axis may be smaller).
    halo
        Context per side per axis.
    edge_mode
        How the halo is filled beyond the image: see :class:`ChunkSpec`.
    """

    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    halo: tuple[int, ...]
    edge_mode: EdgeMode = "clip"

    def __post_init__(self) -> None:
        for name in ("shape", "chunk", "halo"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.shape)
        if len(self.chunk) != n or len(self.halo) != n:
            raise ConfigError(
                f"chunk {self.chunk} and halo {self.halo} must have {n} values, "
                f"one per spatial axis of an image of shape {self.shape}"
            )
        if any(c <= 0 for c in self.chunk) or any(h < 0 for h in self.halo):
            raise ConfigError(f"chunk {self.chunk} must be positive and halo {self.halo} non-negative")
        if self.edge_mode not in EDGE_MODES:
            raise ConfigError(f"edge mode {self.edge_mode!r} is not one of {EDGE_MODES}")
        self._check_chunk_covers_halo()

    def _check_chunk_covers_halo(self) -> None:
        for axis, (c, h, s) in enumerate(zip(self.chunk, self.halo, self.shape, strict=True)):
            if c < h and c < s:
                raise ChunkTooSmallError(
                    f"tiling.chunk {list(self.chunk)} is smaller than the halo {list(self.halo)} "
                    f"on axis {axis}: a chunk would read more halo than core. Use chunks of at "
                    f"least {h} (ideally several times the halo) on that axis."
                )

    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        chunk: Sequence[int],
        halo: int | Sequence[int],
        edge_mode: EdgeMode = "clip",
    ) -> ChunkGrid:
        """Build a grid, broadcasting a scalar halo to every axis and clipping chunks to shape."""
        if len(chunk) != len(shape):
            raise ConfigError(
                f"tiling.chunk {list(chunk)} has {len(chunk)} values; the image "
                f"has {len(shape)} spatial axes {tuple(shape)}"
            )
        halos = (halo,) * len(shape) if isinstance(halo, int) else tuple(halo)
        chunks = tuple(min(int(c), int(s)) for c, s in zip(chunk, shape, strict=True))
        return cls(tuple(shape), chunks, halos, edge_mode)

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of chunks along each axis."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunk, strict=True))

    def __len__(self) -> int:
        n = 1
        for c in self.counts:
            n *= c
        return n

    def __iter__(self) -> Iterator[ChunkSpec]:
        for index in itertools.product(*(range(n) for n in self.counts)):
            yield self.spec(index)

    def spec(self, index: Sequence[int]) -> ChunkSpec:
        """The :class:`ChunkSpec` at grid position ``index``."""
        start = tuple(i * c for i, c in zip(index, self.chunk, strict=True))
        stop = tuple(min(a + c, s) for a, c, s in zip(start, self.chunk, self.shape, strict=True))
        return self.window(Box(start, stop), index=tuple(int(i) for i in index))

    def window(self, write: Box, *, index: tuple[int, ...] = ()) -> ChunkSpec:
        """A :class:`ChunkSpec` writing ``write`` (any box in the image) with this grid's halo."""
        wanted = write.grow(self.halo)
        read = wanted.intersect(Box.from_shape(self.shape))
        pad = tuple(
            (r0 - w0, w1 - r1)
            for w0, w1, r0, r1 in zip(wanted.start, wanted.stop, read.start, read.stop, strict=True)
        )
        cut = tuple((a > 0, b < s) for a, b, s in zip(read.start, read.stop, self.shape, strict=True))
        return ChunkSpec(index or (-1,), read, write, pad, cut)

    def done_mask(self, chunk_ids: Iterable[str]) -> np.ndarray:
        """Boolean array of shape :attr:`counts`: True at the chunks named in ``chunk_ids``.

        Ids that are not chunks of this grid are ignored.
        """
        mask = np.zeros(self.counts, dtype=bool)
        for cid in chunk_ids:
            try:
                index = tuple(int(p) for p in cid.split("_"))
            except ValueError:
                continue
            if len(index) == mask.ndim and all(0 <= i < n for i, n in zip(index, self.counts, strict=True)):
                mask[index] = True
        return mask

    def todo(self, done: np.ndarray | None = None) -> np.ndarray:
        """Grid indices ``(n, ndim)`` of the chunks not set in ``done`` (a :meth:`done_mask`), in
        grid order. Unlike iterating the grid, no :class:`ChunkSpec` is built."""
        mask = np.ones(self.counts, dtype=bool) if done is None else ~done
        return np.argwhere(mask).astype(np.int64)

    def block_shape(self, per_block: int) -> tuple[int, ...]:
        """Chunks per axis of a block of about ``per_block`` neighbouring chunks (at most that
        many), filled from the last axis and no longer than the grid along any axis."""
        sides: list[int] = []
        left = max(1, int(per_block))
        for axis in reversed(range(len(self.counts))):
            side = min(self.counts[axis], max(1, round(left ** (1 / (axis + 1)))))
            while side > 1 and side > left:
                side -= 1
            sides.append(side)
            left = max(1, left // side)
        return tuple(reversed(sides))

    def groups(self, indices: np.ndarray, per_group: int) -> list[np.ndarray]:
        """``indices`` (from :meth:`todo`) split into groups of neighbouring chunks: the chunks of
        each :meth:`block_shape` block of the grid, blocks in grid order, chunks in grid order
        within a block. A group has at most ``per_group`` chunks and spans one block's box."""
        if len(indices) == 0:
            return []
        sides = np.asarray(self.block_shape(per_group), dtype=np.int64)
        keys = indices // sides
        order = np.lexsort(tuple(np.concatenate([keys, indices], axis=1).T[::-1]))  # keys first
        keys, ordered = keys[order], indices[order]
        cuts = np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1
        return np.split(ordered, cuts)

    def specs(self, indices: np.ndarray) -> list[ChunkSpec]:
        """The :class:`ChunkSpec` of each row of ``indices``."""
        return [self.spec(tuple(int(i) for i in row)) for row in indices]

    def seam_windows(self, count: int = 4, size: int = 128) -> list[Box]:
        """Up to ``count`` boxes of side ``size`` centred on interior chunk corners (spread out)."""
        inner = tuple(n - 1 for n in self.counts)  # corners: every index from 1 to n - 1 per axis
        n_corners = int(np.prod(inner)) if all(inner) else 0
        if not n_corners:
            return []
        picks = [
            tuple(int(i) + 1 for i in np.unravel_index(round(k * (n_corners - 1) / max(count - 1, 1)), inner))
            for k in range(min(count, n_corners))
        ]
        boxes = []
        for corner in dict.fromkeys(picks):
            centre = [i * c for i, c in zip(corner, self.chunk, strict=True)]
            start = tuple(max(0, m - size // 2) for m in centre)
            stop = tuple(min(s, a + size) for a, s in zip(start, self.shape, strict=True))
            boxes.append(Box(start, stop))
        return boxes

    def write_chunks(self) -> tuple[int, ...]:
        """Chunk shape for the staging store (aligned with the write boxes)."""
        return self.chunk
