"""Connect to Dask: the embedded local cluster of processes, or an existing scheduler."""

from __future__ import annotations

from pipeline.cluster.connect import connect

__all__ = ["connect"]
