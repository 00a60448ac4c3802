"""Per-process torch settings: the device a worker uses, its CPU threads, and autocast.

The engine calls :func:`configure` once in each worker process before the first learned
segmenter runs there: whether the worker holds the ``GPU`` resource, and how many threads it
runs (torch gets that many, so worker processes do not oversubscribe the cores). Outside a
worker (a notebook, a test computing whole-image inference) nothing is configured and ``auto``
means CUDA when a device is visible, else the CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pipeline.errors import ConfigError

_STATE: dict[str, Any] = {"gpu": None, "threads": None}


def configure(*, gpu: bool, threads: int) -> None:
    """Record this worker's GPU resource and set torch's CPU threads (once per process)."""
    import torch

    if _STATE["threads"] != threads:
        torch.set_num_threads(max(1, threads))
    _STATE.update(gpu=gpu, threads=threads)


def configured() -> bool:
    """Whether :func:`configure` ran in this process."""
    return _STATE["gpu"] is not None


def device_for(request: str) -> str:
    """``cpu`` or ``cuda`` for a segmenter's ``device`` parameter in this process."""
    import torch

    cuda = torch.cuda.is_available()
    if request == "cpu":
        return "cpu"
    if request == "cuda":
        if not cuda:
            raise ConfigError(
                "segmenter.params.device 'cuda': this process sees no CUDA device; use device 'auto' "
                "(CUDA where a worker has one, CPU otherwise) or run on GPU workers"
            )
        return "cuda"
    if _STATE["gpu"] is None:  # not on a configured worker
        return "cuda" if cuda else "cpu"
    return "cuda" if (_STATE["gpu"] and cuda) else "cpu"


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16/fp16 autocast on CUDA (``auto``: bf16 where supported); nothing on the CPU or for fp32."""
    import torch

    if device != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)
