"""Colour-space segmentation: RGB to HSV or CIE Lab, and range rules per channel.

Conversions are pixelwise (halo 0) and give the same value for a pixel whatever block it is
in: HSV is ``skimage.color.rgb2hsv``; Lab is ``skimage.color.rgb2lab`` with its 3x3
RGB -> XYZ product written out per channel (skimage's ``@`` goes through BLAS, whose
rounding depends on the array's shape: 37 NAIP pixels differ in the last bit between a
block and the whole tile) followed by ``skimage.color.xyz2lab``; it agrees with
``rgb2lab`` to 1e-12.

Channels and their ranges: ``rgb`` r, g, b in [0, 1]; ``hsv`` h, s, v in [0, 1] (hue as a
fraction of the circle); ``lab`` L in [0, 100], a and b about [-128, 127].
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator
from skimage import color
from skimage.color import colorconv

from pipeline.models.base import ImageInfo, Segmenter, SegmenterParams, register
from pipeline.models.classical.threshold import resolve_band

Space = Literal["rgb", "hsv", "lab"]
CHANNELS: dict[str, tuple[str, str, str]] = {
    "rgb": ("r", "g", "b"),
    "hsv": ("h", "s", "v"),
    "lab": ("L", "a", "b"),
}
BandRef = int | str


def unit_rgb(block: np.ndarray, bands: tuple[int, int, int], max_value: float) -> np.ndarray:
    """Pure kernel: the three bands of ``block`` as float64 RGB in [0, 1] (``(3, *spatial)``)."""
    rgb = np.stack([block[b].astype(np.float64) for b in bands]) / max_value
    return np.clip(rgb, 0.0, 1.0)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Pure kernel: CIE Lab (D65, 2 degrees) of ``(3, *spatial)`` RGB in [0, 1], per pixel."""
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = colorconv.xyz_from_rgb
    xyz = np.stack([m[i, 0] * linear[0] + m[i, 1] * linear[1] + m[i, 2] * linear[2] for i in range(3)])
    return np.asarray(color.xyz2lab(xyz, channel_axis=0))


def convert(rgb: np.ndarray, space: str) -> np.ndarray:
    """Pure kernel: ``(3, *spatial)`` RGB in [0, 1] to ``space`` (channels first)."""
    if space == "hsv":
        return np.asarray(color.rgb2hsv(rgb, channel_axis=0))
    if space == "lab":
        return rgb_to_lab(rgb)
    return rgb


def default_max_value(dtype: str) -> float:
    """White of a dtype: its maximum for integers (255 for uint8), 1.0 for floats."""
    dt = np.dtype(dtype)
    return float(np.iinfo(dt).max) if np.issubdtype(dt, np.integer) else 1.0


class ColourParams(SegmenterParams):
    bands: tuple[BandRef, BandRef, BandRef] = Field((1, 2, 3), description="red, green, blue bands")
    space: Space = Field("hsv", description="colour space: rgb, hsv or lab")
    max_value: float | None = Field(None, gt=0, description="white (default: dtype max, 1.0 for floats)")


class ColourSegmenter(Segmenter):
    """Base of colour segmenters: resolves the RGB bands and the white level."""

    halo_rule: ClassVar[str] = "0 (pixelwise)"
    params: ColourParams

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        p = self.params
        self.rgb_bands = tuple(
            resolve_band(b, info, where=f"segmenter.params.bands[{i}]") for i, b in enumerate(p.bands)
        )
        self.max_value = p.max_value if p.max_value is not None else default_max_value(info.dtype)

    def colours(self, block: np.ndarray) -> np.ndarray:
        """The block in the chosen colour space, ``(3, *spatial)``."""
        bands = (self.rgb_bands[0], self.rgb_bands[1], self.rgb_bands[2])
        return convert(unit_rgb(block, bands, self.max_value), self.params.space)


class ColourRule(SegmenterParams):
    class_name: str = Field(description="class given to pixels inside every range of this rule")
    ranges: dict[str, tuple[float, float]] = Field(
        description="channel -> [lo, hi] inclusive; for hue lo > hi wraps through 0 (reds)"
    )


class ColourRangeParams(ColourParams):
    rules: list[ColourRule] = Field(min_length=1, description="first matching rule wins; none: class 0")

    @model_validator(mode="after")
    def _channels(self) -> ColourRangeParams:
        allowed = CHANNELS[self.space]
        for i, rule in enumerate(self.rules):
            for ch, (lo, hi) in rule.ranges.items():
                if ch not in allowed:
                    raise ValueError(f"rules[{i}].ranges: {ch!r} is not a {self.space} channel {allowed}")
                if lo > hi and ch != "h":
                    raise ValueError(
                        f"rules[{i}].ranges.{ch} [{lo}, {hi}] is empty: lo must not exceed hi "
                        "(only hue h may wrap)"
                    )
        return self


def range_labels(
    channels: np.ndarray, rules: list[tuple[int, dict[int, tuple[float, float]]]], valid: np.ndarray
) -> np.ndarray:
    """Pure kernel: the class of the first rule whose ranges all hold, 0 if none, 255 off ``valid``.

    ``rules`` holds ``(class id, {channel index: (lo, hi)})``; ``lo > hi`` means wrap-around.
    """
    out = np.zeros(channels.shape[1:], dtype=np.uint8)
    free = valid.copy()
    for cid, ranges in rules:
        hit = free.copy()
        for ch, (lo, hi) in ranges.items():
            x = channels[ch]
            hit &= ((x >= lo) & (x <= hi)) if lo <= hi else ((x >= lo) | (x <= hi))
        out[hit] = cid
        free &= ~hit
    out[~valid] = Segmenter.nodata_label
    return out


@register
class ColourRange(ColourSegmenter):
    """Range rules on RGB, HSV or Lab channels, e.g. ripe fruit: ``{h: [0.95, 0.08], s: [0.4, 1]}``."""

    name = "colour_range"
    summary = "colour range rules (per channel, RGB/HSV/Lab), first matching rule gives the class"
    Params = ColourRangeParams
    params: ColourRangeParams

    @property
    def classes(self) -> dict[int, str]:
        names = list(dict.fromkeys(rule.class_name for rule in self.params.rules))
        return {0: "background", **{i + 1: n for i, n in enumerate(names)}}

    def compiled_rules(self) -> list[tuple[int, dict[int, tuple[float, float]]]]:
        """Rules as class ids and channel indices, for :func:`range_labels`."""
        ids = {name: cid for cid, name in self.classes.items()}
        order = CHANNELS[self.params.space]
        rules = self.params.rules
        return [(ids[r.class_name], {order.index(c): rng for c, rng in r.ranges.items()}) for r in rules]

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return range_labels(self.colours(block), self.compiled_rules(), valid)
