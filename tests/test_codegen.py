"""The hot loops compile to packed FMAs (the design's promise), checked in the assembly.

Cached dispatchers cannot show their assembly, so each kernel is recompiled here from its
Python source with the same options but without the cache.
"""

import re

import numba
import numpy as np
import pytest

from fastconv import _jit
from fastconv import kernels as K
from fastconv.algorithms import channel_tile as T
from fastconv.algorithms import depthwise as DW
from fastconv.algorithms import grouped as GR
from fastconv.algorithms import grouped_dw as GD
from fastconv.algorithms import grouped_dw_windows as GW
from fastconv.algorithms import nchw_delta_dw as NC
from fastconv.algorithms import pixel as P

PACKED_FMA = re.compile(r"vfmadd\d+ps\s[^\n]*[yz]mm")
PACKED_ADD = re.compile(r"vaddps\s[^\n]*[yz]mm")


def _fresh(kernel):
    return numba.njit(parallel=True, fastmath=_jit.FASTMATH, cache=False)(kernel.py_func)


def _fma_loop(asm: str) -> str:
    """The innermost loop around the first packed FMA: from the label that the first
    backward jump after it goes to, down to that jump."""
    lines = asm.splitlines()
    first = next(i for i, line in enumerate(lines) if PACKED_FMA.search(line))
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.\w+:$", line)}
    for i in range(first, len(lines)):
        jump = re.match(r"^\s+j\w+\s+(\.\w+)$", lines[i])
        if jump and labels.get(jump.group(1), len(lines)) < first:
            return "\n".join(lines[labels[jump.group(1)]:i + 1])
    raise AssertionError("no loop around the first packed FMA")


def test_forward_and_dx_kernel_uses_packed_fma():
    f = _fresh(T.conv_tiles)
    x = np.zeros((1, 9, 9, 2), np.float32)
    w = np.zeros((1, 1, 3, 3, 2, T.KB), np.float32)
    y = np.zeros((1, 3, 7, 7), np.float32)
    f(x, w, np.zeros((1, T.KB), np.float32), y, T.TileMap(7, 7, 1, 1, 1, 1), T.Border())
    asm = f.inspect_asm(f.signatures[0])
    # The 7-pixel x 16-channel tile: at least 7 packed FMAs in the unrolled body.
    assert len(PACKED_FMA.findall(asm)) >= T.TW


@pytest.mark.parametrize("kernel, tc, kbw", [(T.conv_dw_tiles, T.TC, T.KBW),
                                              (T.conv_dw_tiles_wide, T.TCW, T.KBWW)])
def test_dw_kernels_use_packed_fma_without_gathers(kernel, tc, kbw):
    f = _fresh(kernel)
    x = np.zeros((1, 5 * 5 * 2), np.float32)
    dy = np.zeros((1, 3, 3, 1, kbw), np.float32)
    off = np.zeros((1, tc), np.uint64)
    dwb = np.zeros((1, 1, 1, 3, tc, kbw), np.float32)
    f(x, dy, off, dwb, 2, 10, 1, 1, 1, 3, 3, 0, 0)
    asm = f.inspect_asm(f.signatures[0])
    assert len(PACKED_FMA.findall(asm)) >= tc
    assert "vgather" not in asm  # the deltas are loaded as whole vectors


def test_pixel_forward_kernel_uses_packed_fma():
    f = _fresh(P.conv_pixel_tiles)
    x = np.zeros((1, 20 * 20), np.float32)
    y = np.zeros((1, P.KP, 16, 16), np.float32)
    toff = np.arange(16)[:, None] * 20 + np.arange(25)
    f(x, toff, np.zeros((1, 25, P.KP), np.float32), np.zeros(P.KP, np.float32), y)
    asm = f.inspect_asm(f.signatures[0])
    # KP channels x two PX-pixel vectors: 2*KP packed FMAs a step (2*KH in the half
    # tile), the accumulators in registers (no vector loads or stores from the stack in
    # the loop).
    _assert_tile_loops(asm)
    # The tap table leaves the loop no index arithmetic to divide.
    assert not re.search(r"\bi?div[lq]\b", _fma_loop(asm))
    # The epilogue adds the bias and stores each channel's row as vectors, not scalars.
    assert PACKED_ADD.search(asm)


