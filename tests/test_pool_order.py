"""Pool order: a convolution writing its output as the 2x2 max pool after it reads it
(``conv2d_saving(..., pool_order=True)``), the pool and its backward on that layout."""

import re

import numpy as np
import pytest

from fastconv import conv, nn, pool
from fastconv import reference as ref

# (input shape, weight shape, conv kwargs): the pixel path (C <= 4, stride 1) and the
# channel tile (strided too), odd input sizes, padding and dilation, K off the tiles.
CASES = [
    ((3, 1, 28, 28), (32, 1, 5, 5), dict(padding=2)),  # conv1 of two_conv
    ((2, 3, 12, 12), (5, 3, 3, 3), dict(padding=(1, 0))),
    ((2, 2, 14, 15), (17, 2, 2, 4), dict(padding=1, dilation=(2, 1))),
    ((2, 4, 10, 10), (40, 4, 3, 3), dict(padding="same")),
    ((3, 32, 14, 14), (64, 32, 5, 5), dict(padding=2)),  # conv2 of two_conv
    ((2, 8, 9, 13), (33, 8, 2, 4), dict()),
    ((2, 6, 17, 18), (6, 6, 3, 3), dict(stride=2, padding=1, dilation=2)),
    ((2, 64, 8, 8), (64, 32, 3, 3), dict(padding=1, groups=2)),  # groups the tile runs
]


# The parallel kernels' paths, on small shapes: not the serial kernels of small problems.
pytestmark = pytest.mark.usefixtures("parallel_paths")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs, ws, kw", CASES)
def test_pool_order_output_is_the_nchw_output_reordered(xs, ws, kw, dtype, rng):
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    y4, saved, geo = conv.conv2d_saving(x, w, b, **kw, pool_order=True)
    assert geo.OH % 2 == 0 and geo.OW % 2 == 0
    assert y4.shape == (xs[0], ws[0], 4, geo.OH * geo.OW // 4) and y4.dtype == dtype
    # The channel tile's planes are its ordinary output reordered, to the bit; the pixel
    # path's taps run in the same order as without pool order, so the same there too.
    want = conv.conv2d(x, w, b, **kw)
    np.testing.assert_array_equal(conv.from_pool_order(y4, geo.OH, geo.OW), want)
    np.testing.assert_array_equal(conv.to_pool_order(want), y4)
    want64 = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64),
                                b.astype(np.float64), (geo.sh, geo.sw), geo.pads,
                                (geo.dlh, geo.dlw), geo.G)
    tol = 1e-10 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(want, want64, rtol=tol, atol=tol)
    assert isinstance(saved, conv.PixelInput) == conv._pixel_ok(geo)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs, ws, kw", [c for c in CASES if c[0][1] <= 4])
def test_pool_order_pixel_backward_matches_the_functional_gradients(xs, ws, kw, dtype, rng):
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    y4, px, geo = conv.conv2d_saving(x, w, None, **kw, pool_order=True)
    dy4 = rng.standard_normal(y4.shape).astype(dtype)
    dsum = dy4.astype(np.float64).sum(axis=(2, 3))
    # The pool's unexpanded form of the same deltas: one window position per pixel.
    sel = rng.integers(0, 4, (*y4.shape[:2], y4.shape[3])).astype(np.int8)
    g = rng.standard_normal(sel.shape).astype(dtype)
    pooled = conv.PooledDeltas(g, sel)
    np.testing.assert_array_equal(pooled.expand().sum(axis=2), g)
    for deltas, given in [(dy4, None), (dy4, dsum), (pooled, None),
                          (pooled, g.astype(np.float64).sum(axis=2))]:
        dense = deltas if isinstance(deltas, np.ndarray) else deltas.expand()
        dy = conv.from_pool_order(dense, geo.OH, geo.OW)
        dx, dw, db = conv.backward_pool_order(px, geo, w, deltas, True, given)
        tol = 1e-10 if dtype == np.float64 else 2e-4
        np.testing.assert_allclose(dw, conv.conv2d_grad_weight(x, dy, w.shape, **kw),
                                   rtol=tol, atol=tol)
        np.testing.assert_allclose(dx, conv.conv2d_grad_input(dy, w, x.shape, **kw),
                                   rtol=tol, atol=tol)
        np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3)), rtol=tol, atol=tol)
        assert dw.dtype == db.dtype == dx.dtype == dtype
    assert conv.backward_pool_order(px, geo, w, dy4, False)[0] is None
    assert conv.backward_pool_order(px, geo, w, pooled, False)[0] is None


