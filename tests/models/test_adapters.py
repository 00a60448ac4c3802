"""Bring-your-own model files: TorchScript and ONNX exports of our U-Net reproduce the native model."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from pipeline.data import valid_mask
from pipeline.models import ImageInfo, create_segmenter
from pipeline.models.torch.adapters import load_network
from pipeline.models.torch.card import load_card
from pipeline.runner.cli import main
from tests.helpers import labels_of, run

NAIP = ("landcover", "chesapeake_m_3907833_nw_17_1_naip-new.tif")


def _export(fmt: str, folder) -> object:  # type: ignore[no-untyped-def]
    assert main(["export", "landcover_unet", "--format", fmt, "--out", str(folder)]) == 0
    return load_card(folder)


def _check_logits(card, native, data) -> None:  # type: ignore[no-untyped-def]
    with rasterio.open(data.joinpath(*NAIP)) as ds:
        block = ds.read()
    info = ImageInfo("raster", 4, "uint8", shape=block.shape[1:])
    seg = create_segmenter("unet", {"model": "landcover_unet"}, info)
    x = seg.normalise(block, valid_mask(block, None))
    # windows of odd sizes too: the adapter pads to the network's multiple and crops back
    batch = np.stack([x[:, :100, :131], x[:, 100:200, 50:181]])
    ours = load_network(native, "cpu")(batch)
    theirs = load_network(card, "cpu")(batch)
    assert ours.shape == theirs.shape == (2, 4, 100, 131)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_torchscript_export_reproduces_the_native_model(torch_client, data, tmp_path) -> None:
    native = load_card("landcover_unet")
    card = _export("torchscript", tmp_path / "ts")
    assert card.runtime is not None and card.runtime.format == "torchscript" and card.runtime.align == 8
    assert card.classes == native.classes and card.validation == native.validation
    _check_logits(card, native, data)
    src = data.joinpath(*NAIP)
    a = run(torch_client, src, tmp_path / "a", "unet", {"model": "landcover_unet"}, chunk=[136, 136])
    b = run(torch_client, src, tmp_path / "b", "unet", {"model": str(tmp_path / "ts")}, chunk=[136, 136])
    assert np.array_equal(labels_of(a), labels_of(b))
    assert a.plan.fingerprint != b.plan.fingerprint  # another model file: another job


@pytest.mark.slow
def test_onnx_export_reproduces_the_native_model(data, tmp_path) -> None:
    native = load_card("landcover_unet")
    card = _export("onnx", tmp_path / "onnx")
    assert card.runtime is not None and card.runtime.format == "onnx" and card.runtime.layout == "NCHW"
    _check_logits(card, native, data)


def test_a_changed_model_file_is_refused(tmp_path) -> None:
    card = _export("torchscript", tmp_path / "ts")
    path = card.weights_path
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(Exception, match="checksum differs"):
        load_card(tmp_path / "ts")
