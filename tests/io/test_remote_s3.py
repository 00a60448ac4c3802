"""COG and zarr inputs and outputs on a real S3-compatible server (moto) on 127.0.0.1.

Credentials reach segpipe only through the environment: this process (which plans and
publishes) gets them with monkeypatch, and the workers of a dedicated cluster are started with
them, as a site would start its workers. The session cluster's workers never get them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import zarr
from zarr.storage import FsspecStore

from pipeline.errors import ChunkFailedError, OutputConflictError, ReadError, WriteError
from pipeline.io import remote
from pipeline.io.sources import open_source
from pipeline.runner.api import run_job
from pipeline.runner.cli import main
from pipeline.runner.execute import RunResult, check_output
from pipeline.runner.plan import make_plan
from pipeline.runner.spec import JobSpec
from tests.helpers import job, labels_of, run
from tests.servers import S3Server, moto_s3

BUCKET = "segpipe-test"
OTSU = {"band": "B8", "foreground": "below", "class_name": "water"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module")
def s3_env(s3: S3Server) -> Iterator[dict[str, str]]:
    """This process's environment holds the S3 user's credentials and the endpoint."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env().items():
            mp.setenv(key, value)
        yield s3.env()


@pytest.fixture(scope="module")
def s3_client(s3_env: dict[str, str]) -> Iterator[Any]:
    """Two worker processes started with the credentials in their environment."""
    from distributed import Client, LocalCluster

    from pipeline.cluster.connect import WORKER_ENV

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit="1GiB",
        env={**WORKER_ENV, **s3_env},
        dashboard_address=":0",
        host="127.0.0.1",
    )
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def fs(s3_env: dict[str, str]) -> Any:
    """An s3fs filesystem of its own (not segpipe's) for setting up and checking the bucket."""
    import s3fs

    return s3fs.S3FileSystem(
        key=s3_env["AWS_ACCESS_KEY_ID"],
        secret=s3_env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
        use_listings_cache=False,
    )


