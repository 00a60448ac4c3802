"""Weights load only from safetensors or tensors-only checkpoints; pickle payloads are refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import ReadError
from pipeline.models.torch.weights import load_weights


class _Payload:
    """Unpickling this runs a command that leaves a marker file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_safetensors_and_tensor_state_dicts_load(tmp_path) -> None:
    state = {"conv.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        assert torch.equal(load_weights(tmp_path / name)["conv.weight"], state["conv.weight"])


def test_checkpoint_with_a_pickle_payload_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"weight": _Payload(marker)}, fh, protocol=2)
    with pytest.raises(ReadError, match=r"refused.*pickled code"):
        load_weights(path)
    assert not marker.exists()


def test_missing_and_unknown_weights(tmp_path) -> None:
    with pytest.raises(ReadError, match="nothing is downloaded"):
        load_weights(tmp_path / "absent.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ReadError, match="unknown weights format"):
        load_weights(tmp_path / "w.onnx")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ReadError, match="re-export"):
        load_weights(tmp_path / "broken.safetensors")
