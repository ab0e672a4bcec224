"""The op boundary: the fused passes as torch custom ops, so ``torch.compile`` traces fastgrad
without graph breaks, and eager calls run the same code below it.

``fastgrad::grad_stats``  Tensor[] -> (float64 [T+1, P+1], int64 [T+1, 4+B], int64 [T+1])
                          the per-tensor rows with the total row last, and the element
                          counts with their sum last (:class:`fastgrad.spec.StatsResult`)
``fastgrad::scale_``      Tensor(a!)[] grads, Tensor coef -> ()          x *= coef, no write if coef == 1
``fastgrad::clamp_``      Tensor(a!)[] grads, float clip_value -> ()     x = clamp(x, -v, v)

Each op's implementation is the dispatcher (:mod:`fastgrad.dispatch`); the fake
implementations only say what shapes, dtypes and devices come out. In eager
mode :func:`stats_op` / :func:`scale_op_` / :func:`clamp_op_` call the
dispatcher directly — entering through ``torch.ops`` costs a few microseconds
plus ~0.4 us per tensor (list unpacking, alias checks), a third of a whole
call for 10,000 small tensors — so eager and compiled calls share every line
below this boundary and return bitwise-identical results (tests/test_compile.py).
The backend name travels as a string argument ("" = automatic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch
from .spec import DTYPE_CODES, HistogramSpec, RawStats, StatsResult, StatsSpec


@torch.library.custom_op("fastgrad::grad_stats", mutates_args=())
def _grad_stats(
    grads: list[torch.Tensor], norms: list[float], histogram: bool, min_exp: int, max_exp: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = StatsSpec(tuple(norms), HistogramSpec(min_exp, max_exp) if histogram else None)
    res, _ = dispatch.compute(grads, spec, backend or None)
    # Outputs of a custom op may not alias each other: the rows and the total row are views of
    # one buffer in every backend, so they are joined (copied exactly) here.
    return (torch.cat([res.raw.floats, res.total.floats]), torch.cat([res.raw.counts, res.total.counts]),
            res.numel.clone())


@_grad_stats.register_fake
def _(grads, norms, histogram, min_exp, max_exp, backend):
    device = grads[0].device if grads else torch.device("cpu")
    ncounts = 4 + (max_exp - min_exp + 2 if histogram else 0)
    rows = len(grads) + 1
    return (
        torch.empty(rows, len(norms) + 1, dtype=torch.float64, device=device),
        torch.empty(rows, ncounts, dtype=torch.int64, device=device),
        torch.empty(rows, dtype=torch.int64, device=device),
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


_compiling = torch.compiler.is_compiling


def stats_op(
    grads: Sequence[torch.Tensor], spec: StatsSpec, backend: str | None, names: Sequence[str] | None = None,
) -> tuple[StatsResult, list[torch.dtype]]:
    """The statistics pass of every entry point: ``(StatsResult, dtypes present)``.

    Eager: :func:`fastgrad.dispatch.compute`. Compiling: the ``fastgrad::grad_stats`` op
    (same computation), dtypes read from the traced tensors' metadata.
    """
    if not _compiling():
        return dispatch.compute(grads, spec, backend, names)
    h = spec.histogram
    floats, counts, numel = torch.ops.fastgrad.grad_stats(
        list(grads), [float(p) for p in spec.finite_norms], h is not None,
        h.min_exp if h else 0, h.max_exp if h else 1, backend or "",
    )
    T = len(grads)
    dtypes = sorted({g.dtype for g in grads}, key=lambda d: DTYPE_CODES.get(d, 99))
    return StatsResult(RawStats(floats[:T], counts[:T]), numel, RawStats(floats[T:], counts[T:])), dtypes


def total_norm_op(
    grads: Sequence[torch.Tensor], p: float, backend: str | None, names: Sequence[str] | None = None,
) -> tuple[float | torch.Tensor, list[torch.dtype]]:
    """The global ``p``-norm alone (see :func:`fastgrad.dispatch.total_norm`); compiling: from the
    ``fastgrad::grad_stats`` op's total row."""
    if not _compiling():
        return dispatch.total_norm(grads, p, backend, names)
    res, dtypes = stats_op(grads, StatsSpec((p,), None), backend, names)
    return dispatch.total_of(res, p), dtypes


def scale_op_(grads: Sequence[torch.Tensor], coef: torch.Tensor | float, backend: str | None) -> None:
    """``x *= coef`` in place (``coef`` a float 0-d tensor, never read on the host, or a Python float;
    a float 1.0 writes nothing)."""
    if isinstance(coef, float):
        if coef == 1.0:
            return
        if _compiling():
            coef = torch.tensor(coef, dtype=torch.float64)
    if not _compiling():
        return dispatch.scale_(grads, coef, backend)
    torch.ops.fastgrad.scale_(list(grads), coef, backend or "")


def clamp_op_(grads: Sequence[torch.Tensor], clip_value: float, backend: str | None) -> None:
    """``x = clamp(x, -clip_value, clip_value)`` in place."""
    if not _compiling():
        return dispatch.clamp_(grads, clip_value, backend)
    torch.ops.fastgrad.clamp_(list(grads), clip_value, backend or "")
