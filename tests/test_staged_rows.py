"""The channel tile's forward pass from NCHW input (``conv_rows_staged``: each task lays
out the input rows it reads; ``conv_images_staged``: each thread lays out one image at a
time), forced through plans on geometries where each runs: against the reference in
float32 and float64, with non-finite values and on any thread count."""

from __future__ import annotations

import itertools
import re

import numba
import numpy as np
import pytest
from test_codegen import NO_SPILL, _fma_loops

import fastconv as fc
from fastconv import _jit
from fastconv import reference as ref
from fastconv.algorithms import channel_tile as CT

from conftest import assert_same_on_thread_counts, random_problem

FORCED = {"forward": "direct-channel-tile"}


def _forward_staged(geo) -> bool:
    rows = CT.TileMap(geo.OH, geo.OW, geo.sh, geo.sw, geo.dlh, geo.dlw)
    return CT._staged(rows, CT._staged_columns(rows, geo.S, geo.W, geo.pl)[3])


def _grid(shapes, strides, runs):
    """(geometry, test parameter) for each of ``shapes`` (N, C, H, W, K, G, R, S) under
    each of ``strides``, paddings 0, 1, (4, 0) and dilations 1, (2, 1), (1, 2) that
    ``runs(geometry)`` says the kernel under test runs."""
    for shape, stride, padding, dilation in itertools.product(
            shapes, strides, [0, 1, (4, 0)], [1, (2, 1), (1, 2)]):
        N, C, H, W, K, G, R, S = shape
        conv = dict(stride=stride, padding=padding, dilation=dilation, groups=G)
        try:
            geo = fc.conv_geometry((N, C, H, W), (K, C // G, R, S), **conv)
        except ValueError:
            continue
        if runs(geo):
            yield geo, pytest.param(shape, conv, id=f"{shape}-s{stride}-p{padding}-d{dilation}")


GEOS, GRID = zip(*_grid([  # (N, C, H, W, K, G, R, S)
    (2, 32, 7, 40, 40, 1, 3, 3),    # two blocks of 16 channels; 40-pixel rows: a shifted
                                    # last block of 16 pixels
    (1, 20, 6, 33, 70, 1, 3, 2),    # 16 channels transposed, 4 one at a time; K past two
                                    # blocks of 32
    (2, 8, 5, 24, 16, 1, 5, 5),     # fewer than 16 channels: every value one at a time
    (1, 32, 9, 20, 24, 2, 3, 3),    # two groups of 16
], [1, 2, (1, 3)], _forward_staged), strict=True)


def test_the_grid_runs_the_staged_kernel_often():
    assert len(GEOS) >= 40


def _forced_plan(shape, conv, dtype, rng):
    """x, w, b and a plan forced onto the channel tile for ``shape`` (N, C, H, W, K, G, R, S)."""
    N, C, H, W, K, G, R, S = shape
    x, w, b, _ = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
    return x, w, b, fc.conv2d_plan(x.shape, w.shape, **conv, dtype=dtype, algorithm=FORCED)


def _assert_matches_the_reference(x, w, b, plan):
    g = plan.geometry
    want = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), b, stride=(g.sh, g.sw),
                              pads=g.pads, dilation=(g.dlh, g.dlw), groups=g.G)
    got = plan.forward(x, w, b)
    tol = 1e-10 if x.dtype == np.float64 else 2e-5
    assert got.dtype == x.dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def _assert_non_finite_reach(x, w, b, plan, bad, indices):
    """An inf or NaN at each of ``indices`` of ``x`` makes exactly the outputs it touches
    non-finite, and leaves the others as they are without it (stride 2, padding 1)."""
    n = dict(stride=(2, 2), pads=plan.geometry.pads)
    for index in indices:
        xb = x.copy()
        xb[index] = bad
        where = np.zeros(x.shape)
        where[index] = 1
        touched = ref.conv2d_forward(where, np.ones(w.shape), **n) > 0
        got = plan.forward(xb, w, b)
        assert np.array_equal(~np.isfinite(got), touched)
        want = ref.conv2d_forward(np.where(where > 0, 0.0, x), w, b, **n)
        np.testing.assert_allclose(got[~touched], want[~touched], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, conv", list(GRID))
def test_staged_rows_match_the_reference(shape, conv, dtype, rng):
    x, w, b, plan = _forced_plan(shape, conv, dtype, rng)
    _assert_matches_the_reference(x, w, b, plan)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_input_reaches_exactly_the_outputs_it_touches(bad, rng):
    conv = dict(stride=2, padding=1, dilation=1, groups=1)
    x, w, b, plan = _forced_plan((2, 20, 9, 28, 8, 1, 3, 3), conv, np.float64, rng)
    assert _forward_staged(plan.geometry)
    _assert_non_finite_reach(x, w, b, plan, bad, [(1, 3, 0, 0), (0, 17, 8, 27), (1, 0, 4, 16)])


def test_staged_rows_do_not_depend_on_the_thread_count(rng):
    conv = dict(stride=2, padding=1, dilation=1, groups=1)
    x, w, b, _ = random_problem(rng, 6, 32, 20, 36, 40, 3, 3, conv, np.float32)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, algorithm=FORCED)
    assert_same_on_thread_counts(lambda: plan.forward(x, w, b))


