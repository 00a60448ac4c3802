"""Publish a run to a remote output folder (``output.dir: s3://bucket/prefix``).

The run itself happens in a local (or shared) work folder, ``output.work_dir``: the staging
store, the completion records and every output are written and checked there, so resume and the
"hidden name, then rename" rule work as for local outputs. The remote folder then receives the
finished outputs under the same relative paths (``labels.tif``, ``staging.zarr/labels``,
``tiles.parquet``, ...), and ``summary.json`` last: a remote folder without it is not a finished
run, whatever else it holds. Each object is one PUT, so it is there whole or not at all.

The remote folder is claimed like a local one: ``.segpipe/job.json`` (job name and fingerprint) is
written first; a folder holding another job's results is refused (``--restart`` empties it), and a
non-empty folder segpipe did not claim is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import OutputConflictError
from pipeline.io import remote
from pipeline.runner.plan import Plan

OWNER = ".segpipe/job.json"


def _owner(url: str) -> Any:
    return remote.read_json(remote.join(url, OWNER))


def check_remote(plan: Plan, *, restart: bool = False) -> None:
    """Raise if the remote folder holds what this job must not overwrite."""
    url = plan.publish
    if url is None:
        return
    owner = _owner(url)
    if owner is None:
        if not remote.is_empty(url):
            raise OutputConflictError(
                f"{url}: the remote output folder holds objects that segpipe did not write; choose an "
                "empty or new prefix (output.dir or --set output.dir=...)"
            )
        return
    if owner.get("fingerprint") != plan.fingerprint and not restart:
        raise OutputConflictError(
            f"{url}: holds results of a different job ({owner.get('name')!r}, fingerprint "
            f"{owner.get('fingerprint')}, this job {plan.fingerprint}); results are never mixed. Use "
            "another output.dir, or rerun with --restart to delete the old results."
        )


def claim_remote(plan: Plan, *, restart: bool = False) -> None:
    """Own the remote folder: clear another job's results (``restart``), drop an old summary."""
    url = plan.publish
    if url is None:
        return
    check_remote(plan, restart=restart)
    owner = _owner(url)
    if owner is not None and owner.get("fingerprint") != plan.fingerprint:
        remote.remove(url, recursive=True)  # restart: the old job's outputs go
    # A rerun's uploads replace the old files one by one: the folder is not complete meanwhile.
    remote.remove(remote.join(url, "summary.json"))
    record = {"name": plan.spec.name, "fingerprint": plan.fingerprint}
    remote.put_text(remote.join(url, OWNER), json.dumps(record))


def upload(plan: Plan, outputs: dict[str, str]) -> dict[str, str]:
    """Upload every output (a file or folder in the work folder); return their URLs by name."""
    url = plan.publish
    if url is None:
        return outputs
    urls = {}
    for name, local in outputs.items():
        rel = Path(local).relative_to(plan.out).as_posix()
        target = remote.join(url, rel)
        remote.put(Path(local), target)
        urls[name] = target
    return urls


def put_summary(plan: Plan, text: str) -> None:
    """Upload ``summary.json``: the last object written, which marks the folder complete."""
    if plan.publish is not None:
        remote.put_text(remote.join(plan.publish, "summary.json"), text)
