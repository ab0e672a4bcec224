"""The backend protocol: what every backend (reference, cpu, triton, cuda) implements.

The dispatcher (:mod:`fastgrad.dispatch`) is the only caller. It hands a
backend tensors that all live on one device, have supported dtypes
(:data:`fastgrad.spec.DTYPE_CODES`) and a strided layout, with values in
memory (negated views resolved, forward-mode AD zero tensors materialised);
the list may mix dtypes and layouts and may be empty.

Required:

``name: str``
    one of :data:`fastgrad.backends.BACKEND_NAMES`.
``why_not(device, dtype) -> str | None``
    None if the backend can serve tensors of ``dtype`` on ``device``, else the
    reason, in words a user can act on (it ends up in error messages).
``stats(tensors, spec) -> StatsResult``
    the per-tensor rows, the element counts and the total row
    (:class:`fastgrad.spec.StatsResult`; layout in :mod:`fastgrad.spec`).
    Never synchronises with the host.
``scale_(tensors, coef)``
    ``x *= coef`` in place; ``coef`` a float64 0-d tensor on any device, never
    read on the host. Writes nothing when ``coef == 1`` where that can be
    decided without a sync.
``clamp_(tensors, clip_value)``
    ``x = clamp(x, -clip_value, clip_value)`` in place, one pass, NaN kept.

Optional fast forms, for the common case of plain contiguous tensors all on
one device of the backend's kind, read in one C++ pass over the Python list
(no per-tensor Python work); each returns None / False having done nothing
when any tensor is anything else, and the dispatcher then takes the general
form:

``stats_plain(tensors, spec) -> (StatsResult, dtype_mask) | None``
    ``dtype_mask``: bit ``DTYPE_CODES[dt]`` set for each dtype present.
``scale_plain_(tensors, coef) -> bool`` and ``clamp_plain_(tensors, clip_value) -> bool``
    (``coef`` may also be a Python float where the backend reads host memory).
``total_norm_plain(tensors, p) -> (total, dtype_mask) | None``  (optional on its own)
    the global ``p``-norm alone, for the clipping path: a float64 0-d tensor, or a
    Python float for a backend whose memory is the host's (no sync involved).

tests/test_backends.py checks every available backend against this protocol
and against the float64 reference.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..spec import RawStats, StatsResult, StatsSpec

REQUIRED = ("name", "why_not", "stats", "scale_", "clamp_")
FAST_FORMS = ("stats_plain", "scale_plain_", "clamp_plain_")


@runtime_checkable
class Backend(Protocol):
    name: str

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str | None: ...

    def stats(self, tensors: list[torch.Tensor], spec: StatsSpec) -> StatsResult: ...

    def scale_(self, tensors: list[torch.Tensor], coef: torch.Tensor) -> None: ...

    def clamp_(self, tensors: list[torch.Tensor], clip_value: float) -> None: ...


def has_fast_forms(backend) -> bool:
    """True if ``backend`` offers all three plain-tensor fast forms."""
    return all(callable(getattr(backend, m, None)) for m in FAST_FORMS)


def empty_result(spec: StatsSpec, device: torch.device) -> StatsResult:
    """The :class:`StatsResult` of no tensors: zero rows, ``numel == [0]``, an all-zero total row."""
    return StatsResult(
        RawStats(torch.zeros(0, spec.num_float_cols, dtype=torch.float64, device=device),
                 torch.zeros(0, spec.num_count_cols, dtype=torch.int64, device=device)),
        torch.zeros(1, dtype=torch.int64, device=device),
        RawStats(torch.zeros(1, spec.num_float_cols, dtype=torch.float64, device=device),
                 torch.zeros(1, spec.num_count_cols, dtype=torch.int64, device=device)),
    )
