"""Helpers shared by tests: build and run jobs on the session cluster, read results back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.runner.api import run_job
from pipeline.runner.execute import RunResult
from pipeline.runner.spec import JobSpec, parse_job, resolve_paths


def job(
    input_path: Path,
    out: Path,
    segmenter: str,
    params: dict[str, Any] | None = None,
    *,
    chunk: list[int],
    formats: list[str] | None = None,
    **extra: Any,
) -> JobSpec:
    """A resolved job spec writing into ``out``."""
    raw: dict[str, Any] = {
        "name": "test-job",
        "input": {"path": str(input_path)},
        "segmenter": {"name": segmenter, "params": params or {}},
        "tiling": {"chunk": chunk},
        "output": {"dir": str(out), "formats": formats or ["zarr"]},
        **extra,
    }
    return resolve_paths(parse_job(raw), base=input_path.parent)


def run(client: Any, *args: Any, **kwargs: Any) -> RunResult:
    """Run a job built by :func:`job` on ``client``."""
    return run_job(job(*args, **kwargs), client=client)


def labels_of(result: RunResult) -> np.ndarray:
    """The stitched label map from the zarr staging store."""
    return np.asarray(zarr.open_array(store=str(result.plan.staging / "labels"), mode="r")[...])


def tiny_unet(
    folder: Path,
    *,
    spatial_dims: int,
    bands: list[int | str],
    classes: dict[int, str],
    depth: int = 2,
    width: int = 4,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    patch: list[int] | None = None,
    seed: int = 0,
) -> Path:
    """A randomly initialised U-Net written as card + safetensors (for plumbing tests, not quality).

    Batch-norm running statistics are randomised too, so the network is not near-constant and the
    argmax has few near-ties.
    """
    import torch
    from safetensors.torch import save_file

    from pipeline.models.torch.card import Architecture, Inputs, ModelCard, sha256_of
    from pipeline.models.torch.unet import UNet, receptive_extent, receptive_field

    torch.manual_seed(seed)
    arch = Architecture(
        spatial_dims=spatial_dims,
        in_channels=len(bands),
        out_channels=len(classes),
        depth=depth,
        width=width,
    )
    net = UNet(**arch.network())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
        # class scores that vary with the input: centre the head on the features of noise
        feats: list[torch.Tensor] = []
        hook = net.head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0]))
        net.eval()(torch.randn(1, len(bands), *([48] * spatial_dims)))
        hook.remove()
        net.head.weight.normal_(0.0, 2.0)
        mean_feat = feats[0].mean(dim=tuple(i for i in range(feats[0].ndim) if i != 1))
        w = net.head.weight.reshape(len(classes), -1)
        net.head.bias.copy_(-(w @ mean_feat))

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    card = ModelCard(
        name=f"tiny-{spatial_dims}d",
        description="random initialisation: a plumbing test model",
        architecture=arch,
        classes=classes,
        inputs=Inputs(bands=bands, mean=mean or [0.0] * len(bands), std=std or [1.0] * len(bands)),
        patch_size=patch or [64] * spatial_dims,
        receptive_field=receptive_field(depth),
        halo=max(receptive_extent(depth)),
        weights_sha256=sha256_of(weights),
        command="tests/helpers.py tiny_unet",
    )
    return card.save(folder / "card.yaml")
