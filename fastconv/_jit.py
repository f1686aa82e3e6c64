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
"""

import os

import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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
