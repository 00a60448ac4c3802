"""Bring-your-own detector files: YOLO-seg and Mask R-CNN exports decoded through one adapter agree
with the native torch module (boxes, scores, box-size masks within 1e-4) on a BBBC039 crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from pipeline.errors import ConfigError, ReadError
from pipeline.models.torch import decoders
from pipeline.models.torch.adapters import _pad_to, load_detector, load_network
from pipeline.models.torch.card import Inputs, ModelCard, Runtime, load_card, sha256_of
from pipeline.models.torch.detections import Detections

FIELD = ("images", "bbbc039", "IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E847D9B42CB.tif")
NC, NM, ALIGN = 2, 8, 32


class TinyYoloSeg(nn.Module):
    """A YOLOv8-seg-shaped network (random weights): ``pred (B, 4 + nc + nm, A)`` and
    ``protos (B, nm, H/4, W/4)``.

    One anchor per cell of the stride-4 grid; box centre = cell centre + a bounded offset, size
    from a softplus; class scores are sigmoids of standardised logits, biased so that about a
    quarter of the anchors pass 0.25.
    """

    def __init__(self, nc: int = NC, nm: int = NM) -> None:
        super().__init__()
        self.nc = nc
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, 2, 1),
            nn.SiLU(),
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.SiLU(),
            nn.Conv2d(32, 32, 3, 1, 1),
        )
        self.head = nn.Conv2d(32, 4 + nc + nm, 1)
        self.protos = nn.Sequential(nn.Conv2d(32, 16, 3, 1, 1), nn.SiLU(), nn.Conv2d(16, nm, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.stem(x)
        h = self.head(f)
        gh, gw = h.shape[2:]
        gy = (torch.arange(gh, dtype=x.dtype) + 0.5).view(1, gh, 1).expand(1, gh, gw)
        gx = (torch.arange(gw, dtype=x.dtype) + 0.5).view(1, 1, gw).expand(1, gh, gw)
        cx = (gx + torch.tanh(h[:, 0])) * 4
        cy = (gy + torch.tanh(h[:, 1])) * 4
        w = nn.functional.softplus(h[:, 2]) * 8 + 14
        hh = nn.functional.softplus(h[:, 3]) * 8 + 14
        logit = h[:, 4 : 4 + self.nc]
        z = (logit - logit.mean((2, 3), keepdim=True)) / (logit.std((2, 3), keepdim=True) + 1e-6)
        cls = torch.sigmoid(2 * z - 2.5)
        rest = h[:, 4 + self.nc :]
        pred = torch.cat([torch.stack([cx, cy, w, hh], 1), cls, rest], 1)
        return pred.flatten(2), self.protos(f)


def _crop(data: Path, rows: int = 120, cols: int = 150) -> np.ndarray:
    img = tifffile.imread(data.joinpath(*FIELD)).astype(np.float32)
    x = img[200 : 200 + rows, 260 : 260 + cols]
    return ((x - x.mean()) / (x.std() + 1e-6))[None, None]


def _yolo_card(folder: Path, fmt: str, file: str) -> ModelCard:
    rt = Runtime(
        format=fmt,  # type: ignore[arg-type]
        file=file,
        sha256=sha256_of(folder / file),
        layout="NCHW",
        output="yolo_seg",
        align=ALIGN,
    )
    card = ModelCard(
        name="tiny-yolo-seg",
        runtime=rt,
        classes={0: "a", 1: "b"},
        inputs=Inputs(bands=[1], mean=[0.0], std=[1.0]),
        patch_size=[128, 128],
        receptive_field=31,
        halo=32,
    )
    card.save(folder / "card.yaml")
    return load_card(folder)


def assert_same(a: Detections, b: Detections, tol: float = 1e-4) -> float:
    """Same detections in the same order within ``tol``; returns the largest difference seen."""
    assert len(a) == len(b)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.mask_boxes, b.mask_boxes)
    diffs = [np.abs(a.boxes - b.boxes).max(initial=0), np.abs(a.scores - b.scores).max(initial=0)]
    diffs += [np.abs(m - n).max() for m, n in zip(a.masks, b.masks, strict=True)]
    worst = float(max(diffs))
    assert worst <= tol
    return worst


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyYoloSeg, dict[str, ModelCard]]:
    torch.manual_seed(0)
    net = TinyYoloSeg().eval()
    out = tmp_path_factory.mktemp("yolo")
    example = torch.randn(2, 1, 64, 96)
    (out / "ts").mkdir()
    with torch.no_grad():
        torch.jit.trace(net, example).save(str(out / "ts" / "model.pt"))
    (out / "onnx").mkdir()
    dims = {
        0: torch.export.Dim("batch"),
        2: 32 * torch.export.Dim("h", max=64),
        3: 32 * torch.export.Dim("w", max=64),
    }
    torch.onnx.export(
        net,
        (example,),
        str(out / "onnx" / "model.onnx"),
        input_names=["x"],
        output_names=["pred", "protos"],
        dynamo=True,
        dynamic_shapes=(dims,),
        external_data=False,
        verbose=False,
    )
    cards = {
        "torchscript": _yolo_card(out / "ts", "torchscript", "model.pt"),
        "onnx": _yolo_card(out / "onnx", "onnx", "model.onnx"),
    }
    return net, cards


def _native_yolo(net: TinyYoloSeg, batch: np.ndarray, card: ModelCard) -> list[Detections]:
    rt = card.runtime
    assert rt is not None
    with torch.inference_mode():
        pred, protos = net(torch.from_numpy(_pad_to(batch, ALIGN)))
    return [
        decoders.yolo_seg(
            pred[i].numpy(),
            protos[i].numpy(),
            n_classes=NC,
            shape=batch.shape[2:],
            score_threshold=rt.score_threshold,
            nms_threshold=rt.nms_threshold,
            max_detections=rt.max_detections,
        )
        for i in range(len(batch))
    ]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_yolo_seg_file_reproduces_the_native_module(yolo, data, fmt) -> None:  # type: ignore[no-untyped-def]
    net, cards = yolo
    x = _crop(data)
    batch = np.concatenate([x, x[:, :, ::-1, ::-1].copy()])  # two windows, 120 x 150 (padded to 128 x 160)
    native = _native_yolo(net, batch, cards[fmt])
    theirs = load_detector(cards[fmt], "cpu")(batch)
    assert len(theirs) == 2
    for a, b in zip(native, theirs, strict=True):
        assert 10 <= len(a) <= 300  # a non-trivial number of objects: the comparison can fail
        assert set(np.unique(a.labels)) == {0, 1}  # both classes: NMS per class is exercised
        assert (a.boxes[:, 2] <= 150).all() and (a.boxes[:, 3] <= 120).all()  # clipped to the window
        print(f"{fmt}: {len(a)} detections, max abs diff {assert_same(a, b):.2e}")


def test_yolo_seg_masks_are_the_upsampled_prototypes(yolo, data) -> None:  # type: ignore[no-untyped-def]
    """A box-size mask equals the crop of sigmoid(coef @ protos) upsampled to the input (bilinear)."""
    net, cards = yolo
    x = _crop(data, 128, 160)
    with torch.inference_mode():
        pred, protos = net(torch.from_numpy(x))
    det = _native_yolo(net, x, cards["onnx"])[0]
    p = pred[0].T
    score = p[:, 4 : 4 + NC].max(1).values
    i = int(torch.argmax(score))  # the best anchor survives NMS and comes first
    full = torch.sigmoid(torch.einsum("c,chw->hw", p[i, 4 + NC :], protos[0]))
    up = nn.functional.interpolate(full[None, None], size=(128, 160), mode="bilinear", align_corners=False)[
        0, 0
    ]
    x0, y0, x1, y1 = det.mask_boxes[0]
    b = det.boxes[0]
    ref = up[y0:y1, x0:x1].numpy().copy()
    rows, cols = np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5
    ref[(rows < b[1]) | (rows >= b[3])] = 0
    ref[:, (cols < b[0]) | (cols >= b[2])] = 0
    assert abs(float(score[i]) - det.scores[0]) < 1e-6
    assert np.abs(det.masks[0] - ref).max() <= 1e-5


def test_detector_cards_refuse_the_wrong_entry_point(yolo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, cards = yolo
    with pytest.raises(ConfigError, match="gives detections, not semantic logits"):
        load_network(cards["torchscript"], "cpu")
    bad = cards["torchscript"].model_copy(update={"classes": {0: "a", 1: "b", 2: "c"}})
    with pytest.raises(ConfigError, match="do not fit 4 \\+ 3 classes"):
        load_detector(bad, "cpu")(np.zeros((1, 1, 64, 64), np.float32))
    wrong = cards["torchscript"].model_copy(
        update={"runtime": cards["torchscript"].runtime.model_copy(update={"output": "maskrcnn"})}  # type: ignore[union-attr]
    )
    with pytest.raises(ConfigError, match="returned 2"):
        load_detector(wrong, "cpu")(np.zeros((1, 1, 64, 64), np.float32))
    text = (cards["onnx"].folder / "card.yaml").read_text().replace("yolo_seg", "yolo_v99")  # type: ignore[operator]
    (tmp_path / "card.yaml").write_text(text)
    (tmp_path / "model.onnx").write_bytes((cards["onnx"].folder / "model.onnx").read_bytes())  # type: ignore[operator]
    with pytest.raises(ReadError, match="yolo_seg"):
        load_card(tmp_path)


def _random_maskrcnn(folder: Path) -> Path:
    """A randomly initialised Mask R-CNN of our architecture, saved as card + safetensors."""
    from pipeline.models.torch.card import MaskRCNNArchitecture
    from pipeline.models.torch.maskrcnn import build_maskrcnn, save_maskrcnn_weights

    torch.manual_seed(1)
    arch = MaskRCNNArchitecture(name="maskrcnn", in_channels=1, num_classes=2, detections_per_image=100)
    weights = save_maskrcnn_weights(build_maskrcnn(arch), folder / "weights.safetensors")
    card = ModelCard(
        name="random-maskrcnn",
        architecture=arch,
        classes={0: "background", 1: "nucleus"},
        inputs=Inputs(bands=[1], mean=[0.0], std=[1.0]),
        patch_size=[128, 128],
        receptive_field=64,
        halo=32,
        weights=weights.name,
        weights_sha256=sha256_of(weights),
    )
    return card.save(folder / "card.yaml")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_maskrcnn_export_reproduces_the_native_model(data, tmp_path, fmt) -> None:  # type: ignore[no-untyped-def]
    from pipeline.runner.cli import main

    (tmp_path / "native").mkdir()
    native = load_card(_random_maskrcnn(tmp_path / "native"))
    assert main(["export", str(tmp_path / "native"), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    card = load_card(tmp_path / fmt)
    assert card.runtime is not None and card.runtime.output == "maskrcnn" and card.classes == native.classes
    x = _crop(data)
    batch = np.concatenate([x, x[:, :, ::-1].copy()])  # 120 x 150: not a multiple of the pyramid's 32
    ours = load_detector(native, "cpu")(batch)
    theirs = load_detector(card, "cpu")(batch)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a) >= 10
        assert (a.boxes[:, 2] <= 150).all() and (a.boxes[:, 3] <= 120).all()
        print(f"maskrcnn {fmt}: {len(a)} detections, max abs diff {assert_same(a, b):.2e}")


def test_maskrcnn_segmenter_runs_an_exported_card_like_the_native_one(torch_client, data, tmp_path) -> None:
    """The engine's maskrcnn segmenter with the TorchScript export gives the native card's labels."""
    from pipeline.runner.cli import main
    from tests.helpers import labels_of, run

    (tmp_path / "native").mkdir()
    _random_maskrcnn(tmp_path / "native")
    assert (
        main(["export", str(tmp_path / "native"), "--format", "torchscript", "--out", str(tmp_path / "ts")])
        == 0
    )
    img = tifffile.imread(data.joinpath(*FIELD))[150:342, 200:456]
    src = tmp_path / "crop.tif"
    tifffile.imwrite(src, img)
    labels = []
    for name in ("native", "ts"):
        params = {"model": str(tmp_path / name), "max_object_size": 24, "context": 16}
        res = run(
            torch_client,
            src,
            tmp_path / f"out_{name}",
            "maskrcnn",
            params,
            chunk=[96, 128],
            input={"path": str(src), "allow_missing_crs": True},
        )
        labels.append(labels_of(res))
    a, b = labels
    print("objects", len(np.unique(a)) - 1, "differing pixels", float((a != b).mean()))
    assert len(np.unique(a)) > 5
    assert np.array_equal(a, b)
