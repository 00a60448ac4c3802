"""The ``unet`` segmenter: a trained U-Net (model card + safetensors) run over each chunk.

The network is loaded once per worker process and cached (never per chunk: the segmenter that
travels in the graph holds the card, not the weights). Each chunk is covered by windows in
batches (see :mod:`pipeline.models.torch.infer`): ``crop`` stitching keeps the pixels that saw
their whole receptive field (equal to whole-image inference), ``blend`` averages overlapping
windows of a global grid with Gaussian or Hann weights. Torch is imported lazily, so listing or
validating jobs does not pay for it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.errors import ConfigError
from pipeline.models.base import ImageInfo, MergePolicy, Segmenter, SegmenterParams, register
from pipeline.models.classical.threshold import resolve_band
from pipeline.models.torch import runtime
from pipeline.models.torch.card import ModelCard, load_card
from pipeline.tiling import BlockContext

#: Networks loaded in this process, by (weights file, checksum, device).
_NETWORKS: dict[tuple[str, str, str], Any] = {}
#: How many times this process loaded each weights file (read by the tests through the cluster).
LOADS: dict[str, int] = {}
EXTRAS = ("probabilities", "entropy")
#: Entropy written where the input is nodata (entropy itself lies in [0, 1]).
ENTROPY_NODATA = -1.0


class UNetParams(SegmenterParams):
    model: str = Field(description="shipped model name, a model card YAML, or a folder with card.yaml")
    stitch: Literal["crop", "blend"] = Field(
        "crop", description="crop: keep pixels that saw their whole receptive field; blend: weighted windows"
    )
    window: int | list[int] | None = Field(
        None,
        description="window size per axis (crop default: 512 px 2-D, 96 voxels 3-D; blend: the card's patch)",
    )
    overlap: float = Field(0.5, ge=0, lt=1, description="blend: window overlap fraction")
    blend: Literal["gaussian", "hann"] = "gaussian"
    batch_size: int = Field(4, ge=1, description="windows per forward pass")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="CUDA autocast dtype")
    outputs: list[Literal["probabilities", "entropy"]] = Field(
        default_factory=list, description="extra outputs: class probabilities, normalised entropy"
    )


@register
class UNetSegmenter(Segmenter):
    """Semantic classes from a trained U-Net; the halo is its receptive reach (crop) or window (blend)."""

    name = "unet"
    summary = "trained U-Net (model card + safetensors), tiled windows, crop or blended stitching"
    Params: ClassVar[type[SegmenterParams]] = UNetParams

    params: UNetParams
    uses_context: ClassVar[bool] = True
    uses_torch: ClassVar[bool] = True
    halo_rule: ClassVar[str] = "crop: receptive reach of the network; blend: window - 1"

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        self.card: ModelCard = load_card(self.params.model)
        card = self.card
        if card.spatial_dims != info.spatial_ndim:
            raise ConfigError(
                f"model {self.params.model!r} is a {card.spatial_dims}-D network but the input is a "
                f"{info.kind} ({info.spatial_ndim}-D); use a {info.spatial_ndim}-D model"
            )
        outputs = card.network.out_channels if card.architecture else card.n_classes
        if sorted(card.classes) != list(range(outputs)):
            raise ConfigError(
                f"model card {card.folder}: classes {sorted(card.classes)} must be 0.."
                f"{outputs - 1}, one per output channel"
            )
        self.bands = [
            resolve_band(b, info, where=f"model card inputs.bands ({card.folder})") for b in card.inputs.bands
        ]
        if card.architecture and len(self.bands) != card.architecture.in_channels:
            raise ConfigError(
                f"model card {card.folder}: {len(self.bands)} input bands for a network of "
                f"{card.architecture.in_channels} channels"
            )
        self.window = self._window()

    # -- declared facts -------------------------------------------------------------------
    @property
    def align(self) -> int:
        return self.card.align

    @property
    def reach(self) -> int:
        """How far an output pixel looks: computed from a U-Net's layers, else the card's halo."""
        from pipeline.models.torch.unet import receptive_extent

        if self.card.runtime is not None:
            return self.card.halo
        return max(receptive_extent(self.card.network.depth))

    @property
    def halo(self) -> Any:
        if self.params.stitch == "crop":
            return -(-self.reach // self.align) * self.align
        shape = self.info.shape or self.window
        return tuple(min(w, n) - 1 for w, n in zip(self.window, shape, strict=True))

    @property
    def classes(self) -> dict[int, str]:
        return dict(sorted(self.card.classes.items()))

    @property
    def identity(self) -> dict[str, str]:
        """The model's name and weights checksum, for the job fingerprint (new weights: new results)."""
        sha = self.card.runtime.sha256 if self.card.runtime else self.card.weights_sha256
        return {"name": self.card.name, "weights_sha256": sha}

    @property
    def extra_outputs(self) -> dict[str, int]:
        """Extra per-pixel outputs and their band counts (0: one band, no band axis)."""
        n = self.card.n_classes
        return {name: (n if name == "probabilities" else 0) for name in self.params.outputs}

    def _window(self) -> tuple[int, ...]:
        nd = self.info.spatial_ndim
        w = self.params.window
        if w is None:
            if self.params.stitch == "blend":
                return tuple(self.card.patch_size)
            return (512,) * nd if nd == 2 else (96,) * nd
        sizes = [w] * nd if isinstance(w, int) else list(w)
        if len(sizes) != nd or min(sizes) < 1:
            raise ConfigError(f"segmenter.params.window {w!r}: give one positive size or {nd} sizes")
        return tuple(sizes)

    # -- inference ------------------------------------------------------------------------
    def normalise(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The model's input channels, clipped and standardised as in training; invalid pixels 0."""
        x = block[self.bands].astype(np.float32)
        inputs = self.card.inputs
        if inputs.clip is not None:
            np.clip(x, inputs.clip[0], inputs.clip[1], out=x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        x -= np.asarray(inputs.mean, np.float32).reshape(shape)
        x /= np.asarray(inputs.std, np.float32).reshape(shape)
        x[:, ~valid] = 0.0
        return x

    def probabilities(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None) -> np.ndarray:
        """Class probabilities ``(classes, *block)`` (values in the halo are not meaningful)."""
        return self._scores(block, valid, ctx, probs=True)

    def _scores(
        self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None, *, probs: bool
    ) -> np.ndarray:
        """Per-class scores: probabilities, or (crop, ``probs=False``) logits, whose argmax is the same."""
        x = self.normalise(block, valid)
        origin = tuple(ctx.origin) if ctx is not None else (0,) * (x.ndim - 1)
        if self.params.stitch == "crop":
            return self._crop(x, origin, probs=probs)
        return self._blend(x, origin)

    def run_extra(
        self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Labels and the requested extra outputs for one block."""
        probs = self.probabilities(block, valid, ctx)
        labels = self._labels(probs, valid)
        extras: dict[str, np.ndarray] = {}
        if "probabilities" in self.params.outputs:
            extras["probabilities"] = probs
        if "entropy" in self.params.outputs:
            p = np.clip(probs, 1e-12, 1.0)
            ent = -(p * np.log(p)).sum(axis=0) / np.log(probs.shape[0])
            extras["entropy"] = np.where(valid, ent, ENTROPY_NODATA).astype(np.float32)
        return labels, extras

    def __call__(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None = None) -> np.ndarray:
        return self._labels(self._scores(block, valid, ctx, probs=False), valid)

    def _labels(self, probs: np.ndarray, valid: np.ndarray) -> np.ndarray:
        labels = np.argmax(probs, axis=0).astype(np.uint8)
        labels[~valid] = self.nodata_label
        return labels

    def _network(self) -> tuple[Any, str]:
        device = runtime.device_for(self.params.device)
        key = (str(self.card.weights_path.resolve()), self.identity["weights_sha256"], device)
        net = _NETWORKS.get(key)
        if net is None:
            from pipeline.models.torch.adapters import load_network

            net = load_network(self.card, device)
            _NETWORKS[key] = net
            LOADS[key[0]] = LOADS.get(key[0], 0) + 1
        return net, device

    def _forward(self, batch: list[np.ndarray], *, probs: bool = True) -> np.ndarray:
        """Class probabilities (or logits) for a batch of windows of one shape."""
        from pipeline.models.torch.adapters import softmax

        net, _ = self._network()
        logits = net(np.stack(batch), precision=self.params.precision)
        return softmax(logits) if probs else logits

    def _crop(self, x: np.ndarray, origin: tuple[int, ...], *, probs: bool = True) -> np.ndarray:

        from pipeline.models.torch.infer import batches, crop_windows

        front = [o % self.align for o in origin]  # pad so the block starts on the network's grid
        if any(front):
            x = np.pad(x, [(0, 0), *((f, 0) for f in front)])
        axes = [
            crop_windows(n, w, self.reach, self.align) for n, w in zip(x.shape[1:], self.window, strict=True)
        ]
        out = np.empty((self.card.n_classes, *x.shape[1:]), np.float32)
        combos = _product(axes)
        wins = [tuple(slice(w.start, w.stop) for w in c) for c in combos]
        for run in batches(wins, self.params.batch_size):
            scores = self._forward([x[(slice(None), *wins[i])] for i in run], probs=probs)
            for i, p in zip(run, scores, strict=True):
                c = combos[i]

                keep = tuple(slice(w.keep_lo - w.start, w.keep_hi - w.start) for w in c)
                dest = tuple(slice(w.keep_lo, w.keep_hi) for w in c)
                out[(slice(None), *dest)] = p[(slice(None), *keep)]
        return out[(slice(None), *(slice(f, None) for f in front))]

    def _blend(self, x: np.ndarray, origin: tuple[int, ...]) -> np.ndarray:
        from pipeline.models.torch.infer import batches, blend_weights, blend_windows

        spatial = x.shape[1:]
        image = tuple(self.info.shape) or spatial
        stride = tuple(max(1, round(w * (1 - self.params.overlap))) for w in self.window)
        wins = blend_windows(image, origin, spatial, self.window, stride)
        acc = np.zeros((self.card.n_classes, *spatial), np.float32)
        wsum = np.zeros(spatial, np.float32)
        weights: dict[tuple[int, ...], np.ndarray] = {}
        for run in batches(wins, self.params.batch_size):
            probs = self._forward([x[(slice(None), *wins[i])] for i in run])
            for i, p in zip(run, probs, strict=True):
                sl = wins[i]
                shape = p.shape[1:]

                w = weights.setdefault(shape, blend_weights(shape, self.params.blend))
                acc[(slice(None), *sl)] += p * w
                wsum[sl] += w
        np.divide(acc, wsum, out=acc, where=wsum > 0)
        return acc


def _product(axes: list[list[Any]]) -> list[tuple[Any, ...]]:
    import itertools

    return [tuple(c) for c in itertools.product(*axes)]


class UNetInstancesParams(UNetParams):
    max_object_size: int = Field(64, ge=1, description="largest object extent in pixels (added to the halo)")
    min_seed_size: int = Field(4, ge=1, description="interior components smaller than this seed nothing")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="seam match: IoU in the halo overlap")


@register
class UNetInstances(UNetSegmenter):
    """Instances from a U-Net with interior and boundary classes (e.g. nuclei).

    Connected interiors are the seeds; each grows by watershed on the interior probability into
    the pixels predicted interior or boundary, so touching objects stay apart. Ids are local to
    the block and matched across seams by IoU in the halo (merge policy ``overlap``); the halo is
    the network's plus ``max_object_size``.
    """

    name = "unet_instances"
    kind = "instance"
    merge: ClassVar[MergePolicy] = "overlap"
    summary = "instances from a U-Net with interior + boundary classes (seeded watershed)"
    Params = UNetInstancesParams
    params: UNetInstancesParams
    halo_rule: ClassVar[str] = "the unet halo + max_object_size"

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        spec = self.card.instances or {}
        if "interior_class" not in spec or "boundary_class" not in spec:
            raise ConfigError(
                f"model card {self.card.folder}: has no `instances` entry with interior_class and "
                "boundary_class; train it with `labels: {from: instances}` or use segmenter unet"
            )
        self.interior = int(spec["interior_class"])
        self.boundary = int(spec["boundary_class"])

    @property
    def halo(self) -> Any:
        base = super().halo
        extra = self.params.max_object_size
        return tuple(h + extra for h in base) if isinstance(base, tuple) else base + extra

    @property
    def classes(self) -> dict[int, str]:
        return {0: "background", 1: "object"}

    @property
    def iou_threshold(self) -> float:
        return self.params.iou_threshold

    @property
    def extra_outputs(self) -> dict[str, int]:
        return {}

    def __call__(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None = None) -> np.ndarray:
        from scipy import ndimage
        from skimage import morphology, segmentation

        probs = self.probabilities(block, valid, ctx)
        cls = np.argmax(probs, axis=0)
        mask = ((cls == self.interior) | (cls == self.boundary)) & valid
        seeds, _ = ndimage.label(cls == self.interior)
        seeds = morphology.remove_small_objects(seeds, self.params.min_seed_size)
        labels = segmentation.watershed(-probs[self.interior], seeds, mask=mask)
        return labels.astype(np.uint32)


# Segmenters defined in their own modules register with this one (torch is still imported lazily).
import pipeline.models.torch.maskrcnn_segmenter  # noqa: E402,F401  (registers maskrcnn)
