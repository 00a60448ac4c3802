"""Scheduled multi-scene jobs: one item per scene, skipped when unchanged, recorded in a ledger.

A job whose ``input.path`` is a glob (``scenes/*.tif``) is run once per matching file, each
into ``OUT/<item>/``; one that names a local STAC ItemCollection, Catalog or Collection
(``scenes.json``) is run once per STAC item, on the item's ``input.asset`` raster. An item
whose fingerprint (input identity, segmenter, parameters, tile geometry) already has a
complete result is skipped, so a cron entry can call the same job every day and only new or
changed scenes are processed. Every run and item is recorded in an SQLite ledger
(``OUT/ledger.sqlite``).
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.errors import ConfigError, PipelineError, RunInProgressError
from pipeline.io import remote
from pipeline.runner.spec import JobSpec

SCHEMA = """
create table if not exists runs (run_id text primary key, job text, started real, finished real,
                                 status text, processed integer, skipped integer, failed integer);
create table if not exists items (run_id text, item text, input text, fingerprint text, status text,
                                  seconds real, outputs text, error text);
"""


def is_multi_scene(spec: JobSpec) -> bool:
    """Whether the job's input is a glob of scenes or a STAC file of items (never a URL)."""
    if remote.is_url(spec.input.path):
        return False
    return any(ch in spec.input.path for ch in "*?[") or is_stac(spec.input.path)


def is_stac(path: str) -> bool:
    """Whether ``path`` names a STAC JSON file (anything ``*.json`` but a zarr metadata file)."""
    p = Path(path)
    return p.suffix.lower() == ".json" and p.name != "zarr.json"


def scene_specs(spec: JobSpec) -> list[tuple[str, JobSpec]]:
    """``(item id, job spec)`` per scene (glob match or STAC item), sorted by item id."""
    if remote.is_url(spec.output.dir):
        raise ConfigError(
            f"output.dir {spec.output.dir!r}: multi-scene jobs (a glob or STAC input) write to a local "
            "or shared folder (they keep a ledger and a run lock there); s3:// outputs are for "
            "single-input jobs"
        )
    if is_stac(spec.input.path):
        scenes = stac_scenes(Path(spec.input.path), asset=spec.input.asset)
    else:
        scenes = _glob_scenes(spec.input.path)
    _check_unique(scenes, spec.input.path)
    out = Path(spec.output.dir or "")
    return [
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
        for item, scene in sorted(scenes)
    ]


def _item_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _glob_scenes(pattern: str) -> list[tuple[str, str]]:
    scenes = sorted(glob.glob(pattern))
    if not scenes:
        raise ConfigError(f"input.path {pattern!r} matches no file; check the glob")
    return [(_item_id(Path(scene).name.split(".")[0]), scene) for scene in scenes]


def _check_unique(scenes: list[tuple[str, str]], where: str) -> None:
    seen: dict[str, str] = {}
    for item, scene in scenes:
        if item in seen:
            raise ConfigError(
                f"input.path {where!r}: scenes {seen[item]!r} and {scene!r} both become item {item!r} "
                "and would write into the same folder; give them distinct names or STAC ids"
            )
        seen[item] = scene


STAC_TYPES = ("FeatureCollection", "Feature", "Catalog", "Collection")


def stac_scenes(path: Path, *, asset: str = "image") -> list[tuple[str, str]]:
    """``(item id, raster path)`` per item of a local STAC file.

    ``path`` is an ItemCollection (``FeatureCollection``), a single Item, or a Catalog or
    Collection whose ``item`` and ``child`` links are followed. Each item's ``asset`` href
    is a local file; a relative href is resolved against the folder of the JSON holding it.
    """
    scenes = [_asset_path(item, source, asset) for item, source in _stac_items(path, what="input.path")]
    if not scenes:
        raise ConfigError(f"{path}: the STAC file holds no items; add items or point input.path elsewhere")
    return [(_item_id(item), scene) for item, scene in scenes]


def _stac_items(path: Path, *, what: str, seen: set[Path] | None = None) -> Iterator[tuple[Any, Path]]:
    """``(item, JSON file holding it)`` for every item reachable from ``path``."""
    seen = set() if seen is None else seen
    if path.resolve() in seen:
        return
    seen.add(path.resolve())
    doc = _read_stac(path, what=what)
    if doc["type"] == "Feature":
        yield doc, path
    elif doc["type"] == "FeatureCollection":
        yield from ((feature, path) for feature in doc.get("features") or [])
    else:
        for link in doc.get("links") or []:
            if isinstance(link, dict) and link.get("rel") in ("item", "child"):
                href = str(link.get("href", ""))
                target = _local_href(href, path, what=f"{link['rel']} link {href!r}")
                yield from _stac_items(target, what=f"{path}: {link['rel']} link {href!r}", seen=seen)


