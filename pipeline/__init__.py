"""segpipe: segment rasters and volumes larger than memory on Dask.

Public API; everything else is internal.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pipeline.errors import (
    ChunkFailedError,
    ConfigError,
    GeometryMismatchError,
    HaloTooSmallError,
    InvalidImageError,
    OutputConflictError,
    PipelineError,
    ReadError,
    WriteError,
)

__all__ = [
    "ChunkFailedError",
    "ConfigError",
    "GeometryMismatchError",
    "HaloTooSmallError",
    "InvalidImageError",
    "OutputConflictError",
    "PipelineError",
    "ReadError",
    "WriteError",
    "__version__",
]
