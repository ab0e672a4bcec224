"""Triton kernels of the ``triton`` backend: fused statistics, scale and clamp.

Definitions of every statistic: :mod:`fastgrad.reference`; table layout:
:mod:`fastgrad.spec`. This module holds the ``@triton.jit`` kernels and the
launchers that plan, allocate and pick block sizes.

Work split and grid
-------------------
Every tensor is cut into chunks of ``CHUNK`` elements that never cross a
tensor boundary. The *plan* of a parameter set
(:mod:`fastgrad.backends.chunk_plan`, shared with the CUDA backend) lists the
chunks as device tables, grouped by dtype and pointer alignment:
``item_row[w]`` (the tensor's row, i.e. its position in the call) and
``item_start[w]`` (the chunk's first element); ``item_range[t]`` holds tensor
``t``'s first and past-the-end item. Plans are cached per ``(device, stream,
CHUNK, sizes, dtypes, alignments)`` (a plan evicted while another stream's
kernel still reads it would be unsafe), so a steady-state step only gathers
data pointers into an int64 table, and even that upload is skipped while
the pointers are the ones seen last time (a few tables per plan).

Kernels address many tensors through that table: program ``w`` loads
``ptr_table[item_row[w]]`` and casts it to a typed pointer. Under
``TRITON_INTERPRET=1`` the interpreter dereferences such raw addresses on
the host, which is why CPU tensors work there (and CUDA tensors must not be
sent to an interpreted kernel).

Statistics take ``G + 2`` launches for the ``G`` (dtype, alignment) groups present:

1. ``_stats_chunk_kernel``, once per group, grid ``(chunks of that group,)``:
   program ``w`` reads its chunk once, ``BLOCK`` elements at a time (loads
   upcast to float64; half types go through float32, which is exact),
   reduces each block at once (one fixed-order tree: max, sum and sum of
   squares together; one p at a time for other p) into per-chunk scalars,
   and writes its partials to its own rows ``fpart[w]`` and ``cpart[w]``.
2. ``_stats_reduce_kernel``, grid ``(T,)``: program ``t`` folds the partial
   rows of tensor ``t``'s chunks in chunk order and writes output row ``t``.
3. ``_stats_total_kernel``, grid ``(1,)``: the total row ``T`` from rows
   ``[0, T)`` in row order, as :func:`fastgrad.aggregate.aggregate` combines
   them (so a caller needs no aggregation ops, i.e. no further launches).

Besides the launches, a call allocates the small partial and output tables
and uploads the pointer table only when the pointers changed. No
floating-point atomics and no reduction order that depends on scheduling,
so results are bitwise reproducible run to run; a tensor's row does not
depend on its neighbours or its group. Summation order inside a chunk: the
float64 sum over blocks, in block order, of each block's tree sum (before
#14.7 each lane summed its elements across blocks and the lanes were summed
at the end: the last bits of a norm may differ from that version's).

Every kernel walks its chunk as unmasked full blocks and one masked tail,
with an int32 loop counter: together with ``tl.multiple_of`` in a group
whose pointers are all 16-byte aligned (``ALIGNED``), that lets the GPU use
128-bit loads and stores. A misaligned tensor (a view into a DDP bucket or a
flat buffer at an odd offset) gets a group of its own, so it does not turn
vector loads off for the aligned tensors of its dtype.
:func:`stats_launch` picks ``BLOCK`` and the warps (2048 over 8 warps on the
GPU; 1024 when some p is neither 1 nor 2), capped by the largest tensor of
the group; the interpreter takes whole chunks, as it pays per operation
rather than per element.

CUDA graphs: with warm caches (the same call made once before capture) the
launches capture and replay; a plan, pointer-table or norm-table miss during
capture raises :class:`fastgrad.backends.chunk_plan.CaptureMiss` (an upload
from a pooled pinned buffer would be replayed stale), and what a capture
used is pinned for the life of the process.

Aliasing: ``scale_``/``clamp_`` over tensors that share memory run in list
order, one pass per layer of disjoint tensors
(:func:`fastgrad.backends._layout.overlap_layers`).

Norm math
---------
A chunk's partial for exponent ``p`` is a pair ``(s, k)`` meaning
``norm^p = 2^(p k) * s`` with ``s = sum_i (|x_i| 2^-k)^p`` in float64 over the
finite elements (NaN/Inf are left out; the counts override the result).

* Fast path: float32/16/bf16 input and every ``p <= 4``. Then ``k = 0``: the
  float64 sum of ``|x|^p`` with ``|x| <= 3.4e38`` cannot overflow, and
  subnormal floats raised to ``p <= 4`` stay normal doubles. ``p = 1, 2``
  cost one multiply; other ``p`` use ``exp2(p log2 |x|)``.
* Scaled path (float64 input, or some ``p > 4``): ``k`` is a running
  exponent with ``max|x| < 2^k``; when a block raises it, the accumulators
  are multiplied by ``2^(p (k_old - k_new))``. One read, no overflow.

Per tensor: ``K = max_c k_c`` over chunks with ``s_c > 0``,
``S = sum_c s_c 2^(p (k_c - K))``, ``norm = 2^(K + log2(S) / p)`` (0 if no
chunk has ``s_c > 0``), then NaN if the tensor holds a NaN, else +Inf if
it holds an Inf. ``max|x|`` is the max over non-NaN values.

Counts and histogram
--------------------
Each element gets a *slot* from its float bits (float32 bits for the half
types, after the exact upcast; float64 bits for float64): slots 0..3 are
NaN, +Inf, -Inf, zero, the count columns of the output; slot ``4 + b`` is
histogram bin ``b`` with ``b = clamp(unbiased_exponent - min_exp + 1, 0,
B - 1)`` and subnormals in bin 0. So a slot is directly an output column.
``tl.histogram`` counts a block's slots; each chunk stores its int32
counters, and the reduce stage sums them per tensor in int64.

Memory layouts the kernels assume
---------------------------------
Tensors whose elements fill one dense block of memory in some dimension
order (contiguous, transposed, channels-last, ``x[1:]``) are read flat from
``data_ptr()``: statistics do not depend on element order. Genuinely
strided views (``x[:, ::2]``, expanded tensors) are staged through a
``.contiguous()`` copy: statistics read the copy; ``scale_``/``clamp_`` work
on the copy and write it back with ``Tensor.copy_`` (so for such a view,
``scale_`` with ``coef == 1`` rewrites identical bits rather than writing
nothing). Gradients are dense in practice, so this path is rare.

Elementwise ops
---------------
``scale_`` (``x *= coef``) and ``clamp_`` run one read+write pass per dtype
over the same chunks. ``coef`` stays on the device: each program loads it
and returns before touching memory when it is 1. Half types compute in
float32 and round once; float32 uses ``float(coef)``, as torch does.
Clamp bounds travel as float64 bit patterns at the end of the pointer
table, since Triton would pass a Python float as float32.

bfloat16 <-> float32 conversions are written with integer bit operations
(exact upcast; round to nearest even, NaN kept a NaN): the interpreter
truncates float32 -> bfloat16 and flushes bfloat16 subnormals, and on the
GPU the bit operations cost next to nothing.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from .backends._layout import dense_in_some_order, overlap_layers
from .backends.chunk_plan import CaptureMiss, ChunkPlan, PlanCache
from .spec import DTYPE_CODES, DTYPES_BY_CODE, NUM_COUNTS, RawStats, StatsSpec

CHUNK = 1 << 16
GPU_BLOCK = 2048
# p <= FAST_MAX_P: float64 holds sum |x|^p of float32/16/bf16 input unscaled.
FAST_MAX_P = 4.0

# Spec constants as Triton constexprs: jitted code may only read constexpr globals.
_NCOUNTS = tl.constexpr(NUM_COUNTS)

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------


@triton.jit
def _to_f32(raw, DTYPE: tl.constexpr):
    """Exact upcast of a loaded value to float32."""
    if DTYPE == tl.bfloat16:
        # bfloat16 is the top half of a float32. Done on the bits because the
        # interpreter's bfloat16 -> float32 conversion loses subnormals.
        return (raw.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def _max_sum_sum(m0, a0, b0, m1, a1, b1):
    return tl.maximum(m0, m1), a0 + a1, b0 + b1


@triton.jit
def _accumulate(raw, m, acc, mx, hist, k, p, DTYPE: tl.constexpr, IS_F64: tl.constexpr,
                SCALED: tl.constexpr, GENERIC_P: tl.constexpr, HIST: tl.constexpr,
                MIN_EXP: tl.constexpr, NBINS: tl.constexpr, NSLOTS: tl.constexpr):
    """Fold one block of loaded values (lanes outside ``m`` hold 0) into a chunk's accumulators.

    ``acc`` ([NPP] float64), ``mx`` and ``k`` are per-chunk scalars: each block
    is reduced (a fixed tree, the same on every run) before it is added, so no
    per-lane float64 accumulators stay live across the loop (they cost
    2 * NPP registers per element a thread holds).
    """
    if IS_F64:
        x = raw
        bits = x.to(tl.int64, bitcast=True)
        e = ((bits >> 52) & 0x7FF).to(tl.int32)
        mant = (bits & 0xFFFFFFFFFFFFF) != 0
        EMAX: tl.constexpr = 0x7FF
        BIAS: tl.constexpr = 1023
    else:
        xf = _to_f32(raw, DTYPE)
        x = xf.to(tl.float64)
        bits = xf.to(tl.int32, bitcast=True)
        e = (bits >> 23) & 0xFF
        mant = (bits & 0x7FFFFF) != 0
        EMAX: tl.constexpr = 0xFF
        BIAS: tl.constexpr = 127
    neg = bits < 0

    a = tl.abs(x)
    is_nan = (e == EMAX) & mant
    a_num = tl.where(is_nan, 0.0, a)  # max|x| is over the non-NaN values
    a_fin = tl.where(e != EMAX, a, 0.0)  # sums are over the finite values

    if SCALED:
        bm = tl.max(a_fin, axis=0)
        kb = ((bm.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1022
        k_new = tl.maximum(k, kb)
        acc = acc * tl.exp2(p * (k - k_new).to(tl.float64))
        k = k_new
        b = a_fin * tl.exp2(-k.to(tl.float64))
    else:
        b = a_fin
    if GENERIC_P:
        mx = tl.maximum(mx, tl.max(a_num, axis=0))
        pos = b > 0
        lb = tl.log2(tl.where(pos, b, 1.0))
        # One p at a time, each block row reduced at once: [BLOCK] temporaries, not [NPP, BLOCK].
        j = tl.arange(0, acc.shape[0])
        for jj in tl.static_range(acc.shape[0]):
            pj = tl.sum(tl.where(j == jj, p, 0.0), axis=0)
            term = tl.where(pj == 2.0, b * b, tl.where(pj == 1.0, b, tl.where(pos, tl.exp2(pj * lb), 0.0)))
            acc = tl.where(j == jj, acc + tl.sum(term, axis=0), acc)
    else:
        # Every p is 1 or 2: max, sum and sum of squares in one block reduction.
        bmx, s1, s2 = tl.reduce((a_num, b, b * b), 0, _max_sum_sum)
        mx = tl.maximum(mx, bmx)
        acc += tl.where(p == 2.0, s2, s1)

    # Slot = output column: 0 NaN, 1 +Inf, 2 -Inf, 3 zero, 4 + histogram bin.
    special = tl.where(mant, 0, tl.where(neg, 2, 1))
    low = tl.where(mant, _NCOUNTS, 3)  # e == 0: subnormal -> underflow bin
    binned = _NCOUNTS + tl.minimum(tl.maximum(e - (BIAS + MIN_EXP - 1), 0), NBINS - 1)
    slot = tl.where(e == EMAX, special, tl.where(e == 0, low, binned))
    if HIST:
        counted = m
    else:
        counted = m & (slot < _NCOUNTS)
    # Uncounted lanes go to the last slot, past every output column: no
    # reliance on tl.histogram's mask argument (newer Triton only).
    hist += tl.histogram(tl.where(counted, slot, NSLOTS - 1), NSLOTS)
    return acc, mx, hist, k


@triton.jit
def _program_chunk(ptr_table, numels, chunk_row, chunk_start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                   CHUNK: tl.constexpr):
    """This program's chunk: a typed pointer to its first element and its length (int32)."""
    w = tl.program_id(0).to(tl.int64)
    row = tl.load(chunk_row + w)
    start = tl.load(chunk_start + w)
    n = tl.minimum(tl.load(numels + row) - start, CHUNK).to(tl.int32)  # int32: lets loads vectorise
    base = tl.load(ptr_table + row).to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:  # every pointer of the launch is 16-byte aligned: 128-bit loads
        base = tl.multiple_of(base, 16)
    return base, n


