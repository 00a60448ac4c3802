"""The training job file: strict YAML -> :class:`TrainJob` (``segpipe train JOB.yaml``).

Unknown keys are errors naming the key path and the keys allowed there. Data paths are
relative to the job file's folder; output folders to the working directory (as for ``run``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from pipeline.errors import ConfigError, ReadError
from pipeline.runner.spec import apply_override


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RegionSpec(_Strict):
    start: list[int] = Field(description="first pixel/voxel of the held-apart box, numpy order")
    stop: list[int] = Field(description="one past its last pixel/voxel")


class PairSpec(_Strict):
    image: str = Field(description="raster, volume or DICOM folder (relative to the job file)")
    labels: str = Field(description="label raster/volume on the image grid, or polygons (.geojson, .gpkg)")
    bands: list[int | str] | None = Field(None, description="1-based band indices or band names; all")
    allow_missing_crs: bool = False
    class_field: str | None = Field(None, description="polygons: the attribute holding the label value")
    burn: int = Field(1, description="polygons without class_field: the label value of every polygon")
    resample_labels: bool = Field(
        False, description="volumes: resample labels on another grid onto the image by physical position"
    )
    val_region: RegionSpec | None = Field(None, description="explicit held-apart box (else split.*)")


class LabelsSpec(_Strict):
    source: Literal["values", "instances"] = Field("values", alias="from")
    map: dict[int, int] = Field(default_factory=dict, description="label value -> class id; {}: identity")
    ignore: list[int] = Field(default_factory=list, description="label values neither trained on nor scored")
    default: int | None = Field(
        None, description="class of values not mapped; None: such a value is an error"
    )
    interior: int = Field(1, description="instances: class id of object interiors")
    boundary: int = Field(2, description="instances: class id of object boundaries")


class ModelSpec(_Strict):
    name: Literal["unet"] = "unet"
    depth: int = Field(3, ge=1, le=6)
    width: int = Field(16, ge=1)
    norm: Literal["batch", "none"] = "batch"


class MaskRCNNSpec(_Strict):
    """A slim Mask R-CNN trained on instance labels (``labels: {from: instances}``)."""

    name: Literal["maskrcnn"]
    widths: list[int] = Field(default_factory=lambda: [32, 64, 96], min_length=2)
    fpn_channels: int = Field(64, ge=1)
    representation: int = Field(128, ge=1)
    mask_layers: int = Field(4, ge=1)
    anchor_sizes: list[list[int]] | None = Field(None, description="per pyramid level; default 8..96 px")
    min_object_area: int = Field(
        8, ge=1, description="objects cut by the patch edge to fewer pixels are not targets"
    )
    context: int = Field(32, ge=0, description="pixels of context the segmenter keeps around objects")
    score_threshold: float = Field(0.5, ge=0, le=1, description="validation: detections kept")
    grad_clip: float = Field(10.0, gt=0)


def _model_kind(value: Any) -> str:
    name = value.get("name", "unet") if isinstance(value, dict) else getattr(value, "name", "unet")
    return name if name in MODEL_KINDS else "unet"


MODEL_KINDS: dict[str, type[BaseModel]] = {"unet": ModelSpec, "maskrcnn": MaskRCNNSpec}


class NormaliseSpec(_Strict):
    clip: tuple[float, float] | None = Field(None, description="clip window before scaling (e.g. CT HU)")


class SplitSpec(_Strict):
    method: Literal["region"] = "region"
    val_fraction: float = Field(0.2, gt=0, lt=1)
    axis: int | None = Field(None, ge=0, description="spatial axis of the strip; default the longest")
    position: Literal["start", "end"] = "end"
    gap: int | None = Field(None, ge=1, description="pixels between training and validation; default halo")


class SamplingSpec(_Strict):
    patches_per_epoch: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    foreground_fraction: float = Field(0.5, ge=0, le=1)
    balance: list[int] | None = Field(None, description="classes targeted in turn; default all")


class AugmentSpec(_Strict):
    flips: list[int] | None = Field(None, description="spatial axes flipped at random; default all")
    rot90: bool = True
    intensity_scale: float = Field(0.1, ge=0, lt=1)
    intensity_shift: float = Field(0.1, ge=0)


class OptimSpec(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(20, ge=1)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    patience: int | None = Field(5, ge=1, description="epochs without a better mean Dice before stopping")
    min_delta: float = Field(0.0, ge=0)


class TrainOutputSpec(_Strict):
    dir: str | None = Field(None, description="work folder (staging, checkpoints); outputs/train/<name>")
    model_dir: str | None = Field(None, description="weights + card; default: dir")


class TrainJob(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    data: list[PairSpec] = Field(min_length=1)
    labels: LabelsSpec = Field(default_factory=LabelsSpec)  # type: ignore[arg-type]
    classes: dict[int, str]
    model: Annotated[
        Annotated[ModelSpec, Tag("unet")] | Annotated[MaskRCNNSpec, Tag("maskrcnn")],
        Discriminator(_model_kind),
    ] = Field(default_factory=ModelSpec)  # type: ignore[arg-type]
    patch_size: list[int] = Field(min_length=2, max_length=3)
    normalise: NormaliseSpec = Field(default_factory=NormaliseSpec)  # type: ignore[arg-type]
    split: SplitSpec = Field(default_factory=SplitSpec)  # type: ignore[arg-type]
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)  # type: ignore[arg-type]
    augment: AugmentSpec = Field(default_factory=AugmentSpec)  # type: ignore[arg-type]
    optim: OptimSpec = Field(default_factory=OptimSpec)  # type: ignore[arg-type]
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch threads (fixed, for reproducible sums)")
    output: TrainOutputSpec = Field(default_factory=TrainOutputSpec)  # type: ignore[arg-type]

    @property
    def unet(self) -> ModelSpec:
        """The U-Net settings (a job training another model has none)."""
        if not isinstance(self.model, ModelSpec):
            raise ConfigError(f"training job {self.name!r} trains a {self.model.name}, not a U-Net")
        return self.model

    @model_validator(mode="after")
    def _classes_known(self) -> TrainJob:
        ids = set(self.classes)
        used = set(self.labels.map.values())
        if self.labels.default is not None:
            used.add(self.labels.default)
        if isinstance(self.model, MaskRCNNSpec):
            if self.labels.source != "instances" or sorted(ids) != [0, 1]:
                raise ValueError(
                    "model maskrcnn trains on instance labels: set labels: {from: instances} and "
                    "classes: {0: background, 1: <object>}"
                )
            return self
        if self.labels.source == "instances":
            used |= {0, self.labels.interior, self.labels.boundary}
        for c in [*sorted(used), *(self.sampling.balance or [])]:
            if c not in ids:
                raise ValueError(
                    f"class id {c} is used (labels or sampling.balance) but not in classes {ids}"
                )
        if any(s < 1 for s in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be positive")
        return self


def load_train_job(path: str | Path, overrides: list[str] | None = None) -> TrainJob:
    """Read, override (``key.path=value``) and validate a training job; resolve its paths."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ReadError(f"{p}: training job file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a training job must be a mapping of keys (name, data, classes, ...)")
    for item in overrides or []:
        apply_override(raw, item)
    try:
        job = TrainJob.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{p}: " + "; ".join(_describe(err) for err in e.errors())) from None
    return resolve_train_paths(job, base=p.parent, source=str(p))


