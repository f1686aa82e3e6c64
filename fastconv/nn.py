"""Thin layers over the kernels, with PyTorch's names, default initialisation and habits.

The contract of every layer:

* ``forward(x)`` returns the output and, in training mode, keeps only what ``backward``
  needs;
* ``backward(dy)`` returns ``dx`` and adds each parameter's gradient to ``grads`` (same
  keys as ``params``): the first backward after :meth:`Module.zero_grad` stores the
  kernel's new array as it is, later ones add to it, so gradients accumulate as in PyTorch;
* ``train()`` / ``eval()`` switch modes (``eval`` keeps nothing for backward);
* ``state_dict()`` / ``load_state_dict()`` copy parameters and buffers (running statistics)
  in and out, keyed like PyTorch's (``"0.weight"`` for the first layer of a
  :class:`Sequential`).

Parameters are float32 NumPy arrays by default and are updated in place by the optimizers
in :mod:`fastconv.optim`.  ``layer.weight`` / ``layer.bias`` and ``parameters()`` hand out
:class:`Parameter` references to them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from . import _args, _state, ops, plan, pool
from . import conv as _conv
from . import layouts as _layouts
from .linalg import matmul

__all__ = ["AvgPool2d", "BatchNorm2d", "Conv2d", "CrossEntropyLoss", "Dropout", "Flatten",
           "Linear", "MaxPool2d", "Module", "Parameter", "ReLU", "Sequential",
           "SoftmaxCrossEntropy"]


_NO_FORWARD = "backward() needs a forward() in training mode first"


def _check_grad_output(layer: Module, dy: np.ndarray, expected: tuple) -> None:
    """ValueError unless the deltas ``dy`` have the shape of the layer's forward output."""
    if dy.shape != expected:
        raise ValueError(f"{type(layer).__name__}.backward got grad_output of shape "
                         f"{dy.shape}, the forward output had shape {expected}")


class Parameter:
    """A reference to one parameter array of a module and to its gradient.

    What ``model.parameters()``, ``layer.weight`` and ``layer.bias`` return.  It behaves
    like the parts of ``torch.nn.Parameter`` that a NumPy array can give: ``p.data`` is the
    array itself (the optimizers update it in place), ``p.grad`` the gradient array or
    None, ``p.shape``, ``p.dtype``, ``p.ndim``, ``p.numel()``, ``p.size()``, ``p.dim()``,
    indexing (``p[0]``, ``p[...] = 0`` write into the array) and ``np.asarray(p)``.
    Two references to the same array of the same module are equal.

    Attributes
    ----------
    module : Module
        The layer that holds the array, in ``module.params[key]``.
    key : str
        ``'weight'`` or ``'bias'``.
    name : str
        The name in the model's ``state_dict`` (``'3.weight'``), or ``key`` when taken from
        the layer itself.
    """

    __slots__ = ("module", "key", "name")

    def __init__(self, module: Module, key: str, name: str):
        self.module, self.key, self.name = module, key, name

    @property
    def data(self) -> np.ndarray:
        """The parameter array.  Assigning an array of the same shape replaces it (in the
        parameter's dtype, as a C-contiguous writeable array; a copy where needed)."""
        return self.module.params[self.key]

    @data.setter
    def data(self, value) -> None:
        self.module.params[self.key] = _replacement(f"{self.name}.data", value, self.data)

    @property
    def grad(self) -> np.ndarray | None:
        """The gradient accumulated since the last ``zero_grad()``, or None.  Assign None
        to drop it, or an array of the parameter's shape (kept in the parameter's dtype)."""
        return self.module.grads.get(self.key)

    @grad.setter
    def grad(self, value) -> None:
        if value is None:
            self.module.grads.pop(self.key, None)
        else:
            self.module.grads[self.key] = _replacement(f"{self.name}.grad", value, self.data)

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def dim(self) -> int:
        """The number of dimensions (``torch.Tensor.dim``)."""
        return self.data.ndim

    def numel(self) -> int:
        """The number of elements (``torch.Tensor.numel``)."""
        return self.data.size

    def size(self, dim: int | None = None):
        """The shape, or the size of dimension ``dim`` (``torch.Tensor.size``)."""
        return self.data.shape if dim is None else self.data.shape[dim]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]

    def __setitem__(self, index, value) -> None:
        self.data[index] = value

    def __array__(self, dtype=None, copy=None):
        a = self.data
        if copy:
            return np.array(a, dtype=dtype, copy=True)
        return a if dtype is None else a.astype(dtype, copy=False)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Parameter) and other.module is self.module
                and other.key == self.key)

    def __hash__(self) -> int:
        return hash((id(self.module), self.key))

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.data.shape}, dtype={self.data.dtype})"


