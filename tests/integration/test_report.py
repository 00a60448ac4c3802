"""``segpipe report``: an HTML page whose every figure is a real PNG; opened in headless Chromium.

Acceptance (issue 6, item 5): the report opens in a headless browser and its figures exist.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from pipeline.runner.cli import main
from pipeline.runner.report import tile_scores, write_run_report
from tests.helpers import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OTSU_WATER = {"band": "B8", "foreground": "below", "class_name": "water"}


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def _images(page: Path) -> list[Path]:
    parser = _Images()
    parser.feed(page.read_text())
    return [page.parent / s for s in parser.srcs]


def _assert_real_pngs(page: Path) -> list[Path]:
    images = _images(page)
    assert images, f"{page} holds no <img>"
    for img in images:
        assert img.is_file() and img.stat().st_size > 1000, f"{img} missing or empty"
        assert img.read_bytes()[:8] == PNG_MAGIC, f"{img} is not a PNG"
        with PILImage.open(img) as im:
            im.verify()
        with PILImage.open(img) as im:
            w, h = im.size
            assert 150 <= w <= 4000 and 100 <= h <= 6000, f"{img}: odd size {im.size}"
            assert np.asarray(im.convert("L")).std() > 1, f"{img} is blank"
    return images


@pytest.fixture(scope="module")
def evaluated(client, data, tmp_path_factory) -> tuple[Path, Path]:
    """An otsu water job on the flood chip scored per tile against the hand labels, and
    ``segpipe eval`` of its COG against them."""
    folder = tmp_path_factory.mktemp("report")
    label = data / "geo" / "Spain_7370579_LabelHand.tif"
    result = run(
        client,
        data / "geo" / "Spain_7370579_S2Hand.tif",
        folder / "run",
        "otsu",
        OTSU_WATER,
        chunk=[200, 150],
        formats=["zarr", "cog", "png"],
        reference={"path": str(label), "ignore": -1},
    )
    argv = [result.outputs["cog"], str(label), "--out", str(folder / "eval"), "--ignore", "-1"]
    assert main(["eval", *argv, "--scheduler", client.scheduler.address]) == 0
    return result.plan.out, folder / "eval"


@pytest.fixture(scope="module")
def report(evaluated) -> Path:
    run_dir, eval_dir = evaluated
    assert main(["report", str(run_dir), "--eval", str(eval_dir)]) == 0
    return run_dir / "report" / "index.html"


def test_report_figures_are_real_pngs(report: Path) -> None:
    names = {p.name for p in _assert_real_pngs(report)}
    expected = {"timings.png", "quicklook.png", "class_fractions.png", "tile_map.png"}
    assert expected | {"confusion_matrix.png", "per_class_scores.png"} <= names
    text = report.read_text()
    for heading in ("Timings per stage", "Classes", "Per-tile map", "Seams", "Evaluation"):
        assert f"<h2>{heading}" in text
    assert "<script" not in text and "http" not in text.replace(str(report.parents[1]), "")


def test_tile_map_is_coloured_by_the_per_tile_reference_score(report: Path) -> None:
    text = report.read_text()
    assert "reference score per tile: iou_water" in text  # iou_background is left out
    assert "summary.json: reference" in text and "summary.json: seam_check" in text


def test_tile_scores_choice() -> None:
    tiles = pd.DataFrame({"seconds": [1.0, 2.0], "dice_a": [0.5, 0.7]})
    assert tile_scores(tiles.drop(columns="dice_a")) is None
    label, values = tile_scores(tiles)  # type: ignore[misc]
    assert label == "dice_a" and values.tolist() == [0.5, 0.7]
    tiles["iou_background"], tiles["iou_a"], tiles["iou_b"] = [0.9, 0.9], [0.2, np.nan], [0.4, 0.6]
    label, values = tile_scores(tiles)  # type: ignore[misc]
    assert label == "mean iou (a, b)" and values.tolist() == pytest.approx([0.3, 0.6])


def test_tile_map_falls_back_to_seconds_without_scores(evaluated, tmp_path: Path) -> None:
    run_dir, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report", "staging.zarr"))
    tiles = pd.read_parquet(copy / "tiles.parquet")
    tiles = tiles.drop(columns=[c for c in tiles.columns if c.startswith(("iou_", "dice_"))])
    tiles.to_parquet(copy / "tiles.parquet", index=False)
    page = write_run_report(copy)  # also without staging.zarr: no background under the tiles
    assert "seconds per tile (the tiles carry no reference scores)" in page.read_text()
    _assert_real_pngs(page)


def test_instance_run_reports_seams_and_objects(client, data, tmp_path: Path) -> None:
    result = run(
        client,
        data / "geo" / "Spain_7370579_S2Hand.tif",
        tmp_path / "run",
        "components",
        {"semantic": {"name": "otsu", "params": OTSU_WATER}, "connectivity": 2},
        chunk=[200, 150],
        formats=["zarr", "png"],
    )
    page = write_run_report(result.plan.out)
    names = {p.name for p in _assert_real_pngs(page)}
    assert {"seam_merges.png", "objects_per_class.png", "tile_map.png"} <= names
    assert "seams.parquet" in page.read_text()


def test_report_of_a_folder_without_summary_is_an_error(tmp_path: Path) -> None:
    assert main(["report", str(tmp_path)]) == 2


def test_report_opens_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(
            "no `chromium` binary on PATH (Debian: apt-get install chromium); the PNG checks still ran"
        )
    shot = tmp_path / "page.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,3000",
        f"--screenshot={shot}",
        report.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with PILImage.open(shot) as im:
        assert im.size == (1200, 3000)
        pixels = np.asarray(im.convert("RGB"))
    # the page rendered its figures: many distinct colours, not a blank or error page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
