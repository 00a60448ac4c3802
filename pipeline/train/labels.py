"""Label values to class ids: a lookup of values, or instance ids to background/interior/boundary.

Class ids are ``0 .. K-1`` (the network's output channels); :data:`IGNORE` marks pixels that are
neither trained on nor scored (no-data labels, image no-data, values the job ignores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from skimage.segmentation import find_boundaries

from pipeline.errors import ConfigError

#: Class id of pixels that are neither trained on nor scored.
IGNORE = 255


@dataclass(frozen=True)
class ValueMap:
    """Label value -> class id; ``ignore`` values -> :data:`IGNORE`; others -> ``default``.

    With ``default`` ``None`` a value that is neither mapped nor ignored is an error, so a
    label file with an unexpected class is caught instead of being trained as background.
    An empty ``mapping`` maps every class id to itself.
    """

    mapping: Mapping[int, int]
    ignore: Sequence[int] = ()
    default: int | None = None
    classes: Sequence[int] = ()

    def apply(self, values: np.ndarray, *, source: str) -> np.ndarray:
        """Class ids (uint8) of ``values``; ``source`` names the file in errors."""
        flat = np.asarray(values)
        uniq, inverse = np.unique(flat, return_inverse=True)
        table = np.array([self._one(int(v), source) for v in uniq], dtype=np.uint8)
        return table[inverse].reshape(flat.shape)

    def _one(self, value: int, source: str) -> int:
        if value in self.ignore:
            return IGNORE
        if value in self.mapping:
            return int(self.mapping[value])
        if not self.mapping and value in self.classes:
            return value
        if self.default is not None:
            return self.default
        known = sorted({*self.mapping, *self.ignore} or set(self.classes))
        raise ConfigError(
            f"{source}: label value {value} is not a known class (mapped or ignored values: {known}). "
            f"Map it to a class in labels.map, list it in labels.ignore, or set labels.default"
        )


def instances_to_classes(ids: np.ndarray, *, interior: int, boundary: int) -> np.ndarray:
    """Instance ids (0 = background) to class ids: background 0, ``interior``, ``boundary``.

    Boundary pixels are the object pixels next to another id or to background (inner
    boundaries, 1 pixel wide, face connectivity), so touching objects stay apart.
    """
    out = np.zeros(ids.shape, dtype=np.uint8)
    obj = ids != 0
    out[obj] = interior
    out[find_boundaries(ids, connectivity=1, mode="inner") & obj] = boundary
    return out


def check_class_ids(classes: Mapping[int, str]) -> list[int]:
    """Class ids must be ``0 .. K-1`` with K >= 2 (the network's output channels)."""
    ids = sorted(classes)
    if ids != list(range(len(ids))) or len(ids) < 2:
        raise ConfigError(
            f"classes {dict(classes)} must have ids 0..K-1 with K >= 2 (one output channel each); "
            "renumber them and map the label values onto them with labels.map"
        )
    if IGNORE in ids:
        raise ConfigError(f"class id {IGNORE} is reserved for ignored pixels")
    return ids
