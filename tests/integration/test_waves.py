"""Big graphs: a job of thousands of tiny chunks runs in waves of batched tasks, resumes, and
keeps one metrics row per chunk."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr

from pipeline.io.zarr_store import CompletionLog
from pipeline.runner import execute
from pipeline.testing import write_raster
from pipeline.testing.factories import blocks_field
from tests.helpers import run

SIDE, CHUNK = 1024, 16  # 64 x 64 = 4096 chunks
N_CHUNKS = (SIDE // CHUNK) ** 2
PER_TASK = 64  # TASK_PIXELS below: 8 x 8 chunks a task, so 64 tasks a stage for 8 slots


class Interrupted(Exception):
    """Raised in the client part way through the segment stage (a killed client)."""


@pytest.fixture(scope="module")
def raster(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("waves") / "tiny.tif"
    return write_raster(path, (SIDE, SIDE), dtype="uint16", fill=blocks_field(seed=5, block=45))


def _small_batches(mp: pytest.MonkeyPatch) -> None:
    """``PER_TASK`` chunks a task in every chunk stage (ingest takes larger tasks by default)."""
    for name in ("TASK_PIXELS", "INGEST_TASK_PIXELS"):
        mp.setattr(execute, name, PER_TASK * CHUNK * CHUNK)


@pytest.fixture
def small_tasks(monkeypatch) -> None:
    _small_batches(monkeypatch)


class TaskCounter:
    """The most tasks the scheduler held at once, polled in a thread while a job runs."""

    def __init__(self, client: Any) -> None:
        self.client, self.most = client, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, self.client.run_on_scheduler(_n_tasks))
            self._stop.wait(0.05)

    def __enter__(self) -> TaskCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _n_tasks(dask_scheduler: Any = None) -> int:
    return len(dask_scheduler.tasks)


def _labels(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(store=str(out / "staging.zarr" / "labels"), mode="r")[...])


@pytest.fixture(scope="module")
def clean(client, raster, tmp_path_factory) -> tuple[Path, Any, int]:
    """An uninterrupted run in waves: its output folder, result and the most scheduler tasks."""
    out = tmp_path_factory.mktemp("clean") / "out"
    with pytest.MonkeyPatch.context() as mp:
        _small_batches(mp)
        with TaskCounter(client) as counter:
            result = run(
                client, raster, out, "otsu", {"band": 1}, chunk=[CHUNK, CHUNK], formats=["zarr", "cog"]
            )
    return out, result, counter.most


def test_thousands_of_chunks_run_in_bounded_waves(clean) -> None:
    out, result, most = clean
    window = execute.IN_FLIGHT_PER_THREAD * 2  # 2 workers x 1 thread
    for stage in ("ingest", "segment"):
        waves = result.diagnostics["scheduling"][stage]
        assert waves["chunks"] == N_CHUNKS and waves["window"] == window
        assert waves["tasks"] == N_CHUNKS // PER_TASK and waves["chunks_per_task_max"] == PER_TASK
        assert waves["in_flight_max"] == window  # the window was full, and never more
    # One future per chunk would put 4096 tasks on the scheduler; the chunk stages keep 8, and the
    # largest graph of the run is the fit stage's reduction tree (64 leaves of 8 x 8 chunks + 9).
    assert most < 100
    records = list((out / ".segpipe" / "done" / "segment").iterdir())
    assert len(records) == N_CHUNKS // PER_TASK  # one file per task, not per chunk
    tiles = pd.read_parquet(out / "tiles.parquet")
    assert len(tiles) == N_CHUNKS and tiles["chunk_id"].is_unique
    assert tiles["pixels"].sum() == SIDE * SIDE
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiling"]["n_chunks"] == N_CHUNKS and summary["scheduling"]["segment"]["tasks"] == 64


def test_interrupted_waves_resume_only_missing_chunks(
    client, raster, clean, tmp_path, small_tasks, monkeypatch
) -> None:
    class Killing(execute._progress):
        """Progress that kills the client after 1200 segmented chunks."""

        def __enter__(self) -> tuple[Any, Any]:
            bar, task = super().__enter__()
            stage, seen = self.stage, [0]

            class Bar:
                def advance(self, task: Any, n: float = 1) -> None:
                    seen[0] += int(n)
                    if stage == "segment" and seen[0] >= 1200:
                        raise Interrupted
                    bar.advance(task, n)

            return Bar(), task

    out = tmp_path / "out"
    monkeypatch.setattr(execute, "_progress", Killing)
    with pytest.raises(Interrupted):
        run(client, raster, out, "otsu", {"band": 1}, chunk=[CHUNK, CHUNK], formats=["zarr"])
    monkeypatch.undo()
    _small_batches(monkeypatch)
    done = len(CompletionLog(out / ".segpipe", "segment").done())
    assert 1200 <= done < N_CHUNKS and not (out / "summary.json").exists()

    result = run(client, raster, out, "otsu", {"band": 1}, chunk=[CHUNK, CHUNK], formats=["zarr"])
    # Tasks still running when the client died may have finished since: skipped >= done.
    assert result.chunks_skipped >= done and result.chunks_skipped + result.chunks_computed == N_CHUNKS
    assert result.chunks_computed <= N_CHUNKS - 1200
    tiles = pd.read_parquet(out / "tiles.parquet")
    assert len(tiles) == N_CHUNKS and tiles["chunk_id"].is_unique
    assert np.array_equal(_labels(out), _labels(clean[0]))


def test_chunk_failing_inside_a_batch_is_quarantined_alone(raster, tmp_path, monkeypatch) -> None:
    """A chunk that raises in a batch task is re-run in a task of its own (retried by Dask), then
    quarantined under its own id; the other chunks of its batch are written and recorded."""
    from distributed import Client, LocalCluster

    from pipeline.errors import ChunkFailedError
    from pipeline.runner import process

    real = process._segment_one
    calls: list[str] = []

    def broken(reader, writers, labels_path, spec, *args):  # type: ignore[no-untyped-def]
        if spec.chunk_id == "3_4":
            calls.append(spec.chunk_id)
            raise RuntimeError("broken chunk 3_4")
        return real(reader, writers, labels_path, spec, *args)

    monkeypatch.setattr(process, "_segment_one", broken)  # the in-process worker sees it
    _small_batches(monkeypatch)
    out = tmp_path / "out"
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as local,
        pytest.raises(ChunkFailedError, match=r"1 chunk\(s\) failed.*chunk 3_4"),
    ):
        run(local, raster, out, "otsu", {"band": 1}, chunk=[CHUNK, CHUNK], formats=["zarr"])
    assert calls == ["3_4"] * 4  # in its batch, then alone: once and 2 retries
    failed = json.loads((out / "failed.json").read_text())["failed_chunks"]
    assert list(failed) == ["3_4"] and "broken chunk 3_4" in failed["3_4"]["error"]
    done = CompletionLog(out / ".segpipe", "segment").done()
    assert len(done) == N_CHUNKS - 1 and "3_4" not in done
    labels = _labels(out)
    assert (labels[3 * CHUNK : 4 * CHUNK, 4 * CHUNK : 5 * CHUNK] == 255).all()  # left at nodata
    assert (labels[:CHUNK, :CHUNK] != 255).all()


def test_instance_stages_run_in_bounded_waves(client, tmp_path) -> None:
    """label, seams and relabel submit one task per chunk but keep at most the window in flight:
    256 chunks never put more than a few dozen tasks on the scheduler, and the ids still match
    scipy's labelling of the whole mask."""
    from scipy import ndimage

    from pipeline.data import GeoRef
    from pipeline.io.zarr_store import create_array, write_box
    from pipeline.tiling import Box

    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(rng.random((256, 256)) < 0.55).astype(np.uint8)
    src = tmp_path / "mask.zarr"
    create_array(
        src,
        shape=mask.shape,
        chunks=mask.shape,
        dtype="uint8",
        geometry=GeoRef("EPSG:32633", (1, 0, 0, 0, -1, 0)),
    )
    write_box(src, Box.from_shape(mask.shape), mask)
    params = {"semantic": {"name": "threshold", "params": {"value": 0}}, "connectivity": 1}
    with TaskCounter(client) as counter:
        result = run(client, src, tmp_path / "out", "components", params, chunk=[16, 16], formats=["zarr"])
    window = execute.IN_FLIGHT_PER_THREAD * 2  # 2 workers x 1 thread
    for stage in ("label", "seams", "relabel"):
        waves = result.diagnostics["scheduling"][stage]
        assert waves["chunks"] == waves["tasks"] == 256 and waves["window"] == window
        assert waves["in_flight_max"] == window

    assert counter.most < 50, counter.most  # one future per chunk would hold 256+
    reference, n = ndimage.label(mask)
    tiled = _labels(tmp_path / "out")
    assert result.instances["objects"] == n
    assert np.array_equal(tiled != 0, reference != 0)
    pairs = np.unique(np.stack([tiled.ravel(), reference.ravel()], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))
