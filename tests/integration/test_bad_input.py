"""Bad-input catalogue (spine 6, operations 6): one table of bad inputs, each a clear
PipelineError naming the file or key and the fix, and nothing that looks complete."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import SimpleITK as sitk
import yaml
import zarr

from pipeline.data import GeoRef, wrap_image
from pipeline.errors import (
    ChunkFailedError,
    ChunkTooSmallError,
    ConfigError,
    GeometryMismatchError,
    HaloTooSmallError,
    InvalidImageError,
    OutputConflictError,
    PipelineError,
    ReadError,
    UnknownNameError,
)
from pipeline.io.zarr_store import create_array
from pipeline.runner.api import run_job
from pipeline.runner.cli import main
from pipeline.runner.spec import load_job
from pipeline.testing import write_raster
from tests.helpers import job, run

S2 = Path("geo") / "Spain_7370579_S2Hand.tif"
RASTER = GeoRef("EPSG:4326", (1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
MASK = {"name": "threshold", "params": {"value": 100}}


@dataclass
class Case:
    """One bad input: how to make it, the error it must raise and the words its message needs."""

    make: Callable[[Path, Path], Path]  # (tmp, data) -> input path
    error: type[PipelineError]
    words: list[str]
    segmenter: str = "otsu"
    params: dict[str, Any] = field(default_factory=dict)
    chunk: list[int] = field(default_factory=lambda: [64, 64])
    extra: dict[str, Any] = field(default_factory=dict)


def _s2(tmp: Path, data: Path) -> Path:
    return data / S2


def _truncated(tmp: Path, data: Path) -> Path:
    src = (data / S2).read_bytes()
    (tmp / "truncated.tif").write_bytes(src[: len(src) // 2])
    return tmp / "truncated.tif"


def _text_as_tif(tmp: Path, data: Path) -> Path:
    (tmp / "notes.tif").write_text("this is not a raster\n")
    return tmp / "notes.tif"


def _zarr(shape: tuple[int, ...], *, write: bool = True) -> Callable[[Path, Path], Path]:
    def make(tmp: Path, data: Path) -> Path:
        path = tmp / "odd.zarr"
        create_array(
            path, shape=shape, chunks=tuple(max(1, min(s, 64)) for s in shape), dtype="uint8", geometry=RASTER
        )
        if write:
            zarr.open_array(store=str(path), mode="r+")[...] = np.ones(shape, "uint8")
        return path

    return make


def _nifti_4d(tmp: Path, data: Path) -> Path:
    vols = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(vols), str(tmp / "series4d.nii.gz"))
    return tmp / "series4d.nii.gz"


def _no_crs(tmp: Path, data: Path) -> Path:
    return write_raster(tmp / "nocrs.tif", (64, 64), crs=None)


def _all_nodata(tmp: Path, data: Path) -> Path:
    return write_raster(
        tmp / "empty.tif", (64, 64), nodata=0, fill=lambda r, c, h, w: np.zeros((1, h, w), np.uint16)
    )


def _non_finite(tmp: Path, data: Path) -> Path:
    def fill(r: int, c: int, h: int, w: int) -> np.ndarray:
        out = np.full((1, h, w), np.nan, np.float32)
        out[0, ::2] = np.inf
        return out

    return write_raster(tmp / "nan_inf.tif", (64, 64), dtype="float32", fill=fill)


def _corrupt_zarr_chunk(tmp: Path, data: Path) -> Path:
    path = _zarr((1, 128, 128))(tmp, data)
    chunk = next(p for p in (path / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\x00garbage" * 5)
    return path


def _empty_dicom_folder(tmp: Path, data: Path) -> Path:
    (tmp / "dicom").mkdir()
    (tmp / "dicom" / "README.txt").write_text("no slices here")
    return tmp / "dicom"


CATALOGUE: dict[str, Case] = {
    "missing file": Case(lambda t, d: t / "nope.tif", ReadError, ["nope.tif", "no such file", "input.path"]),
    "truncated GeoTIFF": Case(_truncated, ReadError, ["truncated.tif", "truncated", "Re-"]),
    "text file named .tif": Case(_text_as_tif, ReadError, ["notes.tif", "not a readable raster"]),
    "1-D data": Case(_zarr((7,)), InvalidImageError, ["odd.zarr", "0-D data is not supported", "Squeeze"]),
    "5-D data": Case(_zarr((2, 3, 4, 5, 6)), InvalidImageError, ["odd.zarr", "4-D data", "Squeeze"]),
    "4-D NIfTI": Case(
        _nifti_4d, InvalidImageError, ["series4d.nii.gz", "4-D", "3-D"], "threshold", {"value": 0}, [2, 2, 2]
    ),
    "empty image": Case(_zarr((1, 0, 5), write=False), InvalidImageError, ["odd.zarr", "empty"]),
    "absurd declared size": Case(
        _zarr((1, 2**25, 2**25), write=False), InvalidImageError, ["odd.zarr", "absurdly large", "Re-export"]
    ),
    "DICOM folder without a series": Case(
        _empty_dicom_folder, ReadError, ["dicom", "no DICOM series"], "threshold", {"value": 0}, [8, 8, 8]
    ),
    "raster without CRS": Case(_no_crs, InvalidImageError, ["nocrs.tif", "no CRS", "allow_missing_crs"]),
    "all pixels nodata": Case(_all_nodata, ConfigError, ["no valid pixel", "nodata"]),
    "only NaN and inf": Case(_non_finite, ConfigError, ["no valid pixel"]),
    "corrupt zarr chunk": Case(_corrupt_zarr_chunk, ChunkFailedError, ["odd.zarr", "chunk", "--restart"]),
    "chunk smaller than the halo": Case(
        _s2,
        ChunkTooSmallError,
        ["tiling.chunk", "[16, 16]", "at least 40"],
        params={"band": 8, "smooth_sigma": 10},
        chunk=[16, 16],
    ),
    "halo override too small": Case(
        _s2,
        HaloTooSmallError,
        ["tiling.halo 2", "at least 6"],
        params={"band": 8, "smooth_sigma": 1.5},
        chunk=[128, 128],
        extra={"tiling": {"chunk": [128, 128], "halo": 2}},
    ),
    "unknown segmenter": Case(_s2, UnknownNameError, ["'otsuu'", "Did you mean 'otsu'"], "otsuu"),
    "band missing": Case(_s2, ConfigError, ["segmenter.params.band", "'B99'", "B8A"], params={"band": "B99"}),
    "unknown parameter": Case(
        _s2, ConfigError, ["segmenter.params.bnad", "Allowed parameters"], params={"bnad": 3}
    ),
    "negative smoothing": Case(
        _s2,
        ConfigError,
        ["segmenter.params.smooth_sigma", "greater than or equal"],
        params={"smooth_sigma": -1},
    ),
    "two threshold rules": Case(
        _s2,
        ConfigError,
        ["exactly one of value, window, windows or preset"],
        "threshold",
        {"value": 1, "window": [0, 2]},
    ),
    "negative block size": Case(
        _s2,
        ConfigError,
        ["segmenter.params.block_size", "odd and >= 3"],
        "local",
        {"band": 8, "block_size": -3},
    ),
    "k < 2": Case(
        _s2, ConfigError, ["segmenter.params.classes", "between 2 and 254"], "multi_otsu", {"classes": 1}
    ),
    "connectivity beyond the dimensions": Case(
        _s2,
        ConfigError,
        ["connectivity 3", "use 1..2"],
        "components",
        {"semantic": {"name": "otsu", "params": {"band": 8}}, "connectivity": 3},
    ),
    "prompt outside the image": Case(
        _s2,
        ConfigError,
        [r"points[0]", "outside the image"],
        "seeded",
        {"points": [{"x": 100.0, "y": -40.0}], "mask": MASK},
    ),
    "image and label with different geometry": Case(
        _s2,
        GeometryMismatchError,
        ["reference.path", "spacenet_atlanta_buildings_instances.tif", "CRS"],
        params={"band": 8},
        extra={"reference": {"path": "geo/spacenet_atlanta_buildings_instances.tif"}},  # under data/
    ),
    "format for the wrong kind": Case(
        _s2,
        ConfigError,
        ["output.formats ['nifti']", "raster"],
        params={"band": 8},
        extra={"output": {"formats": ["nifti"]}},
    ),
}


def assert_nothing_complete(out: Path) -> None:
    assert not (out / "summary.json").exists()
    for name in ("labels.tif", "labels.nii.gz", "labels.mha", "quicklook.png", "tiles.parquet"):
        assert not (out / name).exists(), name


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_catalogue(client, data, tmp_path, name) -> None:
    case = CATALOGUE[name]
    source = case.make(tmp_path, data)
    out = tmp_path / "out"
    extra = dict(case.extra)
    if "output" in extra:
        extra["output"] = {"dir": str(out), **extra["output"]}
    if "reference" in extra:
        extra["reference"] = {**extra["reference"], "path": str(data / extra["reference"]["path"])}

    with pytest.raises(case.error) as info:
        run(client, source, out, case.segmenter, case.params, chunk=case.chunk, **extra)
    for word in case.words:
        assert word in str(info.value), (word, str(info.value))
    assert_nothing_complete(out)


def test_catalogue_has_at_least_20_rows() -> None:
    assert len(CATALOGUE) >= 20


@pytest.mark.parametrize("array", [np.zeros(10), np.zeros((2, 2, 2, 2, 2))], ids=["1d", "5d"])
def test_python_api_rejects_1d_and_5d(array) -> None:
    with pytest.raises(InvalidImageError, match="not supported"):
        wrap_image(array, GeoRef(None, (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)))


def test_raster_without_crs_runs_when_allowed(client, tmp_path) -> None:
    path = _no_crs(tmp_path, tmp_path)
    spec = job(
        path,
        tmp_path / "ok",
        "otsu",
        chunk=[32, 32],
        formats=["cog"],
        input={"path": str(path), "allow_missing_crs": True},
    )
    with rasterio.open(run_job(spec, client=client).outputs["cog"]) as ds:
        assert ds.crs is None


def test_unknown_yaml_key_names_path_and_allowed_keys(data, tmp_path, capsys) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "input": {"path": str(data / S2)},
                "segmenter": {"name": "otsu"},
                "tiling": {"chunks": [64, 64]},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        load_job(job_file)
    assert str(job_file) in str(info.value)
    assert "unknown key 'tiling.chunks'" in str(info.value)
    assert "allowed keys here: chunk, halo, edge_mode" in str(info.value)
    assert main(["run", str(job_file)]) == 2
    assert "unknown key 'tiling.chunks'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_outside_the_output_root_is_refused(client, data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SEGPIPE_OUTPUT_ROOT", str(tmp_path / "allowed"))
    with pytest.raises(ConfigError, match="outside the output root"):
        run(client, data / S2, tmp_path / "allowed" / ".." / "escaped", "otsu", {"band": 8}, chunk=[256, 256])
    assert not (tmp_path / "escaped").exists()
    run(client, data / S2, tmp_path / "allowed" / "ok", "otsu", {"band": 8}, chunk=[256, 256])


def test_output_folder_of_a_different_job_is_refused_and_left_intact(client, data, tmp_path) -> None:
    out = tmp_path / "out"
    first = run(client, data / S2, out, "otsu", {"band": 8}, chunk=[256, 256], formats=["cog"])
    before = (out / "labels.tif").read_bytes()
    with pytest.raises(OutputConflictError) as info:
        run(client, data / S2, out, "otsu", {"band": 4}, chunk=[256, 256], formats=["cog"])
    assert str(out) in str(info.value) and "--restart" in str(info.value)
    assert (out / "labels.tif").read_bytes() == before
    assert json.loads((out / "summary.json").read_text())["fingerprint"] == first.plan.fingerprint


def test_output_folder_with_foreign_files_is_refused(client, data, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    with pytest.raises(OutputConflictError, match="did not write"):
        run(client, data / S2, out, "otsu", {"band": 8}, chunk=[256, 256])
    assert (out / "thesis.docx").read_text() == "precious"
    assert_nothing_complete(out)


def test_same_job_rerun_resumes_and_skips_completed_chunks(client, data, tmp_path) -> None:
    """A rerun skips the completed chunks and the fit (Otsu's pass over the whole input): the
    fitted segmenter kept with the completion records is used; one that does not load is
    fitted again, to the same threshold."""
    from distributed import get_task_stream

    from pipeline.runner.execute import FITTED

    out = tmp_path / "out"
    args = (client, data / S2, out, "otsu", {"band": 8})
    first = run(*args, chunk=[256, 256], formats=["cog"])
    with get_task_stream(client) as stream:
        second = run(*args, chunk=[256, 256], formats=["cog"])
    assert (first.chunks_computed, second.chunks_computed, second.chunks_skipped) == (4, 0, 4)
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"
    threshold = first.segmenter.fitted_values()
    assert second.segmenter.fitted_values() == threshold
    assert not [t for t in stream.data if str(t["key"]).startswith("reduce_chunks")]  # no fit pass

    (first.plan.records / FITTED).write_bytes(b"not a pickle")  # e.g. written by another version
    with get_task_stream(client) as stream:
        third = run(*args, chunk=[256, 256], formats=["cog"])
    assert third.segmenter.fitted_values() == threshold
    assert [t for t in stream.data if str(t["key"]).startswith("reduce_chunks")]  # fitted again
    shutil.rmtree(out)

    fixed = run(client, data / S2, out, "threshold", {"band": 8, "value": 1500}, chunk=[256, 256])
    assert fixed.chunks_computed == 4 and not (fixed.plan.records / FITTED).exists()  # nothing fitted
    shutil.rmtree(out)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))  # a "disk" that fills at 400 kB
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing us


def test_full_disk_during_finalize_leaves_nothing_that_looks_complete(tmp_path) -> None:
    src = write_raster(
        tmp_path / "noise.tif",
        (2048, 2048),
        dtype="uint16",
        seed=5,
        fill=lambda r, c, h, w: np.random.default_rng((r, c)).integers(0, 9000, (1, h, w)).astype(np.uint16),
    )
    out = tmp_path / "out"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        yaml.safe_dump(
            {
                "name": "full-disk",
                "input": {"path": str(src)},
                "segmenter": {"name": "otsu"},
                "tiling": {"chunk": [256, 256]},
                "output": {"dir": str(out), "formats": ["zarr", "cog"]},
            }
        )
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "segpipe"), "run", str(job_file)],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit_file_size,
    )
    assert proc.returncode == 2, proc.stderr
    assert "WriteError" in proc.stderr and "labels.tif" in proc.stderr and "disk" in proc.stderr
    assert not (out / "labels.tif").exists() and not (out / "summary.json").exists()
    assert not list(out.glob(".tmp-*"))  # temporary files were cleaned up
