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

It also sets the process's malloc thresholds to reuse freed arrays
(:func:`pipeline.runner.memory.reuse_arrays`; each chunk then sets them for its segmenter).
"""

from __future__ import annotations

import importlib

from pipeline.runner import memory

#: The modules imported: task functions, the classical segmenters, the format readers.
MODULES = (
    "pipeline.io.geo",
    "pipeline.io.medical",
    "pipeline.models.classical",
    "pipeline.runner.instance_tasks",
    "pipeline.runner.process",
)

for _name in MODULES:
    importlib.import_module(_name)
#: Whether this process runs with malloc thresholds that reuse freed arrays.
MALLOC_TUNED = memory.reuse_arrays(True)
