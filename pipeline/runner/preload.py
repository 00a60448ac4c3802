"""Dask preload: import the modules that chunk tasks run when a worker or the scheduler starts.

Without it, each worker imports them while unpickling its first task, and so does a scheduler
in its own process (it unpickles the tasks it receives): about 2 s each (rasterio, zarr,
xarray, scipy, scikit-image and segpipe's task modules), one after the other, inside the job's
first stage; no number of workers shortens that (measured: the first ingest task of a job on a
fresh `dask scheduler` started 1.3-1.9 s after it was submitted; 0.05 s with the preload).
segpipe's own clusters (the local cluster, ``segpipe cluster up``, jobqueue and Kubernetes
profiles) preload it; for a cluster started by hand:
``dask scheduler --preload pipeline.runner.preload`` and
``dask worker ADDRESS --preload pipeline.runner.preload``.

torch is not imported here: a classical job's workers never need it (and it adds ~300 MiB
to every worker); the deep segmenters import it on their first chunk.

It also sets glibc's malloc thresholds (:func:`tune_malloc`).
"""

from __future__ import annotations

import ctypes
import importlib

#: The modules imported: task functions, the classical segmenters, the format readers.
MODULES = (
    "pipeline.io.geo",
    "pipeline.io.medical",
    "pipeline.models.classical",
    "pipeline.runner.instance_tasks",
    "pipeline.runner.process",
)

#: glibc ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap and are reused; larger ones are mapped and unmapped.
MMAP_THRESHOLD = 32 * 2**20
#: Free memory at the top of the heap beyond this is handed back to the system.
TRIM_THRESHOLD = 128 * 2**20


def tune_malloc() -> bool:
    """Let a task process reuse freed array memory; return whether glibc took the settings.

    Dask's nanny starts each worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand freed memory
    back to the system). Setting any threshold turns off glibc's adaptive mmap threshold, so
    every block over 128 KiB (a 1024^2 chunk's float64 band is 8 MiB, and a chunk makes a dozen
    such temporaries) is a fresh mapping, zero-filled page by page, unmapped when freed: a
    1024^2 Otsu + opening chunk took 192 ms instead of 101 ms. Here blocks up to
    ``MMAP_THRESHOLD`` come from the heap and are reused, and the heap above
    ``TRIM_THRESHOLD`` of free memory is still trimmed, so a worker holds a bounded amount of
    freed memory whatever the input's size. Without glibc (musl, macOS) nothing is changed.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


for _name in MODULES:
    importlib.import_module(_name)
#: Whether this process runs with the malloc settings above.
MALLOC_TUNED = tune_malloc()
