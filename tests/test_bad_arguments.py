"""Every public constructor and function refuses bad arguments with a ValueError or
TypeError whose message names the argument.

One table: for each callable, arguments that work (checked by ``test_good_arguments``) and
the bad values to put in, one at a time, with the exception type expected and the name
the message must contain.  Bad values: zero, negative, NaN, inf, a string, a float for an
int, a bool for an int or a number, None where a value is required, and values that
break a rule between arguments.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
from test_data import write_dataset

import fastconv as fc
from fastconv import data, models, nn, ops, optim, pool, train
from fastconv.linalg import matmul

NAN, INF = float("nan"), float("inf")
class _Placeholder:
    """A stand-in for a path that exists only inside a test, named in the test ids (an
    ``object()`` there would put its address in them, which differs between processes)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


TOY = _Placeholder("TOY")  # stands for the folder of a small dataset (the toy_dir fixture)
TOY_FILE = _Placeholder("TOY_FILE")  # and for one IDX file in it

X = np.zeros((2, 4, 9, 8))
W = np.zeros((6, 2, 3, 3))
DY = np.zeros((2, 6, 7, 6))
PX = np.zeros((2, 3, 6, 6))
PDY = np.zeros((2, 3, 3, 3))
IDX = np.zeros((2, 3, 3, 3), np.int32)
PARAMS = models.tiny_net(seed=0).parameters()
STEP = dict(stride=1, padding=0, dilation=1, groups=2)


def _forward(layer, x):
    """A freshly built ``layer`` (a callable) run on ``x``."""
    return layer()(x)


def _backward(layer, x, grad_output):
    """``layer()`` run forward on ``x``, then backward on ``grad_output``."""
    m = layer()
    m(x)
    return m.backward(grad_output)


def _sequential(layers):
    return nn.Sequential(*layers)


def _loss(reduction="mean", logits=None, labels=None):
    return nn.SoftmaxCrossEntropy(reduction)(logits, labels)


_PLAN = fc.conv2d_plan(X.shape, W.shape, **STEP, dtype=np.float64)


def _plan_forward(input, weight):
    return _PLAN.forward(input, weight)


def _evaluate(batch_size):
    return train.evaluate(models.tiny_net(seed=0), np.zeros((3, 28, 28), np.uint8),
                          np.zeros(3, np.int64), batch_size=batch_size)


# Bad values shared by many arguments: (value, exception).  Ints >= 1 / >= 0, ints or
# (h, w) pairs >= 1 / >= 0, finite numbers >= 0, flags.
NOT_INT = [(NAN, TypeError), (INF, TypeError), (2.0, TypeError), (True, TypeError),
           (None, TypeError), ("2", TypeError)]
POSITIVE_INT = [(0, ValueError), (-1, ValueError), *NOT_INT]
NON_NEGATIVE_INT = [(-1, ValueError), *NOT_INT]
POSITIVE_PAIR = [*POSITIVE_INT, ((1, 0), ValueError), ((1, 2, 3), TypeError),
                 ((1, NAN), TypeError), (2**40, ValueError)]
NON_NEGATIVE_PAIR = [*NON_NEGATIVE_INT, ((0, -1), ValueError), ((1, 2, 3), TypeError)]
NON_NEGATIVE_REAL = [(-1, ValueError), (-1e-9, ValueError), (NAN, ValueError),
                     (INF, ValueError), (-INF, ValueError), ("0.1", TypeError),
                     (None, TypeError), (True, TypeError), ([0.1], TypeError),
                     (1 + 0j, TypeError)]
FLAG = [("yes", TypeError), (1, TypeError), (None, TypeError), (0.0, TypeError)]
SEED = [(-1, ValueError), ("x", TypeError), (1.5, TypeError), (True, TypeError)]
DTYPE = [("foo", TypeError), (np.int32, TypeError), (np.float16, TypeError),
         (np.complex64, TypeError), (None, TypeError), (">f4", TypeError)]
ARRAY4 = [(None, TypeError), ("abc", TypeError), (np.zeros((2, 3)), ValueError),
          (np.zeros((2, 2), complex), TypeError), (np.zeros((1, 1, 1, 1), object), TypeError)]
SHAPE4 = [(None, TypeError), (5, TypeError), ((2, 4, 9), ValueError),
          ((2, 4, -9, 8), ValueError), ((2.0, 4, 9, 8), ValueError), ("abcd", ValueError)]


# padding may also be 'valid' or 'same': another string is a bad value, not a bad type
CONV_PADDING = [(v, ValueError if isinstance(v, str) else e) for v, e in NON_NEGATIVE_PAIR]


def _conv_args():
    return [("stride", POSITIVE_PAIR),
            ("padding", CONV_PADDING + [("full", ValueError), (b"same", TypeError)]),
            ("dilation", POSITIVE_PAIR), ("groups", POSITIVE_INT + [(3, ValueError)])]


