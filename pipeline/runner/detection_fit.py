"""Training a Mask R-CNN on instance-labelled patches: targets, seeded epochs, held-apart F1.

Targets come from the instance ids of each patch: every id with at least ``min_area`` pixels in
the patch is an object (class 1) with its box ``x0, y0, x1 + 1, y1 + 1`` and its mask. Objects cut
by the patch edge are kept (their visible part is the target): at inference the segmenter drops
detections touching a cut tile edge anyway, and a visible nucleus trained as background would
teach the network to miss objects. Slivers under ``min_area`` pixels are neither targets nor
background proposals' business (they are simply left out).

The loop follows :mod:`pipeline.train.loop`: patch origins and augmentations of epoch ``e`` come
from a generator seeded with ``(seed, e)``, torch's generator (RPN/ROI sampling) is reseeded per
epoch, the learning rate is a pure function of the step, and a checkpoint after every epoch holds
model, optimizer, step, best weights and history, so a rerun resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.metrics.instances import Matching, match_instances
from pipeline.tiling import Box
from pipeline.train.augment import Augment, augment
from pipeline.train.loop import FitResult, optimiser_step, run_epochs
from pipeline.train.loss import Schedule
from pipeline.train.patches import Normaliser
from pipeline.train.split import Split, origin_range

Report = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class InstanceRegion:
    """A staged image ``(C, H, W)`` with its instance ids ``(H, W)`` (zarr arrays) and split."""

    image: Any
    instances: Any
    split: Split


@dataclass(frozen=True)
class DetectionOptions:
    patch: tuple[int, int]
    epochs: int
    patches_per_epoch: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: Schedule
    seed: int
    augment: Augment
    min_area: int = 8
    grad_clip: float = 10.0
    score_threshold: float = 0.5
    patience: int | None = None
    min_delta: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.patches_per_epoch // self.batch_size)


def targets_of(ids: np.ndarray, min_area: int = 8) -> dict[str, torch.Tensor]:
    """Boxes (x0, y0, x1, y1, pixel edges), labels (1) and masks of the ids in a patch."""
    values, counts = np.unique(ids[ids != 0], return_counts=True)
    values = values[counts >= min_area]
    boxes, masks = [], []
    for v in values:
        m = ids == v
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        masks.append(m)
    h, w = ids.shape
    return {
        "boxes": torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
        "labels": torch.ones(len(values), dtype=torch.int64),
        "masks": torch.from_numpy(np.asarray(masks, np.uint8).reshape(-1, h, w)),
    }


def _origins(
    rng: np.random.Generator, n: int, regions: Sequence[InstanceRegion], patch: Sequence[int]
) -> list[tuple[int, tuple[int, ...]]]:
    """Uniform patch origins over every training slab (in proportion to its valid origins)."""
    slabs = [(r, s) for r, region in enumerate(regions) for s in range(len(region.split.train))]
    sizes = []
    for r, s in slabs:
        lo, hi = origin_range(regions[r].split.train[s], patch)
        sizes.append(float(np.prod([b - a + 1 for a, b in zip(lo, hi, strict=True)])))
    p = np.asarray(sizes) / sum(sizes)
    out = []
    for _ in range(n):
        r, s = slabs[int(rng.choice(len(slabs), p=p))]
        lo, hi = origin_range(regions[r].split.train[s], patch)
        out.append((r, tuple(int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True))))
    return out


def fit_detector(
    model: nn.Module,
    regions: Sequence[InstanceRegion],
    normalise: Normaliser,
    options: DetectionOptions,
    *,
    checkpoint: Path,
    fingerprint: str,
    report: Report | None = None,
) -> FitResult:
    """Train ``model`` (torchvision Mask R-CNN) and keep the epoch of best held-apart F1@0.5
    (:func:`pipeline.train.loop.run_epochs`: resumable, checkpointed, early stopping)."""

    def one_epoch(optimizer: torch.optim.Optimizer, epoch: int, state: dict[str, Any], emit: Report) -> float:
        return _epoch(model, optimizer, regions, normalise, options, epoch, state, emit)

    def summarise(scores: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        f1 = float(scores["f1"])
        return f1, {"f1": f1, "precision": scores["precision"], "recall": scores["recall"]}

    return run_epochs(
        model,
        options,
        one_epoch=one_epoch,
        evaluate=lambda m: validation_scores(m, regions, normalise, score_threshold=options.score_threshold),
        summarise=summarise,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        report=report,
    )


def _epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    regions: Sequence[InstanceRegion],
    normalise: Normaliser,
    options: DetectionOptions,
    epoch: int,
    state: dict[str, Any],
    emit: Report,
) -> float:
    rng = np.random.default_rng([options.seed, epoch])
    torch.manual_seed(options.seed * 100_003 + epoch)
    origins = _origins(rng, options.patches_per_epoch, regions, options.patch)
    total = options.steps_per_epoch * options.epochs
    model.train()
    losses = []
    for b in range(options.steps_per_epoch):
        images, targets = [], []
        for r, origin in origins[b * options.batch_size : (b + 1) * options.batch_size]:
            box = Box(tuple(origin), tuple(o + p for o, p in zip(origin, options.patch, strict=True)))
            x = normalise(np.asarray(regions[r].image[(slice(None), *box.slices())], np.float32))
            ids = np.asarray(regions[r].instances[box.slices()])
            x, ids = augment(rng, x, ids, options.augment)
            images.append(torch.from_numpy(x))
            targets.append(targets_of(ids, options.min_area))

        def loss_of(images: list[Any] = images, targets: list[Any] = targets) -> Any:
            return sum(model(images, targets).values())

        loss, lr = optimiser_step(
            optimizer,
            loss_of,
            state,
            total,
            options,
            before_step=lambda: nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip),
        )
        losses.append(loss)
        emit("step", {"epoch": epoch, "step": b + 1, "loss": loss, "lr": lr})

    return float(np.mean(losses))


def predict_instances(
    model: nn.Module,
    image: np.ndarray,
    normalise: Normaliser,
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> np.ndarray:
    """Instance ids (uint32) of a whole (small) image ``(C, H, W)``: detect, paste at box size."""
    from pipeline.models.torch.detections import paste
    from pipeline.models.torch.maskrcnn import detect, to_detections

    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(normalise(image))[None]
        with torch.inference_mode():
            found = detect(model, x)[0]  # type: ignore[arg-type]
        shape = (int(image.shape[-2]), int(image.shape[-1]))
        return paste(to_detections(found, shape), shape, mask_threshold, score_threshold, min_visible=0.5)
    finally:
        model.train(was_training)


def validation_scores(
    model: nn.Module,
    regions: Sequence[InstanceRegion],
    normalise: Normaliser,
    *,
    score_threshold: float = 0.5,
    boxes: Sequence[Box] | None = None,
) -> dict[str, Any]:
    """Instance F1, precision and recall at IoU 0.5 over the held-apart boxes (each predicted from
    its own pixels only), counts summed over the boxes."""
    tp = fp = fn = 0
    per_region = []
    for i, region in enumerate(regions):
        box = boxes[i] if boxes is not None else region.split.val
        image = np.asarray(region.image[(slice(None), *box.slices())], np.float32)
        truth = np.asarray(region.instances[box.slices()])
        pred = predict_instances(model, image, normalise, score_threshold=score_threshold)
        m = match_instances(pred, truth, 0.5)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
        per_region.append({"f1": m.f1, "tp": m.tp, "fp": m.fp, "fn": m.fn})
    total = Matching(tp, fp, fn)
    return {
        "f1": total.f1,
        "precision": total.precision,
        "recall": total.recall,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "iou_threshold": 0.5,
        "score_threshold": score_threshold,
        "per_region": per_region,
    }
