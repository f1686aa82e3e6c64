"""Optimizers with PyTorch's update rules, updating parameter arrays in place.

``params`` is a list of :class:`fastconv.nn.Parameter` (``model.parameters()``); each
``step()`` reads the gradients that the last ``backward`` left in the layers.
"""

from __future__ import annotations

import numpy as np

from . import _checks, _state, ops
from ._args import _bool, _real
from .nn import Parameter

__all__ = ["SGD", "Adam", "Optimizer"]


class Optimizer:
    """Base class: the parameters, the learning rate and the step count.

    Parameters
    ----------
    params : iterable of :class:`fastconv.nn.Parameter`, not empty
        ``model.parameters()``.
    lr : finite real number >= 0
    """

    def __init__(self, params, lr):
        if isinstance(params, (Parameter, np.ndarray)) or not hasattr(params, "__iter__"):
            raise TypeError(f"params must be an iterable of Parameters (model.parameters()), "
                            f"got {type(params).__name__}")
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list (params)")
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}] must be a fastconv.nn.Parameter "
                                f"(model.parameters()), got {type(p).__name__}")
        self.lr = _real("lr", lr)
        self.step_count = 0

    def _grads(self) -> list:
        """``(parameter, data, grad)`` of every parameter, all checked before any update."""
        out = []
        for p in self.params:
            if p.grad is None:
                raise RuntimeError(f"parameter {p.name!r} has no gradient: run backward() "
                                   "before step()")
            g = np.asarray(p.grad)
            if g.shape != p.data.shape:
                raise ValueError(f"the gradient of parameter {p.name!r} has shape {g.shape}, "
                                 f"the parameter {p.data.shape}")
            out.append((p, p.data, g))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state as flat arrays (for ``.npz`` checkpoints)."""
        return {"step_count": np.array(self.step_count), "lr": np.array(self.lr)}

    def _state_arrays(self) -> list[tuple[str, int, bool, str]]:
        """The arrays of the state besides ``step_count`` and ``lr``: (key, index of its
        parameter, whether it is required, its value rule for
        :func:`fastconv._state.array_like`)."""
        return []

    def check_state_dict(self, state, *, prefix: str | None = None) -> dict:
        """Check ``state`` against this optimizer, changing nothing.

        Parameters
        ----------
        state : mapping of str to array_like
            ``step_count`` (an integer >= 0), ``lr`` (a finite number >= 0) and the
            optimizer's arrays (see the subclass), each of exactly its parameter's shape (no
            broadcasting) with a real dtype that casts to the parameter's with
            ``casting='same_kind'``.  No other keys.
        prefix : str, optional
            Name keys in messages as ``prefix + key`` (a checkpoint's ``"optim/"``) instead
            of ``state_dict[key]``.

        Returns
        -------
        dict
            ``step_count`` as an int, ``lr`` as a float, and the arrays as new C-contiguous
            arrays of their parameters' dtypes.

        Raises
        ------
        ValueError, TypeError
            For the first entry that breaks a rule, naming it, what it holds and the rule.
        """
        arrays = self._state_arrays()
        _state.check_keys(state, {"step_count", "lr"} | {k for k, _, req, _ in arrays if req},
                          {k for k, _, req, _ in arrays if not req},
                          owner=f"the {type(self).__name__} optimizer", prefix=prefix)
        checked = {"step_count": _state.integer("step_count", state["step_count"],
                                                prefix=prefix),
                   "lr": _state.nonnegative_number("lr", state["lr"], prefix=prefix)}
        for key, i, _, rule in arrays:
            if key in state:
                checked[key] = _state.array_like(
                    key, state[key], self.params[i].data,
                    f"its parameter {self.params[i].name!r}", rule=rule, prefix=prefix)
        return checked

    def load_state_dict(self, state) -> None:
        """Load ``state`` (from :meth:`state_dict`).

        Everything is checked first (:meth:`check_state_dict`): when it raises, nothing has
        changed.
        """
        checked = self.check_state_dict(state)
        self.step_count, self.lr = checked["step_count"], checked["lr"]
        self._load_arrays(checked)

    def _load_arrays(self, checked: dict) -> None:
        """Take the arrays of a checked state."""


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD``::

        g = grad + weight_decay * p
        buf = g (first step), else momentum * buf + g
        p -= lr * (g + momentum * buf if nesterov else buf)      (momentum > 0)
        p -= lr * g                                              (momentum = 0)

    Parameters
    ----------
    params : iterable of :class:`fastconv.nn.Parameter`
    lr : finite real number >= 0
    momentum, weight_decay : finite real numbers >= 0
    nesterov : bool
        Nesterov momentum; needs ``momentum > 0``.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        momentum = _real("momentum", momentum)
        weight_decay = _real("weight_decay", weight_decay)
        nesterov = _bool("nesterov", nesterov)
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.buffers = [None] * len(self.params)

    def step(self) -> None:
        for i, (_, p, g) in enumerate(self._grads()):
            first = self.momentum and self.buffers[i] is None
            if first:
                self.buffers[i] = np.empty(p.shape, p.dtype)
            buf = self.buffers[i]
            if buf is not None:  # the kernel reads and writes it flat, as long as p
                _checks.array(f"momentum buffer {i}", buf, p.shape, p.dtype, writeable=True)
            if p.flags.c_contiguous:
                # One fused pass (a NumPy version makes five over the larger layers).
                ops.sgd_update(p, g, buf, self.lr, self.momentum, self.weight_decay,
                               self.nesterov, bool(first))
            else:
                self._step_numpy(p, g, buf, bool(first))
        self.step_count += 1

    def _step_numpy(self, p, g, buf, first):
        """The same update for parameters the kernel cannot update in place."""
        g = g + self.weight_decay * p
        if self.momentum:
            if first:
                buf[...] = g
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= (self.lr * g).astype(p.dtype, copy=False)

    def state_dict(self):
        state = super().state_dict()
        for i, buf in enumerate(self.buffers):
            if buf is not None:
                state[f"momentum_buffer.{i}"] = buf.copy()
        return state

    def _state_arrays(self):
        # As in PyTorch, a parameter may have no buffer yet (it starts at its next step).
        return [(f"momentum_buffer.{i}", i, False, "finite") for i in range(len(self.params))]

    def _load_arrays(self, checked):
        # C-contiguous, of the parameter's shape and dtype: sgd_update reads them flat.
        self.buffers = [checked.get(f"momentum_buffer.{i}") for i in range(len(self.params))]


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient)::

        g = grad + weight_decay * p
        m = b1*m + (1-b1)*g;   v = b2*v + (1-b2)*g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Parameters
    ----------
    params : iterable of :class:`fastconv.nn.Parameter`
    lr : finite real number >= 0
    betas : pair of real numbers in [0, 1)
    eps, weight_decay : finite real numbers >= 0
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = (_real(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
        eps = _real("eps", eps)
        weight_decay = _real("weight_decay", weight_decay)
        self.betas, self.eps, self.weight_decay = (b1, b2), eps, weight_decay
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]

    def step(self) -> None:
        b1, b2 = self.betas
        t = self.step_count + 1
        step_size = self.lr / (1 - b1**t)
        root_bc2 = np.sqrt(1 - b2**t)
        for i, (_, p, g) in enumerate(self._grads()):
            if self.weight_decay:
                g = g + self.weight_decay * p
            m, v = self.m[i], self.v[i]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= (step_size * m / (np.sqrt(v) / root_bc2 + self.eps)).astype(p.dtype, copy=False)
        self.step_count = t

    def state_dict(self):
        state = super().state_dict()
        for i in range(len(self.params)):
            state[f"exp_avg.{i}"] = self.m[i].copy()
            state[f"exp_avg_sq.{i}"] = self.v[i].copy()
        return state

    def _state_arrays(self):
        n = range(len(self.params))
        return ([(f"exp_avg.{i}", i, True, "finite") for i in n]
                + [(f"exp_avg_sq.{i}", i, True, "nonnegative") for i in n])

    def _load_arrays(self, checked):
        for i in range(len(self.params)):
            np.copyto(self.m[i], checked[f"exp_avg.{i}"])
            np.copyto(self.v[i], checked[f"exp_avg_sq.{i}"])
