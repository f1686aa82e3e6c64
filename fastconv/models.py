"""Model presets."""

from __future__ import annotations

import numpy as np

from .nn import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential, _rng

__all__ = ["MODELS", "MODEL_ALIASES", "model_name", "tiny_net", "two_conv"]


def two_conv(seed=None, dtype=np.float32) -> Sequential:
    """The MNIST two-conv network (the default), for (N, 1, 28, 28) inputs and 10 classes.

    conv 5x5 1->32 pad 2 -> ReLU -> maxpool 2 -> conv 5x5 32->64 pad 2 -> ReLU -> maxpool 2
    -> Flatten (3136) -> Linear 3136->128 -> ReLU -> Linear 128->10.

    Parameters
    ----------
    seed : None, int >= 0 or numpy Generator
        The weights' random stream.
    dtype : float32 or float64
        The parameters' dtype.
    """
    rng = _rng(seed, "seed")
    kw = dict(rng=rng, dtype=dtype)
    return Sequential(
        Conv2d(1, 32, 5, padding=2, **kw), ReLU(), MaxPool2d(2),
        Conv2d(32, 64, 5, padding=2, **kw), ReLU(), MaxPool2d(2),
        Flatten(), Linear(7 * 7 * 64, 128, **kw), ReLU(), Linear(128, 10, **kw),
    )


def tiny_net(seed=None, dtype=np.float32) -> Sequential:
    """The tiny two-conv network of the classic write-ups: one 3x3 filter per conv, 'same'
    padding.

    28x28 -> conv -> ReLU -> pool 14x14 -> conv -> ReLU -> pool 7x7 -> Flatten 49
    -> Linear 49->49 -> Linear 49->10.

    Parameters
    ----------
    seed, dtype
        As for :func:`two_conv`.
    """
    rng = _rng(seed, "seed")
    kw = dict(rng=rng, dtype=dtype)
    return Sequential(
        Conv2d(1, 1, 3, padding=1, **kw), ReLU(), MaxPool2d(2),
        Conv2d(1, 1, 3, padding=1, **kw), ReLU(), MaxPool2d(2),
        Flatten(), Linear(49, 49, **kw), Linear(49, 10, **kw),
    )


#: The model presets by the name ``fastconv train --model`` and checkpoints use.
MODELS = {"two-conv": two_conv, "tiny": tiny_net}

#: Old names still accepted (by the CLI and in checkpoints' configs): ``seed`` was the
#: tiny network's name before it was called ``tiny``.
MODEL_ALIASES = {"seed": "tiny"}

#: The old name of :func:`tiny_net`, kept for code that imports it.
seed_net = tiny_net


def model_name(name):
    """The preset's name for ``name``: itself, or the current name of an old alias.  Any
    other value is returned as it is, for the caller to refuse."""
    return MODEL_ALIASES.get(name, name) if isinstance(name, str) else name
