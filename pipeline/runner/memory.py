"""glibc malloc thresholds of a task process: reuse freed arrays, or hand them straight back.

Dask's nanny starts each worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand freed memory back
to the system). Setting any threshold turns off glibc's adaptive mmap threshold, so every block
over 128 KiB is a fresh mapping, zero-filled page by page and unmapped when freed. A classical
segmenter makes a dozen such temporaries per chunk (a 1024^2 chunk's float64 band is 8 MiB): the
same smoothed-Otsu + opening chunk took 192 ms under that setting and 101 ms with
:func:`reuse_arrays` (``True``), where blocks up to ``MMAP_THRESHOLD`` come from the heap and are
reused and the heap above ``TRIM_THRESHOLD`` of free memory is still trimmed.

A network is the other way round: torch's activations of many sizes fragment a heap that keeps
them, and a U-Net worker of ``bench_outofcore`` (2 GiB limit) peaked at 1.6 GiB instead of 1.1
GiB and was paused by Dask at 80 %. So :func:`~pipeline.runner.process.segment_block` sets the
mode per segmenter: reuse for classical ones, the nanny's thresholds for torch ones, and the
switch to the latter trims the heap (``malloc_trim``) of what earlier stages (ingest) left in it:
without that trim the U-Net worker still peaked 200 MiB higher. Without glibc (musl, macOS)
nothing is changed.
"""

from __future__ import annotations

import ctypes
from typing import Any

#: glibc ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Reuse: blocks up to this size come from the heap and are reused.
MMAP_THRESHOLD = 32 * 2**20
#: Reuse: free memory at the top of the heap beyond this is handed back to the system.
TRIM_THRESHOLD = 128 * 2**20
#: Hand back (Dask's nanny, glibc's initial mmap threshold): the thresholds of a worker as started.
NANNY_MMAP_THRESHOLD, NANNY_TRIM_THRESHOLD = 128 * 2**10, 65536

_state: dict[str, Any] = {"reuse": None}


def _mallopt() -> Any:
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


def reuse_arrays(reuse: bool = True) -> bool:
    """Set this process's malloc thresholds to reuse freed arrays (``True``) or to hand blocks
    over 128 KiB straight back (``False``, as a Dask worker starts); whether glibc took them.
    Called again with the same mode it does nothing."""
    if _state["reuse"] is reuse:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mmap, trim = (MMAP_THRESHOLD, TRIM_THRESHOLD) if reuse else (NANNY_MMAP_THRESHOLD, NANNY_TRIM_THRESHOLD)
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap)) and bool(mallopt(M_TRIM_THRESHOLD, trim))
    if ok and _state["reuse"] and not reuse:  # what the heap kept while reusing goes back now
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    _state["reuse"] = reuse if ok else None
    return ok


def reusing() -> bool | None:
    """The mode last set in this process (``None``: not set)."""
    return _state["reuse"]