# conv1d's stride, padding and dilation: an int or a tuple of one int.
POSITIVE_SINGLE = [*POSITIVE_INT, ((1, 2), TypeError), ((0,), ValueError), ((2.0,), TypeError),
                   (2**40, ValueError)]
NON_NEGATIVE_SINGLE = [*NON_NEGATIVE_INT, ((-1,), ValueError), ((1, 2), TypeError)]
SHAPE3 = [(None, TypeError), (5, TypeError), ((2, 4), ValueError), ((2, 4, -9), ValueError),
          ((2.0, 4, 9), ValueError), ("abc", ValueError), (np.zeros((2, 4, 9)), TypeError)]


def _conv1d_args():
    padding = [(v, ValueError if isinstance(v, str) else e) for v, e in NON_NEGATIVE_SINGLE]
    return [("stride", POSITIVE_SINGLE),
            ("padding", padding + [("full", ValueError), (b"same", TypeError)]),
            ("dilation", POSITIVE_SINGLE), ("groups", POSITIVE_INT + [(3, ValueError)])]


# conv_transpose2d's input (C_in = 4) and weight (C_in, C_out/groups, R, S), C_out = 6.
XT = np.zeros((2, 4, 5, 5))
WT = np.zeros((4, 3, 3, 3))
TSTEP = dict(stride=1, padding=0, output_padding=0, groups=2, dilation=1)


def _transpose_args():
    return [("stride", POSITIVE_PAIR), ("padding", NON_NEGATIVE_PAIR + [("same", TypeError)]),
            ("output_padding", NON_NEGATIVE_PAIR + [(1, ValueError), ((0, 1), ValueError)]),
            ("dilation", POSITIVE_PAIR), ("groups", POSITIVE_INT + [(3, ValueError)])]


def _pool_args():
    return [("kernel_size", POSITIVE_PAIR),
            ("stride", [(v, e) for v, e in POSITIVE_PAIR if v is not None]),  # None: default
            ("padding", NON_NEGATIVE_PAIR + [(2, ValueError)])]


def _dataset_args():
    return [("name", [(1, TypeError), (None, TypeError), ("cifar", ValueError),
                      ("MNIST", ValueError)]),
            ("data_dir", [(5, TypeError), ([TOY], TypeError)]),
            ("download", FLAG),
            ("timeout", [(0, ValueError), (-1, ValueError), (NAN, ValueError),
                         (INF, ValueError), ("30", TypeError), (None, TypeError),
                         (True, TypeError)]),
            ("split", [("train", ValueError), (None, ValueError), (1, ValueError)])]


class Spec(NamedTuple):
    """A callable, arguments that work, and per argument the bad values to try."""

    label: str
    call: object
    good: dict
    bad: list  # [(argument, [(value, exception) or (value, exception, name), ...])]
    name: dict = {}  # argument -> the text naming it in messages, if not the argument


