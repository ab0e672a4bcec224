"""Combine per-tensor rows into per-group and total rows, deterministically, on the device.

Groups are reduced through a padded index matrix ``[G, L]`` (row g lists the
tensors of group g, padded with a pointer to an all-zero row): a gather and a
``sum``/``amax`` over ``dim=1``. Unlike ``index_add_`` on CUDA (float atomics)
the order is fixed, so results are bitwise reproducible on every device.

Norms are combined with the scaled formula (``M = max n_i``)::

    norm_p(group) = M * (sum_i (n_i / M)^p)^(1/p)

which is exact math for norms of disjoint pieces, never overflows, and keeps
NaN (any NaN piece) and Inf (any Inf piece, no NaN) semantics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .spec import RawStats, StatsSpec


class Segments:
    """A fixed assignment of T rows to G groups (``index[t] = g``), cached per parameter set."""

    def __init__(self, index: Sequence[int], num_groups: int, device: torch.device):
        self.index_list = list(index)
        self.num_rows = len(self.index_list)
        self.num_groups = num_groups
        members: list[list[int]] = [[] for _ in range(num_groups)]
        for t, g in enumerate(self.index_list):
            members[g].append(t)
        width = max([len(m) for m in members] + [0])
        pad = [m + [self.num_rows] * (width - len(m)) for m in members]  # -> the zero row
        self.pad = torch.tensor(pad, dtype=torch.int64, device=device).reshape(num_groups, width)
        self.index = torch.tensor(self.index_list, dtype=torch.int64, device=device)

    def _gathered(self, values: torch.Tensor) -> torch.Tensor:
        zero = values.new_zeros((1, *values.shape[1:]))
        return torch.cat([values, zero])[self.pad]  # [G, L, ...]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return self._gathered(values).sum(dim=1)

    def amax(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group max of non-negative values (empty group -> 0); NaN propagates."""
        g = self._gathered(values)
        if g.shape[1] == 0:
            return values.new_zeros((self.num_groups, *values.shape[1:]))
        return g.amax(dim=1)


class _Total:
    """All rows in one group: plain reductions, no gather."""

    num_groups = 1

    @staticmethod
    def sum(values: torch.Tensor) -> torch.Tensor:
        return values.sum(dim=0, keepdim=True)

    @staticmethod
    def amax(values: torch.Tensor) -> torch.Tensor:
        if values.shape[0] == 0:
            return values.new_zeros((1, *values.shape[1:]))
        return values.amax(dim=0, keepdim=True)


TOTAL = _Total()


def scaled_ratio(values: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``values / m`` where the scale ``m`` is positive and finite, else 0: the terms of the scaled
    p-norm sum ``(values / m)^p``, which cannot overflow or underflow (every term is <= 1)."""
    ok = (m > 0) & m.isfinite()
    return torch.where(ok, values / torch.where(ok, m, 1.0), 0.0)


def unscale(m: torch.Tensor, s: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """``m * s^(1/p)``: the p-norm from its scale ``m`` and the sum ``s`` of scaled terms;
    0 where ``m == 0``, +Inf where ``m`` is infinite.

    With :func:`scaled_ratio` this is the one definition of the scaled norm combination
    ``M * (sum_i (n_i / M)^p)^(1/p)`` used by the reference (over elements), the group and
    total rows (over tensors) and the cross-rank reduction (over ranks).
    """
    out = m * s ** (1.0 / p)
    out = torch.where(m == 0, 0.0, out)
    return torch.where(m.isinf(), float("inf"), out)


def combine_norms(norms: torch.Tensor, p: float, seg) -> torch.Tensor:
    """float64 ``[G]`` p-norms of groups from the p-norms ``[T]`` of their disjoint members."""
    m = seg.amax(norms)  # [G]
    m_row = m[seg.index] if isinstance(seg, Segments) else m.expand_as(norms)
    return unscale(m, seg.sum(scaled_ratio(norms, m_row) ** p), p)


def aggregate(raw: RawStats, spec: StatsSpec, seg) -> RawStats:
    """The :class:`RawStats` rows of the groups of ``seg`` (or the single total row)."""
    ps = spec.finite_norms
    cols = [combine_norms(raw.floats[:, j], p, seg) for j, p in enumerate(ps)]
    cols.append(seg.amax(raw.floats[:, len(ps)]))
    floats = torch.stack(cols, dim=1)
    return RawStats(floats, seg.sum(raw.counts))
