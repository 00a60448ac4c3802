"""Training inputs: label conversions, polygons on the image grid, the shipped job files, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from pipeline.errors import ConfigError, GeometryMismatchError, ReadError
from pipeline.runner.train_data import stage_pairs
from pipeline.runner.train_spec import TrainJob, load_train_job, resolve_train_paths
from pipeline.runner.training import splits_for, train_job
from pipeline.train.labels import IGNORE, instances_to_classes
from tests.train.jobs import LANDCOVER, landcover_job, write_job

REPO = Path(__file__).resolve().parents[2]
BBBC = "images/bbbc039/IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E847D9B42CB"


def _job(raw: dict, base: Path) -> TrainJob:
    return resolve_train_paths(TrainJob.model_validate(raw), base=base)


def _staged_labels(job: TrainJob, work: Path, i: int = 0) -> np.ndarray:
    staged = stage_pairs(job, work, "test")
    return np.asarray(zarr.open_array(store=str(staged[i].labels), mode="r")[...])


def test_instances_become_interior_and_a_boundary_that_separates_touching_nuclei(data) -> None:
    with rasterio.open(data / f"{BBBC}_instances.tif") as ds:
        ids = ds.read(1)
    classes = instances_to_classes(ids, interior=1, boundary=2)
    assert set(np.unique(classes)) == {0, 1, 2}
    assert np.array_equal(classes == 0, ids == 0)
    # an interior pixel's 4 neighbours all belong to its own nucleus: interiors never touch
    inner = classes == 1
    for a, b in ((np.s_[1:], np.s_[:-1]), (np.s_[:-1], np.s_[1:])):
        for here, there in (((a, slice(None)), (b, slice(None))), ((slice(None), a), (slice(None), b))):
            assert np.all(ids[there][inner[here]] == ids[here][inner[here]])
    # every nucleus of more than a few pixels keeps an interior
    sizes = np.bincount(ids.ravel())
    with_interior = np.unique(ids[inner])
    big = np.flatnonzero(sizes > 20)
    assert np.isin(big[big > 0], with_interior).all()


def test_instance_boundaries_are_exact_across_staging_chunks(data, tmp_path) -> None:
    """Chunked staging (256 px chunks, read with a 1-pixel margin) equals the whole-image conversion."""
    raw = landcover_job(data, tmp_path)
    raw["data"] = [
        {
            "image": str(data / f"{BBBC}.tif"),
            "labels": str(data / f"{BBBC}_instances.tif"),
            "allow_missing_crs": True,
        }
    ]
    raw.update(labels={"from": "instances"}, classes={0: "background", 1: "nucleus", 2: "boundary"})
    staged = _staged_labels(_job(raw, tmp_path), tmp_path / "work")
    with rasterio.open(data / f"{BBBC}_instances.tif") as ds:
        whole = instances_to_classes(ds.read(1), interior=1, boundary=2)
    assert np.array_equal(staged, whole)


def test_geojson_polygons_are_rasterised_on_the_image_grid(data, tmp_path) -> None:
    """The 43 SpaceNet buildings burnt chunk by chunk match the derived instance raster's footprint."""
    raw = landcover_job(data, tmp_path)
    raw["data"] = [
        {
            "image": str(data / "geo/spacenet_atlanta_sample_geotiff.tif"),
            "labels": str(data / "geo/spacenet_atlanta_geotiff_labels.geojson"),
        }
    ]
    raw.update(labels={}, classes={0: "background", 1: "building"})
    staged = _staged_labels(_job(raw, tmp_path), tmp_path / "work")
    with rasterio.open(data / "geo/spacenet_atlanta_buildings_instances.tif") as ds:
        footprint = ds.read(1) > 0
    assert staged.shape == (900, 900) and set(np.unique(staged)) == {0, 1}
    assert np.array_equal(staged == 1, footprint)

    raw["data"][0]["class_field"] = "no_such_field"
    with pytest.raises(
        ConfigError, match=r"spacenet_atlanta_geotiff_labels.geojson: no attribute 'no_such_field'"
    ):
        stage_pairs(_job(raw, tmp_path), tmp_path / "work2", "test")


def test_value_map_merges_classes_and_ignores_no_data(data, tmp_path) -> None:
    raw = landcover_job(data, tmp_path)
    staged = _staged_labels(_job(raw, tmp_path), tmp_path / "work")
    with rasterio.open(data / f"{LANDCOVER}_lc.tif") as ds:
        lc = ds.read(1)
    assert np.array_equal(staged, np.array([255, 0, 1, 2, 3, 3, 3], np.uint8)[lc])
    raw["data"] = [
        {
            "image": str(data / "geo/Spain_7370579_S2Hand.tif"),
            "labels": str(data / "geo/Spain_7370579_LabelHand.tif"),
            "bands": ["B3", "B8"],
        }
    ]
    raw.update(labels={"ignore": [-1]}, classes={0: "not_water", 1: "water"})
    water = _staged_labels(_job(raw, tmp_path), tmp_path / "water")
    with rasterio.open(data / "geo/Spain_7370579_LabelHand.tif") as ds:
        hand = ds.read(1)
    assert np.array_equal(water == IGNORE, hand == -1) and np.array_equal(water == 1, hand == 1)


