"""Networks behind one call: our U-Net (safetensors), TorchScript files and ONNX files.

``load_network(card, device)`` returns a callable ``net(batch, precision=...) -> logits`` taking a
numpy batch ``(N, C, *window)`` and returning float32 logits ``(N, classes, *window)``. Files
brought from elsewhere (or exported by :func:`export_model`) are described by the card's
``runtime``: format, input layout, output kind, and the size multiple they need (segpipe pads the
window's far end with zeros to it and crops the logits back, as the U-Net does itself).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, ReadError
from pipeline.models.torch import runtime
from pipeline.models.torch.card import ModelCard, Runtime, sha256_of

if TYPE_CHECKING:
    from pipeline.models.torch.detections import Detections

Network = Callable[..., np.ndarray]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities over axis 1, computed stably in float32."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _pad_to(x: np.ndarray, align: int) -> np.ndarray:
    pad = [(0, 0), (0, 0), *((0, (-n) % align) for n in x.shape[2:])]
    return np.pad(x, pad) if any(p for _, p in pad) else x


def load_network(card: ModelCard, device: str) -> Network:
    """The card's network on ``device``, ready to call (loaded once; callers cache it)."""
    if card.runtime is None:
        return _native(card, device)
    if card.runtime.output != "semantic_logits":
        raise ConfigError(
            f"model card {card.folder or card.name}: runtime.output {card.runtime.output!r} gives "
            "detections, not semantic logits; run it with a detector segmenter (maskrcnn)"
        )
    if card.runtime.format == "torchscript":
        return _torchscript(card, card.runtime, device)
    return _onnx(card, card.runtime, device)


def _native(card: ModelCard, device: str) -> Network:
    import torch

    from pipeline.models.torch.unet import UNet
    from pipeline.models.torch.weights import load_weights

    net = UNet(**card.network.network())
    net.load_state_dict(load_weights(card.weights_path))
    net.eval().to(device)

    def call(batch: np.ndarray, precision: str = "auto") -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        with torch.inference_mode(), runtime.autocast(device, precision):
            out = net(x)
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    return call


def _torchscript(card: ModelCard, rt: Runtime, device: str) -> Network:
    import torch

    try:
        module = torch.jit.load(str(card.weights_path), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise ReadError(f"{card.weights_path}: not a loadable TorchScript file ({e})") from e
    module.eval()

    def call(batch: np.ndarray, precision: str = "auto") -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(_pad_to(batch, rt.align))).to(device)
        with torch.inference_mode(), runtime.autocast(device, precision):
            out = module(x)
        crop = (slice(None), slice(None), *(slice(0, n) for n in batch.shape[2:]))
        return np.asarray(out.float().cpu().numpy()[crop], dtype=np.float32)

    return call


def _onnx(card: ModelCard, rt: Runtime, device: str) -> Network:
    session = _onnx_session(card, device)
    name = session.get_inputs()[0].name

    def call(batch: np.ndarray, precision: str = "auto") -> np.ndarray:
        out = session.run(None, {name: np.ascontiguousarray(_pad_to(batch, rt.align), dtype=np.float32)})[0]
        crop = (slice(None), slice(None), *(slice(0, n) for n in batch.shape[2:]))
        return np.asarray(out[crop], dtype=np.float32)

    return call


