"""Drop-in replacements for ``torch.nn.utils``' gradient clipping (torch >= 2.6 semantics).

``torch.nn.utils.clip_grad_norm_ = fastgrad.clip_grad_norm_`` changes nothing
but speed and accuracy: same signatures, same return values and dtypes, the
same coefficient ``min(max_norm / (total_norm + 1e-6), 1)``. Differences, all
on purpose:

* norms are accumulated in float64 (or scaled float64), then rounded once to
  the gradients' dtype: torch rounds per-tensor norms of bf16 gradients to
  bf16, and overflows float32 at ``|x| ~ 1e19``;
* one fused read per gradient for the norm, one read+write for the scaling,
  and no write at all when the coefficient is 1 (torch multiplies anyway);
* invalid ``max_norm`` / ``clip_value`` (negative, NaN) and ``norm_type <= 0``
  raise ``ValueError`` before anything is touched (torch silently flips signs);
* ``error_if_nonfinite=True`` names the offending gradients;
* ``foreach`` is accepted and ignored: every path is multi-tensor already;
* sharded gradients (DTensor, FSDP2) and ``process_group=`` give the global
  norm from one small all-reduce (:mod:`fastgrad.distributed`); the norm is
  returned as a plain tensor, identical on every rank.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Iterable, Sequence

import torch

from . import aggregate, distributed
from .collect import check_grads, promoted_dtype
from .ops import clamp_op_, full_stats_op, grad_stats_op, plain_stats_op, scale_op_
from .spec import StatsSpec, parse_norm_type
from .stats import build_stats, row_norms

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]
EPS = 1e-6  # torch's: coef = max_norm / (total_norm + 1e-6)


def _check_threshold(value, what: str) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return  # checking would synchronise; the caller's device tensor is trusted
        value = value.item()
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number or a tensor, got {type(value).__name__}") from None
    if math.isnan(v) or v < 0:
        raise ValueError(f"{what} must be a non-negative number, got {value!r}")


class _PositionNames(Sequence):
    """``[i]`` names of the kept positions, made only when asked for (error messages): formatting
    10,000 names per call would cost more than the statistics of small gradients."""

    def __init__(self, positions: Sequence[int]):
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [f"[{i}]" for i in self.positions[k]]
        return f"[{self.positions[k]}]"


def _grads_of_params(parameters) -> tuple[Sequence[str], list[torch.Tensor]]:
    """``([i] names, .grad tensors)`` of the parameters whose grad is not None, as torch's clip."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters]  # one read of each .grad (a property that costs ~0.3 us)
    if any(g is None for g in grads):
        keep = [i for i, g in enumerate(grads) if g is not None]
        return _PositionNames(keep), [grads[i] for i in keep]
    return _PositionNames(range(len(grads))), grads


def _nonfinite_error(names, grads, raw, p: float) -> RuntimeError:
    stats = build_stats(names, grads, StatsSpec((p,), None), raw, None)
    bad = stats.to_dict()
    worst = [
        f"{n} ({r['nan']} NaN, {r['posinf']} +Inf, {r['neginf']} -Inf)"
        for n, r in bad.items()
        if r["nan"] or r["posinf"] or r["neginf"]
    ]
    return RuntimeError(
        f"The total norm of order {p} for gradients from `parameters` is non-finite, so it "
        "cannot be clipped. To disable this error and scale the gradients by the non-finite "
        "norm anyway, set `error_if_nonfinite=False`. Non-finite gradients: "
        + (", ".join(worst[:20]) + (f" and {len(worst) - 20} more" if len(worst) > 20 else ""))
    )


