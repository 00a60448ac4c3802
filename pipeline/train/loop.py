"""The training loop: seeded epochs of patches, AdamW on a per-step schedule, validation, early
stopping, and a checkpoint after every epoch that a rerun resumes from.

Determinism: patch positions and augmentations of epoch ``e`` come from a generator seeded with
``(seed, e)`` and the learning rate is a pure function of the step, so an epoch depends only on
the state at its start, which the checkpoint holds exactly (model, optimizer moments, step, best
weights, early-stopping counters). With deterministic torch algorithms and a fixed thread count,
a run killed and resumed ends with bitwise the weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.errors import OutputConflictError
from pipeline.train.augment import Augment, augment
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.loss import Schedule, dice_ce_loss, learning_rate
from pipeline.train.patches import IndexEntry, Normaliser, Region, draw_origins, read_patch

Evaluate = Callable[[nn.Module], dict[str, Any]]
Report = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainOptions:
    """Everything the loop needs besides the model and the data."""

    patch: tuple[int, ...]
    epochs: int
    patches_per_epoch: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: Schedule
    seed: int
    foreground_fraction: float = 0.5
    balance: tuple[int, ...] = ()
    augment: Augment = field(default_factory=Augment)
    patience: int | None = None
    min_delta: float = 0.0
    warmup: float = 0.1

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.patches_per_epoch // self.batch_size)


@dataclass
class FitResult:
    """The best epoch's weights and validation scores, and the run's history."""

    best_state: dict[str, torch.Tensor]
    best_scores: dict[str, Any]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]
    resumed_from: int


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class EpochOptions(Protocol):
    """What :func:`run_epochs` reads of a trainer's options."""

    @property
    def epochs(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def patience(self) -> int | None: ...
    @property
    def min_delta(self) -> float: ...
    @property
    def steps_per_epoch(self) -> int: ...


#: One training epoch: ``(optimizer, epoch, state, emit)`` -> mean loss (``state["step"]`` advanced).
EpochFn = Callable[[torch.optim.Optimizer, int, dict[str, Any], Report], float]
#: Validation scores -> (the score early stopping maximises, the history row's score columns).
Summarise = Callable[[dict[str, Any]], tuple[float, dict[str, Any]]]


def run_epochs(
    model: nn.Module,
    options: EpochOptions,
    *,
    one_epoch: EpochFn,
    evaluate: Evaluate,
    summarise: Summarise,
    checkpoint: Path,
    fingerprint: str,
    report: Report | None = None,
) -> FitResult:
    """The resumable epoch loop of every trainer (the U-Net's :func:`fit`, the Mask R-CNN's
    ``fit_detector``): AdamW, ``one_epoch`` then ``evaluate`` per epoch, the best epoch by
    ``summarise``'s score (with ``min_delta`` and ``patience``), a checkpoint after every epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    state = _resume(checkpoint, fingerprint, model, optimizer)
    start = int(state["epoch"])
    emit = report or (lambda _event, _info: None)
    emit("start", {"epoch": start, "epochs": options.epochs, "steps": options.steps_per_epoch})
    for epoch in range(start, options.epochs):
        if state["stopped"]:
            break
        loss = one_epoch(optimizer, epoch, state, emit)
        scores = evaluate(model)
        score, columns = summarise(scores)
        _after_epoch(model, optimizer, options, epoch, loss, (score, columns, scores), state)
        save_checkpoint(checkpoint, state)
        emit("epoch", state["history"][-1])
    best = state["best"]
    return FitResult(
        best_state=best["model"] if best["model"] else _state(model),
        best_scores=best["scores"],
        best_epoch=int(best["epoch"]),
        epochs_run=int(state["epoch"]),
        stopped_early=bool(state["stopped"]),
        history=list(state["history"]),
        resumed_from=start,
    )


def fit(
    model: nn.Module,
    regions: Sequence[Region],
    index: Sequence[IndexEntry],
    normalise: Normaliser,
    options: TrainOptions,
    *,
    evaluate: Evaluate,
    checkpoint: Path,
    fingerprint: str,
    report: Report | None = None,
) -> FitResult:
    """Train ``model`` (resuming from ``checkpoint`` when it exists) and return the best epoch."""

    def one_epoch(optimizer: torch.optim.Optimizer, epoch: int, state: dict[str, Any], emit: Report) -> float:
        return _epoch(model, optimizer, regions, index, normalise, options, epoch, state, emit)

    def summarise(scores: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        score = float(scores.get("mean_dice") or 0.0)
        return score, {"mean_dice": score, "pixel_accuracy": float(scores.get("pixel_accuracy") or 0.0)}

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return run_epochs(
            model,
            options,
            one_epoch=one_epoch,
            evaluate=evaluate,
            summarise=summarise,
            checkpoint=checkpoint,
            fingerprint=fingerprint,
            report=report,
        )
    finally:
        torch.use_deterministic_algorithms(previous)


def _resume(
    path: Path, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    saved = load_checkpoint(path)
    fresh: dict[str, Any] = {
        "fingerprint": fingerprint,
        "epoch": 0,
        "step": 0,
        "bad_epochs": 0,
        "stopped": False,
        "history": [],
        "best": {"score": -1.0, "epoch": 0, "model": {}, "scores": {}},
    }
    if saved is None:
        return fresh
    if saved["fingerprint"] != fingerprint:
        raise OutputConflictError(
            f"{path}: this checkpoint was written by a different training job (fingerprint "
            f"{saved['fingerprint'][:12]} != {fingerprint[:12]}: data, model or training settings "
            "changed). Rerun with --restart to discard it, or give another output.dir"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    saved.pop("model")
    saved.pop("optimizer")
    return saved


def _epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    regions: Sequence[Region],
    index: Sequence[IndexEntry],
    normalise: Normaliser,
    options: TrainOptions,
    epoch: int,
    state: dict[str, Any],
    emit: Report,
) -> float:
    rng = np.random.default_rng([options.seed, epoch])
    origins = draw_origins(
        rng,
        options.patches_per_epoch,
        regions,
        index,
        patch=options.patch,
        foreground_fraction=options.foreground_fraction,
        balance=options.balance,
    )
    total_steps = options.steps_per_epoch * options.epochs
    model.train()
    losses = []
    for b in range(options.steps_per_epoch):
        chunk = origins[b * options.batch_size : (b + 1) * options.batch_size]
        x, y = _batch(rng, regions, chunk, normalise, options)

        def loss_of(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            return dice_ce_loss(model(x), y)

        loss, lr = optimiser_step(optimizer, loss_of, state, total_steps, options)
        losses.append(loss)
        emit("step", {"epoch": epoch, "step": b + 1, "loss": loss, "lr": lr})
    return float(np.mean(losses))


def optimiser_step(
    optimizer: torch.optim.Optimizer,
    compute_loss: Callable[[], torch.Tensor],
    state: dict[str, Any],
    total_steps: int,
    options: Any,
    *,
    before_step: Callable[[], Any] | None = None,
) -> tuple[float, float]:
    """One step of every trainer: the scheduled learning rate for ``state["step"]``, the loss's
    gradients, ``before_step`` (gradient clipping), the update; returns (loss, learning rate)."""
    lr = learning_rate(state["step"], total_steps, lr=options.lr, schedule=options.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss()
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    state["step"] += 1
    return float(loss.detach()), lr


def _batch(
    rng: np.random.Generator,
    regions: Sequence[Region],
    origins: Sequence[tuple[int, tuple[int, ...]]],
    normalise: Normaliser,
    options: TrainOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for r, origin in origins:
        image, labels = read_patch(regions[r], origin, options.patch)
        image, labels = augment(rng, normalise(image), labels, options.augment)
        xs.append(image)
        ys.append(labels.astype(np.int64))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _after_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    options: EpochOptions,
    epoch: int,
    loss: float,
    scored: tuple[float, dict[str, Any], dict[str, Any]],
    state: dict[str, Any],
) -> None:
    score, columns, scores = scored
    state["history"].append(
        {"epoch": epoch + 1, "loss": loss, "lr": float(optimizer.param_groups[0]["lr"]), **columns}
    )

    best = state["best"]
    if score > best["score"] + options.min_delta or not best["model"]:
        state["best"] = {"score": score, "epoch": epoch + 1, "model": _state(model), "scores": scores}
        state["bad_epochs"] = 0
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch + 1
    state["stopped"] = options.patience is not None and state["bad_epochs"] >= options.patience
    state["model"] = _state(model)
    state["optimizer"] = copy.deepcopy(optimizer.state_dict())
