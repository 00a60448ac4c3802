"""Instance stitching kernels (pure numpy): label cores, pair labels across seams, solve, relabel.

Ids are global through per-chunk offsets (an exclusive cumulative sum of the chunks' label
counts, uint64: no packing limits). Merges are found on thin slabs around each seam, solved
as connected components of the equivalence graph, and applied chunk by chunk with small
lookup arrays (their size is the number of merged ids, not the number of objects).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.errors import ConfigError


def structure(ndim: int, connectivity: int) -> np.ndarray:
    """The scipy structuring element: connectivity 1 (faces) .. ndim (full diagonals)."""
    if not 1 <= connectivity <= ndim:
        raise ConfigError(
            f"connectivity {connectivity} is not valid in {ndim}-D; use 1..{ndim} "
            f"(2-D: 1 = 4-neighbours, 2 = 8; 3-D: 1 = 6, 2 = 18, 3 = 26)"
        )
    return ndimage.generate_binary_structure(ndim, connectivity)


def label_classes(
    class_map: np.ndarray, classes: list[int], connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of each class in ``class_map``.

    Returns ``(labels uint32 with ids 1..n, class_of_id)`` where ``class_of_id[i - 1]`` is
    the class of id ``i``. Components never join across classes.
    """
    out = np.zeros(class_map.shape, dtype=np.uint32)
    owners: list[np.ndarray] = []
    count = 0
    st = structure(class_map.ndim, connectivity)
    for cls in classes:
        lab, n = ndimage.label(class_map == cls, structure=st)
        if n:
            mask = lab > 0
            out[mask] = lab[mask].astype(np.uint32) + np.uint32(count)
            owners.append(np.full(n, cls, dtype=np.uint8))
            count += n
    return out, (np.concatenate(owners) if owners else np.zeros(0, np.uint8))


def seam_pairs(slab: np.ndarray, axis: int, connectivity: int) -> np.ndarray:
    """Pairs of different non-zero ids that touch across the seam in a 2-thick ``slab``.

    ``slab`` has extent 2 along ``axis`` (index 0 before the seam, 1 after it). Returns an
    ``(n, 2)`` uint64 array of unique pairs (smaller id first).
    """
    st = structure(slab.ndim, connectivity)
    a = np.take(slab, 0, axis=axis)
    b = np.take(slab, 1, axis=axis)
    found = []
    for offset in itertools.product((-1, 0, 1), repeat=slab.ndim - 1):
        step = [o + 1 for o in offset]
        step.insert(axis, 2)  # +1 across the seam; index into the 3**ndim structuring element
        if not st[tuple(step)]:
            continue
        sa, sb = _shifted(a, b, offset)
        hit = (sa != 0) & (sb != 0) & (sa != sb)
        if hit.any():
            found.append(np.stack([sa[hit], sb[hit]], axis=1))
    return _unique_pairs(found)


def _shifted(a: np.ndarray, b: np.ndarray, offset: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Views of ``a`` and ``b`` aligned so ``b[i]`` is ``a[i + offset]``'s neighbour."""
    sa, sb = [], []
    for o, n in zip(offset, a.shape, strict=True):
        sa.append(slice(max(0, -o), n - max(0, o)))
        sb.append(slice(max(0, o), n - max(0, -o)))
    return a[tuple(sa)], b[tuple(sb)]


def _unique_pairs(found: list[np.ndarray]) -> np.ndarray:
    if not found:
        return np.zeros((0, 2), dtype=np.uint64)
    pairs = np.sort(np.concatenate(found).astype(np.uint64), axis=1)
    return np.unique(pairs, axis=0)


def overlap_pairs(mine: np.ndarray, theirs: np.ndarray, iou_threshold: float) -> tuple[np.ndarray, int]:
    """Match ids of two labelings of the same region by IoU (mutual best match above threshold).

    Returns ``(pairs (n, 2) uint64, conflicts)``: conflicts counts the overlapping id pairs
    that were rejected (not a mutual best match, or IoU below the threshold).
    """
    fg = (mine != 0) & (theirs != 0)
    if not fg.any():
        return np.zeros((0, 2), dtype=np.uint64), 0
    ids_a, area_a = np.unique(mine[mine != 0], return_counts=True)
    ids_b, area_b = np.unique(theirs[theirs != 0], return_counts=True)
    inter_keys, inter = np.unique(np.stack([mine[fg], theirs[fg]], axis=1), axis=0, return_counts=True)
    ia = area_a[np.searchsorted(ids_a, inter_keys[:, 0])]
    ib = area_b[np.searchsorted(ids_b, inter_keys[:, 1])]
    iou = inter / (ia + ib - inter)
    best_a = _best(inter_keys[:, 0], iou)
    best_b = _best(inter_keys[:, 1], iou)
    keep = best_a & best_b & (iou >= iou_threshold)
    return _unique_pairs([inter_keys[keep]]), int((~keep).sum())


def _best(keys: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Mask of the rows holding each key's highest score (ties: the first)."""
    order = np.lexsort((-score, keys))
    first = np.ones(len(order), dtype=bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    mask = np.zeros(len(keys), dtype=bool)
    mask[order[first]] = True
    return mask


@dataclass(frozen=True)
class Relabel:
    """How to turn global ids into final sequential ids.

    ``merged`` (sorted) are ids folded into a smaller ``root``; every other id ``g`` becomes
    ``g - (number of merged ids below g)``. Both arrays are as long as the number of merges.
    """

    merged: np.ndarray
    roots: np.ndarray
    total: int

    @property
    def n_objects(self) -> int:
        """Number of objects after merging."""
        return self.total - len(self.merged)

    def apply(self, ids: np.ndarray) -> np.ndarray:
        """Final ids of global ids (0 stays 0)."""
        ids = ids.astype(np.uint64, copy=False)
        if len(self.merged):
            pos = np.searchsorted(self.merged, ids)
            hit = (pos < len(self.merged)) & (self.merged[np.minimum(pos, len(self.merged) - 1)] == ids)
            ids = np.where(hit, self.roots[np.minimum(pos, len(self.merged) - 1)], ids)
        shift = np.searchsorted(self.merged, ids, side="left").astype(np.uint64)
        return np.where(ids == 0, np.uint64(0), ids - shift)


def solve(pairs: np.ndarray, total: int) -> Relabel:
    """Union of equivalent ids: each component keeps its smallest id as the root."""
    if len(pairs) == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return Relabel(empty, empty, total)
    nodes, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(pairs.shape)
    graph = coo_matrix((np.ones(len(pairs)), (inverse[:, 0], inverse[:, 1])), shape=(len(nodes),) * 2)
    _, comp = connected_components(graph, directed=False)
    root_of_comp = np.full(comp.max() + 1, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.minimum.at(root_of_comp, comp, nodes)
    roots = root_of_comp[comp]
    merged = nodes != roots
    order = np.argsort(nodes[merged])
    return Relabel(nodes[merged][order], roots[merged][order], total)


def offsets(counts: list[int]) -> np.ndarray:
    """Exclusive cumulative sum of per-chunk label counts (uint64)."""
    out = np.zeros(len(counts), dtype=np.uint64)
    if counts:
        out[1:] = np.cumsum(np.asarray(counts[:-1], dtype=np.uint64))
    return out
