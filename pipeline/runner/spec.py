"""The job file: strict YAML -> :class:`JobSpec`.

Unknown keys are errors naming the key path and the allowed keys. Relative input paths are
resolved against the job file's folder; the output folder against the working directory.
``input.path`` (and ``reference.path``) may be ``http(s)://`` or ``s3://`` URLs and ``output.dir``
an ``s3://`` URL; credentials never come from job files (keys that look like credentials are
refused), only from the environment (:mod:`pipeline.io.remote`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError, ReadError
from pipeline.io import remote
from pipeline.tiling.grid import EdgeMode

OutputFormat = Literal["zarr", "cog", "nifti", "mha", "ome-zarr", "png", "gpkg", "geoparquet"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    path: str = Field(
        description="raster, volume file, DICOM folder or segpipe zarr array; or an http(s)/s3 URL "
        "of a GeoTIFF/COG or zarr array"
    )
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
    staging_codec: Literal["none", "lz4", "zstd"] = Field(
        "none",
        description="compression of the staged copy of the input: none (fastest; a chunk read "
        "with its halo decodes every neighbouring chunk whole), lz4, or zstd (smallest on disk)",
    )


class OutputSpec(_Strict):
    dir: str | None = Field(None, description="output folder, or an s3://bucket/prefix URL")
    work_dir: str | None = Field(
        None,
        description="with an s3:// dir: the local (or shared) folder of the staging store and "
        "completion records, from which finished outputs are uploaded (default outputs/<name>)",
    )
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


#: Keys that hold secrets: a job file naming one is refused (job files are copied into outputs).
CREDENTIAL_KEYS = frozenset(
    {
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "access_key_id",
        "secret_key",
        "secret_access_key",
        "secret",
        "password",
        "token",
        "session_token",
        "credentials",
        "storage_options",
        "client_kwargs",
    }
)


def parse_job(raw: dict[str, Any], *, source: str = "<job>") -> JobSpec:
    """Validate a job mapping; errors name the key path and the allowed keys."""
    _refuse_credentials(raw, source)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _refuse_credentials(raw: dict[str, Any], source: str) -> None:
    """Refuse credential-like keys anywhere but in segmenter parameters."""
    stack: list[tuple[str, Any]] = [(k, v) for k, v in raw.items() if k != "segmenter"]
    while stack:
        where, node = stack.pop()
        if where.rsplit(".", 1)[-1].lower() in CREDENTIAL_KEYS:
            raise ConfigError(
                f"{source}: key {where!r} looks like a credential; job files never hold credentials "
                f"(they are copied into job.resolved.yaml and summary.json). Remove it and "
                f"{remote.CREDENTIALS_HINT.replace(' (job files never hold credentials)', '')}."
            )
        if isinstance(node, dict):
            stack += [(f"{where}.{k}", v) for k, v in node.items()]


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
    """Input path against the job file's folder; output dir against the working directory.

    URLs are checked (scheme, no credentials in them) and kept as they are. With an ``s3://``
    output, ``output.work_dir`` (default ``outputs/<name>``) is resolved instead.
    """
    resolved = _input_path(spec.input.path, base, what="input.path")
    default_out = Path("outputs") / spec.name
    out = spec.output.dir or str(default_out)
    work = spec.output.work_dir
    if remote.is_url(out):
        remote.check_url(out, what="output.dir", write=True)
        work = str(Path(work or default_out).expanduser().resolve())
    else:
        if work is not None:
            raise ConfigError(
                f"output.work_dir {work!r} is only used with an s3:// output.dir; remove it "
                f"(the output folder {out!r} holds the staging store itself)"
            )
        out = str(Path(out).expanduser().resolve())
    reference = spec.reference
    if reference is not None and remote.is_url(reference.path):
        remote.check_url(reference.path, what="reference.path")
    elif reference is not None and not Path(reference.path).is_absolute():
        reference = reference.model_copy(update={"path": str((base / reference.path).resolve())})
    profile = spec.cluster.profile
    if profile and not Path(profile).is_absolute():
        profile = str((base / profile).resolve())
    return spec.model_copy(
        update={
            "cluster": spec.cluster.model_copy(update={"profile": profile}),
            "reference": reference,
            "input": spec.input.model_copy(update={"path": resolved}),
            "output": spec.output.model_copy(update={"dir": out, "work_dir": work}),
        }
    )


def _input_path(path: str, base: Path, *, what: str) -> str:
    """A URL as it is (checked), or a local path resolved against ``base``."""
    if remote.is_url(path):
        return remote.check_url(path, what=what)
    p = Path(path).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def confine_output(spec: JobSpec, root: str | None) -> None:
    """Refuse an output folder outside ``root`` (the site's ``SEGPIPE_OUTPUT_ROOT``), if set."""
    if not root:
        return
    if remote.is_url(spec.output.dir) or remote.is_url(root):
        _confine_url(spec.output.dir or "", root)
        return
    out, base = Path(spec.output.dir or ""), Path(root).resolve()
    if not out.is_relative_to(base):
        raise ConfigError(
            f"output.dir {str(out)!r} is outside the output root {str(base)!r} "
            "(SEGPIPE_OUTPUT_ROOT); choose a folder inside it"
        )


def _confine_url(out: str, root: str) -> None:
    prefix = root.rstrip("/") + "/"
    if not (remote.is_url(out) and remote.is_url(root) and (out.rstrip("/") + "/").startswith(prefix)):
        raise ConfigError(
            f"output.dir {out!r} is outside the output root {root!r} (SEGPIPE_OUTPUT_ROOT); choose "
            "a folder inside it (an s3:// output needs an s3:// root that contains it)"
        )


def dump_job(spec: JobSpec) -> str:
    """The resolved job as YAML (written beside the outputs)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
