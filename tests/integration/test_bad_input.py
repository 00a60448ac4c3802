"""Acceptance (spine 6): every bad input gets a clear PipelineError and nothing looks complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
import zarr

from pipeline.data import GeoRef, wrap_image
from pipeline.errors import (
    ChunkTooSmallError,
    ConfigError,
    HaloTooSmallError,
    InvalidImageError,
    OutputConflictError,
    PipelineError,
    ReadError,
    UnknownNameError,
)
from pipeline.io.zarr_store import create_array
from pipeline.runner.cli import main
from pipeline.runner.spec import load_job
from pipeline.testing import write_raster
from tests.helpers import job, run

S2 = Path("geo") / "Spain_7370579_S2Hand.tif"


def assert_nothing_complete(out: Path) -> None:
    assert not (out / "summary.json").exists()
    for name in ("labels.tif", "labels.nii.gz", "labels.mha", "quicklook.png", "tiles.parquet"):
        assert not (out / name).exists(), name


def expect(client, exc: type[PipelineError], words: list[str], *args, **kwargs) -> None:
    out = args[1]
    with pytest.raises(exc) as info:
        run(client, *args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert_nothing_complete(out)


def test_missing_file(client, tmp_path) -> None:
    missing = tmp_path / "nope.tif"
    expect(
        client,
        ReadError,
        [str(missing), "no such file", "input.path"],
        missing,
        tmp_path / "out",
        "otsu",
        chunk=[64, 64],
    )


def test_truncated_geotiff(client, data, tmp_path) -> None:
    src = (data / S2).read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(src[: len(src) // 2])
    expect(client, ReadError, [str(bad), "truncated", "Re-"], bad, tmp_path / "out", "otsu", chunk=[64, 64])


def test_text_file_named_tif(client, tmp_path) -> None:
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not a raster\n")
    expect(
        client, ReadError, [str(bad), "not a readable raster"], bad, tmp_path / "out", "otsu", chunk=[64, 64]
    )


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4, 5, 6)], ids=["1d", "5d"])
def test_1d_and_5d_zarr_arrays(client, tmp_path, shape) -> None:
    path = tmp_path / "odd.zarr"
    create_array(
        path,
        shape=shape,
        chunks=shape,
        dtype="uint8",
        geometry=GeoRef("EPSG:4326", (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)),
    )
    zarr.open_array(store=str(path), mode="r+")[...] = np.ones(shape, "uint8")
    expect(
        client,
        InvalidImageError,
        [str(path), f"{len(shape) - 1}-D data is not supported", "Squeeze"],
        path,
        tmp_path / "out",
        "otsu",
        chunk=[4, 4],
    )


def test_4d_nifti(client, tmp_path) -> None:
    vols = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)) for _ in range(2)]
    path = tmp_path / "series4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(vols), str(path))
    expect(
        client,
        InvalidImageError,
        [str(path), "4-D", "3-D"],
        path,
        tmp_path / "out",
        "threshold",
        {"value": 0},
        chunk=[2, 2, 2],
    )


@pytest.mark.parametrize("array", [np.zeros(10), np.zeros((2, 2, 2, 2, 2))], ids=["1d", "5d"])
def test_python_api_rejects_1d_and_5d(array) -> None:
    with pytest.raises(InvalidImageError, match="not supported"):
        wrap_image(array, GeoRef(None, (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)))


def test_raster_without_crs(client, tmp_path) -> None:
    path = write_raster(tmp_path / "nocrs.tif", (64, 64), crs=None)
    expect(
        client,
        InvalidImageError,
        [str(path), "no CRS", "allow_missing_crs"],
        path,
        tmp_path / "out",
        "otsu",
        chunk=[32, 32],
    )
    # allowed explicitly: the run completes and the output has no CRS either
    spec = job(
        path,
        tmp_path / "ok",
        "otsu",
        chunk=[32, 32],
        formats=["cog"],
        input={"path": str(path), "allow_missing_crs": True},
    )
    from pipeline.runner.api import run_job

    result = run_job(spec, client=client)
    import rasterio

    with rasterio.open(result.outputs["cog"]) as ds:
        assert ds.crs is None


def test_chunk_smaller_than_halo(client, data, tmp_path) -> None:
    expect(
        client,
        ChunkTooSmallError,
        ["tiling.chunk", "[16, 16]", "at least 40"],
        data / S2,
        tmp_path / "out",
        "otsu",
        {"band": 8, "smooth_sigma": 10},
        chunk=[16, 16],
    )


def test_halo_override_too_small(client, data, tmp_path) -> None:
    spec_kwargs = {"tiling": {"chunk": [128, 128], "halo": 2}}
    with pytest.raises(HaloTooSmallError, match=r"tiling.halo 2 .* at least 6"):
        from pipeline.runner.api import run_job

        run_job(
            job(
                data / S2,
                tmp_path / "out",
                "otsu",
                {"band": 8, "smooth_sigma": 1.5},
                chunk=[128, 128],
                **spec_kwargs,
            ),
            client=client,
        )
    assert_nothing_complete(tmp_path / "out")


def test_unknown_segmenter_says_did_you_mean(client, data, tmp_path) -> None:
    expect(
        client,
        UnknownNameError,
        ["'otsuu'", "Did you mean 'otsu'"],
        data / S2,
        tmp_path / "out",
        "otsuu",
        chunk=[64, 64],
    )


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"band": "B99"}, ["segmenter.params.band", "'B99'", "B8A"]),
        ({"bnad": 3}, ["segmenter.params.bnad", "Allowed parameters", "band"]),
        ({"smooth_sigma": -1}, ["segmenter.params.smooth_sigma", "greater than or equal to 0"]),
    ],
)
def test_bad_segmenter_parameters(client, data, tmp_path, params, words) -> None:
    expect(client, ConfigError, words, data / S2, tmp_path / "out", "otsu", params, chunk=[64, 64])


def test_threshold_needs_exactly_one_rule(client, data, tmp_path) -> None:
    expect(
        client,
        ConfigError,
        ["exactly one of value, window, windows or preset"],
        data / S2,
        tmp_path / "out",
        "threshold",
        {"value": 1, "window": [0, 2]},
        chunk=[64, 64],
    )


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


def test_wrong_output_format_for_kind(client, data, tmp_path) -> None:
    expect(
        client,
        ConfigError,
        ["output.formats ['nifti']", "raster"],
        data / S2,
        tmp_path / "out",
        "otsu",
        {"band": 8},
        chunk=[64, 64],
        formats=["nifti"],
    )


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
    expect(
        client,
        OutputConflictError,
        [str(out), "did not write"],
        data / S2,
        out,
        "otsu",
        {"band": 8},
        chunk=[256, 256],
    )
    assert (out / "thesis.docx").read_text() == "precious"


def test_same_job_rerun_resumes_and_skips_completed_chunks(client, data, tmp_path) -> None:
    out = tmp_path / "out"
    first = run(client, data / S2, out, "otsu", {"band": 8}, chunk=[256, 256], formats=["cog"])
    second = run(client, data / S2, out, "otsu", {"band": 8}, chunk=[256, 256], formats=["cog"])
    assert (first.chunks_computed, second.chunks_computed, second.chunks_skipped) == (4, 0, 4)
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"
    shutil.rmtree(out)
