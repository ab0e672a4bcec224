"""CUDA C++ backend (csrc/cuda, module ``fastgrad._cuda``): fused statistics, scale and clamp.

Per call: a pinned host array of the gradients' data pointers is copied to
the device without blocking (the caching host allocator keeps it alive until
the copy has run), and three launches do the rest (memset, stats, combine;
see csrc/cuda/grad_stats_cuda.cu), the total row included. The work-item table — (tensor id, first
element) for every chunk — depends only on the tensors' sizes and dtypes and
is built once and cached on the device. Nothing here reads device memory on
the host: no synchronisation.

Layouts: tensors that are dense in some dimension order are read flat in
memory order; other strided views are copied with ``.contiguous()`` first for
statistics, and scaled/clamped with torch's foreach ops (correct, one more pass).
"""

from __future__ import annotations

import torch

from ..spec import RawStats, StatsSpec
from ._layout import dense_in_some_order

try:
    from .. import _cuda

    LOAD_ERROR: str | None = None
except ImportError as e:
    _cuda = None
    LOAD_ERROR = (
        f"the CUDA extension fastgrad._cuda is not built ({e}); reinstall on a machine with nvcc "
        "(FASTGRAD_FORCE_CUDA=1 to build without a visible GPU)"
    )

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
MAX_NORMS = 8


class _Plan:
    """Device tables for one (device, sizes, dtypes) parameter set."""

    def __init__(self, device: torch.device, numels: tuple[int, ...], codes: tuple[int, ...], chunk: int):
        n = torch.tensor(numels, dtype=torch.int64)
        per = (n + chunk - 1) // chunk  # chunks per tensor (0 for empty tensors)
        first = torch.zeros(len(numels) + 1, dtype=torch.int64)
        first[1:] = per.cumsum(0)
        items = int(first[-1])
        tensor_of_item = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), per)
        begin = (torch.arange(items, dtype=torch.int64) - first[:-1].repeat_interleave(per)) * chunk
        self.num_items = items
        self.num_tensors = len(numels)
        self.numels = n.to(device)
        self.numels_and_total = torch.cat([n, n.sum().reshape(1)]).to(device)  # GradStats.numel, cached
        self.dtypes = torch.tensor(codes, dtype=torch.int32).to(device)
        self.first_item = first.to(device)
        self.item_tensor = tensor_of_item.to(device)
        self.item_begin = begin.to(device)


_plans: dict = {}


def _plan(device: torch.device, tensors) -> _Plan:
    numels = tuple(t.numel() for t in tensors)
    codes = tuple(DTYPE_CODES[t.dtype] for t in tensors)
    key = (device, numels, codes)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 32:  # parameter sets change rarely; keep the cache bounded
            _plans.clear()
        plan = _plans[key] = _Plan(device, numels, codes, _cuda.chunk_size())
    return plan


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

    def stats_full(self, tensors, spec: StatsSpec) -> tuple[RawStats, torch.Tensor, RawStats]:
        """``(raw [T], numel [T + 1], total)``: the rows, element counts with their sum, the total row."""
        device = tensors[0].device
        ps = list(spec.finite_norms)
        if len(ps) > MAX_NORMS:
            raise ValueError(f"the CUDA backend computes at most {MAX_NORMS} finite norm types at once")
        tensors = _readable(tensors)
        plan = _plan(device, tensors)
        T, C = len(tensors), spec.num_count_cols
        floats = torch.empty(T + 1, spec.num_float_cols, dtype=torch.float64, device=device)
        count_buf = torch.empty((T + 1) * C + 1, dtype=torch.int64, device=device)  # + the kernel's ticket
        counts = count_buf[: (T + 1) * C].view(T + 1, C)
        partials = torch.empty(max(plan.num_items, 1), 2 * len(ps) + 1, dtype=torch.float64, device=device)
        ptrs = _pointers(device, tensors)
        h = spec.histogram
        with torch.cuda.device(device):
            _cuda.stats(
                ptrs.data_ptr(), plan.dtypes.data_ptr(), plan.numels.data_ptr(), plan.item_tensor.data_ptr(),
                plan.item_begin.data_ptr(), plan.first_item.data_ptr(), plan.num_items, plan.num_tensors,
                ps, h is not None, h.min_exp if h else 0, h.max_exp if h else 1,
                partials.data_ptr(), floats.data_ptr(), count_buf.data_ptr(), _stream(device),
            )
        return RawStats(floats[:T], counts[:T]), plan.numels_and_total, RawStats(floats[T:], counts[T:])

    def stats(self, tensors, spec: StatsSpec) -> RawStats:
        return self.stats_full(tensors, spec)[0]

    def _split(self, tensors):
        flat = [t for t in tensors if t.is_contiguous() or dense_in_some_order(t)]
        other = [t for t in tensors if not (t.is_contiguous() or dense_in_some_order(t))]
        return flat, other

    def scale_(self, tensors, coef: torch.Tensor) -> None:
        flat, other = self._split(tensors)
        if other:
            torch._foreach_mul_(other, coef)
        if not flat:
            return
        device = flat[0].device
        plan = _plan(device, flat)
        coef = coef.to(device, torch.float64)
        with torch.cuda.device(device):
            _cuda.scale_(_pointers(device, flat).data_ptr(), plan.dtypes.data_ptr(), plan.numels.data_ptr(),
                         plan.item_tensor.data_ptr(), plan.item_begin.data_ptr(), plan.num_items,
                         coef.data_ptr(), _stream(device))

    def clamp_(self, tensors, clip_value: float) -> None:
        flat, other = self._split(tensors)
        for t in other:
            t.clamp_(-clip_value, clip_value)
        if not flat:
            return
        device = flat[0].device
        plan = _plan(device, flat)
        with torch.cuda.device(device):
            _cuda.clamp_(_pointers(device, flat).data_ptr(), plan.dtypes.data_ptr(), plan.numels.data_ptr(),
                         plan.item_tensor.data_ptr(), plan.item_begin.data_ptr(), plan.num_items,
                         -clip_value, clip_value, _stream(device))


BACKEND = CudaBackend()
