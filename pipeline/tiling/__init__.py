"""Pure geometry of chunks: boxes, read/write boxes with halos, and grids."""

from __future__ import annotations

from pipeline.tiling.box import Box
from pipeline.tiling.grid import EDGE_MODES, BlockContext, ChunkGrid, ChunkSpec, EdgeMode

__all__ = ["EDGE_MODES", "BlockContext", "Box", "ChunkGrid", "ChunkSpec", "EdgeMode"]
