"""Classical segmenters (registered on import)."""

from __future__ import annotations

from pipeline.models.classical import components as components
from pipeline.models.classical import threshold as threshold
from pipeline.models.classical import thresholds as thresholds
