"""Scheduled multi-scene jobs: one item per scene, skipped when unchanged, recorded in a ledger.

A job whose ``input.path`` is a glob (``scenes/*.tif``) is run once per matching file, each
into ``OUT/<item>/``. An item whose fingerprint (input identity, segmenter, parameters, tile
geometry) already has a complete result is skipped, so a cron entry can call the same job
every day and only new or changed scenes are processed. Every run and item is recorded in
an SQLite ledger (``OUT/ledger.sqlite``).
"""

from __future__ import annotations

import glob
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, PipelineError
from pipeline.runner.spec import JobSpec

SCHEMA = """
create table if not exists runs (run_id text primary key, job text, started real, finished real,
                                 status text, processed integer, skipped integer, failed integer);
create table if not exists items (run_id text, item text, input text, fingerprint text, status text,
                                  seconds real, outputs text, error text);
"""


def is_multi_scene(spec: JobSpec) -> bool:
    """Whether the job's input is a glob of scenes."""
    return any(ch in spec.input.path for ch in "*?[")


def scene_specs(spec: JobSpec) -> list[tuple[str, JobSpec]]:
    """``(item id, job spec)`` per scene matching the glob, in sorted order."""
    scenes = sorted(glob.glob(spec.input.path))
    if not scenes:
        raise ConfigError(f"input.path {spec.input.path!r} matches no file; check the glob")
    out = Path(spec.output.dir or "")
    items = []
    for scene in scenes:
        item = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(scene).name.split(".")[0])
        items.append(
            (
                item,
                spec.model_copy(
                    update={
                        "name": f"{spec.name}-{item}"[:120],
                        "input": spec.input.model_copy(update={"path": scene}),
                        "output": spec.output.model_copy(update={"dir": str(out / item)}),
                    }
                ),
            )
        )
    return items


@contextmanager
def ledger(path: Path) -> Iterator[sqlite3.Connection]:
    """The SQLite ledger (created on first use)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    try:
        con.executescript(SCHEMA)
        yield con
        con.commit()
    finally:
        con.close()


def already_done(out: Path, fingerprint: str) -> bool:
    """Whether ``out`` holds a complete result with this fingerprint."""
    summary = out / "summary.json"
    if not summary.exists():
        return False
    record = json.loads(summary.read_text())
    return bool(record.get("status") == "complete" and record.get("fingerprint") == fingerprint)


def run_scheduled(spec: JobSpec, execute_item: Any, make_plan: Any) -> dict[str, Any]:
    """Run every scene not yet done; ``execute_item(plan) -> outputs``; returns the run record."""
    root = Path(spec.output.dir or "")
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    counts = {"processed": 0, "skipped": 0, "failed": 0}
    with ledger(root / "ledger.sqlite") as con:
        con.execute(
            "insert into runs values (?, ?, ?, null, 'running', 0, 0, 0)", (run_id, spec.name, time.time())
        )
        con.commit()
        for item, item_spec in scene_specs(spec):
            plan = make_plan(item_spec)
            row = _run_item(plan, item, execute_item, counts)
            con.execute("insert into items values (?, ?, ?, ?, ?, ?, ?, ?)", (run_id, *row))
            con.commit()
        status = "failed" if counts["failed"] else "complete"
        con.execute(
            "update runs set finished = ?, status = ?, processed = ?, skipped = ?, failed = ? "
            "where run_id = ?",
            (time.time(), status, counts["processed"], counts["skipped"], counts["failed"], run_id),
        )
    return {"run_id": run_id, "status": status, **counts}


def _run_item(plan: Any, item: str, execute_item: Any, counts: dict[str, int]) -> tuple[Any, ...]:
    base = (item, str(plan.source.path), plan.fingerprint)
    if already_done(plan.out, plan.fingerprint):
        counts["skipped"] += 1
        return (*base, "skipped", 0.0, "{}", None)
    t0 = time.perf_counter()
    try:
        outputs = execute_item(plan)
    except PipelineError as e:
        counts["failed"] += 1
        return (*base, "failed", time.perf_counter() - t0, "{}", str(e))
    counts["processed"] += 1
    return (*base, "complete", time.perf_counter() - t0, json.dumps(outputs), None)


def history(path: Path) -> list[dict[str, Any]]:
    """Every run in the ledger with its items, oldest first."""
    if not path.exists():
        raise ConfigError(f"{path}: no ledger here; give the output folder of a multi-scene job")
    with ledger(path) as con:
        con.row_factory = sqlite3.Row
        runs = [dict(r) for r in con.execute("select * from runs order by started")]
        for run in runs:
            run["items"] = [
                dict(r)
                for r in con.execute(
                    "select item, status, seconds, error from items where run_id = ? order by item",
                    (run["run_id"],),
                )
            ]
    return runs
