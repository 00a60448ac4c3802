"""Segmenters: one protocol for classical and learned methods, registered by name."""

from __future__ import annotations

from pipeline.models.base import SEGMENTERS, ImageInfo, Segmenter, create_segmenter, describe

__all__ = ["SEGMENTERS", "ImageInfo", "Segmenter", "create_segmenter", "describe"]
