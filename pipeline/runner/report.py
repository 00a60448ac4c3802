"""``segpipe report RUN_DIR [--eval DIR]``: an HTML page with PNG figures about one finished run.

It reads what :mod:`pipeline.runner.finalize` wrote (``summary.json``, ``tiles.parquet``,
``quicklook.png``, ``staging.zarr/input``, and ``objects.parquet`` / ``seams.parquet`` for
instance jobs) and, optionally, a folder written by ``segpipe eval`` (``metrics.json``). Every
section whose source is missing is left out and the page says so. The page is plain HTML
(no scripts, nothing fetched from the network); the figures are PNGs beside it.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError
from pipeline.io.sources import open_image
from pipeline.runner import report_figures as figures

#: Longest side of the decimated background of the tile map.
MAX_SIDE = 1024
#: Per-tile reference score columns (added by jobs that name a reference), best first.
SCORE_PATTERN = re.compile(r"^(iou|dice)(_.+)?$")

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
th {{ background: #f2f2f2; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
.note {{ color: #777; font-style: italic; }}
</style></head><body>
<h1>{title}</h1>
{body}
</body></html>
"""


def write_run_report(run_dir: str | Path, *, eval_dir: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/report/index.html`` and its figures; return the page's path.

    Raises :class:`ConfigError` when ``run_dir`` holds no ``summary.json`` (not a finished run)
    or ``eval_dir`` no ``metrics.json``.
    """
    run = Path(run_dir)
    summary = _read_json(run / "summary.json", "a finished run folder (segpipe run writes it last)")
    metrics = None
    if eval_dir is not None:
        metrics = _read_json(Path(eval_dir) / "metrics.json", "a folder written by segpipe eval --out")
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    tiles = _read_table(run / "tiles.parquet")
    names = {int(k): str(v) for k, v in summary["segmenter"]["classes"].items()}
    sections = [
        _job_section(summary, out),
        _quicklook_section(run, out),
        _classes_section(run, tiles, names, out),
        _tile_map_section(run, tiles, summary, out),
        _seam_section(run, summary, out),
    ]
    if metrics is not None:
        sections.append(_eval_section(metrics, names, out, Path(eval_dir or "")))
    title = f"segpipe report: {summary['job']}"
    page = out / "index.html"
    page.write_text(PAGE.format(title=html.escape(title), body="\n".join(sections)))
    return page


# ---------------------------------------------------------------- sections


def _job_section(summary: dict[str, Any], out: Path) -> str:
    inp, seg, til = summary["input"], summary["segmenter"], summary["tiling"]
    facts = {
        "job": summary["job"],
        "status": summary.get("status"),
        "finished": summary.get("finished_at"),
        "input": f"{inp['path']} ({inp['format']}, shape {inp['shape']}, {inp['dtype']})",
        "segmenter": f"{seg['name']} ({seg['kind']}), halo {seg.get('halo')}",
        "parameters": json.dumps(seg.get("params"), default=str),
        "fitted": json.dumps(seg.get("fitted"), default=str),
        "tiling": f"{til['n_chunks']} chunks of {til['chunk']}, halo {til['halo']}, {til['edge_mode']}",
        "computed / skipped": f"{til.get('computed')} / {til.get('skipped')}",
    }
    timings = {k: float(v) for k, v in (summary.get("timings_s") or {}).items()}
    body = _h2("Job") + _kv_table(facts) + _h2("Timings per stage")
    if not timings:
        return body + _note("summary.json holds no timings")
    rows = [{"stage": k, "seconds": f"{v:.3f}"} for k, v in timings.items()]
    rows.append({"stage": "total", "seconds": f"{sum(timings.values()):.3f}"})
    return body + _table(rows) + _img(figures.bar_figure(out / "timings.png", timings, "seconds", "stage"))


def _quicklook_section(run: Path, out: Path) -> str:
    src = run / "quicklook.png"
    if not src.is_file():
        return _h2("Quicklook") + _note("no quicklook.png (the job's formats did not include png)")
    shutil.copyfile(src, out / "quicklook.png")
    return _h2("Quicklook") + _img(out / "quicklook.png")


def _classes_section(run: Path, tiles: pd.DataFrame | None, names: dict[int, str], out: Path) -> str:
    head = _h2("Classes")
    frac = [c for c in (tiles.columns if tiles is not None else []) if c.startswith("frac_")]
    if tiles is not None and frac and "valid_pixels" in tiles:
        weights = tiles["valid_pixels"].to_numpy(np.float64)
        total = weights.sum()
        values = {
            c.removeprefix("frac_"): float((tiles[c] * weights).sum() / total) if total else 0.0 for c in frac
        }
        fig = figures.bar_figure(out / "class_fractions.png", values, "fraction of valid pixels", "class")
        rows = [{"class": k, "fraction": f"{v:.4f}"} for k, v in values.items()]
        return head + _table(rows) + _img(fig)
    objects = _read_table(run / "objects.parquet")
    if objects is None or objects.empty:
        return head + _note("tiles.parquet has no class fractions and there is no objects table")
    counts = objects.groupby("class").size()
    values = {names.get(int(k), str(k)): float(n) for k, n in counts.items()}
    fig = figures.bar_figure(out / "objects_per_class.png", values, "objects", "class")
    return head + _kv_table({"objects": len(objects), **{k: int(v) for k, v in values.items()}}) + _img(fig)


def _tile_map_section(run: Path, tiles: pd.DataFrame | None, summary: dict[str, Any], out: Path) -> str:
    head = _h2("Per-tile map")
    if tiles is None or tiles.empty or "start" not in tiles:
        return head + _note("no tiles.parquet")
    scores = tile_scores(tiles)
    if scores is None and "seconds" not in tiles:
        return head + _note("tiles.parquet has neither reference scores nor seconds")
    label, values = scores or ("seconds", tiles["seconds"].astype(float))
    background, z = _background(run, summary)
    fig = figures.tile_map_figure(out / "tile_map.png", tiles, label, values, background, z)
    what = "seconds per tile" if scores is None else f"reference score per tile: {label}"
    if scores is None:
        what += " (the tiles carry no reference scores)"
    if z is not None:
        what += f"; tiles crossing axial slice z={z}"
    stats = {"coloured by": what, "min": f"{values.min():.4g}", "mean": f"{values.mean():.4g}"}
    stats["max"] = f"{values.max():.4g}"
    return head + _kv_table(stats) + _img(fig)


def _seam_section(run: Path, summary: dict[str, Any], out: Path) -> str:
    head = _h2("Seams")
    parts = []
    for key in ("reference", "seam_check", "seams", "instances"):
        value = summary.get(key)
        if value:
            parts.append(f"<h3>summary.json: {html.escape(key)}</h3>" + _kv_table(_flatten(value)))
    seams = _read_table(run / "seams.parquet")
    if seams is not None and not seams.empty and "merged_pairs" in seams:
        totals = {"seams": len(seams), "merged pairs": int(seams["merged_pairs"].sum())}
        if "conflicts" in seams:
            totals["conflicts"] = int(seams["conflicts"].sum())
        labels = (seams["chunk_id"].astype(str) + " | " + seams["seam"].astype(str)).tolist()
        values = dict(zip(labels, seams["merged_pairs"].astype(float), strict=True))
        fig = figures.bar_figure(out / "seam_merges.png", _top(values, 40), "objects merged", "chunk | seam")
        parts.append("<h3>seams.parquet</h3>" + _kv_table(totals) + _img(fig))
    if not parts:
        return head + _note(
            "no seam diagnostics in this run (no seam_check in summary.json, no seams.parquet)"
        )
    return head + "\n".join(parts)


def _eval_section(metrics: dict[str, Any], names: dict[int, str], out: Path, eval_dir: Path) -> str:
    head = _h2(f"Evaluation ({eval_dir})")
    sem = metrics if "confusion_matrix" in metrics else metrics.get("semantic")
    headline: dict[str, Any] = {
        k: metrics[k]
        for k in (
            "kind",
            "prediction",
            "reference",
            "ignore",
            "mIoU",
            "mean_dice",
            "pixel_accuracy",
            "AP",
            "AR",
        )
        if k in metrics
    }
    if not isinstance(sem, dict) or "confusion_matrix" not in sem:
        return head + _kv_table(headline) + _note("no confusion matrix in metrics.json")
    headline.update({k: sem[k] for k in ("mIoU", "mean_dice", "pixel_accuracy") if k in sem})
    labels = [_class_label(int(c), names) for c in sem["classes"]]
    matrix = np.asarray(sem["confusion_matrix"], dtype=np.float64)
    cm = figures.confusion_figure(out / "confusion_matrix.png", matrix, labels)
    per = sem["per_class"]
    rows = [{"class": lab, **per[str(c)]} for c, lab in zip(sem["classes"], labels, strict=True)]
    scores = {m: {r["class"]: _nan(r.get(m)) for r in rows} for m in ("iou", "dice")}
    bars = figures.grouped_bars(out / "per_class_scores.png", scores)
    return head + _kv_table(headline) + _img(cm) + _table(rows) + _img(bars)


# ---------------------------------------------------------------- data


def tile_scores(tiles: pd.DataFrame) -> tuple[str, pd.Series] | None:
    """The per-tile reference score to colour the map by, with its label; ``None`` without one.

    IoU before Dice; with one ``iou_<class>`` column per class (jobs that name a reference), the
    mean over the classes other than ``background`` (NaN where a tile has none of a class).
    """
    for metric in ("iou", "dice"):
        found = [
            str(c)
            for c in tiles.columns
            if SCORE_PATTERN.match(str(c))
            and str(c).startswith(metric)
            and pd.api.types.is_numeric_dtype(tiles[c])
        ]
        if len(found) > 1:
            found = [c for c in found if c != f"{metric}_background"]
        if len(found) == 1:
            return found[0], tiles[found[0]].astype(float)
        if found:
            values = tiles[found].astype(float).mean(axis=1, skipna=True)
            return f"mean {metric} ({', '.join(c.removeprefix(metric + '_') for c in found)})", values
    return None


def _background(run: Path, summary: dict[str, Any]) -> tuple[np.ndarray | None, int | None]:
    """A decimated view of the staged input (middle axial slice of a volume) and that slice's z."""
    path = run / "staging.zarr" / "input"
    if not path.exists():
        return None, None
    data = open_image(path).data
    spatial = 3 if summary["input"]["format"] == "volume" or data.ndim == 4 else 2
    while data.ndim > spatial:
        data = data[0]
    z = None
    if spatial == 3:
        z = int(data.shape[0] // 2)
        data = data[z]
    step = max(1, -(-max(data.shape) // MAX_SIDE))
    view = np.asarray(data[::step, ::step].compute(scheduler="synchronous"), dtype=np.float64)
    return view, z


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError as e:
        raise ConfigError(f"{path} not found; expected {what}") from e
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); expected {what}") from e


def _read_table(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and len(value) > 12:
        value = f"[{len(value)} items] " + json.dumps(value[:12], default=str)[:-1] + ", ...]"
    return {prefix.rstrip("."): value}


def _top(values: dict[str, float], n: int) -> dict[str, float]:
    return dict(sorted(values.items(), key=lambda kv: -kv[1])[:n])


def _class_label(cid: int, names: dict[int, str]) -> str:
    return f"{cid} {names[cid]}" if cid in names else str(cid)


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


# ---------------------------------------------------------------- html


def _h2(text: str) -> str:
    return f"<h2>{html.escape(text)}</h2>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _img(path: Path) -> str:
    name = html.escape(path.name)
    return f'<p><img src="{name}" alt="{name}"></p>'


def _kv_table(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape("" if value is None else str(value))
