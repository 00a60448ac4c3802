"""The shipped models: cards complete, weights small and checked, scores reproduced, jobs run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from pipeline.models.torch.card import ZOO, load_card, sha256_of
from pipeline.runner.api import run_job
from pipeline.runner.cli import main
from pipeline.runner.spec import load_job
from tests.helpers import labels_of

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["landcover_unet", "water_unet", "nuclei_unet", "ct_unet"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card_is_complete_and_weights_are_small(name: str) -> None:
    card = load_card(name)  # checks the weights' SHA-256 against the card
    assert card.weights_path.stat().st_size <= 5 * 2**20
    assert card.weights_sha256 == sha256_of(card.weights_path)
    assert card.command.startswith(f"segpipe train jobs/train/{name}.yaml")
    assert (REPO / "jobs" / "train" / f"{name}.yaml").is_file()
    v = card.validation
    assert 0 < v["mean_dice"] <= 1 and v["regions"] and v["pixels"] > 0
    assert (
        card.halo >= max(card.receptive_field // 2, 1)
        and len(card.inputs.mean) == card.architecture.in_channels
    )
    assert set(card.classes) == set(range(card.architecture.out_channels))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["landcover_unet", "water_unet"])
def test_training_jobs_own_evaluation_reproduces_the_card(name: str, tmp_path, capsys) -> None:
    card = load_card(name)
    job = REPO / "jobs" / "train" / f"{name}.yaml"
    capsys.readouterr()
    rc = main(
        [
            "train",
            str(job),
            "--evaluate",
            "--set",
            f"output.dir={tmp_path}",
            "--set",
            f"output.model_dir={ZOO / name}",
        ]
    )
    assert rc == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("mean_dice", "pixel_accuracy", "pixels"):
        assert again[key] == pytest.approx(card.validation[key], abs=1e-6), key


def _dice(pred: np.ndarray, ref: np.ndarray, classes: list[int]) -> float:
    scores = []
    for c in classes:
        a, b = pred == c, ref == c
        if a.sum() + b.sum():
            scores.append(2 * np.sum(a & b) / (a.sum() + b.sum()))
    return float(np.mean(scores))


def test_landcover_job_scores_the_held_apart_region_like_the_card(torch_client, data, tmp_path) -> None:
    """The tiled `unet` job, scored on the card's held-apart rows, is within 0.03 of the card's Dice."""
    spec = load_job(REPO / "jobs" / "landcover_unet.yaml", overrides=[f"output.dir={tmp_path / 'out'}"])
    res = run_job(spec, client=torch_client)
    card = load_card("landcover_unet")
    (r0, c0), (r1, c1) = card.validation["regions"][0]["box"]
    with rasterio.open(data / "landcover" / "chesapeake_m_3907833_nw_17_1_lc.tif") as ds:
        lc = ds.read(1)
    mapping = yaml.safe_load((REPO / "jobs" / "train" / "landcover_unet.yaml").read_text())["labels"]["map"]
    ref = np.vectorize(lambda v: mapping.get(int(v), 255))(lc)
    pred = labels_of(res)
    box = (slice(r0, r1), slice(c0, c1))
    dice = _dice(pred[box], ref[box], sorted(card.classes))
    assert dice == pytest.approx(card.validation["mean_dice"], abs=0.03)
    with rasterio.open(res.outputs["cog"]) as out, rasterio.open(spec.input.path) as src:
        assert out.crs == src.crs and out.transform == src.transform
    assert Path(res.outputs["entropy"]).is_file()


def test_water_job_beats_the_otsu_baseline_on_the_held_apart_region(torch_client, data, tmp_path) -> None:
    spec = load_job(REPO / "jobs" / "water_unet.yaml", overrides=[f"output.dir={tmp_path / 'out'}"])
    res = run_job(spec, client=torch_client)
    card = load_card("water_unet")
    (r0, c0), (r1, c1) = card.validation["regions"][0]["box"]
    with rasterio.open(data / "geo" / "Spain_7370579_LabelHand.tif") as ds:
        ref = ds.read(1)
    pred = labels_of(res)[r0:r1, c0:c1]
    ref = ref[r0:r1, c0:c1]
    ok = ref >= 0
    inter = np.sum((pred == 1) & (ref == 1) & ok)
    iou = inter / np.sum(((pred == 1) | (ref == 1)) & ok)
    assert iou > 0.6, iou


@pytest.mark.parametrize("field", ["IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E847D9B42CB"])
def test_nuclei_unet_instances_tiled_and_untiled(
    torch_client, data, tmp_path, field, record_property
) -> None:
    """Instances from the nuclei U-Net: F1@0.5 against the ground truth; tiled matches untiled."""
    from pipeline.metrics.instances import match_instances

    folder = data / "images" / "bbbc039"
    with rasterio.open(folder / f"{field}_instances.tif") as ds:
        truth = ds.read(1)
    results = {}
    for name, chunk in (("whole", [520, 696]), ("tiled", [200, 260])):
        spec = load_job(
            REPO / "jobs" / "nuclei_unet.yaml",
            overrides=[f"output.dir={tmp_path / name}", f"tiling.chunk={json.dumps(chunk)}"],
        )
        results[name] = run_job(spec, client=torch_client)
    whole, tiled = labels_of(results["whole"]), labels_of(results["tiled"])
    f1_whole = match_instances(whole, truth, 0.5).f1
    f1_tiled = match_instances(tiled, truth, 0.5).f1
    record_property("f1", {"whole": f1_whole, "tiled": f1_tiled})
    print(f"{field}: nuclei U-Net F1@0.5 vs ground truth: untiled {f1_whole:.3f}, tiled {f1_tiled:.3f}")
    assert len(results["tiled"].plan.grid) >= 6 and results["tiled"].instances["merged_ids"] > 0
    assert f1_whole > 0.7 and f1_tiled > 0.7
    assert match_instances(tiled, whole, 0.5).f1 >= 0.99


def test_every_job_file_plans() -> None:
    """Every job in jobs/ validates and plans (its model and data exist, its grid is legal)."""
    from pipeline.runner.plan import make_plan

    files = sorted((REPO / "jobs").glob("*.yaml"))
    assert len(files) >= 14
    for path in files:
        plan = make_plan(load_job(path))
        assert len(plan.grid) >= 1, path
