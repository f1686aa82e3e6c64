"""Benchmark cases shared by the pytest-benchmark suite and ``report.py``.

Every implementation of a pass is a function ``fn(case, arrays) -> result`` so that the
same inputs feed fastconv, the NumPy im2col + BLAS baseline and (when installed) PyTorch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

import fastconv as fc

try:  # torch is optional: ``pip install -e '.[bench]'``
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None


class Case(NamedTuple):
    name: str
    N: int
    C: int
    H: int
    K: int
    R: int
    stride: int
    padding: int
    groups: int = 1
    dilation: int = 1

    @property
    def OH(self) -> int:
        return fc.conv_output_size(self.H, self.R, self.stride, self.padding, self.padding,
                                   self.dilation)

    def flops(self) -> float:
        """Multiply-adds x 2 of one pass (forward, dX and dW all do the same work)."""
        Cg = self.C // self.groups
        return 2.0 * self.N * self.K * Cg * self.R * self.R * self.OH * self.OH

    @property
    def w_shape(self) -> tuple:
        return (self.K, self.C // self.groups, self.R, self.R)


#: The MNIST two-conv network's layers at batch 64 (target 1 of the performance issue).
MNIST = [
    Case("mnist-conv1", 64, 1, 28, 32, 5, 1, 2),
    Case("mnist-conv2", 64, 32, 14, 64, 5, 1, 2),
]
#: The wider set of target 2: 3x3 stride 1 and 2 with 32-128 channels at 14-56 px, 1x1
#: pointwise, 3-channel input layers and 3x3 no-padding MNIST variants.  Batches are
#: chosen so that every pass does 0.1-1 GFLOP.
GENERAL = [
    Case("3x3s1-c32-56px", 16, 32, 56, 32, 3, 1, 1),
    Case("3x3s1-c64-28px", 32, 64, 28, 64, 3, 1, 1),
    Case("3x3s1-c64", 64, 64, 14, 64, 3, 1, 1),
    Case("3x3s1-c128-14px", 32, 128, 14, 128, 3, 1, 1),
    Case("3x3s2-c32-56px", 32, 32, 56, 64, 3, 2, 1),
    Case("3x3s2-c64", 64, 64, 28, 64, 3, 2, 1),
    Case("3x3s2-c128-28px", 32, 128, 28, 128, 3, 2, 1),
    Case("1x1-c64-128-28px", 32, 64, 28, 128, 1, 1, 0),
    Case("1x1-c128-14px", 64, 128, 14, 128, 1, 1, 0),
    Case("3x3s1-rgb-c64-56px", 16, 3, 56, 64, 3, 1, 1),
    Case("3x3s2-rgb-c32-64px", 32, 3, 64, 32, 3, 2, 1),
    Case("mnist-conv1-3x3-nopad", 64, 1, 28, 32, 3, 1, 0),
    Case("mnist-conv2-3x3-nopad", 64, 32, 13, 64, 3, 1, 0),
]
#: Small calls (the plans issue): a tiny layer, where call overhead is all, and batch-1
#: passes of the MNIST layers and of a 3x3 64 -> 64 layer at 32x32.
SMALL = [
    Case("tiny-rgb-8px", 1, 3, 8, 8, 3, 1, 1),
    Case("mnist-conv1-b1", 1, 1, 28, 32, 5, 1, 2),
    Case("mnist-conv2-b1", 1, 32, 14, 64, 5, 1, 2),
    Case("3x3s1-c64-32px-b1", 1, 64, 32, 64, 3, 1, 1),
]
#: Depthwise layers (groups = C) of MobileNet-like sizes: 3x3 and 5x5, stride 1 and 2,
#: 14-112 px, 32-512 channels, batch 1-32.
DEPTHWISE = [
    Case("dw3x3-c128-28px", 16, 128, 28, 128, 3, 1, 1, 128),
    Case("dw3x3-c32-112px", 8, 32, 112, 32, 3, 1, 1, 32),
    Case("dw3x3s2-c64-112px", 8, 64, 112, 64, 3, 2, 1, 64),
    Case("dw3x3-c256-14px", 32, 256, 14, 256, 3, 1, 1, 256),
    Case("dw3x3s2-c256-28px", 32, 256, 28, 256, 3, 2, 1, 256),
    Case("dw3x3-c512-14px", 16, 512, 14, 512, 3, 1, 1, 512),
    Case("dw5x5-c144-56px", 8, 144, 56, 144, 5, 1, 2, 144),
    Case("dw5x5s2-c240-28px", 16, 240, 28, 240, 5, 2, 2, 240),
    Case("dw3x3-c128-28px-b1", 1, 128, 28, 128, 3, 1, 1, 128),
    Case("dw3x3-c32-112px-b1", 1, 32, 112, 32, 3, 1, 1, 32),
]
#: The other families of the layers users call (the all-convolutions issue): grouped
#: layers with 16 and 4 channels per group, an ImageNet 7x7 stride-2 stem, a CIFAR input
#: layer, 3x3 stride 2 and 1x1 layers of ResNet-like sizes, batch 1 of the grouped layer
#: and the stem, and a 3x3 layer with dilation 2 (DeepLab-like).  Their input layers are
#: measured with dX: users who fine-tune every layer need it.
FAMILIES = [
    Case("g8-c128-28px", 16, 128, 28, 128, 3, 1, 1, 8),
    Case("g32-c128-28px", 16, 128, 28, 128, 3, 1, 1, 32),
    Case("g32-c256-14px", 16, 256, 14, 256, 3, 1, 1, 32),
    Case("g32s2-c256-28px", 16, 256, 28, 256, 3, 2, 1, 32),
    Case("stem7x7s2-224px", 8, 3, 224, 64, 7, 2, 3),
    Case("cifar-rgb-c32-32px", 32, 3, 32, 32, 3, 1, 1),
    Case("3x3s2-c64-128-32px", 16, 64, 32, 128, 3, 2, 1),
    Case("3x3s1-c64-32px", 16, 64, 32, 64, 3, 1, 1),
    Case("1x1-c128-256-16px", 16, 128, 16, 256, 1, 1, 0),
    Case("g8-c128-28px-b1", 1, 128, 28, 128, 3, 1, 1, 8),
    Case("stem7x7s2-224px-b1", 1, 3, 224, 64, 7, 2, 3),
    Case("dil2-3x3-c64-28px", 16, 64, 28, 64, 3, 1, 2, dilation=2),
]
CASES = MNIST + GENERAL + SMALL + DEPTHWISE + FAMILIES
PASSES = ["forward", "dX", "dW"]


_PLAN_PASS = {"forward": "forward", "dX": "grad_input", "dW": "grad_weight"}


def algorithm(case: Case, pass_: str) -> str:
    """The algorithm fastconv's plan runs this pass with (fp32, Winograd as switched)."""
    plan = fc.conv2d_plan((case.N, case.C, case.H, case.H), case.w_shape,
                          stride=case.stride, padding=case.padding, dilation=case.dilation,
                          groups=case.groups)
    return plan.algorithms[_PLAN_PASS[pass_]]