SPECS = [
    # ---- the functional API -----------------------------------------------------------
    Spec("conv2d", fc.conv2d, dict(input=X, weight=W, bias=np.zeros(6), **STEP), [
        ("input", ARRAY4 + [(np.zeros((2, 3, 9, 8)), ValueError),
                            (np.zeros((2, 4, 0, 8)), ValueError),
                            (np.zeros((2, 4, 2, 2)), ValueError)]),
        ("weight", ARRAY4 + [(np.zeros((6, 2, 3)), ValueError),
                             (np.zeros((0, 2, 3, 3)), ValueError),
                             (np.zeros((6, 2, 0, 3)), ValueError)]),
        ("bias", [("x", TypeError), (np.zeros(5), ValueError), (np.zeros((6, 1)), ValueError),
                  (np.zeros(6, complex), TypeError)]),
        *_conv_args()]),
    Spec("conv2d_grad_input", fc.conv2d_grad_input,
         dict(grad_output=DY, weight=W, input_shape=X.shape, **STEP), [
             ("grad_output", ARRAY4 + [(DY[:, :5], ValueError), (DY[:1], ValueError)]),
             ("weight", ARRAY4), ("input_shape", SHAPE4), *_conv_args()]),
    Spec("conv2d_grad_weight", fc.conv2d_grad_weight,
         dict(input=X, grad_output=DY, weight_shape=W.shape, **STEP), [
             ("input", ARRAY4), ("grad_output", ARRAY4 + [(DY[..., :5], ValueError)]),
             ("weight_shape", SHAPE4 + [((6, 4, 3, 3), ValueError, "weight shape (6, 4, 3, 3)")]),
             *_conv_args()]),
    Spec("conv2d_grad_bias", fc.conv2d_grad_bias, dict(grad_output=DY), [
        ("grad_output", ARRAY4 + [(np.zeros((2, 6, 7)), ValueError)])]),
    Spec("conv1d", fc.conv1d, dict(input=X[..., 0], weight=W[..., 0], bias=np.zeros(6), **STEP),
         [("input", ARRAY4 + [(np.zeros((2, 3, 9)), ValueError), (X, ValueError),
                              (np.zeros((2, 4, 2)), ValueError)]),
          ("weight", ARRAY4 + [(W, ValueError), (np.zeros((6, 2, 0)), ValueError)]),
          ("bias", [("x", TypeError), (np.zeros(5), ValueError)]), *_conv1d_args()]),
    Spec("conv1d_grad_input", fc.conv1d_grad_input,
         dict(grad_output=DY[..., 0], weight=W[..., 0], input_shape=X.shape[:3], **STEP), [
             ("grad_output", ARRAY4 + [(DY[:, :5, :, 0], ValueError), (DY, ValueError)]),
             ("weight", ARRAY4), ("input_shape", SHAPE3), *_conv1d_args()]),
    Spec("conv1d_grad_weight", fc.conv1d_grad_weight,
         dict(input=X[..., 0], grad_output=DY[..., 0], weight_shape=W.shape[:3], **STEP), [
             ("input", ARRAY4), ("grad_output", ARRAY4 + [(DY[:, :, :5, 0], ValueError)]),
             ("weight_shape", SHAPE3 + [((6, 4, 3), ValueError, "weight shape (6, 4, 3)")]),
             *_conv1d_args()]),
    Spec("conv_transpose2d", fc.conv_transpose2d,
         dict(input=XT, weight=WT, bias=np.zeros(6), **TSTEP), [
             ("input", ARRAY4 + [(np.zeros((2, 3, 5, 5)), ValueError),
                                 (np.zeros((2, 4, 0, 5)), ValueError)]),
             ("weight", ARRAY4 + [(np.zeros((4, 3, 3)), ValueError)]),
             ("bias", [("x", TypeError), (np.zeros(4), ValueError)]), *_transpose_args()]),
    Spec("conv_transpose2d_grad_input", fc.conv_transpose2d_grad_input,
         dict(grad_output=np.zeros((2, 6, 7, 7)), weight=WT, input_shape=XT.shape, **TSTEP), [
             ("grad_output", ARRAY4 + [(np.zeros((2, 6, 7, 6)), ValueError)]),
             ("weight", ARRAY4), ("input_shape", SHAPE4), *_transpose_args()]),
    Spec("conv_transpose2d_grad_weight", fc.conv_transpose2d_grad_weight,
         dict(input=XT, grad_output=np.zeros((2, 6, 7, 7)), weight_shape=WT.shape, **TSTEP), [
             ("input", ARRAY4), ("grad_output", ARRAY4 + [(np.zeros((2, 4, 7, 7)), ValueError)]),
             ("weight_shape", SHAPE4), *_transpose_args()]),
    Spec("linear", fc.linear, dict(input=np.zeros((2, 5)), weight=np.zeros((3, 5)),
                                   bias=np.zeros(3)), [
        ("input", [(None, TypeError), ("abc", TypeError), (np.zeros((2, 4)), ValueError),
                   (np.zeros((2, 5), complex), TypeError)]),
        ("weight", [(None, TypeError), (np.zeros(5), ValueError), (np.zeros((3, 4)), ValueError),
                    (np.zeros((3, 5), object), TypeError)]),
        ("bias", [("x", TypeError), (np.zeros(4), ValueError), (np.zeros((3, 1)), ValueError)])]),
    Spec("functional.relu", fc.relu, dict(input=X, inplace=False), [
        ("input", ARRAY4[:2] + ARRAY4[3:]), ("inplace", FLAG)]),
    Spec("functional.max_pool2d", fc.max_pool2d,
         dict(input=PX, kernel_size=2, stride=None, padding=0, dilation=1, ceil_mode=False,
              return_indices=False), [
             ("input", ARRAY4 + [(np.zeros((2, 3, 1, 6)), ValueError)]), *_pool_args(),
             ("dilation", POSITIVE_PAIR + [(2, ValueError)]),
             ("ceil_mode", FLAG + [(True, ValueError)]), ("return_indices", FLAG)]),
    Spec("functional.avg_pool2d", fc.avg_pool2d,
         dict(input=PX, kernel_size=2, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True, divisor_override=None), [
             ("input", ARRAY4 + [(np.zeros((2, 3, 1, 6)), ValueError)]), *_pool_args(),
             ("ceil_mode", FLAG + [(True, ValueError)]),
             ("count_include_pad", FLAG + [(False, ValueError)]),
             ("divisor_override", [(3, ValueError), (0, ValueError)])]),
    Spec("conv_geometry", fc.conv_geometry,
         dict(input_shape=X.shape, weight_shape=W.shape, **STEP), [
             ("input_shape", SHAPE4), ("weight_shape", SHAPE4), *_conv_args()]),
    Spec("conv_output_size", fc.conv_output_size,
         dict(size=9, kernel=3, stride=1, pad_lo=1, pad_hi=1, dilation=1), [
             ("size", NON_NEGATIVE_INT), ("kernel", POSITIVE_INT), ("stride", POSITIVE_INT),
             ("pad_lo", NON_NEGATIVE_INT), ("pad_hi", NON_NEGATIVE_INT),
             ("dilation", POSITIVE_INT)]),
    Spec("set_num_threads", fc.set_num_threads, dict(n=fc.get_num_threads()), [
        ("n", POSITIVE_INT + [(10**6, ValueError)])], dict(n="number of threads")),
    Spec("set_winograd", fc.set_winograd, dict(flag=fc.get_winograd()), [("flag", FLAG)],
         dict(flag="set_winograd")),
    Spec("max_pool2d", pool.max_pool2d,
         dict(input=PX, kernel_size=2, stride=None, padding=0, return_indices=False), [
             ("input", ARRAY4 + [(np.zeros((2, 3, 1, 6)), ValueError)]), *_pool_args(),
             ("return_indices", FLAG)]),
    Spec("max_pool2d_backward", pool.max_pool2d_backward,
         dict(grad_output=PDY, indices=IDX, input_shape=PX.shape), [
             ("grad_output", ARRAY4),
             ("indices", [(IDX.astype(float), TypeError), (IDX[:1], ValueError),
                          (IDX - 1, ValueError), (IDX + 36, ValueError), (None, TypeError)]),
             ("input_shape", SHAPE4 + [((1, 3, 6, 6), ValueError)])]),
    Spec("avg_pool2d", pool.avg_pool2d, dict(input=PX, kernel_size=2, stride=None, padding=0),
         [("input", ARRAY4 + [(np.zeros((2, 3, 6, 1)), ValueError)]), *_pool_args()]),
    Spec("avg_pool2d_backward", pool.avg_pool2d_backward,
         dict(grad_output=PDY, input_shape=PX.shape, kernel_size=2, stride=None, padding=0), [
             ("grad_output", ARRAY4 + [(PDY[:, :, :2], ValueError)]),
             ("input_shape", SHAPE4), *_pool_args()]),
    Spec("pool_geometry", pool.pool_geometry,
         dict(input_shape=PX.shape, kernel_size=2, stride=None, padding=0), [
             ("input_shape", SHAPE4 + [((2, 3, 1, 1), ValueError)]), *_pool_args()],
         dict(input_shape="input")),  # "input 1x1 ... is smaller than the pooling window"
    Spec("matmul", matmul, dict(a=np.zeros((3, 4)), b=np.zeros((4, 64))), [
        ("a", [(None, TypeError, "a must be"), ("abc", TypeError, "a must be"),
               (np.zeros((3, 4), complex), TypeError, "a must be"),
               (np.zeros(4), ValueError, "a.shape = (4,)"),
               (np.zeros((3, 5)), ValueError, "a.shape = (3, 5)"),
               (np.zeros((1, 3, 4)), ValueError, "a.shape = (1, 3, 4)")]),
        ("b", [(None, TypeError, "b must be"), (np.zeros((4, 64), object), TypeError, "b must be"),
               (np.zeros((5, 64)), ValueError, "b.shape = (5, 64)"),
               (np.zeros(4), ValueError, "b.shape = (4,)")]),
        ("out", [([[0.0] * 64] * 3, TypeError, "out must be a NumPy array"),
                 (np.zeros((3, 63)), ValueError, "shape (3, 64) and dtype float64"),
                 (np.zeros((3, 64), np.float32), ValueError, "got shape (3, 64) and dtype "
                  "float32"),
                 (np.zeros((64, 3)).T, ValueError, "C-contiguous"),
                 (np.broadcast_to(np.ones(64), (3, 64)), ValueError, "writeable")])]),
    Spec("conv2d_plan", fc.conv2d_plan,
         dict(input_shape=X.shape, weight_shape=W.shape, **STEP, dtype=np.float64), [
             ("input_shape", SHAPE4), ("weight_shape", SHAPE4), *_conv_args(),
             ("dtype", DTYPE + [(np.int64, TypeError)]),
             ("algorithm", [(3, TypeError), ("fft", ValueError, "'fft'"),
                            ("winograd-f2x2-5x5", ValueError, "winograd-f2x2-5x5"),
                            ({"backward": "pixel"}, ValueError, "backward")])]),
    Spec("ConvPlan.forward", _plan_forward, dict(input=X, weight=W), [
        ("input", [(None, TypeError), (X.astype(np.float32), TypeError), (X[:1], ValueError),
                   (X.astype(">f8"), TypeError)]),
        ("weight", [(None, TypeError), (W[:3], ValueError), (W.astype(np.float32), TypeError)])]),
    Spec("relu", ops.relu, dict(input=X), [("input", ARRAY4[:2] + ARRAY4[3:])]),
    Spec("relu_backward", ops.relu_backward, dict(dy=X, y=X), [
        ("dy", [(X[:1], ValueError), ("abc", TypeError), (None, TypeError)]),
        ("y", [(None, TypeError), (X.astype(np.int64), TypeError), (X[..., ::2], ValueError)])]),
    Spec("sgd_update", ops.sgd_update,
         dict(param=np.zeros(4), grad=np.zeros(4), buffer=np.zeros(4), lr=0.1, momentum=0.9,
              weight_decay=0.0, nesterov=False, first=True), [
             ("param", [(None, TypeError), (np.zeros(4, np.int64), TypeError),
                        (np.zeros(8)[::2], ValueError)]),
             ("grad", [(np.zeros(3), ValueError)]),
             ("buffer", [(np.zeros(1), ValueError), (np.zeros(4, np.float32), TypeError),
                         (None, ValueError)])]),
    # ---- layers -------------------------------------------------------------------------
    Spec("Conv2d", nn.Conv2d,
         dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=0, dilation=1,
              groups=2, bias=True, rng=0, dtype=np.float32), [
             ("in_channels", POSITIVE_INT + [(2**40, ValueError)]),
             ("out_channels", POSITIVE_INT + [(5, ValueError)]),
             ("kernel_size", POSITIVE_PAIR), *_conv_args(), ("bias", FLAG), ("rng", SEED),
             ("dtype", DTYPE)]),
    Spec("Linear", nn.Linear, dict(in_features=4, out_features=3, bias=True, rng=0,
                                   dtype=np.float64), [
        ("in_features", NON_NEGATIVE_INT), ("out_features", NON_NEGATIVE_INT),
        ("bias", FLAG), ("rng", SEED), ("dtype", DTYPE)]),
    Spec("MaxPool2d", nn.MaxPool2d, dict(kernel_size=2, stride=None, padding=0), _pool_args()),
    Spec("AvgPool2d", nn.AvgPool2d, dict(kernel_size=3, stride=2, padding=1), _pool_args()),
    Spec("Sequential", _sequential, dict(layers=[nn.ReLU(), nn.Flatten()]), [
        ("layers", [([nn.ReLU(), 1], TypeError), ([None], TypeError), ([nn.ReLU], TypeError),
                    ([nn.SoftmaxCrossEntropy()], TypeError)])]),
    Spec("SoftmaxCrossEntropy", nn.SoftmaxCrossEntropy, dict(reduction="sum"), [
        ("reduction", [("none", ValueError), ("MEAN", ValueError), (None, TypeError),
                       (1, TypeError)])]),
    Spec("CrossEntropyLoss", nn.CrossEntropyLoss, dict(reduction="mean"), [
        ("reduction", [("none", ValueError), ("MEAN", ValueError), (None, TypeError),
                       (1, TypeError)])]),
    Spec("Dropout", nn.Dropout, dict(p=0.5, inplace=False, rng=0), [
        ("p", NON_NEGATIVE_REAL + [(1.5, ValueError)]), ("inplace", FLAG), ("rng", SEED)]),
    Spec("BatchNorm2d", nn.BatchNorm2d,
         dict(num_features=3, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
              dtype=np.float32), [
             ("num_features", POSITIVE_INT + [(2**40, ValueError)]),
             ("eps", NON_NEGATIVE_REAL),
             ("momentum", [(v, e) for v, e in NON_NEGATIVE_REAL if v is not None]
              + [(1.5, ValueError)]),
             ("affine", FLAG), ("track_running_stats", FLAG), ("dtype", DTYPE)]),
    # ---- forward and backward with input of the wrong rank, shape or kind ----------------
    Spec("Conv2d.forward", _forward, dict(layer=lambda: nn.Conv2d(4, 6, 3), x=X), [
        ("x", ARRAY4 + [(np.zeros((2, 5, 9, 8)), ValueError), (np.zeros((2, 4, 2, 9)),
                                                               ValueError)])],
        dict(x="input")),
    Spec("Conv2d.backward", _backward,
         dict(layer=lambda: nn.Conv2d(4, 6, 3), x=X, grad_output=DY), [
             ("grad_output", [(DY[:, :, :5], ValueError), (DY[:, :5], ValueError),
                              (DY[0], ValueError), (None, ValueError)])]),
    Spec("ReLU.forward", _forward, dict(layer=nn.ReLU, x=X), [
        ("x", [(None, TypeError), ("abc", TypeError), (X.astype(complex), TypeError)])],
        dict(x="input")),
    Spec("ReLU.backward", _backward, dict(layer=nn.ReLU, x=X, grad_output=X), [
        ("grad_output", [(X[0], ValueError), (X[..., :1], ValueError)])]),
    Spec("MaxPool2d.forward", _forward, dict(layer=lambda: nn.MaxPool2d(2), x=PX), [
        ("x", ARRAY4 + [(np.zeros((2, 3, 1, 1)), ValueError)])], dict(x="input")),
    Spec("MaxPool2d.backward", _backward,
         dict(layer=lambda: nn.MaxPool2d(2), x=PX, grad_output=PDY), [
             ("grad_output", [(PDY[:1], ValueError), (PX, ValueError)])]),
    Spec("AvgPool2d.forward", _forward, dict(layer=lambda: nn.AvgPool2d(2), x=PX), [
        ("x", ARRAY4 + [(np.zeros((2, 3, 1, 6)), ValueError)])], dict(x="input")),
    Spec("AvgPool2d.backward", _backward,
         dict(layer=lambda: nn.AvgPool2d(2), x=PX, grad_output=PDY), [
             ("grad_output", [(PDY[:1], ValueError), (PX, ValueError)])]),
    Spec("Flatten.forward", _forward, dict(layer=nn.Flatten, x=PX), [
        ("x", [(np.float64(1.0), ValueError), (np.zeros(()), ValueError)])], dict(x="input")),
    Spec("Flatten.backward", _backward, dict(layer=nn.Flatten, x=PX, grad_output=np.zeros(
        (2, 108))), [("grad_output", [(PX, ValueError), (np.zeros((2, 107)), ValueError)])]),
    Spec("Linear.forward", _forward, dict(layer=lambda: nn.Linear(4, 3), x=np.zeros((2, 4))), [
        ("x", [(np.zeros((2, 5)), ValueError), (np.zeros(4), ValueError),
               (np.zeros((2, 4), complex), TypeError), (None, TypeError)])], dict(x="input")),
    Spec("Linear.backward", _backward, dict(layer=lambda: nn.Linear(4, 3), x=np.zeros((2, 4)),
                                            grad_output=np.zeros((2, 3))), [
        ("grad_output", [(np.zeros((2, 4)), ValueError), (np.zeros(3), ValueError)])]),
    Spec("Dropout.forward", _forward, dict(layer=lambda: nn.Dropout(0.5, rng=0), x=X), [
        ("x", [(None, TypeError), ("abc", TypeError), (X.astype(complex), TypeError)])],
        dict(x="input")),
    Spec("Dropout.backward", _backward,
         dict(layer=lambda: nn.Dropout(0.5, rng=0), x=X, grad_output=X), [
             ("grad_output", [(X[0], ValueError), (X[:, :2], ValueError),
                              (None, TypeError)])]),
    Spec("BatchNorm2d.forward", _forward, dict(layer=lambda: nn.BatchNorm2d(4), x=X), [
        ("x", ARRAY4 + [(np.zeros((2, 3, 9, 8)), ValueError),
                        (np.zeros((1, 4, 1, 1)), ValueError)])], dict(x="input")),
    Spec("BatchNorm2d.backward", _backward,
         dict(layer=lambda: nn.BatchNorm2d(4), x=X, grad_output=X), [
             ("grad_output", [(X[0], ValueError), (X[:, :2], ValueError),
                              (None, TypeError)])]),
    Spec("Sequential.forward", _forward,
         dict(layer=lambda: nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2)),
              x=np.zeros((2, 4, 10, 10))), [
             ("x", ARRAY4 + [(np.zeros((2, 3, 10, 10)), ValueError)])], dict(x="input")),
    Spec("SoftmaxCrossEntropy.forward", _loss,
         dict(logits=np.zeros((2, 3)), labels=np.array([0, 2])), [
             ("logits", [(np.zeros(3), ValueError), (np.zeros((2, 0)), ValueError),
                         (np.zeros((2, 3, 1)), ValueError), (None, TypeError),
                         (np.zeros((2, 3), complex), TypeError)]),
             ("labels", [(np.array([0, 3]), ValueError), (np.array([-1, 0]), ValueError),
                         (np.array([0.0, 1.0]), ValueError), (np.array([NAN, 0]), ValueError),
                         (np.array([True, False]), ValueError), (np.array([0]), ValueError),
                         (None, ValueError)])]),
    # ---- optimizers ----------------------------------------------------------------------
    Spec("SGD", optim.SGD, dict(params=PARAMS, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                nesterov=True), [
        ("params", [([], ValueError), (None, TypeError), (models.tiny_net(seed=0), TypeError),
                    (PARAMS[0], TypeError), ([np.zeros(3)], TypeError),
                    (np.zeros(3), TypeError)]),
        ("lr", NON_NEGATIVE_REAL), ("momentum", NON_NEGATIVE_REAL + [(0.0, ValueError)]),
        ("weight_decay", NON_NEGATIVE_REAL), ("nesterov", FLAG)]),
    Spec("Adam", optim.Adam, dict(params=PARAMS, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0), [
        ("params", [([], ValueError), (None, TypeError)]), ("lr", NON_NEGATIVE_REAL),
        ("betas", [((0.9,), TypeError), ((0.9, 0.99, 0.9), TypeError), ("ab", TypeError),
                   (None, TypeError), (0.9, TypeError), ((0.9, 1.0), ValueError),
                   ((-0.1, 0.9), ValueError), ((NAN, 0.9), ValueError),
                   ((0.9, INF), ValueError), ((0.9, "x"), TypeError),
                   ((True, 0.9), TypeError)]),
        ("eps", NON_NEGATIVE_REAL), ("weight_decay", NON_NEGATIVE_REAL)]),
    # ---- training ------------------------------------------------------------------------
    Spec("TrainConfig", train.TrainConfig, dict(limit=100), [
        ("dataset", [(1, TypeError), (None, TypeError), ("cifar", ValueError)]),
        ("model", [("resnet", ValueError), (None, TypeError)]),
        ("epochs", POSITIVE_INT), ("batch_size", POSITIVE_INT),
        ("limit", [(v, e) for v, e in POSITIVE_INT if v is not None]),  # None: no limit
        ("lr", [(0, ValueError), *NON_NEGATIVE_REAL]),
        ("optimizer", [("rmsprop", ValueError), (None, TypeError)]),
        ("momentum", NON_NEGATIVE_REAL + [(1.0, ValueError)]),
        ("schedule", [("step", ValueError), (None, TypeError)]),
        ("seed", [(-1, ValueError), (2**63, ValueError), (1.5, TypeError), (None, TypeError),
                  (True, TypeError), ("0", TypeError)])]),
    Spec("train", train.train, dict(cfg=train.TrainConfig(epochs=1, limit=1, batch_size=1),
                                    data_dir=TOY, download=False, quiet=True,
                                    log=lambda *a: None), [
        ("cfg", [(None, TypeError), (dict(epochs=1), TypeError)]),
        ("threads", [(0, ValueError), (10**6, ValueError), (1.0, TypeError)])],
        dict(threads="number of threads")),
    Spec("evaluate", _evaluate, dict(batch_size=2), [("batch_size", POSITIVE_INT)]),
    Spec("two_conv", models.two_conv, dict(seed=0, dtype=np.float32),
         [("seed", SEED), ("dtype", DTYPE)]),
    Spec("tiny_net", models.tiny_net, dict(seed=None, dtype=np.float64),
         [("seed", SEED), ("dtype", DTYPE)]),
    # ---- data ----------------------------------------------------------------------------
    Spec("load_dataset", data.load_dataset,
         dict(name="mnist", data_dir=TOY, download=False, timeout=5, split="test"),
         _dataset_args(), dict(name="dataset")),
    Spec("read_idx", data.read_idx, dict(path=TOY_FILE), [
        ("path", [(None, TypeError), (5, TypeError), (["f"], TypeError)])]),
]

