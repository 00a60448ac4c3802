"""Deterministic tiled prediction of a box of a staged region (validation and evaluation).

Each tile reads its core grown by the halo, clipped to the box being predicted: the held-apart
region is predicted from its own pixels only. Tiles and halos are multiples of the network's
alignment (``2**depth``), so every tile pools on the same grid as the whole box would, and with
the halo covering the receptive field the tiled map equals the whole-box map.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.tiling import Box
from pipeline.train.patches import Normaliser, Region, chunk_boxes


def _up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def predict_tiles(
    model: nn.Module,
    region: Region,
    box: Box,
    normalise: Normaliser,
    *,
    tile: Sequence[int],
    halo: int,
    align: int = 1,
) -> Iterator[tuple[Box, np.ndarray]]:
    """``(core, class ids)`` of each tile of ``box``; only one tile is in memory at a time."""
    was_training = model.training
    model.eval()
    try:
        tiles = [_up(t, align) for t in tile]
        margin = (_up(halo, align),) * box.ndim
        image = region.image()
        for local in chunk_boxes(box.shape, tiles, Box.from_shape(box.shape)):
            core = Box(
                tuple(a + o for a, o in zip(local.start, box.start, strict=True)),
                tuple(b + o for b, o in zip(local.stop, box.start, strict=True)),
            )
            read = core.grow(margin).intersect(box)
            x = normalise(np.asarray(image[(slice(None), *read.slices())]))
            with torch.inference_mode():
                logits = model(torch.from_numpy(x)[None])[0]
            inner = core.relative_to(read)
            yield core, logits.argmax(0).numpy()[inner.slices()].astype(np.uint8)
    finally:
        model.train(was_training)


def predict_box(
    model: nn.Module,
    region: Region,
    box: Box,
    normalise: Normaliser,
    *,
    tile: Sequence[int],
    halo: int,
    align: int = 1,
) -> np.ndarray:
    """Class ids (uint8) of the whole ``box``, predicted tile by tile."""
    out = np.zeros(box.shape, dtype=np.uint8)
    for core, labels in predict_tiles(model, region, box, normalise, tile=tile, halo=halo, align=align):
        out[core.relative_to(box).slices()] = labels
    return out
