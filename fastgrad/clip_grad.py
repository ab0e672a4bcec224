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
* invalid ``max_norm`` / ``clip_value`` (negative, NaN) raise ``ValueError``
  before anything is touched (torch silently flips signs);
* ``error_if_nonfinite=True`` names the offending gradients; it raises when the
  returned norm is non-finite, as torch — including float16 gradients whose
  norm exceeds 65504, which fastgrad still clips correctly when the error is off
  (torch zeroes them: its coefficient is ``max_norm / inf``);
* ``norm_type <= 0`` (accepted by torch, not norms) takes a plain torch-ops path
  with torch's values;
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

from . import dispatch, distributed
from .backends.cpu import keep_reads
from .collect import check_grads
from .ops import clamp_op_, scale_op_
from .spec import NAN, NEGINF, POSINF, ZERO, StatsSpec
from .stats import compute_total_norm

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]
EPS = 1e-6  # torch's: coef = max_norm / (total_norm + 1e-6)
_KEEP_READS = keep_reads()  # stateless: one instance serves every call and thread


def clip_coefficient(max_norm, total_norm: torch.Tensor | float) -> torch.Tensor | float:
    """float64 0-d ``min(max_norm / (total_norm + 1e-6), 1)`` on ``total_norm``'s device.

    torch's rule (``clip_grads_with_norm_``), the one definition every fastgrad clipper uses.
    NaN ``total_norm`` gives NaN (so the gradients become NaN, as in torch). With a Python float
    ``total_norm`` (host memory) and ``max_norm`` it is a Python float, bitwise the same value.
    """
    if isinstance(total_norm, float) and not isinstance(max_norm, torch.Tensor):
        c = max_norm / (total_norm + EPS)
        return 1.0 if c > 1.0 else c  # NaN passes through, as torch.clamp
    if isinstance(total_norm, float):
        total_norm = torch.tensor(total_norm, dtype=torch.float64)
    total = total_norm.detach()
    if total.dtype != torch.float64:
        total = total.to(torch.float64)
    if isinstance(max_norm, torch.Tensor):
        max_norm = max_norm.detach().to(total.device, torch.float64)
    return torch.clamp(max_norm / (total + EPS), max=1.0)


def parse_clip_norm_type(norm_type) -> float:
    """``norm_type`` as torch's clipping functions accept it: any number or ``'inf'`` / ``'-inf'``
    (``0`` counts non-zeros, ``p < 0`` is ``(sum |x|^p)^(1/p)``, ``-inf`` is ``min |x|``); NaN raises."""
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(p):
        raise ValueError("norm_type must be a number, got nan")
    return p


def _check_threshold(value, what: str):
    """``value`` as a float (torch calls ``float()`` on it: numbers and numeric strings) or a
    one-element tensor; raises for negative or NaN values before anything is touched."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return value  # checking would synchronise; the caller's device tensor is trusted
        v = value.item()
    else:
        try:
            v = value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be a number or a tensor, got {type(value).__name__}") from None
    if math.isnan(v) or v < 0:
        raise ValueError(f"{what} must be a non-negative number, got {value!r}")
    return value


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


def _nonfinite_error(names, grads, p: float, total, dtype: torch.dtype, backend) -> RuntimeError:
    raw = dispatch.compute(distributed.local_tensors(grads), StatsSpec((1.0,), None), backend, names)[0].raw
    counts = raw.counts[:, :ZERO].to("cpu").tolist()  # NaN, +Inf, -Inf per gradient
    worst = [f"{n} ({c[NAN]} NaN, {c[POSINF]} +Inf, {c[NEGINF]} -Inf)" for n, c in zip(names, counts) if any(c)]
    if not worst:  # finite gradients, a norm beyond the range of their dtype
        return RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is {float(total):.6g}, beyond "
            f"the range of {dtype}, so the returned norm would be non-finite. To disable this error, "
            "set `error_if_nonfinite=False` (fastgrad still clips correctly, using the float64 norm)."
        )
    return RuntimeError(
        f"The total norm of order {p} for gradients from `parameters` is non-finite, so it "
        "cannot be clipped. To disable this error and scale the gradients by the non-finite "
        "norm anyway, set `error_if_nonfinite=False`. Non-finite gradients: "
        + (", ".join(worst[:20]) + (f" and {len(worst) - 20} more" if len(worst) > 20 else ""))
    )


def _torch_total_norm(grads: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """float64 0-d total norm for ``p <= 0`` with torch's values: ``torch.linalg.vector_norm`` of
    each gradient (in float64), then of those norms (``p = 0``: the number of tensors holding a
    non-zero). Rare p, a plain torch path; sharded gradients are not supported here."""
    norms = [torch.linalg.vector_norm(g.detach().to(torch.float64), p) for g in distributed.local_tensors(grads)]
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), p)


def _as_dtype(total: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """The norm in the gradients' dtype, rounded once from float64 (as ``.to(dtype)``)."""
    if not isinstance(total, float):
        return total.to(dtype)
    try:  # a third of torch.tensor's host cost, the same rounding
        return torch.scalar_tensor(total, dtype=dtype)
    except RuntimeError:  # float32 refuses values beyond its range here; .to() gives inf
        return torch.tensor(total, dtype=torch.float64).to(dtype)


