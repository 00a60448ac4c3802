"""U-Net: receptive field, window arithmetic, tiled = whole-image inference, one load per worker."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data import valid_mask
from pipeline.errors import ConfigError, HaloTooSmallError
from pipeline.models.torch.infer import blend_starts, blend_weights, crop_windows
from pipeline.models.torch.unet import UNet, receptive_extent
from tests.helpers import labels_of, run, tiny_unet

NAIP = ("landcover", "chesapeake_m_3907833_nw_17_1_naip-new.tif")
CT = ("medical", "totalseg_example_ct_sm.nii.gz")
LC_CLASSES = {0: "water", 1: "tree", 2: "low vegetation", 3: "built"}


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_declared_receptive_reach_is_what_the_gradient_sees(depth: int) -> None:
    """The interval arithmetic equals the support of d(output pixel)/d(input), worst case over alignment."""
    torch.manual_seed(0)
    net = UNet(2, 1, 1, depth=depth, width=4, norm="none").eval()
    for m in net.modules():  # positive weights: no ReLU ever zeroes the gradient
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            torch.nn.init.uniform_(m.weight, 0.01, 0.1)
            torch.nn.init.constant_(m.bias, 0.01)
    before = after = 0
    for p in range(96, 96 + 2**depth):
        x = torch.rand(1, 1, 224, 224, requires_grad=True)
        net(x)[0, 0, p, p].backward()
        cols = torch.nonzero(x.grad[0, 0].abs().sum(0)).flatten()
        before, after = max(before, p - int(cols.min())), max(after, int(cols.max()) - p)
    assert (before, after) == receptive_extent(depth)


def test_instance_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="per-window statistics"):
        UNet(2, 1, 2, norm="instance")


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 700),
    window=st.integers(8, 300),
    reach=st.integers(0, 60),
    align=st.sampled_from([1, 2, 4, 8]),
)
def test_crop_windows_keep_parts_tile_the_axis(n: int, window: int, reach: int, align: int) -> None:
    wins = crop_windows(n, window, reach, align)
    covered = np.zeros(n, int)
    for w in wins:
        assert w.start % align == 0 and 0 <= w.start <= w.keep_lo < w.keep_hi <= w.stop <= n
        # a kept pixel is at least `reach` from every window edge that is not the axis end
        assert w.start == 0 or w.keep_lo - w.start >= reach
        assert w.stop == n or w.stop - w.keep_hi >= reach
        covered[w.keep_lo : w.keep_hi] += 1
    assert (covered == 1).all()


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 600), window=st.integers(4, 200), frac=st.floats(0.0, 0.9))
def test_blend_starts_cover_the_axis(n: int, window: int, frac: float) -> None:
    stride = max(1, round(window * (1 - frac)))
    starts = blend_starts(n, min(window, n), stride)
    covered = np.zeros(n, int)
    for s in starts:
        covered[s : s + min(window, n)] += 1
    assert (covered > 0).all() and starts[-1] + min(window, n) == n


@pytest.mark.parametrize("mode", ["gaussian", "hann"])
def test_blend_weights_peak_in_the_middle(mode: str) -> None:
    w = blend_weights((32, 48), mode)
    assert w.shape == (32, 48) and w.max() == pytest.approx(1.0, abs=0.02) and w.min() >= 1e-3
    assert w[16, 24] > w[0, 24] and w[16, 24] > w[16, 0]


def _whole(result, path) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Whole-image inference in this process: the segmenter applied to the image in one block."""
    if str(path).endswith(".tif"):
        with rasterio.open(path) as ds:
            block = ds.read()
    else:
        block = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[None]
    seg = result.segmenter
    return seg(block, valid_mask(block, None), ctx=None)


