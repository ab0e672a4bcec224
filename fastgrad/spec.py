"""What a statistics pass computes, and the layout every backend writes it in.

A backend is handed a list of gradient tensors and a :class:`StatsSpec` and
fills two tables, one row per tensor (see :class:`RawStats`):

``floats``  float64 ``[T, P + 1]``
    column ``j < P``: the ``spec.finite_norms[j]``-norm of the tensor,
    ``(sum_i |x_i|^p)^(1/p)``, NaN if the tensor holds a NaN, +Inf if it holds
    an Inf; column ``P``: ``max_i |x_i|`` over the non-NaN elements (+Inf if
    it holds an Inf, 0 for an empty tensor).
``counts``  int64 ``[T, 4 + B]``
    columns ``NAN, POSINF, NEGINF, ZERO`` (``±0`` both count as zero), then the
    ``B = spec.histogram.num_bins`` magnitude-histogram bins (all zero when
    ``spec.histogram`` is None).

Norms, not sums of powers, are the per-tensor currency: a norm never
overflows where the answer itself is finite (``|x| = 1e200`` in float64,
``1e30`` squared in float32), and groups of norms are combined with the same
scaled formula everywhere (:func:`fastgrad.aggregate.combine_norms`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

NAN, POSINF, NEGINF, ZERO = range(4)
NUM_COUNTS = 4
COUNT_NAMES = ("nan", "posinf", "neginf", "zero")


@dataclass(frozen=True)
class HistogramSpec:
    """Fixed power-of-two magnitude bins, comparable across steps and ranks.

    A finite non-zero value ``x`` with ``e = floor(log2 |x|)`` falls in

    * bin ``0`` (underflow) if ``e < min_exp``  (subnormals always do),
    * bin ``1 + e - min_exp`` if ``min_exp <= e < max_exp``, i.e. the bin
      holding ``[2^e, 2^(e+1))``,
    * bin ``num_bins - 1`` (overflow) if ``e >= max_exp``.

    Zeros, NaN and ±Inf are not in any bin; they have their own counters.
    The exponent is read from the float's bits, never with a logarithm.
    """

    min_exp: int = -64
    max_exp: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.min_exp, int) and isinstance(self.max_exp, int)):
            raise TypeError("HistogramSpec: min_exp and max_exp must be ints")
        # -126 is float32's smallest normal exponent: every dtype then maps its
        # subnormals to the underflow bin, and bins are the same for all dtypes.
        if not (-126 <= self.min_exp < self.max_exp <= 128):
            raise ValueError(
                f"HistogramSpec needs -126 <= min_exp < max_exp <= 128, got "
                f"min_exp={self.min_exp}, max_exp={self.max_exp}"
            )

    @property
    def num_bins(self) -> int:
        return self.max_exp - self.min_exp + 2

    def edges(self) -> list[float]:
        """Bin edges as magnitudes: ``[0, 2^min_exp, ..., 2^max_exp, inf]`` (``num_bins + 1``)."""
        return [0.0] + [2.0**e for e in range(self.min_exp, self.max_exp + 1)] + [math.inf]


@dataclass(frozen=True)
class StatsSpec:
    """The statistics one pass computes. ``norm_types`` are the requested p (``inf`` allowed)."""

    norm_types: tuple[float, ...] = (2.0,)
    histogram: HistogramSpec | None = field(default_factory=HistogramSpec)
    # Derived once (every call reads them; a spec is immutable):
    #   finite_norms    the finite p among norm_types, in order, without repeats: one float column each
    #   num_float_cols  len(finite_norms) + 1 (max|x|)
    #   num_count_cols  4 counters + the histogram bins
    finite_norms: tuple[float, ...] = field(init=False, repr=False, compare=False)
    num_float_cols: int = field(init=False, repr=False, compare=False)
    num_count_cols: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out: list[float] = []
        for p in self.norm_types:
            if math.isfinite(p) and p not in out:
                out.append(p)
        object.__setattr__(self, "finite_norms", tuple(out))
        object.__setattr__(self, "num_float_cols", len(out) + 1)
        object.__setattr__(self, "num_count_cols", NUM_COUNTS + (self.histogram.num_bins if self.histogram else 0))


class RawStats(NamedTuple):
    """The two tables a backend fills (layout in the module docstring)."""

    floats: torch.Tensor
    counts: torch.Tensor


class StatsResult(NamedTuple):
    """What every backend's ``stats`` returns: the per-tensor rows, the element counts and the
    total row, all on the tensors' device.

    ``raw``    :class:`RawStats` with ``T`` rows, in input order.
    ``numel``  int64 ``[T + 1]``: each tensor's element count, then their sum (may be shared
               between calls over the same parameter set: read it, never write it).
    ``total``  :class:`RawStats` with one row: the statistics of all elements as one vector
               (norms combined with :func:`fastgrad.aggregate.combine_norms`' formula).
    """

    raw: RawStats
    numel: torch.Tensor
    total: RawStats


# The one dtype table: the code each kernel (C++, CUDA, Triton launchers) receives per tensor.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES_BY_CODE = tuple(sorted(DTYPE_CODES, key=DTYPE_CODES.get))
SUPPORTED_DTYPES = DTYPES_BY_CODE
# The exact types the backends' C++ plain readers (csrc/common/plain_reader.h) take where a call
# only reads: tensors, and parameters (the weights of grad_stats(params=True), passed as they are:
# a detach() per weight, and the garbage collections its new objects trigger, cost more than the
# statistics of 10,000 small tensors). A Parameter's attributes are a tensor's (the same getset and
# method descriptors, no __torch_function__ of its own). In-place ops take torch.Tensor only: a
# parameter is never written through its raw memory.
READ_TYPES = (torch.Tensor, torch.nn.Parameter)


def dtypes_of_mask(mask: int) -> list[torch.dtype]:
    """The dtypes whose bit ``DTYPE_CODES[dtype]`` is set in ``mask`` (as the C++ readers report)."""
    return [dt for code, dt in enumerate(DTYPES_BY_CODE) if mask >> code & 1]


def parse_norm_type(norm_type: float | int | str) -> float:
    """``norm_type`` as torch accepts it (a number or ``'inf'``), checked to be a valid p > 0."""
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(p) or p <= 0:
        raise ValueError(
            f"norm_type must be > 0 (a p-norm, or inf), got {norm_type!r}; "
            "p <= 0 is not a norm"
        )
    return p


def make_spec(norm_types, histogram) -> StatsSpec:
    """Build a :class:`StatsSpec` from the public ``norm_types`` / ``histogram`` arguments."""
    if torch.compiler.is_compiling():  # dynamo does not trace through lru_cache
        return _make_spec(norm_types, histogram)
    try:
        return _make_spec_cached(norm_types, histogram)
    except TypeError as e:  # unhashable arguments (a list of norm types): build it uncached
        if "unhashable" not in str(e):
            raise
        return _make_spec(norm_types, histogram)


def _make_spec(norm_types, histogram) -> StatsSpec:
    if isinstance(norm_types, (int, float, str)):
        norm_types = (norm_types,)
    ps = tuple(parse_norm_type(p) for p in norm_types)
    if not ps:
        raise ValueError("norm_types must name at least one norm, e.g. (2,)")
    if histogram is True:
        hist = HistogramSpec()
    elif histogram is False or histogram is None:
        hist = None
    elif isinstance(histogram, HistogramSpec):
        hist = histogram
    elif isinstance(histogram, tuple) and len(histogram) == 2:
        hist = HistogramSpec(*histogram)
    else:
        raise TypeError(
            "histogram must be True, False, a HistogramSpec or a (min_exp, max_exp) tuple, "
            f"got {histogram!r}"
        )
    return StatsSpec(ps, hist)


_make_spec_cached = functools.lru_cache(maxsize=64)(_make_spec)
