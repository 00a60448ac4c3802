"""``segpipe`` command line: run, validate, segmenters."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.errors import PipelineError
from pipeline.runner.api import run_jobs, run_scheduled_job
from pipeline.runner.plan import make_plan
from pipeline.runner.schedule import history, is_multi_scene
from pipeline.runner.spec import load_job

console = Console(stderr=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segpipe`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except PipelineError as e:
        console.print(f"[bold red]error[/]: {type(e).__name__}: {e}", highlight=False, soft_wrap=True)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one or more job files")
    run.add_argument("jobs", nargs="+", help="job YAML files")
    run.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786)")
    run.add_argument(
        "--profile", help="cluster profile YAML (configs/clusters/); TLS certificates live there"
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job key, e.g. tiling.chunk=[256,256]",
    )
    run.add_argument(
        "--restart", action="store_true", help="discard results a previous run left in the output folder"
    )
    run.set_defaults(func=_cmd_run)
    val = sub.add_parser("validate", help="check job files without running them")
    val.add_argument("jobs", nargs="+")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    val.set_defaults(func=_cmd_validate)
    clus = sub.add_parser("cluster", help="start a local scheduler and workers for notebooks and jobs")
    clus.add_argument(
        "action",
        choices=["up", "script"],
        help="up: start a local cluster; script: "
        "print the batch job script or Kubernetes resource a --profile builds",
    )
    clus.add_argument("--profile", help="cluster profile YAML (for script)")
    clus.add_argument("--workers", type=int, default=2, help="CPU workers (1 thread each)")
    clus.add_argument("--port", type=int, default=8786)
    clus.add_argument("--memory-limit", default="2GiB")
    clus.add_argument("--stop-after", type=float, default=None, help=argparse.SUPPRESS)
    clus.set_defaults(func=_cmd_cluster)
    runs = sub.add_parser("runs", help="list the runs of a multi-scene job (its ledger)")
    runs.add_argument("output", help="the job's output folder (holding ledger.sqlite)")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=_cmd_runs)
    chg = sub.add_parser("change", help="change report between two label maps of one area")
    chg.add_argument("before")
    chg.add_argument("after")
    chg.add_argument("--out", required=True, help="folder for change.tif, transitions.parquet, change.json")
    chg.set_defaults(func=_cmd_change)
    segs = sub.add_parser("segmenters", help="list segmenters with parameters, halo and kind")
    segs.add_argument("--json", action="store_true", help="machine-readable output")
    segs.set_defaults(func=_cmd_segmenters)
    _eval_parser(sub)
    _train_parser(sub)
    exp = sub.add_parser(
        "export", help="export a U-Net or Mask R-CNN model card to TorchScript or ONNX (a new card)"
    )
    exp.add_argument("model", help="shipped model name, card YAML or folder")
    exp.add_argument("--format", choices=["torchscript", "onnx"], required=True)
    exp.add_argument("--out", required=True, help="folder for the model file and its card.yaml")
    exp.set_defaults(func=_cmd_export)
    _inspect_parser(sub)
    rep = sub.add_parser("report", help="HTML report (with PNG figures) of a finished run folder")
    rep.add_argument("run_dir", help="a run's output folder (holding summary.json)")
    rep.add_argument("--eval", dest="eval_dir", help="a folder written by segpipe eval --out")
    rep.set_defaults(func=_cmd_report)
    return parser


def _eval_parser(sub: Any) -> None:
    ev = sub.add_parser("eval", help="compare a prediction with a reference (geometry checked)")
    ev.add_argument("pred", help="predicted labels (any raster or volume segpipe reads)")
    ev.add_argument("ref", help="reference labels on the same grid")
    ev.add_argument("--out", help="folder for metrics.json and per_class.csv")
    ev.add_argument("--kind", choices=["semantic", "instance", "panoptic", "medical"], default="semantic")
    ev.add_argument("--ignore", type=int, help="reference value not counted (panoptic: the void id)")
    ev.add_argument("--classes", type=int, nargs="+", help="classes to report and average")
    ev.add_argument("--iou", type=float, nargs="+", default=[0.5, 0.75], help="F1 IoU thresholds")
    ev.add_argument("--max-dets", type=int, default=100, help="detections kept per image for AP/AR")
    ev.add_argument("--pred-segments", help="panoptic: the prediction's segments.json")
    ev.add_argument("--ref-segments", help="panoptic: the reference's segments.json")
    ev.add_argument("--label-divisor", type=int, help="panoptic: id = category * divisor + instance")
    ev.add_argument("--chunk", type=int, help="chunk edge in pixels/voxels")
    ev.add_argument("--allow-missing-crs", action="store_true", help="accept rasters without a CRS")
    ev.add_argument("--scheduler", help="address of an existing Dask scheduler")
    ev.set_defaults(func=_cmd_eval)


def _train_parser(sub: Any) -> None:
    tr = sub.add_parser("train", help="train a U-Net from image/label pairs (weights + model card)")
    tr.add_argument("job", help="training job YAML (see jobs/train/)")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tr.add_argument("--restart", action="store_true", help="discard the checkpoint and staged data")
    tr.add_argument(
        "--evaluate",
        action="store_true",
        help="recompute the card's validation scores from the saved card and weights",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.models.torch.adapters import export_model
    from pipeline.models.torch.card import load_card

    card = export_model(load_card(args.model), args.format, Path(args.out))
    print(f"{args.model}: {args.format} model and card -> {card}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os
    import shlex

    # OpenMP threads that spin while waiting starve everything else on shared cores: with other
    # work on the 2-core machine an epoch took ~4 min spinning and ~25 s passive. Set before torch
    # loads its OpenMP runtime (the user's own setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from pipeline.runner.train_spec import load_train_job
    from pipeline.runner.training import evaluate_trained, train_job

    job = load_train_job(args.job, args.overrides)
    if args.evaluate:
        print(json.dumps(evaluate_trained(job)))
        return 0
    command = (
        shlex.join(["segpipe", *sys.argv[1:]]) if args.argv is None else shlex.join(["segpipe", *args.argv])
    )
    outcome = train_job(job, command=command, restart=args.restart, progress=not args.no_progress)
    r = outcome.result
    if r.resumed_from:
        print(f"{job.name}: resumed from epoch {r.resumed_from} ({outcome.card.parent})")
    score = (
        f"mean Dice {r.best_scores['mean_dice']}"
        if "mean_dice" in r.best_scores
        else ", ".join(f"{k} {v}" for k, v in r.best_scores.items() if isinstance(v, (int, float)))
    )
    print(f"{job.name}: {r.epochs_run} epochs (best {r.best_epoch}, {score}) -> {outcome.card}")

    return 0


def _inspect_parser(sub: Any) -> None:
    ins = sub.add_parser(
        "inspect", help="size, geometry and chunk grid of an input, with worker memory and time estimates"
    )
    ins.add_argument("input", help="a raster, volume, DICOM series folder or segpipe zarr array")
    ins.add_argument(
        "--chunk", type=int, nargs="+", help="chunk edge: one for every axis, or one per axis (default 512)"
    )
    ins.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ins.add_argument("--memory-per-worker", default="2GiB", help="memory limit per worker (default 2GiB)")
    ins.add_argument("--segmenter", help="a segmenter name: its halo goes into the grid")
    ins.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a segmenter parameter (value in YAML), repeatable",
    )
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.errors import ConfigError
    from pipeline.runner.inspection import Cluster, format_report, inspect_input

    params = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: write it as KEY=VALUE, e.g. --param band=B8")
        params[key] = yaml.safe_load(value)
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give at least 1 worker")
    report = inspect_input(
        args.input,
        chunk=args.chunk,
        segmenter=args.segmenter,
        params=params,
        cluster=Cluster(args.workers, args.memory_per_worker),
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    specs = [load_job(j, args.overrides) for j in args.jobs]
    scheduled = [s for s in specs if is_multi_scene(s)]
    specs = [s for s in specs if not is_multi_scene(s)]
    for spec in scheduled:
        record = run_scheduled_job(spec, scheduler=args.scheduler, profile=args.profile)
        print(
            f"{spec.name}: run {record['run_id']} {record['status']}: {record['processed']} processed, "
            f"{record['skipped']} skipped, {record['failed']} failed -> {spec.output.dir}"
        )
        if record["failed"]:
            return 1
    if not specs:
        return 0
    for result in run_jobs(
        specs,
        scheduler=args.scheduler,
        restart=args.restart,
        profile=args.profile,
        announce=lambda link: console.print(f"dashboard: {link}"),
    ):
        print(f"{result.plan.spec.name}: complete -> {result.plan.publish or result.plan.out}")
        width = max(map(len, result.outputs), default=0)
        for name, path in result.outputs.items():
            print(f"  {name:>{width}}: {path}")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from pipeline.cluster.up import serve

    if args.action == "script":
        return _print_cluster_script(args.profile)

    serve(
        n_workers=args.workers,
        port=args.port,
        memory_limit=args.memory_limit,
        announce=lambda text: print(text, flush=True),
        stop_after=args.stop_after,
    )
    return 0


def _cmd_change(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.runner.change import change_report

    report = change_report(Path(args.before), Path(args.after), Path(args.out))
    print(
        f"changed: {report['changed_pixels']} of {report['pixels']} pixels "
        f"({report['changed_km2']:.3f} km²) -> {args.out}"
    )
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from pathlib import Path

    records = history(Path(args.output) / "ledger.sqlite")
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for run in records:
        print(
            f"{run['run_id']}  {run['job']}  {run['status']:>8}  processed {run['processed']}  "
            f"skipped {run['skipped']}  failed {run['failed']}"
        )
        for item in run["items"]:
            print(
                f"    {item['item']:<40} {item['status']:>8}  {item['seconds'] or 0:.1f} s"
                + (f"  {item['error']}" if item["error"] else "")
            )
    return 0


def _print_cluster_script(path: str | None) -> int:
    import yaml

    from pipeline.cluster.batch import jobqueue_cluster, kubernetes_spec
    from pipeline.cluster.profiles import load_profile
    from pipeline.errors import ConfigError

    profile = load_profile(path) if path else None
    if profile is None or profile.kind not in ("jobqueue", "kubernetes"):
        raise ConfigError("segpipe cluster script needs --profile of kind jobqueue or kubernetes")
    if profile.jobqueue is not None:
        cluster = jobqueue_cluster(profile.jobqueue)
        try:
            print(cluster.job_script())
        finally:
            cluster.close()
    elif profile.kubernetes is not None:
        print(yaml.safe_dump(kubernetes_spec(profile.kubernetes), sort_keys=False))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.runner.schedule import scene_specs

    for job in args.jobs:
        spec = load_job(job, args.overrides)
        items = scene_specs(spec) if is_multi_scene(spec) else [("", spec)]
        for item, item_spec in items:
            plan = make_plan(item_spec)
            print(
                f"{job}{' [' + item + ']' if item else ''}: ok ({plan.source.format} {plan.source.shape} "
                f"{plan.source.dtype}, segmenter {plan.segmenter.name}, {len(plan.grid)} chunks of "
                f"{plan.grid.chunk}, halo {plan.grid.halo})"
            )
    return 0


def _cmd_segmenters(args: argparse.Namespace) -> int:
    from pipeline.models import SEGMENTERS, describe

    infos = [describe(n) for n in SEGMENTERS.names()]
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    table = Table(title="segmenters")
    for col in ("name", "kind", "halo", "parameters", "summary"):
        table.add_column(col)
    for info in infos:
        params = ", ".join(
            f"{k}: {v['type']}" + ("" if v["required"] else f" = {v['default']}")
            for k, v in info["params"].items()
        )
        table.add_row(info["name"], info["kind"], info["halo"], params, info["summary"])
    Console().print(table)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.runner.evaluate import EvalOptions, evaluate, read_segments, write_report

    pred_cats = ref_cats = None
    things: tuple[int, ...] | None = None
    if args.pred_segments and args.ref_segments:
        pred_cats, _ = read_segments(args.pred_segments)
        ref_cats, things = read_segments(args.ref_segments)
    options = EvalOptions(
        classes=tuple(args.classes) if args.classes else None,
        iou_thresholds=tuple(args.iou),
        max_dets=args.max_dets,
        pred_categories=pred_cats,
        ref_categories=ref_cats,
        label_divisor=args.label_divisor,
        things=things or None,
        chunk=args.chunk,
        allow_missing_crs=args.allow_missing_crs,
    )
    metrics = evaluate(
        args.pred, args.ref, kind=args.kind, ignore=args.ignore, scheduler=args.scheduler, options=options
    )
    headline: dict[str, Any] = {
        k: metrics[k] for k in ("mIoU", "mean_dice", "AP", "AP50", "AP75", "AR") if k in metrics
    }
    if "all" in metrics:
        headline["PQ"] = metrics["all"]["pq"]
    print(json.dumps(headline))
    if args.out:
        for name, path in write_report(metrics, Path(args.out)).items():
            print(f"  {name:>4}: {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.runner.report import write_run_report

    print(write_run_report(args.run_dir, eval_dir=args.eval_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
