"""The channel tile's forward pass from NCHW input (``conv_rows_staged``: each task lays
out the input rows it reads), forced through plans on geometries where it runs: against
the reference in float32 and float64, with non-finite values and on any thread count."""

from __future__ import annotations

import itertools
import re

import numba
import numpy as np
import pytest

import fastconv as fc
from fastconv import _jit
from fastconv import reference as ref
from fastconv.algorithms import channel_tile as CT

from conftest import assert_same_on_thread_counts, random_problem

FORCED = {"forward": "direct-channel-tile"}


def _forward_staged(geo) -> bool:
    rows = CT.TileMap(geo.OH, geo.OW, geo.sh, geo.sw, geo.dlh, geo.dlw)
    return CT._staged(rows, CT._staged_columns(rows, geo.S, geo.W, geo.pl)[3])


def _grid():
    shapes = [  # (N, C, H, W, K, G, R, S)
        (2, 32, 7, 40, 40, 1, 3, 3),    # two blocks of 16 channels; 40-pixel rows: a
                                        # shifted last block of 16 pixels
        (1, 20, 6, 33, 70, 1, 3, 2),    # 16 channels transposed, 4 one at a time; K past
                                        # two blocks of 32
        (2, 8, 5, 24, 16, 1, 5, 5),     # fewer than 16 channels: every value one at a time
        (1, 32, 9, 20, 24, 2, 3, 3),    # two groups of 16
    ]
    for shape, stride, padding, dilation in itertools.product(
            shapes, [1, 2, (1, 3)], [0, 1, (4, 0)], [1, (2, 1), (1, 2)]):
        N, C, H, W, K, G, R, S = shape
        conv = dict(stride=stride, padding=padding, dilation=dilation, groups=G)
        try:
            geo = fc.conv_geometry((N, C, H, W), (K, C // G, R, S), **conv)
        except ValueError:
            continue
        if _forward_staged(geo):
            yield geo, pytest.param(shape, conv, id=f"{shape}-s{stride}-p{padding}-d{dilation}")


GEOS, GRID = zip(*_grid(), strict=True)


def test_the_grid_runs_the_staged_kernel_often():
    assert len(GEOS) >= 40


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, conv", list(GRID))
def test_staged_rows_match_the_reference(shape, conv, dtype, rng):
    N, C, H, W, K, G, R, S = shape
    x, w, b, _ = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=dtype, algorithm=FORCED)
    g = plan.geometry
    want = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), b, stride=(g.sh, g.sw),
                              pads=g.pads, dilation=(g.dlh, g.dlw), groups=G)
    got = plan.forward(x, w, b)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_input_reaches_exactly_the_outputs_it_touches(bad, rng):
    conv = dict(stride=2, padding=1, dilation=1, groups=1)
    x, w, b, _ = random_problem(rng, 2, 20, 9, 28, 8, 3, 3, conv)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=np.float64, algorithm=FORCED)
    assert _forward_staged(plan.geometry)
    n = dict(stride=(2, 2), pads=plan.geometry.pads)
    for index in [(1, 3, 0, 0), (0, 17, 8, 27), (1, 0, 4, 16)]:
        xb = x.copy()
        xb[index] = bad
        where = np.zeros(x.shape)
        where[index] = 1
        touched = ref.conv2d_forward(where, np.ones(w.shape), **n) > 0
        got = plan.forward(xb, w, b)
        assert np.array_equal(~np.isfinite(got), touched)
        want = ref.conv2d_forward(np.where(where > 0, 0.0, x), w, b, **n)
        np.testing.assert_allclose(got[~touched], want[~touched], rtol=1e-12)


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
    f = numba.njit(parallel=True, fastmath=_jit.FASTMATH, cache=False)(
        CT.conv_rows_staged.py_func)
    f(np.zeros((1, 16, 4, 20), np.float32), np.zeros((1, 1, 3, 3, 16, CT.KB), np.float32),
      np.zeros((1, CT.KB), np.float32), np.zeros((1, 8, 2, 18), np.float32),
      CT.TileMap(2, 18, 1, 1, 1, 1), 0, (0, 0, 20), np.zeros((1, 3, 20, 16), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    # The 7-pixel x 32-channel tile: two vectors of 7 packed FMAs a step, no spills.
    loops = [b for b in re.split(r"\n(?=\.LBB)", asm)
             if len(re.findall(r"vfmadd\d+ps\s[^\n]*zmm", b)) >= 2 * CT.TW]
    assert loops
    assert not any(re.search(r"zmm[^\n]*\(%rsp\)|\(%rsp\)[^\n]*zmm", b) for b in loops)
    assert "vgather" not in asm