def _replacement(name: str, value, like: np.ndarray) -> np.ndarray:
    """``value`` as an array to stand in for ``like`` (a parameter or its gradient): of
    ``like``'s shape, in its dtype, C-contiguous and writeable (a copy where needed)."""
    if isinstance(value, Parameter):
        value = value.data
    a = _state.real_array(name, value)
    if a.shape != like.shape:
        raise ValueError(f"{name} must have the parameter's shape {like.shape}, got "
                         f"{a.shape}")
    if a.dtype != like.dtype or not a.flags.c_contiguous or not a.flags.writeable:
        a = np.array(a, dtype=like.dtype, order="C")
    return a


class _ParamAttr:
    """``layer.weight`` / ``layer.bias``: a :class:`Parameter`, or None when the layer has
    no such parameter (``bias=False``), as in PyTorch.  Assigning replaces the array as
    ``Parameter.data`` does."""

    def __init__(self, key: str):
        self.key = key

    def __get__(self, module, owner=None):
        if module is None:
            return self
        return Parameter(module, self.key, self.key) if self.key in module.params else None

    def __set__(self, module, value):
        if self.key not in module.params:
            raise AttributeError(f"{type(module).__name__} was built without a "
                                 f"{self.key}; it cannot be given one")
        Parameter(module, self.key, self.key).data = value


