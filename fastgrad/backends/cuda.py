"""CUDA C++ backend (csrc/cuda, module ``fastgrad._cuda``): fused statistics, scale and clamp.

Per call: a pinned host array of the gradients' data pointers is copied to
the device without blocking (the caching host allocator keeps it alive until
the copy has run), and three launches do the rest (memset, stats, combine;
see csrc/cuda/grad_stats_cuda.cu), the total row included. The work-item
table — (tensor id, first element) for every chunk — depends only on the
tensors' sizes and dtypes and is built once and cached on the device
(:mod:`fastgrad.backends.chunk_plan`, shared with the Triton backend). Nothing
here reads device memory on the host: no synchronisation. This module needs
nothing from the CPU extension: ``fastgrad._cuda`` carries its own copy of
the plain-tensor reader.

In-place ops over tensors that share memory (``[x, x]``, overlapping views of
one buffer) run in list order, one launch per layer of disjoint tensors
(:func:`fastgrad.backends._layout.overlap_layers`): one launch over all of
them would race.

Layouts: tensors that are dense in some dimension order are read flat in
memory order; other strided views are copied with ``.contiguous()`` first for
statistics, and scaled/clamped with torch's foreach ops (correct, one more pass).
"""

from __future__ import annotations

import torch

from ..spec import DTYPE_CODES, DTYPES_BY_CODE, READ_TYPES, RawStats, StatsResult, StatsSpec
from ._layout import dense_in_some_order, overlap_layers
from .base import empty_result
from .chunk_plan import ChunkPlan, PlanCache

try:
    from .. import _cuda  # also holds the plain-tensor reader (csrc/common/plain_reader.h)

    LOAD_ERROR: str | None = None
except ImportError as e:
    _cuda = None
    LOAD_ERROR = (
        f"the CUDA extension fastgrad._cuda is not built ({e}); reinstall on a machine with nvcc "
        "(FASTGRAD_FORCE_CUDA=1 to build without a visible GPU)"
    )

MAX_NORMS = 8

# Chunk plans (fastgrad/backends/chunk_plan.py), one group in call order, per (device, stream):
# the caching allocator only keeps a freed block away from other work queued on the stream
# that allocated it, so a plan evicted while a kernel on another stream still reads it would
# be unsafe.
PLANS = PlanCache(max_plans=32)


def _plan(device: torch.device, tensors) -> ChunkPlan:
    _check_not_capturing(device)
    return PLANS.get(device, _stream(device), _cuda.chunk_size(), [t.numel() for t in tensors],
                     [DTYPE_CODES[t.dtype] for t in tensors])


def _plan_from_meta(device: torch.device, meta: torch.Tensor, T: int, key_hash: int) -> ChunkPlan:
    """The plan of a parameter set read by ``_cuda.describe_plain`` (``meta``: pointers, counts, codes)."""
    return PLANS.get_by_hash(device, _stream(device), _cuda.chunk_size(), meta, T, key_hash)


def _read_plain(tensors: list, disjoint: bool = False, signed: bool = True, types=torch.Tensor):
    """``(device, plan, device pointer table, dtype mask)`` for plain contiguous tensors on one
    CUDA device, read by one C++ pass (``_cuda.describe_plain``, csrc/common/plain_reader.h) into a
    pinned buffer, the plan found by a hash of sizes and dtypes (checked against the cached copy):
    O(1) Python work per call whatever the tensor count. None for anything else, and with
    ``disjoint`` (in-place ops) also when two tensors share memory. ``signed=False`` (scale, and clamp
    to ``[-v, v]``: both commute with negation) also takes negated views as their memory holds them
    (csrc/common/plain_reader.h); the statistics pass keeps True (its +Inf / -Inf counts see signs).
    ``types``: the exact types taken (:data:`fastgrad.spec.READ_TYPES` where the call only reads)."""
    T = len(tensors)
    _check_not_capturing(tensors[0].device)
    meta = torch.empty(3 * T, dtype=torch.int64, pin_memory=True)  # pointers, numels, dtype codes
    mask, dev, key_hash = _cuda.describe_plain(tensors, types, DTYPES_BY_CODE, torch.strided, True,
                                               meta.data_ptr(), disjoint, signed)
    if not mask:
        return None
    device = torch.device("cuda", dev)
    plan = _plan_from_meta(device, meta, T, key_hash)
    ptrs = meta[:T].to(device, non_blocking=True)  # the caching host allocator keeps meta until copied
    return device, plan, ptrs, mask


def _check_not_capturing(device: torch.device) -> None:
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fastgrad's CUDA backend cannot be captured in a CUDA graph: it uploads a pointer table "
            "from a pooled host buffer on every call. Call it outside the captured region, or use "
            "backend='triton'."
        )


def _readable(tensors):
    """Tensors that can be read flat (dense in some order); others as contiguous copies."""
    return [t if t.is_contiguous() or dense_in_some_order(t) else t.contiguous() for t in tensors]


