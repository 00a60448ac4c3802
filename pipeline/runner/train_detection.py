"""``segpipe train`` for a detector (``model: {name: maskrcnn}``): instance labels -> Mask R-CNN.

Same job file, split, checksums, checkpoints and card rules as the U-Net path
(:mod:`pipeline.runner.training`), but the labels are staged as instance ids (``uint32``, not
class maps) and the held-apart score is instance F1 at IoU 0.5. The work folder holds
``staging.zarr/<i>/{image,instances}`` and ``checkpoints/last.pt``; the model folder gets
``weights.safetensors`` and ``card.yaml`` (``architecture.name: maskrcnn``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io import zarr_store
from pipeline.io.sources import open_source
from pipeline.models.torch.card import Inputs, MaskRCNNArchitecture, ModelCard, load_card, sha256_of
from pipeline.runner.detection_fit import DetectionOptions, InstanceRegion, fit_detector, validation_scores
from pipeline.runner.train_data import StagedPair, _label_values, _reader, select_bands
from pipeline.runner.train_spec import MaskRCNNSpec, TrainJob, fingerprint
from pipeline.runner.training import (
    TrainOutcome,
    _progress,
    _region_record,
    check_channels,
    data_checksums,
    data_records,
)
from pipeline.tiling import Box
from pipeline.train.augment import Augment
from pipeline.train.patches import Normaliser, chunk_boxes
from pipeline.train.split import Split, split_region, strip_region

STAGE_CHUNK = 256


def _spec(job: TrainJob) -> MaskRCNNSpec:
    assert isinstance(job.model, MaskRCNNSpec)
    return job.model


def stage_instances(job: TrainJob, work: Path, key: str) -> list[StagedPair]:
    """Stage each pair as ``image`` (float32 ``(C, H, W)``) and ``instances`` (uint32 ids, the
    :class:`StagedPair`'s ``labels``); skipped when already staged for this fingerprint."""
    out = []
    for i, pair in enumerate(job.data):
        folder = work / "staging.zarr" / str(i)
        src = open_source(pair.image, allow_missing_crs=pair.allow_missing_crs)
        channels, bands = select_bands(src, pair.bands, where=f"data[{i}].bands")
        shape = tuple(src.spatial_shape)
        if len(shape) != 2:
            raise ValueError(f"data[{i}].image {src.path}: Mask R-CNN trains on 2-D images")
        staged = StagedPair(folder / "image", folder / "instances", shape, src.geometry, bands)
        marker = folder / "staged.json"
        if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == key:
            out.append(staged)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        chunk = (STAGE_CHUNK, STAGE_CHUNK)
        zarr_store.create_array(
            staged.image,
            shape=(len(channels), *shape),
            chunks=(len(channels), *chunk),
            dtype="float32",
            geometry=src.geometry,
        )
        zarr_store.create_array(
            staged.labels, shape=shape, chunks=chunk, dtype="uint32", geometry=src.geometry
        )
        read, ids = _reader(src), _label_values(pair, src, Path(pair.labels))
        for box in chunk_boxes(shape, chunk, Box.from_shape(shape)):
            zarr_store.write_box(staged.image, box, read(box)[channels].astype(np.float32))
            zarr_store.write_box(staged.labels, box, np.asarray(ids(box)).astype(np.uint32))
        tmp = marker.with_name(f".{marker.name}.tmp")
        tmp.write_text(json.dumps({"fingerprint": key}))
        os.replace(tmp, marker)
        out.append(staged)
    return out


def _splits(job: TrainJob, shapes: list[tuple[int, ...]]) -> list[Split]:
    gap = job.split.gap or (_spec(job).context + 1)
    splits = []
    for shape, spec in zip(shapes, job.data, strict=True):
        if spec.val_region is not None:
            val = Box(tuple(spec.val_region.start), tuple(spec.val_region.stop))
        else:
            val = strip_region(
                shape, val_fraction=job.split.val_fraction, axis=job.split.axis, position=job.split.position
            )
        splits.append(split_region(shape, val, gap=gap, patch=job.patch_size))
    return splits


def _regions(job: TrainJob, key: str) -> tuple[list[InstanceRegion], list[StagedPair], list[Split]]:
    import zarr

    staged = stage_instances(job, Path(job.output.dir or "."), key)
    splits = _splits(job, [s.shape for s in staged])
    regions = [
        InstanceRegion(
            zarr.open_array(store=str(s.image), mode="r"), zarr.open_array(store=str(s.labels), mode="r"), sp
        )
        for s, sp in zip(staged, splits, strict=True)
    ]
    return regions, staged, splits


def _stats(regions: list[InstanceRegion]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation per channel over the training slabs."""
    n, s, q = 0, 0.0, 0.0
    for r in regions:
        for slab in r.split.train:
            x = np.asarray(r.image[(slice(None), *slab.slices())], np.float64).reshape(r.image.shape[0], -1)
            n, s, q = n + x.shape[1], s + x.sum(axis=1), q + (x * x).sum(axis=1)
    mean = np.atleast_1d(s / n)
    std = np.sqrt(np.maximum(np.atleast_1d(q / n) - mean**2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def architecture(job: TrainJob, in_channels: int) -> MaskRCNNArchitecture:
    """The card's architecture for this job's model settings."""
    m = _spec(job)
    extra: dict[str, Any] = {"anchor_sizes": m.anchor_sizes} if m.anchor_sizes else {}
    return MaskRCNNArchitecture(
        name="maskrcnn",
        in_channels=in_channels,
        num_classes=len(job.classes),
        widths=m.widths,
        fpn_channels=m.fpn_channels,
        representation=m.representation,
        mask_layers=m.mask_layers,
        **extra,
    )


def receptive_field(arch: MaskRCNNArchitecture) -> int:
    """Width of the trunk + pyramid's receptive field at its coarsest level (3x3 convolutions)."""
    rf, jump = 1, 1
    layers = [2, 2, 1, 1] + [2, 1, 1] * (len(arch.widths) - 1)  # strides: stem, stem, residual
    for stride in layers:
        rf += 2 * jump
        jump *= stride
    return rf + 2 * jump  # the pyramid's output convolution


def train_detector(
    job: TrainJob, *, command: str, restart: bool = False, progress: bool = True
) -> TrainOutcome:
    """Stage, split, train and write weights + card for a ``maskrcnn`` job."""
    from pipeline.models.torch.maskrcnn import build_maskrcnn

    m = _spec(job)
    torch.set_num_threads(job.threads)
    work, model_dir = Path(job.output.dir or "."), Path(job.output.model_dir or job.output.dir or ".")
    if restart:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        shutil.rmtree(work / "staging.zarr", ignore_errors=True)
    checksums = data_checksums(job)
    key = fingerprint(job, checksums)
    check_channels(job)
    regions, staged, splits = _regions(job, key)
    normalise = Normaliser(*_stats(regions))
    arch = architecture(job, len(staged[0].bands))
    torch.manual_seed(job.seed)
    model = build_maskrcnn(arch)
    a, o, s = job.augment, job.optim, job.sampling
    options = DetectionOptions(
        patch=(job.patch_size[0], job.patch_size[1]),
        epochs=o.epochs,
        patches_per_epoch=s.patches_per_epoch,
        batch_size=s.batch_size,
        lr=o.lr,
        weight_decay=o.weight_decay,
        schedule=o.schedule,
        seed=job.seed,
        augment=Augment(
            tuple(a.flips if a.flips is not None else (0, 1)), a.rot90, a.intensity_scale, a.intensity_shift
        ),
        min_area=m.min_object_area,
        grad_clip=m.grad_clip,
        score_threshold=m.score_threshold,
        patience=o.patience,
        min_delta=o.min_delta,
    )
    with _progress_f1(progress, job.name) as report:
        result = fit_detector(
            model,
            regions,
            normalise,
            options,
            checkpoint=work / "checkpoints" / "last.pt",
            fingerprint=key,
            report=report,
        )
    from safetensors.torch import save_file

    weights = model_dir / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file({k: v.contiguous() for k, v in result.best_state.items()}, str(tmp))
    os.replace(tmp, weights)
    card = _card(job, arch, staged, splits, normalise, result, checksums, weights, command)
    return TrainOutcome(card.save(model_dir / "card.yaml"), weights, result)


def _progress_f1(enabled: bool, name: str) -> Any:
    """The U-Net progress bar, its epoch line showing F1 instead of Dice."""
    from contextlib import contextmanager

    @contextmanager
    def bar() -> Any:
        with _progress(enabled, name) as report:
            if report is None:
                yield None
                return

            def relay(event: str, info: dict[str, Any]) -> None:
                if event == "epoch":
                    print(
                        f"epoch {info['epoch']}: loss {info['loss']:.4f}  held-apart F1@0.5 {info['f1']:.4f}",
                        flush=True,
                    )
                    return
                report(event, info)

            yield relay

    return bar()


def _card(
    job: TrainJob,
    arch: MaskRCNNArchitecture,
    staged: list[StagedPair],
    splits: list[Split],
    normalise: Normaliser,
    result: Any,
    checksums: list[str],
    weights: Path,
    command: str,
) -> ModelCard:
    m = _spec(job)
    validation = {
        "method": f"held-apart region per image, {splits[0].gap} px gap to every training patch; "
        "each region detected from its own pixels only, instances matched one-to-one at IoU > 0.5",
        "epoch": result.best_epoch,
        **result.best_scores,
        "regions": [
            _region_record(d.image, p, sp) for d, p, sp in zip(job.data, staged, splits, strict=True)
        ],
    }
    training = {
        "data": data_records(job, checksums, splits),
        "labels": job.labels.model_dump(mode="json", by_alias=True),
        "targets": f"every instance id with >= {m.min_object_area} pixels in the patch (objects cut by "
        "the patch edge kept as their visible part)",
        "seed": job.seed,
        "threads": job.threads,
        "epochs": job.optim.epochs,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "sampling": job.sampling.model_dump(mode="json"),
        "augment": job.augment.model_dump(mode="json"),
        "optim": {"optimizer": "AdamW", "grad_clip": m.grad_clip, **job.optim.model_dump(mode="json")},
        "loss": "torchvision Mask R-CNN losses (RPN objectness + box, ROI class + box + mask), summed",
        "history": result.history,
    }
    return ModelCard(
        name=job.name,
        description=job.description,
        architecture=arch,
        classes={int(k): v for k, v in job.classes.items()},
        inputs=Inputs(bands=staged[0].bands, mean=list(normalise.mean), std=list(normalise.std)),
        patch_size=list(job.patch_size),
        receptive_field=receptive_field(arch),
        halo=m.context,
        instances={"from": "detections", "score_threshold": m.score_threshold, "mask_threshold": 0.5},
        weights=weights.name,
        weights_sha256=sha256_of(weights),
        training=training,
        validation=validation,
        command=command,
    )


def evaluate_detector(job: TrainJob) -> dict[str, Any]:
    """Recompute the card's held-apart scores from the saved card and weights."""
    from pipeline.models.torch.maskrcnn import load_maskrcnn

    card = load_card(Path(job.output.model_dir or job.output.dir or "."))
    torch.set_num_threads(int(card.training.get("threads", job.threads)))
    key = fingerprint(job, data_checksums(job))
    regions, _, _ = _regions(job, key)
    boxes = [Box(tuple(r["box"][0]), tuple(r["box"][1])) for r in card.validation["regions"]]
    model = load_maskrcnn(card)
    normalise = Normaliser(tuple(card.inputs.mean), tuple(card.inputs.std))
    threshold = float(card.validation.get("score_threshold", 0.5))
    return validation_scores(model, regions, normalise, score_threshold=threshold, boxes=boxes)