def test_few_channel_dw_kernel_uses_packed_fma_without_gathers():
    f = _fresh(P.conv_dw_pixels)
    x = np.zeros((2, 1 * 20 * 20), np.float32)
    dy = np.zeros((2, P.DK, 16, 16), np.float32)
    f(x, dy, np.zeros((16, P.DT), np.int64), np.zeros((1, 1, 1, P.DK, P.DT), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    assert len(PACKED_FMA.findall(asm)) >= P.DK * P.DT  # the 4 x 5 tile of pixel vectors
    assert "vgather" not in asm


def test_grouped_forward_kernel_keeps_its_tile_in_registers():
    f = _fresh(GR.grouped_pixel_tiles)
    x = np.zeros((1, 2 * 2, 18 * 18), np.float32)  # 2 groups of 2 planes, 18 x 18
    y = np.zeros((1, 2 * GR.KT, 16, 16), np.float32)
    toff = np.arange(16)[:, None] * 20 + np.arange(2 * 9)
    f(x, 18, 1, 1, toff, np.zeros((2, 1, 18, GR.KT), np.float32),
      np.zeros(2 * GR.KT, np.float32), y, np.zeros((2, 2, 1, 1, 20, 20), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    # KT channels of one group x two PX-pixel vectors: 2*KT packed FMAs a step, and the
    # half tile's 2*KH; the accumulators in registers, the inputs loaded as whole vectors.
    _assert_tile_loops(asm)
    assert "vgather" not in asm and "vscatter" not in asm
    assert PACKED_ADD.search(asm)  # the bias added and the rows stored as vectors


def _assert_tile_loops(asm: str) -> None:
    """The pixel and grouped forward tile's two step loops
    (:func:`fastconv.algorithms.pixel._pixel_span`: the whole tile and the half tile, each
    one label down to its back edge, a few dozen lines): 2*KT packed FMAs a step in the
    first, 2*KH (or twice that, unrolled) in the second, no stack traffic in either."""
    tile = sorted((len(loop.splitlines()), loop) for loop in _fma_loops(asm))[:2]
    fmas = sorted(len(PACKED_FMA.findall(loop)) for _, loop in tile)
    assert fmas[0] >= 2 * GR.KH and fmas[1] >= 2 * GR.KT, fmas
    for _, loop in tile:
        assert not NO_SPILL.search(loop)


def test_grouped_strided_dx_kernel_keeps_its_tile_in_registers():
    f = _fresh(GR.grouped_dx_phases)
    # 1 image, 2 groups of 2 input and 2 output channels, 8 x 8 deltas padded to 9 x 9
    toff = np.arange(2 * 4, dtype=np.int64)
    f(np.zeros((1, 4, 64), np.float32), 8, 1, 1, toff, np.array([0, 8]),
      np.zeros((2, 1, 1, 8, GR.KT), np.float32), np.array([8]), np.array([8]), np.array([0]),
      np.array([0]), np.array([0, 2 * 8 * 9]), np.zeros((0, 2), np.int64), 2, 2,
      np.zeros((1, 4, 256), np.float32), 16, np.zeros((1, 2, 1, 1, 10, 9), np.float32),
      np.zeros((1, 2 * 8 * 9 + 16), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    # The forward tile: KT channels x two PX-pixel vectors, 2*KT packed FMAs a step in
    # registers; dx's rows joined with shuffles, not gathers and scatters.
    _assert_tile_loops(asm)
    assert "vgather" not in asm


def test_grouped_dw_kernel_keeps_its_tile_in_registers():
    f = _serial(GR._group_dw_tile)
    x = np.zeros((2, 20 * 20), np.float32)
    dy = np.zeros((2, P.DK, 16, 16), np.float32)
    f(x, dy, np.zeros((16, P.DT), np.int64), 0, 2, 0, 1, 2, 3, 0, 1,
      np.zeros((P.DK, P.DT), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    # The 4 x 5 tile of pixel vectors: DK*DT packed FMAs a step, in registers.
    loop = _innermost_fma_loop(asm)
    assert len(PACKED_FMA.findall(loop)) >= P.DK * P.DT
    assert not NO_SPILL.search(loop)
    assert "vgather" not in asm


def test_pool_plane_dw_kernel_uses_packed_fma_without_gathers():
    f = _fresh(P.conv_dw_pool_planes)
    f(np.zeros((2, 400), np.float32), np.zeros((2, P.DK, 40), np.float32),
      np.zeros((2, P.DK, 40), np.int8), np.zeros((4, P.DT), np.int64),
      np.zeros((1, 1, 1, P.DK, P.DT), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    # The four planes of a pixel vector, unrolled: DK x DT FMAs each, the deltas made by
    # selects from vectors of the pooled ones, no gathers.
    assert len(PACKED_FMA.findall(_fma_loop(asm))) >= 4 * P.DK * P.DT
    assert "vgather" not in asm


def test_matmul_kernel_keeps_its_tile_in_registers():
    f = _fresh(K.matmul_tiles)
    f(np.zeros((7, 9), np.float32), np.zeros((9, K.MC), np.float32),
      np.zeros((7, K.MC), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    # The tile is stored by rows of whole vectors (a loop over its rows made scatters).
    assert "vscatter" not in asm
    loop = _fma_loop(asm)
    # MR rows x MC columns: MR * MC / 16 packed FMAs per step of the reduction, with b's row
    # segment loaded as vectors (a signed column offset made LLVM emit gathers) and the
    # accumulators in registers (no vector loads or stores from the stack in the loop).
    assert len(PACKED_FMA.findall(loop)) == K.MR * K.MC // 16
    assert "vgather" not in loop
    assert not re.search(r"[yz]mm[^\n]*\(%rsp\)|\(%rsp\)[^\n]*[yz]mm", loop)


def test_nchw_delta_dw_kernel_keeps_its_tile_in_registers():
    f = _fresh(NC.conv_dw_cvec)
    x = np.zeros((2, 5 * 5 * K.CL), np.float32)
    dy = np.zeros((2, 5, 3, 3), np.float32)
    f(x, dy, np.zeros(NC.CV, np.uint64), np.zeros((1, 2 * NC.CK, NC.CV, K.CL), np.float32),
      K.CL, 5 * K.CL, 1, 1, 3, 3)
    loop = _fma_loop(f.inspect_asm(f.signatures[0]))
    # CK broadcast deltas x CV input vectors per pixel, accumulators in registers, the
    # input's channels loaded as whole vectors.
    assert len(PACKED_FMA.findall(loop)) == NC.CK * NC.CV
    assert "vgather" not in loop
    assert not re.search(r"[yz]mm[^\n]*\(%rsp\)|\(%rsp\)[^\n]*[yz]mm", loop)


def _serial(kernel):
    return numba.njit(fastmath=_jit.FASTMATH, cache=False)(kernel.py_func)


NO_SPILL = re.compile(r"[yz]mm[^\n]*\(%rsp\)|\(%rsp\)[^\n]*[yz]mm")


def _innermost_fma_loop(asm: str) -> str:
    """The shortest loop (a label down to a backward jump to it) that holds a packed FMA:
    the hot loop, where the first FMA in the text may belong to an outer loop's epilogue."""
    return min(_fma_loops(asm), key=len)


def _fma_loops(asm: str) -> list[str]:
    """Every loop (a label down to a backward jump to it) that holds a packed FMA."""
    lines = asm.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.\w+:$", line)}
    loops = []
    for i, line in enumerate(lines):
        jump = re.match(r"^\s+j\w+\s+(\.\w+)$", line)
        if jump and labels.get(jump.group(1), i) < i:
            body = "\n".join(lines[labels[jump.group(1)]:i + 1])
            if PACKED_FMA.search(body):
                loops.append(body)
    return loops


def test_depthwise_row_kernel_keeps_its_tile_in_registers():
    f = _serial(DW._rows_plane)
    P, OH, OW = 16, 14, 14
    src = np.zeros((OH + 2) * P + DW.VL, np.float32)
    f(src, P, np.arange(3, dtype=np.uint64), np.arange(0, 9, 3), np.array([0, 0, 3, 3, 3]),
      np.ones(9, np.float32), np.float32(0), np.zeros(OH * OW, np.float32), 0, OW, 1, OH, OW,
      np.zeros(DW.TR * DW.VL, np.float32))
    asm = f.inspect_asm(f.signatures[0])
    # A group of 3 rows: TR + 2 row loads for 3*TR packed FMAs on accumulators in
    # registers (no stack traffic in the loop), each input row serving three output rows.
    packed = re.compile(r"vfmadd\d+ps\s[^\n]*zmm")
    loop = min((b for b in _fma_loops(asm) if len(packed.findall(b)) == 3 * DW.TR), key=len)
    loads = re.findall(r"(?:vmovups|vfmadd\d+ps)\s+-?\w*\(%r(?!sp)[^\n]*zmm", loop)
    assert len(loads) == DW.TR + 2
    assert not NO_SPILL.search(loop)
    # The tile is stored as whole vectors and its rows copied out under a mask.
    assert "vgather" not in asm and "vscatter" not in asm
    assert re.search(r"vmovups\s+%zmm\d+, -?\w*\(%r[\w,%]+\)\s*\{%k\d\}", asm)


def test_depthwise_in_place_kernel_masks_its_loads_and_keeps_its_tile_in_registers():
    f = _serial(DW._plane_3x3)
    H = W = 14
    f(np.zeros(H * W, np.float32), 0, H, W, 1, 1, np.ones(9, np.float32), np.float32(0),
      np.zeros(H * W, np.float32), 0, H, W)
    asm = f.inspect_asm(f.signatures[0])
    # One filter column a step: TR + 2 input rows loaded under a zeroing lane mask (the
    # padding read in place) for 3*TR packed FMAs on accumulators in registers.
    packed = re.compile(r"vfmadd\d+ps\s[^\n]*zmm")
    loop = min((b for b in _fma_loops(asm) if len(packed.findall(b)) >= 3 * DW.TR), key=len)
    masked = re.findall(r"vmovups\s+-?\w*\(%r(?!sp)[^\n]*zmm\d+\s*\{%k\d\}\s*\{z\}", loop)
    assert len(masked) >= DW.TR + 2
    assert not NO_SPILL.search(loop)
    assert "vgather" not in asm and "vscatter" not in asm


def _in_place_dw_step(kernel, H, W, OH, OW):
    """The assembly of an in-place depthwise dW kernel compiled for one plane, and its
    tile step: the innermost loop of its 9*TR packed FMAs, with their count exact and
    the stack traffic bounded.  The 9 sums and 7 delta rows, with the input rows, fill
    25 of the 32 registers, and LLVM moves a few vectors to the stack and back in each
    step (8-10 of each in this build); a tile kept in memory would take one stack load
    and store per FMA."""
    f = _serial(kernel)
    f(np.zeros(H * W, np.float32), 0, H, W, 1, 1, np.zeros(OH * OW, np.float32), 0, OH, OW,
      np.zeros((9, DW.VL), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    packed = re.compile(r"vfmadd\d+ps\s[^\n]*zmm")
    loop = min((b for b in _fma_loops(asm) if len(packed.findall(b)) >= 9 * DW.TR), key=len)
    assert len(packed.findall(loop)) == 9 * DW.TR
    assert len(NO_SPILL.findall(loop)) <= 16
    assert "vgather" not in asm and "vscatter" not in asm
    return loop


MASKED_LOAD = re.compile(r"vmovups\s+-?\w*\(%r(?!sp)[^\n]*zmm\d+\s*\{%k\d\}\s*\{z\}")


def test_depthwise_in_place_dw_kernel_masks_its_loads_and_keeps_its_sums_in_registers():
    # A tile step: TR delta rows and, per filter column, TR + 2 input rows loaded under a
    # zeroing lane mask.
    loop = _in_place_dw_step(DW._plane_dw_3x3, 14, 14, 14, 14)
    assert len(MASKED_LOAD.findall(loop)) >= DW.TR + 3 * (DW.TR + 2)


def test_depthwise_in_place_stride_2_dw_kernel_splits_its_rows_in_registers():
    # A tile step: TR delta rows, and 2*TR + 1 input rows each loaded as two pairs of
    # masked vectors and split by three two-vector shuffles.
    loop = _in_place_dw_step(DW._plane_dw_3x3s2, 28, 28, 14, 14)
    assert len(MASKED_LOAD.findall(loop)) >= DW.TR + 4 * (2 * DW.TR + 1)
    assert len(re.findall(r"vperm[it]2ps", loop)) == 3 * (2 * DW.TR + 1)


def test_depthwise_dw_kernel_keeps_its_tile_in_registers():
    f = _serial(DW._rows_dots)
    P, OH = 16, 14
    f(np.zeros((OH + 2) * P + DW.VL, np.float32), P, np.zeros(OH * DW.VL, np.float32), DW.VL,
      np.arange(3, dtype=np.uint64), np.arange(0, 9, 3), np.array([0, 0, 3, 3, 3]),
      np.zeros((9, DW.VL), np.float32), OH, 1)
    asm = f.inspect_asm(f.signatures[0])
    # A group of 3 rows: TR delta rows and TR + 2 input rows loaded for 3*TR packed FMAs on
    # accumulators in registers (no stack traffic in the loop).
    packed = re.compile(r"vfmadd\d+ps\s[^\n]*zmm")
    loop = min((b for b in _fma_loops(asm) if len(packed.findall(b)) == 3 * DW.TR), key=len)
    loads = re.findall(r"(?:vmovups|vfmadd\d+ps)\s+-?\w*\(%r(?!sp)[^\n]*zmm", loop)
    assert len(loads) == 2 * DW.TR + 2
    assert not NO_SPILL.search(loop)
    assert "vgather" not in asm and "vscatter" not in asm


def test_kernels_compile_for_512_bit_vectors_on_avx512_hosts():
    import llvmlite.binding as llvm

    if not llvm.get_host_cpu_features().get("avx512f") or _jit.os.environ.get(
            "FASTCONV_VECTOR_WIDTH") == "256":
        pytest.skip("no AVX-512, or 256-bit vectors asked for")
    if _jit.os.environ.get("NUMBA_CPU_FEATURES") or _jit.os.environ.get("NUMBA_CPU_NAME"):
        pytest.skip("the user set Numba's target")
    assert numba.config.CPU_FEATURES.endswith(",-prefer-256-bit")
    assert not _jit._codegen_target()  # once only: the code generator exists now


@pytest.mark.parametrize("tile, taps", [("_lanes_tile", GD.TB), ("_lanes_tile3", GD.TB),
                                        ("_lanes_tile7s2", GD.TB7)])
def test_grouped_channel_lane_dw_tile_broadcasts_its_inputs_in_registers(tile, taps):
    f = _serial(getattr(GD, tile))
    f(np.zeros((2, 20 * 20), np.float32), np.zeros((2, 16, 16, GD.VL), np.float32),
      np.zeros((16, taps), np.int64), 2, 0, np.zeros((taps, GD.VL), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    # taps x VL channels: a packed FMA per tap a step, each input a folded broadcast, no
    # tile spills.
    loop = _innermost_fma_loop(asm)
    assert len(PACKED_FMA.findall(loop)) == taps
    assert len(re.findall(r"\{1to16\}", loop)) == taps
    assert not NO_SPILL.search(loop)
    assert "vgather" not in asm
    if tile != "_lanes_tile":
        # Eight row offsets stay in general registers: nothing is reloaded from the stack.
        assert "(%rsp)" not in loop


def test_grouped_window_dw_kernel_keeps_its_tile_in_registers():
    f = _serial(GW._windows_tile)
    f(np.zeros((2, 18 * 20 * 8), np.float32), np.zeros((2, 8, 16, 16), np.float32), 0, 2, 0,
      7, np.array([0, 160, 320]), 160, 8, np.zeros((24, 16), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    # KB channels x RB rows x two window vectors: 24 packed FMAs a step on six loaded
    # vectors and KB broadcast deltas, no tile spills.
    loop = _innermost_fma_loop(asm)
    assert len(PACKED_FMA.findall(loop)) == GW.KB * GW.RB * 2
    assert not NO_SPILL.search(loop)
    assert "vgather" not in asm
