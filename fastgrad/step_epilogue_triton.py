"""The optimizer step's epilogue on the GPU: one Triton program, grid ``(1,)``.

The same math as the C++ CPU epilogue (csrc/cpu/step_epilogue_cpu.cpp) and its float64 torch-op
definition (:func:`fastgrad.optim.epilogue.reference_epilogue`), on a few small float64/int64
device arrays: the true global norm ``n = n_raw / S``, the skip decision (non-finite, GradScaler's
``found_inf``, SpikeSkip's z-test with its ring-buffer update), the clip coefficient (GlobalNorm,
AutoClip's percentile of its history, ZClip's EMA rule), the counters, the per-tensor non-finite
counts of a bad step, and the folded ``grad_scale = S / c`` / ``found_inf`` the fused optimizer
reads. One launch replaces the dozen small torch ops (each a launch) of the reference.

The single program holds each state array in registers (block = the next power of two of its
length, masked), so every update is computed from the values read at the start and written back
once: no read-after-write through memory, no barrier. AutoClip's percentile sorts its history
(invalid slots +inf) with ``tl.sort``. Sums of the spike window and ZClip's warm-up buffer are
tree reductions: a few ulps from torch's order, as the CPU twin's sequential sums are.

Triton decides compiled versus interpreted when a kernel is defined: with ``TRITON_INTERPRET=1``
set before this module is first imported, the kernel runs on CPU tensors (tests/test_step_epilogue.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CLIP_NONE, CLIP_GLOBAL, CLIP_AUTO, CLIP_Z = range(4)  # fastgrad/optim/epilogue.py, step_epilogue_cpu.h


@triton.jit
def _step_epilogue_kernel(
    total_row, total_counts, tensor_counts, bad, amp_scale, amp_found, counters,
    spike_buf, spike_count, spike_pos, clip_buf, clip_count, clip_pos, clip_mean, clip_var,
    out_f64, out_bool, fold_out,
    T, counts_stride, spike_window, clip_len, reals,
    NORM_COL: tl.constexpr, MAX_COL: tl.constexpr, NONFINITE_COLS: tl.constexpr,
    HAS_AMP: tl.constexpr, HAS_FOUND: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
    HAS_SPIKE: tl.constexpr, SPIKE_BLOCK: tl.constexpr, KIND: tl.constexpr, CLIP_BLOCK: tl.constexpr,
    Z_ADAPTIVE: tl.constexpr, HAS_BAD: tl.constexpr, T_BLOCK: tl.constexpr,
):
    inf = float("inf")
    # float64 parameters come from memory: a Python float argument would arrive as float32
    spike_sigma = tl.load(reals + 0)
    max_norm = tl.load(reals + 1)
    quantile = tl.load(reals + 2)
    alpha = tl.load(reals + 3)
    z_thresh = tl.load(reals + 4)
    z_eps = tl.load(reals + 5)
    eps = tl.load(reals + 6)  # torch's clip_grad_norm_ 1e-6
    clip_len_f = tl.load(reals + 7)
    false = tl.full((), 0, tl.int1)
    # -- the true global norm -------------------------------------------------------------------
    if NORM_COL >= 0:
        raw = tl.load(total_row + NORM_COL)
    else:  # inf-norm: max|x|, NaN when the gradients hold a NaN (torch's inf-norm)
        mx = tl.load(total_row + MAX_COL)
        raw = tl.where(tl.load(total_counts) > 0, float("nan"), mx)
    if HAS_AMP:
        s = tl.load(amp_scale).to(tl.float64)
        inv = 1.0 / s
        n = raw * inv
    else:
        s = tl.full((), 1.0, tl.float64)
        inv = s
        n = raw
    nonfinite = (n != n) | (tl.abs(n) == inf)

    # -- the skip decision ----------------------------------------------------------------------
    if SKIP_NONFINITE:
        skip = nonfinite
    else:
        skip = false
    if HAS_FOUND:
        skip = skip | (tl.load(amp_found) > 0)
    spike = false
    if HAS_SPIKE:
        w = tl.arange(0, SPIKE_BLOCK)
        buf = tl.load(spike_buf + w, mask=w < spike_window, other=0.0)
        count = tl.load(spike_count)
        pos = tl.load(spike_pos)
        valid = w < count
        cnt = count.to(tl.float64)
        mean = tl.sum(tl.where(valid, buf, 0.0), axis=0) / tl.maximum(cnt, 1.0)
        d = tl.where(valid, buf - mean, 0.0)
        var = tl.sum(d * d, axis=0) / tl.maximum(cnt - 1.0, 1.0)
        half = tl.maximum(spike_window // 2, 2)
        active = (count + 1 >= half) & (count >= 2)
        spike = active & ((n - mean) > spike_sigma * tl.sqrt(var)) & (nonfinite == 0)
        ok = nonfinite == 0  # every finite norm enters the window, skipped or not
        tl.store(spike_buf + w, tl.where((w == pos) & ok, n, buf), mask=w < spike_window)
        tl.store(spike_count, tl.where(ok, tl.minimum(count + 1, spike_window), count))
        tl.store(spike_pos, tl.where(ok, (pos + 1) % spike_window, pos))
        skip = skip | spike
    update = (skip == 0) & (nonfinite == 0)

    # -- the clip coefficient -------------------------------------------------------------------
    coef = tl.full((), 1.0, tl.float64)
    if KIND == 1:  # GlobalNorm
        coef = max_norm / (n + eps)
        coef = tl.where(coef > 1.0, 1.0, coef)
    if KIND == 2:  # AutoClip: append n, clip to the percentile of the history
        h = tl.arange(0, CLIP_BLOCK)
        inside = h < clip_len
        hist = tl.load(clip_buf + h, mask=inside, other=0.0)
        count = tl.load(clip_count)
        pos = tl.load(clip_pos)
        hist = tl.where((h == pos) & update, n, hist)
        tl.store(clip_buf + h, hist, mask=inside)
        count = tl.where(update, tl.minimum(count + 1, clip_len), count)
        tl.store(clip_count, count)
        tl.store(clip_pos, tl.where(update, (pos + 1) % clip_len, pos))
        ordered = tl.sort(tl.where(h < count, hist, inf))
        nn = tl.maximum(count, 1)
        rank = (nn - 1).to(tl.float64) * quantile  # numpy's 'linear' percentile
        lo = tl.floor(rank).to(tl.int64)
        hi = tl.minimum(lo + 1, nn - 1)
        v_lo = tl.sum(tl.where(h == lo, ordered, 0.0), axis=0)  # one non-zero term: exact
        v_hi = tl.sum(tl.where(h == hi, ordered, 0.0), axis=0)
        t = tl.where(v_hi == v_lo, v_lo, v_lo + (v_hi - v_lo) * (rank - lo.to(tl.float64)))
        t = tl.where(count > 0, t, inf)
        coef = t / (n + eps)
        coef = tl.where(coef > 1.0, 1.0, coef)
    if KIND == 3:  # ZClip
        h = tl.arange(0, CLIP_BLOCK)
        inside = h < clip_len
        wbuf = tl.load(clip_buf + h, mask=inside, other=0.0)
        seen = tl.load(clip_count)
        mean = tl.load(clip_mean)
        var = tl.load(clip_var)
        live = seen >= clip_len
        collect = update & (live == 0)
        wbuf = tl.where((h == seen) & collect, n, wbuf)
        tl.store(clip_buf + h, wbuf, mask=inside)
        seen_new = seen + collect.to(tl.int64)
        start = collect & (seen_new == clip_len)
        w_mean = tl.sum(tl.where(inside, wbuf, 0.0), axis=0) / clip_len_f
        dw = tl.where(inside, wbuf - w_mean, 0.0)
        w_var = tl.sum(dw * dw, axis=0) / clip_len_f
        warm = max_norm / (n + eps)
        warm = tl.where(warm > 1.0, 1.0, warm)
        std = tl.sqrt(var)
        z = (n - mean) / (std + z_eps)
        zspike = z > z_thresh
        if Z_ADAPTIVE:
            adaptive = mean + z_thresh * std / (z / z_thresh)
        else:
            adaptive = mean
        x = tl.where(zspike, adaptive, n)  # the EMA is fed the clipped norm
        t = tl.where(x > max_norm, max_norm, x)
        live_coef = tl.where(n > t, t / (n + eps), 1.0)
        new_mean = alpha * mean + (1.0 - alpha) * x
        dx = x - new_mean
        new_var = alpha * var + (1.0 - alpha) * (dx * dx)
        advance = update & live
        tl.store(clip_mean, tl.where(start, w_mean, tl.where(advance, new_mean, mean)))
        tl.store(clip_var, tl.where(start, w_var, tl.where(advance, new_var, var)))
        tl.store(clip_count, seen_new)
        coef = tl.where(live, live_coef, warm)

    # -- counters, the names of a bad step, outputs ---------------------------------------------
    k = tl.arange(0, 4)
    c = tl.load(counters + k)
    inc = tl.where(k == 0, 1, tl.where(k == 1, skip.to(tl.int64),
                                       tl.where(k == 2, nonfinite.to(tl.int64), spike.to(tl.int64))))
    tl.store(counters + k, c + inc)
    if HAS_BAD:
        for start_row in range(0, T, T_BLOCK):
            rows = start_row + tl.arange(0, T_BLOCK)
            m = rows < T
            acc = tl.zeros((T_BLOCK,), tl.int64)
            for col in tl.static_range(NONFINITE_COLS):
                acc += tl.load(tensor_counts + rows * counts_stride + col, mask=m, other=0)
            old = tl.load(bad + rows, mask=m, other=0)
            tl.store(bad + rows, tl.where(nonfinite, acc, old), mask=m)
    if KIND == 0:
        factor = inv
        folded = s
    else:
        factor = coef * inv if HAS_AMP else coef
        folded = s / coef
    tl.store(out_f64 + 0, n)
    tl.store(out_f64 + 1, coef)
    tl.store(out_f64 + 2, tl.where(skip, 1.0, factor))  # a skipped step's scaling pass writes nothing
    tl.store(out_bool + 0, skip)
    tl.store(out_bool + 1, nonfinite)
    tl.store(out_bool + 2, spike)
    tl.store(fold_out + 0, folded.to(tl.float32))
    tl.store(fold_out + 1, skip.to(tl.float32))


def step_epilogue(total_row: torch.Tensor, total_counts: torch.Tensor, tensor_counts: torch.Tensor,
                  bad: torch.Tensor | None, amp_scale: torch.Tensor | None, amp_found: torch.Tensor | None,
                  counters: torch.Tensor, spike: list[torch.Tensor], clip: list[torch.Tensor],
                  out_f64: torch.Tensor, out_bool: torch.Tensor, fold_out: torch.Tensor,
                  ints: tuple[int, ...], reals: torch.Tensor) -> None:
    """Launch the epilogue (one program) on the tensors' device.

    Arguments as :func:`fastgrad.optim.epilogue.fused_epilogue` passes them: ``spike`` =
    ``[buffer, count, pos]`` or empty; ``clip`` = AutoClip's ``[buffer, count, pos]``, ZClip's
    ``[buffer, seen, mean, var]`` or empty; ``ints`` = ``(norm_col, max_col, T, counts_stride,
    nonfinite_cols, skip_nonfinite, spike_window, clip_kind, clip_len, z_adaptive)``; ``reals``
    float64 ``[8]`` on the device = ``[spike_sigma, max_norm, quantile, alpha, z_thresh, z_eps,
    1e-6, clip_len]``.
    """
    norm_col, max_col, T, stride, nf_cols, skip_nf, window, kind, clip_len, z_adaptive = ints
    dummy = counters  # never read or written where its flag is off
    sp_buf, sp_count, sp_pos = spike if spike else (dummy, dummy, dummy)
    cl_buf = cl_count = cl_pos = cl_mean = cl_var = dummy
    if kind == CLIP_AUTO:
        cl_buf, cl_count, cl_pos = clip
    elif kind == CLIP_Z:
        cl_buf, cl_count, cl_mean, cl_var = clip
    _step_epilogue_kernel[(1,)](
        total_row, total_counts, tensor_counts, dummy if bad is None else bad,
        dummy if amp_scale is None else amp_scale, dummy if amp_found is None else amp_found, counters,
        sp_buf, sp_count, sp_pos, cl_buf, cl_count, cl_pos, cl_mean, cl_var,
        out_f64, out_bool, fold_out,
        T, stride, max(window, 2), max(clip_len, 1), reals,
        NORM_COL=norm_col, MAX_COL=max_col, NONFINITE_COLS=nf_cols,
        HAS_AMP=amp_scale is not None, HAS_FOUND=amp_found is not None, SKIP_NONFINITE=bool(skip_nf),
        HAS_SPIKE=bool(spike), SPIKE_BLOCK=triton.next_power_of_2(max(window, 2)), KIND=kind,
        CLIP_BLOCK=triton.next_power_of_2(max(clip_len, 2)), Z_ADAPTIVE=bool(z_adaptive),
        HAS_BAD=bad is not None and T > 0, T_BLOCK=min(triton.next_power_of_2(max(T, 2)), 1024),
        num_warps=1 if max(window, clip_len) <= 256 else 4,
        enable_fp_fusion=False,  # a * b + c rounded twice, as torch and the C++ twin do: bitwise equal
    )


try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted

    INTERPRETED = isinstance(_step_epilogue_kernel, _Interpreted)
except ImportError:  # a Triton without the interpreter
    INTERPRETED = False
"""True when the kernel was built by the interpreter (TRITON_INTERPRET=1 at import): CPU tensors only."""

__all__ = ["INTERPRETED", "step_epilogue"]