def _onnx_session(card: ModelCard, device: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:  # an optional extra
        raise ReadError(
            f"{card.weights_path}: ONNX models need onnxruntime: pip install 'segpipe[onnx]'"
        ) from e
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the worker's share of the cores
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(card.weights_path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise ReadError(f"{card.weights_path}: not a loadable ONNX model ({e})") from e
    return session


Detector = Callable[..., "list[Detections]"]


def load_detector(card: ModelCard, device: str) -> Detector:
    """The card's detector on ``device``: ``detect(batch) -> list[Detections]``, one per window.

    ``batch`` is ``(B, C, H, W)`` float32, normalised as the card's ``inputs`` say. Our own Mask
    R-CNN (an ``architecture`` card) runs natively (``precision`` picks its CUDA autocast; files run
    in fp32); ``maskrcnn`` and ``yolo_seg`` TorchScript/ONNX files run through their runtime and one
    decoder (:mod:`pipeline.models.torch.decoders`).
    """
    from pipeline.models.torch.card import MaskRCNNArchitecture

    rt = card.runtime
    if rt is None:
        if not isinstance(card.architecture, MaskRCNNArchitecture):
            raise ConfigError(
                f"model card {card.folder or card.name}: a U-Net gives semantic logits, not detections; "
                "use segmenter unet, or a card with a Mask R-CNN architecture or a detector runtime file"
            )
        return _native_detector(card, device)
    if rt.output == "semantic_logits":
        raise ConfigError(
            f"model card {card.folder or card.name}: runtime.output is semantic_logits; a detector card "
            "declares output maskrcnn or yolo_seg (use segmenter unet for semantic logits)"
        )
    if rt.layout != "NCHW":
        raise ConfigError(
            f"model card {card.folder or card.name}: detectors take NCHW input, not {rt.layout}"
        )
    raw = _raw_runner(card, rt, device)
    source = str(card.weights_path)

    def detect(batch: np.ndarray, precision: str = "fp32") -> list[Detections]:
        from pipeline.models.torch import decoders

        shape = (int(batch.shape[2]), int(batch.shape[3]))
        if rt.output == "maskrcnn":  # outputs per image: one image at a time
            return [
                decoders.maskrcnn(raw(batch[i : i + 1]), shape=shape, masks=rt.masks, source=source)
                for i in range(len(batch))
            ]
        outs = raw(batch)
        if len(outs) != 2:
            raise ConfigError(
                f"{source}: a yolo_seg model returns 2 outputs (predictions, prototypes); this one "
                f"returned {len(outs)}. Check the card's runtime.output kind"
            )
        pred, protos = outs
        return [
            decoders.yolo_seg(
                pred[i],
                protos[i],
                n_classes=card.n_classes,
                shape=shape,
                score_threshold=rt.score_threshold,
                nms_threshold=rt.nms_threshold,
                max_detections=rt.max_detections,
                source=source,
            )
            for i in range(len(batch))
        ]

    return detect


def _native_detector(card: ModelCard, device: str) -> Detector:
    import torch

    from pipeline.models.torch.maskrcnn import detect, load_maskrcnn, to_detections

    net = load_maskrcnn(card, device)

    def call(batch: np.ndarray, precision: str = "fp32") -> list[Detections]:
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(device)
        with torch.inference_mode(), runtime.autocast(device, precision):
            found = detect(net, x)
        return [to_detections(f, (int(batch.shape[2]), int(batch.shape[3]))) for f in found]

    return call


def _raw_runner(card: ModelCard, rt: Runtime, device: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``run(batch) -> [outputs as numpy]`` of a TorchScript or ONNX file (input padded to ``align``)."""
    if rt.format == "torchscript":
        import torch

        try:
            module = torch.jit.load(str(card.weights_path), map_location=device)
        except (RuntimeError, ValueError) as e:
            raise ReadError(f"{card.weights_path}: not a loadable TorchScript file ({e})") from e
        module.eval()

        def run_ts(batch: np.ndarray) -> list[np.ndarray]:
            x = torch.from_numpy(np.ascontiguousarray(_pad_to(batch, rt.align), np.float32)).to(device)
            with torch.inference_mode():
                out = module(x)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in outs]

        return run_ts
    session = _onnx_session(card, device)
    name = session.get_inputs()[0].name

    def run_onnx(batch: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(_pad_to(batch, rt.align), dtype=np.float32)
        return [np.asarray(o) for o in session.run(None, {name: x})]

    return run_onnx


def export_model(card: ModelCard, fmt: str, out: Path) -> Path:
    """Export a segpipe U-Net card to TorchScript or ONNX in ``out``; return the new card's path.

    The exported graph is the network without its own padding (:meth:`UNet.forward_aligned`),
    with free batch and spatial sizes (multiples of ``2**depth``); the new card declares that
    multiple, the layout and the output kind, and keeps classes, inputs and validation scores.
    """
    import torch

    from pipeline.models.torch.card import MaskRCNNArchitecture
    from pipeline.models.torch.unet import UNet
    from pipeline.models.torch.weights import load_weights

    if card.runtime is not None:
        raise ReadError(
            f"model card {card.name!r} is already a {card.runtime.format} file; export a U-Net card"
        )
    if fmt not in ("torchscript", "onnx"):
        raise ValueError(f"export format {fmt!r}: use 'torchscript' or 'onnx'")
    if isinstance(card.architecture, MaskRCNNArchitecture):
        return _export_maskrcnn(card, fmt, out)
    arch = card.network
    net = UNet(**arch.network())
    net.load_state_dict(load_weights(card.weights_path))

    class Aligned(torch.nn.Module):
        def __init__(self, inner: UNet) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.forward_aligned(x)

    core = Aligned(net).eval()
    nd, align = arch.spatial_dims, card.align
    example = torch.randn(2, arch.in_channels, *([2 * align] * nd))
    out.mkdir(parents=True, exist_ok=True)
    layout = "NCHW" if nd == 2 else "NCDHW"
    if fmt == "torchscript":
        target = out / "model.pt"
        with torch.no_grad():
            traced = torch.jit.trace(core, example)
        traced.save(str(target))
    elif fmt == "onnx":
        target = out / "model.onnx"
        dims = {0: torch.export.Dim("batch")}
        for axis in range(nd):
            dims[2 + axis] = align * torch.export.Dim(f"s{axis}", min=1, max=4096)
        torch.onnx.export(
            core,
            (example,),
            str(target),
            input_names=["x"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes=(dims,),
            external_data=False,
            verbose=False,
        )
    else:
        raise ValueError(f"export format {fmt!r}: use 'torchscript' or 'onnx'")
    rt = Runtime(format=fmt, file=target.name, sha256=sha256_of(target), layout=layout, align=align)  # type: ignore[arg-type]
    exported = card.model_copy(
        update={"runtime": rt, "command": f"segpipe export {card.folder} --format {fmt} --out {out}"}
    )
    return exported.save(out / "card.yaml")


def _export_maskrcnn(card: ModelCard, fmt: str, out: Path) -> Path:
    """Our Mask R-CNN as one image in, ``boxes, labels, scores, masks (n, 28, 28)`` out.

    The graph pads the image to the pyramid's multiple itself (so boxes are clipped to the real
    image) and stops before torchvision pastes masks into the image: masks stay over their boxes.
    TorchScript by tracing (torchvision's detection ops trace with dynamic sizes), ONNX by the
    TorchScript-based exporter (``dynamo=False``, opset 17), whose NMS and RoIAlign are exported as
    ONNX ops with data-dependent counts; ``torch.export`` cannot export NMS's data-dependent shapes.
    """
    import warnings

    import torch

    from pipeline.models.torch.maskrcnn import load_maskrcnn

    core = _MaskRCNNCore(load_maskrcnn(card, "cpu")).eval()
    channels = len(card.inputs.bands)
    example = torch.randn(1, channels, 96, 128, generator=torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and exporter warnings about data-dependent sizes
        if fmt == "torchscript":
            target = out / "model.pt"
            torch.jit.trace(core, example, check_trace=False).save(str(target))
        else:
            target = out / "model.onnx"
            torch.onnx.export(
                core,
                (example,),
                str(target),
                dynamo=False,
                opset_version=17,
                input_names=["x"],
                output_names=["boxes", "labels", "scores", "masks"],
                dynamic_axes={"x": {2: "height", 3: "width"}},
            )
    rt = Runtime(
        format=fmt,  # type: ignore[arg-type]
        file=target.name,
        sha256=sha256_of(target),
        layout="NCHW",
        output="maskrcnn",
        masks="roi",
        align=1,
    )
    exported = card.model_copy(
        update={
            "runtime": rt,
            "architecture": None,
            "command": f"segpipe export {card.folder} --format {fmt} --out {out}",
        }
    )
    return exported.save(out / "card.yaml")


def _maskrcnn_core_class() -> type:
    import torch
    from torchvision.models.detection.image_list import ImageList

    class Core(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.backbone = model.backbone
            self.rpn = model.rpn
            self.roi_heads = model.roi_heads
            self.divisible: int = int(model.transform.size_divisible)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h, w = x.shape[-2], x.shape[-1]
            d = self.divisible
            x = torch.nn.functional.pad(x, (0, (-w) % d, 0, (-h) % d))
            batch = ImageList(x, [(h, w)])
            features = self.backbone(batch.tensors)  # type: ignore[operator]
            proposals, _ = self.rpn(batch, features)  # type: ignore[operator]
            found, _ = self.roi_heads(features, proposals, batch.image_sizes)  # type: ignore[operator]
            f = found[0]
            return f["boxes"], f["labels"], f["scores"], f["masks"][:, 0]

    return Core


def _MaskRCNNCore(model: object) -> Any:  # builds the torch module class lazily (torch imported here)
    return _maskrcnn_core_class()(model)
