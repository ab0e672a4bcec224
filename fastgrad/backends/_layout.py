"""Memory-layout helpers shared by the backends (which views can be read flat, and how to walk the rest)."""

from __future__ import annotations

import torch


def dense_in_some_order(t: torch.Tensor) -> bool:
    """True if the elements of ``t`` exactly fill ``numel`` consecutive slots of memory."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def coalesced(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """Sizes and strides of ``t`` with size-1 dims dropped and mergeable neighbours merged."""
    sizes, strides = [], []
    for s, st in zip(t.shape, t.stride()):
        if s == 1:
            continue
        if sizes and strides[-1] == st * s:
            sizes[-1] *= s
            strides[-1] = st
        else:
            sizes.append(s)
            strides.append(st)
    return sizes or [1], strides or [1]
