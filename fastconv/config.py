"""Every tunable of fastconv in one place: how work is cut into chunks, which layers the
specialised algorithms take, the plan cache, and the process-wide Winograd switch.

Numba's compile options live in :mod:`fastconv._jit`; the kernels' tile sizes (``KB``,
``TW``, ...) belong to the kernels' code and live beside it.  Each value here is read at
run time, so a test or a benchmark may change it (and then clear the plan cache with
:func:`fastconv.plan.clear_plan_cache`, since plans remember their choices).
"""

from __future__ import annotations

import numpy as np

#: Deltas per batch chunk of the channel tile's dW and of the NCHW-delta dW: about a
#: quarter of a core's L2, so that a chunk's deltas stay there while its tasks sweep them.
DW_CHUNK_BYTES = 256 * 1024

#: The same for the pixel dW kernels.  Against 256 KiB: 1.03-1.06x on the few-channel
#: layers, and 1x1 layers from 0.89-0.94x to 1.04-1.10x the channel tile's speed.
DW_PIXEL_CHUNK_BYTES = 1024 * 1024

#: Up to this many input channels the pixel-vectorised kernels run the forward pass and
#: dW (the channel tile would have only C*R*S steps per register tile).
PIXEL_MAX_C = 4

#: Output rows per task of the pixel forward pass at stride 2 (:func:`fastconv.algorithms.
#: pixel.conv_pixel_bands`), each task laying out the input rows of its band: the 7x7
#: stem's bands read 11 rows for 8.
PIXEL_BAND_ROWS = 8

#: Winograd's dW sums its tiles in this many chunks (fewer for small problems), each into
#: its own buffer: fixed by the shapes, so results do not depend on the thread count.
#: MNIST conv2's dW: 4 chunks 0.96x the time of 8, 2 the same as 4.
WINOGRAD_DW_CHUNKS = 4

#: Winograd runs dW only for at least this many 2x2 output tiles (N * OH/2 * OW/2): its
#: transforms back and its chunk sums cost the same for one image as for 64, and below
#: about 8 MNIST conv2 images (49 tiles each) the NCHW-delta dW is faster.
WINOGRAD_DW_MIN_TILES = 392

#: The same for F(4x4, 3x3)'s dW, in 4x4 output tiles (N * ceil(OH/4) * ceil(OW/4)).
#: One thread, 3x3 64 -> 64 at 32x32 against the NCHW-delta dW: 0.74-0.91x at batch 1 (64
#: tiles), 1.7x at batch 2, 1.3-1.7x from batch 4 on.
WINOGRAD43_DW_MIN_TILES = 128

#: The depthwise kernels cut their planes into this many groups per thread, each with its
#: own scratch planes (the results do not depend on it: each plane is one task's).
DEPTHWISE_GROUPS_PER_THREAD = 2

#: Where a plane-by-plane kernel's output starts, in bytes after its input modulo a 4 KiB
#: page (:func:`fastconv.layouts.empty_apart`).  A core checks a load against the stores
#: still in flight by the address's low 12 bits; the depthwise forward pass loads its next
#: rows a few hundred bytes ahead of the rows it stores, at the same offsets in the input
#: and the output planes, so an output 0-256 bytes after its input modulo 4 KiB made every
#: load wait on a store that does not touch it: 14x14 planes 1.35x slower on one thread
#: (0.61-0.68 against 0.45 ms at 2048 bytes).  ``np.empty`` places the output wherever
#: the heap has room, so the slow placement came and went from one process to the next.
APART_BYTES = 2048

#: The depthwise forward pass of a 3x3, stride-1 layer reads each input plane in place
#: (masked loads, no zero-padded copy) while a plane takes at most this many bytes, or
#: the whole input at most ``DEPTHWISE_IN_PLACE_INPUT_BYTES``.  On 14-56 pixel planes that
#: ran 1.05-1.33x faster than through the copy.  112x112 planes (50 KB in float32, past a
#: core's L1) ran 1.1-1.26x at batch 1-4 (32 channels, 1.6-6.4 MB), but 0.91x at batch 8
#: and 16 (13-26 MB), where the copy's one pass over each plane streams better.
DEPTHWISE_IN_PLACE_BYTES = 32 * 1024
DEPTHWISE_IN_PLACE_INPUT_BYTES = 8 * 1024 * 1024