@pytest.mark.parametrize("name", ["landcover_unet", "water_unet", "nuclei_unet", "ct_unet"])
def test_shipped_training_jobs_load_and_stage(name, tmp_path) -> None:
    job = load_train_job(REPO / "jobs" / "train" / f"{name}.yaml", [f"output.dir={tmp_path}"])
    staged = stage_pairs(job, tmp_path, "test")
    splits = splits_for(job, staged)
    for pair, split in zip(staged, splits, strict=True):
        labels = np.asarray(zarr.open_array(store=str(pair.labels), mode="r")[...])
        present = set(np.unique(labels[split.val.slices()]).tolist()) - {IGNORE}
        assert present == set(job.classes), f"{name}: classes held apart {present}"
    # the weights and card go to the zoo folder of that name (relative to the working directory)
    assert job.name == name and job.output.model_dir == str(Path.cwd() / "pipeline" / "models" / "zoo" / name)


# --- bad input: each error names the file, the problem and the fix -------------------------------


def test_labels_on_another_grid_are_refused(data, tmp_path) -> None:
    raw = landcover_job(data, tmp_path)
    raw["data"][0]["labels"] = str(data / "geo/Spain_7370579_LabelHand.tif")
    with pytest.raises(GeometryMismatchError) as err:
        train_job(_job(raw, tmp_path), command="test", progress=False)
    msg = str(err.value)
    assert "Spain_7370579_LabelHand.tif: the labels are not on the grid of the image" in msg
    assert "naip-new.tif" in msg and "gdalwarp" in msg
    ct = data / "medical/totalseg_example_ct_sm.nii.gz"
    raw.update(
        data=[{"image": str(ct), "labels": str(data / "medical/totalseg_example_ct_dicom_seg.nii.gz")}],
        patch_size=[8, 16, 16],
        labels={"default": 0},
    )
    with pytest.raises(
        GeometryMismatchError, match=r"totalseg_example_ct_dicom_seg.nii.gz: .*resample_labels: true"
    ):
        train_job(_job(raw, tmp_path), command="test", progress=False)


def test_a_label_value_outside_the_class_map_is_refused(data, tmp_path) -> None:
    raw = landcover_job(data, tmp_path)
    raw["labels"] = {"map": {1: 0, 2: 1, 3: 2, 4: 3, 5: 3}}  # 6 (roads) forgotten
    with pytest.raises(ConfigError) as err:
        train_job(_job(raw, tmp_path), command="test", progress=False)
    msg = str(err.value)
    assert f"{LANDCOVER}_lc.tif: label value 6 is not a known class" in msg
    assert "labels.map" in msg and "labels.ignore" in msg
    raw["labels"] = {"map": {1: 0, 2: 1, 3: 2, 4: 3, 5: 3, 6: 4}}
    with pytest.raises(ConfigError, match=r"class id 4 is used .* but not in classes"):
        load_train_job(write_job(tmp_path / "job.yaml", raw))


def test_missing_file_and_unknown_key_are_refused(data, tmp_path) -> None:
    raw = landcover_job(data, tmp_path)
    raw["data"][0]["image"] = "../imagery/missing_naip.tif"
    job = write_job(tmp_path / "jobs" / "job.yaml", raw)
    with pytest.raises(ReadError) as err:
        load_train_job(job)
    msg = str(err.value)
    assert "data[0].image" in msg and str(tmp_path / "imagery" / "missing_naip.tif") in msg
    assert "relative to the job file's folder" in msg
    raw = landcover_job(data, tmp_path)
    raw["optim"]["epoch"] = 3
    with pytest.raises(
        ConfigError, match=r"unknown key 'optim.epoch'; allowed keys here: lr, weight_decay, epochs"
    ):
        load_train_job(write_job(tmp_path / "typo.yaml", raw))
    raw = landcover_job(data, tmp_path)
    raw["data"][0]["bands"] = [1, "NIR"]
    with pytest.raises(ConfigError, match=r"data\[0\].bands: band 'NIR' is not in .*naip-new.tif \(4 bands"):
        train_job(_job(raw, tmp_path), command="test", progress=False)


def test_pairs_must_feed_the_same_bands(data, tmp_path) -> None:
    raw = landcover_job(data, tmp_path)
    raw["labels"]["ignore"] = [-1]
    raw["data"].append(
        {
            "image": str(data / "geo/Spain_7370579_S2Hand.tif"),
            "labels": str(data / "geo/Spain_7370579_LabelHand.tif"),
        }
    )
    with pytest.raises(ConfigError, match=r"the pairs feed \[4, 13\] bands to one model.*set bands on each"):
        train_job(_job(raw, tmp_path), command="test", progress=False)
