"""Training checkpoints: tensors, numbers, strings, lists and dicts only, written atomically.

``torch.load(weights_only=True)`` reads them, so loading a checkpoint never runs pickled code;
the file appears under its final name only once fully written (temporary name + ``os.replace``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ReadError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` when there is none."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ReadError(
            f"{path}: not a readable training checkpoint ({e}); delete it (or rerun with --restart) "
            "to train from the start"
        ) from e
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise ReadError(f"{path}: not a segpipe training checkpoint; delete it or rerun with --restart")
    return state