class Module:
    """Base class: ``params``/``grads`` dicts, buffers, modes and state dicts.

    ``params`` maps each parameter's key to its array; ``grads`` holds the gradients
    accumulated since the last :meth:`zero_grad` (a key is absent until a backward gives
    it one); buffers (running statistics) are state that is not trained.
    """

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self._buffers: dict[str, np.ndarray] = {}
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

    #: Arrays, by parameter key, that the next backward may write this module's gradients
    #: into instead of new arrays (set for one backward by :class:`fastconv.dist.
    #: GradientSync`: views of its flat buffer, so that no copy follows).
    _grad_into: dict[str, np.ndarray] | None = None

    def _grad_target(self, key: str, dtype) -> np.ndarray | None:
        """Where a layer may write the gradient of ``key`` it is about to compute in
        ``dtype`` (then handed to :meth:`_accumulate` as usual), or None for a new array:
        only while no gradient is held, since a held one is added to."""
        into = self._grad_into
        if into is None or self.grads.get(key) is not None:
            return None
        out = into.get(key)
        return out if out is not None and out.dtype == dtype else None

    def _accumulate(self, key: str, g: np.ndarray) -> None:
        """Add the gradient ``g`` (a new array the caller hands over) to ``grads[key]``:
        stored as it is when no gradient is held (after :meth:`zero_grad`), else added in
        place, as PyTorch accumulates ``.grad``."""
        held = self.grads.get(key)
        if held is None:
            self.grads[key] = g
        elif held.flags.writeable and held.shape == g.shape and held.dtype == g.dtype:
            np.add(held, g, out=held)
        else:
            self.grads[key] = (held + g).astype(self.params[key].dtype, copy=False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter (this module's and its children's), as
        ``torch.nn.Module.zero_grad``: drop them (``set_to_none=True``, the default: the
        next backward stores its arrays without an extra pass), or fill the held ones with
        zeros (the next backward adds to them)."""
        set_to_none = _args._bool("set_to_none", set_to_none)
        for p in self.parameters():
            _clear_grad(p, set_to_none)

    def _parameters(self, prefix: str = "") -> Iterator[Parameter]:
        for key in self.params:
            yield Parameter(self, key, prefix + key)
        for i, child in enumerate(self.children()):
            yield from child._parameters(f"{prefix}{i}.")

    def named_parameters(self, prefix: str = "", recurse: bool = True
                         ) -> Iterator[tuple[str, Parameter]]:
        """``(name, parameter)`` pairs, named as in :meth:`state_dict`
        (``torch.nn.Module.named_parameters``); only this module's own with
        ``recurse=False``."""
        for p in self._parameters(prefix) if recurse else (
                Parameter(self, k, prefix + k) for k in self.params):
            yield p.name, p

    def parameters(self, recurse: bool = True) -> list[Parameter]:
        """Every :class:`Parameter` (a list, in :meth:`state_dict` order); only this
        module's own with ``recurse=False``."""
        return [p for _, p in self.named_parameters(recurse=recurse)]

    def named_buffers(self, prefix: str = "", recurse: bool = True
                      ) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, array)`` of every buffer (BatchNorm2d's running statistics)."""
        for key, a in self._buffers.items():
            yield prefix + key, a
        if recurse:
            for i, child in enumerate(self.children()):
                yield from child.named_buffers(f"{prefix}{i}.")

    def buffers(self, recurse: bool = True) -> list[np.ndarray]:
        return [a for _, a in self.named_buffers(recurse=recurse)]

    def _state(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray, str]]:
        """``(name, array, what)`` of every parameter and buffer in PyTorch's state_dict
        order: each module's parameters, then its buffers, then its children's."""
        for key, a in self.params.items():
            yield prefix + key, a, "parameter"
        for key, a in self._buffers.items():
            yield prefix + key, a, "buffer"
        for i, child in enumerate(self.children()):
            yield from child._state(f"{prefix}{i}.")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer, keyed as ``torch.nn.Module.state_dict``."""
        return {name: a.copy() for name, a, _ in self._state()}

    def check_state_dict(self, state, *, prefix: str | None = None) -> dict[str, np.ndarray]:
        """Check ``state`` against the parameters and buffers, changing nothing.

        Parameters
        ----------
        state : mapping of str to array_like
            Exactly the keys of :meth:`state_dict` (none missing, none unexpected).  Each
            value must have its array's shape (no broadcasting) and a real dtype that
            casts to the array's with ``casting='same_kind'``, within its range.
        prefix : str, optional
            Name keys in messages as ``prefix + key`` (a checkpoint's ``"model/"``) instead
            of ``state_dict[key]``.

        Returns
        -------
        dict of str to ndarray
            The values as new C-contiguous arrays of their arrays' dtypes.

        Raises
        ------
        ValueError, TypeError
            For the first entry that breaks a rule, naming it, what it holds and the rule.
        """
        entries = {name: (a, what) for name, a, what in self._state()}
        _state.check_keys(state, entries, owner="the model", prefix=prefix)
        return {name: _state.array_like(name, state[name], a, f"the model's {what}",
                                        prefix=prefix)
                for name, (a, what) in entries.items()}

    def load_state_dict(self, state) -> None:
        """Copy ``state`` into the parameters and buffers (in place).

        Everything is checked first (:meth:`check_state_dict`): when it raises, nothing has
        changed.
        """
        values = self.check_state_dict(state)
        for name, a, _ in self._state():
            np.copyto(a, values[name])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _clear_grad(p: Parameter, set_to_none: bool) -> None:
    """``zero_grad`` of one parameter."""
    g = p.grad
    if g is None:
        return
    if set_to_none:
        p.grad = None
    elif g.flags.writeable:
        g.fill(0)
    else:
        p.grad = np.zeros_like(p.data)


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

    Attributes
    ----------
    weight, bias : Parameter
        ``bias`` is None for ``bias=False``.
    """

    weight, bias = _ParamAttr("weight"), _ParamAttr("bias")

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
            raise RuntimeError(_NO_FORWARD)
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
        _check_grad_output(self, dy, expected)
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
        self._accumulate("weight", dw)
        if "bias" in self.params:
            self._accumulate("bias", db)
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
            raise RuntimeError(_NO_FORWARD)
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
            raise RuntimeError(_NO_FORWARD)
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
            raise RuntimeError(_NO_FORWARD)
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
            raise RuntimeError(_NO_FORWARD)
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
            raise RuntimeError(_NO_FORWARD)
        dy = np.asarray(dy)
        expected = (self._shape[0], math.prod(self._shape[1:]))
        _check_grad_output(self, dy, expected)
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

    Attributes
    ----------
    weight, bias : Parameter
        ``bias`` is None for ``bias=False``.
    """

    weight, bias = _ParamAttr("weight"), _ParamAttr("bias")

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
            raise RuntimeError(_NO_FORWARD)
        dy = np.asarray(dy)
        expected = (self._x.shape[0], self.out_features)
        _check_grad_output(self, dy, expected)
        dtype = np.result_type(dy.dtype, self._x.dtype)  # matmul's, where it is float
        self._accumulate("weight", matmul(dy.T, self._x,
                                          out=self._grad_target("weight", dtype)))
        if "bias" in self.params:
            self._accumulate("bias", dy.sum(axis=0, out=self._grad_target("bias", dy.dtype)))
        return matmul(dy, self.params["weight"])

    def _forget(self):
        self._x = None

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"


class Dropout(Module):
    """Inverted dropout, as ``torch.nn.Dropout``: in training mode each element is zeroed
    with probability ``p`` and the others are scaled by ``1 / (1 - p)``; in eval mode the
    input passes unchanged (the same array).

    ``p = 0`` passes the input unchanged in both modes; ``p = 1`` gives zeros in training
    mode.  Backward multiplies the deltas by the same scaled mask.

    Parameters
    ----------
    p : real number in [0, 1]
        The probability of zeroing an element.
    inplace : bool
        Write the output into the input array (a writeable float32/float64 array).
    rng : None, int seed >= 0 or numpy Generator
        The masks' random stream (``self.rng``): a seed makes the masks reproducible.
        Each training forward draws one uniform number per element from it.
    """

    def __init__(self, p=0.5, inplace=False, *, rng=None):
        super().__init__()
        p = _args._real("p", p)
        if p > 1:
            raise ValueError(f"dropout probability p must lie in [0, 1], got {p!r}")
        self.p = p
        self.inplace = _args._bool("inplace", inplace)
        self.rng = _rng(rng)
        self._saved = None  # (kind, shape, mask): kind 'identity', 'zero' or 'mask'

    def forward(self, x):
        x = _args._as_float("input", x)
        if not self.training or self.p == 0:
            self._saved = ("identity", x.shape, None) if self.training else None
            return x
        if self.p == 1:  # x * 0, as torch: NaN and inf stay NaN
            mask = None
            y = np.multiply(x, x.dtype.type(0), out=self._inplace_out(x))
        else:
            keep = self.rng.random(x.shape, dtype=x.dtype) >= x.dtype.type(self.p)
            mask = np.multiply(keep, x.dtype.type(1 / (1 - self.p)), dtype=x.dtype)
            y = np.multiply(x, mask, out=self._inplace_out(x))
        self._saved = ("zero" if mask is None else "mask", x.shape, mask) if self.training \
            else None
        return y

    def _inplace_out(self, x):
        if not self.inplace:
            return None
        if not x.flags.writeable:
            raise ValueError("Dropout(inplace=True) needs a writeable input array")
        return x

    def backward(self, dy):
        if self._saved is None:
            raise RuntimeError(_NO_FORWARD)
        kind, shape, mask = self._saved
        dy = _args._as_float("grad_output", dy)
        _check_grad_output(self, dy, shape)
        if kind == "identity":
            return dy
        if kind == "zero":
            return dy * dy.dtype.type(0)
        return dy * mask

    def _forget(self):
        self._saved = None

    def __repr__(self):
        return f"Dropout(p={self.p})"


def _channel_sum(a, b=None) -> np.ndarray:
    """Per-channel sums over N and the pixels of ``a`` (N, C, P), or of ``a * b``, in
    float64: each image's rows in the arrays' dtype (NumPy's pairwise sum, or einsum's),
    then the images in float64."""
    rows = a.sum(axis=2) if b is None else np.einsum("nci,nci->nc", a, b)
    return rows.sum(axis=0, dtype=np.float64)


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel, as ``torch.nn.BatchNorm2d``.

    In training mode (or without running statistics) each channel is normalised by the
    batch's mean and biased variance, ``y = (x - mean) / sqrt(var + eps) * weight + bias``,
    and the running statistics move towards the batch's::

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)

    with ``m = N * H * W`` (the unbiased variance, as PyTorch); ``momentum=None`` takes the
    cumulative average (factor ``1 / num_batches_tracked``).  In eval mode the running
    statistics normalise instead.  Computed with NumPy in the input's and parameters'
    result dtype (the images' sums in float64).

    Parameters
    ----------
    num_features : int >= 1
        C, the input's channels.
    eps : finite real number >= 0
    momentum : real number in [0, 1], or None
    affine : bool
        Learn ``weight`` (ones at first) and ``bias`` (zeros).
    track_running_stats : bool
        Keep the buffers ``running_mean`` (zeros), ``running_var`` (ones) and
        ``num_batches_tracked`` (0, int64); without them eval mode uses batch statistics.
    dtype : float32 or float64
        The parameters' and running statistics' dtype.
    """

    weight, bias = _ParamAttr("weight"), _ParamAttr("bias")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, dtype=np.float32):
        super().__init__()
        self.num_features = _args._int("num_features", num_features, 1)
        self.eps = _args._real("eps", eps)
        self.momentum = None if momentum is None else _args._real("momentum", momentum, 0.0)
        if self.momentum is not None and self.momentum > 1:
            raise ValueError(f"momentum must lie in [0, 1] (or be None), got {momentum!r}")
        self.affine = _args._bool("affine", affine)
        self.track_running_stats = _args._bool("track_running_stats", track_running_stats)
        dtype = _param_dtype(dtype)
        C = self.num_features
        if self.affine:
            self.params["weight"] = np.ones(C, dtype)
            self.params["bias"] = np.zeros(C, dtype)
        if self.track_running_stats:
            self._buffers["running_mean"] = np.zeros(C, dtype)
            self._buffers["running_var"] = np.ones(C, dtype)
            self._buffers["num_batches_tracked"] = np.zeros((), np.int64)
        self._saved = None

    @property
    def running_mean(self) -> np.ndarray | None:
        return self._buffers.get("running_mean")

    @property
    def running_var(self) -> np.ndarray | None:
        return self._buffers.get("running_var")

    @property
    def num_batches_tracked(self) -> np.ndarray | None:
        return self._buffers.get("num_batches_tracked")

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def _check_input(self, x) -> np.ndarray:
        x = _args._as_array("input", x)
        C = self.num_features
        if x.ndim != 4 or x.shape[1] != C:
            raise ValueError(f"BatchNorm2d({C}) needs input of shape (N, {C}, H, W), got "
                             f"shape {x.shape}")
        dtype = _args._result_dtype(x, *self.params.values(), *(
            a for a in self._buffers.values() if a.dtype.kind == "f"))
        return x.astype(dtype, copy=False)

    def forward(self, x):
        x = self._check_input(x)
        N, C, H, W = x.shape
        m = N * H * W
        x3 = x.reshape(N, C, H * W)
        dtype = x.dtype
        batch_stats = self.training or not self.track_running_stats
        if batch_stats and m == 1:
            raise ValueError(f"BatchNorm2d needs more than 1 value per channel to take "
                             f"batch statistics, got input of shape {x.shape}")
        if m == 0:  # as torch: an empty output; the count moves, the statistics do not
            if self.training and self.track_running_stats:
                self.num_batches_tracked[...] += 1
            self._saved = (None, None, x.shape) if self.training else None
            return np.empty(x.shape, dtype)
        if batch_stats:
            mean = _channel_sum(x3) / m
            xhat = x3 - mean.astype(dtype)[:, None]
            var = _channel_sum(xhat, xhat) / m
            invstd = 1.0 / np.sqrt(var + self.eps)
            xhat *= invstd.astype(dtype)[:, None]
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var * (m / (m - 1)))
            if self.affine:
                y = xhat * self.params["weight"].astype(dtype)[:, None]
                y += self.params["bias"].astype(dtype)[:, None]
            else:
                y = xhat.copy() if self.training else xhat
            self._saved = (xhat, invstd, x.shape) if self.training else None
        else:
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            scale = invstd * (self.params["weight"] if self.affine else 1.0)
            shift = -self.running_mean * scale + (self.params["bias"] if self.affine else 0.0)
            y = x3 * scale.astype(dtype)[:, None]
            y += shift.astype(dtype)[:, None]
            self._saved = None
        return y.reshape(x.shape)

    def _update_running_stats(self, mean, var_unbiased) -> None:
        self.num_batches_tracked[...] += 1
        f = (1.0 / int(self.num_batches_tracked) if self.momentum is None
             else self.momentum)
        for a, batch in ((self.running_mean, mean), (self.running_var, var_unbiased)):
            a[...] = (1.0 - f) * a + f * batch

    def backward(self, dy):
        """dx of the batch-statistics forward (training mode); adds dweight and dbias."""
        if self._saved is None:
            raise RuntimeError(_NO_FORWARD)
        xhat, invstd, shape = self._saved
        dy = _args._as_array("grad_output", dy)
        _check_grad_output(self, dy, shape)
        N, C, H, W = shape
        m = N * H * W
        if m == 0:
            if self.affine:
                for key in ("weight", "bias"):
                    self._accumulate(key, np.zeros_like(self.params[key]))
            return np.zeros(shape, _args._result_dtype(dy, *self.params.values()))
        dtype = xhat.dtype
        dy3 = dy.astype(dtype, copy=False).reshape(N, C, H * W)
        db = _channel_sum(dy3)
        dw = _channel_sum(dy3, xhat)
        w = self.params["weight"].astype(np.float64) if self.affine else 1.0
        # dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), per channel
        dx = xhat * (-dw / m).astype(dtype)[:, None]
        dx += dy3
        dx -= (db / m).astype(dtype)[:, None]
        dx *= (w * invstd).astype(dtype)[:, None]
        if self.affine:
            pdtype = self.params["weight"].dtype
            self._accumulate("weight", dw.astype(pdtype))
            self._accumulate("bias", db.astype(pdtype))
        return dx.reshape(shape)

    def _forget(self):
        self._saved = None

    def __repr__(self):
        return (f"BatchNorm2d({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats})")


