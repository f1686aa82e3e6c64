"""The convolution algorithms, and the one ordered list that decides which one runs.

Like oneDNN's implementation list, **the order is the policy**: a plan
(:mod:`fastconv.plan`) gives each pass the first algorithm in :data:`ALGORITHMS` that
supports the geometry and dtype and is not passed over as slower there, and keeps the
ones after it as fallbacks (Winograd hands a result with an inf or NaN to the next one,
which propagates non-finite values exactly).  Adding an algorithm is a module here and a line below.

Each module defines ``NAME``, ``why_not(geo, dtype, pass_)`` (None if it can run the
pass, else the reason, which a plan forced to use it reports), optionally ``slower(geo,
dtype, pass_)`` (None, or why it is passed over although it can run the pass: a rule of
speed, not of correctness, which forcing it overrides), and one function per pass
it implements, each taking validated NCHW arrays in the plan's dtype and a batch of at
least one::

    forward(geo, x, w, b)   -> y  (N, K, OH, OW), or None to hand over to a fallback
    grad_input(geo, dy, w)  -> dx (N, C, H, W), or None
    grad_weight(geo, x, dy) -> dw (K, C/G, R, S), or None

An algorithm that lays out its weights also defines ``prepare(geo, w, pass_)``; its
forward and dX then take what that returns in place of ``w``, and a plan keeps it while
the weights do not change (:meth:`fastconv.plan.ConvPlan._weights`).  The algorithms
the training path runs on its packed layouts (Winograd, the channel tile) also define
``packed_forward(geo, xp, w, b, ws, pool_order)``, ``packed_grad_input(geo, dyp,
layout, w)`` and ``packed_grad_weight(geo, xp, dyp, layout, ws)``
(:meth:`fastconv.plan.ConvPlan._run_packed`).
"""

from __future__ import annotations

from . import (
    channel_tile,
    depthwise,
    grouped,
    grouped_dw,
    grouped_dw_windows,
    nchw_delta_dw,
    pixel,
    pointwise,
    small,
    space_to_batch,
    winograd,
    winograd3x3,
)

#: The policy: the first algorithm that supports a pass runs it.
ALGORITHMS = (small, winograd, winograd3x3, space_to_batch, pointwise, pixel, depthwise,
              grouped_dw, grouped_dw_windows, grouped, nchw_delta_dw, channel_tile)

PASSES = ("forward", "grad_input", "grad_weight")

BY_NAME = {a.NAME: a for a in ALGORITHMS}


def why_not(algorithm, geo, dtype, pass_: str) -> str | None:
    """Why ``algorithm`` cannot run ``pass_`` of ``geo`` in ``dtype``, or None if it can."""
    if not hasattr(algorithm, pass_):
        return f"it has no {pass_} pass"
    return algorithm.why_not(geo, dtype, pass_)


def slower(algorithm, geo, dtype, pass_: str) -> str | None:
    """Why ``algorithm``, which can run ``pass_``, is passed over as slower there, or None."""
    rule = getattr(algorithm, "slower", None)
    return None if rule is None else rule(geo, dtype, pass_)


def supporting(geo, dtype, pass_: str) -> list:
    """The algorithms that can run ``pass_``, in the order of :data:`ALGORITHMS`."""
    return [a for a in ALGORITHMS if why_not(a, geo, dtype, pass_) is None]


def choices(geo, dtype, pass_: str) -> list:
    """The algorithms a plan runs ``pass_`` with, in order: those that can run it and are
    not passed over as slower.  The first is the plan's choice, the others its fallbacks."""
    return [a for a in supporting(geo, dtype, pass_) if slower(a, geo, dtype, pass_) is None]
