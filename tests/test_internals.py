"""Promises of the design that the public results alone cannot show."""

import itertools
import json
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from fastconv import _jit, conv_output_size
from fastconv import kernels as k
from fastconv.geometry import _dx_phases

AXES = [(size, pad, stride, dilation, kernel, conv_output_size(size, kernel, stride, pad, pad,
                                                                  dilation))
        for size, pad, stride, dilation, kernel in itertools.product(
            [5, 8, 13], [0, 1, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3, 5])]


@pytest.mark.parametrize("size, pad, stride, dilation, kernel, out_size",
                         [a for a in AXES if a[-1] >= 1])
def test_dx_phases_multiply_no_inserted_zero(size, pad, stride, dilation, kernel, out_size):
    """Every (output row, tap) the dX kernel visits meets a real delta position, and every
    (row, tap) pair that meets a delta of the output is visited."""
    phases, pad_lo, pad_hi = _dx_phases(size, pad, stride, dilation, kernel, out_size)
    visited = set()
    for ph in phases:
        for u in range(ph.count):
            h = ph.out0 + u * stride  # dx row
            for m, r in enumerate(ph.taps):
                hp = h + pad
                assert (hp - r * dilation) % stride == 0, "an inserted zero is multiplied"
                i = (hp - r * dilation) // stride
                # The kernel reads padded delta row start + pad_lo + u + m*step for this tap.
                assert ph.start + pad_lo + u + m * ph.step == i + pad_lo
                assert 0 <= i + pad_lo < out_size + pad_lo + pad_hi
                visited.add((h, r, i))
    needed = {(h, r, (h + pad - r * dilation) // stride)
              for h in range(size) for r in range(kernel)
              if (h + pad - r * dilation) % stride == 0
              and 0 <= (h + pad - r * dilation) // stride < out_size}
    assert needed <= visited


@pytest.mark.parametrize("G, Cg, CgP", [(1, 1, 1), (1, 3, 5), (1, 16, 16), (1, 17, 32),
                                        (1, 33, 40), (2, 16, 18), (3, 15, 16), (2, 40, 40)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_channels_last_matches_numpy(G, Cg, CgP, dtype):
    """The packer's whole channel blocks and its leftover channels land where NumPy puts
    them, every group's padding channels and the border stay zero."""
    rng = np.random.default_rng(Cg)
    for N, H, W, pt, pl in [(2, 5, 7, 2, 1), (2, 3, 16, 1, 0), (1, 2, 37, 0, 3)]:
        # rows narrower than a block, one whole block, blocks and a shifted last block
        src = rng.standard_normal((N, G * Cg, H, W)).astype(dtype)
        dst = np.full((N, H + pt + 3, W + pl + 2, G * CgP), np.nan, dtype)  # overwritten
        k.pack_channels_last(src, dst, pt, pl, G, CgP)
        want = np.zeros_like(dst).reshape(N, H + pt + 3, W + pl + 2, G, CgP)
        want[:, pt:pt + H, pl:pl + W, :, :Cg] = src.reshape(N, G, Cg, H, W).transpose(
            0, 3, 4, 1, 2)
        np.testing.assert_array_equal(dst, want.reshape(dst.shape))


_PROBE = """
import json, numpy as np, fastconv as fc
from fastconv import kernels as k
from fastconv.algorithms import channel_tile as t
x = np.ones((8, 8, 16, 16), np.float32); w = np.ones((32, 8, 3, 3), np.float32)  # channel tile
dy = np.ones((8, 32, 16, 16), np.float32)
fc.conv2d(x, w, padding=1)
fc.conv2d_grad_input(dy, w, x.shape, padding=1)
fc.conv2d_grad_weight(x, dy, w.shape, padding=1)
print(json.dumps({f.__name__: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
                  for f in (t.conv_tiles, t.conv_dw_tiles, k.pack_channels_last)}))
"""


def test_warm_cache_serves_a_new_process(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), FASTCONV_NO_CACHE="0")

    def run():
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    cold = run()
    assert all(misses > 0 and hits == 0 for hits, misses in cold.values()), cold
    warm = run()
    assert all(hits > 0 and misses == 0 for hits, misses in warm.values()), warm


def test_a_missing_parallel_threading_layer_is_named_with_its_fix(monkeypatch):
    from numba.core import config as numba_config

    from fastconv import _jit

    assert _jit.threading_layer_warning() is None or not _jit._parallel_layers("default")
    monkeypatch.setattr(_jit, "_parallel_layers", lambda layer: [])
    monkeypatch.setattr(numba_config, "THREADING_LAYER", "default")
    message = _jit.threading_layer_warning()
    assert "workqueue" in message and "pip install tbb" in message and "libgomp" in message
    monkeypatch.setattr(numba_config, "THREADING_LAYER", "workqueue")  # the user's choice
    assert _jit.threading_layer_warning() is None


# ---- the masked-vector copies of fastconv._jit ------------------------------------------


@numba.njit
def _copy(dst, do, src, so, n):
    _jit.copy_run(dst, do, src, so, n)


@numba.njit
def _split(dst, de, do, src, so, n):
    _jit.split_run(dst, de, do, src, so, n)


@numba.njit
def _merge(dst, do, src, se, so, n):
    _jit.merge_run(dst, do, src, se, so, n)


@numba.njit
def _store_rows(dst, n):
    tile = _jit.stack_tile(2, 16, dst.dtype)
    for u in range(16):
        tile[0, u] = u + 1
        tile[1, u] = -(u + 1)
    _jit.store_row(dst, 3, tile[0], n)
    _jit.store_row(dst, 40, tile[1], n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_copies_touch_exactly_their_elements(dtype):
    """copy_run, split_run and merge_run read and write their first ``n`` elements and
    nothing else (masked loads and stores), at every length around the 16- and 32-element
    blocks; store_row writes the first ``min(n, 16)`` lanes of a tile row."""
    src = np.arange(1, 201, dtype=dtype)
    for n in range(0, 71):
        d = np.zeros(120, dtype)
        _copy(d, 3, src, 2, n)
        want = np.zeros(120, dtype)
        want[3:3 + n] = src[2:2 + n]
        np.testing.assert_array_equal(d, want, err_msg=f"copy_run, n={n}")

        d = np.zeros(120, dtype)
        _split(d, 1, 60, src, 3, n)  # even elements to d[1:], odd to d[60:]
        want = np.zeros(120, dtype)
        want[1:1 + (n + 1) // 2] = src[3:3 + n:2]
        want[60:60 + n // 2] = src[4:3 + n:2]
        np.testing.assert_array_equal(d, want, err_msg=f"split_run, n={n}")

        d = np.zeros(120, dtype)
        _merge(d, 2, src, 3, 100, n)  # d[2:2+n] from src[3:] (even) and src[100:] (odd)
        want = np.zeros(120, dtype)
        want[2:2 + n:2] = src[3:3 + (n + 1) // 2]
        want[3:2 + n:2] = src[100:100 + n // 2]
        np.testing.assert_array_equal(d, want, err_msg=f"merge_run, n={n}")
    for n in (0, 1, 14, 16, 20):
        d = np.zeros(80, dtype)
        _store_rows(d, n)
        want = np.zeros(80, dtype)
        m = min(n, 16)
        want[3:3 + m] = np.arange(1, m + 1)
        want[40:40 + m] = -np.arange(1, m + 1)
        np.testing.assert_array_equal(d, want, err_msg=f"store_row, n={n}")


@numba.njit
def _load_split(out, src, so, lanes):
    tile = _jit.stack_tile(2, 16, out.dtype)
    _jit.load_split(tile[0], tile[1], src, so, lanes)
    for u in range(16):
        out[0, u] = tile[0, u]
        out[1, u] = tile[1, u]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_split_reads_exactly_the_masked_elements_into_two_registers(dtype):
    """load_split: even and odd elements of 32 from ``so``, each only where its bit is set
    (else 0), also where the unset elements lie outside the array."""
    src = np.arange(1, 41, dtype=dtype)
    rng = np.random.default_rng(0)
    for so, lanes in [(0, (1 << 32) - 1), (8, (1 << 32) - 1), (3, 0b1011), (-1, (1 << 32) - 2),
                      (20, (1 << 20) - 1), (0, 0), *((0, int(m)) for m in rng.integers(
                          0, 1 << 32, 5))]:
        out = np.full((2, 16), -7, dtype)
        _load_split(out, src, so, lanes)
        want = np.array([src[so + v] if lanes >> v & 1 else 0 for v in range(32)], dtype)
        np.testing.assert_array_equal(out[0], want[0::2], err_msg=f"{so}, {lanes:b}")
        np.testing.assert_array_equal(out[1], want[1::2], err_msg=f"{so}, {lanes:b}")


@numba.njit
def _interleave(dst, do, src, so, ss, n):
    _jit.interleave_run(dst, do, src, so, ss, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_interleave_run_writes_exactly_its_pixels_channel_minor(dtype):
    """interleave_run puts ``n`` pixels of eight planes into pixel-major order, eight
    channels a pixel, and touches nothing else, at every length around its 16-pixel
    blocks."""
    src = np.arange(1, 8 * 50 + 1, dtype=dtype)
    for n in range(0, 40):
        d = np.zeros(8 * 40 + 10, dtype)
        _interleave(d, 5, src, 3, 50, n)
        want = np.zeros_like(d)
        for u, r in itertools.product(range(n), range(8)):
            want[5 + 8 * u + r] = src[3 + r * 50 + u]
        np.testing.assert_array_equal(d, want, err_msg=f"n={n}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("apart", [0, 2048, 4000])
def test_empty_apart_places_the_output_at_its_page_offset_from_the_input(apart, dtype,
                                                                        monkeypatch):
    from fastconv import config
    from fastconv.layouts import empty_apart

    monkeypatch.setattr(config, "APART_BYTES", apart)
    for skew in range(0, 4096, 464):
        buf = np.zeros(3000, dtype)
        other = buf[skew // buf.itemsize:]
        a = empty_apart((3, 5, 7), dtype, other)
        assert a.shape == (3, 5, 7) and a.dtype == dtype
        assert a.flags.c_contiguous and a.flags.writeable
        want = apart - apart % a.itemsize
        assert (a.ctypes.data - other.ctypes.data) % 4096 == want
        a[...] = 1  # every element inside its buffer
        assert a.sum() == 105