# Layers that keep no reference to their input (only their output, indices or its shape).
_KEEP_NO_INPUT = (ReLU, MaxPool2d, AvgPool2d, BatchNorm2d)


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    A list of layers as ``torch.nn.Sequential`` is: ``len(seq)``, iteration,
    ``seq[i]`` (negative too), ``seq[i:j]`` (a new Sequential of the same layer objects),
    ``seq[i] = layer``, ``del seq[i]``, ``append``, ``extend`` and ``insert``.

    Parameters
    ----------
    *layers : Module
        Layers, not losses (a loss is called on the Sequential's output).
    """

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            _check_layer(f"layers[{i}]", layer)
        self.layers = list(layers)

    def children(self):
        return self.layers

    def _index(self, i) -> int:
        if not _args._is_int(i):
            raise TypeError(f"Sequential indices must be ints or slices, got {i!r}")
        n = len(self.layers)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a Sequential of {n} layers")
        return int(i) % n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(*self.layers[i])
        return self.layers[self._index(i)]

    def __setitem__(self, i, layer) -> None:
        i = self._index(i)
        self.layers[i] = _check_layer("layer", layer)

    def __delitem__(self, i) -> None:
        if isinstance(i, slice):
            del self.layers[i]
        else:
            del self.layers[self._index(i)]

    def __len__(self):
        return len(self.layers)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def append(self, layer: Module) -> Sequential:
        """Add ``layer`` at the end; returns this Sequential."""
        self.layers.append(_check_layer("layer", layer))
        return self

    def extend(self, layers) -> Sequential:
        """Add each of ``layers`` at the end; returns this Sequential."""
        layers = list(layers)
        for i, layer in enumerate(layers):
            _check_layer(f"layers[{i}]", layer)
        self.layers.extend(layers)
        return self

    def insert(self, index: int, layer: Module) -> Sequential:
        """Put ``layer`` before position ``index`` (``-len <= index <= len``)."""
        n = len(self.layers)
        if not _args._is_int(index):
            raise TypeError(f"index must be an int, got {index!r}")
        if not -n <= index <= n:
            raise IndexError(f"index {index} is out of range for inserting into a "
                             f"Sequential of {n} layers")
        self.layers.insert(int(index) + n if index < 0 else int(index),
                           _check_layer("layer", layer))
        return self

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

    #: Called with each layer after its backward has added its gradients, when set (by
    #: :class:`fastconv.dist.GradientSync`, to start their allreduce during the backward).
    _grad_hook = None

    def backward(self, dy):
        steps = list(self._steps())
        packed = dsum = None  # deltas already in the next (earlier) Conv2d's layout
        hook = self._grad_hook
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
            if hook is not None:
                hook(layer)
        return dy

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


class CrossEntropyLoss(Module):
    """Softmax followed by cross-entropy with integer labels, computed stably, as
    ``torch.nn.CrossEntropyLoss`` (class-index targets).

    ``loss = loss_fn(logits, labels)`` returns ``logsumexp(z) - z[label]`` per row,
    averaged (``reduction='mean'``) or summed (``'sum'``), as a NumPy float64 scalar (0-d,
    with ``.item()``; torch returns a 0-d tensor in the logits' dtype).  ``backward()``
    returns ``dL/dlogits = softmax(z) - onehot(label)``, divided by N for the mean, in the
    logits' dtype: the ``dy`` to hand to ``model.backward``.

    Parameters
    ----------
    reduction : ``'mean'`` or ``'sum'``
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if not isinstance(reduction, str):
            raise TypeError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self._saved = None

    def __call__(self, logits, labels):
        return self.forward(logits, labels)

    def forward(self, logits, labels) -> np.float64:
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
        return np.float64(total / max(len(y), 1) if self.reduction == "mean" else total)

    def backward(self, grad_output=1.0):
        """``dL/dlogits`` of the last forward, times ``grad_output`` (a real number: the
        gradient of something downstream with respect to the loss; 1 by default)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        if not (isinstance(grad_output, (int, float, np.integer, np.floating))
                and not isinstance(grad_output, (bool, np.bool_))):
            raise TypeError(f"grad_output must be a real number, got {grad_output!r}")
        p, y = self._saved
        d = p.copy()
        d[np.arange(len(y)), y] -= 1
        if self.reduction == "mean":
            d /= max(len(y), 1)
        if grad_output != 1:
            d *= d.dtype.type(grad_output)
        return d

    def __repr__(self):
        return f"{type(self).__name__}(reduction={self.reduction!r})"


#: Another name of :class:`CrossEntropyLoss` (the same class), kept for existing code.
SoftmaxCrossEntropy = CrossEntropyLoss


def _check_layer(name: str, layer):
    """``layer`` if it can be a :class:`Sequential`'s layer: a Module, not a loss."""
    if not isinstance(layer, Module):
        raise TypeError(f"{name} must be a fastconv.nn.Module, got {type(layer).__name__} "
                        f"{layer!r}")
    if isinstance(layer, CrossEntropyLoss):
        raise TypeError(f"{name} is a loss ({layer!r}), not a layer: call it on the "
                        "Sequential's output instead")
    return layer
