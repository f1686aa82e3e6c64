"""fastconv's convolution inside PyTorch: an autograd function and a drop-in ``Conv2d``.

>>> import torch, fastconv.torch as fct
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU())
>>> model = fct.convert(model)               # its Conv2d now runs fastconv, same weights
>>> type(model[0]).__name__, model[0].weight.shape
('Conv2d', torch.Size([8, 1, 3, 3]))
>>> y = fct.conv2d(torch.ones(2, 1, 5, 5), torch.ones(4, 1, 3, 3), padding=1)
>>> tuple(y.shape)
(2, 4, 5, 5)

* :func:`conv2d` has ``torch.nn.functional.conv2d``'s signature and semantics, for CPU
  float32 and float64 tensors (any strides), and is differentiable with respect to any of
  ``input``, ``weight`` and ``bias``: its backward computes only the gradients autograd
  asks for (``ctx.needs_input_grad``).
* :class:`Conv2d` is a subclass of ``torch.nn.Conv2d`` whose forward pass runs
  :func:`conv2d`: the same constructor, parameters, initialisation, ``state_dict`` keys
  and ``padding_mode`` handling.
* :func:`convert` turns every ``torch.nn.Conv2d`` of a model into a :class:`Conv2d` in
  place, and warns once, naming them, about those it leaves alone; and every
  ``torch.nn.Sequential`` holding a ``Conv2d, ReLU, MaxPool2d(2)`` run into a
  :class:`Sequential`, which runs such runs as one :func:`conv2d_relu_max_pool2d`
  (:func:`fused_runs` names them).
* :func:`conv2d_relu_max_pool2d` is ``max_pool2d(relu(conv2d(...)), 2)`` in one
  differentiable pass: the convolution writes its output in the order the 2x2 pool reads
  (fastconv's "pool order"), and the backward pass routes the deltas back through pool
  and ReLU straight into the layout the convolution's backward reads.

How tensors cross (docs/torch.md): ``tensor.detach().numpy()`` and ``torch.from_numpy``
share memory, so no array is copied on the way in or out; fastconv reads any strides.  The
forward pass keeps for dW what fastconv's own layers keep (``fastconv.conv.saved_kind``):
the zero-padded channels-last input it packed anyway (in a workspace reused between
calls), or the input tensor itself, both with ``ctx.save_for_backward`` (autograd's
version checks and saved-tensor hooks apply).  The backward pass packs the deltas once
for dX and dW (``fastconv.conv.backward_saved``).

It has no second derivative: differentiating its backward pass (``create_graph=True``
and a backward through the gradients) raises a RuntimeError that says so.

Legend: ``x`` input (N, C, H, W), ``w`` weight (K, C/groups, R, S), ``b`` bias (K,),
``y`` output (N, K, OH, OW), ``dy``, ``dx``, ``dw``, ``db`` the gradients of the loss
with respect to them.
"""

from __future__ import annotations

import collections
import threading
import warnings
import weakref

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastconv.torch needs PyTorch, which is not installed: "
                      "pip install 'fastconv[torch]'") from e

import numpy as np

from . import conv as _conv
from . import layouts as _layouts
from . import plan as _plan
from . import pool as _pool
from ._args import _check_bias

__all__ = ["Conv2d", "Sequential", "conv2d", "conv2d_relu_max_pool2d", "convert",
           "fused_ok", "fused_runs", "twin"]

#: The dtypes fastconv computes in.
DTYPES = (torch.float32, torch.float64)

_NO_DOUBLE_BACKWARD = (
    "fastconv.torch.conv2d has no second derivative: its backward pass runs fastconv's "
    "kernels, which autograd cannot differentiate again. For gradients of gradients "
    "(create_graph=True followed by a backward through the gradients: gradient penalties, "
    "Hessian-vector products), use torch.nn.functional.conv2d / torch.nn.Conv2d.")