def _total_norm(
    names, grads, p: float, error_if_nonfinite: bool, backend, process_group=None, placements=None
) -> tuple[torch.Tensor, torch.dtype]:
    """float64 0-d global p-norm on the first gradient's device (one fused pass; all-reduce if
    sharded) and the gradients' promoted dtype. Checks the gradients (raising for bad ones)."""
    spec = StatsSpec((p,), None)
    fast = plain_stats_op(grads, spec, backend) if process_group is None and placements is None else None
    if fast is not None:  # plain CPU gradients: metadata read once, in C++
        raw, numel, total_raw, dtypes = fast
        total = row_norms(spec, total_raw, p)[0]
        dtype = functools.reduce(torch.promote_types, dtypes)
    else:
        check_grads(names, grads)
        dtype = promoted_dtype(grads)
        plan = distributed.plan(names, grads, process_group, placements)
        full = full_stats_op(grads, spec, backend) if plan is None else None
        if full is not None:
            raw, _, total_raw = full
        else:
            if plan is not None:
                grads = plan.local
            raw, total_raw = grad_stats_op(grads, spec, backend), None
        if plan is not None and plan.communicate:
            total = distributed.reduce_total_norm(raw, p, plan, [g.dtype for g in grads])
        else:  # the backend's total row, else the rows aggregated
            total = row_norms(spec, total_raw or aggregate.aggregate(raw, spec, aggregate.TOTAL), p)[0]
    if error_if_nonfinite and not bool(total.isfinite()):  # the one sync torch also makes
        raise _nonfinite_error(names, grads, raw, p)
    return total, dtype


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    process_group=None,
    placements: distributed.PlacementsArg = None,
) -> torch.Tensor:
    """The p-norm of all ``tensors`` as if concatenated into one vector.

    ``(sum_t sum_i |x_ti|^p)^(1/p)``, accumulated in float64 and returned in the
    promoted dtype of the tensors on the first tensor's device (as torch);
    ``torch.tensor(0.)`` for no tensors. Does not synchronise unless
    ``error_if_nonfinite`` (then raises ``RuntimeError`` naming the culprits).
    ``process_group`` / ``placements``: the norm over all ranks' pieces, as in
    :func:`fastgrad.grad_stats` (one all-reduce of 2 numbers when sharded).
    """
    p = parse_norm_type(norm_type)
    with torch.no_grad():
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        if not tensors:
            return torch.tensor(0.0)
        names = _PositionNames(range(len(tensors)))
        total, dtype = _total_norm(names, tensors, p, error_if_nonfinite, backend, process_group, placements)
        return total.to(dtype)


def _coef(max_norm, total_norm: torch.Tensor) -> torch.Tensor:
    """float64 0-d ``min(max_norm / (total_norm + 1e-6), 1)`` on ``total_norm``'s device."""
    total = total_norm.detach().to(torch.float64)
    if isinstance(max_norm, torch.Tensor):
        max_norm = max_norm.detach().to(total.device, torch.float64)
    return torch.clamp(max_norm / (total + EPS), max=1.0)


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float | torch.Tensor,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Scale gradients in place by ``min(max_norm / (total_norm + 1e-6), 1)``.

    One read+write pass per gradient, none when the coefficient is 1 (decided
    on the device: no host sync).
    """
    _check_threshold(max_norm, "max_norm")
    with torch.no_grad():
        names, grads = _grads_of_params(parameters)
        if not grads:
            return
        check_grads(names, grads)
        scale_op_(distributed.local_tensors(grads), _coef(max_norm, total_norm), backend)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float | torch.Tensor,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    process_group=None,
    placements: distributed.PlacementsArg = None,
) -> torch.Tensor:
    """Clip the global gradient norm in place; return the norm before clipping.

    ``g *= min(max_norm / (||g||_p + 1e-6), 1)`` for every gradient, where
    ``||g||_p`` is the p-norm of all gradients as one vector (float64
    accumulation, returned in the gradients' promoted dtype like torch). One
    fused read for the norm, one read+write for the scaling, skipped on the
    device when the coefficient is 1. No host sync unless ``error_if_nonfinite``;
    on any error nothing is modified. DTensor gradients (FSDP2) or
    ``process_group`` / ``placements`` (as in :func:`fastgrad.grad_stats`): the
    norm of all ranks' pieces, counted once, from one all-reduce of 2 numbers
    (two when p > 6 or float64 gradients); each rank scales its own pieces.
    """
    p = parse_norm_type(norm_type)
    _check_threshold(max_norm, "max_norm")
    with torch.no_grad():
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        else:
            is_generator = isinstance(parameters, types.GeneratorType)
            parameters = list(parameters)
            if is_generator and not parameters:
                warnings.warn(
                    "`parameters` is an empty generator, no gradient clipping will occur.",
                    stacklevel=2,
                )
        names, grads = _grads_of_params(parameters)
        if not grads:
            return torch.tensor(0.0)
        total, dtype = _total_norm(names, grads, p, error_if_nonfinite, backend, process_group, placements)
        scale_op_(distributed.local_tensors(grads), _coef(max_norm, total), backend)
        return total.to(dtype)


def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Clamp every gradient in place to ``[-clip_value, clip_value]`` in one pass (NaN stays NaN)."""
    _check_threshold(clip_value, "clip_value")
    clip_value = float(clip_value)
    with torch.no_grad():
        names, grads = _grads_of_params(parameters)
        if not grads:
            return
        check_grads(names, grads)
        clamp_op_(distributed.local_tensors(grads), clip_value, backend)