@pytest.mark.parametrize("xs, ws, kw", [
    ((2, 3, 11, 11), (5, 3, 3, 3), dict(padding=1)),  # odd output
    ((2, 1, 40, 40), (4, 1, 3, 3), dict(stride=2, padding=1)),  # pixel path, strided
    ((2, 1, 6, 6), (4, 1, 3, 3), dict(padding=1)),  # planes of 9 pixels, under a vector
    ((0, 8, 6, 6), (4, 8, 3, 3), dict(padding=1)),  # no batch
    ((2, 8, 12, 12), (12, 4, 3, 3), dict(padding=1, groups=2)),  # grouped: NCHW forward
    ((2, 32, 12, 12), (32, 1, 3, 3), dict(padding=1, groups=32)),  # depthwise likewise
])
def test_pool_order_refuses_what_it_cannot_lay_out(xs, ws, kw):
    x, w = np.zeros(xs, np.float32), np.zeros(ws, np.float32)
    geo = conv.conv_geometry(xs, ws, **kw)
    assert not conv.pool_order_ok(geo)
    with pytest.raises(ValueError, match=re.escape(f"got input {xs}, weight {ws}, output "
                                                   f"{geo.OH}x{geo.OW}")):
        conv.conv2d_saving(x, w, **kw, pool_order=True)
    with pytest.raises(ValueError, match="pool_order needs a batch"):
        conv.conv2d_saving(np.zeros((8, 6, 6), np.float32), np.zeros((4, 8, 3, 3), np.float32),
                           padding=1, pool_order=True)


def _planes(x):
    """NCHW x (even sizes) in pool order, and its shape."""
    return conv.to_pool_order(x), x.shape


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_planes_pool_is_relu_of_the_max_pool_with_its_ties_and_nans(dtype, rng):
    x = rng.standard_normal((3, 5, 8, 6)).astype(dtype)
    x[0, 0, :2, :2] = 1.5  # a tie: the first (top left) wins
    x[0, 1, 2:4, 0:2] = [[0.5, np.nan], [np.nan, 7.0]]  # the first NaN wins
    x[1, 2, 4:6, 2:4] = [[-1.0, -2.0], [-0.5, -3.0]]  # all negative: ReLU gives 0
    x[2, 3, 0:2, 4:6] = [[np.inf, 1.0], [2.0, 3.0]]
    layer = nn.MaxPool2d(2)
    y4, shape = _planes(x)
    out = layer.forward_pool_order(y4, shape)
    want, idx = pool.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(out, np.where(want > 0, want, np.where(np.isnan(want),
                                                                       want, 0)))
    # The window position of each maximum is that of the flat index.
    d = layer._saved[0]
    h, w = np.divmod(idx, shape[3])
    np.testing.assert_array_equal(d, 2 * (h % 2) + w % 2)
    assert np.isnan(out[0, 1, 1, 0]) and d[0, 1, 1, 0] == 1


def test_planes_pool_backward_routes_like_the_nchw_pool(rng):
    x = rng.standard_normal((2, 6, 10, 12)).astype(np.float32)
    dy = rng.standard_normal((2, 6, 5, 6)).astype(np.float32)
    nchw, planes = nn.MaxPool2d(2), nn.MaxPool2d(2)
    y = nchw.forward_after_relu(x)
    np.testing.assert_array_equal(planes.forward_pool_order(*_planes(x)), y)
    want = nchw.backward(dy)
    np.testing.assert_array_equal(planes.backward(dy), want)
    # In pool order for a pixel-path convolution, with the per-image channel sums ...
    layout = conv.PoolOrderLayout((2, 6, 4, 30))
    pooled, dsum = planes.backward_packed(dy, layout)
    assert pooled.g.shape == pooled.sel.shape == (2, 6, 30)
    np.testing.assert_array_equal(pooled.expand(), conv.to_pool_order(want))
    np.testing.assert_allclose(dsum, want.astype(np.float64).sum(axis=(2, 3)), rtol=1e-12)
    # ... and channels-last for the channel tile, as after the NCHW pool.
    layer = nn.Conv2d(3, 6, 3, padding=1, rng=np.random.default_rng(0))
    layer(rng.standard_normal((2, 3, 10, 12)).astype(np.float32))
    packed = layer.delta_layout()
    np.testing.assert_array_equal(planes.backward_packed(dy, packed)[0],
                                  nchw.backward_packed(dy, packed)[0])
    with pytest.raises(ValueError, match=re.escape("backward got grad_output of shape "
                                                   "(2, 6, 5, 5), but the forward output "
                                                   "had shape (2, 6, 5, 6)")):
        planes.backward(dy[..., :5])


def test_two_conv_network_runs_both_convolutions_in_pool_order(rng):
    from fastconv import models
    model = models.two_conv(seed=0)
    model[0].needs_input_grad = False
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    out = model(x)
    pools = [layer for layer in model.layers if isinstance(layer, nn.MaxPool2d)]
    assert [p._saved[3] for p in pools] == [True, True]
    assert isinstance(model[0].delta_layout(), conv.PoolOrderLayout)
    assert isinstance(model[3].delta_layout(), conv.DeltaLayout)  # the channel tile
    model.backward(np.ones_like(out))
    # Evaluation runs pool order as well, and keeps nothing.
    model.eval()
    np.testing.assert_allclose(model(x), out, rtol=1e-6, atol=1e-6)
    assert all(p._saved is None for p in pools)