def needs_dx(case: Case) -> bool:
    """Input layers (C <= 3) never need dX in training, so the targets of the MNIST and
    wider sets leave it out; the families of the all-convolutions issue measure it."""
    return case.C > 3 or case in FAMILIES


def make_arrays(case: Case, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.N, case.C, case.H, case.H), dtype=np.float32)
    w = rng.standard_normal(case.w_shape, dtype=np.float32)
    b = rng.standard_normal(case.K, dtype=np.float32)
    dy = rng.standard_normal((case.N, case.K, case.OH, case.OH), dtype=np.float32)
    return {"x": x, "w": w, "b": b, "dy": dy}


# ---- fastconv ------------------------------------------------------------------------


def fastconv_pass(pass_: str, package=fc):
    """fastconv's functional API (``package``: this fastconv, or the baseline's)."""

    def forward(c, a):
        return package.conv2d(a["x"], a["w"], a["b"], stride=c.stride, padding=c.padding,
                              dilation=c.dilation, groups=c.groups)

    def dx(c, a):
        return package.conv2d_grad_input(a["dy"], a["w"], a["x"].shape, stride=c.stride,
                                         padding=c.padding, dilation=c.dilation,
                                         groups=c.groups)

    def dw(c, a):
        return package.conv2d_grad_weight(a["x"], a["dy"], a["w"].shape, stride=c.stride,
                                          padding=c.padding, dilation=c.dilation,
                                          groups=c.groups)

    return {"forward": forward, "dX": dx, "dW": dw}[pass_]


def fastconv_plan_pass(pass_: str):
    """fastconv through a plan made once and held (``fc.conv2d_plan``)."""

    def plan(c, a):
        if "_plan" not in a:
            a["_plan"] = fc.conv2d_plan(a["x"].shape, a["w"].shape, stride=c.stride,
                                        padding=c.padding, dilation=c.dilation,
                                        groups=c.groups)
        return a["_plan"]

    def forward(c, a):
        return plan(c, a).forward(a["x"], a["w"], a["b"])

    def dx(c, a):
        return plan(c, a).grad_input(a["dy"], a["w"])

    def dw(c, a):
        return plan(c, a).grad_weight(a["x"], a["dy"])

    return {"forward": forward, "dX": dx, "dW": dw}[pass_]


