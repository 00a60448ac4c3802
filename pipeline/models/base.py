"""The segmenter protocol, its registry and the global-fit reducer contract.

A segmenter is built from typed parameters and the facts of one image (:class:`ImageInfo`),
declares its ``kind``, ``halo`` and ``classes``, may ``fit`` global statistics through a
reducer the engine supplies, and maps a numpy block ``(C, *spatial)`` with halo to labels
``(*spatial)`` for the same region. No I/O, no dask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.data.geometry import Geometry
from pipeline.errors import ConfigError
from pipeline.registry import Registry
from pipeline.tiling import BlockContext

Kind = Literal["semantic", "instance", "panoptic"]
#: How instance ids meet across seams: ``touch`` (the engine labels connected components of
#: the segmenter's class map in each chunk and joins components touching across a seam: exact),
#: ``overlap`` (the segmenter returns instance labels on its whole read block; ids are matched by
#: IoU in the halo overlap), ``none`` (ids are already global, e.g. an existing label map).
MergePolicy = Literal["touch", "overlap", "none"]
T = TypeVar("T")
#: ``partial(block, valid, core) -> T``: statistics of one chunk's core (block has its halo).
PartialFn = Callable[[np.ndarray, np.ndarray, tuple[slice, ...]], Any]
CombineFn = Callable[[Any, Any], Any]
#: ``reduce(partial, combine) -> T``: the engine maps ``partial`` over all chunks and combines.
Reducer = Callable[[PartialFn, CombineFn], Any]
NODATA_LABEL = 255


@dataclass(frozen=True)
class ImageInfo:
    """What a segmenter may know about its image when it is built."""

    kind: Literal["raster", "volume"]
    n_channels: int
    dtype: str
    band_names: tuple[str, ...] = ()
    #: Spatial shape and geometry, for segmenters that take prompts in world coordinates.
    shape: tuple[int, ...] = ()
    geometry: Geometry | None = None

    @property
    def spatial_ndim(self) -> int:
        """2 for rasters, 3 for volumes."""
        return 2 if self.kind == "raster" else 3


class SegmenterParams(BaseModel):
    """Base of every segmenter's parameters: strict, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Segmenter:
    """Base class of segmenters; subclasses set ``name``, ``Params`` and ``__call__``."""

    name: ClassVar[str] = ""
    kind: ClassVar[Kind] = "semantic"
    summary: ClassVar[str] = ""
    Params: ClassVar[type[SegmenterParams]] = SegmenterParams
    nodata_label: ClassVar[int] = NODATA_LABEL
    merge: ClassVar[MergePolicy] = "touch"
    #: Whether ``__call__`` takes ``ctx=``: where the block lies in the image (origin, cut edges),
    #: for segmenters whose rule depends on it (size filters, prompts in world coordinates).
    uses_context: ClassVar[bool] = False

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        self.params = params
        self.info = info

    @property
    def spatial_ndim(self) -> int:
        """2 or 3."""
        return self.info.spatial_ndim

    @property
    def halo(self) -> int:
        """Context needed per side, in pixels/voxels."""
        return 0

    @property
    def classes(self) -> dict[int, str]:
        """Class id -> name (``nodata_label`` is reserved for nodata)."""
        return {0: "background", 1: "foreground"}

    @property
    def connectivity(self) -> int:
        """Neighbourhood for instance labelling and seam merges (1 = faces only)."""
        return 1

    @property
    def instance_classes(self) -> list[int]:
        """Classes turned into instances (``touch`` policy): every class but 0 and nodata."""
        return [c for c in self.classes if c not in (0, self.nodata_label)]

    @property
    def stuff_segments(self) -> dict[int, int]:
        """Panoptic only: stuff class -> segment id."""
        return {}

    @property
    def iou_threshold(self) -> float:
        """Minimum IoU in the halo overlap for two ids to be one object (``overlap`` policy)."""
        return 0.5

    def fit(self, reduce: Reducer) -> Segmenter:
        """Return a segmenter with global statistics fitted; the default needs none."""
        return self

    def fitted_values(self) -> dict[str, Any]:
        """Fitted statistics for the job summary (empty when nothing is fitted)."""
        return {}

    @property
    def extra_outputs(self) -> dict[str, int]:
        """Extra per-pixel float outputs requested (name -> bands; 0 = one band, no band axis)."""
        return {}

    def run_extra(
        self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Labels and the extra outputs over the block (segmenters with ``extra_outputs`` override)."""
        return self.run(block, valid, ctx), {}

    def run(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None) -> np.ndarray:
        """Call the segmenter, passing ``ctx`` only to those that use it."""
        if self.uses_context:
            return self(block, valid, ctx=ctx)  # type: ignore[call-arg]
        return self(block, valid)

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Labels for ``block`` (``(C, *spatial)`` with halo), same spatial shape.

        Semantic and ``touch`` instance segmenters return a uint8 class map; ``overlap`` ones
        return instance ids (0 = background); ``none`` ones return global ids.
        """
        raise NotImplementedError


SEGMENTERS: Registry[type[Segmenter]] = Registry("segmenter", group="segpipe.segmenters")


def register(cls: type[Segmenter]) -> type[Segmenter]:
    """Class decorator adding a segmenter to :data:`SEGMENTERS`."""
    SEGMENTERS.register(cls.name, cls)
    return cls


def create_segmenter(name: str, params: Mapping[str, Any], info: ImageInfo) -> Segmenter:
    """Build a registered segmenter; bad parameters raise :class:`ConfigError` naming them."""
    cls = SEGMENTERS.get(name)
    try:
        typed = cls.Params.model_validate(dict(params))
    except ValidationError as e:
        raise ConfigError(_params_message(name, cls, e)) from None
    return cls(typed, info)


def _params_message(name: str, cls: type[Segmenter], err: ValidationError) -> str:
    allowed = ", ".join(cls.Params.model_fields)
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(parameters)"
        lines.append(f"segmenter.params.{where}: {item['msg']}")
    return (
        f"invalid parameters for segmenter {name!r}: "
        + "; ".join(lines)
        + f". Allowed parameters: {allowed}."
    )


def describe(name: str) -> dict[str, Any]:
    """Name, kind, summary, parameters (with types and defaults) and halo rule of a segmenter."""
    cls = SEGMENTERS.get(name)
    params = {}
    for field, info in cls.Params.model_fields.items():
        default = None if info.is_required() else info.default
        params[field] = {
            "type": _type_name(info.annotation),
            "default": default,
            "required": info.is_required(),
            "help": info.description or "",
        }
    return {
        "name": name,
        "kind": cls.kind,
        "summary": cls.summary,
        "params": params,
        "halo": getattr(cls, "halo_rule", "0"),
    }


def _type_name(annotation: object) -> str:
    """Readable type text: ``float | Literal['otsu', 'yen']`` rather than ``Union``."""
    args = get_args(annotation)
    if args and get_origin(annotation) is Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if args and get_origin(annotation) in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args and get_origin(annotation) is Annotated:
        return _type_name(args[0])
    if args:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(get_origin(annotation), '__name__', 'type')}[{inner}]"

    text = getattr(annotation, "__name__", None) or str(annotation)
    return "None" if text == "NoneType" else text.replace("typing.", "")