@pytest.fixture(scope="module")
def naip_model(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("naip-model")
    return tiny_unet(
        folder,
        spatial_dims=2,
        bands=[1, 2, 3, 4],
        classes=LC_CLASSES,
        mean=[100.0, 110.0, 95.0, 130.0],
        std=[40.0, 35.0, 30.0, 45.0],
        patch=[64, 64],
    )


@pytest.mark.parametrize("chunk", [[100, 100], [128, 72], [260, 260]])
def test_crop_stitching_equals_whole_image_inference(torch_client, data, tmp_path, naip_model, chunk) -> None:
    src = data.joinpath(*NAIP)
    res = run(
        torch_client, src, tmp_path / "out", "unet", {"model": str(naip_model), "window": 96}, chunk=chunk
    )
    tiled, whole = labels_of(res), _whole(res, src)
    assert res.plan.grid.halo == (24, 24)  # reach 23 of a depth-2 U-Net, on the 4-pixel grid
    assert len(np.unique(whole)) >= 3  # a network that says something
    assert np.array_equal(tiled, whole)  # 100 %
    assert res.diagnostics["seam_check"]["differing"] == 0


@pytest.mark.parametrize("mode", ["gaussian", "hann"])
def test_blended_windows_agree_with_whole_image_blending(
    torch_client, data, tmp_path, naip_model, mode
) -> None:
    src = data.joinpath(*NAIP)
    params = {"model": str(naip_model), "stitch": "blend", "window": 64, "overlap": 0.5, "blend": mode}
    res = run(torch_client, src, tmp_path / "out", "unet", params, chunk=[100, 90])
    assert res.plan.grid.halo == (63, 63)
    tiled, whole = labels_of(res), _whole(res, src)
    agree = np.mean(tiled == whole)
    assert agree >= 0.999, agree


def test_model_is_loaded_once_per_worker_process(torch_client, data, tmp_path) -> None:
    model = tiny_unet(tmp_path / "m", spatial_dims=2, bands=[1, 2, 3, 4], classes=LC_CLASSES, seed=3)
    res = run(
        torch_client, data.joinpath(*NAIP), tmp_path / "out", "unet", {"model": str(model)}, chunk=[52, 52]
    )
    assert len(res.plan.grid) == 25

    def loads() -> int:
        from pipeline.models.torch import segmenter

        return sum(n for path, n in segmenter.LOADS.items() if path.startswith(str(tmp_path)))

    per_worker = torch_client.run(loads)
    assert sorted(per_worker.values()) == [1, 1], per_worker  # 25 chunks (+ seam windows), 2 processes

    def reusing() -> bool | None:
        from pipeline.runner import memory

        return memory.reusing()

    # Both workers ran U-Net chunks: their malloc hands large blocks back (no heap fragmentation).
    assert list(torch_client.run(reusing).values()) == [False, False]


def test_probabilities_and_entropy_outputs(torch_client, data, tmp_path, naip_model) -> None:
    src = data.joinpath(*NAIP)
    params = {"model": str(naip_model), "outputs": ["probabilities", "entropy"]}
    res = run(torch_client, src, tmp_path / "out", "unet", params, chunk=[130, 130], formats=["zarr", "cog"])
    import zarr

    probs = np.asarray(zarr.open_array(store=res.outputs["probabilities_zarr"], mode="r")[...])
    assert probs.shape == (4, 260, 260)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(np.argmax(probs, axis=0), labels_of(res))
    with rasterio.open(res.outputs["entropy"]) as ds, rasterio.open(src) as ref:
        ent = ds.read(1)
        assert ds.dtypes[0] == "float32" and ds.crs == ref.crs and ds.transform == ref.transform
        assert ds.overviews(1) or max(ds.shape) <= 512
    p = np.clip(probs, 1e-12, 1)
    np.testing.assert_allclose(ent, -(p * np.log(p)).sum(0) / np.log(4), atol=1e-5)


def test_crop_stitching_3d_equals_whole_volume(torch_client, data, tmp_path) -> None:
    model = tiny_unet(
        tmp_path / "m3",
        spatial_dims=3,
        bands=[1],
        classes={0: "background", 1: "soft tissue", 2: "bone"},
        mean=[-200.0],
        std=[400.0],
        patch=[16, 32, 32],
    )
    src = data.joinpath(*CT)
    res = run(
        torch_client, src, tmp_path / "out", "unet", {"model": str(model), "window": 56}, chunk=[24, 48, 64]
    )
    tiled, whole = labels_of(res), _whole(res, src)
    assert len(res.plan.grid) > 4 and len(np.unique(whole)) >= 2
    assert np.array_equal(tiled, whole)


def test_bad_model_references_fail_clearly(torch_client, data, tmp_path, naip_model) -> None:
    src = data.joinpath(*NAIP)
    with pytest.raises(ConfigError, match=r"no such model card.*segpipe train"):
        run(
            torch_client,
            src,
            tmp_path / "a",
            "unet",
            {"model": str(tmp_path / "nope.yaml")},
            chunk=[130, 130],
        )
    model3d = tiny_unet(tmp_path / "m3", spatial_dims=3, bands=[1], classes={0: "a", 1: "b"})
    with pytest.raises(ConfigError, match="3-D network but the input is a raster"):
        run(torch_client, src, tmp_path / "b", "unet", {"model": str(model3d)}, chunk=[130, 130])
    with pytest.raises(HaloTooSmallError):
        run(
            torch_client,
            src,
            tmp_path / "c",
            "unet",
            {"model": str(naip_model)},
            chunk=[130, 130],
            tiling={"chunk": [130, 130], "halo": 8},
        )
    (tmp_path / "m3" / "weights.safetensors").write_bytes(b"truncated")
    with pytest.raises(Exception, match="checksum differs"):
        run(
            torch_client,
            data.joinpath(*CT),
            tmp_path / "d",
            "unet",
            {"model": str(model3d)},
            chunk=[24, 64, 64],
        )


@pytest.mark.gpu
def test_cuda_inference_agrees_with_cpu(data, tmp_path, naip_model) -> None:
    """Where a CUDA device exists: bf16 autocast on the GPU agrees with fp32 on the CPU."""
    from pipeline.models import ImageInfo, create_segmenter

    with rasterio.open(data.joinpath(*NAIP)) as ds:
        block = ds.read()
    info = ImageInfo("raster", 4, "uint8", shape=block.shape[1:])
    valid = valid_mask(block, None)
    cpu = create_segmenter("unet", {"model": str(naip_model), "device": "cpu"}, info)(block, valid)
    gpu = create_segmenter("unet", {"model": str(naip_model), "device": "cuda"}, info)(block, valid)
    assert np.mean(cpu == gpu) >= 0.99
