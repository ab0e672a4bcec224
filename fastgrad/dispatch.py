"""The one place a backend is chosen, and the one way every pass reaches a backend.

Choosing (:func:`choose`): per (device, dtype) the backends are tried in
priority order (``cuda``, ``triton``, ``cpu``, ``reference``; Triton's CPU
interpreter only on explicit request); each says why it refuses an input
(:meth:`why_not`). An explicit choice (``backend=`` or ``FASTGRAD_BACKEND``)
that cannot serve an input raises with the reason; an automatic choice falls
back, warning once when a compiled backend the user likely expected is
missing. Kernels never choose backends.

Running (:func:`compute`, :func:`scale_`, :func:`clamp_`): the backend chosen
for the first tensor is offered the whole list in its fast form when it has
one (:mod:`fastgrad.backends.base`: one C++ pass reads every tensor's
metadata and takes the list only if all are plain contiguous tensors it
serves). Anything else — views, subclasses, several devices or backends, bad
input — takes the general form: checked (clear errors, nothing written),
routed per (device, backend), each backend called once with its tensors.
Both forms return the same :class:`~fastgrad.spec.StatsResult` (rows, element
counts, total row), bitwise equal, so every caller builds its result one way.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import torch

from . import aggregate
from .backends import BACKEND_NAMES, get_backend
from .backends.base import empty_result, has_fast_forms
from .collect import check_grads, check_writable, index_names
from .spec import DTYPE_CODES, RawStats, StatsResult, StatsSpec, dtypes_of_mask

ENV_VAR = "FASTGRAD_BACKEND"
PRIORITY = ("cuda", "triton", "cpu", "reference")
# Triton on CPU tensors means its interpreter (TRITON_INTERPRET=1): a testing
# tool, never an automatic choice.
AUTO_SKIP = {("cpu", "triton")}
_CPU = torch.device("cpu")


def requested_backend(backend: str | None) -> str | None:
    """The explicit backend name (argument first, then ``FASTGRAD_BACKEND``), checked; None = auto."""
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if name is None or name == "auto":
        return None
    if name not in BACKEND_NAMES:
        src = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(f"unknown {src}{name!r}; choose one of {', '.join(BACKEND_NAMES)} or 'auto'")
    return name


@functools.lru_cache(maxsize=None)
def choose(device: torch.device, dtype: torch.dtype, requested: str | None):
    """The backend object for tensors of ``dtype`` on ``device`` (the one priority walk)."""
    if requested is not None:
        b = get_backend(requested)
        reason = b.why_not(device, dtype)
        if reason is not None:
            raise RuntimeError(
                f"fastgrad backend {requested!r} cannot handle {dtype} tensors on {device}: "
                f"{reason}. Pick another with backend= or {ENV_VAR}, or leave it unset for auto."
            )
        return b
    refused = []
    for name in PRIORITY:
        if (device.type, name) in AUTO_SKIP:
            continue
        b = get_backend(name)
        reason = b.why_not(device, dtype)
        if reason is None:
            if refused and name == "reference" and device.type in ("cpu", "cuda"):
                warnings.warn(
                    f"fastgrad: using the slow reference backend for {dtype} on {device} "
                    "because " + "; ".join(f"{n}: {r}" for n, r in refused),
                    RuntimeWarning,
                    stacklevel=4,
                )
            return b
        refused.append((name, reason))
    raise RuntimeError(  # unreachable while the reference accepts everything; kept for clarity
        f"no fastgrad backend for {dtype} on {device}: "
        + "; ".join(f"{n}: {r}" for n, r in refused)
    )


def _fast_backend(first: torch.Tensor, requested: str | None):
    """The backend :func:`choose` picks for the first tensor, if it has the fast forms (else None)."""
    dtype = first.dtype
    if dtype not in DTYPE_CODES:
        return None  # the general form says what is wrong
    b = choose(first.device, dtype, requested)
    fast = _HAS_FAST.get(b)
    if fast is None:
        fast = _HAS_FAST[b] = has_fast_forms(b)
    return b if fast else None


_HAS_FAST: dict = {}  # backend object -> offers the fast forms (backends are singletons)


def _route(tensors: Sequence[torch.Tensor], requested: str | None):
    """``{(device, backend): [indices] or None}`` in first-seen order (None = all tensors)."""
    keys = [(t.device, t.dtype) for t in tensors]
    distinct = set(keys)
    if len(distinct) == 1:
        device, dtype = keys[0]
        return {(device, choose(device, dtype, requested)): None}
    chosen = {k: choose(k[0], k[1], requested) for k in distinct}
    routes: dict = {}
    for i, k in enumerate(keys):
        routes.setdefault((k[0], chosen[k]), []).append(i)
    if len(routes) == 1:
        return {next(iter(routes)): None}
    return routes


def _with_values_in_memory(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as kernels can read them: negated views resolved (their memory holds -x) and
    forward-mode AD zero tensors (no memory) materialized; other tensors as they are."""
    out = list(tensors)
    for i, t in enumerate(out):
        if t.is_neg():
            out[i] = t.resolve_neg()
        elif t._is_zerotensor():
            out[i] = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return out


