"""The job file: strict YAML -> :class:`JobSpec`.

Unknown keys are errors naming the key path and the allowed keys. Relative input paths are
resolved against the job file's folder; the output folder against the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError, ReadError
from pipeline.tiling.grid import EdgeMode

OutputFormat = Literal["zarr", "cog", "nifti", "mha", "ome-zarr", "png", "gpkg", "geoparquet"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    path: str = Field(description="raster, volume file, DICOM folder or segpipe zarr array")
    allow_missing_crs: bool = False
    asset: str = Field("image", description="STAC input: the asset key of each item's raster")


class ReferenceSpec(_Strict):
    path: str = Field(
        description="reference label raster/volume on the input's grid (relative to the job file)"
    )
    band: int = Field(1, ge=1)
    ignore: int | None = Field(None, description="reference value not scored (e.g. -1 or 255)")
    seam_band: int = Field(
        8, ge=1, description="width in pixels of the band around seams for seam diagnostics"
    )


class SegmenterSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TilingSpec(_Strict):
    chunk: list[int] = Field(default_factory=lambda: [512, 512])
    halo: int | None = Field(None, ge=0, description="override; must be >= the segmenter's halo")
    edge_mode: EdgeMode = "clip"


class OutputSpec(_Strict):
    dir: str | None = None
    simplify: float = Field(0.0, ge=0, description="polygon simplification tolerance in map units")

    formats: list[OutputFormat] = Field(default_factory=lambda: ["zarr", "png"])  # type: ignore[arg-type]


class ClusterSpec(_Strict):
    profile: str | None = Field(None, description="configs/clusters/*.yaml (relative to the job file)")
    scheduler: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "2GiB"
    dashboard: bool = True


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    input: InputSpec
    segmenter: SegmenterSpec
    tiling: TilingSpec = Field(default_factory=TilingSpec)  # type: ignore[arg-type]
    output: OutputSpec = Field(default_factory=OutputSpec)  # type: ignore[arg-type]
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)  # type: ignore[arg-type]
    retries: int = Field(2, ge=0)
    reference: ReferenceSpec | None = None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override (``key.path=value``) and validate a job file; resolve its paths."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ReadError(f"{p}: job file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a job file must be a mapping of keys (name, input, segmenter, ...)")
    for item in overrides or []:
        apply_override(raw, item)
    return resolve_paths(parse_job(raw, source=str(p)), base=p.parent)


def parse_job(raw: dict[str, Any], *, source: str = "<job>") -> JobSpec:
    """Validate a job mapping; errors name the key path and the allowed keys."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: Any) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(loc[:-1]))
        return f"unknown key {where!r}; allowed keys here: {allowed}"
    if err["type"] == "missing":
        return f"missing required key {where!r}"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _allowed_keys(parent: list[str]) -> list[str]:
    model: Any = JobSpec
    for key in parent:
        field = model.model_fields.get(key)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return list(model.model_fields)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as a YAML scalar or list."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. tiling.chunk=[256,256]")
    key, text = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a mapping in the job file")
    node[parts[-1]] = yaml.safe_load(text)


def resolve_paths(spec: JobSpec, *, base: Path) -> JobSpec:
    """Input path against the job file's folder; output dir against the working directory."""
    inp = Path(spec.input.path).expanduser()
    resolved = (inp if inp.is_absolute() else base / inp).resolve()
    out = Path(spec.output.dir or Path("outputs") / spec.name).expanduser().resolve()
    reference = spec.reference
    if reference is not None and not Path(reference.path).is_absolute():
        reference = reference.model_copy(update={"path": str((base / reference.path).resolve())})
    profile = spec.cluster.profile
    if profile and not Path(profile).is_absolute():
        profile = str((base / profile).resolve())
    return spec.model_copy(
        update={
            "cluster": spec.cluster.model_copy(update={"profile": profile}),
            "reference": reference,
            "input": spec.input.model_copy(update={"path": str(resolved)}),
            "output": spec.output.model_copy(update={"dir": str(out)}),
        }
    )


def confine_output(spec: JobSpec, root: str | None) -> None:
    """Refuse an output folder outside ``root`` (the site's ``SEGPIPE_OUTPUT_ROOT``), if set."""
    if not root:
        return
    out, base = Path(spec.output.dir or ""), Path(root).resolve()
    if not out.is_relative_to(base):
        raise ConfigError(
            f"output.dir {str(out)!r} is outside the output root {str(base)!r} "
            "(SEGPIPE_OUTPUT_ROOT); choose a folder inside it"
        )


def dump_job(spec: JobSpec) -> str:
    """The resolved job as YAML (written beside the outputs)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
