"""Numba options for every kernel, decided in one place, and the stack-tile intrinsic.

Options
-------
``FASTMATH``
    ``contract`` lets LLVM fuse ``a * b + c`` into one FMA instruction and ``reassoc``
    lets it vectorise reductions.  ``nsz`` (ignore the sign of zero) is harmless here.
    ``nnan``/``ninf`` stay **off**: NaN and inf in the data must propagate exactly to
    the outputs they touch.
``CACHE``
    ``cache=True`` writes compiled machine code to ``__pycache__`` beside the sources
    (or to ``$NUMBA_CACHE_DIR``), so a new process skips compilation.  Pitfalls:

    * Numba keys the cache on the kernel's own source file and its timestamp.  A change
      to a helper in *another* module (such as :func:`stack_tile` here) does not
      invalidate kernels that inline it: clear the cache after editing this file.
    * The cached code is specific to the CPU it was compiled on (AVX-512 here).  Numba
      recompiles when the CPU name or its features differ.
    * The thread count is *not* baked in: ``set_num_threads`` works with cached code.
    * Set ``FASTCONV_NO_CACHE=1`` to disable caching (read-only installs, debugging).
Code generation target
    LLVM's tuning for Intel AVX-512 CPUs prefers 256-bit vectors, so it compiles the
    kernels' 16-lane register tiles to pairs of ymm registers: twice the instructions,
    and tiles that no longer fit the register file spill to the stack.  Measured on a
    2-core Xeon with AMX (a Sapphire Rapids class CPU, which this LLVM names
    ``rocketlake``): the pixel forward kernel's loop had 32 ymm FMAs and stack traffic
    instead of 16 zmm FMAs, and MNIST conv2's dW and forward took 2.0x and 1.4x the time.
    With 512-bit vectors, the scheduling model of that name (Ice Lake's, shared by
    ``skylake-avx512`` and ``icelake-server``) still spilled the matrix-product and the
    NCHW-delta dW tiles (4 and 2 stack accesses a step, and 30 register moves), where the
    ``sapphirerapids`` model allocated them cleanly (dW a further 1.3x faster).
    :func:`_codegen_target` therefore, before Numba creates its code generator, adds
    ``-prefer-256-bit`` to the CPU features on AVX-512 CPUs, and on CPUs with AMX that
    LLVM names after one of those older models, compiles for ``sapphirerapids``
    (scheduling only: the features stay the host's).  It changes nothing without AVX-512
    (or on AMD's, whose tuning prefers 512 bits already), if the user set
    ``NUMBA_CPU_FEATURES`` or ``NUMBA_CPU_NAME``, or with ``FASTCONV_VECTOR_WIDTH=256``;
    it applies to every function Numba compiles in the process, and only if fastconv is
    imported before anything is compiled.
"""

import os

import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# LLVM CPU names whose scheduling model spilled the register tiles (see above).
_SPILLING_MODELS = {"rocketlake", "icelake-server", "icelake-client", "tigerlake",
                    "skylake-avx512", "cascadelake", "cooperlake"}


def _codegen_target() -> bool:
    """Compile for 512-bit vectors on AVX-512 CPUs (see "Code generation target" above).
    True if Numba's target was changed."""
    from numba.core import config, registry

    if (os.environ.get("FASTCONV_VECTOR_WIDTH") == "256" or config.CPU_FEATURES is not None
            or config.CPU_NAME is not None
            or "_toplevel_target_context" in vars(registry.cpu_target)):
        return False  # the user's choice, or Numba's code generator exists already
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    if not features.get("avx512f"):
        return False
    config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"
    if features.get("amx-tile") and llvm.get_host_cpu_name() in _SPILLING_MODELS:
        config.CPU_NAME = "sapphirerapids"
    return True


_codegen_target()


def _parallel_layers(layer: str) -> list[str]:
    """The threading layers Numba may pick for ``NUMBA_THREADING_LAYER=layer``, of those
    with a parallel region cheaper than the work queue's: ``tbb`` and ``omp`` if their
    libraries load."""
    wanted = {"default": ("tbb", "omp"), "safe": ("tbb",), "threadsafe": ("tbb", "omp"),
              "forksafe": ("tbb", "omp"), "tbb": ("tbb",), "omp": ("omp",)}.get(layer, ())
    found = []
    for name in wanted:
        try:
            __import__(f"numba.np.ufunc.{name}pool")
        except ImportError:
            continue
        found.append(name)
    return found


def threading_layer_warning() -> str | None:
    """A warning when Numba would run the kernels on its ``workqueue`` threading layer
    (neither OpenMP nor TBB loads): each parallel region then costs about 90 us instead
    of about 2.6 us with ``omp`` (measured here), which dominates small convolutions.
    None if a faster layer is available, or if the user chose ``workqueue``."""
    from numba.core import config

    layer = str(config.THREADING_LAYER).lower()
    if layer == "workqueue" or _parallel_layers(layer):
        return None
    return ("fastconv: Numba has neither OpenMP nor TBB here and will use its 'workqueue' "
            "threading layer, whose parallel regions cost about 90 us (2.6 us with "
            "OpenMP): small convolutions will be slow.  Install one: 'pip install tbb', or "
            "the system's libgomp (Debian: apt-get install libgomp1); set "
            "NUMBA_THREADING_LAYER=workqueue to silence this.")


_warning = threading_layer_warning()
if _warning is not None:
    import warnings

    warnings.warn(_warning, RuntimeWarning, stacklevel=2)

FASTMATH = {"contract", "reassoc", "nsz"}
CACHE = os.environ.get("FASTCONV_NO_CACHE", "") in ("", "0")

#: Decorator for the parallel kernels.
parallel_kernel = numba.njit(parallel=True, fastmath=FASTMATH, cache=CACHE, nogil=True)

#: Decorator for serial helpers that a parallel kernel calls from its loop body.  A helper
#: compiled on its own, outside the outlined ``prange`` body, can keep its loop-invariant
#: pointers in registers: inlined there, the same loop reloads them from the stack.
serial_kernel = numba.njit(fastmath=FASTMATH, cache=CACHE, nogil=True)


@intrinsic
def _stack_alloc(typingctx, rows, cols, dtype):
    """Pointer to ``rows * cols`` uninitialised elements of ``dtype`` on the caller's stack.

    ``cgutils.alloca_once`` emits the ``alloca`` in the entry block of the function being
    generated, so inside a ``prange`` body every worker thread gets its own copy, and
    LLVM's scalar replacement keeps a small, fully unrolled tile in vector registers.  A
    heap array from ``np.empty`` is opaque to that optimisation and stays in memory.
    """
    if not (isinstance(rows, types.IntegerLiteral) and isinstance(cols, types.IntegerLiteral)):
        return None
    if not isinstance(dtype, (types.DType, types.NumberClass)):
        return None
    n = rows.literal_value * cols.literal_value
    elem = dtype.dtype

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(elem), size=n)

    return types.CPointer(elem)(rows, cols, dtype), codegen


@numba.njit(inline="always")
def stack_tile(rows, cols, dtype):
    """A C-ordered ``(rows, cols)`` array of uninitialised ``dtype`` values on the stack.

    ``rows`` and ``cols`` must be integer literals at the call site.

    Only valid inside the function that calls it: never return it or store it.
    """
    return numba.carray(_stack_alloc(rows, cols, dtype), (rows, cols))
