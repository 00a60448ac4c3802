"""Dice + cross-entropy loss with ignored pixels, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.train.labels import IGNORE

Schedule = Literal["cosine", "onecycle", "constant"]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Cross-entropy plus (1 - soft Dice averaged over classes); :data:`IGNORE` pixels count in neither.

    ``logits`` ``(N, K, *spatial)``, ``target`` ``(N, *spatial)`` int64.
    """
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    if not torch.isfinite(ce):  # every pixel ignored
        ce = logits.sum() * 0.0
    valid = (target != IGNORE).unsqueeze(1)
    prob = torch.softmax(logits, dim=1) * valid
    onehot = F.one_hot(torch.where(target == IGNORE, 0, target), logits.shape[1])
    onehot = onehot.movedim(-1, 1).to(prob.dtype) * valid
    dims = (0, *range(2, logits.ndim))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return ce + (1 - dice.mean())


def learning_rate(step: int, total: int, *, lr: float, schedule: Schedule, warmup: float = 0.1) -> float:
    """The rate at ``step`` of ``total``: cosine decay to 0, one-cycle (linear warm-up then
    cosine), or constant. A pure function of the step, so a resumed run follows it exactly."""
    if schedule == "constant" or total <= 1:
        return lr
    t = min(step / (total - 1), 1.0)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * t))
    if t < warmup:
        return lr * (0.04 + 0.96 * t / warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup)))