def _total_norm(
    names, grads, p: float, error_if_nonfinite: bool, backend, process_group=None, placements=None
) -> tuple[torch.Tensor | float, torch.Tensor]:
    """``(total, returned)``: the float64 global p-norm (one fused pass; all-reduce if sharded; a
    0-d tensor on the first gradient's device, or a Python float for host memory) and the norm as
    torch returns it, rounded to the gradients' promoted dtype. Checks the gradients."""
    if p > 0:
        total, dtypes = compute_total_norm(names, grads, p, backend, process_group, placements)
    else:  # torch accepts p <= 0 (not norms); computed its way
        if process_group is not None or placements is not None:
            raise ValueError(f"norm_type {p} is not supported with process_group= / placements=; use p > 0")
        check_grads(names, grads)
        total, dtypes = _torch_total_norm(grads, p), list({g.dtype for g in grads})
    dtype = dtypes[0] if len(dtypes) == 1 else functools.reduce(torch.promote_types, dtypes)
    returned = _as_dtype(total, dtype)
    # torch raises when the norm it returns is non-finite: so does fastgrad (one sync, as torch's)
    if error_if_nonfinite and not bool(returned.isfinite()):
        raise _nonfinite_error(names, grads, p, total, dtype, backend)
    return total, returned


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
    ``norm_type`` may be any number torch accepts (``p <= 0`` with torch's values, via torch ops).
    """
    p = parse_clip_norm_type(norm_type)
    # No no_grad() context (a microsecond at one small tensor): nothing here records autograd
    # history — the kernels read raw memory, and the torch-op paths work on detached values.
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if not tensors:
        return torch.tensor(0.0)
    names = _PositionNames(range(len(tensors)))
    return _total_norm(names, tensors, p, error_if_nonfinite, backend, process_group, placements)[1]


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
    max_norm = _check_threshold(max_norm, "max_norm")
    if not isinstance(total_norm, torch.Tensor):
        raise TypeError(
            f"total_norm must be a tensor (as get_total_norm returns), got {type(total_norm).__name__}; "
            "wrap a number with torch.tensor(...)"
        )
    with torch.no_grad():
        names, grads = _grads_of_params(parameters)
        if not grads:
            return
        check_grads(names, grads)
        scale_op_(distributed.local_tensors(grads), clip_coefficient(max_norm, total_norm), backend)


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
    p = parse_clip_norm_type(norm_type)
    max_norm = _check_threshold(max_norm, "max_norm")
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
        args = (names, grads, p, max_norm, error_if_nonfinite, backend, process_group, placements)
        if torch.compiler.is_compiling():  # traced: no thread-local state (the op boundary reads the list)
            return _norm_and_scale(*args)
        # One read of the list: the CPU fast form keeps what the norm pass read and scales from it
        # (backends/cpu.py, keep_reads).
        with _KEEP_READS:
            return _norm_and_scale(*args)


def _norm_and_scale(names, grads, p, max_norm, error_if_nonfinite, backend, process_group, placements):
    """clip_grad_norm_'s work: the norm, then the scale by :func:`clip_coefficient` of it (an
    ``error_if_nonfinite`` error leaves before anything is written); returns the norm."""
    total, returned = _total_norm(names, grads, p, error_if_nonfinite, backend, process_group, placements)
    scale_op_(distributed.local_tensors(grads), clip_coefficient(max_norm, total), backend)
    return returned


def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Clamp every gradient in place to ``[-clip_value, clip_value]`` in one pass (NaN stays NaN)."""
    clip_value = float(_check_threshold(clip_value, "clip_value"))
    with torch.no_grad():
        names, grads = _grads_of_params(parameters)
        if not grads:
            return
        check_grads(names, grads)
        clamp_op_(distributed.local_tensors(grads), clip_value, backend)