# Cases that set two arguments: (spec label, argument named, kwargs, exception).
PAIRS = [
    ("conv2d", "padding", dict(padding="same", stride=2), ValueError),
    ("Conv2d", "padding", dict(padding="same", stride=2), ValueError),
    ("SGD", "nesterov", dict(nesterov=True, momentum=0.0), ValueError),
    ("MaxPool2d", "padding", dict(kernel_size=(3, 2), padding=(1, 2)), ValueError),
]


class Case(NamedTuple):
    call: object
    kwargs: dict
    exc: type
    name: str  # the message must contain it


def _cases():
    specs = {s.label: s for s in SPECS}
    cases = {}
    for s in SPECS:
        for arg, values in s.bad:
            for value, exc, *name in values:
                case_id = f"{s.label}-{arg}={_short(value)}"
                assert case_id not in cases, case_id
                cases[case_id] = Case(s.call, {**s.good, arg: value}, exc,
                                      name[0] if name else s.name.get(arg, arg))
    for label, name, kwargs, exc in PAIRS:
        s = specs[label]
        cases[f"{label}-{'-'.join(f'{k}={_short(v)}' for k, v in kwargs.items())}"] = Case(
            s.call, {**s.good, **kwargs}, exc, name)
    return cases


def _short(value) -> str:
    if isinstance(value, np.ndarray):
        text = f"array{value.shape}{value.dtype}"
        if value.size and value.dtype.kind in "iuf":
            text += f"[{value.min()}..{value.max()}]"
        return text
    if isinstance(value, nn.Module):
        return type(value).__name__
    if isinstance(value, list) and len(value) > 3:
        return f"list[{len(value)}]"
    text = getattr(value, "__name__", None) or repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


