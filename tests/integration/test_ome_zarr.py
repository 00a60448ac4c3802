"""OME-Zarr output: read by ome-zarr-py with the input's voxel spacing; labels downsampled by mode."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from pipeline.stitching.pyramid import downsample_mode
from tests.helpers import labels_of, run


def test_ome_zarr_of_a_ct_segmentation(client, data, tmp_path) -> None:
    path = data / "medical" / "totalseg_example_ct_sm.nii.gz"
    result = run(
        client,
        path,
        tmp_path / "out",
        "threshold",
        {"preset": "ct_air_soft_bone"},
        chunk=[16, 64, 64],
        formats=["zarr", "ome-zarr"],
    )
    image = sitk.ReadImage(str(path))
    spacing_zyx = image.GetSpacing()[::-1]
    nodes = list(Reader(parse_url(result.outputs["ome-zarr"]))())
    img = nodes[0]
    scales = [t[0]["scale"] for t in img.metadata["coordinateTransformations"]]
    assert np.allclose(scales[0], spacing_zyx)
    assert np.allclose(scales[1], [2 * s for s in spacing_zyx])
    level0 = np.asarray(img.data[0])
    assert np.array_equal(level0, sitk.GetArrayFromImage(image))
    label_node = next(
        n for n in nodes if "image-label" in n.metadata or n.metadata.get("name") == "segmentation"
    )
    labels = [np.asarray(d) for d in label_node.data]
    stitched = labels_of(result)
    assert np.array_equal(labels[0], stitched)
    assert np.array_equal(labels[1], downsample_mode(stitched))  # mode, never interpolation
    assert set(np.unique(labels[-1])) <= set(np.unique(stitched))


def test_mode_downsampling_kernel() -> None:
    a = np.array([[1, 1, 2, 3], [1, 2, 3, 3], [0, 0, 5, 5], [0, 7, 5, 9]], dtype=np.uint8)
    assert downsample_mode(a).tolist() == [[1, 3], [0, 5]]
    odd = np.array([[4, 4, 6]], dtype=np.uint8)  # edge-padded: the last block is all 6
    assert downsample_mode(odd).tolist() == [[4, 6]]
