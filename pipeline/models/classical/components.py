"""Instance segmenters built on a semantic rule: connected components, and existing label maps."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from pipeline.errors import ConfigError
from pipeline.models.base import (
    ImageInfo,
    MergePolicy,
    Reducer,
    Segmenter,
    SegmenterParams,
    create_segmenter,
    register,
)


class InnerSpec(SegmenterParams):
    name: str = Field(description="a semantic segmenter, e.g. otsu")
    params: dict[str, Any] = Field(default_factory=dict)


class ComponentsParams(SegmenterParams):
    semantic: InnerSpec = Field(description="the semantic rule whose classes become instances")
    classes: list[int] | None = Field(None, description="classes to label (default: all but 0)")
    connectivity: int = Field(1, ge=1, le=3, description="1 = faces; 2 (2-D: 8-neighbours); 3 (3-D: 26)")


@register
class Components(Segmenter):
    """Connected components of a semantic rule's classes, exact across chunk seams."""

    name = "components"
    kind = "instance"
    summary = "connected components (per class) of a semantic segmenter's output"
    halo_rule: ClassVar[str] = "the inner semantic segmenter's halo"
    Params = ComponentsParams
    params: ComponentsParams

    def __init__(self, params: SegmenterParams, info: ImageInfo, inner: Segmenter | None = None) -> None:
        super().__init__(params, info)
        if self.params.connectivity > info.spatial_ndim:
            raise ConfigError(
                f"segmenter.params.connectivity {self.params.connectivity} is not valid "
                f"for a {info.spatial_ndim}-D image; use 1..{info.spatial_ndim}"
            )
        self.inner = inner or create_segmenter(self.params.semantic.name, self.params.semantic.params, info)
        if self.inner.kind != "semantic":
            raise ConfigError(f"segmenter.params.semantic.name {self.inner.name!r} is not semantic")
        unknown = set(self.params.classes or []) - set(self.inner.classes)
        if unknown:
            raise ConfigError(
                f"segmenter.params.classes {sorted(unknown)} are not classes of "
                f"{self.inner.name!r}, which has {self.inner.classes}"
            )

    @property
    def halo(self) -> int:
        return self.inner.halo

    @property
    def classes(self) -> dict[int, str]:
        return self.inner.classes

    @property
    def connectivity(self) -> int:
        return self.params.connectivity

    @property
    def instance_classes(self) -> list[int]:
        return list(self.params.classes) if self.params.classes else super().instance_classes

    def fit(self, reduce: Reducer) -> Components:
        return Components(self.params, self.info, self.inner.fit(reduce))

    def fitted_values(self) -> dict[str, Any]:
        return self.inner.fitted_values()

    @property
    def uses_context(self) -> bool:  # type: ignore[override]
        return self.inner.uses_context

    def __call__(self, block: np.ndarray, valid: np.ndarray, ctx: Any = None) -> np.ndarray:
        return self.inner.run(block, valid, ctx)


class LabelMapParams(SegmenterParams):
    band: int = Field(1, ge=1, description="the band holding the ids")


@register
class LabelMap(Segmenter):
    """An existing label map (ids already global): for object tables and polygons of labels."""

    name = "label_map"
    kind = "instance"
    merge: ClassVar[MergePolicy] = "none"
    summary = "use the input's integer values as instance ids (object tables, polygons)"
    Params = LabelMapParams
    params: LabelMapParams

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        if np.dtype(info.dtype).kind not in "ui":
            raise ConfigError(f"label_map needs an integer image; this one is {info.dtype}")
        if self.params.band > info.n_channels:
            raise ConfigError(f"segmenter.params.band {self.params.band} > the {info.n_channels} bands")

    @property
    def classes(self) -> dict[int, str]:
        return {0: "background", 1: "object"}

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        ids = block[self.params.band - 1]
        if ids.dtype.kind == "i" and (ids < 0).any():
            raise ConfigError("label_map: negative ids found; ids must be >= 0 (0 = background)")
        return np.where(valid, ids, 0).astype(np.uint64)


class PanopticParams(SegmenterParams):
    semantic: InnerSpec = Field(description="semantic segmenter giving every pixel a class")
    things: list[int] = Field(min_length=1, description="countable classes; all others are stuff")
    connectivity: int = Field(1, ge=1, le=3)


@register
class Panoptic(Components):
    """Stuff classes as one segment each, thing classes as connected instances; one category per id."""

    name = "panoptic"
    kind = "panoptic"  # type: ignore[assignment]
    summary = "panoptic: stuff classes stitched as semantic, thing classes as merged instances"
    Params = PanopticParams  # type: ignore[assignment]
    params: PanopticParams  # type: ignore[assignment]

    def __init__(self, params: SegmenterParams, info: ImageInfo, inner: Segmenter | None = None) -> None:
        Segmenter.__init__(self, params, info)
        self.inner = inner or create_segmenter(self.params.semantic.name, self.params.semantic.params, info)
        missing = set(self.params.things) - set(self.inner.classes)
        if missing or self.params.connectivity > info.spatial_ndim:
            raise ConfigError(
                f"segmenter.params.things {sorted(missing)} are not classes of "
                f"{self.inner.name!r} ({self.inner.classes}), or connectivity > "
                f"{info.spatial_ndim}"
            )

    @property
    def instance_classes(self) -> list[int]:
        return list(self.params.things)

    @property
    def stuff_segments(self) -> dict[int, int]:
        """Stuff class -> its segment id (1..n_stuff); thing ids come after."""
        stuff = [c for c in self.classes if c not in self.params.things and c != self.nodata_label]
        return {c: i + 1 for i, c in enumerate(stuff)}

    def fit(self, reduce: Reducer) -> Panoptic:
        return Panoptic(self.params, self.info, self.inner.fit(reduce))
