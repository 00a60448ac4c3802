"""``segpipe train JOB.yaml``: stage the pairs, split by region, train a U-Net, write weights + card.

The work folder (``output.dir``) holds ``staging.zarr`` and ``checkpoints/last.pt``; rerunning
the same job resumes from the checkpoint (a changed job is refused unless ``restart``). The
model folder (``output.model_dir``) gets ``weights.safetensors`` (the best epoch's weights) and
``card.yaml``. :func:`evaluate_trained` recomputes the card's validation scores from the card
and the weights on the held-apart regions.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file
from torch import nn

from pipeline.data.geometry import GeoRef
from pipeline.errors import ConfigError
from pipeline.io.sources import open_source
from pipeline.metrics.contingency import Contingency, combine, contingency
from pipeline.metrics.semantic import semantic_metrics
from pipeline.models.torch.card import Architecture, Inputs, ModelCard, load_card, sha256_of
from pipeline.models.torch.unet import UNet, receptive_extent, receptive_field
from pipeline.models.torch.weights import load_weights
from pipeline.runner.train_data import StagedPair, select_bands, stage_pairs
from pipeline.runner.train_spec import ModelSpec, TrainJob, fingerprint
from pipeline.tiling import Box
from pipeline.train.augment import Augment
from pipeline.train.infer import predict_tiles
from pipeline.train.labels import IGNORE, check_class_ids
from pipeline.train.loop import FitResult, TrainOptions, fit
from pipeline.train.patches import Normaliser, Region, channel_stats, class_index
from pipeline.train.split import Split, split_region, strip_region

#: Edge of the tiles the held-apart region is predicted in (2-D, 3-D).
EVAL_TILE = {2: 512, 3: 96}


@dataclass(frozen=True)
class TrainOutcome:
    """Where the card and weights went, and the run's result."""

    card: Path
    weights: Path
    result: FitResult


def halo_of(depth: int) -> int:
    """Context one output pixel of the U-Net needs per side."""
    return max(receptive_extent(depth))


def data_checksums(job: TrainJob) -> list[str]:
    """SHA-256 of every image and label file (a DICOM folder: of its files in name order)."""
    return [_sha(Path(p)) for pair in job.data for p in (pair.image, pair.labels)]


def _sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(
            "".join(sha256_of(f) for f in sorted(path.iterdir()) if f.is_file()).encode()
        ).hexdigest()
    return sha256_of(path)


def splits_for(job: TrainJob, staged: list[StagedPair]) -> list[Split]:
    """The held-apart box and training slabs of every pair."""
    gap = job.split.gap or halo_of(job.unet.depth)
    out = []
    for pair, spec in zip(staged, job.data, strict=True):
        if spec.val_region is not None:
            val = Box(tuple(spec.val_region.start), tuple(spec.val_region.stop))
        else:
            val = strip_region(
                pair.shape,
                val_fraction=job.split.val_fraction,
                axis=job.split.axis,
                position=job.split.position,
            )
        out.append(split_region(pair.shape, val, gap=gap, patch=job.patch_size))
    return out


def train_job(job: TrainJob, *, command: str, restart: bool = False, progress: bool = True) -> TrainOutcome:
    """Run a training job end to end (resuming when its checkpoint exists)."""
    if not isinstance(job.model, ModelSpec):  # a detector: its own loop, same staging and card rules
        from pipeline.runner.train_detection import train_detector

        return train_detector(job, command=command, restart=restart, progress=progress)
    ids = check_class_ids(job.classes)
    torch.set_num_threads(job.threads)
    work, model_dir = Path(job.output.dir or "."), Path(job.output.model_dir or job.output.dir or ".")
    if restart:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        shutil.rmtree(work / "staging.zarr", ignore_errors=True)
    checksums = data_checksums(job)
    key = fingerprint(job, checksums)
    check_channels(job)
    staged = stage_pairs(job, work, key)
    splits = splits_for(job, staged)
    regions = [Region(s.image, s.labels, sp) for s, sp in zip(staged, splits, strict=True)]
    mean, std = channel_stats(regions, job.normalise.clip)
    normalise = Normaliser(mean, std, job.normalise.clip)
    model = _network(job, in_channels=len(staged[0].bands), out_channels=len(ids))
    evaluate = _evaluator(regions, normalise, ids, job.unet.depth)
    with _progress(progress, job.name) as report:
        result = fit(
            model,
            regions,
            class_index(regions, len(ids)),
            normalise,
            _options(job, len(staged[0].shape), ids),
            evaluate=evaluate,
            checkpoint=work / "checkpoints" / "last.pt",
            fingerprint=key,
            report=report,
        )
    weights = _save_weights(model_dir / "weights.safetensors", result.best_state)
    card = _card(job, staged, splits, normalise, result, checksums, weights, command)
    return TrainOutcome(card.save(model_dir / "card.yaml"), weights, result)