#: The grouped forward kernel cuts its (image, group) tasks into this many runs per thread,
#: each with its own scratch phase grid (the results do not depend on it: each task owns
#: its outputs).
GROUPED_TASKS_PER_THREAD = 4

#: A strided grouped dX runs its stride phases in one pass (each task's delta planes
#: padded once, every phase read from them, dx's rows joined from the phases) while one
#: group's padded delta planes take at most this many bytes; above (few input channels,
#: many deltas: a 7x7 stride-2 stem, 3.5 MB) the phases run one by one, each task's
#: planes then too large to stay in cache for all of them (the stem's dX 2.3x slower in
#: one pass).
GROUPED_DX_FUSED_BYTES = 1 << 18

#: The depthwise dW aims at this many (batch chunk, channel) tasks: layers with fewer
#: channels cut the batch into chunks.  Shapes only, so dW does not depend on the thread
#: count.
DEPTHWISE_DW_TASKS = 32

#: Grouped layers run the grouped kernels (output pixels as the vector lanes) unless their
#: groups have at least this many input and output channels, which fill the channel
#: tile's vectors.
GROUPED_MAX_CG = 32

#: A dilated layer's dW runs on its stacked dilation phases
#: (:mod:`fastconv.algorithms.space_to_batch`) only while its input and deltas together
#: take at most this many bytes: both are laid out again, and beyond the caches that pass
#: runs at memory speed (64 channels of 56 x 56, batch 16, dilation 4: 25.6 MB, 0.8x the
#: direct dW).
SPACE_TO_BATCH_DW_MAX_BYTES = 16 * 1024 * 1024

#: ... and only with at least this many input channels per group.  With fewer, the direct
#: dW (``nchw-delta-dw``) ran faster than the phases' Winograd dW, whose transforms weigh
#: more against the products (3x3, dilation 2, 28 x 28, batch 16: 64 channels 5.7 against
#: 7.3 ms; 32 channels on 56 x 56 5.5 against 7.0 ms); with 128 channels (batch 8) the
#: phases ran 1.13x faster, with 256 as fast.
SPACE_TO_BATCH_DW_MIN_C = 128

#: Problems of at most this many multiply-adds per pass run the serial direct kernels
#: (:mod:`fastconv.algorithms.small`): below it, a parallel region and a layout pass cost
#: more than the arithmetic.
SMALL_WORK = 1 << 19

#: The same bound for depthwise layers (groups = C > 1), whose parallel kernel needs no
#: layout pass of its own: at 113k multiply-adds (256 channels, 7x7, batch 1) it takes
#: about the serial kernels' time, at 226k (128 channels, 14x14) 0.7x on dX and dW.
DEPTHWISE_SMALL_WORK = 1 << 17

#: How many plans the functional API keeps (least recently used dropped first), as
#: oneDNN's primitive cache does.
PLAN_CACHE_SIZE = 256

#: The functional API's cached plans keep their prepared weights (blocked, or
#: Winograd-transformed) with a copy of the weights, up to this many bytes in all, the
#: least recently used dropped first: a call with the weights of the last call prepares
#: nothing (MNIST conv2 at batch 1: the filter transform took longer than the pass).
PLAN_CACHE_WEIGHT_BYTES = 64 * 1024 * 1024

_winograd = True


def set_winograd(flag: bool) -> None:
    """Use Winograd F(2x2, 5x5) for the fp32 layers where it applies (``True``, the
    default), or never (``False``).  Process-wide, like :func:`fastconv.set_num_threads`;
    plans made while it was on keep their choice, so make new ones after turning it off."""
    global _winograd
    if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(f"set_winograd takes True or False, got {flag!r}")
    _winograd = bool(flag)


def get_winograd() -> bool:
    """Whether Winograd may run (:func:`set_winograd`)."""
    return _winograd
