"""Real servers on loopback for the remote I/O tests: nginx (HTTP range requests) and moto (S3).

Each is started as a subprocess on a free port of 127.0.0.1 with its files in a test folder, and
stopped (by its own process id) when the test module ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 64; }}
http {{
  log_format ranges '$request_method $uri $status $body_bytes_sent "$http_range"';
  access_log {root}/access.log ranges;
  client_body_temp_path {root}/tmp/body;
  proxy_temp_path {root}/tmp/proxy;
  fastcgi_temp_path {root}/tmp/fastcgi;
  uwsgi_temp_path {root}/tmp/uwsgi;
  scgi_temp_path {root}/tmp/scgi;
  types {{ image/tiff tif; application/json json; }}
  server {{
    listen 127.0.0.1:{port};
    root {root}/www;
  }}
}}
"""


def free_port() -> int:
    """A TCP port nobody listens on now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Wait until ``port`` accepts connections; fail with the server's log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {log.read_text() if log.exists() else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"server did not listen on 127.0.0.1:{port} within {timeout} s: {log.read_text()}")


@contextmanager
def _running(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, proc, log)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Nginx:
    """A running nginx: its base URL, the folder it serves and its access log."""

    url: str
    www: Path
    access_log: Path

    def log_lines(self) -> list[str]:
        """The access log so far, one request a line: method, uri, status, bytes, "range"."""
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


def nginx_binary() -> str:
    """nginx's path; a clear failure (not a skip) when it is not installed."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail(
            "nginx is not installed: the HTTP range-request tests serve a COG with a real nginx. "
            "Install it (apt-get install nginx; the README test command does this) and rerun."
        )
    return found


@contextmanager
def nginx(root: Path) -> Iterator[Nginx]:
    """Run nginx on a free 127.0.0.1 port serving ``root/www`` (single process, no root needed)."""
    binary = nginx_binary()
    (root / "www").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, port=port))
    cmd = [binary, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")]
    with _running(cmd, port, root / "stdout.log"):
        yield Nginx(f"http://127.0.0.1:{port}", root / "www", root / "access.log")


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server with IAM authentication on, and one user's credentials."""

    endpoint: str
    key: str
    secret: str
    admin: tuple[str, str]
    log: Path

    def requests(self, key: str) -> list[tuple[str, int]]:
        """(method, status) of every request the server logged for ``/bucket/key``."""
        found = []
        for line in self.log.read_text().splitlines():
            plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
            match = re.search(r'"(\w+) /' + re.escape(key) + r' HTTP/[\d.]+" (\d+)', plain)
            if match:
                found.append((match.group(1), int(match.group(2))))
        return found

    def user(self, name: str, statements: list[tuple[str, str, str]]) -> tuple[str, str]:
        """Create another user with the policy ``statements``; return its key and secret."""
        return _create_user(self.endpoint, self.admin, name, policy(*statements))

    def env(self, key: str | None = None, secret: str | None = None) -> dict[str, str]:
        """The environment a segpipe process needs (another user's ``key``/``secret`` if given)."""
        return {
            "AWS_ACCESS_KEY_ID": key or self.key,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def gdal_env(self) -> dict[str, Any]:
        """``rasterio.Env`` options for GDAL's own /vsis3/ on this server (an independent reader)."""
        from rasterio.session import AWSSession

        session = AWSSession(
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
            endpoint_url=self.endpoint.split("://", 1)[1],
        )
        return {"session": session, "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}


def moto_binary() -> str:
    """moto's server script (the ``moto[server]`` dev dependency)."""
    here = Path(sys.executable).parent / "moto_server"
    found = str(here) if here.exists() else shutil.which("moto_server")
    if found is None:
        pytest.fail("moto_server not found: install the dev extra (pip install -e '.[dev]')")
    return found


def _create_user(endpoint: str, auth: tuple[str, str], name: str, policy: str) -> tuple[str, str]:
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        aws_access_key_id=auth[0],
        aws_secret_access_key=auth[1],
        region_name="us-east-1",
    )
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    iam.put_user_policy(UserName=name, PolicyName="policy", PolicyDocument=policy)
    return key["AccessKeyId"], key["SecretAccessKey"]


def policy(*statements: tuple[str, str, str]) -> str:
    """An IAM policy document of ``(effect, action, resource)`` statements."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": e, "Action": a, "Resource": r} for e, a, r in statements],
        }
    )


@contextmanager
def moto_s3(root: Path) -> Iterator[S3Server]:
    """Run ``moto_server`` on a free port with IAM authentication on; create an S3 user.

    moto serves the first three requests (``INITIAL_NO_AUTH_ACTION_COUNT``) unauthenticated: they
    create an administrator, its access key and its policy. Every later request must be signed
    with a key the server issued: a wrong secret is refused with 403 as on AWS.
    """
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    cmd = [moto_binary(), "-H", "127.0.0.1", "-p", str(port)]
    root.mkdir(parents=True, exist_ok=True)
    with _running(cmd, port, root / "moto.log", env=env):
        endpoint = f"http://127.0.0.1:{port}"
        admin = _create_user(endpoint, ("bootstrap", "bootstrap"), "admin", policy(("Allow", "*", "*")))
        key, secret = _create_user(endpoint, admin, "segpipe", policy(("Allow", "s3:*", "*")))
        yield S3Server(endpoint, key, secret, admin, root / "moto.log")
