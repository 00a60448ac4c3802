"""Semantic stitching by halo crop: exact when the halo covers the segmenter's context."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from pipeline.tiling import ChunkSpec


def crop_to_core(labels: np.ndarray, spec: ChunkSpec, *, padded: bool) -> np.ndarray:
    """Cut a chunk's labels (computed on its read block) down to its write box."""
    core = spec.core(padded=padded)
    out = labels[core]
    if out.shape != spec.write.shape:
        raise PipelineError(
            f"chunk {spec.chunk_id}: segmenter returned labels of shape "
            f"{labels.shape}, which do not cover the write box {spec.write.shape}; "
            "a segmenter must return one label per input pixel"
        )
    return out
