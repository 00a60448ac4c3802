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

import numpy as np

from pipeline.errors import ReadError
from pipeline.models.torch import runtime
from pipeline.models.torch.card import ModelCard, Runtime, sha256_of

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
    name = session.get_inputs()[0].name

    def call(batch: np.ndarray, precision: str = "auto") -> np.ndarray:
        out = session.run(None, {name: np.ascontiguousarray(_pad_to(batch, rt.align), dtype=np.float32)})[0]
        crop = (slice(None), slice(None), *(slice(0, n) for n in batch.shape[2:]))
        return np.asarray(out[crop], dtype=np.float32)

    return call


def export_model(card: ModelCard, fmt: str, out: Path) -> Path:
    """Export a segpipe U-Net card to TorchScript or ONNX in ``out``; return the new card's path.

    The exported graph is the network without its own padding (:meth:`UNet.forward_aligned`),
    with free batch and spatial sizes (multiples of ``2**depth``); the new card declares that
    multiple, the layout and the output kind, and keeps classes, inputs and validation scores.
    """
    import torch

    from pipeline.models.torch.unet import UNet
    from pipeline.models.torch.weights import load_weights

    if card.runtime is not None:
        raise ReadError(
            f"model card {card.name!r} is already a {card.runtime.format} file; export a U-Net card"
        )
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