CASES = _cases()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_dataset(folder, n_train=2, n_test=2)
    return folder


def _resolve(kwargs, toy_dir):
    """``kwargs`` with TOY and TOY_FILE (also inside a list) replaced by real paths."""
    paths = {id(TOY): toy_dir, id(TOY_FILE): toy_dir / "t10k-labels-idx1-ubyte.gz"}

    def one(v):
        if isinstance(v, list):
            return [paths.get(id(x), x) for x in v]
        return paths.get(id(v), v)

    return {k: one(v) for k, v in kwargs.items()}


def test_the_table_covers_every_public_callable():
    assert all(s.bad for s in SPECS)
    assert {s.label for s in SPECS} >= {
        "conv2d", "conv2d_grad_input", "conv2d_grad_weight", "conv2d_grad_bias", "conv_geometry",
        "conv_output_size", "set_num_threads", "set_winograd", "max_pool2d",
        "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward", "pool_geometry", "matmul",
        "Conv2d", "Linear", "MaxPool2d", "AvgPool2d", "Sequential", "SoftmaxCrossEntropy", "SGD",
        "CrossEntropyLoss", "Dropout", "BatchNorm2d",
        "Adam", "TrainConfig", "two_conv", "tiny_net", "load_dataset", "read_idx",
        "conv2d_plan", "ConvPlan.forward", "relu", "relu_backward", "sgd_update"}


