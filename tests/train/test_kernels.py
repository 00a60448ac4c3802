"""Training kernels: tiled validation prediction, augmentation, loss and schedule."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from pipeline.models.torch.unet import UNet
from pipeline.runner.train_data import stage_pairs
from pipeline.runner.train_spec import TrainJob, resolve_train_paths
from pipeline.runner.training import halo_of, splits_for
from pipeline.tiling import Box
from pipeline.train.augment import Augment, augment
from pipeline.train.infer import predict_box
from pipeline.train.labels import IGNORE
from pipeline.train.loss import dice_ce_loss, learning_rate
from pipeline.train.patches import Normaliser, Region, read_patch
from tests.train.jobs import landcover_job


def _fitted(region: Region, norm: Normaliser) -> UNet:
    """A U-Net fitted a little (a random one predicts one class everywhere)."""
    torch.manual_seed(0)
    model = UNet(2, 4, 4, depth=2, width=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    origins = [(0, 0), (0, 96), (96, 0), (96, 96)]
    x = torch.from_numpy(np.stack([norm(read_patch(region, o, (96, 96))[0]) for o in origins]))
    y = torch.from_numpy(np.stack([read_patch(region, o, (96, 96))[1] for o in origins]).astype(np.int64))
    for _ in range(15):
        opt.zero_grad()
        dice_ce_loss(model(x), y).backward()
        opt.step()
    return model.eval()


def test_tiled_prediction_equals_whole_box_prediction(data, tmp_path) -> None:
    """Tiles of 32 px with the halo (aligned to 2**depth) give the map of one whole-box pass."""
    job = resolve_train_paths(TrainJob.model_validate(landcover_job(data, tmp_path)), base=tmp_path)
    staged = stage_pairs(job, tmp_path / "work", "test")
    (split,) = splits_for(job, staged)
    region = Region(staged[0].image, staged[0].labels, split)
    norm = Normaliser((94.0, 110.0, 94.0, 118.0), (43.0, 35.0, 27.0, 37.0))
    model = _fitted(region, norm)
    box = Box((150, 13), (260, 250))  # uneven: 110 x 237, not a multiple of the tile
    whole = predict_box(model, region, box, norm, tile=(512, 512), halo=halo_of(2), align=4)
    tiled = predict_box(model, region, box, norm, tile=(32, 32), halo=halo_of(2), align=4)
    assert whole.shape == box.shape and len(np.unique(whole)) > 1
    assert np.array_equal(tiled, whole)
    # without the halo the tiles differ from the whole box: the test can tell
    cut = predict_box(model, region, box, norm, tile=(32, 32), halo=0, align=4)
    assert not np.array_equal(cut, whole)
    assert model.training is False


def test_augmentation_moves_image_and_labels_together() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(4, 6, 6)).astype(np.uint8)
    image = np.stack([labels.astype(np.float32), -labels.astype(np.float32)])
    seen = set()
    for _ in range(40):
        img, lab = augment(rng, image, labels, Augment(flip_axes=(0, 1, 2), rot90=True))
        assert np.array_equal(img[0], lab.astype(np.float32)) and np.array_equal(img[1], -img[0])
        seen.add(lab.tobytes())
    assert len(seen) > 8  # flips and turns do vary
    img, _ = augment(rng, image, labels, Augment(scale=0.2, shift=0.5))
    ratio = img[0] / np.where(image[0] == 0, 1, image[0])
    assert not np.allclose(img, image) and img.dtype == np.float32 and np.isfinite(ratio).all()


def test_ignored_pixels_do_not_change_the_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :3] = IGNORE
    other = logits.clone()
    other[:, :, :3] = torch.randn(2, 3, 3, 8) * 10
    assert dice_ce_loss(logits, target) == pytest.approx(float(dice_ce_loss(other, target)), abs=1e-6)
    perfect = torch.nn.functional.one_hot(torch.where(target == IGNORE, 0, target), 3).movedim(-1, 1) * 50.0
    assert float(dice_ce_loss(perfect, target)) < 0.01 < float(dice_ce_loss(logits, target))
    # nothing labelled in the batch: no loss (and no gradient)
    assert float(dice_ce_loss(logits, torch.full_like(target, IGNORE))) == 0.0


def test_schedules() -> None:
    total = 101
    cosine = [learning_rate(s, total, lr=0.1, schedule="cosine") for s in range(total)]
    assert cosine[0] == pytest.approx(0.1) and cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in pairwise(cosine))
    one = [learning_rate(s, total, lr=0.1, schedule="onecycle") for s in range(total)]
    assert one[0] == pytest.approx(0.004) and max(one) == pytest.approx(0.1) and int(np.argmax(one)) == 10
    assert learning_rate(50, total, lr=0.1, schedule="constant") == 0.1
