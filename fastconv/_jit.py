"""Numba options for every kernel, decided in one place, and the stack-tile and
register-transpose intrinsics.

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


def _transpose_masks(n: int = 16) -> list[tuple[int, list[int], list[int]]]:
    """The shuffles of an ``n x n`` transpose, ``n`` a power of two: for each block size
    ``b = n/2, ..., 1``, rows ``i`` and ``i + b`` (``i & b == 0``) exchange their
    off-diagonal ``b x b`` blocks, as the masks ``(b, lo, hi)`` of two-row shuffles
    (element ``c < n`` of the pair is row ``i``'s, ``n + c`` row ``i + b``'s)."""
    out = []
    b = n // 2
    while b >= 1:
        lo = [c if c & b == 0 else n + c - b for c in range(n)]
        hi = [c + b if c & b == 0 else n + c for c in range(n)]
        out.append((b, lo, hi))
        b //= 2
    return out


def _takes(arrays, integers) -> bool:
    """The typing rule of the vector intrinsics below: ``arrays`` 1-D C-contiguous arrays of
    one dtype, float32 or float64; ``integers`` (offsets, strides, counts) integers."""
    return (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                and a.dtype == arrays[0].dtype and a.dtype in (types.float32, types.float64)
                for a in arrays)
            and all(isinstance(i, types.Integer) for i in integers))


def _operands(context, builder, signature, args) -> list:
    """An intrinsic's arguments as its code generation uses them, in order: an array's
    data structure, an integer cast to int64."""
    return [context.make_array(t)(context, builder, a) if isinstance(t, types.Array)
            else context.cast(builder, a, t, types.int64)
            for t, a in zip(signature.args, args, strict=True)]


@intrinsic
def transpose16(typingctx, src, so, ss, dst, do, ds):
    """``dst[do + c*ds + r] = src[so + r*ss + c]`` for ``r, c < 16``: a 16 x 16 block
    transposed in registers.

    ``src`` and ``dst`` are 1-D C-contiguous arrays of the same dtype (float32 or float64);
    offsets and strides count elements and may be negative.  Sixteen row loads, 64
    two-row shuffles (:func:`_transpose_masks`; ``vpermt2ps``, ``vshuff64x2`` and the
    like), sixteen row stores: about a quarter of the instructions of 256 scalar moves.
    Nothing is checked: the caller keeps every row inside its array.
    """
    if not _takes((src, dst), (so, ss, do, ds)):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        s_arr, so_, ss_, d_arr, do_, ds_ = _operands(context, builder, signature, args)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        vec = ir.VectorType(context.get_value_type(signature.args[0].dtype), 16)
        align = signature.args[0].dtype.bitwidth // 8
        rows = []
        for r in range(16):
            p = builder.gep(s_arr.data, [builder.add(so_, builder.mul(ss_, ir.Constant(i64, r)))])
            rows.append(builder.load(builder.bitcast(p, vec.as_pointer()), align=align))
        for b, lo, hi in _transpose_masks():
            new = list(rows)
            for i in range(16):
                if i & b == 0:
                    new[i] = builder.shuffle_vector(rows[i], rows[i + b],
                                                    ir.Constant(ir.VectorType(i32, 16), lo))
                    new[i + b] = builder.shuffle_vector(rows[i], rows[i + b],
                                                        ir.Constant(ir.VectorType(i32, 16), hi))
            rows = new
        for c in range(16):
            p = builder.gep(d_arr.data, [builder.add(do_, builder.mul(ds_, ir.Constant(i64, c)))])
            builder.store(rows[c], builder.bitcast(p, vec.as_pointer()), align=align)
        return context.get_dummy_value()

    return types.void(src, so, ss, dst, do, ds), codegen


def _masked_ops(context, builder, dtype):
    """Code-generation helpers for the masked-vector intrinsics below: ``vec`` (the
    16-lane vector type), ``ptr(arr, offset)``, ``mask(n)`` (lanes ``v < n``), ``load(p,
    m)`` (masked-out lanes read nothing and are zero), ``store(v, p, m)`` (masked-out lanes
    written nothing)."""
    from llvmlite import ir

    i1, i32, i64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)
    vec = ir.VectorType(context.get_value_type(dtype), 16)
    vptr = vec.as_pointer()
    mtype = ir.VectorType(i1, 16)
    # Overloaded intrinsics are named by their types: "p0" for an opaque pointer (LLVM
    # 15 and later), "p0v16f32" and the like for a typed one.
    vname = f"v16{vec.element.intrinsic_name}"
    suffix = f"{vname}.p0" if getattr(vptr, "is_opaque", False) else f"{vname}.p0{vname}"
    module = builder.module
    load_fn = module.globals.get(f"llvm.masked.load.{suffix}") or ir.Function(
        module, ir.FunctionType(vec, [vptr, i32, mtype, vec]),
        name=f"llvm.masked.load.{suffix}")
    store_fn = module.globals.get(f"llvm.masked.store.{suffix}") or ir.Function(
        module, ir.FunctionType(ir.VoidType(), [vec, vptr, i32, mtype]),
        name=f"llvm.masked.store.{suffix}")
    align = ir.Constant(i32, dtype.bitwidth // 8)

    def ptr(arr, offset):
        return builder.bitcast(builder.gep(arr.data, [offset]), vptr)

    def mask(n):
        # lanes v < n as the bits of an integer, (1 << clamp(n, 0, 16)) - 1: a shift and a
        # k-register move (a compare of 16 lane numbers takes a 1024-bit vector)
        n = builder.select(builder.icmp_signed("<", n, ir.Constant(i64, 0)),
                           ir.Constant(i64, 0), n)
        n = builder.select(builder.icmp_signed(">", n, ir.Constant(i64, 16)),
                           ir.Constant(i64, 16), n)
        bits = builder.sub(builder.shl(ir.Constant(i32, 1), builder.trunc(n, i32)),
                           ir.Constant(i32, 1))
        return builder.bitcast(builder.trunc(bits, ir.IntType(16)), mtype)

    def load(p, m):
        return builder.call(load_fn, [p, align, m, ir.Constant(vec, None)])

    def store(v, p, m):
        builder.call(store_fn, [v, p, align, m])

    return vec, ptr, mask, load, store


@intrinsic
def _copy16(typingctx, dst, do, src, so, n):
    """``dst[do + v] = src[so + v]`` for ``v < min(n, 16)``: one masked vector load and
    one masked vector store (AVX-512 ``vmovups`` under a ``k`` mask), with no element
    outside the first ``n`` read or written.  ``src`` and ``dst``: 1-D C-contiguous arrays
    of one dtype (float32 or float64); offsets count elements.  Nothing is checked."""
    if not _takes((src, dst), (do, so, n)):
        return None

    def codegen(context, builder, signature, args):
        d_arr, do_, s_arr, so_, n_ = _operands(context, builder, signature, args)
        _, ptr, mask, load, store = _masked_ops(context, builder, signature.args[0].dtype)
        m = mask(n_)
        store(load(ptr(s_arr, so_), m), ptr(d_arr, do_), m)
        return context.get_dummy_value()

    return types.void(dst, do, src, so, n), codegen


@intrinsic
def store_row(typingctx, dst, do, row, n):
    """``dst[do + v] = row[v]`` for ``v < min(n, 16)``: the 16 elements of ``row`` loaded
    whole and stored under a mask.  ``row`` may be a row of a :func:`stack_tile`, whose
    registers it then stores directly (LLVM still keeps the tile in registers).  Same
    rules as :func:`_copy16`."""
    if not _takes((row, dst), (do, n)):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        d_arr, do_, r_arr, n_ = _operands(context, builder, signature, args)
        _, ptr, mask, _, store = _masked_ops(context, builder, signature.args[0].dtype)
        v = builder.load(ptr(r_arr, ir.Constant(ir.IntType(64), 0)),
                         align=signature.args[0].dtype.bitwidth // 8)
        store(v, ptr(d_arr, do_), mask(n_))
        return context.get_dummy_value()

    return types.void(dst, do, row, n), codegen


@intrinsic
def load_row(typingctx, row, src, so, lanes):
    """``row[v] = src[so + v]`` for each lane ``v < 16`` whose bit is set in the integer
    ``lanes``, else 0: one masked vector load (``vmovups`` under a ``k`` mask, zeroing)
    stored whole into ``row``.  A masked-out lane reads nothing, so ``so + v`` may lie
    outside ``src`` for those lanes (a zero-padded border read in place).  ``row`` may be a
    row of a :func:`stack_tile`, which then stays in registers.  Same rules as
    :func:`_copy16`."""
    if not _takes((row, src), (so, lanes)):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        r_arr, s_arr, so_, lanes_ = _operands(context, builder, signature, args)
        vec, ptr, _, load, _ = _masked_ops(context, builder, signature.args[0].dtype)
        m = builder.bitcast(builder.trunc(lanes_, ir.IntType(16)),
                            ir.VectorType(ir.IntType(1), 16))
        builder.store(load(ptr(s_arr, so_), m), ptr(r_arr, ir.Constant(ir.IntType(64), 0)),
                      align=signature.args[0].dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.void(row, src, so, lanes), codegen


@intrinsic
def _split32(typingctx, dst, de, do, src, so, n):
    """``dst[de + u] = src[so + 2u]`` and ``dst[do + u] = src[so + 2u + 1]`` for the first
    ``min(n, 32)`` elements of ``src`` from ``so``: two masked loads, two two-vector
    shuffles (``vpermt2ps``) and two masked stores.  Same rules as :func:`_copy16`."""
    if not _takes((src, dst), (de, do, so, n)):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        d_arr, de_, do_, s_arr, so_, n_ = _operands(context, builder, signature, args)
        _, ptr, mask, load, store = _masked_ops(context, builder, signature.args[0].dtype)
        i64 = ir.IntType(64)
        sixteen = ir.Constant(i64, 16)
        lo = load(ptr(s_arr, so_), mask(n_))
        hi = load(ptr(s_arr, builder.add(so_, sixteen)), mask(builder.sub(n_, sixteen)))
        i32v = ir.VectorType(ir.IntType(32), 16)
        even = builder.shuffle_vector(lo, hi, ir.Constant(i32v, list(range(0, 32, 2))))
        odd = builder.shuffle_vector(lo, hi, ir.Constant(i32v, list(range(1, 32, 2))))
        one = ir.Constant(i64, 1)
        store(even, ptr(d_arr, de_), mask(builder.ashr(builder.add(n_, one), one)))
        store(odd, ptr(d_arr, do_), mask(builder.ashr(n_, one)))
        return context.get_dummy_value()

    return types.void(dst, de, do, src, so, n), codegen


@intrinsic
def load_split(typingctx, even, odd, src, so, lanes):
    """``even[u] = src[so + 2u]`` and ``odd[u] = src[so + 2u + 1]`` for ``u < 16``, each
    element read only where its bit ``v`` (``v = 2u`` or ``2u + 1``) is set in the 32-bit
    integer ``lanes``, else 0: two masked loads of 16 and two two-vector shuffles
    (``vpermt2ps``), the split of :func:`_split32` kept in registers.  A masked-out element
    is not read, so ``so + v`` may lie outside ``src`` for those.  ``even`` and ``odd`` may
    be rows of a :func:`stack_tile`.  Same rules as :func:`_copy16`."""
    if not _takes((even, odd, src), (so, lanes)):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        e_arr, o_arr, s_arr, so_, lanes_ = _operands(context, builder, signature, args)
        _, ptr, _, load, _ = _masked_ops(context, builder, signature.args[0].dtype)
        i16, i64 = ir.IntType(16), ir.IntType(64)
        m16 = ir.VectorType(ir.IntType(1), 16)
        lo = load(ptr(s_arr, so_), builder.bitcast(builder.trunc(lanes_, i16), m16))
        hi = load(ptr(s_arr, builder.add(so_, ir.Constant(i64, 16))), builder.bitcast(
            builder.trunc(builder.lshr(lanes_, ir.Constant(i64, 16)), i16), m16))
        i32v = ir.VectorType(ir.IntType(32), 16)
        align = signature.args[0].dtype.bitwidth // 8
        zero = ir.Constant(i64, 0)
        builder.store(builder.shuffle_vector(lo, hi, ir.Constant(i32v, list(range(0, 32, 2)))),
                      ptr(e_arr, zero), align=align)
        builder.store(builder.shuffle_vector(lo, hi, ir.Constant(i32v, list(range(1, 32, 2)))),
                      ptr(o_arr, zero), align=align)
        return context.get_dummy_value()

    return types.void(even, odd, src, so, lanes), codegen


@intrinsic
def _merge32(typingctx, dst, do, src, se, so, n):
    """``dst[do + 2u] = src[se + u]`` and ``dst[do + 2u + 1] = src[so + u]`` for the first
    ``min(n, 32)`` elements of ``dst`` from ``do``: the inverse of :func:`_split32`, two
    masked loads, two shuffles and two masked stores.  Same rules as :func:`_copy16`."""
    if not _takes((src, dst), (do, se, so, n)):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        d_arr, do_, s_arr, se_, so_, n_ = _operands(context, builder, signature, args)
        _, ptr, mask, load, store = _masked_ops(context, builder, signature.args[0].dtype)
        i64 = ir.IntType(64)
        one, sixteen = ir.Constant(i64, 1), ir.Constant(i64, 16)
        even = load(ptr(s_arr, se_), mask(builder.ashr(builder.add(n_, one), one)))
        odd = load(ptr(s_arr, so_), mask(builder.ashr(n_, one)))
        i32v = ir.VectorType(ir.IntType(32), 16)
        lo = builder.shuffle_vector(even, odd, ir.Constant(
            i32v, [v // 2 + (v % 2) * 16 for v in range(16)]))
        hi = builder.shuffle_vector(even, odd, ir.Constant(
            i32v, [8 + v // 2 + (v % 2) * 16 for v in range(16)]))
        store(lo, ptr(d_arr, do_), mask(n_))
        store(hi, ptr(d_arr, builder.add(do_, sixteen)), mask(builder.sub(n_, sixteen)))
        return context.get_dummy_value()

    return types.void(dst, do, src, se, so, n), codegen


@numba.njit(inline="always")
def copy_run(dst, do, src, so, n):
    """``dst[do : do + n] = src[so : so + n]`` in blocks of 16 elements, the last one
    masked (:func:`_copy16`): a short run, such as a 14-pixel row, is one load and one
    store instead of a scalar loop (a vector loop's remainder runs element by element).
    Offsets count elements; nothing is checked."""
    for v0 in range(0, n, 16):
        _copy16(dst, do + v0, src, so + v0, n - v0)


@numba.njit(inline="always")
def split_run(dst, de, do, src, so, n):
    """The even elements of ``src[so : so + n]`` to ``dst[de:]``, the odd ones to
    ``dst[do:]``, in blocks of 32 (:func:`_split32`): a row split into its two stride-2
    column phases.  Offsets count elements; nothing is checked."""
    for v0 in range(0, n, 32):
        _split32(dst, de + v0 // 2, do + v0 // 2, src, so + v0, n - v0)


@numba.njit(inline="always")
def merge_run(dst, do, src, se, so, n):
    """``dst[do : do + n]`` from its even elements at ``src[se:]`` and its odd ones at
    ``src[so:]``, in blocks of 32 (:func:`_merge32`): two stride-2 column phases joined
    into a row.  Offsets count elements; nothing is checked."""
    for v0 in range(0, n, 32):
        _merge32(dst, do + v0, src, se + v0 // 2, so + v0 // 2, n - v0)


def _interleave_stages(rows: int = 8, lanes: int = 16) -> list[list[tuple]]:
    """The shuffles that take ``rows`` vectors of ``lanes`` elements (row ``r``, lane
    ``u``) to ``rows`` vectors of ``lanes // rows`` pixels each, pixel-major: element ``(r,
    u)`` to vector ``u // P``, lane ``(u % P)*rows + r`` (``P = lanes // rows``).

    ``rows`` a power of two.  A vector's index is ``r`` at the start and must become ``u //
    P``: each stage settles one bit of it, pairing the vectors whose index differs in that
    bit and sending each element of the pair to the one whose bit matches its target's.
    Each pair holds exactly ``lanes`` elements for either side, so every new vector is one
    two-source shuffle (``vpermt2ps``): ``log2(rows)`` stages of ``rows`` shuffles.
    Returns, per stage, ``(a, b, lo, hi)``: vectors ``a`` and ``b`` become the shuffles of
    their concatenation by the masks ``lo`` and ``hi``."""
    per = lanes // rows

    def target(e):
        r, u = e
        return u // per, (u % per) * rows + r

    vecs = [[(r, u) for u in range(lanes)] for r in range(rows)]
    stages = []
    bit = 1
    while bit < rows:
        ops, new = [], list(vecs)
        for a in range(rows):
            if a & bit:
                continue
            both = vecs[a] + vecs[a | bit]
            lo = sorted((e for e in both if not target(e)[0] & bit), key=target)
            hi = sorted((e for e in both if target(e)[0] & bit), key=target)
            ops.append((a, a | bit, [both.index(e) for e in lo], [both.index(e) for e in hi]))
            new[a], new[a | bit] = lo, hi
        stages.append(ops)
        vecs = new
        bit *= 2
    assert all(target(e) == (m, v) for m, vec in enumerate(vecs) for v, e in enumerate(vec))
    return stages


@intrinsic
def _interleave8(typingctx, dst, do, src, so, ss, n):
    """``dst[do + 8u + r] = src[so + r*ss + u]`` for ``r < 8`` and ``u < min(n, 16)``:
    eight rows of up to 16 elements (eight channels' planes at one run of pixels) to
    pixel-major order, eight channels per pixel.  Eight masked loads, 24 two-source
    shuffles (:func:`_interleave_stages`), eight masked stores; nothing outside those
    elements is read or written.  Same rules as :func:`_copy16`."""
    if not _takes((src, dst), (do, so, ss, n)):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        d_arr, do_, s_arr, so_, ss_, n_ = _operands(context, builder, signature, args)
        _, ptr, mask, load, store = _masked_ops(context, builder, signature.args[0].dtype)
        i64 = ir.IntType(64)
        i32v = ir.VectorType(ir.IntType(32), 16)
        m = mask(n_)
        v = [load(ptr(s_arr, builder.add(so_, builder.mul(ss_, ir.Constant(i64, r)))), m)
             for r in range(8)]
        for ops in _interleave_stages():
            new = list(v)
            for a, b, lo, hi in ops:
                new[a] = builder.shuffle_vector(v[a], v[b], ir.Constant(i32v, lo))
                new[b] = builder.shuffle_vector(v[a], v[b], ir.Constant(i32v, hi))
            v = new
        n8 = builder.mul(n_, ir.Constant(i64, 8))
        for q in range(8):  # vector q: pixels 2q and 2q + 1, lanes below 8n - 16q
            store(v[q], ptr(d_arr, builder.add(do_, ir.Constant(i64, 16 * q))),
                  mask(builder.sub(n8, ir.Constant(i64, 16 * q))))
        return context.get_dummy_value()

    return types.void(dst, do, src, so, ss, n), codegen


@numba.njit(inline="always")
def interleave_run(dst, do, src, so, ss, n):
    """``dst[do + 8u + r] = src[so + r*ss + u]`` for ``r < 8``, ``u < n``: a run of ``n``
    pixels of eight planes ``ss`` elements apart into pixel-major order (HWC with eight
    channels), in blocks of 16 pixels (:func:`_interleave8`).  Offsets count elements;
    nothing is checked."""
    for u0 in range(0, n, 16):
        _interleave8(dst, do + 8 * u0, src, so + u0, ss, n - u0)
