"""Post-processing steps on a semantic class map, chained after any semantic segmenter.

Each step declares the halo it adds, and the ``pipeline`` segmenter sums them, so the tiled
result equals the whole-image result:

- ``opening`` / ``closing`` with a disk (2-D) or ball (3-D) of ``radius``: halo ``2 * radius``;
- ``remove_small`` (objects of at most ``max_size`` pixels, as
  ``skimage.morphology.remove_small_objects``) and ``fill_holes`` (background regions of at most
  ``max_size`` pixels, as ``skimage.morphology.remove_small_holes``): halo ``max_extent``
  (default ``max_size``). A region touching a cut edge of the block (an edge that is not the
  image's) is never removed or filled; one that does not is seen whole and decided as on the
  whole image. This is exact when every region of at most ``max_size`` pixels spans at most
  ``max_extent`` pixels, which always holds for ``max_extent = max_size``; compact blobs allow
  a much smaller ``max_extent`` (about ``2 * sqrt(max_size)``).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage
from skimage import morphology

from pipeline.errors import ConfigError
from pipeline.models.base import (
    NODATA_LABEL,
    ImageInfo,
    Reducer,
    Segmenter,
    SegmenterParams,
    create_segmenter,
    register,
)
from pipeline.models.classical.components import InnerSpec
from pipeline.tiling import BlockContext


class Opening(SegmenterParams):
    op: Literal["opening", "closing"]
    radius: int = Field(ge=1, description="disk/ball radius in pixels")
    class_id: int = Field(1, ge=1, le=254)


class SizeFilter(SegmenterParams):
    op: Literal["remove_small", "fill_holes"]
    max_size: int = Field(ge=1, description="largest object/hole (pixels) removed/filled")
    max_extent: int | None = Field(None, ge=1, description="largest extent of such regions (halo)")
    connectivity: int = Field(1, ge=1, le=3)
    class_id: int = Field(1, ge=1, le=254)


Step = Annotated[Opening | SizeFilter, Field(discriminator="op")]


def step_halo(step: Opening | SizeFilter) -> int:
    """Context a step needs per side."""
    return 2 * step.radius if isinstance(step, Opening) else (step.max_extent or step.max_size)


Cut = tuple[tuple[bool, bool], ...]


def apply_step(classes: np.ndarray, step: Opening | SizeFilter, cut: Cut | None = None) -> np.ndarray:
    """Pure kernel: one post-processing step on a class map (nodata 255 is left alone).

    ``cut[axis] = (before, after)`` says which block edges are cuts through the image (not its
    border); regions touching them are kept as they are. ``None``: the block is the image.
    """
    mask = classes == step.class_id
    if isinstance(step, Opening):
        fp = morphology.disk(step.radius) if mask.ndim == 2 else morphology.ball(step.radius)
        new = _open_close(mask, fp, step.op)
    elif step.op == "remove_small":
        new = mask & ~_small_regions(mask, step, cut)
    else:
        new = mask | _small_regions(~mask & (classes != NODATA_LABEL), step, cut)
    out = classes.copy()
    out[mask & ~new] = 0
    out[new & ~mask & (classes == 0)] = step.class_id
    return out


def _open_close(mask: np.ndarray, fp: np.ndarray, op: str) -> np.ndarray:
    """Binary opening or closing as skimage's ``binary_opening``/``binary_closing`` (deprecated
    in 0.26) compute it: erosion counts pixels outside the block as set, dilation as unset."""
    erode = partial(ndimage.binary_erosion, structure=fp, border_value=True)
    dilate = partial(ndimage.binary_dilation, structure=fp, border_value=False)
    return dilate(erode(mask)) if op == "opening" else erode(dilate(mask))


def _small_regions(mask: np.ndarray, step: SizeFilter, cut: Cut | None) -> np.ndarray:
    """Regions of ``mask`` with at most ``max_size`` pixels that touch no cut edge."""
    labels, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, step.connectivity))
    small = np.bincount(labels.ravel()) <= step.max_size
    small[0] = False
    for axis, (before, after) in enumerate(cut or ()):
        for side, is_cut in ((0, before), (-1, after)):
            if is_cut:
                small[np.take(labels, side, axis=axis)] = False
    return small[labels]


class PipelineParams(SegmenterParams):
    first: InnerSpec = Field(description="the semantic segmenter whose output is post-processed")
    steps: list[Step] = Field(min_length=1, description="post-processing steps, in order")


@register
class Pipeline(Segmenter):
    """A semantic segmenter followed by post-processing steps; halos are summed."""

    name = "pipeline"
    summary = "chain: a semantic segmenter -> opening/closing/remove_small/fill_holes steps"
    halo_rule: ClassVar[str] = (
        "first segmenter's halo + 2*radius per opening/closing + max_extent (or max_size) per size filter"
    )
    Params = PipelineParams
    params: PipelineParams

    def __init__(self, params: SegmenterParams, info: ImageInfo, first: Segmenter | None = None) -> None:
        super().__init__(params, info)
        self.first = first or create_segmenter(self.params.first.name, self.params.first.params, info)
        if self.first.kind != "semantic":
            raise ConfigError(f"segmenter.params.first.name {self.first.name!r} must be semantic")
        for i, step in enumerate(self.params.steps):
            if step.class_id not in self.first.classes:
                raise ConfigError(
                    f"segmenter.params.steps[{i}].class_id {step.class_id} is not a class "
                    f"of {self.first.name!r}: {self.first.classes}"
                )
            if getattr(step, "connectivity", 1) > info.spatial_ndim:
                raise ConfigError(f"segmenter.params.steps[{i}].connectivity must be <= {info.spatial_ndim}")

    @property
    def halo(self) -> int:
        return self.first.halo + sum(step_halo(s) for s in self.params.steps)

    @property
    def classes(self) -> dict[int, str]:
        return self.first.classes

    def fit(self, reduce: Reducer) -> Pipeline:
        return Pipeline(self.params, self.info, self.first.fit(reduce))

    def fitted_values(self) -> dict[str, Any]:
        return self.first.fitted_values()

    uses_context: ClassVar[bool] = True

    def __call__(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None = None) -> np.ndarray:
        classes = self.first.run(block, valid, ctx)
        for step in self.params.steps:
            classes = apply_step(classes, step, ctx.cut if ctx else None)
        return classes
