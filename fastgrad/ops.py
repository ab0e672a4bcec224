"""The fused passes as torch custom ops, so ``torch.compile`` traces fastgrad without graph breaks.

``fastgrad::grad_stats``  Tensor[] -> (float64 [T, P+1], int64 [T, 4+B])   (spec.py layout)
``fastgrad::scale_``      Tensor(a!)[] grads, Tensor coef -> ()          x *= coef, no write if coef == 1
``fastgrad::clamp_``      Tensor(a!)[] grads, float clip_value -> ()     x = clamp(x, -v, v)

Each op's real implementation is the dispatcher (fastgrad/dispatch.py); the
fake implementations only say what shapes, dtypes and devices come out, which
is all the compiler needs. The backend name travels as a string argument
("" = automatic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch
from .spec import HistogramSpec, RawStats, StatsSpec


@torch.library.custom_op("fastgrad::grad_stats", mutates_args=())
def _grad_stats(
    grads: list[torch.Tensor], norms: list[float], histogram: bool, min_exp: int, max_exp: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = StatsSpec(tuple(norms), HistogramSpec(min_exp, max_exp) if histogram else None)
    raw = dispatch.compute_stats(grads, spec, backend or None)
    return raw.floats, raw.counts


@_grad_stats.register_fake
def _(grads, norms, histogram, min_exp, max_exp, backend):
    device = grads[0].device if grads else torch.device("cpu")
    ncounts = 4 + (max_exp - min_exp + 2 if histogram else 0)
    return (
        torch.empty(len(grads), len(norms) + 1, dtype=torch.float64, device=device),
        torch.empty(len(grads), ncounts, dtype=torch.int64, device=device),
    )


@torch.library.custom_op("fastgrad::scale_", mutates_args=("grads",))
def _scale_(grads: list[torch.Tensor], coef: torch.Tensor, backend: str) -> None:
    dispatch.scale_(grads, coef, backend or None)


@_scale_.register_fake
def _(grads, coef, backend):
    return None


@torch.library.custom_op("fastgrad::clamp_", mutates_args=("grads",))
def _clamp_(grads: list[torch.Tensor], clip_value: float, backend: str) -> None:
    dispatch.clamp_(grads, clip_value, backend or None)


@_clamp_.register_fake
def _(grads, clip_value, backend):
    return None


# In eager mode the dispatcher is called directly: going through the custom op
# costs a few microseconds per call plus ~0.4 us per tensor (list unpacking and
# alias checks), which is a third of the whole call for 10,000 small tensors.
# Under torch.compile (and for opcheck) the ops above are what gets traced.
_compiling = torch.compiler.is_compiling


def grad_stats_op(grads: Sequence[torch.Tensor], spec: StatsSpec, backend: str | None) -> RawStats:
    """Run ``fastgrad::grad_stats`` for ``spec`` (the one entry point of the API layer)."""
    if not _compiling():
        return dispatch.compute_stats(grads, spec, backend or None)
    h = spec.histogram
    floats, counts = torch.ops.fastgrad.grad_stats(
        list(grads), [float(p) for p in spec.finite_norms], h is not None,
        h.min_exp if h else 0, h.max_exp if h else 1, backend or "",
    )
    return RawStats(floats, counts)


def plain_stats_op(grads: Sequence[torch.Tensor], spec: StatsSpec, backend: str | None):
    """Eager fast path for plain contiguous gradients (all on the CPU or on one CUDA device):
    ``(raw, numel, total, dtypes)`` or None (see :func:`fastgrad.dispatch.plain_stats`); always
    None while compiling."""
    if _compiling():
        return None
    return dispatch.plain_stats(grads, spec, backend)


def full_stats_op(grads: Sequence[torch.Tensor], spec: StatsSpec, backend: str | None):
    """Eager: ``(raw, numel, total)``, the last two None unless a backend made the total row
    (see :func:`fastgrad.dispatch.compute_full_stats`); None while compiling (then the custom op
    :func:`grad_stats_op` is what must be traced)."""
    if _compiling():
        return None
    return dispatch.compute_full_stats(grads, spec, backend)


def scale_op_(grads: Sequence[torch.Tensor], coef: torch.Tensor, backend: str | None) -> None:
    if not _compiling():
        return dispatch.scale_(grads, coef, backend or None)
    torch.ops.fastgrad.scale_(list(grads), coef, backend or "")


def clamp_op_(grads: Sequence[torch.Tensor], clip_value: float, backend: str | None) -> None:
    if not _compiling():
        return dispatch.clamp_(grads, clip_value, backend or None)
    torch.ops.fastgrad.clamp_(list(grads), clip_value, backend or "")
