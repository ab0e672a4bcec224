"""The one place a backend is chosen.

Per (device, dtype) the backends are tried in priority order (``cuda``,
``triton``, ``cpu``, ``reference``; Triton's CPU interpreter only on explicit
request); each says why it refuses an input. An
explicit choice (``backend=`` or ``FASTGRAD_BACKEND``) that cannot serve an
input raises with the reason; an automatic choice falls back, warning once
when a compiled backend the user likely expected is missing. Kernels never
choose backends.

Tensors that land on the same (device, backend) go to that backend in one
call, whatever their dtypes, so the common case is a single call.

Two shortcuts keep the host's work small (thousands of gradients cost
microseconds each otherwise): ``plain_stats`` / ``scale_`` / ``clamp_`` first
offer the list to the backend of the first tensor's device (C++ on the CPU,
CUDA on a GPU), which reads every tensor's metadata in one C++ pass and takes
it only if all are plain contiguous tensors of that device; and backends that
write the total row themselves (``stats_full``) spare the caller the torch ops
of :mod:`fastgrad.aggregate` for ``total_norm``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import torch

from .backends import get_backend, BACKEND_NAMES
from .backends.cpu import DTYPES_BY_CODE as _DTYPES_BY_CODE
from .spec import RawStats, StatsSpec

ENV_VAR = "FASTGRAD_BACKEND"
PRIORITY = ("cuda", "triton", "cpu", "reference")
# Triton on CPU tensors means its interpreter (TRITON_INTERPRET=1): a testing
# tool, never an automatic choice.
AUTO_SKIP = {("cpu", "triton")}


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
    """The backend object for tensors of ``dtype`` on ``device``."""
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


def _route(tensors: Sequence[torch.Tensor], backend: str | None):
    """``{(device, backend object): [indices] or None}`` in first-seen order (None = all tensors)."""
    req = requested_backend(backend)
    keys = [(t.device, t.dtype) for t in tensors]
    distinct = set(keys)
    if len(distinct) == 1:
        device, dtype = keys[0]
        return {(device, choose(device, dtype, req)): None}
    chosen = {k: choose(k[0], k[1], req) for k in distinct}
    routes: dict = {}
    for i, k in enumerate(keys):
        routes.setdefault((k[0], chosen[k]), []).append(i)
    if len(routes) == 1:
        return {next(iter(routes)): None}
    return routes


_CPU = torch.device("cpu")


def compute_full_stats(tensors: Sequence[torch.Tensor], spec: StatsSpec, backend: str | None = None):
    """``(raw, numel, total)``: :func:`compute_stats`' rows, and, when all tensors go to one backend
    that makes the total row itself (``stats_full``: cpu, cuda, triton), the element counts
    ``[T + 1]`` (last: the sum) and that one-row total — saving the dozen small torch ops
    (launches, on a GPU) of :func:`fastgrad.aggregate.aggregate`; else ``(raw, None, None)``."""
    if not tensors:
        return compute_stats(tensors, spec, backend), None, None
    tensors = _with_values_in_memory(tensors)
    routes = _route(tensors, backend)
    if len(routes) == 1:
        (_, b), _ = next(iter(routes.items()))
        full = getattr(b, "stats_full", None)
        if full is not None:
            return full(tensors, spec)
    return _stats_routed(tensors, spec, routes), None, None


def plain_stats(tensors: Sequence[torch.Tensor], spec: StatsSpec, backend: str | None = None):
    """``(raw, numel, total, dtypes)`` for the common case, in one call that reads each tensor's
    metadata once (in C++): every tensor a plain contiguous tensor, all on the CPU going to the C++
    backend, or all on one CUDA device going to the CUDA backend; else None.

    On None nothing was computed and the caller takes the general path (which
    also reports bad input). ``numel``: int64 ``[T + 1]``, the last entry the
    sum; ``total``: the one-row :class:`RawStats` over all tensors; ``dtypes``:
    the dtypes present, in code order.
    """
    if not tensors:
        return None
    if type(tensors) is not list:
        tensors = list(tensors)
    b = _plain_backend(tensors, backend)
    out = None if b is None else b.stats_plain(tensors, spec)
    if out is None:
        return None
    raw, numel, total, mask = out
    return raw, numel, total, [dt for code, dt in enumerate(_DTYPES_BY_CODE) if mask >> code & 1]


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


def compute_stats(tensors: Sequence[torch.Tensor], spec: StatsSpec, backend: str | None = None) -> RawStats:
    """The :class:`RawStats` of ``tensors``, rows in input order, on the first tensor's device."""
    if not tensors:
        return RawStats(
            torch.zeros(0, spec.num_float_cols, dtype=torch.float64),
            torch.zeros(0, spec.num_count_cols, dtype=torch.int64),
        )
    tensors = _with_values_in_memory(tensors)
    return _stats_routed(tensors, spec, _route(tensors, backend))


def _stats_routed(tensors: list[torch.Tensor], spec: StatsSpec, routes) -> RawStats:
    if len(routes) == 1:
        (_, b), _ = next(iter(routes.items()))
        return b.stats(tensors, spec)
    device = tensors[0].device
    floats = torch.empty(len(tensors), spec.num_float_cols, dtype=torch.float64, device=device)
    counts = torch.empty(len(tensors), spec.num_count_cols, dtype=torch.int64, device=device)
    for (_, b), idx in routes.items():
        raw = b.stats([tensors[i] for i in idx], spec)
        rows = torch.tensor(idx, device=device)
        floats[rows] = raw.floats.to(device)
        counts[rows] = raw.counts.to(device)
    return RawStats(floats, counts)


def _plain_backend(tensors, backend):
    """The backend whose plain fast paths (``stats_plain``, ``scale_plain_``, ``clamp_plain_``) may
    take ``tensors``, judged by the first tensor's device (the fast path checks every tensor): the
    C++ backend for CPU tensors, the CUDA backend for CUDA tensors; None if it is not the one the
    caller asked for or is unavailable."""
    if not tensors:
        return None
    first = tensors[0]
    kind = "cuda" if getattr(first, "is_cuda", False) else "cpu"
    if requested_backend(backend) not in (None, kind):
        return None
    b = get_backend(kind)
    return b if b.why_not(first.device if kind == "cuda" else _CPU, torch.float32) is None else None


def scale_(tensors: Sequence[torch.Tensor], coef: torch.Tensor, backend: str | None = None) -> None:
    """``x *= coef`` in place for every tensor; ``coef`` is a 0-d float tensor (never read on the host)."""
    b = _plain_backend(tensors, backend)
    if b is not None and b.scale_plain_(list(tensors), coef):
        return
    tensors = _writable(tensors)
    for (device, b), idx in _route(tensors, backend).items():
        b.scale_(_pick(tensors, idx), coef.to(device, torch.float64))


def clamp_(tensors: Sequence[torch.Tensor], clip_value: float, backend: str | None = None) -> None:
    """``x = clamp(x, -clip_value, clip_value)`` in place for every tensor, in one pass."""
    b = _plain_backend(tensors, backend)
    if b is not None and b.clamp_plain_(list(tensors), clip_value):
        return
    tensors = _writable(tensors)
    for (_, b), idx in _route(tensors, backend).items():
        b.clamp_(_pick(tensors, idx), clip_value)
