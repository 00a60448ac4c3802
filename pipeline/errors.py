"""One exception hierarchy for segpipe.

Every error is a :class:`PipelineError`; most also inherit the builtin a caller would
expect (``ValueError`` for bad values, ``OSError`` for unreadable files), so generic
handlers keep working. Messages say the value, what was expected, and how to fix it.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error raised by segpipe."""


class ConfigError(PipelineError, ValueError):
    """A job file, option or parameter is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A name (segmenter, format, profile) is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class InvalidImageError(PipelineError, ValueError):
    """An image does not meet the image contract (dims, dtype, geometry, size)."""


class HaloTooSmallError(ConfigError):
    """A halo is smaller than the context the segmenter needs."""


class ChunkTooSmallError(ConfigError):
    """A chunk is smaller than its halo."""


class ReadError(PipelineError, OSError):
    """A file could not be read (missing, truncated, corrupt or of the wrong format)."""


class WriteError(PipelineError, OSError):
    """An output could not be written."""


class GeometryMismatchError(PipelineError, ValueError):
    """An output's CRS, transform, spacing, origin or direction differs from its input's."""


class OutputConflictError(PipelineError, FileExistsError):
    """An output folder holds results of a different job."""


class RunInProgressError(PipelineError, RuntimeError):
    """Another run of the same scheduled job holds its lock."""


class ChunkFailedError(PipelineError, RuntimeError):
    """One or more chunks failed after their retries."""
