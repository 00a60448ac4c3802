"""Remote inputs and outputs through fsspec: ``http(s)://`` (read only) and ``s3://`` URLs.

Credentials never come from job files. For ``s3://`` every process that touches a URL (the one
that plans and publishes the job, and every Dask worker that reads its chunks) finds them in its
own environment through botocore's usual chain: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
(``AWS_SESSION_TOKEN``), or ``AWS_PROFILE`` with a shared credentials file, and
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible server, ``AWS_REGION``.
Only URLs travel in Dask graphs; each process builds its own filesystem.

Rasters are read by region: GDAL reads through an fsspec file object, which turns every read into
an HTTP range request (a read-ahead of :data:`READ_AHEAD` bytes serves the small header reads).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

import fsspec

from pipeline.errors import ConfigError, PipelineError, ReadError, WriteError

#: URL schemes segpipe reads; only ``s3`` is written.
SCHEMES = ("http", "https", "s3")
WRITABLE = ("s3",)
#: Bytes fetched beyond each read: COG headers are read in many small pieces.
READ_AHEAD = 64 * 1024
#: Query parameters of pre-signed URLs: credentials, which would be copied into outputs.
SIGNED_QUERY = ("x-amz-credential", "x-amz-signature", "x-amz-security-token", "signature", "sig")
CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an "
    "S3-compatible server, in the environment of the process running segpipe and of every Dask "
    "worker (job files never hold credentials)"
)

_FILESYSTEMS: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}


class URL(str):
    """A URL that has a ``name`` like a :class:`~pathlib.Path` (its last path component)."""

    __slots__ = ()

    @property
    def name(self) -> str:
        """``labels.tif`` of ``s3://bucket/run/labels.tif``."""
        return url_name(self)


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path and path.split("://", 1)[0].isidentifier()


