"""A small Mask R-CNN (torchvision) for tiled instance segmentation, and detection without resizing.

:func:`build_maskrcnn` makes torchvision's ``MaskRCNN`` from a card's ``architecture``
(``name: maskrcnn``): a slim residual trunk (strides 4, 8, 16) with a feature pyramid, anchors
sized for the objects, a slim box head and mask head; randomly initialised, nothing downloaded.
Its transform never resizes and does not normalise (inputs are standardised with the card's
``inputs.mean/std`` beforehand, as for the U-Nets), so a pixel of the input is a pixel of the
boxes. :func:`detect` runs backbone, RPN and ROI heads on a batch and keeps roi_heads' 28x28 mask
probabilities; :func:`to_detections` resizes each to its own box only
(:class:`~pipeline.models.torch.detections.Detections`): no window-sized mask per object exists.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pipeline.errors import ConfigError
from pipeline.models.torch.card import MaskRCNNArchitecture, ModelCard
from pipeline.models.torch.detections import Detections, masks_at_box_size

__all__ = ["MaskRCNNArchitecture", "build_maskrcnn", "detect", "load_maskrcnn", "to_detections"]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = _conv(c, c)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(min(8, c), c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b(self.a(x)))


class SlimBackbone(nn.Module):
    """Residual trunk with outputs at strides 4, 8, 16 (``widths``) and an FPN of ``fpn_channels``
    (plus a max-pooled level at stride 32), as torchvision's detectors expect."""

    def __init__(self, in_channels: int, widths: list[int], fpn_channels: int) -> None:
        super().__init__()
        w0 = widths[0]
        stages: list[nn.Module] = [nn.Sequential(_conv(in_channels, w0, 2), _conv(w0, w0, 2), _Residual(w0))]
        for cin, cout in itertools.pairwise(widths):
            stages.append(nn.Sequential(_conv(cin, cout, 2), _Residual(cout)))
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork(list(widths), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats[str(i)] = x
        return self.fpn(feats)


class NoResizeTransform(GeneralizedRCNNTransform):
    """Batches images (padded to ``size_divisible``) without resizing or normalising them."""

    def __init__(self, channels: int, size_divisible: int) -> None:
        super().__init__(1, 1, [0.0] * channels, [1.0] * channels, size_divisible=size_divisible)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


def _architecture(card_or_config: ModelCard | MaskRCNNArchitecture | dict[str, Any]) -> MaskRCNNArchitecture:
    if isinstance(card_or_config, ModelCard):
        arch = card_or_config.architecture
        if not isinstance(arch, MaskRCNNArchitecture):
            raise ValueError(f"model card {card_or_config.name!r} does not describe a Mask R-CNN")
        return arch
    if isinstance(card_or_config, MaskRCNNArchitecture):
        return card_or_config
    return MaskRCNNArchitecture.model_validate({"name": "maskrcnn", **card_or_config})


def build_maskrcnn(card_or_config: ModelCard | MaskRCNNArchitecture | dict[str, Any]) -> MaskRCNN:
    """torchvision ``MaskRCNN`` as the card (or architecture) describes it, randomly initialised."""
    a = _architecture(card_or_config)
    if len(a.anchor_sizes) != len(a.widths) + 1 or len({len(s) for s in a.anchor_sizes}) != 1:
        raise ConfigError(
            f"Mask R-CNN architecture: anchor_sizes {a.anchor_sizes} needs one list per pyramid level "
            f"({len(a.widths) + 1}: one per width and the pooled level), all of the same length"
        )
    backbone = SlimBackbone(a.in_channels, list(a.widths), a.fpn_channels)
    levels = [str(i) for i in range(len(a.widths))]
    anchors = AnchorGenerator(
        tuple(tuple(s) for s in a.anchor_sizes), (tuple(a.aspect_ratios),) * len(a.anchor_sizes)
    )
    box_pool = MultiScaleRoIAlign(levels, 7, 2, canonical_scale=a.canonical_scale)
    mask_pool = MultiScaleRoIAlign(levels, 14, 2, canonical_scale=a.canonical_scale)
    c = a.fpn_channels
    model = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=a.rpn_pre_nms_top_n,
        rpn_pre_nms_top_n_test=a.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=a.rpn_post_nms_top_n,
        rpn_post_nms_top_n_test=a.rpn_post_nms_top_n_test,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(c * 7 * 7, a.representation),
        box_predictor=FastRCNNPredictor(a.representation, a.num_classes),
        box_score_thresh=a.box_score_threshold,
        box_nms_thresh=a.box_nms_threshold,
        box_detections_per_img=a.detections_per_image,
        box_batch_size_per_image=a.box_batch_size_per_image,
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(c, [c] * a.mask_layers, 1),
        mask_predictor=MaskRCNNPredictor(c, c, a.num_classes),
    )
    model.transform = NoResizeTransform(a.in_channels, a.size_divisible)
    return model