def check_channels(job: TrainJob) -> None:
    """Every pair must feed the model the same number of bands (headers only, before staging)."""
    counts = []
    for i, pair in enumerate(job.data):
        src = open_source(pair.image, allow_missing_crs=pair.allow_missing_crs)
        counts.append(len(select_bands(src, pair.bands, where=f"data[{i}].bands")[0]))
    if len(set(counts)) > 1:
        raise ConfigError(
            f"data: the pairs feed {counts} bands to one model; every image must give the same bands "
            f"(in the same order): set bands on each data entry ({[p.image for p in job.data]})"
        )


def _network(job: TrainJob, *, in_channels: int, out_channels: int) -> UNet:
    torch.manual_seed(job.seed)
    spatial = len(job.patch_size)
    m = job.unet
    return UNet(spatial, in_channels, out_channels, depth=m.depth, width=m.width, norm=m.norm)


def _options(job: TrainJob, ndim: int, ids: list[int]) -> TrainOptions:
    a, o, s = job.augment, job.optim, job.sampling
    flips = tuple(range(ndim)) if a.flips is None else tuple(a.flips)
    if any(not 0 <= f < ndim for f in flips):
        raise ConfigError(f"augment.flips {list(flips)}: spatial axes are 0..{ndim - 1}")
    return TrainOptions(
        patch=tuple(job.patch_size),
        epochs=o.epochs,
        patches_per_epoch=s.patches_per_epoch,
        batch_size=s.batch_size,
        lr=o.lr,
        weight_decay=o.weight_decay,
        schedule=o.schedule,
        seed=job.seed,
        foreground_fraction=s.foreground_fraction,
        balance=tuple(s.balance if s.balance is not None else ids),
        augment=Augment(flips, a.rot90, a.intensity_scale, a.intensity_shift),
        patience=o.patience,
        min_delta=o.min_delta,
    )


def _evaluator(regions: list[Region], normalise: Normaliser, ids: list[int], depth: int) -> Any:
    def evaluate(model: nn.Module) -> dict[str, Any]:
        return validation_scores(model, regions, [r.split.val for r in regions], normalise, ids, depth)

    return evaluate


def validation_scores(
    model: nn.Module,
    regions: list[Region],
    boxes: list[Box],
    normalise: Normaliser,
    ids: list[int],
    depth: int,
) -> dict[str, Any]:
    """Per-class Dice/IoU, mean Dice, mIoU and pixel accuracy of ``model`` on the held-apart boxes."""
    tables: list[Contingency] = []
    for region, box in zip(regions, boxes, strict=True):
        tile = (EVAL_TILE[box.ndim],) * box.ndim
        for core, pred in predict_tiles(
            model, region, box, normalise, tile=tile, halo=halo_of(depth), align=2**depth
        ):
            tables.append(contingency(pred, np.asarray(region.labels()[core.slices()]), ignore=IGNORE))
    m = semantic_metrics(combine(tables), classes=ids)
    return {
        "mean_dice": m["mean_dice"],
        "mIoU": m["mIoU"],
        "pixel_accuracy": m["pixel_accuracy"],
        "pixels": int(m["pixels"]),
        "per_class": {int(c): {k: m["per_class"][c][k] for k in ("dice", "iou")} for c in ids},
        "confusion_matrix": [[int(v) for v in row] for row in m["confusion_matrix"]],
    }


def _save_weights(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def _progress(enabled: bool, name: str) -> Any:
    """A rich progress bar on stderr fed by the loop's events (a no-op context when disabled)."""
    from contextlib import contextmanager

    @contextmanager
    def bar() -> Any:
        if not enabled:
            yield None
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=Console(stderr=True), transient=False) as prog:
            task = prog.add_task(name, total=None)

            def report(event: str, info: dict[str, Any]) -> None:
                if event == "start":
                    done = info["epoch"] * info["steps"]
                    prog.update(task, total=info["epochs"] * info["steps"], completed=done)
                elif event == "step":
                    prog.update(
                        task,
                        advance=1,
                        description=f"{name} epoch {info['epoch'] + 1} loss {info['loss']:.3f}",
                    )
                else:
                    loss, dice = info["loss"], info["mean_dice"]
                    prog.console.print(f"epoch {info['epoch']}: loss {loss:.4f}  val mean Dice {dice:.4f}")

            yield report

    return bar()


