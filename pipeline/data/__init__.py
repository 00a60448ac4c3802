"""The image contract: geometry value objects and the lazy image wrapper."""

from __future__ import annotations

from pipeline.data.geometry import GeoRef, VolumeRef, check_same_geometry
from pipeline.data.image import Image, valid_mask, validate_image, wrap_image

__all__ = [
    "GeoRef",
    "Image",
    "VolumeRef",
    "check_same_geometry",
    "valid_mask",
    "validate_image",
    "wrap_image",
]
