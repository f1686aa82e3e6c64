"""Elementwise ops the layers and optimizers run: ReLU and its backward, and the fused SGD
update.  Each checks its arrays (docs/memory-safety.md) and runs one parallel kernel of
:mod:`fastconv.kernels`.
"""

from __future__ import annotations

import numpy as np

from . import _checks
from . import kernels as _k
from ._args import _as_array, _as_float

__all__ = ["relu", "relu_backward", "sgd_update"]


def relu(input, *, out=None) -> np.ndarray:
    """``max(input, 0)`` (a NaN stays NaN), in the conv dtype rules' result dtype; into
    ``out`` (C-contiguous, the input's shape and that dtype; it may be the input itself) if
    given."""
    x = np.asarray(_as_float("input", input), order="C")  # 0-D stays 0-D
    y = np.empty_like(x) if out is None else _checks.array("out", out, x.shape, x.dtype,
                                                          writeable=True)
    _k.relu_fwd(x.reshape(-1), y.reshape(-1))
    return y


def relu_backward(dy, y) -> np.ndarray:
    """``dy`` where the ReLU output ``y`` is positive, else 0; in ``y``'s dtype."""
    y = _checks.array("y", y, np.shape(y), _checks.FLOATS)
    dy = np.ascontiguousarray(_as_array("dy", dy), dtype=y.dtype)
    if dy.shape != y.shape:
        raise ValueError(f"relu_backward got dy (grad_output) of shape {dy.shape}, the "
                         f"forward output has shape {y.shape}")
    dx = np.empty_like(dy)
    _k.relu_bwd(dy.reshape(-1), y.reshape(-1), dx.reshape(-1))
    return dx


def sgd_update(param, grad, buffer, lr, momentum, weight_decay, nesterov, first) -> None:
    """One step of SGD on ``param`` in place, as ``torch.optim.SGD``::

        g = grad + weight_decay * param
        buffer = g (first step), else momentum * buffer + g          (momentum > 0)
        param -= lr * (g + momentum * buffer if nesterov else buffer)  (momentum > 0)
        param -= lr * g                                                (momentum = 0)

    ``param`` and ``buffer`` (None without momentum) are updated in place: C-contiguous
    and writeable, of one shape and dtype; ``grad`` of that shape (any dtype, any strides).
    One fused pass over the arrays.
    """
    p = _checks.array("param", param, np.shape(param), _checks.FLOATS, writeable=True)
    if buffer is not None:
        _checks.array("buffer", buffer, p.shape, p.dtype, writeable=True)
    elif momentum:
        raise ValueError("sgd_update with momentum needs a buffer")
    g = np.asarray(grad)
    if g.shape != p.shape:
        raise ValueError(f"grad has shape {g.shape}, param {p.shape}")
    _k.sgd_update(p.reshape(-1), np.ascontiguousarray(g).reshape(-1),
                  p.reshape(-1) if buffer is None else buffer.reshape(-1), float(lr),
                  float(momentum), float(weight_decay), bool(nesterov), bool(first))