def _describe(err: Any) -> str:
    loc = [str(x) for x in err["loc"]]
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown key {where!r}; allowed keys here: {', '.join(_allowed(loc[:-1]))}"
    if err["type"] == "missing":
        return f"missing required key {where!r}"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _allowed(parent: list[str]) -> list[str]:
    model: Any = TrainJob
    if parent[:1] == ["model"] and len(parent) >= 2 and parent[1] in MODEL_KINDS:
        model, parent = MODEL_KINDS[parent[1]], parent[2:]
    for key in parent:
        if key.isdigit():
            continue
        field = model.model_fields.get(key)
        args = getattr(field.annotation, "__args__", ()) if field else ()
        nested = [a for a in (field.annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return [f.alias or k for k, f in model.model_fields.items()]


def resolve_train_paths(job: TrainJob, *, base: Path, source: str = "<job>") -> TrainJob:
    """Data paths against the job file's folder (each must exist); outputs against the working dir."""
    pairs = []
    for i, pair in enumerate(job.data):
        update = {}
        for key in ("image", "labels"):
            p = Path(getattr(pair, key)).expanduser()
            p = (p if p.is_absolute() else base / p).resolve()
            if not p.exists():
                raise ReadError(
                    f"{source}: data[{i}].{key}: {p} does not exist. Paths are relative to the job "
                    f"file's folder ({base.resolve()}); fix the path or copy the file there"
                )
            update[key] = str(p)
        pairs.append(pair.model_copy(update=update))
    out = Path(job.output.dir or Path("outputs") / "train" / job.name).expanduser().resolve()
    model_dir = Path(job.output.model_dir).expanduser().resolve() if job.output.model_dir else out
    output = job.output.model_copy(update={"dir": str(out), "model_dir": str(model_dir)})
    return job.model_copy(update={"data": pairs, "output": output})


def fingerprint(job: TrainJob, data_sha256: list[str]) -> str:
    """Identity of a training run: every setting that changes the weights, and the data's checksums."""
    body = job.model_dump(mode="json", exclude={"output", "description"}, by_alias=True)
    if body["model"].get("name") == "unet":  # U-Net jobs fingerprint as before the name existed
        del body["model"]["name"]
    return hashlib.sha256(json.dumps([body, data_sha256], sort_keys=True).encode()).hexdigest()