@pytest.fixture(scope="module")
def bucket(fs: Any, data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bucket, holding a COG of the Spain Sentinel-2 chip at inputs/s2.tif."""
    cog = tmp_path_factory.mktemp("cog") / "s2.tif"
    rasterio.shutil.copy(
        data / "geo" / "Spain_7370579_S2Hand.tif", cog, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=128
    )
    fs.mkdir(BUCKET)
    fs.put_file(str(cog), f"{BUCKET}/inputs/s2.tif")
    return f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def local_run(s3_client: Any, data: Path, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """The same job on the local file: what every remote run must equal."""
    return run(
        s3_client,
        data / "geo" / "Spain_7370579_S2Hand.tif",
        tmp_path_factory.mktemp("local") / "out",
        "otsu",
        OTSU,
        chunk=[192, 160],
        formats=["zarr", "cog", "png"],
    )


def remote_job(source: str, out: Path | str, *, work: Path | None = None, **extra: Any) -> JobSpec:
    """A job reading ``source`` (a URL) into ``out`` (a folder or an s3:// URL)."""
    spec = job(Path("/unused/x.tif"), Path("/unused/out"), "otsu", OTSU, chunk=[192, 160], **extra)
    output = {"dir": str(out), "work_dir": str(work) if work else None}
    return spec.model_copy(
        update={
            "input": spec.input.model_copy(update={"path": source}),
            "output": spec.output.model_copy(update={**output, "formats": ["zarr", "cog", "png"]}),
        }
    )


def test_cog_from_s3_to_s3_equals_the_local_run(
    s3_client: Any, bucket: str, local_run: RunResult, s3: S3Server, fs: Any, tmp_path: Path
) -> None:
    out = f"{bucket}/runs/flood"
    result = run_job(remote_job(f"{bucket}/inputs/s2.tif", out, work=tmp_path / "work"), client=s3_client)

    assert all(url.startswith(out + "/") for url in result.outputs.values()), result.outputs
    gets = [status for method, status in s3.requests(f"{BUCKET}/inputs/s2.tif") if method == "GET"]
    assert len(gets) >= 12 and set(gets) == {206}, gets  # 12 chunks read by range requests
    summary = json.loads(fs.cat_file(f"{BUCKET}/runs/flood/summary.json"))
    assert summary["status"] == "complete" and summary["outputs"] == result.outputs
    assert summary["input"]["path"] == f"{bucket}/inputs/s2.tif"
    assert summary["work_dir"] == str(tmp_path / "work")

    # read back with GDAL's own S3 client, not segpipe's: same labels, same geometry
    vsis3, cog = f"/vsis3/{BUCKET}/runs/flood/labels.tif", local_run.outputs["cog"]
    with rasterio.Env(**s3.gdal_env()), rasterio.open(vsis3) as got, rasterio.open(cog) as want:
        np.testing.assert_array_equal(got.read(1), want.read(1))
        assert (got.crs, got.transform, got.nodata) == (want.crs, want.transform, want.nodata)
        assert got.overviews(1) == want.overviews(1)
    options = {"endpoint_url": s3.endpoint, "key": s3.key, "secret": s3.secret}
    store = FsspecStore.from_url(f"{out}/staging.zarr/labels", storage_options=options, read_only=True)
    np.testing.assert_array_equal(zarr.open_array(store=store, mode="r")[...], labels_of(local_run))

    keys = {k.removeprefix(f"{BUCKET}/runs/flood/") for k in fs.find(f"{BUCKET}/runs/flood")}
    published = {u.removeprefix(out + "/").split("/")[0] for u in result.outputs.values()}
    assert {"labels.tif", "quicklook.png", "tiles.parquet", "job.resolved.yaml", "staging.zarr"} <= published
    assert {k.split("/")[0] for k in keys} == published | {".segpipe", "summary.json"}
    assert not any(k.startswith(("staging.zarr/input", ".segpipe/done")) for k in keys)  # stays local
    for name in ("summary.json", "job.resolved.yaml", ".segpipe/job.json"):
        text = fs.cat_file(f"{BUCKET}/runs/flood/{name}").decode()
        assert s3.secret not in text and s3.key not in text
    stamps = {k: fs.info(f"{BUCKET}/runs/flood/{k}")["LastModified"] for k in keys}
    assert stamps["summary.json"] == max(stamps.values())  # written last


def test_zarr_array_on_s3_as_input(
    s3_client: Any, bucket: str, local_run: RunResult, fs: Any, tmp_path: Path
) -> None:
    staged = local_run.plan.staging / "input"  # a segpipe zarr array (geometry in its attributes)
    fs.put(str(staged), f"{BUCKET}/inputs/s2-staged", recursive=True)
    source = open_source(f"{bucket}/inputs/s2-staged")  # no .zarr suffix: found by its zarr.json
    assert (source.format, source.shape) == ("zarr", (13, 512, 512))

    result = run_job(remote_job(f"{bucket}/inputs/s2-staged", tmp_path / "out"), client=s3_client)

    np.testing.assert_array_equal(labels_of(result), labels_of(local_run))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["input"]["format"] == "zarr"


def test_failed_upload_leaves_no_complete_looking_output_and_resumes(
    s3_client: Any, bucket: str, s3: S3Server, fs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # this process publishes; its user may not write tiles.parquet under runs/partial
    denied = f"arn:aws:s3:::{BUCKET}/runs/partial/tiles.parquet"
    key, secret = s3.user("no-tables", [("Allow", "s3:*", "*"), ("Deny", "s3:PutObject", denied)])
    for name, value in s3.env(key, secret).items():
        monkeypatch.setenv(name, value)
    spec = remote_job(f"{bucket}/inputs/s2.tif", f"{bucket}/runs/partial", work=tmp_path / "work")

    with pytest.raises(WriteError, match=r"runs/partial/tiles\.parquet: uploading .* access denied"):
        run_job(spec, client=s3_client)
    assert fs.exists(f"{BUCKET}/runs/partial/labels.tif")  # uploaded before the failure...
    assert not fs.exists(f"{BUCKET}/runs/partial/summary.json")  # ...but the run is not complete
    assert not (tmp_path / "work" / "summary.json").exists()

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    again = run_job(spec, client=s3_client)
    assert again.chunks_skipped == len(again.plan.grid)  # resumed from the local work folder
    assert json.loads(fs.cat_file(f"{BUCKET}/runs/partial/summary.json"))["status"] == "complete"


def test_remote_output_folders_are_claimed(
    s3_env: dict[str, str], bucket: str, fs: Any, tmp_path: Path
) -> None:
    fs.pipe_file(f"{BUCKET}/runs/foreign/notes.txt", b"someone else's")
    foreign = make_plan(remote_job(f"{bucket}/inputs/s2.tif", f"{bucket}/runs/foreign", work=tmp_path / "a"))
    with pytest.raises(OutputConflictError, match=r"runs/foreign: the remote output folder holds objects"):
        check_output(foreign)

    owner = {"name": "other-job", "fingerprint": "0123456789abcdef"}
    fs.pipe_file(f"{BUCKET}/runs/other/.segpipe/job.json", json.dumps(owner).encode())
    other = make_plan(remote_job(f"{bucket}/inputs/s2.tif", f"{bucket}/runs/other", work=tmp_path / "b"))
    with pytest.raises(OutputConflictError, match=r"results of a different job \('other-job'"):
        check_output(other)
    check_output(other, restart=True)  # --restart would replace them


def test_s3_errors_name_the_url_and_the_fix(
    s3_env: dict[str, str], bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ReadError, match=r"bucket 'no-such-bucket' does not exist at S3 endpoint http://127"):
        open_source("s3://no-such-bucket/inputs/s2.tif")
    with pytest.raises(ReadError, match=r"inputs/missing\.tif: opening the raster failed: not found"):
        open_source(f"{bucket}/inputs/missing.tif")
    plan = make_plan(remote_job(f"{bucket}/inputs/s2.tif", "s3://no-such-bucket/out", work=tmp_path / "w"))
    with pytest.raises(
        ReadError,
        match=r"no-such-bucket/out/\.segpipe/job\.json: reading failed: bucket 'no-such-bucket' does not",
    ):
        check_output(plan)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(
        ReadError, match=r"s2\.tif: opening the raster failed: access denied .*AWS_SECRET_ACCESS_KEY"
    ):
        open_source(f"{bucket}/inputs/s2.tif")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ReadError, match=r"no S3 credentials in the environment of process"):
        open_source(f"{bucket}/inputs/s2.tif")
    assert remote.redact("s3://bucket/key") == "s3://bucket/key"


def test_workers_without_credentials_fail_with_the_reason(
    s3_env: dict[str, str], bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client, LocalCluster

    from pipeline.cluster.connect import WORKER_ENV

    with monkeypatch.context() as mp:  # a worker started without the credentials
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.delenv(name)
        cluster = LocalCluster(
            n_workers=1,
            processes=True,
            memory_limit="1GiB",
            env=WORKER_ENV,
            dashboard_address=":0",
            host="127.0.0.1",
        )
    # this process has them back: planning reads the header, the worker's ingest fails
    spec = remote_job(f"{bucket}/inputs/s2.tif", tmp_path / "out", retries=0)
    with (
        cluster,
        Client(cluster) as client,
        pytest.raises(
            ChunkFailedError, match=r"no S3 credentials in the environment of process .*every Dask worker"
        ),
    ):
        run_job(spec, client=client)


def test_segpipe_run_cli_with_s3_input_and_output(
    s3_client: Any, bucket: str, fs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_file = tmp_path / "flood.yaml"
    job_file.write_text(
        "name: flood-s3\n"
        f"input: {{path: {bucket}/inputs/s2.tif}}\n"
        "segmenter: {name: otsu, params: {band: B8, foreground: below, class_name: water}}\n"
        "tiling: {chunk: [256, 256]}\n"
        f"output: {{dir: {bucket}/runs/cli, work_dir: {tmp_path / 'work'}, formats: [zarr, cog]}}\n"
    )
    assert main(["run", str(job_file), "--scheduler", s3_client.scheduler.address]) == 0
    printed = capsys.readouterr().out
    assert f"flood-s3: complete -> {bucket}/runs/cli" in printed
    assert f"{bucket}/runs/cli/labels.tif" in printed
    assert json.loads(fs.cat_file(f"{BUCKET}/runs/cli/summary.json"))["job"] == "flood-s3"

    leaky = tmp_path / "leaky.yaml"
    leaky.write_text(job_file.read_text().replace("input: {", "input: {aws_secret_access_key: abc, "))
    assert main(["run", str(leaky), "--scheduler", s3_client.scheduler.address]) == 2
    assert "input.aws_secret_access_key' looks like a credential" in capsys.readouterr().err