@triton.jit
def _stats_chunk_kernel(
    ptr_table,  # int64 [T]: data pointers, by output row
    numels,  # int64 [T]
    chunk_row,  # int32 [W]: this launch's chunks
    chunk_start,  # int64 [W]
    ps,  # float64 [NPP]: the finite p (padded)
    fpart,  # float64 [W, NPP + 2]: s_j..., k, max|x|
    cpart,  # int32 [W, NSLOTS]: slot counters
    DTYPE: tl.constexpr,
    IS_F64: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    NPP: tl.constexpr,
    SCALED: tl.constexpr,
    GENERIC_P: tl.constexpr,
    HIST: tl.constexpr,
    MIN_EXP: tl.constexpr,
    NBINS: tl.constexpr,
    NSLOTS: tl.constexpr,
):
    w = tl.program_id(0).to(tl.int64)
    base, n = _program_chunk(ptr_table, numels, chunk_row, chunk_start, DTYPE, ALIGNED, CHUNK)
    p = tl.load(ps + tl.arange(0, NPP))
    lanes = tl.arange(0, BLOCK)

    acc = tl.zeros([NPP], dtype=tl.float64)
    mx = tl.zeros([], dtype=tl.float64)
    hist = tl.zeros([NSLOTS], dtype=tl.int32)
    # Running scale exponent of the scaled path: every |x| seen is < 2^k.
    # -1022 makes 2^-k a normal double from the start.
    k = tl.zeros([], dtype=tl.int32) - 1022

    # Full blocks unmasked (so loads can vectorise), then one masked tail.
    n_full = n // BLOCK * BLOCK
    everywhere = tl.full([BLOCK], 1, tl.int1)
    for i in range(0, n_full, BLOCK):
        raw = tl.load(base + i + lanes)
        acc, mx, hist, k = _accumulate(raw, everywhere, acc, mx, hist, k, p, DTYPE, IS_F64, SCALED,
                                       GENERIC_P, HIST, MIN_EXP, NBINS, NSLOTS)
    if n_full < n:
        m = n_full + lanes < n
        raw = tl.load(base + n_full + lanes, mask=m, other=0.0)
        acc, mx, hist, k = _accumulate(raw, m, acc, mx, hist, k, p, DTYPE, IS_F64, SCALED,
                                       GENERIC_P, HIST, MIN_EXP, NBINS, NSLOTS)

    frow = fpart + w * (NPP + 2)
    tl.store(frow + tl.arange(0, NPP), acc)
    if SCALED:
        tl.store(frow + NPP, k.to(tl.float64))
    else:
        tl.store(frow + NPP, 0.0)
    tl.store(frow + NPP + 1, mx)
    tl.store(cpart + w * NSLOTS + tl.arange(0, NSLOTS), hist)