def _check(input, weight, bias) -> None:
    """TypeError or ValueError, naming what was received, unless ``input``, ``weight``
    and ``bias`` (or None) are dense CPU tensors of one dtype, float32 or float64."""
    tensors = {"input": input, "weight": weight, "bias": bias}
    for name, t in tensors.items():
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.device.type != "cpu":
            raise ValueError(f"fastconv.torch.conv2d runs on the CPU only; {name} is on "
                             f"{t.device}: move it with .cpu(), or use "
                             "torch.nn.functional.conv2d on that device")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; fastconv.torch.conv2d computes in "
                            "torch.float32 or torch.float64: convert it (.float() or "
                            ".double()), or use torch.nn.functional.conv2d")
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{name} {d}" for name, d in dtypes.items())
        raise TypeError(f"input, weight and bias must have one dtype (as in "
                        f"torch.nn.functional.conv2d), got {got}")


def _np(t):
    """The NumPy view of a CPU tensor (no copy), or None."""
    return None if t is None else t.detach().numpy()


def _tensor(a):
    """A NumPy result as a tensor (no copy), or None."""
    return None if a is None else torch.from_numpy(a)


def _differentiable(input, weight, bias) -> bool:
    """Whether autograd records this call: grad mode on and a tensor requiring grad."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution by fastconv, like ``torch.nn.functional.conv2d``, differentiable.

    Parameters
    ----------
    input : Tensor (N, C, H, W), or (C, H, W) for one unbatched image
    weight : Tensor (K, C/groups, R, S)
    bias : Tensor (K,), optional
        All three dense CPU tensors of one dtype, float32 or float64, any strides; any of
        them may require grad.
    stride, dilation : int or (h, w) pair, >= 1
    padding : int or (h, w) pair >= 0, or ``'valid'`` or ``'same'`` (stride 1)
    groups : int dividing C and K

    Returns
    -------
    Tensor (N, K, OH, OW), or (K, OH, OW) for unbatched input
        In the input's dtype; channels-last (a copy) if the input or the weight is, as
        torch's is.  Its backward pass computes the gradients autograd needs: dX, dW
        and db by fastconv's plans for this geometry.

    Raises
    ------
    TypeError
        Not tensors, dtypes other than float32/float64, mixed dtypes, sparse tensors.
    ValueError
        Tensors not on the CPU, and every geometry error of ``fastconv.conv2d``.
    """
    _check(input, weight, bias)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if _differentiable(input, weight, bias):
        y = _Conv2d.apply(input, weight, bias, stride, padding, dilation, groups)
    else:  # nothing to differentiate: the functional API, which keeps nothing
        y = _tensor(_conv.conv2d(_np(input), _np(weight), _np(bias), stride, padding,
                                 dilation, groups))
    if _channels_last(input) or _channels_last(weight):  # torch's rule for its output
        y = y.contiguous(memory_format=torch.channels_last)
    return y.squeeze(0) if unbatched else y