def fastconv_direct_pass(pass_: str):
    """fastconv with Winograd switched off: the direct kernels on every shape."""
    run = fastconv_pass(pass_)

    def direct(c, a):
        was = fc.get_winograd()
        fc.set_winograd(False)
        try:
            return run(c, a)
        finally:
            fc.set_winograd(was)

    return direct


# ---- NumPy im2col + BLAS baseline ----------------------------------------------------


def _im2col(x, R, stride, padding, dilation=1):
    """(N, C, H, W) -> (N, OH*OW, C*R*R) patches, via a strided view and one copy."""
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    span = (R - 1) * dilation + 1  # the dilated filter's extent
    win = np.lib.stride_tricks.sliding_window_view(xp, (span, span), axis=(2, 3))
    win = win[:, :, ::stride, ::stride, ::dilation, ::dilation]  # (N, C, OH, OW, R, R)
    N, C, OH, OW = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(N, OH * OW, C * R * R), OH, OW


def numpy_pass(pass_: str):
    # Groups: the patches' columns (c, r, s) split into G blocks of C/G channels, the
    # filters into G blocks of K/G; each block of outputs is a product with its own block.
    def forward(c, a):
        G = c.groups
        cols, OH, OW = _im2col(a["x"], c.R, c.stride, c.padding, c.dilation)
        cols = cols.reshape(c.N, OH * OW, G, -1)
        y = np.einsum("npgq,gkq->npgk", cols, a["w"].reshape(G, c.K // G, -1),
                      optimize=True).reshape(c.N, OH * OW, c.K) + a["b"]  # (N, OH*OW, K)
        return y.transpose(0, 2, 1).reshape(c.N, c.K, OH, OW)

    def dw(c, a):
        G = c.groups
        cols, _, _ = _im2col(a["x"], c.R, c.stride, c.padding, c.dilation)
        cols = cols.reshape(c.N, cols.shape[1], G, -1)
        dy = a["dy"].reshape(c.N, G, c.K // G, -1)  # (N, G, K/G, OH*OW)
        return np.einsum("ngkp,npgq->gkq", dy, cols, optimize=True).reshape(a["w"].shape)

    def dx(c, a):
        # col2im: scatter dy @ W back into the padded input, one (r, s) tap at a time.
        N, C, H, _ = a["x"].shape
        P, OH, G, d = c.padding, c.OH, c.groups, c.dilation
        dcols = np.einsum("ngkp,gkq->npgq", a["dy"].reshape(c.N, G, c.K // G, -1),
                          a["w"].reshape(G, c.K // G, -1), optimize=True)
        dcols = dcols.reshape(N, OH, OH, C, c.R, c.R)
        dxp = np.zeros((N, C, H + 2 * P, H + 2 * P), np.float32)
        span = c.stride * (OH - 1) + 1
        for r in range(c.R):
            for s in range(c.R):
                dxp[:, :, r * d:r * d + span:c.stride, s * d:s * d + span:c.stride] += (
                    dcols[:, :, :, :, r, s].transpose(0, 3, 1, 2))
        return dxp[:, :, P:P + H, P:P + H]

    return {"forward": forward, "dX": dx, "dW": dw}[pass_]


# ---- PyTorch -------------------------------------------------------------------------


def torch_pass(pass_: str):
    if torch is None:
        return None

    def tensors(a):
        if "_t" not in a:
            a["_t"] = {k: torch.from_numpy(v) for k, v in a.items() if isinstance(v, np.ndarray)}
        return a["_t"]

    def forward(c, a):
        t = tensors(a)
        with torch.no_grad():
            return torch.nn.functional.conv2d(t["x"], t["w"], t["b"], c.stride, c.padding,
                                              c.dilation, c.groups)

    def dx(c, a):
        t = tensors(a)
        return torch.nn.grad.conv2d_input(a["x"].shape, t["w"], t["dy"], c.stride, c.padding,
                                          c.dilation, c.groups)

    def dw(c, a):
        t = tensors(a)
        return torch.nn.grad.conv2d_weight(t["x"], a["w"].shape, t["dy"], c.stride, c.padding,
                                           c.dilation, c.groups)

    return {"forward": forward, "dX": dx, "dW": dw}[pass_]


# ---- a baseline: another fastconv source tree, for A/B comparisons -------------------

#: The fastconv package of ``--baseline DIR`` (:func:`load_baseline`), or None.
baseline = None


def load_baseline(root) -> object:
    """Import the ``fastconv`` package of the source tree ``root`` (a checkout of another
    commit) as the module ``fastconv_baseline``, beside this one, and make it the
    ``baseline`` implementation.  Its modules import each other relatively, so they load
    from ``root``; Numba compiles (and caches) them apart by their paths."""
    import importlib.util
    import pathlib
    import sys

    global baseline
    package = pathlib.Path(root).resolve() / "fastconv"
    if not (package / "__init__.py").is_file():
        raise ValueError(f"--baseline {root}: no fastconv package in it ({package})")
    spec = importlib.util.spec_from_file_location(
        "fastconv_baseline", package / "__init__.py",
        submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastconv_baseline"] = module
    spec.loader.exec_module(module)
    baseline = module
    return module


def baseline_pass(pass_: str):
    """The baseline's functional API (``None`` without ``--baseline``)."""
    return None if baseline is None else fastconv_pass(pass_, baseline)


IMPLS = {"fastconv": fastconv_pass, "fastconv-plan": fastconv_plan_pass,
         "fastconv-direct": fastconv_direct_pass, "baseline": baseline_pass,
         "numpy-im2col": numpy_pass, "torch": torch_pass}


#: glibc's mallopt parameters (malloc.h) and the value :func:`steady_malloc` gives both.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STEADY_MALLOC_BYTES = 1 << 30


def steady_malloc() -> str:
    """Keep freed memory in the process for reuse, for every library alike; a note for the
    report's header.

    By default glibc maps a large block fresh (``mmap``) for each allocation and unmaps it
    when freed, unless its adaptive threshold has grown past that size, which depends on
    what the process allocated before.  A fresh block pays one page fault per 4 KiB on
    first touch: PyTorch's MNIST conv1 forward took 4.7-6.6 ms that way and 0.57-0.63 ms
    when its blocks were reused, from one process to the next.  Raising the mmap and trim
    thresholds to 1 GiB makes every library's arrays come from the heap after warm-up, as
    jemalloc or tcmalloc would, so that the rounds compare kernels rather than allocator
    state.  Returns what was done (nothing on other C libraries)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, STEADY_MALLOC_BYTES) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, STEADY_MALLOC_BYTES) == 1)
    except (OSError, AttributeError):
        ok = False
    return ("glibc malloc keeps freed blocks (mmap and trim thresholds 1 GiB, for every "
            "library alike)" if ok else "the C library's malloc as it is")


def sync_threads() -> int:
    """Give torch the same thread count as fastconv; returns it."""
    n = fc.get_num_threads()
    if torch is not None:
        torch.set_num_threads(n)
    return n


# ---- training steps: the MNIST two-conv network, SGD momentum 0.9, lr 0.05 ------------


def fastconv_training(batch: int = 64, seed: int = 0, package=fc):
    """One fastconv training step on a fixed random batch; returns ``step() -> loss``.
    ``package``: this fastconv, or the baseline's (:func:`load_baseline`)."""
    import importlib

    nn = importlib.import_module(package.__name__ + ".nn")
    train = importlib.import_module(package.__name__ + ".train")
    model, opt = train.build(train.TrainConfig(batch_size=batch, seed=seed))
    loss_fn = nn.SoftmaxCrossEntropy()
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch)

    zero_grad = getattr(opt, "zero_grad", None)  # a baseline tree may overwrite instead

    def step():
        if zero_grad is not None:
            zero_grad()
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()
        return loss

    return step


def torch_model():
    """The two-conv network in plain PyTorch, initialised by torch's random state."""
    import fastconv.torch

    return fastconv.torch.twin("two-conv")


def torch_training(batch: int = 64, seed: int = 0, convert: bool = False):
    """The same step in PyTorch; ``None`` without torch.  With ``convert``, the model's
    convolutions run fastconv (``fastconv.torch.convert``): the rest is torch's."""
    if torch is None:
        return None
    torch.manual_seed(seed)
    model = torch_model()
    if convert:
        import fastconv.torch

        fastconv.torch.convert(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_inference(batch: int = 64, seed: int = 0, convert: bool = False):
    """A forward pass of the same network in PyTorch without grad (evaluation mode),
    with fastconv's convolutions if ``convert``; ``None`` without torch."""
    if torch is None:
        return None
    torch.manual_seed(seed)
    model = torch_model().eval()
    if convert:
        import fastconv.torch

        fastconv.torch.convert(model)
    x = torch.rand(batch, 1, 28, 28)

    def step():
        with torch.no_grad():
            return model(x)

    return step


def torch_fastconv_training(batch: int = 64, seed: int = 0):
    """The PyTorch step with fastconv's convolutions (``fastconv.torch.convert``)."""
    return torch_training(batch, seed, convert=True)


TRAINERS = {"fastconv": fastconv_training, "torch": torch_training,
            "torch-fastconv": torch_fastconv_training}


def blas_single_thread():
    """What ``fastconv train`` does: numpy's BLAS on one thread (torch has its own)."""
    from fastconv.train import _blas_single_thread

    return _blas_single_thread()
