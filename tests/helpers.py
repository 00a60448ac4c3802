"""Helpers shared by tests: build and run jobs on the session cluster, read results back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.runner.api import run_job
from pipeline.runner.execute import RunResult
from pipeline.runner.spec import JobSpec, parse_job, resolve_paths


def job(
    input_path: Path,
    out: Path,
    segmenter: str,
    params: dict[str, Any] | None = None,
    *,
    chunk: list[int],
    formats: list[str] | None = None,
    **extra: Any,
) -> JobSpec:
    """A resolved job spec writing into ``out``."""
    raw: dict[str, Any] = {
        "name": "test-job",
        "input": {"path": str(input_path)},
        "segmenter": {"name": segmenter, "params": params or {}},
        "tiling": {"chunk": chunk},
        "output": {"dir": str(out), "formats": formats or ["zarr"]},
        **extra,
    }
    return resolve_paths(parse_job(raw), base=input_path.parent)


def run(client: Any, *args: Any, **kwargs: Any) -> RunResult:
    """Run a job built by :func:`job` on ``client``."""
    return run_job(job(*args, **kwargs), client=client)


def labels_of(result: RunResult) -> np.ndarray:
    """The stitched label map from the zarr staging store."""
    return np.asarray(zarr.open_array(store=str(result.plan.staging / "labels"), mode="r")[...])