def _channels_last(t) -> bool:
    """Whether ``t`` is laid out channels-last (and not also contiguous), which makes
    ``torch.nn.functional.conv2d`` write its output channels-last."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


class _Workspaces:
    """Workspaces (``fastconv.layouts.Workspace``: the packed input, the packed deltas,
    dW's partial sums) kept between calls by geometry and dtype, so that a training loop
    reuses their memory instead of allocating (and page-faulting) about 10 MB a step.

    A call takes one (:meth:`take`) and owns it until it hands it back (:meth:`give`):
    at once if it keeps nothing in it, else when the packed input it saved for backward is
    freed, which autograd does after the backward pass (or with the graph).  At most
    ``per_key`` free workspaces are kept per geometry, for the ``keys`` geometries used
    last.
    """

    def __init__(self, keys: int = 16, per_key: int = 2):
        self.keys, self.per_key = keys, per_key
        self._free: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, key) -> _layouts.Workspace:
        with self._lock:
            free = self._free.get(key)
            if free:
                self._free.move_to_end(key)
                return free.pop()
        return _layouts.Workspace()

    def give(self, key, ws: _layouts.Workspace) -> None:
        with self._lock:
            free = self._free.setdefault(key, [])
            self._free.move_to_end(key)
            if len(free) < self.per_key:
                free.append(ws)
            while len(self._free) > self.keys:
                self._free.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


_workspaces = _Workspaces()


def _keep(ctx, a: np.ndarray, key, ws: _layouts.Workspace):
    """A tensor over ``a``, an array of workspace ``ws``, for ``ctx.save_for_backward``:
    ``ws`` is this node's (``ctx.ws``; ``ctx.owns.alive`` while it is) until autograd
    frees the tensor, which hands ``ws`` back to the pool under ``key``."""
    view = a.view()
    ctx.ws, ctx.owns = ws, weakref.finalize(view, _workspaces.give, key, ws)
    ctx.owns.atexit = False
    return torch.from_numpy(view)


class _Conv2d(torch.autograd.Function):
    """The autograd node of :func:`conv2d`.  Forward keeps what its backward reads:

    * ``ctx.geo``: the validated geometry (``fastconv.ConvGeometry``), whose plan
      (``fastconv.plan.plan_for``) runs every pass;
    * ``save_for_backward(weight, input or None, xp or None)``: the weight, for dX; for
      dW, only if the weight needs a gradient, the zero-padded channels-last input ``xp``
      that the forward pass packed (if its dW algorithm reads that layout, as a tensor
      over the workspace it lives in), or else the input tensor itself.  The input is
      also kept whenever it requires grad (see :func:`_no_double_backward`).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        x, w, b = input.detach().numpy(), _np(weight), _np(bias)
        geo = _conv.conv_geometry(x.shape, w.shape, stride, padding, dilation, groups)
        need_dx, need_dw = ctx.needs_input_grad[:2]
        ctx.geo, ctx.ws, xp = geo, None, None
        if need_dw and _conv.saved_kind(geo, x.dtype) == "packed":
            # The forward pass of fastconv's layers, which returns the packed input.
            key = (geo, x.dtype)
            ws = _workspaces.take(key)
            y, saved, _ = _conv.conv2d_saving(x, w, b, stride, padding, dilation, groups,
                                              workspace=ws)
            if isinstance(saved, np.ndarray) and saved is not x:
                # The packed input lives in ws: ws is this node's until xp is freed (the
                # tensor holds the view), which hands ws back.
                xp = _keep(ctx, saved, key, ws)
            else:
                _workspaces.give(key, ws)
        else:  # nothing of the forward pass to keep: the plan's NCHW forward pass
            _check_bias(b, geo.K)  # torch's message, before the plan's own check
            y = _plan.plan_for(geo, x.dtype).forward(x, w, b)
        # The input for dW if its NCHW form is what dW reads; and whenever it requires
        # grad, so that a second backward through dW reaches the error it must raise.
        keep_input = need_dx or (need_dw and xp is None)
        ctx.save_for_backward(weight, input if keep_input else None, xp)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, grad_output):
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        weight, input, xp = ctx.saved_tensors
        geo, w = ctx.geo, _np(weight)
        dy = grad_output.detach().numpy().astype(w.dtype, copy=False)
        dx = dw = db = None
        if need_dw and xp is not None:
            # Scratch arrays in the packed input's workspace while this node owns it;
            # saved-tensor hooks may have copied xp (in any layout) and let the original go.
            layout = _conv.delta_layout(geo, need_dx)
            if ctx.owns.alive:
                dyp = _conv.pack_deltas(dy, layout, ctx.ws)
                ws = ctx.ws
            else:
                dyp, ws = _conv.pack_deltas(dy, layout), None
            dx, dw, db = _conv.backward_saved(np.ascontiguousarray(xp.numpy()), geo, w, dyp,
                                              layout, need_dx, ws)
        else:  # the plan's passes on NCHW arrays, each only if needed
            p = _plan.plan_for(geo, dy.dtype)
            if need_dw:
                dw = p.grad_weight(_np(input), dy)  # its dW reads NCHW
            if need_dx:
                dx = p.grad_input(dy, w)
            if need_db:
                db = p.grad_bias(dy)
        return _gradients(ctx, grad_output, dx, dw, db)


