"""STAC Items for written rasters and Collections of them, through pystac; validated offline.

An Item describes one raster as written (read back with rasterio): footprint and bbox in
lon/lat, the projection extension (``proj:code``, ``proj:wkt2``, ``proj:shape``,
``proj:transform``, ``proj:bbox`` in the raster's CRS) and, on the asset, the file extension
(``file:size``, ``file:checksum`` as a sha256 multihash). Hrefs are relative to the JSON file,
so a folder can be moved or uploaded whole.

Validation: pystac ships the JSON schemas of STAC core 1.1 (Item, Collection, Catalog) and
GeoJSON, so :func:`validate_core` works without a network. The extension schemas (projection
2.0.0, file 2.1.0) are fetched from their URLs by ``item.validate()``, which fails offline;
neither pystac nor stac-validator ships them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.validation import RegisteredValidator
from rasterio.warp import transform as warp_points

from pipeline.errors import WriteError

#: Points per footprint edge when the raster's outline is reprojected to lon/lat.
EDGE_POINTS = 21


@dataclass(frozen=True)
class ItemSpec:
    """What an Item says beyond the raster itself: id, time, title, extra properties, links."""

    item_id: str
    when: datetime
    title: str
    roles: tuple[str, ...] = ("data",)
    properties: dict[str, Any] = field(default_factory=dict)
    #: ``(rel, path, media type, title)``: other files of the run (summary, metrics, input).
    links: tuple[tuple[str, Path, str, str], ...] = ()


def sha256_multihash(path: Path) -> str:
    """``file:checksum`` of ``path``: the multihash of its sha256 (``1220`` + 64 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "1220" + digest.hexdigest()


def raster_item(raster: Path, dest: Path, spec: ItemSpec) -> pystac.Item:
    """The Item of the raster file ``raster``, to be written at ``dest`` (hrefs relative to it)."""
    with rasterio.open(raster) as ds:
        crs, shape, transform, bounds = ds.crs, [ds.height, ds.width], ds.transform, ds.bounds
        values = _data_values(ds.dtypes[0], ds.nodata)
    footprint = _footprint(crs, bounds) if crs is not None else None
    item = pystac.Item(
        spec.item_id,
        footprint,
        _bbox(footprint) if footprint else None,
        spec.when,
        {"title": spec.title, "created": pystac.utils.datetime_to_str(spec.when), **spec.properties},
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = crs.to_epsg() if crs is not None else None
    proj.apply(
        code=f"EPSG:{epsg}" if epsg else None,  # the code for search, the WKT for tools
        wkt2=crs.to_wkt(version="WKT2_2019") if crs is not None else None,
        shape=shape,
        transform=[float(v) for v in tuple(transform)[:6]],
        bbox=[float(v) for v in bounds],
    )
    asset = pystac.Asset(
        _rel(raster, dest),
        title=spec.title,
        media_type=pystac.MediaType.COG,
        roles=list(spec.roles),
        extra_fields=values,
    )
    item.add_asset("data", asset)
    FileExtension.ext(asset, add_if_missing=True).apply(
        size=raster.stat().st_size, checksum=sha256_multihash(raster)
    )
    for rel, target, media_type, title in spec.links:
        item.add_link(pystac.Link(rel, _rel(target, dest), media_type=media_type, title=title))
    return item


def _data_values(dtype: str, nodata: float | None) -> dict[str, Any]:
    """STAC 1.1 common data-value fields of an asset: ``data_type`` and ``nodata``."""
    values: dict[str, Any] = {"data_type": dtype}
    if nodata is not None:
        values["nodata"] = "nan" if math.isnan(nodata) else (int(nodata) if nodata.is_integer() else nodata)
    return values


def _footprint(crs: Any, bounds: Any) -> dict[str, Any]:
    """The raster's outline in lon/lat, densified along each edge."""
    left, bottom, right, top = bounds
    t = np.linspace(0.0, 1.0, EDGE_POINTS)[:-1]
    xs = np.concatenate(
        [left + (right - left) * t, np.full_like(t, right), right - (right - left) * t, np.full_like(t, left)]
    )
    ys = np.concatenate(
        [np.full_like(t, top), top - (top - bottom) * t, np.full_like(t, bottom), bottom + (top - bottom) * t]
    )
    lon, lat = warp_points(crs, "EPSG:4326", xs.tolist(), ys.tolist())
    ring = [[round(x, 9), round(y, 9)] for x, y in zip(lon, lat, strict=True)]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


def _bbox(footprint: dict[str, Any]) -> list[float]:
    ring = np.asarray(footprint["coordinates"][0])
    return [
        float(ring[:, 0].min()),
        float(ring[:, 1].min()),
        float(ring[:, 0].max()),
        float(ring[:, 1].max()),
    ]


def _rel(target: Path, dest: Path) -> str:
    return Path(os.path.relpath(target.resolve(), dest.resolve().parent)).as_posix()


def collection(
    collection_id: str,
    description: str,
    items: Sequence[Path],
    dest: Path,
    *,
    properties: dict[str, Any] | None = None,
) -> pystac.Collection:
    """A Collection linking the Item files ``items``, its extent their union, to be written at ``dest``."""
    docs = [json.loads(p.read_text()) for p in items]
    boxes = [d["bbox"] for d in docs if d.get("bbox")]
    spatial = (
        [
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        ]
        if boxes
        else [-180.0, -90.0, 180.0, 90.0]
    )
    times = sorted(pystac.utils.str_to_datetime(d["properties"]["datetime"]) for d in docs)
    interval: list[datetime | None] = [times[0], times[-1]] if times else [None, None]
    extent = pystac.Extent(pystac.SpatialExtent([spatial]), pystac.TemporalExtent([interval]))
    coll = pystac.Collection(
        collection_id, description, extent, license="other", extra_fields=properties or {}
    )
    for path, doc in zip(items, docs, strict=True):
        coll.add_link(
            pystac.Link("item", _rel(path, dest), media_type=pystac.MediaType.JSON, title=doc["id"])
        )
    return coll


def validate_core(obj: pystac.Item | pystac.Collection, where: Path) -> None:
    """Validate ``obj`` against the STAC core schema pystac ships (no network needed)."""
    doc = obj.to_dict(include_self_link=False, transform_hrefs=False)
    kind = pystac.STACObjectType.ITEM if isinstance(obj, pystac.Item) else pystac.STACObjectType.COLLECTION
    try:
        RegisteredValidator.get_validator().validate_core(doc, kind, doc["stac_version"], str(where))
    except pystac.STACValidationError as e:
        reason = " ".join(str(e).splitlines()[:2])  # which schema, then what failed
        raise WriteError(
            f"{where}: the STAC {kind.value} is not valid STAC ({reason}); this is a segpipe bug"
        ) from e


def write_stac(obj: pystac.Item | pystac.Collection, dest: Path) -> Path:
    """Validate ``obj`` and write it to ``dest`` under a hidden name, then rename it."""
    validate_core(obj, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}")
    tmp.write_text(json.dumps(obj.to_dict(include_self_link=False, transform_hrefs=False), indent=1))
    os.replace(tmp, dest)
    return dest