@triton.jit
def _stats_reduce_kernel(
    chunk_range,  # int64 [T, 2]: first and past-the-end partial row of tensor t
    ps,  # float64 [NPP]
    fpart,  # float64 [W, NPP + 2]
    cpart,  # int32 [W, NSLOTS]
    floats,  # float64 [T, NP + 1]
    counts,  # int64 [T, NC]
    NP: tl.constexpr,
    NPP: tl.constexpr,
    NC: tl.constexpr,
    NSLOTS: tl.constexpr,
    BW: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c0 = tl.load(chunk_range + 2 * t)
    c1 = tl.load(chunk_range + 2 * t + 1)
    rows = tl.arange(0, BW)
    slots = tl.arange(0, NSLOTS)
    j = tl.arange(0, NPP)
    FW: tl.constexpr = NPP + 2

    cnt = tl.zeros([NSLOTS], dtype=tl.int64)
    for c in range(c0, c1, BW):
        r = c + rows
        tile = tl.load(cpart + r[:, None] * NSLOTS + slots[None, :], mask=(r < c1)[:, None], other=0)
        cnt += tl.sum(tile.to(tl.int64), axis=0)
    tl.store(counts + t * NC + slots, cnt, mask=slots < NC)
    n_nan = tl.sum(tl.where(slots == 0, cnt, 0), axis=0)
    n_inf = tl.sum(tl.where((slots == 1) | (slots == 2), cnt, 0), axis=0)

    # Two passes over the (small) partials: the common exponent K first, so
    # that the sum below never overflows.
    K = tl.full([NPP], float("-inf"), dtype=tl.float64)
    mx = tl.zeros([BW], dtype=tl.float64)
    for c in range(c0, c1, BW):
        r = c + rows
        rm = r < c1
        s = tl.load(fpart + r[:, None] * FW + j[None, :], mask=rm[:, None], other=0.0)
        kc = tl.load(fpart + r * FW + NPP, mask=rm, other=0.0)
        K = tl.maximum(K, tl.max(tl.where(s > 0, kc[:, None], float("-inf")), axis=0))
        mx = tl.maximum(mx, tl.load(fpart + r * FW + NPP + 1, mask=rm, other=0.0))
    p = tl.load(ps + j)
    K = tl.where(K > float("-inf"), K, 0.0)
    S = tl.zeros([NPP], dtype=tl.float64)
    for c in range(c0, c1, BW):
        r = c + rows
        rm = r < c1
        s = tl.load(fpart + r[:, None] * FW + j[None, :], mask=rm[:, None], other=0.0)
        kc = tl.load(fpart + r * FW + NPP, mask=rm, other=0.0)
        rel = tl.minimum(kc[:, None] - K[None, :], 0.0)  # <= 0 wherever s > 0
        S += tl.sum(tl.where(s > 0, s * tl.exp2(p[None, :] * rel), 0.0), axis=0)

    norm = tl.exp2(K + tl.log2(tl.where(S > 0, S, 1.0)) / p)
    norm = tl.where(S > 0, norm, 0.0)
    norm = tl.where(n_inf > 0, float("inf"), norm)
    norm = tl.where(n_nan > 0, float("nan"), norm)
    frow = floats + t * (NP + 1)
    tl.store(frow + j, norm, mask=j < NP)
    tl.store(frow + NP, tl.max(mx, axis=0))


@triton.jit
def _stats_total_kernel(
    ps,  # float64 [NPP]
    floats,  # float64 [T + 1, NP + 1]: row T is written
    counts,  # int64 [T + 1, NC]: row T is written
    T,
    NP: tl.constexpr,
    NPP: tl.constexpr,
    NC: tl.constexpr,
    NSLOTS: tl.constexpr,
    BW: tl.constexpr,
):
    # norm = M * (sum_t (n_t / M)^p)^(1/p), M = max_t n_t; NaN / Inf from the counts.
    rows = tl.arange(0, BW)
    slots = tl.arange(0, NSLOTS)
    j = tl.arange(0, NPP)
    jm = j < NP
    cnt = tl.zeros([NSLOTS], dtype=tl.int64)
    M = tl.zeros([NPP], dtype=tl.float64)
    mx = tl.zeros([BW], dtype=tl.float64)
    for c in range(0, T, BW):
        r = c + rows
        rm = r < T
        tile = tl.load(counts + r[:, None] * NC + slots[None, :], mask=rm[:, None] & (slots < NC)[None, :], other=0)
        cnt += tl.sum(tile, axis=0)
        n = tl.load(floats + r[:, None] * (NP + 1) + j[None, :], mask=rm[:, None] & jm[None, :], other=0.0)
        M = tl.maximum(M, tl.max(tl.where(n == n, n, 0.0), axis=0))
        mx = tl.maximum(mx, tl.load(floats + r * (NP + 1) + NP, mask=rm, other=0.0))
    n_nan = tl.sum(tl.where(slots == 0, cnt, 0), axis=0)
    n_inf = tl.sum(tl.where((slots == 1) | (slots == 2), cnt, 0), axis=0)
    p = tl.load(ps + j)
    ok = (M > 0) & (M < float("inf"))
    safe = tl.where(ok, M, 1.0)
    S = tl.zeros([NPP], dtype=tl.float64)
    for c in range(0, T, BW):
        r = c + rows
        rm = r < T
        n = tl.load(floats + r[:, None] * (NP + 1) + j[None, :], mask=rm[:, None] & jm[None, :], other=0.0)
        q = n / safe[None, :]
        pw = tl.where(p[None, :] == 2.0, q * q,
                      tl.where(p[None, :] == 1.0, q, tl.exp2(p[None, :] * tl.log2(tl.where(q > 0, q, 1.0)))))
        S += tl.sum(tl.where(q > 0, pw, 0.0), axis=0)
    root = tl.where(p == 2.0, tl.sqrt(S), tl.where(p == 1.0, S, tl.exp2(tl.log2(tl.where(S > 0, S, 1.0)) / p)))
    norm = tl.where(ok, M * root, tl.where(M > 0, float("inf"), 0.0))
    norm = tl.where(n_inf > 0, float("inf"), norm)
    norm = tl.where(n_nan > 0, float("nan"), norm)
    tl.store(floats + T * (NP + 1) + j, norm, mask=jm)
    tl.store(floats + T * (NP + 1) + NP, tl.max(mx, axis=0))
    tl.store(counts + T * NC + slots, cnt, mask=slots < NC)


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """float32 ``v`` rounded to nearest-even ``DTYPE``, done with integer ops for bfloat16."""
    if DTYPE == tl.bfloat16:
        # The interpreter truncates float32 -> bfloat16; these bit operations
        # round to nearest even everywhere (NaN kept quiet, never turned to Inf).
        bits = v.to(tl.int32, bitcast=True)
        r = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        r = tl.where(v != v, (bits >> 16) | 0x40, r)
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _scale_block(x, coef, cf, DTYPE: tl.constexpr, IS_F64: tl.constexpr):
    if IS_F64:
        return x * coef
    else:
        return _round_to(_to_f32(x, DTYPE) * cf, DTYPE)


@triton.jit
def _scale_kernel(
    ptr_table,
    numels,
    chunk_row,
    chunk_start,
    coef_ptr,  # float64 0-d, on the device
    DTYPE: tl.constexpr,
    IS_F64: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    coef = tl.load(coef_ptr)
    # Decided here, on the device: coef == 1 must write nothing, and reading
    # it on the host would synchronise.
    if coef != 1.0:
        base, n = _program_chunk(ptr_table, numels, chunk_row, chunk_start, DTYPE, ALIGNED, CHUNK)
        lanes = tl.arange(0, BLOCK)
        cf = coef.to(tl.float32)
        n_full = n // BLOCK * BLOCK
        for i in range(0, n_full, BLOCK):
            x = tl.load(base + i + lanes)
            tl.store(base + i + lanes, _scale_block(x, coef, cf, DTYPE, IS_F64))
        if n_full < n:
            m = n_full + lanes < n
            x = tl.load(base + n_full + lanes, mask=m)
            tl.store(base + n_full + lanes, _scale_block(x, coef, cf, DTYPE, IS_F64), mask=m)


@triton.jit
def _clamp_block(x, lo, hi, DTYPE: tl.constexpr, IS_F64: tl.constexpr):
    if IS_F64:
        v = x
        lo_v = lo
        hi_v = hi
    else:
        v = _to_f32(x, DTYPE)
        lo_v = lo.to(tl.float32)
        hi_v = hi.to(tl.float32)
    # min(max(x, lo), hi) as torch.clamp: comparisons with NaN are false, so
    # NaN passes through, and lo > hi gives hi.
    v = tl.where(v < lo_v, lo_v, v)
    v = tl.where(v > hi_v, hi_v, v)
    return _round_to(v, DTYPE)


@triton.jit
def _clamp_kernel(
    ptr_table,  # int64 [T + 2]: pointers, then the bits of lo and hi as float64
    numels,
    chunk_row,
    chunk_start,
    bounds_at,
    DTYPE: tl.constexpr,
    IS_F64: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    base, n = _program_chunk(ptr_table, numels, chunk_row, chunk_start, DTYPE, ALIGNED, CHUNK)
    lo = tl.load(ptr_table + bounds_at).to(tl.float64, bitcast=True)
    hi = tl.load(ptr_table + bounds_at + 1).to(tl.float64, bitcast=True)
    lanes = tl.arange(0, BLOCK)
    n_full = n // BLOCK * BLOCK
    for i in range(0, n_full, BLOCK):
        x = tl.load(base + i + lanes)
        tl.store(base + i + lanes, _clamp_block(x, lo, hi, DTYPE, IS_F64))
    if n_full < n:
        m = n_full + lanes < n
        x = tl.load(base + n_full + lanes, mask=m)
        tl.store(base + n_full + lanes, _clamp_block(x, lo, hi, DTYPE, IS_F64), mask=m)


try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted

    INTERPRETED = isinstance(_stats_chunk_kernel, _Interpreted)
except ImportError:  # a Triton without the interpreter
    INTERPRETED = False
"""True when the kernels were built by the interpreter (TRITON_INTERPRET=1 at import): CPU only."""


# --------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def flat_readable(t: torch.Tensor) -> bool:
    """True if ``t``'s elements fill ``numel`` consecutive slots from ``data_ptr()`` on."""
    return t.is_contiguous() or t.numel() <= 1 or dense_in_some_order(t)


# Plans and their pointer tables, per (device, stream): fastgrad.backends.chunk_plan.
PLANS = PlanCache(max_plans=32, max_tables=4)
_PLANS = PLANS  # the name tests/test_triton.py counts plans by


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _plan(srcs, addrs: list[int], device: torch.device, chunk: int, capturing: bool) -> ChunkPlan:
    """The chunk plan of these tensors, in groups of one dtype and one pointer alignment: a
    misaligned tensor (a view into a bucket at an odd offset) only turns off 128-bit loads for
    its own group. Cached per (device, stream, sizes, dtypes, alignments)."""
    return PLANS.get(
        device, _stream(device), chunk,
        [t.numel() for t in srcs], [DTYPE_CODES[t.dtype] for t in srcs],
        [(DTYPE_CODES[t.dtype], a % 16 == 0) for t, a in zip(srcs, addrs)],
        capturing=capturing, what="fastgrad's Triton backend",
    )


def _group_dtype(g) -> torch.dtype:
    return DTYPES_BY_CODE[g.key[0]]


def _group_block(g, chunk: int) -> int:
    """Elements per loop step: whole chunks under the interpreter (it pays per operation),
    GPU_BLOCK on the GPU, never more than the group's largest tensor needs."""
    return _block_for(g.max_numel, chunk)


def _block_for(max_numel: int, chunk: int) -> int:
    max_block = chunk if INTERPRETED else min(chunk, GPU_BLOCK)
    return min(max_block, max(16, _next_pow2(max_numel)))


def stats_launch(max_numel: int, generic_p: bool, chunk: int = CHUNK) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of ``_stats_chunk_kernel`` for a group whose largest tensor has
    ``max_numel`` elements. On the GPU: 2048 elements over 8 warps (8 per thread: two 16-byte
    loads of float32, one of a 16-bit type), 1024 when some p is neither 1 nor 2 (float64 exp2
    and log2 per p); both stay at or below 128 registers with no spills on sm_90
    (tests/test_triton_compile.py checks the compiled kernels)."""
    block = _block_for(max_numel, chunk)
    if not INTERPRETED and generic_p:
        block = min(block, GPU_BLOCK // 2)
    return block, 8 if block >= 1024 else 4


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _pointer_table(plan: ChunkPlan, values: list[int], capturing: bool, staged: bool) -> torch.Tensor:
    try:
        return plan.table(values, capturing)
    except CaptureMiss:
        why = (
            "some tensors are strided views read through a .contiguous() copy, whose address changes "
            "every call: make them contiguous before capturing"
            if staged
            else "these pointers (or clamp bounds) were not seen before the capture began: run the same "
            "call once before capturing (a warm-up), with the same tensors and arguments"
        )
        raise CaptureMiss(
            f"fastgrad's Triton backend: no cached pointer table while a CUDA graph is being captured "
            f"(an upload from a pooled host buffer would be replayed stale); {why}."
        ) from None


_PS: dict = {}


def _ps_table(ps: tuple[float, ...], npp: int, device: torch.device, capturing: bool) -> torch.Tensor:
    key = (ps, npp, device)
    t = _PS.get(key)
    if t is None:
        if capturing:
            raise CaptureMiss(
                "fastgrad's Triton backend: these norm types were not used before the CUDA graph "
                "capture began; run the same call once before capturing (a warm-up)."
            )
        padded = list(ps) + [2.0] * (npp - len(ps))
        t = _PS[key] = torch.tensor(padded, dtype=torch.float64, device=device)
    return t


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------


def grad_stats(tensors, spec: StatsSpec, chunk: int = CHUNK) -> RawStats:
    """Fill :class:`RawStats` for ``tensors`` (one device)."""
    if not tensors:
        return RawStats(
            torch.zeros(0, len(spec.finite_norms) + 1, dtype=torch.float64),
            torch.zeros(0, spec.num_count_cols, dtype=torch.int64),
        )
    return grad_stats_full(tensors, spec, chunk)[0]


def grad_stats_full(tensors, spec: StatsSpec, chunk: int = CHUNK) -> tuple[RawStats, torch.Tensor, RawStats]:
    """``(raw [T], numel [T + 1], total)`` for ``tensors`` (one device, at least one):
    ``G + 2`` launches for the ``G`` (dtype, alignment) groups present."""
    ps = spec.finite_norms
    nc = spec.num_count_cols
    device = tensors[0].device
    T = len(tensors)
    h = spec.histogram
    nbins = h.num_bins if h is not None else 1
    nslots = _next_pow2(nc + 1)  # + 1: a spare slot for masked-off lanes
    npp = _next_pow2(max(1, len(ps)))
    generic = any(p not in (1.0, 2.0) for p in ps)
    big_p = any(p > FAST_MAX_P for p in ps)
    capturing = _capturing(device)

    srcs = [t if flat_readable(t) else t.contiguous() for t in tensors]
    addrs = [t.data_ptr() for t in srcs]
    plan = _plan(srcs, addrs, device, chunk, capturing)
    ptrs = _pointer_table(plan, addrs, capturing, staged=any(a is not b for a, b in zip(srcs, tensors)))
    ps_t = _ps_table(ps, npp, device, capturing)
    fpart = torch.empty(max(plan.num_items, 1), npp + 2, dtype=torch.float64, device=device)
    cpart = torch.empty(max(plan.num_items, 1), nslots, dtype=torch.int32, device=device)
    floats = torch.empty(T + 1, len(ps) + 1, dtype=torch.float64, device=device)  # row T: the total
    counts = torch.empty(T + 1, nc, dtype=torch.int64, device=device)

    with _on(device):
        for g in plan.groups:
            if g.w1 == g.w0:
                continue
            dtype = _group_dtype(g)
            is_f64 = dtype == torch.float64
            block, warps = stats_launch(g.max_numel, generic, chunk)
            _stats_chunk_kernel[(g.w1 - g.w0,)](
                ptrs,
                plan.numels,
                plan.item_row[g.w0 : g.w1],
                plan.item_start[g.w0 : g.w1],
                ps_t,
                fpart[g.w0 : g.w1],
                cpart[g.w0 : g.w1],
                DTYPE=TL_DTYPES[dtype],
                IS_F64=is_f64,
                ALIGNED=g.key[1],
                CHUNK=chunk,
                BLOCK=block,
                NPP=npp,
                SCALED=is_f64 or big_p,
                GENERIC_P=generic,
                HIST=h is not None,
                MIN_EXP=h.min_exp if h is not None else 0,
                NBINS=nbins,
                NSLOTS=nslots,
                num_warps=warps,
            )
        _stats_reduce_kernel[(T,)](
            plan.item_range,
            ps_t,
            fpart,
            cpart,
            floats,
            counts,
            NP=len(ps),
            NPP=npp,
            NC=nc,
            NSLOTS=nslots,
            BW=max(1, min(64, 4096 // nslots)),
        )
        _stats_total_kernel[(1,)](
            ps_t, floats, counts, T, NP=len(ps), NPP=npp, NC=nc, NSLOTS=nslots,
            BW=max(1, min(64, 4096 // nslots)),
        )
    return RawStats(floats[:T], counts[:T]), plan.numels_and_total, RawStats(floats[T:], counts[T:])


def _elementwise(tensors, launch, extra: list[int], chunk: int) -> None:
    """Run ``launch(group, dtype, ptr_table, plan)`` per group; strided views go through a copy.
    Tensors that share memory are applied in list order, one layer of disjoint tensors after
    another (:func:`fastgrad.backends._layout.overlap_layers`)."""
    if not tensors:
        return
    layers = overlap_layers(tensors)
    if layers is not None:
        for idx in layers:
            _elementwise([tensors[i] for i in idx], launch, extra, chunk)
        return
    device = tensors[0].device
    capturing = _capturing(device)
    staged = [(t, t.contiguous()) for t in tensors if not flat_readable(t)]
    copies = {id(t): c for t, c in staged}
    srcs = [copies.get(id(t), t) for t in tensors]
    addrs = [t.data_ptr() for t in srcs]
    plan = _plan(srcs, addrs, device, chunk, capturing)
    ptrs = _pointer_table(plan, addrs + extra, capturing, staged=bool(staged))
    with _on(device):
        for g in plan.groups:
            if g.w1 > g.w0:
                launch(g, _group_dtype(g), ptrs, plan)
    for t, c in staged:
        t.copy_(c)


def scale_(tensors, coef: torch.Tensor, chunk: int = CHUNK) -> None:
    """``x *= coef`` in place; ``coef`` is a 0-d tensor read only on the device. Tensors sharing
    memory are applied in list order (``[x, x]`` scales ``x`` twice, as a per-tensor loop would)."""
    if not tensors:
        return
    coef = coef.to(tensors[0].device, torch.float64).reshape(())

    def launch(g, dtype, ptrs, plan):
        _scale_kernel[(g.w1 - g.w0,)](
            ptrs,
            plan.numels,
            plan.item_row[g.w0 : g.w1],
            plan.item_start[g.w0 : g.w1],
            coef,
            DTYPE=TL_DTYPES[dtype],
            IS_F64=dtype == torch.float64,
            ALIGNED=g.key[1],
            CHUNK=chunk,
            BLOCK=_group_block(g, chunk),
        )

    _elementwise(tensors, launch, [], chunk)


def _f64_bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def clamp_(tensors, clip_value: float, chunk: int = CHUNK) -> None:
    """``x = clamp(x, -clip_value, clip_value)`` in place, one pass per group (aliasing as :func:`scale_`)."""
    if not tensors:
        return
    v = float(clip_value)

    def launch(g, dtype, ptrs, plan):
        _clamp_kernel[(g.w1 - g.w0,)](
            ptrs,
            plan.numels,
            plan.item_row[g.w0 : g.w1],
            plan.item_start[g.w0 : g.w1],
            plan.num_tensors,  # the bounds follow the pointers in the table
            DTYPE=TL_DTYPES[dtype],
            IS_F64=dtype == torch.float64,
            ALIGNED=g.key[1],
            CHUNK=chunk,
            BLOCK=_group_block(g, chunk),
        )

    _elementwise(tensors, launch, [_f64_bits(-v), _f64_bits(v)], chunk)


__all__ = ["CHUNK", "INTERPRETED", "PLANS", "clamp_", "flat_readable", "grad_stats", "scale_"]