def test_staged_rows_run_where_rows_are_long_and_keep_the_tile_in_registers():
    geo = fc.conv_geometry((64, 64, 28, 28), (64, 64, 3, 3), stride=2, padding=1)
    assert _forward_staged(geo)
    # 14-pixel input rows: no 16 x 16 blocks to transpose; 16-pixel output rows: flat tiles
    assert not _forward_staged(fc.conv_geometry((16, 256, 14, 14), (256, 256, 3, 3),
                                                stride=2, padding=1))
    assert not _forward_staged(fc.conv_geometry((16, 64, 32, 32), (128, 64, 3, 3),
                                                stride=2, padding=1))
    _assert_tile_in_registers(
        CT.conv_rows_staged, np.zeros((1, 16, 4, 20), np.float32),
        np.zeros((1, 1, 3, 3, 16, CT.KB), np.float32), np.zeros((1, CT.KB), np.float32),
        np.zeros((1, 8, 2, 18), np.float32), CT.TileMap(2, 18, 1, 1, 1, 1), 0, (0, 0, 20),
        np.zeros((1, 3, 20, 16), np.float32))


def _assert_tile_in_registers(kernel, *args):
    """``kernel``, compiled afresh for ``args``, keeps the 7-pixel x 32-channel tile in
    registers: two vectors of 7 packed FMAs a step, no spills, no gathers."""
    f = numba.njit(parallel=True, fastmath=_jit.FASTMATH, cache=False)(kernel.py_func)
    f(*args)
    asm = f.inspect_asm(f.signatures[0])
    # The innermost loop (a label down to its back edge) of the tile's FMAs.  The loops
    # around it zero the tile and store it when done (to the stack tile the output is
    # written from, outside the hot loop), as LLVM lays them out for some CPUs.
    loops = [b for b in _fma_loops(asm)
             if len(re.findall(r"vfmadd\d+ps\s[^\n]*zmm", b)) >= 2 * CT.TW]
    assert loops
    assert not NO_SPILL.search(min(loops, key=len))
    assert "vgather" not in asm


# ---- conv_images_staged: a whole image laid out at a time, where tiles are flattened ----

def _forward_by_image(geo, threads=2) -> bool:
    return not _forward_staged(geo) and CT._by_image(geo, threads)