@pytest.mark.parametrize("spec", SPECS, ids=[s.label for s in SPECS])
def test_good_arguments(spec, toy_dir):
    """The table's starting point works, so each bad case fails for its one bad value."""
    spec.call(**_resolve(spec.good, toy_dir))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_argument(case, toy_dir):
    with pytest.raises(case.exc) as excinfo:
        case.call(**_resolve(case.kwargs, toy_dir))
    assert case.name in str(excinfo.value)
    assert len(str(excinfo.value)) < 600 and "\n" not in str(excinfo.value)


def test_nan_logits_are_allowed():
    """A NaN logit is data, not a bad argument: it gives a NaN loss (the training loop stops
    on it), as in PyTorch."""
    loss_fn = nn.SoftmaxCrossEntropy()
    assert np.isnan(loss_fn(np.array([[NAN, 0.0], [0.0, 1.0]]), np.array([0, 1])))
    assert np.isnan(loss_fn.backward()[0]).all()


def test_a_conv_layer_is_built_if_some_input_fits():
    """Construction refuses what no input could make work, not what needs a large input:
    this dilated kernel spans 17 pixels."""
    layer = nn.Conv2d(1, 1, 9, dilation=2)
    assert layer(np.zeros((1, 1, 17, 17), np.float32)).shape == (1, 1, 1, 1)


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Conv2d(1, 2, 3), np.zeros((1, 1, 5, 5), np.float32)),
    (nn.ReLU, np.zeros((2, 3), np.float32)),
    (lambda: nn.MaxPool2d(2), np.zeros((1, 1, 4, 4), np.float32)),
    (lambda: nn.AvgPool2d(2), np.zeros((1, 1, 4, 4), np.float32)),
    (nn.Flatten, np.zeros((2, 3, 4), np.float32)),
    (lambda: nn.Linear(3, 2), np.zeros((2, 3), np.float32)),
    (lambda: models.tiny_net(seed=0), np.zeros((1, 1, 28, 28), np.float32)),
    (lambda: nn.Dropout(0.5, rng=0), np.ones((2, 3), np.float32)),
    (lambda: nn.BatchNorm2d(3), np.ones((2, 3, 4, 4), np.float32)),
], ids=["Conv2d", "ReLU", "MaxPool2d", "AvgPool2d", "Flatten", "Linear", "Sequential",
        "Dropout", "BatchNorm2d"])
def test_backward_needs_a_forward_in_training_mode(make, x):
    layer = make()
    y = layer(x)
    fresh = make()
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) in training mode"):
        fresh.backward(np.zeros_like(y))
    layer.eval()  # forgets what the forward kept
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) in training mode"):
        layer.backward(np.zeros_like(y))
    layer(x)  # a forward in eval mode keeps nothing either
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) in training mode"):
        layer.backward(np.zeros_like(y))
    layer.train()
    layer(x)
    layer.backward(np.zeros_like(y))


def test_softmax_cross_entropy_backward_needs_a_forward():
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) first"):
        nn.SoftmaxCrossEntropy().backward()
