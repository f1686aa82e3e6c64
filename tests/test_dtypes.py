"""Every public array function normalises dtypes and byte order the same way: float16 is
computed as float32, integer and bool arrays as float64, big-endian arrays as native ones.
Each result must equal the one from the same values given in that native dtype."""

import numpy as np
import pytest

import fastconv as fc
from fastconv import pool
from fastconv.linalg import matmul

# (given dtype, the dtype it is computed and returned in)
DTYPES = [
    (np.dtype(np.float16), np.dtype(np.float32)),
    (np.dtype(">f4"), np.dtype(np.float32)),
    (np.dtype(">f8"), np.dtype(np.float64)),
    (np.dtype(np.int32), np.dtype(np.float64)),
    (np.dtype(">i8"), np.dtype(np.float64)),
    (np.dtype(np.uint8), np.dtype(np.float64)),
    (np.dtype(np.bool_), np.dtype(np.float64)),
]

# Integer and bool input warns (tests/test_functional.py checks it); here it is expected.
pytestmark = pytest.mark.filterwarnings("ignore:fastconv computes integer and bool arrays")

rng = np.random.default_rng(7)


def _values(shape):
    """Small non-negative integers: exact in every dtype above (0 and 1 only, for bool)."""
    return rng.integers(0, 4, shape)


X = _values((2, 4, 9, 8))
W = _values((6, 2, 3, 3))
B = _values(6)
CONV = dict(stride=(2, 1), padding=1, dilation=1, groups=2)
DY = _values(fc.conv2d(X.astype(float), W.astype(float), **CONV).shape)
PX = _values((2, 3, 6, 6))
PDY = _values((2, 3, 3, 3))
_, IDX = pool.max_pool2d(PX.astype(float), 2, return_indices=True)

# Each public function with its array arguments (the ones the dtype is applied to) and
# the others.
CALLS = {
    "conv2d": (fc.conv2d, dict(input=X, weight=W, bias=B), CONV),
    "conv2d_grad_input": (fc.conv2d_grad_input, dict(grad_output=DY, weight=W),
                          dict(input_shape=X.shape, **CONV)),
    "conv2d_grad_weight": (fc.conv2d_grad_weight, dict(input=X, grad_output=DY),
                           dict(weight_shape=W.shape, **CONV)),
    "conv2d_grad_bias": (fc.conv2d_grad_bias, dict(grad_output=DY), {}),
    "max_pool2d": (pool.max_pool2d, dict(input=PX), dict(kernel_size=2)),
    "max_pool2d_backward": (pool.max_pool2d_backward, dict(grad_output=PDY),
                            dict(indices=IDX, input_shape=PX.shape)),
    "avg_pool2d": (pool.avg_pool2d, dict(input=PX), dict(kernel_size=3, stride=1, padding=1)),
    "avg_pool2d_backward": (pool.avg_pool2d_backward, dict(grad_output=PDY),
                            dict(input_shape=PX.shape, kernel_size=2)),
    "matmul": (matmul, dict(a=_values((7, 5)), b=_values((5, 130))), {}),
    "conv1d": (fc.conv1d, dict(input=X[..., 0], weight=W[..., 0], bias=B),
               dict(stride=2, padding=1, groups=2)),
    "conv_transpose2d": (fc.conv_transpose2d, dict(input=DY, weight=W, bias=B[:4]), CONV),
    "linear": (fc.linear, dict(input=_values((3, 5)), weight=_values((70, 5)), bias=_values(70)),
               {}),
}


def _bool_safe(a, dtype):
    """``a`` in ``dtype``; for bool, values 0 and 1 (so the native twin holds the same)."""
    return (a % 2).astype(dtype) if dtype == np.bool_ else a.astype(dtype)


@pytest.mark.parametrize("given, computed", DTYPES, ids=[d.str for d, _ in DTYPES])
@pytest.mark.parametrize("name", list(CALLS))
def test_every_array_argument_in_every_dtype(name, given, computed):
    f, arrays, rest = CALLS[name]
    got = f(**{k: _bool_safe(v, given) for k, v in arrays.items()}, **rest)
    want = f(**{k: _bool_safe(v, given).astype(computed) for k, v in arrays.items()}, **rest)
    assert got.dtype == computed and got.dtype.isnative
    np.testing.assert_array_equal(got, want)
    assert np.any(want), "a test whose answer is all zeros could not tell dtypes apart"


@pytest.mark.parametrize("given, computed", DTYPES, ids=[d.str for d, _ in DTYPES])
@pytest.mark.parametrize("name", ["conv2d", "conv2d_grad_weight", "matmul"])
def test_one_argument_in_another_dtype(name, given, computed):
    """Mixed with float32, the other argument's dtype decides: float32 stays float32 only
    beside float16/float32."""
    f, arrays, rest = CALLS[name]
    first, *others = arrays
    args = {k: (_bool_safe(v, given) if k == first else _bool_safe(v, np.float32))
            for k, v in arrays.items()}
    got = f(**args, **rest)
    want = f(**{k: v.astype(computed) for k, v in args.items()}, **rest)
    assert got.dtype == computed and got.dtype.isnative
    np.testing.assert_array_equal(got, want)


def test_big_endian_indices():
    dx = pool.max_pool2d_backward(PDY.astype(float), IDX.astype(">i8"), PX.shape)
    np.testing.assert_array_equal(dx, pool.max_pool2d_backward(PDY.astype(float), IDX,
                                                               PX.shape))


@pytest.mark.parametrize("name", list(CALLS))
def test_complex_and_strings_are_refused(name):
    f, arrays, rest = CALLS[name]
    first = next(iter(arrays))
    for bad in (arrays[first].astype(complex), np.full(arrays[first].shape, "a")):
        with pytest.raises(TypeError, match=f"{first} must be a real numeric array"):
            f(**{**arrays, first: bad}, **rest)


@pytest.mark.parametrize("given, computed", DTYPES, ids=[d.str for d, _ in DTYPES])
def test_relu_and_linear_follow_the_same_rules(given, computed):
    """ReLU keeps no dtype of its own (a big-endian float32 input used to become float64);
    Linear's float32 weights stay float32 beside float16/float32 input only."""
    from fastconv import nn

    x = _bool_safe(X, given) if given.kind in "ub" else (X - 1).astype(given)  # negatives
    assert x.dtype == given
    y = nn.ReLU()(x)
    assert y.dtype == computed and y.dtype.isnative
    np.testing.assert_array_equal(y, np.maximum(x.astype(computed), 0))
    lin = nn.Linear(8, 3, rng=0)
    got = lin(x.reshape(-1, 8))
    assert got.dtype == computed and got.dtype.isnative
    np.testing.assert_array_equal(got, lin(x.reshape(-1, 8).astype(computed)))
