"""Seeded synthetic factories and assertion helpers for tests and benchmarks."""

from __future__ import annotations

from pipeline.testing.factories import write_raster

__all__ = ["write_raster"]
