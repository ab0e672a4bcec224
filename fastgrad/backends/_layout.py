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


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, past-the-end)`` byte addresses of the memory ``t`` can touch (empty: ``(p, p)``)."""
    p = t.data_ptr()
    if t.numel() == 0:
        return p, p
    size = t.element_size()
    lo = hi = 0
    for s, st in zip(t.shape, t.stride()):
        if st < 0:
            lo += (s - 1) * st
        else:
            hi += (s - 1) * st
    return p + lo * size, p + (hi + 1) * size


def overlap_layers(tensors) -> list[list[int]] | None:
    """None if no two of ``tensors`` can share memory; else the positions split into *layers*.

    In-place multi-tensor kernels give every tensor its own blocks, which run in
    any order: two tensors aliasing one memory (``[x, x]``, overlapping views of
    one buffer, e.g. a DDP bucket) would be read and written concurrently, and
    ``x *= c`` would leave some shared elements scaled once and some twice
    (torch's foreach kernels do not check and race the same way on the GPU).
    fastgrad applies such lists in list order instead, as torch's per-tensor
    loop (and its CPU foreach path) does: tensor ``i`` goes in layer
    ``1 + max(layer of every earlier tensor whose memory it may share)``, no two
    tensors of a layer share memory, and the layers run one after another
    (``[x, x]`` scales ``x`` twice). The test is on byte spans (conservative:
    interleaved views like ``x[:, ::2]`` and ``x[:, 1::2]`` get two layers,
    still correct). Cost: one pass and a sort of the spans.
    """
    spans = []
    for i, t in enumerate(tensors):
        n = t.numel()
        if n:
            if t.is_contiguous():
                p = t.data_ptr()
                spans.append((p, p + n * t.element_size(), i))
            else:
                spans.append((*byte_span(t), i))
    if len(spans) < 2:
        return None
    spans.sort()
    # Sweep in address order; `end` is the furthest end seen so far: in the common case (no
    # overlap) every span starts at or after it, and nothing else is done.
    earlier: dict[int, list[int]] = {}  # i -> the earlier positions it overlaps
    end = spans[0][0]
    for k, (lo, hi, i) in enumerate(spans):
        if lo < end:
            for olo, ohi, j in spans[:k]:
                if ohi > lo:
                    earlier.setdefault(max(i, j), []).append(min(i, j))
        end = max(end, hi)
    if not earlier:
        return None
    layer = [0] * len(tensors)
    for i in range(len(tensors)):
        if i in earlier:
            layer[i] = 1 + max(layer[j] for j in earlier[i])
    layers: list[list[int]] = [[] for _ in range(max(layer) + 1)]
    for i, k in enumerate(layer):
        layers[k].append(i)
    return layers