def check_url(url: str, *, what: str, write: bool = False) -> str:
    """Return ``url`` if segpipe can use it; raise :class:`ConfigError` saying why not."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    allowed = WRITABLE if write else SCHEMES
    if scheme not in allowed:
        kinds = "s3:// URLs" if write else "http(s):// and s3:// URLs"
        raise ConfigError(
            f"{what} {redact(url)!r}: scheme {scheme!r} is not supported; segpipe "
            f"{'writes' if write else 'reads'} local paths and {kinds}"
        )
    if parts.username or parts.password:
        raise ConfigError(
            f"{what} {redact(url)!r}: the URL holds credentials (user:password@); job files never "
            f"hold credentials. Remove them from the URL and {CREDENTIALS_HINT}."
        )
    signed = sorted(k for k in parse_qs(parts.query) if k.lower() in SIGNED_QUERY)
    if signed:
        raise ConfigError(
            f"{what} {redact(url)!r}: a pre-signed URL (query {', '.join(signed)}) carries "
            "credentials, which would be copied into job.resolved.yaml and summary.json; use the "
            f"plain s3:// URL and {CREDENTIALS_HINT}."
        )
    if not parts.netloc:
        raise ConfigError(f"{what} {url!r}: no {'bucket' if scheme == 's3' else 'host'} in the URL")
    return url


def redact(url: str) -> str:
    """``url`` without a password or query string (for messages)."""
    parts = urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    netloc = f"***@{host}" if parts.username or parts.password else parts.netloc
    return parts._replace(netloc=netloc, query="***" if parts.query else "").geturl()


def url_name(url: str) -> str:
    """The last path component of ``url`` (``labels.tif``)."""
    return posixpath.basename(urlsplit(url).path.rstrip("/"))


def join(url: str, *parts: str) -> str:
    """``url/part/...``."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(url: str, *, asynchronous: bool = False) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of ``url``, configured from this process's environment.

    One instance per scheme and environment: a process whose ``AWS_*`` variables change gets a
    new instance (fsspec's own cache would keep the old credentials).
    """
    scheme = urlsplit(url).scheme.lower()
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (scheme, asynchronous, env if scheme == "s3" else ())
    if key not in _FILESYSTEMS:
        options: dict[str, Any] = {"skip_instance_cache": True, "asynchronous": asynchronous}
        if scheme == "s3":
            options["use_listings_cache"] = False
        _FILESYSTEMS[key] = fsspec.filesystem(scheme, **options)
    return _FILESYSTEMS[key]


def _fs_path(url: str, fs: fsspec.AbstractFileSystem) -> str:
    return str(fs._strip_protocol(url))


def where(url: str) -> str:
    """The server a URL goes to, for messages."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        return (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"S3 endpoint {endpoint}" if endpoint else "AWS S3 (no AWS_ENDPOINT_URL set)"


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the server could not be reached (refused, timed out, no route)."""
    return isinstance(error, ConnectionError | TimeoutError) or "ClientConnectorError" in type(error).__name__


def _root_cause(error: BaseException) -> BaseException:
    """The connection error under fsspec's "not found" (it reports an unreachable host so)."""
    seen = error
    while (seen := seen.__cause__ or seen.__context__) is not None:  # type: ignore[assignment]
        if _unreachable(seen):
            return seen
    return error


def explain(url: str, action: str, error: BaseException) -> str:
    """A message naming the URL, what failed, the likely cause and the fix."""
    error = _root_cause(error)
    text = f"{type(error).__name__}: {error}"
    head = f"{redact(url)}: {action} failed"
    process = f"process {socket.gethostname()}:{os.getpid()}"
    name = type(error).__name__
    if isinstance(error, FileNotFoundError) and "bucket" in str(error).lower():
        bucket = urlsplit(url).netloc
        return f"{head}: bucket {bucket!r} does not exist at {where(url)} ({text}). Create it or fix the URL."
    if isinstance(error, FileNotFoundError):
        return f"{head}: not found at {where(url)} ({text}). Check the URL."
    if name == "NoCredentialsError":
        return f"{head}: no S3 credentials in the environment of {process}; {CREDENTIALS_HINT}."
    unreachable = _unreachable(error)
    if not unreachable and (
        isinstance(error, PermissionError) or re.search(r"\b403\b|Forbidden|AccessDenied", str(error))
    ):
        return (
            f"{head}: access denied by {where(url)} in {process} ({text}); the credentials are wrong "
            f"or lack permission: {CREDENTIALS_HINT}."
        )
    if unreachable or "connect" in text.lower():
        return (
            f"{head}: cannot reach {where(url)} ({text}). Check the URL (or AWS_ENDPOINT_URL) and the server."
        )
    return f"{head} at {where(url)} ({text})."


def remote_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a remote operation raises (fsspec, botocore, aiohttp)."""
    found: list[type[BaseException]] = [OSError, ValueError, RuntimeError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        found += [BotoCoreError, ClientError]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    try:
        from aiohttp import ClientError as HttpClientError

        found.append(HttpClientError)
    except ImportError:  # pragma: no cover - fsspec's http needs aiohttp
        pass
    return tuple(found)


@contextmanager
def explained(url: str, action: str, *, error: type[PipelineError] = ReadError) -> Iterator[None]:
    """Turn a remote failure inside the block into ``error`` with :func:`explain`'s message."""
    try:
        yield
    except PipelineError:
        raise
    except remote_errors() as e:
        raise error(explain(url, action, e)) from e


def diagnose(url: str, action: str) -> None:
    """Raise a clear :class:`ReadError` if ``url`` cannot be reached; return if it can."""
    fs = filesystem(url)
    with explained(url, action):
        fs.info(_fs_path(url, fs))


def exists(url: str) -> bool:
    """Whether an object exists at ``url`` (errors other than "not found" are raised)."""
    fs = filesystem(url)
    with explained(url, "checking"):
        try:
            fs.info(_fs_path(url, fs))
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise
            return False
    return True


def open_read(url: str, mode: str = "rb") -> IO[bytes]:
    """A seekable file object on ``url`` whose reads are range requests."""
    fs = filesystem(url)
    return fs.open(  # type: ignore[no-any-return]
        _fs_path(url, fs), mode, block_size=READ_AHEAD, cache_type="readahead"
    )


def identity(url: str) -> list[Any]:
    """What identifies the data at ``url`` for fingerprints: sizes and versions (ETag, date).

    A folder (a zarr array on S3) lists every object; an HTTP folder cannot be listed, so its
    ``zarr.json`` stands for it.
    """
    fs = filesystem(url)
    with explained(url, "reading"):
        path = _fs_path(url, fs)
        found = fs.info(path)
        if found.get("type") == "directory":
            if urlsplit(url).scheme.lower() != "s3":
                return [url, _version(fs.info(_fs_path(join(url, "zarr.json"), fs)))]
            files = fs.find(path, detail=True)
            return [url] + [[name[len(path) :], _version(v)] for name, v in sorted(files.items())]
        return [url, _version(found)]


def _version(found: dict[str, Any]) -> list[Any]:
    keys = ("size", "ETag", "LastModified", "Last-Modified", "mtime")
    return [str(found[k]) for k in keys if found.get(k) is not None]


def zarr_store(url: str, *, read_only: bool = True) -> Any:
    """A zarr v3 ``FsspecStore`` on ``url``."""
    from zarr.storage import FsspecStore

    fs = filesystem(url, asynchronous=True)
    return FsspecStore(fs, read_only=read_only, path=_fs_path(url, fs))


def read_json(url: str) -> Any:
    """The JSON document at ``url``, or ``None`` when there is none."""
    fs = filesystem(url)
    with explained(url, "reading"):
        try:
            return json.loads(fs.cat_file(_fs_path(url, fs)))
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise
            return None


def is_empty(url: str) -> bool:
    """Whether no object lies under the folder ``url`` (the bucket must exist)."""
    fs = filesystem(url)
    with explained(url, "listing"):
        try:
            return not fs.ls(_fs_path(url, fs))
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():  # a missing bucket is an error, not an empty folder
                raise
            return True


def put_text(url: str, text: str) -> None:
    """Write ``text`` to ``url`` (one PUT: the object appears whole or not at all)."""
    fs = filesystem(url)
    with explained(url, "writing", error=WriteError):
        fs.pipe_file(_fs_path(url, fs), text.encode())


def put(local: Path, url: str) -> None:
    """Upload the file or folder ``local`` to ``url`` (a folder keeps its layout below ``url``)."""
    fs = filesystem(url)
    target = _fs_path(url, fs)
    with explained(url, f"uploading {local}", error=WriteError):
        if local.is_dir():
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                fs.put_file(str(file), f"{target}/{file.relative_to(local).as_posix()}")
        else:
            fs.put_file(str(local), target)


def remove(url: str, *, recursive: bool = False) -> None:
    """Delete the object (or with ``recursive`` every object below) ``url``; absent is fine."""
    fs = filesystem(url)
    with explained(url, "deleting", error=WriteError):
        try:
            fs.rm(_fs_path(url, fs), recursive=recursive)
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise
