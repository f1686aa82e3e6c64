"""Optimizers with PyTorch's update rules and parameter groups, updating parameter arrays
in place.

``params`` is an iterable of :class:`fastconv.nn.Parameter` (``model.parameters()``), of
``(name, Parameter)`` pairs (``model.named_parameters()``), or of parameter-group dicts
(``{'params': [...], 'lr': 0.01, ...}``, each key missing from a group taken from the
constructor's arguments), as ``torch.optim`` takes them.  ``param_groups`` is the list of
those dicts: ``step()`` reads each group's hyperparameters when it runs, so a schedule
that sets ``group['lr']`` works.  ``step()`` reads the gradients accumulated in the layers
since the last ``zero_grad()`` and skips parameters that have none, as PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import _checks, _state, ops
from ._args import _bool, _real
from .nn import Parameter, _clear_grad

__all__ = ["SGD", "Adam", "Optimizer"]


class Optimizer:
    """Base class: the parameter groups, the flat parameter list and the step count.

    Parameters
    ----------
    params : iterable of :class:`fastconv.nn.Parameter`, of ``(name, Parameter)`` pairs, or
        of dicts with a ``'params'`` entry (parameter groups); not empty
        ``model.parameters()``.  A parameter may be in one group only, once.
    defaults : dict
        The hyperparameters of groups that do not give their own.

    Attributes
    ----------
    param_groups : list of dict
        Each with ``'params'`` (a list of Parameters) and the optimizer's hyperparameters.
    params : list of Parameter
        Every group's parameters in order: the index of the per-parameter state
        (``momentum_buffer.{i}``, ``exp_avg.{i}``) in :meth:`state_dict`.
    step_count : int
        The number of ``step()`` calls.
    """

    def __init__(self, params, defaults: dict):
        if (isinstance(params, (Parameter, np.ndarray, Mapping, str))
                or not hasattr(params, "__iter__")):
            raise TypeError(f"params must be an iterable of Parameters (model.parameters()) "
                            f"or of parameter-group dicts, got {type(params).__name__}")
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list (params)")
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.params: list[Parameter] = []
        self.step_count = 0
        self._checked: dict[int, tuple] = {}  # group index -> (its values, checked)
        if all(isinstance(g, Mapping) for g in items):
            for i, group in enumerate(items):
                self._add_group(group, f"params[{i}]")
        elif any(isinstance(g, Mapping) for g in items):
            raise TypeError("params must be all Parameters or all parameter-group dicts, "
                            "not a mix")
        else:
            self._add_group({"params": items}, None)
        if not self.params:
            raise ValueError("optimizer got no parameters (every group's 'params' is empty)")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (a dict with ``'params'``; other keys default to the constructor's
        arguments), as ``torch.optim.Optimizer.add_param_group``."""
        self._add_group(param_group, f"param_groups[{len(self.param_groups)}]")

    def _add_group(self, group, where: str | None) -> None:
        """Check ``group`` and add it; ``where`` names it in messages (None: the
        constructor's flat ``params``, named ``params[i]``)."""
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"{where} must be a dict with a 'params' entry, got "
                            f"{type(group).__name__}")
        items = group["params"]
        items = [items] if isinstance(items, Parameter) else items
        label = "params" if where is None else f"{where}['params']"
        if isinstance(items, (np.ndarray, Mapping, str)) or not hasattr(items, "__iter__"):
            raise TypeError(f"{label} must be an iterable of Parameters, got "
                            f"{type(items).__name__}")
        items = list(items)
        params, names = [], []
        for i, p in enumerate(items):
            if (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                    and isinstance(p[1], Parameter)):
                names.append(p[0])
                p = p[1]
            if not isinstance(p, Parameter):
                raise TypeError(f"{label}[{i}] must be a fastconv.nn.Parameter "
                                f"(model.parameters()), got {type(p).__name__}")
            params.append(p)
        if names and len(names) != len(params):
            raise TypeError(f"{label} must be all Parameters or all (name, Parameter) pairs")
        if len(set(params)) != len(params):
            raise ValueError(f"{label} holds a parameter more than once")
        if not set(params).isdisjoint(self.params):
            raise ValueError("some parameters appear in more than one parameter group")
        full = group if isinstance(group, dict) else dict(group)
        for key, value in self.defaults.items():
            full.setdefault(key, value)
        # the constructor's own arguments keep their plain names in messages
        self._check_group(full, "" if where is None else f"{where}")
        full["params"] = params
        if names:
            full["param_names"] = names
        self.param_groups.append(full)
        self.params.extend(params)
        self._add_state(params)

    def _check_group(self, group: dict, where: str) -> tuple:
        """The group's hyperparameters, checked (``where`` prefixes their names in
        messages); the subclass's."""
        raise NotImplementedError

    def _add_state(self, params: list[Parameter]) -> None:
        """Make the per-parameter state of newly added ``params``."""

    def _groups(self):
        """``(hyperparameters, [(i, parameter)])`` of each group, every group's
        hyperparameters checked before anything is updated."""
        out, i = [], 0
        for g, group in enumerate(self.param_groups):
            out.append((self._hyperparameters(g, group), list(enumerate(group["params"], i))))
            i += len(group["params"])
        return out

    def _hyperparameters(self, g: int, group: dict) -> tuple:
        """:meth:`_check_group` of group ``g``, run again only when one of its values
        changed: a step whose groups did not change checks nothing again.  Values that can
        change in place (lists, arrays) are checked at every step."""
        key = tuple((type(group[k]), group[k]) for k in self.defaults)
        held = self._checked.get(g)
        if held is not None and held[0] == key:
            return held[1]
        hyper = self._check_group(group, f"param_groups[{g}]")
        if all(_immutable(v) for _, v in key):
            self._checked[g] = (key, hyper)
        return hyper

    def _grads(self, groups) -> list:
        """``(hyperparameters, [(i, data, grad)])`` of each group for its parameters that
        have a gradient, all checked before any update.  No gradient at all is an error
        (a step before any backward, or after ``zero_grad``)."""
        out, seen = [], False
        for hyper, members in groups:
            rows = []
            for i, p in members:
                if p.grad is None:
                    continue
                g = np.asarray(p.grad)
                if g.shape != p.data.shape:
                    raise ValueError(f"the gradient of parameter {p.name!r} has shape "
                                     f"{g.shape}, the parameter {p.data.shape}")
                rows.append((i, p.data, g))
            seen = seen or bool(rows)
            out.append((hyper, rows))
        if not seen:
            raise RuntimeError(f"parameter {self.params[0].name!r} has no gradient: run "
                               "backward() before step() (no parameter has one)")
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the optimizer's parameters, as
        ``torch.optim.Optimizer.zero_grad``: drop them (``set_to_none=True``, the
        default), or fill the held ones with zeros."""
        set_to_none = _bool("set_to_none", set_to_none)
        for p in self.params:
            _clear_grad(p, set_to_none)

    @property
    def lr(self) -> float:
        """The learning rate of every group (an error if the groups' differ); setting it
        sets every group's."""
        lrs = [g["lr"] for g in self.param_groups]
        if any(lr != lrs[0] for lr in lrs):
            raise ValueError(f"the parameter groups have different learning rates {lrs}; "
                             "read param_groups[i]['lr']")
        return lrs[0]

    @lr.setter
    def lr(self, value) -> None:
        value = _real("lr", value)
        for g in self.param_groups:
            g["lr"] = value

    def _lr_keys(self) -> list[str]:
        """The state dict's learning-rate keys: ``lr`` (the first group's), then
        ``lr_group{g}`` for each further group."""
        return ["lr"] + [f"lr_group{g}" for g in range(1, len(self.param_groups))]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state as flat arrays (for ``.npz`` checkpoints): ``step_count``, each
        group's ``lr`` and the per-parameter arrays."""
        state = {"step_count": np.array(self.step_count)}
        for key, group in zip(self._lr_keys(), self.param_groups, strict=True):
            state[key] = np.array(float(group["lr"]))
        return state

    def _state_arrays(self) -> list[tuple[str, int, bool, str]]:
        """The arrays of the state besides ``step_count`` and the learning rates: (key,
        index of its parameter, whether it is required, its value rule for
        :func:`fastconv._state.array_like`)."""
        return []

    def _state_scalars(self) -> list[str]:
        """Optional integer scalars of the state besides ``step_count``."""
        return []

    def check_state_dict(self, state, *, prefix: str | None = None) -> dict:
        """Check ``state`` against this optimizer, changing nothing.

        Parameters
        ----------
        state : mapping of str to array_like
            ``step_count`` (an integer >= 0), ``lr`` (a finite number >= 0; and
            ``lr_group1``... for each further parameter group) and the optimizer's arrays
            (see the subclass), each of exactly its parameter's shape (no broadcasting)
            with a real dtype that casts to the parameter's with ``casting='same_kind'``.
            No other keys.
        prefix : str, optional
            Name keys in messages as ``prefix + key`` (a checkpoint's ``"optim/"``) instead
            of ``state_dict[key]``.

        Returns
        -------
        dict
            ``step_count`` as an int, the learning rates as floats, and the arrays as new
            C-contiguous arrays of their parameters' dtypes.

        Raises
        ------
        ValueError, TypeError
            For the first entry that breaks a rule, naming it, what it holds and the rule.
        """
        arrays = self._state_arrays()
        _state.check_keys(state, {"step_count", *self._lr_keys()}
                          | {k for k, _, req, _ in arrays if req},
                          {k for k, _, req, _ in arrays if not req} | set(self._state_scalars()),
                          owner=f"the {type(self).__name__} optimizer", prefix=prefix)
        checked = {"step_count": _state.integer("step_count", state["step_count"],
                                                prefix=prefix)}
        for key in self._lr_keys():
            checked[key] = _state.nonnegative_number(key, state[key], prefix=prefix)
        for key in self._state_scalars():
            if key in state:
                checked[key] = _state.integer(key, state[key], prefix=prefix)
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
        self.step_count = checked["step_count"]
        for key, group in zip(self._lr_keys(), self.param_groups, strict=True):
            group["lr"] = checked[key]
        self._load_arrays(checked)

    def _load_arrays(self, checked: dict) -> None:
        """Take the arrays of a checked state."""


def _immutable(value) -> bool:
    """Whether ``value`` is a number or a tuple of numbers: a hyperparameter that cannot
    change without being assigned again."""
    if isinstance(value, tuple):
        return all(_immutable(v) for v in value)
    return isinstance(value, (int, float, np.generic))


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD``::

        g = grad + weight_decay * p
        buf = g (first step), else momentum * buf + g
        p -= lr * (g + momentum * buf if nesterov else buf)      (momentum > 0)
        p -= lr * g                                              (momentum = 0)

    Parameters
    ----------
    params : iterable of :class:`fastconv.nn.Parameter` or of parameter-group dicts
    lr : finite real number >= 0
    momentum, weight_decay : finite real numbers >= 0
    nesterov : bool
        Nesterov momentum; needs ``momentum > 0``.

    Each group's dict holds ``'lr'``, ``'momentum'``, ``'weight_decay'`` and
    ``'nesterov'``.
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0, nesterov=False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        nesterov=nesterov)
        self._check_group(defaults, "")
        self.buffers: list[np.ndarray | None] = []
        super().__init__(params, defaults)

    def _check_group(self, group, where):
        name = (lambda k: f"{where}[{k!r}]") if where else (lambda k: k)
        lr = _real(name("lr"), group["lr"])
        momentum = _real(name("momentum"), group["momentum"])
        weight_decay = _real(name("weight_decay"), group["weight_decay"])
        nesterov = _bool(name("nesterov"), group["nesterov"])
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov momentum needs momentum > 0"
                             f"{f' (in {where})' if where else ''}")
        return lr, momentum, weight_decay, nesterov

    def _add_state(self, params):
        self.buffers.extend([None] * len(params))

    def step(self) -> None:
        for (lr, momentum, weight_decay, nesterov), rows in self._grads(self._groups()):
            for i, p, g in rows:
                first = momentum and self.buffers[i] is None
                if first:
                    self.buffers[i] = np.empty(p.shape, p.dtype)
                buf = self.buffers[i] if momentum else None
                if buf is not None:  # the kernel reads and writes it flat, as long as p
                    _checks.array(f"momentum buffer {i}", buf, p.shape, p.dtype,
                                  writeable=True)
                if p.flags.c_contiguous:
                    # One fused pass (a NumPy version makes five over the larger layers).
                    ops.sgd_update(p, g, buf, lr, momentum, weight_decay, nesterov,
                                   bool(first))
                else:
                    _sgd_numpy(p, g, buf, bool(first), lr, momentum, weight_decay, nesterov)
        self.step_count += 1

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


