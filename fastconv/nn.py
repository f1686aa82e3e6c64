"""Thin layers over the kernels, with PyTorch's names and default initialisation.

The contract of every layer:

* ``forward(x)`` returns the output and, in training mode, keeps only what ``backward``
  needs;
* ``backward(dy)`` returns ``dx`` and fills ``grads`` with the same keys as ``params``;
* ``train()`` / ``eval()`` switch modes (``eval`` keeps nothing for backward);
* ``state_dict()`` / ``load_state_dict()`` copy parameters in and out, keyed like PyTorch's
  (``"0.weight"`` for the first layer of a :class:`Sequential`).

Parameters are float32 NumPy arrays by default and are updated in place by the optimizers
in :mod:`fastconv.optim`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from . import _args, _state, ops, plan, pool
from . import conv as _conv
from . import layouts as _layouts
from .linalg import matmul

__all__ = ["AvgPool2d", "Conv2d", "Flatten", "Linear", "MaxPool2d", "Module", "Parameter",
           "ReLU", "Sequential", "SoftmaxCrossEntropy"]


class Parameter:
    """A named reference to one parameter array and its gradient in a module."""

    __slots__ = ("module", "key", "name")

    def __init__(self, module: Module, key: str, name: str):
        self.module, self.key, self.name = module, key, name

    @property
    def data(self) -> np.ndarray:
        return self.module.params[self.key]

    @property
    def grad(self) -> np.ndarray | None:
        return self.module.grads.get(self.key)

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class: ``params``/``grads`` dicts, modes and state dicts."""

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.training = True

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def children(self) -> list[Module]:
        return []

    def train(self, mode: bool = True) -> Module:
        self.training = bool(mode)
        if not mode:
            self._forget()
        for child in self.children():
            child.train(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def _forget(self) -> None:
        """Drop what forward kept for backward."""

    def named_parameters(self, prefix: str = "") -> Iterator[Parameter]:
        for key in self.params:
            yield Parameter(self, key, prefix + key)
        for i, child in enumerate(self.children()):
            yield from child.named_parameters(f"{prefix}{i}.")

    def parameters(self) -> list[Parameter]:
        return list(self.named_parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        return {p.name: p.data.copy() for p in self.named_parameters()}

    def check_state_dict(self, state, *, prefix: str | None = None) -> dict[str, np.ndarray]:
        """Check ``state`` against the parameters, changing nothing.

        Parameters
        ----------
        state : mapping of str to array_like
            Exactly the keys of :meth:`state_dict` (none missing, none unexpected).  Each
            value must have its parameter's shape (no broadcasting) and a real dtype that
            casts to the parameter's with ``casting='same_kind'``, within its range.
        prefix : str, optional
            Name keys in messages as ``prefix + key`` (a checkpoint's ``"model/"``) instead
            of ``state_dict[key]``.

        Returns
        -------
        dict of str to ndarray
            The values as new C-contiguous arrays of their parameters' dtypes.

        Raises
        ------
        ValueError, TypeError
            For the first entry that breaks a rule, naming it, what it holds and the rule.
        """
        params = {p.name: p for p in self.named_parameters()}
        _state.check_keys(state, params, owner="the model", prefix=prefix)
        return {name: _state.array_like(name, state[name], p.data, "the model's parameter",
                                        prefix=prefix)
                for name, p in params.items()}

    def load_state_dict(self, state) -> None:
        """Copy ``state`` into the parameters (in place).

        Everything is checked first (:meth:`check_state_dict`): when it raises, no
        parameter has changed.
        """
        values = self.check_state_dict(state)
        for p in self.named_parameters():
            np.copyto(p.data, values[p.name])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _uniform(rng, bound, shape, dtype):
    return rng.uniform(-bound, bound, shape).astype(dtype)


def _rng(rng, name="rng"):
    """``rng`` as a Generator: a Generator as it is, else a seed for ``default_rng``
    (None, an int >= 0 or a sequence of them)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (bool, np.bool_, float, str, bytes)):  # default_rng would take some
        raise TypeError(f"{name} must be None, an int seed or a numpy Generator, got {rng!r}")
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name} must be None, an int seed >= 0 or a numpy Generator, got "
                      f"{rng!r} ({e})") from None


def _param_dtype(dtype) -> np.dtype:
    """The parameters' dtype: float32 or float64, the dtypes the kernels compute in."""
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if d is None or dtype is None or d not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return d


class Conv2d(Module):
    """2-D convolution layer, arguments as ``torch.nn.Conv2d``.

    Weights ``(out_channels, in_channels/groups, kh, kw)`` and bias are initialised like
    PyTorch's (Kaiming-uniform with a = sqrt(5)): uniform in ``±1/sqrt(fan_in)``.
    Set ``needs_input_grad = False`` on a first layer to skip computing dX in backward
    (``backward`` then returns ``None``).

    Parameters
    ----------
    in_channels, out_channels : int >= 1
        Each divisible by ``groups``.
    kernel_size : int or (h, w) pair, >= 1
    stride, padding, dilation, groups
        As for :func:`fastconv.conv2d`; checked here as ``conv2d`` checks them, so that a
        layer that could not run is refused when it is built.
    bias : bool
    rng : None, int seed >= 0 or numpy Generator
        The initial weights' random stream.
    dtype : float32 or float64
        The parameters' dtype.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, *, rng=None, dtype=np.float32):
        super().__init__()
        in_channels = _args._int("in_channels", in_channels, 1)
        out_channels = _args._int("out_channels", out_channels, 1)
        kh, kw = _args._pair("kernel_size", kernel_size, 1)
        groups = _args._int("groups", groups, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        # The rest as conv_geometry checks it in forward(), on the smallest input the
        # dilated kernel fits: a layer that could not run on any input is refused here.
        dlh, dlw = _args._pair("dilation", dilation, 1)
        _conv.conv_geometry((0, in_channels, dlh * (kh - 1) + 1, dlw * (kw - 1) + 1),
                            (out_channels, in_channels // groups, kh, kw), stride, padding,
                            dilation, groups)
        bias = _args._bool("bias", bias)
        dtype = _param_dtype(dtype)
        self.conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        rng = _rng(rng)
        bound = 1.0 / math.sqrt(in_channels // groups * kh * kw)
        self.params["weight"] = _uniform(rng, bound, (out_channels, in_channels // groups, kh, kw),
                                         dtype)
        if bias:
            self.params["bias"] = _uniform(rng, bound, (out_channels,), dtype)
        self.needs_input_grad = True
        self._saved = None
        self._workspace = _layouts.Workspace()  # packed input, deltas (and scratch output)
        self._held = plan.HeldPlan()  # evaluation's plan, which keeps prepared weights

    def forward(self, x):
        return self._forward(x, False)[0]

    def forward_scratch(self, x):
        """:meth:`forward`, with the output in this layer's workspace in training mode: the
        next call overwrites it.  For a :class:`Sequential` whose next layer is done with
        it by then (it keeps no reference to its input)."""
        return self._forward(x, self.training)[0]

    def _forward(self, x, reuse_output, pool_order=False):
        """``(y, geo)`` of ``conv2d_saving``, keeping what backward reads."""
        # Only training steps reuse the workspace: evaluation batches (often larger) would
        # otherwise keep their buffers alive and make the next training step reallocate.
        # Evaluation runs the layer's held plan, which prepares the weights once while they
        # do not change; a training step's weights change every step.
        y, xp, geo = _conv._conv2d_saving(
            x, self.params["weight"], self.params.get("bias"), **self.conv,
            workspace=self._workspace if self.training else None,
            out_ws=self._workspace if reuse_output else _layouts._FRESH,
            pool_order=pool_order, held=None if self.training else self._held)
        # What dW reads again in backward: the packed input, pool order's PixelInput, or
        # the input itself, as the plan's dW algorithm reads it (conv.saved_kind).
        self._saved = (xp, geo, np.ndim(x) == 3, y.dtype,
                       _conv.saved_kind(geo, y.dtype, pool_order)) if self.training else None
        return y, geo

    @property
    def algorithms(self) -> dict | None:
        """The algorithm of each pass in the last forward's plan (None before one): those
        of ``fastconv.conv2d_plan`` for the same arguments."""
        if self._saved is None:
            return None
        return dict(plan.plan_for(self._saved[1], self._saved[3]).algorithms)

    def pool_order_shape(self, x) -> tuple | None:
        """The NCHW output shape if :meth:`forward_pool_order` can take ``x`` (a batch
        whose output has an even size, :func:`fastconv.conv.pool_order_ok`), else None."""
        if np.ndim(x) != 4:
            return None
        try:
            geo = _conv.conv_geometry(np.shape(x), self.params["weight"].shape, **self.conv)
        except (TypeError, ValueError):
            return None  # forward() raises it, with the same message
        return (geo.N, geo.K, geo.OH, geo.OW) if _conv.pool_order_ok(geo) else None

    def forward_pool_order(self, x):
        """:meth:`forward` for a 2x2, stride-2 max pool after this layer: the output in
        pool order (N, K, 4, OH/2 * OW/2) (see :mod:`fastconv.layouts`), and its NCHW shape.
        In training mode the output lives in this layer's workspace: the next call
        overwrites it (the pool keeps none of it)."""
        y, geo = self._forward(x, self.training, pool_order=True)
        return y, (geo.N, geo.K, geo.OH, geo.OW)

    def delta_layout(self):
        """The layout :meth:`backward_packed` takes its deltas in (after a forward): a
        ``layouts.DeltaLayout``, ``layouts.PoolOrderLayout`` or ``layouts.NCHWLayout``, as
        ``conv.saved_kind`` says."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() in training mode first")
        geo, kind = self._saved[1], self._saved[4]
        if kind == "pixels":
            return _layouts.PoolOrderLayout((geo.N, geo.K, 4, geo.OH * geo.OW // 4))
        if kind == "input":
            return _layouts.NCHWLayout((geo.N, geo.K, geo.OH, geo.OW))
        return _layouts.delta_layout(geo, self.needs_input_grad)

    def delta_buffer(self, layout: _layouts.DeltaLayout) -> np.ndarray | None:
        """This layer's reusable array for deltas in ``layout``, for a layer after it that
        writes all of it (border included) in :meth:`backward_packed`'s layout.  None for
        pool order, whose deltas the pool hands over unexpanded (``conv.PooledDeltas``), and
        for NCHW deltas (new arrays)."""
        if isinstance(layout, (_layouts.PoolOrderLayout, _layouts.NCHWLayout)):
            return None
        return self._workspace.zeros("dy", layout.shape, self._saved[3])

    def backward(self, dy):
        layout = self.delta_layout()
        xp, geo, unbatched, dtype = self._saved[:4]
        dy = np.asarray(dy)
        if unbatched:
            dy = dy[None]
        expected = (geo.N, geo.K, geo.OH, geo.OW)
        if dy.shape != expected:
            raise ValueError(f"Conv2d.backward got grad_output of shape {dy.shape}, the "
                             f"forward output had shape {expected}")
        dy = dy.astype(dtype, copy=False)
        if isinstance(layout, _layouts.PoolOrderLayout):
            dyp = _layouts.to_pool_order(dy)
        elif isinstance(layout, _layouts.NCHWLayout):
            dyp = dy
        else:
            dyp = _layouts.pack_deltas(dy, layout, self._workspace)
        dx = self.backward_packed(dyp, layout)
        return dx[0] if unbatched and dx is not None else dx

    def backward_packed(self, dyp, layout, dsum=None):
        """:meth:`backward` from deltas already in :meth:`delta_layout` (as fused layers
        write them), and optionally their per-image channel sums ``dsum`` (N, Cd) float64
        (see :func:`fastconv.conv.backward_saved`)."""
        xp, geo = self._saved[:2]
        if isinstance(layout, _layouts.PoolOrderLayout):
            dx, dw, db = _conv.backward_pool_order(xp, geo, self.params["weight"], dyp,
                                                   self.needs_input_grad, dsum)
        elif isinstance(layout, _layouts.NCHWLayout):
            dx, dw, db = _conv.backward_input(xp, geo, self.params["weight"], dyp,
                                              self.needs_input_grad, dsum)
        else:
            dx, dw, db = _conv.backward_saved(xp, geo, self.params["weight"], dyp, layout,
                                              self.needs_input_grad, self._workspace, dsum)
        self.grads["weight"] = dw
        if "bias" in self.params:
            self.grads["bias"] = db
        return dx

    def _forget(self):
        self._saved = None

    def __repr__(self):
        c = self.conv
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={c['stride']}, padding={c['padding']})")


class ReLU(Module):
    """``max(x, 0)``; the gradient passes where the output is positive.

    Keeps its output (not a separate mask) for backward.  Numba kernels, in parallel.
    """

    def __init__(self):
        super().__init__()
        self._y = None

    def forward(self, x):
        y = ops.relu(x)
        self._y = y if self.training else None
        return y

    def backward(self, dy):
        if self._y is None:
            raise RuntimeError("backward() needs a forward() in training mode first")
        return ops.relu_backward(dy, self._y)

    def _forget(self):
        self._y = None

    def __repr__(self):
        return "ReLU()"


def _pool_args(kernel_size, stride, padding) -> dict:
    """A pooling layer's arguments, checked as :func:`fastconv.pool.pool_geometry` checks
    them in forward(), on an input the size of the window."""
    kh, kw = _args._pair("kernel_size", kernel_size, 1)
    pool.pool_geometry((0, 1, kh, kw), kernel_size, stride, padding)
    return dict(kernel_size=kernel_size, stride=stride, padding=padding)


class MaxPool2d(Module):
    """Max pooling; backward routes each delta to its window's maximum (first on ties).

    Parameters
    ----------
    kernel_size, stride, padding
        As for :func:`fastconv.pool.max_pool2d`, checked when the layer is built.
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.args = _pool_args(kernel_size, stride, padding)
        self._saved = None

    def forward(self, x):
        y, idx = pool.max_pool2d(x, **self.args, return_indices=True)
        self._saved = (idx, np.shape(x), None, False) if self.training else None
        return y

    def forward_after_relu(self, x):
        """``self(relu(x))``, computed as ``relu(self(x))``: the same values and gradients
        (max and ReLU commute), with ReLU on the pooled, smaller array."""
        y, idx = pool.max_pool2d(x, **self.args, return_indices=True)  # float32/64 out
        ops.relu(y, out=y)
        self._saved = (idx, np.shape(x), y, False) if self.training else None
        return y

    def is_2x2(self, shape) -> bool:
        """Whether this pools inputs of ``shape`` in 2x2 windows at stride 2, unpadded."""
        try:
            return pool.pool_geometry(shape, **self.args)[:6] == (2, 2, 2, 2, 0, 0)
        except (TypeError, ValueError):
            return False  # forward() raises it, with the same message

    def forward_pool_order(self, y4, shape):
        """:meth:`forward_after_relu` of the convolution output ``y4`` in pool order
        (N, C, 4, M) whose NCHW shape is ``shape`` (:meth:`Conv2d.forward_pool_order`), for
        a 2x2, stride-2 pool (:meth:`is_2x2`)."""
        y, idx = pool.max_pool2x2_relu_pool_order(y4, shape)
        self._saved = (idx, tuple(shape), y, True) if self.training else None
        return y

    def backward(self, dy):
        """The backward of :meth:`forward`, or of ReLU and this layer after
        :meth:`forward_after_relu` (deltas pass where the pooled output is positive)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() in training mode first")
        idx, shape, relu_out, planes = self._saved
        if relu_out is None:
            return pool.max_pool2d_backward(dy, idx, shape)
        if planes:
            pooled, _ = self._planes_backward(dy)
            return _layouts.from_pool_order(pooled.expand(), shape[2], shape[3])
        return pool.max_pool2d_relu_backward(dy, idx, relu_out, shape)

    def backward_packed(self, dy, layout, out=None):
        """:meth:`backward`, with ``dx`` returned in ``layout`` (a ``conv.DeltaLayout``) for
        the :class:`Conv2d` before this layer: the 2x2 pool writes it there directly, into
        ``out`` if given (:meth:`Conv2d.delta_buffer`).

        Returns ``(dx, dsum)``: ``dsum`` (N, Cd) float64 holds each image's sum of ``dx``
        per channel of the layout, the convolution's bias gradient in parts, which the 2x2
        pool gets almost for free; None from the other pools (the convolution then sums
        ``dx`` itself)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() in training mode first")
        idx, shape, relu_out, planes = self._saved
        dy = np.asarray(dy)
        dy = dy.astype(relu_out.dtype if relu_out is not None else _args._result_dtype(dy),
                       copy=False)
        if isinstance(layout, _layouts.NCHWLayout):
            return self.backward(dy), None
        if isinstance(layout, _layouts.PoolOrderLayout):
            if planes and dy.shape == idx.shape:
                return self._planes_backward(np.ascontiguousarray(dy, relu_out.dtype))
            return _layouts.to_pool_order(self.backward(dy)), None
        if not self.is_2x2(shape) or dy.shape != idx.shape or not dy.size:
            return _layouts.pack_deltas(self.backward(dy), layout), None
        return pool.max_pool2x2_backward_packed(
            dy, idx, np.ascontiguousarray(dy) if relu_out is None else relu_out,
            relu_out is not None, layout, shape, out, planes)

    def _planes_backward(self, dy):
        """The deltas in pool order as ``conv.PooledDeltas`` and their sums (N, C) float64
        after :meth:`forward_pool_order`; ``dy`` C-contiguous in the output's dtype."""
        idx, shape, relu_out, _ = self._saved
        g, dsum = pool.max_pool2x2_relu_pool_order_backward(dy, idx, relu_out)
        return _layouts.PooledDeltas(g, idx.reshape(*shape[:2], -1)), dsum

    def _forget(self):
        self._saved = None

    def __repr__(self):
        return f"MaxPool2d({self.args['kernel_size']})"


class AvgPool2d(Module):
    """Average pooling (zero padding counted); backward spreads each delta evenly.

    Parameters
    ----------
    kernel_size, stride, padding
        As for :func:`fastconv.pool.avg_pool2d`, checked when the layer is built.
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.args = _pool_args(kernel_size, stride, padding)
        self._shape = None

    def forward(self, x):
        y = pool.avg_pool2d(x, **self.args)
        self._shape = np.shape(x) if self.training else None
        return y

    def backward(self, dy):
        if self._shape is None:
            raise RuntimeError("backward() needs a forward() in training mode first")
        return pool.avg_pool2d_backward(dy, self._shape, **self.args)

    def _forget(self):
        self._shape = None

    def __repr__(self):
        return f"AvgPool2d({self.args['kernel_size']})"


class Flatten(Module):
    """``(N, ...) -> (N, prod(...))``, an empty batch included (``(0, prod(...))``)."""

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x):
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"Flatten needs input of shape (N, ...), got a {x.ndim}-D array")
        self._shape = x.shape if self.training else None
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))

    def backward(self, dy):
        if self._shape is None:
            raise RuntimeError("backward() needs a forward() in training mode first")
        dy = np.asarray(dy)
        expected = (self._shape[0], math.prod(self._shape[1:]))
        if dy.shape != expected:
            raise ValueError(f"Flatten.backward got grad_output of shape {dy.shape}, the "
                             f"forward output had shape {expected}")
        return dy.reshape(self._shape)

    def _forget(self):
        self._shape = None

    def __repr__(self):
        return "Flatten()"


class Linear(Module):
    """``y = x @ weight.T + bias`` with weight ``(out_features, in_features)``.

    The products run on :func:`fastconv.linalg.matmul`: the forward pass computes
    ``y.T = weight @ x.T``, so that the batch is the vector dimension.

    Initialised like ``torch.nn.Linear``: uniform in ``±1/sqrt(in_features)`` (zeros for
    ``in_features = 0``).

    Parameters
    ----------
    in_features, out_features : int >= 0
    bias : bool
    rng, dtype
        As for :class:`Conv2d`.
    """

    def __init__(self, in_features, out_features, bias=True, *, rng=None, dtype=np.float32):
        super().__init__()
        in_features = _args._int("in_features", in_features, 0)
        out_features = _args._int("out_features", out_features, 0)
        bias = _args._bool("bias", bias)
        dtype = _param_dtype(dtype)
        rng = _rng(rng)
        # As PyTorch: no inputs (in_features = 0) give bound 0, zero weights and bias.
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        self.in_features, self.out_features = in_features, out_features
        self.params["weight"] = _uniform(rng, bound, (out_features, in_features), dtype)
        if bias:
            self.params["bias"] = _uniform(rng, bound, (out_features,), dtype)
        self._x = None

    def forward(self, x):
        x = _args._as_array("input", x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear({self.in_features}, {self.out_features}) needs input of "
                             f"shape (N, {self.in_features}), got {x.shape}")
        y = np.ascontiguousarray(matmul(self.params["weight"], x.T).T)
        if "bias" in self.params:
            y += self.params["bias"]
        self._x = x if self.training else None
        return y

    def backward(self, dy):
        if self._x is None:
            raise RuntimeError("backward() needs a forward() in training mode first")
        dy = np.asarray(dy)
        expected = (self._x.shape[0], self.out_features)
        if dy.shape != expected:
            raise ValueError(f"Linear.backward got grad_output of shape {dy.shape}, the "
                             f"forward output had shape {expected}")
        self.grads["weight"] = matmul(dy.T, self._x)
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=0)
        return matmul(dy, self.params["weight"])

    def _forget(self):
        self._x = None

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"


# Layers that keep no reference to their input (only their output, indices or its shape).
_KEEP_NO_INPUT = (ReLU, MaxPool2d, AvgPool2d)


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    Parameters
    ----------
    *layers : Module
    """

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"layers[{i}] must be a fastconv.nn.Module, got "
                                f"{type(layer).__name__} {layer!r}")
        self.layers = list(layers)

    def children(self):
        return self.layers

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def _steps(self):
        """Layers in order, with each ReLU directly followed by MaxPool2d fused into one
        step (the pool runs first, then ReLU on its 4x smaller output; see
        :meth:`MaxPool2d.forward_after_relu`)."""
        i, layers = 0, self.layers
        while i < len(layers):
            if (isinstance(layers[i], ReLU) and i + 1 < len(layers)
                    and isinstance(layers[i + 1], MaxPool2d)):
                yield (layers[i], layers[i + 1])
                i += 2
            else:
                yield (layers[i],)
                i += 1

    def forward(self, x):
        steps = list(self._steps())
        pooled = False
        for t, step in enumerate(steps):
            if pooled:  # this ReLU + pool ran with the convolution before it
                pooled = False
                continue
            if self._pool_order(steps, t, x):
                # Conv2d, ReLU, 2x2 MaxPool2d: the convolution writes its output in the
                # order the pool reads (layouts.py, "Pool order").
                y4, shape = step[0].forward_pool_order(x)
                x, pooled = steps[t + 1][1].forward_pool_order(y4, shape), True
            elif len(step) == 2:
                x = step[1].forward_after_relu(x)
            elif (isinstance(step[0], Conv2d) and t + 1 < len(steps)
                    and isinstance(steps[t + 1][0], _KEEP_NO_INPUT)):
                # Only the next layer reads this output, and it keeps nothing of it.
                x = step[0].forward_scratch(x)
            else:
                x = step[0].forward(x)
        return x

    @staticmethod
    def _pool_order(steps, t, x) -> bool:
        """Whether step ``t`` is a Conv2d that can write ``x``'s output in pool order for
        the ReLU + 2x2 max pool of step ``t + 1``."""
        if not (isinstance(steps[t][0], Conv2d) and t + 1 < len(steps)
                and len(steps[t + 1]) == 2):
            return False
        shape = steps[t][0].pool_order_shape(x)
        return shape is not None and steps[t + 1][1].is_2x2(shape)

    def backward(self, dy):
        steps = list(self._steps())
        packed = dsum = None  # deltas already in the next (earlier) Conv2d's layout
        for t in reversed(range(len(steps))):
            layer = steps[t][-1]  # a fused pair's pool does the ReLU's part too
            if packed is not None:
                dy, packed = layer.backward_packed(dy, packed, dsum), None
            elif (isinstance(layer, MaxPool2d) and t > 0 and isinstance(steps[t - 1][0], Conv2d)
                    and steps[t - 1][0].training):
                # The pool writes its dx as the convolution's packed deltas: no NCHW pass.
                conv = steps[t - 1][0]
                packed = conv.delta_layout()
                dy, dsum = layer.backward_packed(dy, packed, conv.delta_buffer(packed))
            else:
                dy = layer.backward(dy)
        return dy

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


class SoftmaxCrossEntropy:
    """Softmax followed by cross-entropy with integer labels, computed stably.

    ``forward(logits, labels)`` returns the loss: ``logsumexp(z) - z[label]`` per row,
    averaged (``reduction='mean'``) or summed (``'sum'``).  ``backward()`` returns
    ``dL/dlogits = (softmax(z) - onehot(label))``, divided by N for the mean.

    Parameters
    ----------
    reduction : ``'mean'`` or ``'sum'``
    """

    def __init__(self, reduction: str = "mean"):
        if not isinstance(reduction, str):
            raise TypeError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self._saved = None

    def __call__(self, logits, labels):
        return self.forward(logits, labels)

    def forward(self, logits, labels) -> float:
        """The loss of ``logits`` (N, classes) against ``labels`` (N,) in
        ``[0, classes)``; an empty batch (N = 0) has loss 0 and gradient (0, classes)."""
        z = _args._as_float("logits", logits)
        y = np.asarray(labels)
        if z.ndim != 2 or z.shape[1] < 1:
            raise ValueError(f"logits must be 2-D (N, classes) with at least one class, got "
                             f"shape {z.shape}")
        if y.shape != (z.shape[0],) or y.dtype.kind not in "iu":
            raise ValueError(f"labels must be {z.shape[0]} integers, got {y.dtype} {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
            raise ValueError(f"labels must lie in [0, {z.shape[1]}), got values in "
                             f"[{y.min()}, {y.max()}]")
        shifted = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - log_norm
        rows = np.arange(len(y))
        losses = -log_p[rows, y]
        self._saved = (np.exp(log_p), y)
        total = losses.sum(dtype=np.float64)
        return float(total / max(len(y), 1) if self.reduction == "mean" else total)

    def backward(self):
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        p, y = self._saved
        d = p.copy()
        d[np.arange(len(y)), y] -= 1
        if self.reduction == "mean":
            d /= max(len(y), 1)
        return d
