"""Prompts in world coordinates: mapping to pixel/voxel indices, windows, and mask pasting.

Pure geometry and numpy (pyproj for coordinate reference systems), shared by prompt-based
segmenters such as ``sam``:

- rasters: a point or box in ``EPSG:4326`` (lon, lat) or any CRS pyproj knows is transformed to
  the raster's CRS, then through the inverse affine transform to a continuous ``(row, col)``;
  the pixel is its floor (rasterio's ``index()`` rule);
- volumes: a point in patient mm (``LPS``, SimpleITK's physical frame, or ``RAS``) goes to a
  continuous ``(z, y, x)`` index through spacing, origin and direction; the voxel is the nearest
  one (SimpleITK's ``TransformPhysicalPointToIndex`` rule).

Each prompt gets a window of ``window`` pixels centred on it and shifted to stay inside the
image (on volumes, a window in each axial slice the prompt covers). :func:`paste_masks` turns
per-prompt masks into global ids (prompt number + 1) with a fixed overlap rule, so every chunk
that computes the same windows writes the same ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.data.geometry import Geometry, GeoRef, VolumeRef
from pipeline.errors import ConfigError
from pipeline.tiling import Box

VOLUME_FRAMES = ("LPS", "RAS")


class Prompt(BaseModel):
    """One prompt: a ``point`` or a ``box`` (two opposite corners), in the prompts' CRS.

    Rasters: ``point: [x, y]`` (lon, lat for EPSG:4326), ``box: [x0, y0, x1, y1]``.
    Volumes: ``point: [x, y, z]`` mm, ``box: [x0, y0, z0, x1, y1, z1]`` mm.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    point: list[float] | None = Field(None, description="[x, y] (rasters) or [x, y, z] mm (volumes)")
    box: list[float] | None = Field(None, description="two opposite corners: [x0, y0, x1, y1] or 6 values")
    name: str | None = Field(None, description="optional label for messages and the job summary")

    @model_validator(mode="after")
    def _one_kind(self) -> Prompt:
        if (self.point is None) == (self.box is None):
            raise ValueError("give exactly one of `point` or `box`")
        if self.point is not None and len(self.point) not in (2, 3):
            raise ValueError(f"point {self.point} needs 2 (x, y) or 3 (x, y, z) numbers")
        if self.box is not None and len(self.box) not in (4, 6):
            raise ValueError(f"box {self.box} needs 4 (x0, y0, x1, y1) or 6 (x0, y0, z0, x1, y1, z1) numbers")
        return self

    @property
    def kind(self) -> Literal["point", "box"]:
        """``"point"`` or ``"box"``."""
        return "point" if self.point is not None else "box"

    @property
    def values(self) -> list[float]:
        """The point's or the box's numbers."""
        return list(self.point if self.point is not None else self.box or [])


@dataclass(frozen=True)
class MappedPrompt:
    """A prompt in image index space (numpy axis order).

    ``number`` is 0-based (its global id is ``number + 1``). ``region`` holds the prompt's pixels:
    one pixel for a point, the pixels a box touches for a box. ``window`` is the crop given to the
    model: on volumes its z extent is the slices the prompt covers (each one segmented in 2-D).
    """

    number: int
    kind: Literal["point", "box"]
    region: Box
    window: Box

    @property
    def label(self) -> int:
        """The global id of this prompt's mask."""
        return self.number + 1

    def to_json(self) -> dict[str, object]:
        """A JSON-ready record (index order of the image: (y, x) or (z, y, x))."""
        return {
            "id": self.label,
            "kind": self.kind,
            "index_start": list(self.region.start),
            "index_stop": list(self.region.stop),
            "window_start": list(self.window.start),
            "window_stop": list(self.window.stop),
        }