def _card(
    job: TrainJob,
    staged: list[StagedPair],
    splits: list[Split],
    normalise: Normaliser,
    result: FitResult,
    checksums: list[str],
    weights: Path,
    command: str,
) -> ModelCard:
    depth = job.unet.depth
    names = {int(k): v for k, v in job.classes.items()}
    scores = dict(result.best_scores)
    scores["per_class"] = {names[int(c)]: v for c, v in scores.get("per_class", {}).items()}
    validation = {
        "method": f"held-apart region per image, {splits[0].gap} px gap to every training patch",
        "epoch": result.best_epoch,
        **scores,
        "regions": [
            _region_record(d.image, p, sp) for d, p, sp in zip(job.data, staged, splits, strict=True)
        ],
    }
    training = {
        "data": data_records(job, checksums, splits),
        "labels": job.labels.model_dump(mode="json", by_alias=True),
        "seed": job.seed,
        "threads": job.threads,
        "epochs": job.optim.epochs,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "sampling": job.sampling.model_dump(mode="json"),
        "augment": job.augment.model_dump(mode="json"),
        "optim": {"optimizer": "AdamW", **job.optim.model_dump(mode="json")},
        "loss": "cross-entropy + soft Dice",
        "history": result.history,
    }
    card = ModelCard(
        name=job.name,
        description=job.description,
        architecture=Architecture(
            spatial_dims=len(job.patch_size),  # type: ignore[arg-type]
            in_channels=len(staged[0].bands),
            out_channels=len(names),
            depth=depth,
            width=job.unet.width,
            norm=job.unet.norm,
        ),
        classes=names,
        inputs=Inputs(
            bands=staged[0].bands, mean=list(normalise.mean), std=list(normalise.std), clip=normalise.clip
        ),
        patch_size=list(job.patch_size),
        receptive_field=receptive_field(depth),
        halo=halo_of(depth),
        instances=_instances(job),
        weights=weights.name,
        weights_sha256=sha256_of(weights),
        training=training,
        validation=validation,
        command=command,
    )
    return card


def _instances(job: TrainJob) -> dict[str, Any] | None:
    if job.labels.source != "instances":
        return None
    return {"from": "boundary", "interior_class": job.labels.interior, "boundary_class": job.labels.boundary}


def data_records(job: TrainJob, checksums: list[str], splits: list[Split]) -> list[dict[str, Any]]:
    """The card's record of each image/label pair: paths, SHA-256s and the training boxes."""
    return [
        {
            "image": _shown(pair.image),
            "image_sha256": checksums[2 * i],
            "labels": _shown(pair.labels),
            "labels_sha256": checksums[2 * i + 1],
            "train_boxes": [[list(b.start), list(b.stop)] for b in splits[i].train],
        }
        for i, pair in enumerate(job.data)
    ]


def _shown(path: str) -> str:
    """A data path as the card shows it: relative to the working directory the command ran in."""
    return os.path.relpath(path)


def _region_record(image: str, pair: StagedPair, split: Split) -> dict[str, Any]:
    record: dict[str, Any] = {"image": _shown(image), "box": [list(split.val.start), list(split.val.stop)]}
    if isinstance(pair.geometry, GeoRef):
        record["bounds"] = list(pair.geometry.bounds(split.val.start, split.val.stop))
        record["crs"] = pair.geometry.crs_wkt
    else:
        record["bounds_mm"] = list(pair.geometry.bounds(split.val.start, split.val.stop))
    return record


def evaluate_trained(job: TrainJob) -> dict[str, Any]:
    """Recompute the validation scores from the saved card and weights (the job's own evaluation)."""
    if not isinstance(job.model, ModelSpec):
        from pipeline.runner.train_detection import evaluate_detector

        return evaluate_detector(job)
    card = load_card(Path(job.output.model_dir or job.output.dir or "."))
    torch.set_num_threads(int(card.training.get("threads", job.threads)))
    key = fingerprint(job, data_checksums(job))
    staged = stage_pairs(job, Path(job.output.dir or "."), key)
    boxes = [Box(tuple(r["box"][0]), tuple(r["box"][1])) for r in card.validation["regions"]]
    splits = splits_for(job, staged)
    regions = [Region(s.image, s.labels, sp) for s, sp in zip(staged, splits, strict=True)]
    model = UNet(**card.network.network())
    model.load_state_dict(load_weights(card.weights_path))
    normalise = Normaliser(tuple(card.inputs.mean), tuple(card.inputs.std), card.inputs.clip)
    ids = sorted(card.classes)
    scores = validation_scores(model, regions, boxes, normalise, ids, card.network.depth)
    scores["per_class"] = {card.classes[c]: v for c, v in scores["per_class"].items()}
    return scores