def _pointers(device: torch.device, tensors) -> torch.Tensor:
    host = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).pin_memory()
    return host.to(device, non_blocking=True)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class CudaBackend:
    name = "cuda"

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return "it runs on CUDA tensors only"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        if _cuda is None:
            return LOAD_ERROR
        if dtype not in DTYPE_CODES:
            return f"dtype {dtype} is not supported"
        return None

    def stats(self, tensors, spec: StatsSpec) -> StatsResult:
        """Rows, element counts with their sum, and the total row (written by the combine kernel)."""
        if not tensors:
            return empty_result(spec, torch.device("cpu"))
        device = tensors[0].device
        tensors = _readable(tensors)
        return self._launch_stats(device, _plan(device, tensors), _pointers(device, tensors), spec)

    def stats_plain(self, tensors: list, spec: StatsSpec):
        """``(StatsResult, dtype_mask)`` as :meth:`stats` for plain contiguous tensors on one CUDA device, or None.

        One C++ pass (``fastgrad._cuda.describe_plain``) reads every tensor's
        pointer, size and dtype into a pinned buffer; the plan is found by a
        hash of the sizes and dtypes (checked against the cached copy), so
        the host does O(1) Python work per call whatever the tensor count.
        """
        read = _read_plain(tensors, types=READ_TYPES)
        if read is None:
            return None
        device, plan, ptrs, mask = read
        return self._launch_stats(device, plan, ptrs, spec), mask

    def scale_plain_(self, tensors: list, coef: torch.Tensor) -> bool:
        """:meth:`scale_` for plain contiguous tensors on one CUDA device; False (nothing written) otherwise."""
        read = _read_plain(tensors, disjoint=True, signed=False)
        if read is None:
            return False
        device, plan, ptrs, _ = read
        coef = coef.to(device, torch.float64)
        with torch.cuda.device(device):
            _cuda.scale_(ptrs.data_ptr(), plan.codes.data_ptr(), plan.numels.data_ptr(),
                         plan.item_row.data_ptr(), plan.item_start.data_ptr(), plan.num_items,
                         coef.data_ptr(), _stream(device))
        return True

    def clamp_plain_(self, tensors: list, clip_value: float) -> bool:
        """:meth:`clamp_` for plain contiguous tensors on one CUDA device; False (nothing written) otherwise."""
        read = _read_plain(tensors, disjoint=True, signed=False)
        if read is None:
            return False
        device, plan, ptrs, _ = read
        with torch.cuda.device(device):
            _cuda.clamp_(ptrs.data_ptr(), plan.codes.data_ptr(), plan.numels.data_ptr(),
                         plan.item_row.data_ptr(), plan.item_start.data_ptr(), plan.num_items,
                         -clip_value, clip_value, _stream(device))
        return True

    def _launch_stats(self, device, plan: ChunkPlan, ptrs: torch.Tensor, spec: StatsSpec):
        ps = list(spec.finite_norms)
        if len(ps) > MAX_NORMS:
            raise ValueError(f"the CUDA backend computes at most {MAX_NORMS} finite norm types at once")
        T, C = plan.num_tensors, spec.num_count_cols
        floats = torch.empty(T + 1, spec.num_float_cols, dtype=torch.float64, device=device)
        count_buf = torch.empty((T + 1) * C + 1, dtype=torch.int64, device=device)  # + the kernel's ticket
        counts = count_buf[: (T + 1) * C].view(T + 1, C)
        partials = torch.empty(max(plan.num_items, 1), 2 * len(ps) + 1, dtype=torch.float64, device=device)
        h = spec.histogram
        with torch.cuda.device(device):
            _cuda.stats(
                ptrs.data_ptr(), plan.codes.data_ptr(), plan.numels.data_ptr(), plan.item_row.data_ptr(),
                plan.item_start.data_ptr(), plan.item_range.data_ptr(), plan.num_items, plan.num_tensors,
                ps, h is not None, h.min_exp if h else 0, h.max_exp if h else 1,
                partials.data_ptr(), floats.data_ptr(), count_buf.data_ptr(), _stream(device),
            )
        return StatsResult(RawStats(floats[:T], counts[:T]), plan.numels_and_total, RawStats(floats[T:], counts[T:]))

    def _split(self, tensors):
        flat = [t for t in tensors if t.is_contiguous() or dense_in_some_order(t)]
        other = [t for t in tensors if not (t.is_contiguous() or dense_in_some_order(t))]
        return flat, other

    def scale_(self, tensors, coef: torch.Tensor) -> None:
        """``x *= coef``; tensors sharing memory in list order (``_layout.overlap_layers``)."""
        layers = overlap_layers(tensors)
        if layers is not None:
            for idx in layers:
                self.scale_([tensors[i] for i in idx], coef)
            return
        flat, other = self._split(tensors)
        if other:
            torch._foreach_mul_(other, coef)
        if not flat:
            return
        device = flat[0].device
        plan = _plan(device, flat)
        coef = coef.to(device, torch.float64)
        with torch.cuda.device(device):
            _cuda.scale_(_pointers(device, flat).data_ptr(), plan.codes.data_ptr(), plan.numels.data_ptr(),
                         plan.item_row.data_ptr(), plan.item_start.data_ptr(), plan.num_items,
                         coef.data_ptr(), _stream(device))

    def clamp_(self, tensors, clip_value: float) -> None:
        """``x = clamp(x, -clip_value, clip_value)``; tensors sharing memory in list order."""
        layers = overlap_layers(tensors)
        if layers is not None:
            for idx in layers:
                self.clamp_([tensors[i] for i in idx], clip_value)
            return
        flat, other = self._split(tensors)
        for t in other:
            t.clamp_(-clip_value, clip_value)
        if not flat:
            return
        device = flat[0].device
        plan = _plan(device, flat)
        with torch.cuda.device(device):
            _cuda.clamp_(_pointers(device, flat).data_ptr(), plan.codes.data_ptr(), plan.numels.data_ptr(),
                         plan.item_row.data_ptr(), plan.item_start.data_ptr(), plan.num_items,
                         -clip_value, clip_value, _stream(device))


BACKEND = CudaBackend()
