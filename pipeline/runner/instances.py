"""Instance stitching on Dask: label chunks, find merges at seams, solve, relabel, object table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client

from pipeline.io import zarr_store
from pipeline.metrics.objects import combine_partials
from pipeline.models import Segmenter
from pipeline.runner import instance_tasks as tasks
from pipeline.runner.plan import Plan
from pipeline.stitching.instance import offsets, solve


def run_instances(plan: Plan, client: Client, segmenter: Segmenter, run: Any, token: str) -> dict[str, Any]:
    """All instance stages; returns counts for the summary.

    ``run(stage, specs, submit, collect=False)`` runs ``submit(spec)`` (a future) for every chunk
    with a bounded number in flight (:func:`pipeline.runner.execute.run_each`), so neither the
    client nor the scheduler holds a future per chunk; with ``collect`` it returns the results.
    """
    local = plan.staging / "local"
    nodata = getattr(plan.source.geometry, "nodata", None)
    done = zarr_store.CompletionLog(plan.records, "label").done()
    todo = [s for s in plan.grid if s.chunk_id not in done]
    seg = client.scatter(segmenter, broadcast=True) if todo else None
    run(
        "label",
        todo,
        lambda s: client.submit(
            tasks.label_chunk,
            plan.staging / "input",
            local,
            s,
            plan.grid.edge_mode,
            nodata,
            seg,
            plan.source.geometry,
            plan.records,
            key=f"label-{s.chunk_id}-{token}",
            retries=plan.spec.retries,
        ),
    )
    rows = {r["chunk_id"]: r for r in zarr_store.CompletionLog(plan.records, "label").rows()}
    specs = list(plan.grid)
    counts = [rows[s.chunk_id]["local_ids"] if s.chunk_id in rows else 0 for s in specs]
    offs = offsets(counts).reshape(plan.grid.counts)
    pairs, seam_rows = _seams(plan, client, segmenter, offs, run, token)
    relabel = solve(pairs, int(sum(counts)))
    stuff = segmenter.stuff_segments if segmenter.kind == "panoptic" else None
    top = relabel.n_objects if segmenter.merge != "none" else max(r["max_id"] for r in rows.values())
    top += len(stuff or {})

    dtype = "uint32" if top < 2**32 else "uint64"
    zarr_store.create_array(
        plan.staging / "labels",
        shape=plan.source.spatial_shape,
        chunks=plan.grid.write_chunks(),
        dtype=dtype,
        geometry=plan.source.geometry,
        attrs={"classes": {str(k): v for k, v in segmenter.classes.items()}, "kind": "instance"},
    )
    parts = plan.records / "objects"
    rel = client.scatter(relabel, broadcast=True)
    run(
        "relabel",
        [s for s in specs if s.chunk_id in rows],  # quarantined chunks stay empty
        lambda s: client.submit(
            tasks.relabel_chunk,
            local,
            plan.staging / "labels",
            plan.records,
            s,
            offs[s.index],
            rel,
            segmenter.merge,
            parts,
            stuff,
            key=f"relabel-{s.chunk_id}-{token}",
            retries=plan.spec.retries,
        ),
    )
    table = combine_partials(
        [pd.read_parquet(p) for p in sorted(parts.glob("*.parquet"))], len(plan.grid.shape)
    )
    table.to_parquet(plan.records / "objects.parquet", index=False)
    seams = pd.DataFrame(seam_rows, columns=["chunk_id", "seam", "merged_pairs", "conflicts"])
    seams.to_parquet(plan.records / "seams.parquet", index=False)

    return {
        "objects": len(table),
        "ids_before_merge": int(sum(counts)),
        "merged_ids": len(relabel.merged),
        "seams": len(seam_rows),
        "seam_conflicts": int(sum(r["conflicts"] for r in seam_rows)),
    }


def _seams(
    plan: Plan, client: Client, segmenter: Segmenter, offs: np.ndarray, run: Any, token: str
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    if segmenter.merge == "none" or len(plan.grid) == 1:
        return np.zeros((0, 2), np.uint64), []
    local = plan.staging / "local"
    # the grid and the offsets travel once to every worker, not with each of the chunks' tasks
    grid, offsets_ = client.scatter([plan.grid, offs], broadcast=True)
    if segmenter.merge == "touch":

        def submit(s: Any) -> Any:
            return client.submit(
                tasks.touch_seams,
                local,
                s,
                grid,
                offsets_,
                segmenter.connectivity,
                key=f"seam-{s.chunk_id}-{token}",
            )
    else:

        def submit(s: Any) -> Any:
            return client.submit(
                tasks.overlap_seams,
                local,
                plan.records,
                s,
                grid,
                offsets_,
                segmenter.iou_threshold,
                key=f"seam-{s.chunk_id}-{token}",
            )

    results = run("seams", list(plan.grid), submit, collect=True)
    pairs = [p for p, _ in results if len(p)]
    rows = sorted((r for _, rs in results for r in rs), key=lambda r: (r["chunk_id"], str(r["seam"])))

    return (np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.uint64)), rows


def object_table_path(plan: Plan) -> Path:
    """Where the combined per-object statistics (pixel units) are kept."""
    return plan.records / "objects.parquet"
