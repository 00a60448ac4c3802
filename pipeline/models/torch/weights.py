"""Loading model weights safely: safetensors, or ``torch.load(weights_only=True)``; never pickle.

A checkpoint that would need arbitrary unpickling (code run on load) is refused with a
clear error; nothing is ever downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.errors import ReadError

SAFE_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (safetensors, or a tensors-only torch checkpoint) on the CPU."""
    p = Path(path)
    if not p.is_file():
        raise ReadError(
            f"{p}: weights file not found; models are trained by `segpipe train` or supplied "
            "by you (nothing is downloaded)"
        )
    if p.name.endswith(SAFE_SUFFIXES):
        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ReadError(f"{p}: not a readable safetensors file ({e}); re-export the weights") from e
    if p.name.endswith(TORCH_SUFFIXES):
        return _torch_tensors_only(p)
    raise ReadError(
        f"{p}: unknown weights format; use .safetensors (preferred) or a torch state dict {TORCH_SUFFIXES}"
    )


def _torch_tensors_only(p: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
        raise ReadError(
            f"{p}: refused: this checkpoint holds objects other than tensors, and loading it would run "
            "pickled code. Save a state dict of tensors (torch.save(model.state_dict(), ...)) or convert "
            "it to safetensors on a machine you trust."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReadError(f"{p}: expected a state dict of tensors (name -> tensor); got {type(state).__name__}")
    return state
