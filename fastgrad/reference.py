"""The float64 definition of every statistic: the specification all backends are tested against.

For one gradient tensor ``x`` (any floating dtype, upcast exactly to float64):

* ``norm_p(x) = (sum_i |x_i|^p)^(1/p)`` for finite ``p > 0``, evaluated as
  ``m * (sum_i (|x_i|/m)^p)^(1/p)`` with ``m = max_i |x_i|`` so that it
  neither overflows nor underflows where the true value is representable.
  NaN if any element is NaN, else +Inf if any element is ±Inf, 0 if empty.
* ``max_abs(x) = max_i |x_i|`` over the non-NaN elements (0 if none).
  The inf-norm is ``max_abs`` unless a NaN is present, then NaN (as torch).
* counts of NaN, +Inf, -Inf and exact zeros (``+0`` and ``-0``).
* the power-of-two magnitude histogram of :class:`fastgrad.spec.HistogramSpec`,
  with ``floor(log2 |x|)`` read exactly from :func:`torch.frexp`.

It runs on the tensors' own device, one tensor at a time: slow, simple, and the
fallback backend. On a GPU it synchronises with the host (boolean-mask indexing and
``bincount`` need their sizes): the fast backends are the sync-free ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .aggregate import scaled_ratio, unscale
from .spec import NEGINF, NUM_COUNTS, POSINF, ZERO, NAN, RawStats, StatsSpec


def tensor_norm_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    """The finite-p norm of one tensor as a float64 0-d tensor (definition above)."""
    a = x.detach().to(torch.float64).abs().flatten()
    if a.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    nan = a.isnan()
    m = torch.where(nan, 0.0, a).amax()
    norm = unscale(m, (scaled_ratio(a, m) ** p).sum(), p)
    norm = torch.where(a.isinf().any(), float("inf"), norm)
    return torch.where(nan.any(), float("nan"), norm)


def histogram_reference(x: torch.Tensor, spec) -> torch.Tensor:
    """int64 ``[spec.num_bins]`` counts of the finite non-zero ``|x_i|`` by ``floor(log2 |x_i|)``."""
    a = x.detach().to(torch.float64).flatten()
    a = a[a.isfinite() & (a != 0)]
    _, e = torch.frexp(a)  # a = mantissa * 2**e with |mantissa| in [0.5, 1)
    idx = (e.to(torch.int64) - 1 - spec.min_exp + 1).clamp(0, spec.num_bins - 1)
    return torch.bincount(idx, minlength=spec.num_bins)


def stats_reference(tensors: Sequence[torch.Tensor], spec: StatsSpec) -> RawStats:
    """Fill the :class:`RawStats` tables for ``tensors`` (one device) in float64."""
    device = tensors[0].device if tensors else torch.device("cpu")
    ps = spec.finite_norms
    floats = torch.zeros(len(tensors), len(ps) + 1, dtype=torch.float64, device=device)
    counts = torch.zeros(len(tensors), spec.num_count_cols, dtype=torch.int64, device=device)
    for row, x in enumerate(tensors):
        a = x.detach().to(torch.float64).flatten()
        for j, p in enumerate(ps):
            floats[row, j] = tensor_norm_reference(a, p)
        if a.numel():
            floats[row, len(ps)] = torch.where(a.isnan(), 0.0, a.abs()).amax()
        counts[row, NAN] = a.isnan().sum()
        counts[row, POSINF] = (a == float("inf")).sum()
        counts[row, NEGINF] = (a == float("-inf")).sum()
        counts[row, ZERO] = (a == 0).sum()
        if spec.histogram is not None:
            counts[row, NUM_COUNTS:] = histogram_reference(a, spec.histogram)
    return RawStats(floats, counts)


def scale_reference_(tensors: Sequence[torch.Tensor], coef: torch.Tensor) -> None:
    """``x *= coef`` for every tensor; on the CPU it writes nothing when ``coef == 1``."""
    if not tensors:
        return
    if coef.device.type == "cpu" and bool(coef == 1):  # free on the CPU; a sync elsewhere
        return
    torch._foreach_mul_(list(tensors), coef.to(tensors[0].device))


def clamp_reference_(tensors: Sequence[torch.Tensor], clip_value: float) -> None:
    """``x = clamp(x, -clip_value, clip_value)`` for every tensor (NaN stays NaN, as torch)."""
    for x in tensors:
        x.clamp_(-clip_value, clip_value)
