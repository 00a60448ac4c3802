"""Tiny training jobs on the shared real data, written as YAML files like a user's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

LANDCOVER = "landcover/chesapeake_m_3907833_nw_17_1"


def landcover_job(data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    """4-class Chesapeake job; a depth-2, width-4 U-Net on a few 32x32 patches."""
    job: dict[str, Any] = {
        "name": "landcover-tiny",
        "data": [
            {
                "image": str(data / f"{LANDCOVER}_naip-new.tif"),
                "labels": str(data / f"{LANDCOVER}_lc.tif"),
                "bands": [1, 2, 3, 4],
            }
        ],
        "labels": {"map": {1: 0, 2: 1, 3: 2, 4: 3, 5: 3, 6: 3}},
        "classes": {0: "water", 1: "tree_canopy", 2: "low_vegetation", 3: "barren_impervious"},
        "model": {"depth": 2, "width": 4},
        "patch_size": [32, 32],
        "split": {"val_fraction": 0.2, "axis": 0, "gap": 23},
        "sampling": {"patches_per_epoch": 16, "batch_size": 8, "foreground_fraction": 0.5},
        "optim": {"epochs": 3, "lr": 0.01, "patience": None},
        "seed": 7,
        "threads": 1,
        "output": {"dir": str(out / "work"), "model_dir": str(out / "model")},
    }
    job.update(extra)
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    """Write ``job`` as YAML at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
