from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ChunkTooSmallError, ConfigError
from pipeline.tiling import Box, ChunkGrid


def test_box_geometry_and_validation() -> None:
    b = Box((2, 3), (5, 9))
    assert b.shape == (3, 6) and b.size == 18
    assert b.grow((1, 1)) == Box((1, 2), (6, 10))
    assert b.intersect(Box((4, 0), (10, 4))) == Box((4, 3), (5, 4))
    assert Box((0, 0), (10, 10)).contains(b) and not b.contains(Box((0, 0), (10, 10)))
    with pytest.raises(ValueError, match="before start"):
        Box((5,), (4,))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=2, max_size=3).flatmap(
        lambda shape: st.tuples(
            st.just(shape),
            st.lists(st.integers(1, 17), min_size=len(shape), max_size=len(shape)),
            st.integers(0, 5),
        )
    )
)
def test_write_boxes_tile_the_image_exactly(case: tuple[list[int], list[int], int]) -> None:
    shape, chunk, halo = case
    halo = min(halo, min(min(c, s) for c, s in zip(chunk, shape, strict=False)))
    grid = ChunkGrid.build(shape, chunk, halo)
    cover = np.zeros(shape, dtype=int)
    for spec in grid:
        cover[spec.write.slices()] += 1
        assert spec.read.contains(spec.write)
        assert Box.from_shape(tuple(shape)).contains(spec.read)
        # the read box is the write box grown by the halo, clipped; pads record the clipped part
        for ax in range(len(shape)):
            assert spec.write.start[ax] - spec.read.start[ax] + spec.pad[ax][0] == halo
            assert spec.read.stop[ax] - spec.write.stop[ax] + spec.pad[ax][1] == halo
    assert (cover == 1).all()
    assert len(grid) == len(list(grid))


def test_uneven_last_chunk_and_core_slices() -> None:
    grid = ChunkGrid.build((10, 7), (4, 4), 2)
    assert grid.counts == (3, 2)
    last = grid.spec((2, 1))
    assert last.write == Box((8, 4), (10, 7)) and last.read == Box((6, 2), (10, 7))
    image = np.arange(70).reshape(10, 7)
    block = image[last.read.slices()]
    assert np.array_equal(block[last.core()], image[last.write.slices()])


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
def test_padded_block_core_matches_and_has_full_halo(mode: str) -> None:
    grid = ChunkGrid.build((9, 9), (4, 4), 3, mode)  # type: ignore[arg-type]
    image = np.arange(81, dtype=float).reshape(1, 9, 9)
    whole = np.pad(image, [(0, 0), (3, 3), (3, 3)], mode=mode)  # type: ignore[call-overload]
    for spec in grid:
        block = spec.pad_block(image[(slice(None), *spec.read.slices())], mode)
        assert block.shape[1:] == tuple(s + 6 for s in spec.write.shape)
        assert np.array_equal(block[(0, *spec.core(padded=True))], image[(0, *spec.write.slices())])
        grown = spec.write.grow((3, 3))
        assert np.array_equal(
            block[0],
            whole[0][tuple(slice(a + 3, b + 3) for a, b in zip(grown.start, grown.stop, strict=False))],
        )


def test_chunk_smaller_than_halo_is_refused() -> None:
    with pytest.raises(ChunkTooSmallError, match="at least 10"):
        ChunkGrid.build((100, 100), (8, 64), 10)


def test_bad_grid_arguments() -> None:
    with pytest.raises(ConfigError, match="3 spatial axes"):
        ChunkGrid.build((4, 4, 4), (2, 2), 0)
    with pytest.raises(ConfigError, match="edge mode"):
        ChunkGrid((4, 4), (2, 2), (0, 0), "wrap")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "chunk", "per"), [((100, 130), (10, 10), 7), ((40, 30, 20), (5, 5, 5), 50), ((9, 9), (3, 3), 1)]
)
def test_groups_partition_the_chunks_to_do_into_blocks(shape, chunk, per) -> None:
    grid = ChunkGrid.build(shape, chunk, 0)
    done = grid.done_mask(["0_0" if len(shape) == 2 else "0_0_0", "1_2_3_4", "x", "99_99"])
    todo = grid.todo(done)
    assert len(todo) == len(grid) - 1 and done.sum() == 1
    groups = grid.groups(todo, per)
    seen = np.concatenate(groups)
    assert sorted(map(tuple, seen)) == sorted(map(tuple, todo))  # every chunk once
    sides = np.asarray(grid.block_shape(per))
    assert np.prod(sides) <= per
    for g in groups:
        assert len(g) <= per and len({tuple(k) for k in g // sides}) == 1  # one block each
    assert [s.chunk_id for s in grid.specs(todo[:3])] == [s.chunk_id for s in list(grid)[1:4]]


def test_seam_windows_spread_over_interior_corners_without_listing_them() -> None:
    grid = ChunkGrid.build((1000, 700), (64, 64), 0)
    corners = list(itertools.product(*(range(1, n) for n in grid.counts)))
    picks = [corners[round(i * (len(corners) - 1) / 3)] for i in range(4)]
    centres = [tuple(int(b.start[a] + 64) for a in range(2)) for b in grid.seam_windows()]
    assert centres == [tuple(i * 64 for i in c) for c in picks]
