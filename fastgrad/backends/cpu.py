"""C++ CPU backend (csrc/cpu, module ``fastgrad._C``): fused statistics, scale and clamp.

Tensors are described to C++ by raw pointer, dtype code, element count and,
for views that do not fill a dense block of memory, their coalesced sizes
and strides. A tensor that is dense in some dimension order (contiguous,
channels-last, transposed) is read flat in memory order: the statistics do
not depend on element order, so no copy is ever made.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from ..spec import DTYPE_CODES, DTYPES_BY_CODE, READ_TYPES, RawStats, StatsResult, StatsSpec
from ._layout import coalesced, dense_in_some_order
from .base import empty_result

try:
    from .. import _C

    LOAD_ERROR: str | None = None
except ImportError as e:  # compiler missing at install time, or a broken build
    _C = None
    LOAD_ERROR = f"the C++ extension fastgrad._C is not available ({e}); reinstall with a C++ compiler"


def describe(tensors) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """The parallel arrays ``_C`` takes: pointers, dtype codes, numels, layout offsets, dims."""
    ptrs = [t.data_ptr() for t in tensors]
    codes = [DTYPE_CODES[t.dtype] for t in tensors]
    numels = [t.numel() for t in tensors]
    layout = [-1 if t.is_contiguous() else -2 for t in tensors]
    dims: list[int] = []
    if -2 in layout:  # the rare views that need more than a pointer
        for i, t in enumerate(tensors):
            if layout[i] == -1 or t.numel() <= 1 or dense_in_some_order(t):
                layout[i] = -1
                continue
            sizes, strides = coalesced(t)
            if len(sizes) > 12:
                raise RuntimeError(f"fastgrad cpu backend: a view with {len(sizes)} non-mergeable dims")
            layout[i] = len(dims)
            dims += [len(sizes), *sizes, *strides]
    return ptrs, codes, numels, layout, dims


class CpuBackend:
    name = "cpu"

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "it runs on CPU tensors only"
        if _C is None:
            return LOAD_ERROR
        from .. import cpu_isa

        if cpu_isa.current() is None:  # a refused FASTGRAD_CPU_ISA: every kernel call would raise
            return f"no CPU code path runs: {cpu_isa.error() or 'unknown reason'}"
        if dtype not in DTYPE_CODES:
            return f"dtype {dtype} is not supported"
        return None

    def stats(self, tensors, spec: StatsSpec) -> StatsResult:
        """Rows, element counts and the total row (combined in C++ in chunk order)."""
        T = len(tensors)
        if T == 0:
            return empty_result(spec, torch.device("cpu"))
        floats = torch.empty(T + 1, spec.num_float_cols, dtype=torch.float64)
        counts = torch.empty(T + 1, spec.num_count_cols, dtype=torch.int64)
        desc = describe(tensors)
        h = spec.histogram
        _C.grad_stats(
            *desc, list(spec.finite_norms), h is not None, h.min_exp if h else 0, h.max_exp if h else 1,
            floats.data_ptr(), counts.data_ptr(), torch.get_num_threads(), True,
        )
        numels = desc[2]
        numel = torch.tensor([*numels, sum(numels)], dtype=torch.int64)
        return StatsResult(RawStats(floats[:T], counts[:T]), numel, RawStats(floats[T:], counts[T:]))

    def stats_plain(self, tensors: list, spec: StatsSpec) -> tuple[StatsResult, int] | None:
        """:meth:`stats` for plain contiguous CPU tensors, with the dtype mask; or None.

        The C++ side reads each tensor's metadata once, straight from its
        Python object (csrc/common/plain_reader.h: about 0.3 us a tensor, most
        of it torch's own attribute functions), and combines the total row itself (as
        :func:`fastgrad.aggregate.aggregate`; a dozen small torch ops less).
        Returns ``(StatsResult, dtype_mask)`` (bit ``DTYPE_CODES[dtype]`` of the
        mask set for each dtype present) or None, having computed nothing, when
        some tensor is anything else. Exact ``torch.nn.Parameter`` objects are read like tensors
        (:data:`fastgrad.spec.READ_TYPES`: the weights of ``grad_stats(params=True)`` need no ``detach()``).
        """
        T = len(tensors)
        floats = torch.empty(T + 1, spec.num_float_cols, dtype=torch.float64)
        counts = torch.empty(T + 1, spec.num_count_cols, dtype=torch.int64)
        numel = torch.empty(T + 1, dtype=torch.int64)
        h = spec.histogram
        mask = _C.grad_stats_list(
            tensors, READ_TYPES, DTYPES_BY_CODE, torch.strided,
            list(spec.finite_norms), h is not None, h.min_exp if h else 0, h.max_exp if h else 1,
            floats.data_ptr(), counts.data_ptr(), numel.data_ptr(), torch.get_num_threads(),
        )
        if not mask:
            return None
        return StatsResult(RawStats(floats[:T], counts[:T]), numel, RawStats(floats[T:], counts[T:])), mask

    def total_norm_plain(self, tensors: list, p: float) -> tuple[float, int] | None:
        """The global ``p``-norm (``p > 0`` or inf) of plain contiguous CPU tensors as a Python float
        (host memory: reading it is no synchronisation), with the dtype mask; or None.

        The per-tensor rows go to a per-thread scratch buffer: the clipping path
        needs only the total, and three fresh tables would cost more host time than
        torch's whole ``clip_grad_norm_`` at one small tensor. Negated views are read as
        their memory holds them (a norm, and the NaN count, do not see signs).
        Inside :func:`keep_reads` the tensors' metadata is kept for :meth:`scale_plain_`.
        """
        T = len(tensors)
        finite = not math.isinf(p)
        floats, counts, numel = _scratch(T + 1, 2 if finite else 1, 4)
        keep = getattr(_local, "keeping", False)
        if keep:
            kept = tuple(tensors)  # what the C++ call reads (its own snapshot is taken just after)
            meta = _meta_scratch(T)
        mask = _C.grad_stats_list(
            tensors, torch.Tensor if keep else READ_TYPES, DTYPES_BY_CODE, torch.strided, [p] if finite else [],
            False, 0, 1,
            floats.ctypes.data, counts.ctypes.data, numel.ctypes.data, torch.get_num_threads(), False,
            meta.ctypes.data if keep else 0,
        )
        if not mask:
            return None
        if keep:
            _local.kept = (kept, meta)
        ncols = 2 if finite else 1
        if not finite and counts[T * 4]:  # the inf-norm of anything holding a NaN is NaN, as torch's
            return math.nan, mask
        return float(floats[T * ncols]), mask

    def scale_plain_(self, tensors: list, coef: torch.Tensor | float) -> bool:
        """:meth:`scale_` for a list of plain contiguous CPU tensors; False (nothing written) otherwise.
        ``coef`` may also be a Python float (the CPU clipping path computes it on the host).

        Inside :func:`keep_reads`, tensors that :meth:`total_norm_plain` has just read (the same
        objects, in the same order) are scaled from the metadata it kept: the list is read once
        per clipping call."""
        if isinstance(coef, float):
            box = _coef_box()
            box[0] = coef
            ptr = box.ctypes.data
        else:
            if coef.device.type != "cpu":
                return False
            if coef.dtype != torch.float64:
                coef = coef.to(torch.float64)
            ptr = coef.data_ptr()  # 0-d: always contiguous
        kept = getattr(_local, "kept", None)
        if kept is not None:
            _local.kept = None
            if _C.scale_meta(tensors, kept[0], kept[1].ctypes.data, ptr, torch.get_num_threads()):
                return True
        return _C.scale_list(tensors, torch.Tensor, DTYPES_BY_CODE, torch.strided, ptr, torch.get_num_threads())

    def clamp_plain_(self, tensors: list, clip_value: float) -> bool:
        """:meth:`clamp_` for a list of plain contiguous CPU tensors; False (nothing written) otherwise."""
        return _C.clamp_list(tensors, torch.Tensor, DTYPES_BY_CODE, torch.strided, -clip_value, clip_value,
                             torch.get_num_threads())

    def scale_(self, tensors, coef: torch.Tensor) -> None:
        coef = coef.to(torch.float64).contiguous()  # 0-d CPU float64: C++ reads it, no .item()
        _C.scale_(*describe(tensors), coef.data_ptr(), torch.get_num_threads())

    def clamp_(self, tensors, clip_value: float) -> None:
        _C.clamp_(*describe(tensors), -clip_value, clip_value, torch.get_num_threads())


_local = threading.local()  # per-thread scratch: concurrent calls from threads never share it


def _scratch(rows: int, fcols: int, ccols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-thread float64 / int64 / int64 buffers of at least ``rows * fcols``, ``rows * ccols``
    and ``rows`` elements (grown, never shrunk): rows nobody returns to the caller."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf[2].shape[0] < rows:
        n = max(rows, 64)
        buf = _local.scratch = (np.empty(n * 2, np.float64), np.empty(n * 4, np.int64), np.empty(n, np.int64))
    return buf


def _meta_scratch(T: int) -> np.ndarray:
    """A fresh-enough per-thread int64 [3 T] buffer for the kept metadata (pointers, element counts,
    dtype codes): its own, so that no other call's scratch overwrites it before the scale."""
    buf = getattr(_local, "meta", None)
    if buf is None or buf.shape[0] < 3 * T:
        buf = _local.meta = np.empty(max(3 * T, 192), np.int64)
    return buf


class keep_reads:
    """Within this block, on this thread, :meth:`CpuBackend.total_norm_plain` keeps the metadata it
    reads and the next :meth:`CpuBackend.scale_plain_` of the same tensors scales from it (the
    clipping path: norm, coefficient, scale; one read of the list). On exit the kept references
    are dropped, so no gradient is held past the call. Cheap: two attribute writes each way."""

    __slots__ = ()

    def __enter__(self):
        _local.keeping = True
        _local.kept = None

    def __exit__(self, *exc):
        _local.keeping = False
        _local.kept = None


def _coef_box() -> np.ndarray:
    box = getattr(_local, "coef", None)
    if box is None:
        box = _local.coef = np.empty(1, np.float64)
    return box


BACKEND = CpuBackend()
