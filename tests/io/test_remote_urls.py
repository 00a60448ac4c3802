"""Remote paths in job files: URLs kept as they are, credentials refused, outputs confined."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.io import remote
from pipeline.runner.schedule import is_multi_scene, scene_specs
from pipeline.runner.spec import confine_output, parse_job, resolve_paths


def raw(**sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "remote-job",
        "input": {"path": "s3://bucket/scenes/s2.tif"},
        "segmenter": {"name": "otsu", "params": {"band": 1}},
        "output": {"dir": "s3://bucket/runs/one"},
    }
    return {**base, **sections}


def test_urls_are_kept_and_the_work_folder_is_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = resolve_paths(parse_job(raw()), base=tmp_path / "jobs")
    assert spec.input.path == "s3://bucket/scenes/s2.tif"
    assert spec.output.dir == "s3://bucket/runs/one"
    assert spec.output.work_dir == str(tmp_path / "outputs" / "remote-job")
    http = raw(input={"path": "https://example.org/a/b.tif"}, output={"dir": "out", "formats": ["zarr"]})
    spec = resolve_paths(parse_job(http), base=tmp_path / "jobs")
    assert spec.input.path == "https://example.org/a/b.tif"
    assert (spec.output.dir, spec.output.work_dir) == (str(tmp_path / "out"), None)
    assert not is_multi_scene(
        resolve_paths(parse_job(raw(input={"path": "https://h/x.tif?v=2"})), base=tmp_path)
    )


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("input", "aws_secret_access_key"),
        ("input", "storage_options"),
        ("output", "AWS_ACCESS_KEY_ID"),
        ("output", "token"),
    ],
)
def test_credential_keys_are_refused(section: str, key: str) -> None:
    job = raw()
    job[section] = {**job[section], key: "AKIA-not-a-real-key"}
    with pytest.raises(
        ConfigError, match=rf"key '{section}\.{key}' looks like a credential.*AWS_ACCESS_KEY_ID"
    ):
        parse_job(job, source="job.yaml")


def test_urls_with_credentials_are_refused_without_echoing_them(tmp_path: Path) -> None:
    for url in ("https://alice:hunter2@example.org/x.tif", "s3://bucket/x.tif?X-Amz-Signature=hunter2"):
        with pytest.raises(ConfigError, match="credentials") as err:
            resolve_paths(parse_job(raw(input={"path": url})), base=tmp_path)
        assert "hunter2" not in str(err.value)


def test_unsupported_schemes_and_read_only_http(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"input\.path 'gs://b/x\.tif': scheme 'gs' is not supported"):
        resolve_paths(parse_job(raw(input={"path": "gs://b/x.tif"})), base=tmp_path)
    with pytest.raises(ConfigError, match=r"output\.dir 'https://h/out'.*writes local paths and s3:// URLs"):
        resolve_paths(parse_job(raw(output={"dir": "https://h/out"})), base=tmp_path)
    with pytest.raises(ConfigError, match=r"output\.work_dir 'w' is only used with an s3:// output\.dir"):
        resolve_paths(parse_job(raw(output={"dir": "out", "work_dir": "w"})), base=tmp_path)
    with pytest.raises(ConfigError, match="no bucket"):
        resolve_paths(parse_job(raw(input={"path": "s3:///x.tif"})), base=tmp_path)


def test_output_root_confines_remote_outputs(tmp_path: Path) -> None:
    spec = resolve_paths(parse_job(raw()), base=tmp_path)
    confine_output(spec, "s3://bucket/runs")
    for root in ("s3://bucket/run", "s3://other/runs", str(tmp_path)):
        with pytest.raises(ConfigError, match="outside the output root"):
            confine_output(spec, root)


def test_multi_scene_jobs_write_locally(tmp_path: Path) -> None:
    (tmp_path / "a.tif").write_bytes(b"")
    spec = resolve_paths(parse_job(raw(input={"path": str(tmp_path / "*.tif")})), base=tmp_path)
    assert is_multi_scene(spec)
    with pytest.raises(ConfigError, match=r"multi-scene jobs .* write to a local or shared folder"):
        scene_specs(spec)


def test_urls_travel_in_graphs_as_names() -> None:
    url = remote.URL("s3://bucket/runs/one/labels.tif")
    back = pickle.loads(pickle.dumps(url))
    assert (back, back.name, type(back)) == (url, "labels.tif", remote.URL)
    assert remote.redact("https://u:p@h:8/x.tif?sig=1") == "https://***@h:8/x.tif?***"


def test_an_unreachable_port_containing_403_is_not_access_denied() -> None:
    """CI drew port 44031 once: the refused connection read as an HTTP 403."""
    url = "http://127.0.0.1:44031/s2.tif"
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 44031)")
    try:
        try:
            raise refused
        except ConnectionRefusedError as e:
            raise FileNotFoundError(url) from e
    except FileNotFoundError as wrapped:
        message = remote.explain(url, "opening the raster", wrapped)
    assert "cannot reach 127.0.0.1:44031" in message and "denied" not in message
    denied = PermissionError("An error occurred (403) when calling the HeadObject operation: Forbidden")
    assert "access denied by" in remote.explain("s3://b/k.tif", "reading", denied)
    assert "access denied by" in remote.explain("s3://b/k.tif", "reading", OSError("AccessDenied"))
    assert "denied" not in remote.explain("s3://b/k.tif", "reading", OSError("chunk 4403 is short"))
