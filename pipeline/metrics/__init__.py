"""Per-tile and per-job metrics."""

from __future__ import annotations

from pipeline.metrics.tiles import tile_row, write_tile_table

__all__ = ["tile_row", "write_tile_table"]
