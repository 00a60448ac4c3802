"""Stitching chunk results back into one map."""

from __future__ import annotations

from pipeline.stitching.semantic import crop_to_core

__all__ = ["crop_to_core"]
