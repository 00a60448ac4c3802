"""Every format library lives here: readers, writers, the zarr staging store, quicklooks."""

from __future__ import annotations

from pipeline.io.sources import ImageSource, open_image

__all__ = ["ImageSource", "open_image"]