def load_maskrcnn(card: ModelCard, device: str = "cpu") -> MaskRCNN:
    """The card's Mask R-CNN with its weights (fp16-stored tensors come back as fp32), in eval mode."""
    from pipeline.models.torch.weights import load_weights

    model = build_maskrcnn(card)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_weights(card.weights_path).items()}
    model.load_state_dict(state)
    return model.eval().to(device)


def detect(model: MaskRCNN, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Detections of a batch ``(N, C, H, W)`` of standardised images, at the input's scale.

    Per image: ``boxes`` ``(n, 4)`` x0, y0, x1, y1 in its pixels, ``scores``, ``labels`` and
    ``masks`` ``(n, M, M)`` (roi_heads' probabilities over each box, M = 28). Nothing is pasted.
    Call under ``torch.inference_mode()`` with the model in eval mode.
    """
    h, w = images.shape[-2:]
    _scale_caps(model, int(h) * int(w))
    div = model.transform.size_divisible
    ph, pw = -(-h // div) * div, -(-w // div) * div
    padded = nn.functional.pad(images, (0, pw - w, 0, ph - h)) if (ph, pw) != (h, w) else images
    batch = ImageList(padded, [(int(h), int(w))] * images.shape[0])
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    found, _ = model.roi_heads(features, proposals, batch.image_sizes)
    for d in found:
        d["masks"] = d["masks"][:, 0]
    return found


#: Window area (px) the card's test-time caps (RPN proposals, detections per image) are meant for:
#: about one BBBC039 field. Larger windows get proportionally larger caps, so a big block does not
#: silently lose objects past the cap.
CAPS_AREA = 512 * 704


def _scale_caps(model: MaskRCNN, area: int) -> None:
    """Set the RPN and detection caps for a window of ``area`` pixels (the card's at most CAPS_AREA)."""
    base = getattr(model, "_segpipe_caps", None)
    if base is None:
        base = (
            model.rpn._pre_nms_top_n["testing"],
            model.rpn._post_nms_top_n["testing"],
            model.roi_heads.detections_per_img,
        )
        model._segpipe_caps = base  # type: ignore[assignment]
    factor = max(1.0, area / CAPS_AREA)
    pre, post, dets = (round(v * factor) for v in base)
    model.rpn._pre_nms_top_n["testing"] = pre
    model.rpn._post_nms_top_n["testing"] = post
    model.roi_heads.detections_per_img = dets


def to_detections(found: dict[str, torch.Tensor], shape: tuple[int, int]) -> Detections:
    """One image's :func:`detect` output as :class:`Detections` (masks resized to their boxes)."""
    boxes = found["boxes"].float().cpu().numpy().astype(np.float32)
    if not len(boxes):
        return Detections.empty()
    masks, ints = masks_at_box_size(found["masks"].float().cpu().numpy(), boxes, shape)
    return Detections(
        boxes,
        found["scores"].float().cpu().numpy().astype(np.float32),
        found["labels"].cpu().numpy().astype(np.int64),
        masks,
        ints,
    )


def save_maskrcnn_weights(model: nn.Module, path: Path) -> Path:
    """Write the state dict as safetensors (float32), atomically."""
    import os

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path
