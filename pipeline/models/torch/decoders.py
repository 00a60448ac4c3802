"""Raw detector outputs (Mask R-CNN-style, YOLOv8-seg-style) decoded into :class:`Detections`.

Every runtime (our native Mask R-CNN, TorchScript, ONNX) ends in the same decoder, so their
detections agree as far as the network outputs do.

``yolo_seg`` (the convention of YOLOv8-seg exports): ``pred`` ``(B, 4 + nc + nm, A)`` holds per
anchor the box centre and size ``cx, cy, w, h`` in input pixels, ``nc`` class scores (already
sigmoid) and ``nm`` mask coefficients; ``protos`` ``(B, nm, H/s, W/s)``. Decoding: keep anchors
whose best class score passes the threshold, class-aware NMS (``torchvision.ops.batched_nms``),
at most ``max_detections``; each mask is ``sigmoid(coef @ protos)`` sampled bilinearly
(``align_corners=False``, as upsampling the prototypes to the input would) at the pixels of the
object's integer box only, and zero outside its float box.

``maskrcnn``: per image ``boxes (n, 4)``, ``labels (n,)``, ``scores (n,)`` and ``masks`` either over
each box (``(n, [1,] M, M)``, resized to box size as our native model does) or at the window's size
(``(n, [1,] H, W)``, torchvision's pasted masks: cropped to each integer box).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.models.torch.detections import Detections, integer_boxes, masks_at_box_size


def _upsample_weights(start: int, stop: int, cells: int, stride: float) -> np.ndarray:
    """Bilinear weights ``(stop - start, cells)`` of prototype cells for pixels ``start..stop``."""
    u = (np.arange(start, stop, dtype=np.float64) + 0.5) / stride - 0.5
    u = np.clip(u, 0.0, cells - 1.0)
    j0 = np.floor(u).astype(np.int64)
    j1 = np.minimum(j0 + 1, cells - 1)
    t = u - j0
    out = np.zeros((stop - start, cells), np.float64)
    rows = np.arange(stop - start)
    np.add.at(out, (rows, j0), 1.0 - t)
    np.add.at(out, (rows, j1), t)
    return out


def yolo_seg(
    pred: np.ndarray,
    protos: np.ndarray,
    *,
    n_classes: int,
    shape: tuple[int, int],
    score_threshold: float,
    nms_threshold: float,
    max_detections: int,
    source: str = "model",
) -> Detections:
    """One image's YOLOv8-seg outputs ``pred (4 + nc + nm, A)``, ``protos (nm, h, w)`` decoded.

    ``shape`` is the window's ``(rows, cols)`` (boxes are clipped to it; the input may have been
    padded past it). Class ids are the predicted channel indices.
    """
    import torchvision

    nm = protos.shape[0]
    if pred.ndim != 2 or protos.ndim != 3 or pred.shape[0] != 4 + n_classes + nm:
        raise ConfigError(
            f"{source}: yolo_seg outputs of shapes {pred.shape} and {protos.shape} do not fit "
            f"4 + {n_classes} classes + {nm} mask coefficients; check the card's classes and output kind"
        )
    p = torch.from_numpy(np.ascontiguousarray(pred, np.float32)).T
    cls = p[:, 4 : 4 + n_classes]
    score, label = cls.max(dim=1)
    keep = score > score_threshold
    p, score, label = p[keep], score[keep], label[keep]
    h, w = shape
    cx, cy, bw, bh = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    order = torchvision.ops.batched_nms(boxes, score, label, nms_threshold)[:max_detections]
    if not len(order):
        return Detections.empty()
    boxes_np = boxes[order].numpy().astype(np.float32)
    coef = p[order, 4 + n_classes :].numpy().astype(np.float64)
    proto = np.asarray(protos, np.float64)
    small = 1.0 / (1.0 + np.exp(-(coef @ proto.reshape(nm, -1))))
    small = small.reshape(len(order), *proto.shape[1:])
    masks, ints = _box_masks(small, boxes_np, shape, (h / proto.shape[1], w / proto.shape[2]))
    return Detections(
        boxes_np, score[order].numpy().astype(np.float32), label[order].numpy().astype(np.int64), masks, ints
    )


def _box_masks(
    small: np.ndarray, boxes: np.ndarray, shape: tuple[int, int], strides: tuple[float, float]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Prototype-resolution masks sampled at each integer box's pixels, zero outside the float box."""
    ints = integer_boxes(boxes, shape)
    out = []
    for m, b, (x0, y0, x1, y1) in zip(small, boxes, ints, strict=True):
        ry = _upsample_weights(int(y0), int(y1), m.shape[0], strides[0])
        rx = _upsample_weights(int(x0), int(x1), m.shape[1], strides[1])
        box = ry @ m @ rx.T
        rows = np.arange(y0, y1) + 0.5
        cols = np.arange(x0, x1) + 0.5
        inside = ((rows >= b[1]) & (rows < b[3]))[:, None] & ((cols >= b[0]) & (cols < b[2]))[None, :]
        out.append(np.where(inside, box, 0.0).astype(np.float32))
    return out, ints


def maskrcnn(
    outputs: Sequence[np.ndarray],
    *,
    shape: tuple[int, int],
    masks: Literal["roi", "image"],
    source: str = "model",
) -> Detections:
    """One image's Mask R-CNN outputs ``(boxes, labels, scores, masks)`` as :class:`Detections`."""
    if len(outputs) != 4:
        raise ConfigError(
            f"{source}: a maskrcnn model returns 4 outputs (boxes, labels, scores, masks); this one "
            f"returned {len(outputs)}. Check the card's runtime.output kind"
        )
    boxes, labels, scores, m = (np.asarray(o) for o in outputs)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not (len(labels) == len(scores) == len(m) == len(boxes)):
        raise ConfigError(
            f"{source}: maskrcnn outputs of shapes {[o.shape for o in (boxes, labels, scores, m)]}; "
            "expected boxes (n, 4), labels (n,), scores (n,), masks (n, [1,] M, M) in that order"
        )
    boxes = boxes.astype(np.float32)
    if not len(boxes):
        return Detections.empty()
    m = m.reshape(len(m), *m.shape[-2:]).astype(np.float32)
    if masks == "roi":
        box_masks, ints = masks_at_box_size(m, boxes, shape)
    else:
        ints = integer_boxes(boxes, shape)
        box_masks = [m[i, y0:y1, x0:x1].copy() for i, (x0, y0, x1, y1) in enumerate(ints)]
    return Detections(boxes, scores.astype(np.float32), labels.astype(np.int64), box_masks, ints)