def _sgd_numpy(p, g, buf, first, lr, momentum, weight_decay, nesterov):
    """SGD's update for parameters the kernel cannot update in place."""
    g = g + weight_decay * p
    if momentum:
        if first:
            buf[...] = g
        else:
            buf *= momentum
            buf += g
        g = g + momentum * buf if nesterov else buf
    p -= (lr * g).astype(p.dtype, copy=False)


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient)::

        g = grad + weight_decay * p
        m = b1*m + (1-b1)*g;   v = b2*v + (1-b2)*g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``t`` counts the steps that parameter has taken (steps where it had no gradient do not
    count), as PyTorch's per-parameter ``step``.

    Parameters
    ----------
    params : iterable of :class:`fastconv.nn.Parameter` or of parameter-group dicts
    lr : finite real number >= 0
    betas : pair of real numbers in [0, 1)
    eps, weight_decay : finite real numbers >= 0

    Each group's dict holds ``'lr'``, ``'betas'``, ``'eps'`` and ``'weight_decay'``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._check_group(defaults, "")
        self.m: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.steps: list[int] = []
        super().__init__(params, defaults)

    def _check_group(self, group, where):
        name = (lambda k: f"{where}[{k!r}]") if where else (lambda k: k)
        lr = _real(name("lr"), group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{name('betas')} must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = (_real(f"{name('betas')}[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
        eps = _real(name("eps"), group["eps"])
        weight_decay = _real(name("weight_decay"), group["weight_decay"])
        return lr, b1, b2, eps, weight_decay

    def _add_state(self, params):
        self.m.extend(np.zeros_like(p.data) for p in params)
        self.v.extend(np.zeros_like(p.data) for p in params)
        self.steps.extend([0] * len(params))  # as PyTorch: a new parameter has taken none

    def step(self) -> None:
        for (lr, b1, b2, eps, weight_decay), rows in self._grads(self._groups()):
            for i, p, g in rows:
                t = self.steps[i] + 1
                step_size = lr / (1 - b1**t)
                root_bc2 = np.sqrt(1 - b2**t)
                if weight_decay:
                    g = g + weight_decay * p
                m, v = self.m[i], self.v[i]
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                p -= (step_size * m / (np.sqrt(v) / root_bc2 + eps)).astype(p.dtype,
                                                                              copy=False)
                self.steps[i] = t
        self.step_count += 1

    def state_dict(self):
        state = super().state_dict()
        for i in range(len(self.params)):
            state[f"exp_avg.{i}"] = self.m[i].copy()
            state[f"exp_avg_sq.{i}"] = self.v[i].copy()
        for i, t in enumerate(self.steps):
            if t != self.step_count:  # a parameter that missed steps: its own count
                state[f"step.{i}"] = np.array(t)
        return state

    def _state_arrays(self):
        n = range(len(self.params))
        return ([(f"exp_avg.{i}", i, True, "finite") for i in n]
                + [(f"exp_avg_sq.{i}", i, True, "nonnegative") for i in n])

    def _state_scalars(self):
        return [f"step.{i}" for i in range(len(self.params))]

    def check_state_dict(self, state, *, prefix=None):
        checked = super().check_state_dict(state, prefix=prefix)
        for key in self._state_scalars():
            if checked.get(key, 0) > checked["step_count"]:
                raise ValueError(f"{_state.label(key, prefix)} is {checked[key]}, more than "
                                 f"step_count {checked['step_count']}")
        return checked

    def _load_arrays(self, checked):
        for i in range(len(self.params)):
            np.copyto(self.m[i], checked[f"exp_avg.{i}"])
            np.copyto(self.v[i], checked[f"exp_avg_sq.{i}"])
        self.steps = [checked.get(f"step.{i}", self.step_count) for i in range(len(self.params))]
