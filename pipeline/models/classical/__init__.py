"""Classical segmenters (registered on import)."""

from __future__ import annotations

from pipeline.models.classical import colour as colour
from pipeline.models.classical import components as components
from pipeline.models.classical import edges as edges
from pipeline.models.classical import indices as indices
from pipeline.models.classical import kmeans as kmeans
from pipeline.models.classical import postprocess as postprocess
from pipeline.models.classical import seeded as seeded
from pipeline.models.classical import threshold as threshold
from pipeline.models.classical import thresholds as thresholds
from pipeline.models.classical import watershed as watershed
