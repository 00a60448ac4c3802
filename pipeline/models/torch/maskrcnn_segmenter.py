"""The ``maskrcnn`` segmenter: a Mask R-CNN (model card + safetensors) run over each block.

Per block (core + halo) the detector runs on the whole block, or on overlapping windows of it;
masks stay at box size (:mod:`pipeline.models.torch.detections`). Detections whose box reaches a
block (or window) edge that cuts the image are dropped: the object is probably cut there, and
with ``halo >= max_object_size + context`` every object meeting the chunk's core lies whole in
the block, ``context`` pixels clear of its edges, so the tile that holds it whole reports it.
The rest are pasted (higher score wins) into block-local ids, which the engine matches across
seams by IoU in the halo overlap (merge policy ``overlap``): ids come out global, each object
once. The network is loaded once per worker process; torch is imported lazily.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.errors import ConfigError
from pipeline.models.base import ImageInfo, MergePolicy, Segmenter, SegmenterParams, register
from pipeline.models.classical.threshold import resolve_band
from pipeline.models.torch import runtime
from pipeline.models.torch.card import MaskRCNNArchitecture, ModelCard, load_card
from pipeline.models.torch.detections import Detections, paste, suppress_duplicates, touches_cut_edges
from pipeline.models.torch.segmenter import _NETWORKS, LOADS
from pipeline.tiling import BlockContext


class MaskRCNNParams(SegmenterParams):
    model: str = Field(description="shipped model name, a model card YAML, or a folder with card.yaml")
    max_object_size: int = Field(64, ge=1, description="largest object extent in pixels (added to the halo)")
    context: int | None = Field(
        None, ge=0, description="pixels kept clear around an object inside its block; default the card's halo"
    )
    score_threshold: float = Field(0.5, ge=0, le=1, description="detections scoring less are dropped")
    mask_threshold: float = Field(0.5, gt=0, le=1, description="mask probability of an object pixel")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="seam match: IoU in the halo overlap")
    window: int | None = Field(
        None, ge=64, description="detector window edge in pixels; None: the whole block in one pass"
    )
    batch_size: int = Field(2, ge=1, description="windows per forward pass")
    edge_margin: float = Field(1.0, ge=0, description="a box this close to a cutting edge is dropped")
    min_visible: float = Field(
        0.5, ge=0, le=1, description="an object left with less of its mask by higher scores is dropped"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("fp32", description="CUDA autocast dtype")


@register
class MaskRCNNSegmenter(Segmenter):
    """Instances from a Mask R-CNN; objects cut by a tile edge come from the tile holding them whole."""

    name = "maskrcnn"
    kind = "instance"
    merge: ClassVar[MergePolicy] = "overlap"
    summary = "Mask R-CNN instances (model card + safetensors), masks at box size, seams by IoU"
    Params: ClassVar[type[SegmenterParams]] = MaskRCNNParams
    params: MaskRCNNParams
    uses_context: ClassVar[bool] = True
    uses_torch: ClassVar[bool] = True
    halo_rule: ClassVar[str] = "max_object_size + context (the card's halo unless given)"

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        self.card: ModelCard = load_card(self.params.model)
        card = self.card
        detector_file = card.runtime is not None and card.runtime.output in ("maskrcnn", "yolo_seg")
        if not detector_file and (not isinstance(card.architecture, MaskRCNNArchitecture) or card.runtime):
            raise ConfigError(
                f"model {self.params.model!r} ({card.folder}) is not a Mask R-CNN card "
                "(architecture.name: maskrcnn); use segmenter unet or unet_instances for U-Nets"
            )
        if info.spatial_ndim != 2:
            raise ConfigError(f"segmenter maskrcnn runs on 2-D rasters; the input is a {info.kind}")
        self.bands = [
            resolve_band(b, info, where=f"model card inputs.bands ({card.folder})") for b in card.inputs.bands
        ]
        arch = card.architecture
        if isinstance(arch, MaskRCNNArchitecture) and len(self.bands) != arch.in_channels:
            raise ConfigError(
                f"model card {card.folder}: {len(self.bands)} input bands for a network of "
                f"{arch.in_channels} channels"
            )
        w = self.params.window
        if w is not None and w < 2 * self.reach + 1:
            raise ConfigError(
                f"segmenter.params.window {w} must exceed twice max_object_size + context "
                f"({2 * self.reach}) so every object lies whole in some window; raise it or drop it"
            )

    # -- declared facts -------------------------------------------------------------------
    @property
    def context(self) -> int:
        return self.card.halo if self.params.context is None else self.params.context

    @property
    def reach(self) -> int:
        """How far past the core an object that meets it can reach, plus its context."""
        return self.params.max_object_size + self.context

    @property
    def halo(self) -> int:
        return self.reach

    @property
    def classes(self) -> dict[int, str]:
        return {0: "background", 1: "object"}

    @property
    def iou_threshold(self) -> float:
        return self.params.iou_threshold

    @property
    def identity(self) -> dict[str, str]:
        """The model's name and weights checksum, for the job fingerprint."""
        sha = self.card.runtime.sha256 if self.card.runtime else self.card.weights_sha256
        return {"name": self.card.name, "weights_sha256": sha}

    # -- inference ------------------------------------------------------------------------
    def normalise(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The model's input channels standardised as in training; invalid pixels 0."""
        x = block[self.bands].astype(np.float32)
        inputs = self.card.inputs
        if inputs.clip is not None:
            np.clip(x, inputs.clip[0], inputs.clip[1], out=x)
        x -= np.asarray(inputs.mean, np.float32).reshape(-1, 1, 1)
        x /= np.asarray(inputs.std, np.float32).reshape(-1, 1, 1)
        x[:, ~valid] = 0.0
        return x

    def detections(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None = None) -> Detections:
        """Objects of the block whole in it (block pixel coordinates), masks at box size."""
        x = self.normalise(block, valid)
        shape = (int(x.shape[1]), int(x.shape[2]))
        cut = ctx.cut if ctx is not None and ctx.cut else ((False, False), (False, False))
        wins = self._windows(shape, cut)
        kept: list[Detections] = []
        for run in range(0, len(wins), self.params.batch_size):
            group = wins[run : run + self.params.batch_size]
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, (r0, r1, c0, c1, _) in enumerate(group):
                by_shape.setdefault((r1 - r0, c1 - c0), []).append(i)
            for size, members in by_shape.items():
                found = self._forward(
                    np.stack([x[:, g[0] : g[1], g[2] : g[3]] for g in (group[i] for i in members)])
                )
                for i, det in zip(members, found, strict=True):
                    r0, _, c0, _, wcut = group[i]
                    det = det.select(det.scores >= self.params.score_threshold)
                    det = det.select(~touches_cut_edges(det, size, wcut, self.params.edge_margin))
                    kept.append(det.shifted(r0, c0))
        if len(kept) == 1:
            return kept[0]
        merged = Detections.concat(kept)
        return suppress_duplicates(merged, 0.5, self.params.mask_threshold)

    def _windows(
        self, shape: tuple[int, int], cut: tuple[tuple[bool, bool], ...]
    ) -> list[tuple[int, int, int, int, tuple[tuple[bool, bool], ...]]]:
        """``(r0, r1, c0, c1, cut)`` windows covering the block, overlapping by twice the reach."""
        w = self.params.window
        axes = []
        for n, (lo_cut, hi_cut) in zip(shape, cut, strict=True):
            if w is None or n <= w:
                axes.append([(0, n, lo_cut, hi_cut)])
                continue
            step = w - 2 * self.reach
            starts = [*list(range(0, n - w, step)), n - w]
            axes.append(
                [(s, s + w, lo_cut if s == 0 else True, hi_cut if s + w == n else True) for s in starts]
            )
        return [(r0, r1, c0, c1, ((a, b), (c, d))) for r0, r1, a, b in axes[0] for c0, c1, c, d in axes[1]]

    def _network(self) -> tuple[Any, str]:
        device = runtime.device_for(self.params.device)
        key = (str(self.card.weights_path.resolve()), self.identity["weights_sha256"], device)
        net = _NETWORKS.get(key)
        if net is None:
            from pipeline.models.torch.adapters import load_detector

            net = load_detector(self.card, device)
            _NETWORKS[key] = net
            LOADS[key[0]] = LOADS.get(key[0], 0) + 1
        return net, device

    def _forward(self, batch: np.ndarray) -> list[Detections]:
        net, _ = self._network()
        return net(batch, precision=self.params.precision)  # type: ignore[no-any-return]

    def __call__(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None = None) -> np.ndarray:
        det = self.detections(block, valid, ctx)
        labels = paste(
            det,
            block.shape[1:],
            self.params.mask_threshold,
            self.params.score_threshold,
            self.params.min_visible,
        )
        labels[~valid] = 0
        return labels
