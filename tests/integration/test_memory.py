"""Acceptance (spine 5): a raster of at least 2 GB runs with each worker limited to 1 GiB."""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import pytest
import rasterio

from pipeline.testing import write_raster
from pipeline.testing.factories import blocks_field
from tests.helpers import run

GIB = 1024**3


class PeakRSS:
    """Sample the RSS of the given processes in a background thread."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for p in self.procs:
                try:
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_2gb_raster_with_1gib_workers(client, tmp_path) -> None:
    shape = (32768, 32768)  # uint16: 2 GiB of pixels
    src = write_raster(tmp_path / "big.tif", shape, dtype="uint16", block=1024, fill=blocks_field(7))
    assert src.stat().st_size >= 2 * GIB
    limits = {w["memory_limit"] for w in client.scheduler_info()["workers"].values()}
    assert limits == {GIB}
    pids = list(client.run(lambda: __import__("os").getpid()).values())
    with PeakRSS(pids) as rss:
        result = run(
            client, src, tmp_path / "out", "otsu", {"band": 1}, chunk=[2048, 2048], formats=["zarr", "cog"]
        )
    assert max(rss.peak.values()) < GIB, rss.peak
    assert result.chunks_computed == 256
    # spot-check the COG against the threshold on windows read back with rasterio
    t = result.segmenter.threshold
    with rasterio.open(src) as a, rasterio.open(result.outputs["cog"]) as b:
        for window in (((0, 512), (0, 512)), ((20000, 20600), (31000, 31700))):
            expected = (a.read(1, window=window) > t).astype(np.uint8)
            assert np.array_equal(b.read(1, window=window), expected)
    src.unlink()