def _writable(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` less the zero tensors of forward-mode AD: immutable, all zeros, and fixed points
    of scaling and clamping. (Negated views need nothing: both ops commute with negation.)"""
    return [t for t in tensors if not t._is_zerotensor()]


def _pick(tensors, idx):
    return list(tensors) if idx is None else [tensors[i] for i in idx]


def compute(
    tensors: Sequence[torch.Tensor], spec: StatsSpec, backend: str | None = None,
    names: Sequence[str] | None = None,
) -> tuple[StatsResult, list[torch.dtype]]:
    """Every statistic of ``tensors`` and the dtypes present (in code order).

    The :class:`StatsResult` lives on the first tensor's device, rows in input
    order. ``names`` (default ``[i]``) only label errors: a gradient no
    backend can read raises ``TypeError`` / ``RuntimeError`` naming it.
    """
    if type(tensors) is not list:
        tensors = list(tensors)
    if not tensors:
        return empty_result(spec, _CPU), []
    req = requested_backend(backend)
    b = _fast_backend(tensors[0], req)
    if b is not None:
        out = b.stats_plain(tensors, spec)
        if out is not None:
            return out[0], dtypes_of_mask(out[1])
    check_grads(names if names is not None else index_names(len(tensors)), tensors)
    if tensors[0].is_meta:
        return _meta_result(tensors, spec), sorted({t.dtype for t in tensors}, key=DTYPE_CODES.get)
    tensors = _with_values_in_memory(tensors)
    routes = _route(tensors, req)
    dtypes = sorted({t.dtype for t in tensors}, key=DTYPE_CODES.get)
    if len(routes) == 1:
        (_, b), _ = next(iter(routes.items()))
        return b.stats(tensors, spec), dtypes
    return _stats_routed(tensors, spec, routes), dtypes


def total_norm(
    tensors: Sequence[torch.Tensor], p: float, backend: str | None = None, names: Sequence[str] | None = None,
) -> tuple[float | torch.Tensor, list[torch.dtype]]:
    """The global ``p``-norm of ``tensors`` (``p > 0`` or inf) and the dtypes present: a float64 0-d
    tensor on the first tensor's device, or a Python float from a backend whose fast form reads host
    memory (the CPU: no synchronisation involved). The clipping path: only the total is kept."""
    if type(tensors) is not list:
        tensors = list(tensors)
    if tensors:
        b = _fast_backend(tensors[0], requested_backend(backend))
        fast = getattr(b, "total_norm_plain", None)
        if fast is not None:
            out = fast(tensors, p)
            if out is not None:
                return out[0], dtypes_of_mask(out[1])
    spec = StatsSpec((p,), None)
    res, dtypes = compute(tensors, spec, backend, names)
    return total_of(res, p), dtypes


def total_of(res: StatsResult, p: float) -> torch.Tensor:
    """float64 0-d ``p``-norm from a total row (inf: max|x|, NaN if any NaN, as torch's inf-norm)."""
    if p == float("inf"):
        return torch.where(res.total.counts[0, 0] > 0, float("nan"), res.total.floats[0, -1])
    return res.total.floats[0, 0]


def _meta_result(tensors: list[torch.Tensor], spec: StatsSpec) -> StatsResult:
    """Meta tensors have no values: results of the right shapes and dtypes on ``meta``, as torch ops
    give (the fake implementation of ``fastgrad::grad_stats``)."""
    if not all(t.is_meta for t in tensors):
        raise RuntimeError("fastgrad: meta tensors cannot be mixed with tensors holding values in one call")
    meta, T = torch.device("meta"), len(tensors)
    floats = torch.empty(T + 1, spec.num_float_cols, dtype=torch.float64, device=meta)
    counts = torch.empty(T + 1, spec.num_count_cols, dtype=torch.int64, device=meta)
    return StatsResult(RawStats(floats[:T], counts[:T]), torch.empty(T + 1, dtype=torch.int64, device=meta),
                       RawStats(floats[T:], counts[T:]))


def _stats_routed(tensors: list[torch.Tensor], spec: StatsSpec, routes) -> StatsResult:
    """Tensors split over several (device, backend) routes: each backend once, rows put back in
    input order on the first tensor's device, the total row combined from them."""
    device = tensors[0].device
    T = len(tensors)
    floats = torch.empty(T, spec.num_float_cols, dtype=torch.float64, device=device)
    counts = torch.empty(T, spec.num_count_cols, dtype=torch.int64, device=device)
    numel = torch.empty(T + 1, dtype=torch.int64, device=device)
    for (_, b), idx in routes.items():
        res = b.stats([tensors[i] for i in idx], spec)
        rows = torch.tensor(idx, device=device)
        floats[rows] = res.raw.floats.to(device)
        counts[rows] = res.raw.counts.to(device)
        numel[rows] = res.numel[:-1].to(device)
    numel[T] = numel[:T].sum()
    raw = RawStats(floats, counts)
    return StatsResult(raw, numel, aggregate.aggregate(raw, spec, aggregate.TOTAL))


def _general_in_place(tensors: Sequence[torch.Tensor], backend: str | None, try_fast):
    """``(tensors, requested)`` for the general form of an in-place op, or None when there is
    nothing to do or the chosen backend's fast form (``try_fast(backend, tensors)``) took the list.
    Checks before anything is written (self-overlapping tensors raise)."""
    if not tensors:
        return None
    if type(tensors) is not list:
        tensors = list(tensors)
    req = requested_backend(backend)
    b = _fast_backend(tensors[0], req)
    if b is not None and try_fast(b, tensors):
        return None
    check_writable(tensors)
    return _writable(tensors), req


def scale_(tensors: Sequence[torch.Tensor], coef: torch.Tensor, backend: str | None = None) -> None:
    """``x *= coef`` in place for every tensor; ``coef`` is a 0-d float tensor (never read on the host)
    or a Python float.

    Raises ``RuntimeError`` before writing anything if a tensor's elements share
    memory (an ``expand``-ed gradient), as torch's in-place ops do.
    """
    todo = _general_in_place(tensors, backend, lambda b, ts: b.scale_plain_(ts, coef))
    if todo is None:
        return
    tensors, req = todo
    if isinstance(coef, float):
        coef = torch.tensor(coef, dtype=torch.float64)
    for (device, b), idx in _route(tensors, req).items():
        b.scale_(_pick(tensors, idx), coef.to(device, torch.float64))


def clamp_(tensors: Sequence[torch.Tensor], clip_value: float, backend: str | None = None) -> None:
    """``x = clamp(x, -clip_value, clip_value)`` in place for every tensor, in one pass (NaN kept).

    Raises like :func:`scale_` for tensors whose elements share memory.
    """
    todo = _general_in_place(tensors, backend, lambda b, ts: b.clamp_plain_(ts, clip_value))
    if todo is None:
        return
    tensors, req = todo
    for (_, b), idx in _route(tensors, req).items():
        b.clamp_(_pick(tensors, idx), clip_value)