IMAGE_GEOS, IMAGE_GRID = zip(*_grid([  # (N, C, H, W, K, G, R, S)
    (2, 32, 32, 32, 40, 1, 3, 3),   # two blocks of 16 channels; K past one block of 32
    (4, 20, 9, 33, 70, 1, 3, 2),    # 16 channels transposed, 4 one at a time; K past two
                                    # blocks of 32
    (2, 32, 10, 16, 24, 2, 3, 3),   # two groups of 16; 16-pixel rows: one block
    (2, 16, 6, 18, 8, 1, 5, 5),     # a 5x5 filter, the last pixel block shifted back
], [1, 2, (1, 3), (2, 5)], _forward_by_image), strict=True)


@pytest.fixture
def two_threads():
    """Two threads (or one, where numba has one), restored after: the image rule depends on
    the thread count."""
    threads = fc.get_num_threads()
    fc.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield fc.get_num_threads()
    fc.set_num_threads(threads)


def test_the_grid_runs_the_image_kernel_often():
    assert len(IMAGE_GEOS) >= 30
    assert sum(CT._flat(g.OH, g.OW) for g in IMAGE_GEOS) >= 20


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, conv", list(IMAGE_GRID))
def test_staged_images_match_the_reference(shape, conv, dtype, rng, two_threads):
    x, w, b, plan = _forced_plan(shape, conv, dtype, rng)
    assert CT._image_runs(plan.geometry) == two_threads
    _assert_matches_the_reference(x, w, b, plan)


def test_the_image_rule_wants_a_thread_for_every_image_and_rows_of_16():
    geo = fc.conv_geometry((16, 64, 32, 32), (128, 64, 3, 3), stride=2, padding=1)
    assert _forward_by_image(geo)  # 3x3 stride 2 onto 16-pixel rows: flat tiles
    assert CT._by_image(geo, 4) and CT._by_image(geo, 16)
    assert not CT._by_image(geo, 32)  # fewer images than threads
    five = fc.conv_geometry((5, 64, 32, 32), (128, 64, 3, 3), stride=2, padding=1)
    assert CT._by_image(five, 1) and not CT._by_image(five, 2)  # 3 images against 2
    nine = fc.conv_geometry((9, 64, 32, 32), (128, 64, 3, 3), stride=2, padding=1)
    assert CT._by_image(nine, 2)  # 5 against 4
    narrow = fc.conv_geometry((16, 256, 14, 14), (256, 256, 3, 3), stride=2, padding=1)
    assert not CT._by_image(narrow, 2)  # 14-pixel rows: one value at a time
    few = fc.conv_geometry((16, 8, 32, 32), (64, 8, 3, 3), stride=2, padding=1)
    assert not CT._by_image(few, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_input_reaches_exactly_the_outputs_it_touches_by_image(bad, rng,
                                                                             two_threads):
    conv = dict(stride=2, padding=1, dilation=1, groups=1)
    x, w, b, plan = _forced_plan((2, 20, 9, 32, 8, 1, 3, 3), conv, np.float64, rng)
    assert CT._image_runs(plan.geometry) == two_threads
    _assert_non_finite_reach(x, w, b, plan, bad, [(1, 3, 0, 0), (0, 17, 8, 31), (1, 0, 4, 16)])


def test_staged_images_do_not_depend_on_the_thread_count(rng):
    conv = dict(stride=2, padding=1, dilation=1, groups=1)
    x, w, b, _ = random_problem(rng, 4, 32, 20, 32, 40, 3, 3, conv, np.float32)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, algorithm=FORCED)
    assert all(CT._by_image(plan.geometry, q) for q in (1, 2))
    assert_same_on_thread_counts(lambda: plan.forward(x, w, b))


def test_the_image_kernel_keeps_its_tile_in_registers():
    _assert_tile_in_registers(
        CT.conv_images_staged, np.zeros((2, 16, 16, 16), np.float32),
        np.zeros((1, 1, 3, 3, 16, CT.KB), np.float32), np.zeros((1, CT.KB), np.float32),
        np.zeros((2, 8, 8, 8), np.float32), CT.TileMap(8, 8, 2, 2, 1, 1), (1, 1),
        np.zeros((2, 1, 18, 18, 16), np.float32))