def _read_stac(path: Path, *, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r}: STAC file not found; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what} {str(path)!r}: not a readable STAC JSON file ({e})") from e
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind not in STAC_TYPES:
        raise ConfigError(
            f"{what} {str(path)!r}: STAC type {kind!r} is not one of {', '.join(STAC_TYPES)}; "
            "a *.json input must be a STAC ItemCollection, Catalog, Collection or Item"
        )
    return doc  # type: ignore[no-any-return]


def _asset_path(item: Any, source: Path, key: str) -> tuple[str, str]:
    item_id = item.get("id") if isinstance(item, dict) else None
    if not isinstance(item_id, str) or not item_id:
        raise ConfigError(f"{source}: a STAC item has no 'id' (got {item_id!r}); every item needs one")
    assets = item.get("assets") or {}
    if key not in assets:
        raise ConfigError(
            f"{source}: STAC item {item_id!r} has no asset {key!r}; its assets are "
            f"{sorted(assets) or 'none'}. Set input.asset to the raster's key"
        )
    href = assets[key].get("href") if isinstance(assets[key], dict) else None
    if not isinstance(href, str) or not href:
        raise ConfigError(f"{source}: STAC item {item_id!r} asset {key!r} has no href")
    return item_id, str(_local_href(href, source, what=f"STAC item {item_id!r} asset {key!r} href {href!r}"))


def _local_href(href: str, source: Path, *, what: str) -> Path:
    """The local file an href names (relative to ``source``'s folder); it must exist."""
    parsed = urlparse(href)
    if parsed.scheme == "file":
        path = Path(url2pathname(parsed.path))
    elif parsed.scheme:
        raise ConfigError(
            f"{source}: {what} is a {parsed.scheme}:// URL; only local files are read. "
            "Download the asset and point the href at the local copy"
        )
    else:
        path = Path(href).expanduser()
    path = Path(os.path.normpath(path if path.is_absolute() else source.parent / path))
    if not path.exists():
        raise ConfigError(
            f"{source}: {what}: file {str(path)!r} not found (relative hrefs are resolved against "
            f"{str(source.parent)!r}); fix the href or restore the file"
        )
    return path


@contextmanager
def single_run(root: Path) -> Iterator[None]:
    """Hold ``OUT/.segpipe-run.lock`` for the run: a second run of the job (an overlapping cron
    start) is refused at once instead of competing for the same scenes."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".segpipe-run.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInProgressError(
                f"{root}: another run of this job is in progress (lock "
                f"{root / '.segpipe-run.lock'}); this one did nothing"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    with single_run(root), ledger(root / "ledger.sqlite") as con:
        con.execute(
            "insert into runs values (?, ?, ?, null, 'running', 0, 0, 0)", (run_id, spec.name, time.time())
        )
        con.commit()
        stac_items: list[Path] = []
        for item, item_spec in scene_specs(spec):
            plan = make_plan(item_spec)
            row = _run_item(plan, item, execute_item, counts)
            con.execute("insert into items values (?, ?, ?, ?, ?, ?, ?, ?)", (run_id, *row))
            con.commit()
            if row[3] in ("complete", "skipped"):  # this scene's rasters, new or from an earlier run
                stac_items += sorted((plan.out / "stac").glob("item-*.json"))
        collection = _write_collection(root, spec.name, run_id, stac_items)
        status = "failed" if counts["failed"] else "complete"
        con.execute(
            "update runs set finished = ?, status = ?, processed = ?, skipped = ?, failed = ? "
            "where run_id = ?",
            (time.time(), status, counts["processed"], counts["skipped"], counts["failed"], run_id),
        )
    return {"run_id": run_id, "status": status, **counts, "collection": collection}


def _write_collection(root: Path, job: str, run_id: str, items: list[Path]) -> str:
    """The run's STAC Collection linking every complete scene's Items (imported here: pystac)."""
    from pipeline.runner.catalog import write_run_collection

    return write_run_collection(root, job, run_id, items)["collection.json"]


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
