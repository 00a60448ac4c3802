"""Acceptance (operations 5): a TLS cluster accepts the job with certificates, refuses it without."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.test_cli_scheduler import _free_port, _spawn

BIN = Path(sys.executable).parent
JOB = Path(__file__).resolve().parents[2] / "jobs" / "flood_water_otsu.yaml"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA and one node certificate signed by it (made by the test itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=segpipe-test-ca",
        cwd=folder,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=folder,
    )
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        cwd=folder,
    )
    return {"ca": folder / "ca.pem", "cert": folder / "node.pem", "key": folder / "node.key"}


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    certs = make_certificates(folder / "certs")
    tls = [
        "--tls-ca-file",
        str(certs["ca"]),
        "--tls-cert",
        str(certs["cert"]),
        "--tls-key",
        str(certs["key"]),
    ]
    port = _free_port()
    address = f"tls://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        _spawn(
            [
                "scheduler",
                "--protocol",
                "tls",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
                *tls,
            ],
            folder / "s.log",
            env,
        )
    ]
    time.sleep(1.0)
    procs += [
        _spawn(
            ["worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", *tls],
            folder / f"w{i}.log",
            env,
        )
        for i in range(2)
    ]
    profile = folder / "profile.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "kind": "address",
                "address": address,
                "tls": {
                    "ca_file": "certs/ca.pem",
                    "cert_file": "certs/node.pem",
                    "key_file": "certs/node.key",
                },
            }
        )
    )
    time.sleep(3.0)
    try:
        yield address, profile
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_job_runs_with_certificates(tls_cluster, tmp_path) -> None:
    _, profile = tls_cluster
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(BIN / "segpipe"), "run", str(JOB), "--profile", str(profile), "--set", f"output.dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.json").exists() and (out / "labels.tif").exists()


@pytest.mark.parametrize("scheme", ["tls", "tcp"])
def test_client_without_certificates_is_refused(tls_cluster, tmp_path, scheme) -> None:
    address, _ = tls_cluster
    address = address.replace("tls://", f"{scheme}://")
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(BIN / "segpipe"), "run", str(JOB), "--scheduler", address, "--set", f"output.dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "cannot reach the Dask scheduler" in proc.stderr
    assert not (out / "summary.json").exists()


def test_cluster_up_serves_jobs(tmp_path) -> None:
    """`segpipe cluster up` starts a scheduler and workers that `segpipe run --scheduler` uses."""
    port = _free_port()
    log = tmp_path / "up.log"
    with open(log, "w") as fh:
        up = subprocess.Popen(
            [
                str(BIN / "segpipe"),
                "cluster",
                "up",
                "--workers",
                "2",
                "--port",
                str(port),
                "--stop-after",
                "240",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        t0 = time.time()
        while "scheduler: tcp://127.0.0.1" not in log.read_text():
            assert time.time() - t0 < 120 and up.poll() is None, log.read_text()
            time.sleep(0.2)
        assert "workers: 2 CPU + 0 GPU" in log.read_text()
        out = tmp_path / "out"
        proc = subprocess.run(
            [
                str(BIN / "segpipe"),
                "run",
                str(JOB),
                "--scheduler",
                f"tcp://127.0.0.1:{port}",
                "--set",
                f"output.dir={out}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert (out / "summary.json").exists()
    finally:
        up.terminate()
        up.wait(timeout=60)
