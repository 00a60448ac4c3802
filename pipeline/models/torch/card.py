"""Model cards: the YAML that goes with every weights file (written by ``segpipe train``).

A card says what the model is (architecture), what it eats (bands or channels, their
normalisation, patch size), what it gives (classes), how far it looks (receptive field, the
halo), what it was trained on, how it scored on held-apart data, and the command that made it.
The weights file is named relative to the card and checked by its SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ConfigError, ReadError

#: Shipped models: ``pipeline/models/zoo/<name>/card.yaml``.
ZOO = Path(__file__).resolve().parent.parent / "zoo"


class Architecture(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["unet"] = "unet"
    spatial_dims: Literal[2, 3]
    in_channels: int = Field(ge=1)
    out_channels: int = Field(ge=2)
    depth: int = Field(ge=1, le=6)
    width: int = Field(ge=1)
    norm: Literal["batch", "none"] = "batch"

    def network(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~pipeline.models.torch.unet.UNet`."""
        return self.model_dump(exclude={"name"})


class MaskRCNNArchitecture(BaseModel):
    """A slim torchvision Mask R-CNN (see :mod:`pipeline.models.torch.maskrcnn`): never resizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["maskrcnn"]
    spatial_dims: Literal[2] = 2
    in_channels: int = Field(ge=1)
    #: Classes including background (0).
    num_classes: int = Field(ge=2)
    #: Trunk channels at strides 4, 8, 16, ...; the feature pyramid's channels.
    widths: list[int] = Field(default_factory=lambda: [32, 64, 96], min_length=2)
    fpn_channels: int = Field(64, ge=1)
    #: Box head: MLP ``fpn_channels * 7 * 7 -> representation -> representation``.
    representation: int = Field(128, ge=1)
    mask_layers: int = Field(4, ge=1)
    #: Anchor sizes (pixels) per pyramid level (one more level than ``widths``: the pooled one).
    anchor_sizes: list[list[int]] = Field(default_factory=lambda: [[8, 12], [16, 24], [32, 48], [64, 96]])
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    #: Boxes of this side map to the pyramid level of stride 16 (smaller ones to finer levels).
    canonical_scale: int = Field(112, ge=1)
    rpn_pre_nms_top_n: int = Field(1000, ge=1)
    rpn_post_nms_top_n: int = Field(500, ge=1)
    #: Inference: proposals kept per pyramid level before NMS, and in all after it. Large, so a
    #: big window with many objects keeps proposals for each (results depend little on its size).
    rpn_pre_nms_top_n_test: int = Field(8000, ge=1)
    rpn_post_nms_top_n_test: int = Field(3000, ge=1)
    box_batch_size_per_image: int = Field(256, ge=1)
    box_score_threshold: float = Field(0.05, ge=0, le=1)
    box_nms_threshold: float = Field(0.5, gt=0, le=1)
    detections_per_image: int = Field(300, ge=1)
    #: Input sizes are padded to multiples of this (the coarsest pyramid stride).
    size_divisible: int = Field(32, ge=1)


class Inputs(BaseModel):
    """Which channels of the input feed the model, and how they are scaled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: 1-based band indices or band names of the input, in model channel order.
    bands: list[int | str]
    mean: list[float]
    std: list[float]
    #: Values are clipped to this range before scaling (e.g. a CT HU window); None: no clip.
    clip: tuple[float, float] | None = None