# -- world -> continuous index ---------------------------------------------------------------
def raster_index(transform: Sequence[float], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuous ``(row, col)`` of world ``(x, y)`` in the raster's CRS (inverse affine)."""
    a, b, c, d, e, f = (float(v) for v in transform)
    det = a * e - b * d
    dx, dy = np.asarray(x, float) - c, np.asarray(y, float) - f
    col = (e * dx - b * dy) / det
    row = (a * dy - d * dx) / det
    return row, col


def to_raster_crs(xy: np.ndarray, prompts_crs: str, raster_crs_wkt: str) -> np.ndarray:
    """Points ``(n, 2)`` as (x, y) / (lon, lat) in ``prompts_crs`` -> (x, y) in the raster's CRS."""
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError

    try:
        src = CRS.from_user_input(prompts_crs)
    except CRSError as e:
        raise ConfigError(
            f"segmenter.params.prompts_crs {prompts_crs!r} is not a CRS pyproj knows ({e}); "
            "use 'EPSG:4326' for lon/lat or the raster's CRS (e.g. 'EPSG:32618')"
        ) from None
    dst = CRS.from_user_input(raster_crs_wkt)
    if src == dst:
        return np.asarray(xy, float)
    t = Transformer.from_crs(src, dst, always_xy=True)
    x, y = t.transform(xy[:, 0], xy[:, 1])
    return np.stack([np.asarray(x, float), np.asarray(y, float)], axis=1)


def from_raster_crs(xy: np.ndarray, prompts_crs: str, raster_crs_wkt: str) -> np.ndarray:
    """Inverse of :func:`to_raster_crs` (for messages: image bounds in the prompts' CRS)."""
    from pyproj import CRS, Transformer

    t = Transformer.from_crs(
        CRS.from_user_input(raster_crs_wkt), CRS.from_user_input(prompts_crs), always_xy=True
    )
    x, y = t.transform(xy[:, 0], xy[:, 1])
    return np.stack([np.asarray(x, float), np.asarray(y, float)], axis=1)


def volume_index(ref: VolumeRef, xyz: np.ndarray, frame: str = "LPS") -> np.ndarray:
    """Continuous ``(z, y, x)`` index of physical points ``(n, 3)`` given as (x, y, z) mm.

    The inverse of ``physical = origin + direction @ (spacing * index)`` (the same mapping as
    SimpleITK's ``TransformPhysicalPointToContinuousIndex``); ``RAS`` points are negated in x and
    y first (LPS is SimpleITK's and this repo's physical frame).
    """
    pts = np.asarray(xyz, float).reshape(-1, 3).copy()
    if frame == "RAS":
        pts[:, :2] *= -1
    zyx = pts[:, ::-1]
    m = np.asarray(ref.direction_zyx, float)
    rel = zyx - np.asarray(ref.origin_zyx, float)
    scaled = np.linalg.solve(m, rel.T).T
    return scaled / np.asarray(ref.spacing_zyx, float)


# -- prompts -> index regions and windows ----------------------------------------------------
def map_prompts(
    prompts: Sequence[Prompt],
    geometry: Geometry | None,
    shape: Sequence[int],
    *,
    crs: str,
    window: int,
) -> list[MappedPrompt]:
    """Every prompt in index space with its window; ConfigError naming any that leave the image."""
    if geometry is None or not shape:
        raise ConfigError(
            "prompts in world coordinates need the image geometry and shape; run through a job "
            "(or pass ImageInfo(shape=..., geometry=...) when building the segmenter in Python)"
        )
    out = []
    for i, p in enumerate(prompts):
        region = _region(p, i, geometry, tuple(shape), crs)
        out.append(MappedPrompt(i, p.kind, region, _window(region, i, tuple(shape), window)))
    return out


def _region(p: Prompt, i: int, geometry: Geometry, shape: tuple[int, ...], crs: str) -> Box:
    nd = len(shape)
    want = nd if p.kind == "point" else 2 * nd
    if len(p.values) != want:
        raise ConfigError(
            f"segmenter.params.prompts[{i}]: {p.kind} {p.values} has {len(p.values)} numbers; on a "
            f"{'raster' if nd == 2 else 'volume'} a {p.kind} needs {want}"
        )
    corners = np.asarray(p.values, float).reshape(-1, nd)
    if isinstance(geometry, GeoRef):
        cont = _raster_continuous(corners, geometry, crs)
        region = _pixels(cont, p.kind, shape, rule="floor")
    else:
        cont = _volume_continuous(corners, geometry, crs)
        region = _pixels(cont, p.kind, shape, rule="round")
    if not Box.from_shape(shape).contains(region) or region.size == 0:
        raise ConfigError(_outside_message(p, i, cont, geometry, shape, crs))
    return region


def _raster_continuous(corners: np.ndarray, geo: GeoRef, crs: str) -> np.ndarray:
    if crs in VOLUME_FRAMES:
        raise ConfigError(
            f"segmenter.params.prompts_crs {crs!r} is a patient frame for volumes; this input is a "
            "raster: give 'EPSG:4326' (lon, lat) or the raster's CRS"
        )
    if geo.crs_wkt is None:
        raise ConfigError(
            "the input raster has no CRS, so world prompts cannot be placed on it; give it a CRS "
            "(e.g. with `gdal_edit.py -a_srs`) before prompting in world coordinates"
        )
    xy = to_raster_crs(corners, crs, geo.crs_wkt)
    row, col = raster_index(geo.transform, xy[:, 0], xy[:, 1])
    return np.stack([row, col], axis=1)


def _volume_continuous(corners: np.ndarray, ref: VolumeRef, crs: str) -> np.ndarray:
    if crs not in VOLUME_FRAMES:
        raise ConfigError(
            f"segmenter.params.prompts_crs {crs!r} is not a patient frame; on a volume give "
            "prompts in mm as 'LPS' (SimpleITK's physical frame, the default) or 'RAS'"
        )
    return volume_index(ref, corners, crs)


def _pixels(cont: np.ndarray, kind: str, shape: tuple[int, ...], *, rule: str) -> Box:
    """The pixel of a point, or the pixels a box touches (floor: corner convention; round: centres)."""
    if not np.all(np.isfinite(cont)):
        return Box((-1,) * len(shape), (-1,) * len(shape))
    if kind == "point":
        idx = np.floor(cont[0]) if rule == "floor" else np.floor(cont[0] + 0.5)
        start = tuple(int(v) for v in idx)
        return Box(start, tuple(s + 1 for s in start))
    lo, hi = cont.min(axis=0), cont.max(axis=0)
    if rule == "floor":
        start, stop = np.floor(lo), np.maximum(np.ceil(hi), np.floor(lo) + 1)
    else:
        start, stop = np.floor(lo + 0.5), np.floor(hi + 0.5) + 1
    return Box(tuple(int(v) for v in start), tuple(int(v) for v in stop))


def _window(region: Box, i: int, shape: tuple[int, ...], size: int) -> Box:
    """A window of ``size`` pixels per in-plane axis centred on the region, shifted inside the image.

    On volumes the window's z extent is the region's (each slice is segmented on its own).
    """
    lead = len(shape) - 2
    start, stop = list(region.start[:lead]), list(region.stop[:lead])
    for axis in range(lead, len(shape)):
        n, w = shape[axis], min(size, shape[axis])
        extent = region.stop[axis] - region.start[axis]
        if extent > w:
            raise ConfigError(
                f"segmenter.params.prompts[{i}]: the box spans {extent} pixels along axis {axis}, more "
                f"than the window of {w}; raise segmenter.params.window to at least {extent}"
            )
        centre = (region.start[axis] + region.stop[axis] - 1) // 2
        a = min(max(centre - w // 2, 0), n - w)
        start.append(a)
        stop.append(a + w)
    return Box(tuple(start), tuple(stop))


def _outside_message(
    p: Prompt, i: int, cont: np.ndarray, geometry: Geometry, shape: tuple[int, ...], crs: str
) -> str:
    what = f"segmenter.params.prompts[{i}]" + (f" ({p.name!r})" if p.name else "")
    index = np.round(cont, 2).tolist()
    axes = "(row, col)" if len(shape) == 2 else "(z, y, x)"
    return (
        f"{what}: {p.kind} {p.values} in {crs} maps to index {axes} {index}, outside the image of "
        f"shape {shape}; the image covers {image_bounds(geometry, shape, crs)}. Give a prompt "
        "inside the image (check the coordinate order and prompts_crs)."
    )


def image_bounds(geometry: Geometry, shape: tuple[int, ...], crs: str) -> str:
    """The image's extent in the prompts' CRS, as text for messages."""
    if isinstance(geometry, VolumeRef):
        b = geometry.bounds((0, 0, 0), shape)  # voxel corners at integer indices: centres span 0..n-1
        lo, hi = np.asarray(b[:3])[::-1], np.asarray(b[3:])[::-1]  # (x, y, z) LPS
        if crs == "RAS":
            lo, hi = lo * [-1, -1, 1], hi * [-1, -1, 1]
            lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        return _ranges(lo, hi, ("x", "y", "z"), "mm " + crs)
    x0, y0, x1, y1 = geometry.bounds((0, 0), shape)
    corners = np.array([[x0, y0], [x0, y1], [x1, y0], [x1, y1]])
    try:
        pts = from_raster_crs(corners, crs, geometry.crs_wkt or "")
    except Exception:
        pts = corners
        crs = "the raster's CRS"
    return _ranges(pts.min(axis=0), pts.max(axis=0), ("x", "y"), crs)


def _ranges(lo: np.ndarray, hi: np.ndarray, names: Sequence[str], unit: str) -> str:
    parts = [f"{n} {_fmt(a)}..{_fmt(b)}" for n, a, b in zip(names, lo, hi, strict=True)]
    return ", ".join(parts) + f" ({unit})"


def _fmt(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)


# -- masks -> global ids ---------------------------------------------------------------------
@dataclass(frozen=True)
class PromptMask:
    """One prompt's mask over its window (one slice of it on volumes) and its predicted IoU."""

    label: int
    window: Box
    mask: np.ndarray
    score: float


def paste_masks(shape: tuple[int, ...], origin: Sequence[int], masks: Sequence[PromptMask]) -> np.ndarray:
    """Global ids over a block at ``origin``: where masks overlap, the higher predicted IoU wins,
    then the lower prompt number. A mask only labels pixels of its own window."""
    out = np.zeros(shape, np.uint32)
    block = Box(tuple(origin), tuple(o + s for o, s in zip(origin, shape, strict=True)))
    for m in sorted(masks, key=lambda m: (-m.score, m.label)):
        part = m.window.intersect(block)
        if part.size == 0:
            continue
        dest = out[part.relative_to(block).slices()]
        src = m.mask.reshape(m.window.shape)[part.relative_to(m.window).slices()]
        dest[src & (dest == 0)] = m.label
    return out
