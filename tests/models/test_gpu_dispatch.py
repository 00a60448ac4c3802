"""GPU dispatch: learned-model tasks go to workers holding the GPU resource (real dask CLIs).

No CUDA device is needed: a worker started with ``--resources GPU=1`` takes every segment task;
on a machine without CUDA it then runs them on its CPU (``device: auto``), with its torch threads
set to its own thread count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

from tests.helpers import labels_of, run, tiny_unet
from tests.integration.test_cli_scheduler import cli_cluster

NAIP = ("landcover", "chesapeake_m_3907833_nw_17_1_naip-new.tif")


@pytest.fixture(scope="module")
def mixed_cluster(tmp_path_factory) -> Iterator[str]:
    workers = {"gpu0": ["--resources", "GPU=1"], "cpu0": []}
    with cli_cluster(tmp_path_factory.mktemp("dask-logs"), workers, memory_limit="2GiB") as address:
        yield address


def test_learned_segment_tasks_run_on_the_gpu_worker(mixed_cluster, data, tmp_path) -> None:
    from distributed import Client

    model = tiny_unet(tmp_path / "m", spatial_dims=2, bands=[1, 2, 3, 4], classes={0: "a", 1: "b", 2: "c"})
    with Client(mixed_cluster, timeout="30s") as client:
        info = client.scheduler_info()["workers"]
        gpu_addr = next(a for a, w in info.items() if w["name"] == "gpu0")
        gpu_pid = client.run(os.getpid, workers=[gpu_addr])[gpu_addr]
        res = run(
            client, data.joinpath(*NAIP), tmp_path / "out", "unet", {"model": str(model)}, chunk=[66, 66]
        )
        otsu = run(client, data.joinpath(*NAIP), tmp_path / "otsu", "otsu", {"band": 4}, chunk=[66, 66])

        def state() -> dict[str, object]:
            from pipeline.models.torch import runtime

            return dict(runtime._STATE)

        states = client.run(state)
    tiles = pd.read_parquet(res.outputs["tiles"])
    assert len(tiles) == 16
    assert {w.rsplit(":", 1)[1] for w in tiles["worker"]} == {str(gpu_pid)}  # every chunk on gpu0
    assert states[gpu_addr] == {"gpu": True, "threads": 1}
    # classical tasks are not annotated: they spread over both workers
    assert pd.read_parquet(otsu.outputs["tiles"])["worker"].nunique() == 2
    assert len(np.unique(labels_of(res))) >= 2