def _gradients(ctx, grad_output, dx, dw, db) -> tuple:
    """What an autograd node's ``backward`` returns for ``(input, weight, bias, stride,
    padding, dilation, groups)``: the gradients autograd asked for as tensors, the others
    None; made to fail a backward pass through them (:func:`_no_double_backward`) when
    they are computed with ``create_graph=True``."""
    grads = [_tensor(g) if need else None
             for g, need in zip((dx, dw, db), ctx.needs_input_grad[:3], strict=True)]
    if torch.is_grad_enabled():
        grads = _no_double_backward(grads, (grad_output, *ctx.saved_tensors))
    return (*grads, None, None, None, None)


def _no_double_backward(grads: list, sources) -> list:
    """``grads`` as tensors that require grad through a node that raises
    :data:`_NO_DOUBLE_BACKWARD` when a backward pass reaches it, and whose inputs are
    also the ``sources`` the gradients depend on (the deltas, the weight, the input) that
    require grad: a backward pass towards any of them meets the error.
    (``torch.autograd.function.once_differentiable`` does this with the deltas only.)"""
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    delayed = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)
    if delayed is None:  # pragma: no cover - a torch without it: refuse at once
        raise RuntimeError(_NO_DOUBLE_BACKWARD)
    inputs = [grads[i].detach().requires_grad_() for i in present]
    inputs += [t for t in sources if t is not None and t.requires_grad]
    wrapped = delayed(_NO_DOUBLE_BACKWARD.encode(), len(inputs))(*inputs)
    if isinstance(wrapped, torch.Tensor):
        wrapped = (wrapped,)
    out = list(grads)
    for i, g in zip(present, wrapped, strict=False):
        out[i] = g
    return out


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` computed by fastconv (:func:`conv2d`).

    Everything but the computation is ``torch.nn.Conv2d``'s: the constructor and its
    arguments (``padding_mode`` too: the input is padded by ``torch.nn.functional.pad``
    first, as torch does), the parameters ``weight`` (K, C/groups, R, S) and ``bias`` (K,),
    their initialisation, the ``state_dict`` keys (state dicts load both ways) and the
    representation, named ``fastconv.torch.Conv2d``.  Its tensors must be on the CPU, in
    float32 or float64.
    """

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                            mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                      self.groups)

    def _get_name(self):
        return "fastconv.torch.Conv2d"


def conv2d_relu_max_pool2d(input, weight, bias=None, stride=1, padding=0, dilation=1,
                           groups=1):
    """``max_pool2d(relu(conv2d(input, weight, bias, ...)), 2)`` in one pass: fastconv's
    convolution writes its output in pool order (``fastconv.conv.conv2d_saving(...,
    pool_order=True)``), and the 2x2 max pool and ReLU run on that; its backward pass
    routes the deltas back through the pool and ReLU straight into the layout the
    convolution's backward reads (``fastconv.conv.backward_pool_order`` or
    ``backward_saved``).

    Parameters
    ----------
    input : Tensor (N, C, H, W)
        A batch whose convolution output size is even (``fastconv.conv.pool_order_ok``):
        see :func:`fused_ok`.  The other arguments are :func:`conv2d`'s.

    Returns
    -------
    Tensor (N, K, OH/2, OW/2)
        The same values as ``torch.nn.functional.max_pool2d(torch.relu(conv2d(...)), 2)``
        (max and ReLU commute), channels-last if the input or the weight is.

    Raises
    ------
    ValueError
        If :func:`fused_ok` is false for these arguments, and as :func:`conv2d`.
    TypeError
        As :func:`conv2d`.
    """
    _check(input, weight, bias)
    if input.dim() != 4:
        raise ValueError(f"conv2d_relu_max_pool2d needs a batch (N, C, H, W), got input of "
                         f"shape {tuple(input.shape)}")
    geo = _conv.conv_geometry(tuple(input.shape), tuple(weight.shape), stride, padding,
                              dilation, groups)
    if not _conv.pool_order_ok(geo):
        raise ValueError(f"conv2d_relu_max_pool2d needs a batch (N, C, H, W) whose "
                         f"convolution output has an even, non-empty size that fastconv's "
                         f"parallel kernels write (fastconv.conv.pool_order_ok); got input "
                         f"{tuple(input.shape)}, output {geo.OH}x{geo.OW}")
    if _differentiable(input, weight, bias):
        y = _Conv2dReLUMaxPool2d.apply(input, weight, bias, stride, padding, dilation,
                                       groups)
    else:  # nothing to differentiate: keep nothing
        key = (geo, "pool", input.dtype)
        ws = _workspaces.take(key)
        y4, _, geo = _conv.conv2d_saving(_np(input), _np(weight), _np(bias), stride,
                                         padding, dilation, groups, workspace=ws,
                                         pool_order=True)
        _workspaces.give(key, ws)
        y = torch.from_numpy(_pool.max_pool2x2_relu_pool_order(
            y4, (geo.N, geo.K, geo.OH, geo.OW))[0])
    if _channels_last(input) or _channels_last(weight):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def fused_ok(input, weight, stride=1, padding=0, dilation=1, groups=1) -> bool:
    """Whether :func:`conv2d_relu_max_pool2d` takes these arguments: a 4-D CPU float32
    or float64 batch and weight of one dtype whose convolution output has an even,
    non-empty size that fastconv writes in pool order (``fastconv.conv.pool_order_ok``).
    False, never an error, for anything else (the unfused modules then raise theirs)."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if (input.dim() != 4 or input.layout != torch.strided or input.device.type != "cpu"
            or input.dtype not in DTYPES or weight.dtype != input.dtype):
        return False
    try:
        geo = _conv.conv_geometry(tuple(input.shape), tuple(weight.shape), stride, padding,
                                  dilation, groups)
    except (TypeError, ValueError):
        return False
    return _conv.pool_order_ok(geo)


class _Conv2dReLUMaxPool2d(torch.autograd.Function):
    """The autograd node of :func:`conv2d_relu_max_pool2d`.  Forward keeps:

    * ``ctx.geo`` (the convolution's), ``ctx.kind`` (``fastconv.conv.saved_kind`` with
      pool order: ``'pixels'``, ``'packed'`` or ``'input'``), ``ctx.px`` (the
      ``PixelInput`` of the pixel path, its array saved as below);
    * ``ctx.y`` and ``ctx.pos``: a private copy of the pooled output (whose sign is the
      ReLU's mask; a copy, so that later in-place operations on the returned tensor, which
      torch's own pool allows, change nothing here) and each maximum's window position;
    * ``save_for_backward(weight, saved)``: the weight, and what dW reads: the packed
      input or the pixel path's flattened input (tensors over the workspace they live
      in, which goes back to the pool when autograd frees them), or the input itself.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        x, w, b = input.detach().numpy(), _np(weight), _np(bias)
        geo = _conv.conv_geometry(x.shape, w.shape, stride, padding, dilation, groups)
        key = (geo, "pool", x.dtype)
        ws = _workspaces.take(key)
        y4, saved, geo = _conv.conv2d_saving(x, w, b, stride, padding, dilation, groups,
                                             workspace=ws, pool_order=True)
        y, pos = _pool.max_pool2x2_relu_pool_order(y4, (geo.N, geo.K, geo.OH, geo.OW))
        ctx.geo, ctx.kind = geo, _conv.saved_kind(geo, y.dtype, pool_order=True)
        ctx.y, ctx.pos, ctx.px, ctx.ws = y.copy(), pos, None, None
        if ctx.kind == "input":  # the input itself: nothing of ws is kept
            _workspaces.give(key, ws)
            kept = input
        else:
            if ctx.kind == "pixels":
                ctx.px, arr = saved, saved.xf
            else:
                arr = saved
            kept = _keep(ctx, arr, key, ws)
        # The input too whenever it requires grad, so that a second backward through dW
        # reaches the error it must raise.
        ctx.save_for_backward(weight, kept, input if ctx.needs_input_grad[0] else None)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, grad_output):
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        weight, kept, _ = ctx.saved_tensors
        geo, w, y, pos = ctx.geo, _np(weight), ctx.y, ctx.pos
        dy = np.ascontiguousarray(grad_output.detach().numpy(), y.dtype)
        shape = (geo.N, geo.K, geo.OH, geo.OW)
        ws = ctx.ws if ctx.ws is not None and ctx.owns.alive else None
        if ctx.kind == "pixels":
            g, dsum = _pool.max_pool2x2_relu_pool_order_backward(dy, pos, y)
            pooled = _layouts.PooledDeltas(g, pos.reshape(geo.N, geo.K, -1))
            px = ctx.px._replace(xf=np.ascontiguousarray(kept.numpy()))
            dx, dw, db = _conv.backward_pool_order(px, geo, w, pooled, need_dx, dsum)
        elif ctx.kind == "packed":
            layout = _conv.delta_layout(geo, need_dx)
            out = None if ws is None else ws.zeros("dy", layout.shape, y.dtype)
            dyp, dsum = _pool.max_pool2x2_backward_packed(dy, pos, y, True, layout, shape,
                                                          out, positions=True)
            dx, dw, db = _conv.backward_saved(np.ascontiguousarray(kept.numpy()), geo, w,
                                              dyp, layout, need_dx, ws, dsum)
        else:
            g, dsum = _pool.max_pool2x2_relu_pool_order_backward(dy, pos, y)
            dy4 = _layouts.PooledDeltas(g, pos.reshape(geo.N, geo.K, -1)).expand()
            dx, dw, db = _conv.backward_input(kept.detach().numpy(), geo, w,
                                              _layouts.from_pool_order(dy4, geo.OH, geo.OW),
                                              need_dx, dsum)
        return _gradients(ctx, grad_output, dx, dw, db)


def _no_hooks(*modules) -> bool:
    """Whether no forward or backward hooks, the modules' own or global, would run."""
    m = torch.nn.modules.module
    if any(getattr(m, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")):
        return False
    return not any(getattr(mod, name, None) for mod in modules for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _is_fusable_pool(pool) -> bool:
    """Whether ``pool`` is a plain ``torch.nn.MaxPool2d`` of 2x2 windows at stride 2,
    unpadded, undilated, floor mode, without indices."""
    return (type(pool) is torch.nn.MaxPool2d and _pair(pool.kernel_size) == (2, 2)
            and _pair(pool.stride if pool.stride is not None else 2) == (2, 2)
            and _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and not pool.return_indices)


def _fusable_run(conv, relu, pool) -> bool:
    """Whether modules ``conv``, ``relu``, ``pool`` (in this order in a Sequential) run as
    one :func:`conv2d_relu_max_pool2d`: a :class:`Conv2d` with zero padding mode, a
    ``torch.nn.ReLU``, a 2x2 ``torch.nn.MaxPool2d`` (:func:`_is_fusable_pool`), no hooks."""
    return (type(conv) is Conv2d and conv.padding_mode == "zeros"
            and type(relu) is torch.nn.ReLU and _is_fusable_pool(pool)
            and _no_hooks(conv, relu, pool))


class Sequential(torch.nn.Sequential):
    """``torch.nn.Sequential`` that runs each ``Conv2d, ReLU, MaxPool2d(2)`` run of its
    modules as one :func:`conv2d_relu_max_pool2d` when it can (:func:`convert` makes it).

    Its modules, their indices and the ``state_dict`` keys are those of the
    ``torch.nn.Sequential`` it was: only the forward pass differs.  Which runs fuse is
    decided at every call, for the modules it holds then and the actual input: a
    :class:`Conv2d` (zero padding mode), a ``torch.nn.ReLU`` (``inplace`` or not) and a
    ``torch.nn.MaxPool2d`` with 2x2 windows, stride 2, no padding, dilation 1, floor mode
    and no indices, none of them with hooks (nor global module hooks), on a 4-D input
    whose convolution output has an even size (:func:`fused_ok`); anything else runs
    module by module, as ``torch.nn.Sequential`` does.  The modules called on their own
    compute as they always do.
    """

    def forward(self, input):
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            conv = mods[i]
            if (i + 2 < len(mods) and _fusable_run(conv, mods[i + 1], mods[i + 2])
                    and fused_ok(input, conv.weight, conv.stride, conv.padding,
                                 conv.dilation, conv.groups)):
                input = conv2d_relu_max_pool2d(input, conv.weight, conv.bias, conv.stride,
                                               conv.padding, conv.dilation, conv.groups)
                i += 3
            else:
                input = conv(input)
                i += 1
        return input

    def _get_name(self):
        return "fastconv.torch.Sequential"


def _why_not(module) -> str | None:
    """Why :func:`convert` leaves ``module`` (a ``torch.nn.Conv2d`` or subclass) as it is,
    or None if it converts it."""
    if type(module) is not torch.nn.Conv2d:
        return f"{type(module).__name__}, a subclass of torch.nn.Conv2d with its own behaviour"
    params = [p for p in (module.weight, module.bias) if p is not None]
    if any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in params):
        return "uninitialised parameters"
    for p in params:
        if p.device.type != "cpu":
            return f"parameters on {p.device}"
        if p.dtype not in DTYPES:
            return f"dtype {p.dtype}"
    return None


def convert(model):
    """Make every ``torch.nn.Conv2d`` of ``model`` (the model itself included) a
    :class:`Conv2d`, and every ``torch.nn.Sequential`` holding a ``Conv2d, ReLU,
    MaxPool2d(2)`` run a :class:`Sequential`, in place, and return ``model``.

    The modules stay the same objects, with the same parameters, buffers, hooks and
    mode: only their class changes, so an optimizer made before keeps working, and the
    ``state_dict`` keys and module indices stay.  Layers fastconv cannot run stay
    ``torch.nn.Conv2d``, with one warning that names each and why: parameters off the
    CPU or of another dtype than float32/float64, and subclasses of ``torch.nn.Conv2d``
    (whose forward pass may not be a convolution's).

    A converted :class:`Sequential` runs each run of three consecutive modules exactly
    ``Conv2d`` (converted, zero padding mode), ``torch.nn.ReLU``, ``torch.nn.MaxPool2d``
    (2x2 windows, stride 2, no padding, dilation 1, floor mode, no indices), none with
    hooks, as one :func:`conv2d_relu_max_pool2d` (the convolution writes pool order, as
    fastconv's own ``Sequential`` does) whenever the input allows it (:func:`fused_ok`),
    and module by module otherwise.  The three modules stay in place, unchanged: called on
    their own they compute as before.  Subclasses of ``torch.nn.Sequential`` are left
    alone (their forward pass may differ).

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    model
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    left = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Conv2d) or isinstance(module, Conv2d):
            continue
        reason = _why_not(module)
        if reason is None:
            module.__class__ = Conv2d
        else:
            left.append(f"{name or '(the model itself)'} ({reason})")
    for module in model.modules():
        if type(module) is torch.nn.Sequential:
            mods = list(module._modules.values())
            if any(_fusable_run(*mods[i:i + 3]) for i in range(len(mods) - 2)):
                module.__class__ = Sequential
    if left:
        warnings.warn(f"fastconv.torch.convert left {len(left)} torch.nn.Conv2d layer(s) to "
                      f"torch: {'; '.join(left)}", stacklevel=2)
    return model


def fused_runs(model) -> list[str]:
    """The names (as in ``model.named_modules()``) of the ``Conv2d`` modules whose
    ``Conv2d, ReLU, MaxPool2d(2)`` runs a converted :class:`Sequential` of ``model`` fuses
    (:func:`convert`), if the input allows it (:func:`fused_ok`)."""
    names = {id(m): n for n, m in model.named_modules()}
    runs = []
    for module in model.modules():
        if type(module) is Sequential:
            mods = list(module._modules.values())
            i = 0
            while i < len(mods) - 2:
                if _fusable_run(*mods[i:i + 3]):
                    runs.append(names[id(mods[i])])
                    i += 3
                else:
                    i += 1
    return runs


def twin(model):
    """The plain PyTorch twin of a fastconv network: the same layers as ``torch.nn``
    modules, with the same ``state_dict`` keys.

    >>> import fastconv.torch as fct
    >>> net = fct.twin("two-conv")       # then net.load_state_dict(torch.load("model.pt"))
    >>> [type(m).__name__ for m in net][:3], tuple(net[0].weight.shape)
    (['Conv2d', 'ReLU', 'MaxPool2d'], (32, 1, 5, 5))

    ``fastconv export`` writes a checkpoint's ``state_dict`` that it loads; so does a
    :func:`convert`-ed twin, whose convolutions run fastconv.

    Parameters
    ----------
    model : str or fastconv.nn.Module
        A preset's name (``fastconv.models.MODELS``: ``'two-conv'``, ``'tiny'``): the twin
        gets PyTorch's own initial weights (from torch's random state, as
        ``torch.manual_seed`` sets it).  Or a fastconv network of ``Sequential``,
        ``Conv2d``, ``Linear``, ``ReLU``, ``MaxPool2d``, ``AvgPool2d``, ``Flatten``,
        ``Dropout`` and ``BatchNorm2d`` layers: the twin gets a copy of its parameters
        and buffers, in their dtype, and its training or eval mode.

    Returns
    -------
    torch.nn.Module
        A ``torch.nn.Sequential`` of plain ``torch.nn`` modules on the CPU.
    """
    from . import models, nn

    if isinstance(model, str):
        name = models.model_name(model)
        if name not in models.MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(models.MODELS)}")
        return _twin_layer(models.MODELS[name](seed=0), "model")
    if not isinstance(model, nn.Module):
        raise TypeError("model must be a preset's name or a fastconv.nn.Module, got "
                        f"{type(model).__name__}")
    net = _twin_layer(model, "model")
    dtypes = {a.dtype for _, a, what in model._state() if what == "parameter"}
    if dtypes == {np.dtype(np.float64)}:
        net = net.double()
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                         model.state_dict().items()})
    return net.train(model.training)


def _twin_layer(layer, where: str):
    """The ``torch.nn`` module of one fastconv layer (its children too), freshly made."""
    from . import nn

    tnn = torch.nn
    if isinstance(layer, nn.Sequential):
        return tnn.Sequential(*(_twin_layer(child, f"{where}[{i}]")
                                for i, child in enumerate(layer)))
    if isinstance(layer, nn.Conv2d):
        return tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                          **layer.conv, bias="bias" in layer.params)
    if isinstance(layer, nn.Linear):
        return tnn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
    if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
        cls = tnn.MaxPool2d if isinstance(layer, nn.MaxPool2d) else tnn.AvgPool2d
        return cls(**layer.args)
    if isinstance(layer, nn.BatchNorm2d):
        return tnn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine,
                               layer.track_running_stats)
    if isinstance(layer, nn.Dropout):
        return tnn.Dropout(layer.p)
    for ours, theirs in ((nn.ReLU, tnn.ReLU), (nn.Flatten, tnn.Flatten)):
        if isinstance(layer, ours):
            return theirs()
    raise TypeError(f"{where} is a {type(layer).__name__}, which has no torch twin here; "
                    "twin knows Sequential, Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d, "
                    "Flatten, Dropout and BatchNorm2d")