class Runtime(BaseModel):
    """An exported or brought-in network file run without its Python code (TorchScript or ONNX)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["torchscript", "onnx"]
    file: str
    sha256: str = ""
    #: Input layout: a batch of channel-first windows, 2-D or 3-D.
    layout: Literal["NCHW", "NCDHW"]
    #: What the network returns: ``semantic_logits`` (per-class logits at the input's size);
    #: ``maskrcnn`` (per image: boxes (n, 4) x0,y0,x1,y1, labels (n,), scores (n,), masks (n, [1,] M, M)
    #: over each box, or (n, [1,] H, W) at the window's size: see ``masks``); ``yolo_seg`` (YOLOv8-seg:
    #: predictions (B, 4 + classes + nm, anchors) of cx,cy,w,h, class scores and mask coefficients,
    #: and prototypes (B, nm, H/s, W/s)). See :mod:`pipeline.models.torch.decoders`.
    output: Literal["semantic_logits", "maskrcnn", "yolo_seg"] = "semantic_logits"
    #: Detectors: masks per box (``roi``, e.g. Mask R-CNN's 28x28) or at the window's size (``image``).
    masks: Literal["roi", "image"] = "roi"
    #: yolo_seg decoding: class-score threshold, class-aware NMS IoU, detections kept per image.
    score_threshold: float = Field(default=0.25, ge=0, le=1)
    nms_threshold: float = Field(default=0.45, gt=0, le=1)
    max_detections: int = Field(default=300, ge=1)
    #: Spatial sizes the network accepts are multiples of this (2**depth for a U-Net); segpipe pads.
    align: int = Field(1, ge=1)

    @property
    def spatial_dims(self) -> int:
        return len(self.layout) - 2


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    #: Our own U-Net (built from this and the safetensors weights); optional when ``runtime`` is set.
    architecture: Architecture | MaskRCNNArchitecture | None = None
    #: A TorchScript/ONNX file to run instead of building the network from ``architecture``.
    runtime: Runtime | None = None
    classes: dict[int, str]
    inputs: Inputs
    patch_size: list[int]
    #: ``(before, after)`` reach of one output pixel, per side, and the full width.
    receptive_field: int
    halo: int
    #: Instances from class maps (e.g. nuclei: foreground + boundary): which class seeds them.
    instances: dict[str, Any] | None = None
    weights: str = "weights.safetensors"
    weights_sha256: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    command: str = ""
    #: Folder the card was read from (not serialised).
    folder: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _one_network(self) -> ModelCard:
        if self.architecture is None and self.runtime is None:
            raise ValueError(
                "a model card needs `architecture` (a segpipe U-Net) or `runtime` (a model file)"
            )
        return self

    @property
    def weights_path(self) -> Path:
        return (self.folder or Path(".")) / (self.runtime.file if self.runtime else self.weights)

    @property
    def spatial_dims(self) -> int:
        if self.runtime is None and isinstance(self.architecture, MaskRCNNArchitecture):
            return 2
        return self.runtime.spatial_dims if self.runtime else self.network.spatial_dims

    @property
    def network(self) -> Architecture:
        """The U-Net architecture (a card with a runtime file may have none)."""
        if not isinstance(self.architecture, Architecture):
            kind: str = self.runtime.format if self.runtime else "model"
            if isinstance(self.architecture, MaskRCNNArchitecture):
                kind = "Mask R-CNN"
            raise ValueError(f"model card {self.name!r} describes a {kind} file, not a U-Net")
        return self.architecture

    @property
    def align(self) -> int:
        """Input sizes the network needs: multiples of this (segpipe pads windows)."""
        if self.runtime is None and isinstance(self.architecture, MaskRCNNArchitecture):
            return self.architecture.size_divisible
        return self.runtime.align if self.runtime else int(2**self.network.depth)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def save(self, path: str | Path) -> Path:
        """Write the card as YAML (stable key order)."""
        p = Path(path)
        data = self.model_dump(mode="json", exclude={"folder"})
        p.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return p


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_card(model: str) -> Path:
    """The card file for ``model``: a shipped model's name, a card YAML, or a folder holding ``card.yaml``."""
    p = Path(model).expanduser()
    if p.is_dir():
        p = p / "card.yaml"
    if p.is_file():
        return p
    shipped = ZOO / model / "card.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(d.name for d in ZOO.iterdir() if (d / "card.yaml").is_file()) if ZOO.is_dir() else []
    raise ConfigError(
        f"model {model!r}: no such model card. Give a card YAML written by `segpipe train`, a folder "
        f"holding card.yaml, or a shipped model: {', '.join(names) or '(none shipped)'}"
    )


def load_card(model: str | Path, *, check_weights: bool = True) -> ModelCard:
    """Read and validate a model card; the weights file must exist and match its checksum."""
    path = resolve_card(str(model))
    try:
        raw = yaml.safe_load(path.read_text())
        card = ModelCard.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as e:
        raise ReadError(f"{path}: not a valid model card ({e})") from None
    card.folder = path.parent
    if check_weights:
        w = card.weights_path
        if not w.is_file():
            raise ReadError(
                f"{path}: its weights file {w} is missing; re-run the training command in the card "
                f"({card.command or 'segpipe train ...'})"
            )
        expected = card.runtime.sha256 if card.runtime else card.weights_sha256
        if expected and sha256_of(w) != expected:
            raise ReadError(
                f"{w}: checksum differs from the card {path} (weights_sha256); the weights were "
                "changed or truncated. Re-train or restore the file that goes with this card."
            )
    return card
