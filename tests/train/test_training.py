"""``segpipe train``: resume after a real kill, the model card, and the job's own evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.models.torch.card import load_card
from pipeline.models.torch.unet import receptive_extent, receptive_field
from pipeline.runner.cli import main
from tests.train.jobs import landcover_job, write_job

SEGPIPE = Path(sys.executable).parent / "segpipe"


def _train(job: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SEGPIPE), "train", str(job), "--no-progress", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _epoch_of(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, weights_only=True)["epoch"])


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """An uninterrupted run (5 epochs) of the tiny land-cover job, as a subprocess."""
    out = tmp_path_factory.mktemp("uninterrupted")
    job = write_job(
        out / "job.yaml", landcover_job(data, out, optim={"epochs": 5, "lr": 0.01, "patience": None})
    )
    done = _train(job)
    assert done.returncode == 0, done.stderr
    return job


def test_killed_and_resumed_run_gives_bitwise_the_same_weights(data, trained, tmp_path) -> None:
    job = write_job(
        tmp_path / "job.yaml",
        landcover_job(data, tmp_path, optim={"epochs": 5, "lr": 0.01, "patience": None}),
    )
    checkpoint = tmp_path / "work" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(
        [str(SEGPIPE), "train", str(job), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = _epoch_of(checkpoint)
    assert 1 <= killed_at < 5 and not (tmp_path / "model" / "card.yaml").exists()

    resumed = _train(job)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from epoch {killed_at}" in resumed.stdout
    reference = load_file(str(trained.parent / "model" / "weights.safetensors"))
    weights = load_file(str(tmp_path / "model" / "weights.safetensors"))
    assert reference.keys() == weights.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, weights[name]), name
    a, b = load_card(trained.parent / "model"), load_card(tmp_path / "model")
    assert a.validation == b.validation and a.training["history"] == b.training["history"]


def test_changed_job_does_not_resume_a_foreign_checkpoint(data, trained, tmp_path, capsys) -> None:
    """A rerun with other settings in the same folder is refused with the way out."""
    raw = yaml.safe_load(trained.read_text())
    raw["seed"] = 8
    job = write_job(tmp_path / "job.yaml", raw)
    assert main(["train", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoints/last.pt: this checkpoint was written by a different training job" in err
    assert "--restart" in err


def test_card_holds_what_the_model_needs_and_evaluate_reproduces_it(data, trained, capsys) -> None:
    card = load_card(trained.parent / "model")
    assert card.classes == {0: "water", 1: "tree_canopy", 2: "low_vegetation", 3: "barren_impervious"}
    assert card.inputs.bands == [1, 2, 3, 4] and card.inputs.clip is None
    assert card.architecture.in_channels == 4 and card.architecture.out_channels == 4
    assert card.halo == max(receptive_extent(2)) == 23 and card.receptive_field == receptive_field(2)
    assert card.patch_size == [32, 32]
    assert card.command == f"segpipe train {trained} --no-progress"
    # normalisation statistics are those of the training rows (0 .. 260 - 52 - 23) of the NAIP tile
    import rasterio

    with rasterio.open(data / "landcover/chesapeake_m_3907833_nw_17_1_naip-new.tif") as ds:
        naip = ds.read().astype("float64")[:, : 260 - 52 - 23]
    assert card.inputs.mean == pytest.approx(naip.reshape(4, -1).mean(1).tolist(), rel=1e-9)
    assert card.inputs.std == pytest.approx(naip.reshape(4, -1).std(1).tolist(), rel=1e-9)
    v = card.validation
    (region,) = v["regions"]
    assert region["box"] == [[208, 0], [260, 260]]
    assert region["bounds"] == pytest.approx(
        [
            671664.0,
            4374596.0 - 260 * 29.46153846153846,
            671664.0 + 260 * 23.592307692307692,
            4374596.0 - 208 * 29.46153846153846,
        ]
    )
    assert v["pixels"] == 52 * 260 and set(v["per_class"]) == set(card.classes.values())
    assert 0 <= v["mean_dice"] <= 1 and 1 <= v["epoch"] <= 5
    assert [h["mean_dice"] for h in card.training["history"]][v["epoch"] - 1] == v["mean_dice"]
    data_record = card.training["data"][0]
    assert data_record["labels"].endswith("_lc.tif") and len(data_record["labels_sha256"]) == 64
    assert card.training["seed"] == 7 and card.training["epochs_run"] == 5

    capsys.readouterr()
    assert main(["train", str(trained), "--evaluate"]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("mean_dice", "mIoU", "pixel_accuracy", "pixels", "per_class", "confusion_matrix"):
        assert again[key] == v[key], key


def test_volume_training_card_and_evaluation(data, tmp_path, capsys) -> None:
    """3-D: a CT with TotalSegmentator labels mapped to 3 structures, HU clipped, z-slab held apart."""
    raw = landcover_job(data, tmp_path)
    raw.update(
        name="ct-tiny",
        data=[
            {
                "image": str(data / "medical/totalseg_example_ct_sm.nii.gz"),
                "labels": str(data / "medical/totalseg_example_ct_sm_seg.nii.gz"),
            }
        ],
        labels={"map": {5: 1, 1: 2, 2: 3, 3: 3}, "default": 0},
        classes={0: "background", 1: "liver", 2: "spleen", 3: "kidney"},
        model={"depth": 1, "width": 2},
        patch_size=[8, 32, 32],
        normalise={"clip": [-150, 250]},
        split={"val_fraction": 0.25, "axis": 0, "position": "start", "gap": 2},
        sampling={"patches_per_epoch": 4, "batch_size": 2, "foreground_fraction": 1.0},
        augment={"flips": [], "rot90": False},
        optim={"epochs": 1, "patience": None},
    )
    job = write_job(tmp_path / "ct.yaml", raw)
    assert main(["train", str(job), "--no-progress"]) == 0
    card = load_card(tmp_path / "model")
    assert card.architecture.spatial_dims == 3 and card.architecture.in_channels == 1
    assert card.inputs.bands == [1] and card.inputs.clip == (-150.0, 250.0)
    assert card.halo == max(receptive_extent(1)) and card.receptive_field == receptive_field(1)
    (region,) = card.validation["regions"]
    assert region["box"] == [[0, 0, 0], [8, 101, 122]]
    assert len(region["bounds_mm"]) == 6 and region["bounds_mm"][3] - region["bounds_mm"][0] == pytest.approx(
        24.0
    )
    assert card.training["data"][0]["train_boxes"] == [[[10, 0, 0], [30, 101, 122]]]
    assert card.validation["pixels"] == 8 * 101 * 122
    capsys.readouterr()
    assert main(["train", str(job), "--evaluate"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (
        again["per_class"] == card.validation["per_class"]
        and again["mean_dice"] == card.validation["mean_dice"]
    )
