"""The chunk plan of a parameter set, and its cache: shared by the CUDA and Triton backends.

A statistics, scale or clamp pass cuts every tensor into chunks of ``chunk``
elements that never cross a tensor boundary; work item ``w`` is chunk
``(item_row[w], item_start[w])``: the tensor's position in the call and the
chunk's first element. Items are ordered by *group* (the tensors that share
one kernel specialisation: for Triton, one dtype and one pointer alignment;
the CUDA backend uses one group), rows in call order within a group, chunks
in element order within a row. So each tensor's items are consecutive:
``item_range[t] = (first, past-the-end)``, and the per-tensor reduction folds
them in chunk order whatever the grouping.

A plan depends only on the tensors' sizes, dtypes (and group tags), so it is
built once per parameter set and kept on the device. The cache is keyed by

    (kind, device, stream, chunk, T, hash of sizes/dtypes/tags)

and a hit is confirmed by comparing the plan's own copy of that signature
(hash-then-compare): a hash collision rebuilds instead of returning another
set's tables. Keys include the stream because the caching allocator only
keeps a freed block away from work queued on the stream that allocated it:
a plan evicted while a kernel on another stream still reads it would be
unsafe. The cache is bounded (LRU, ``max_plans``).

CUDA graphs: a kernel captured in a graph keeps reading the device tables
it was given on every replay. During capture (``capturing=True``) a miss
raises :class:`CaptureMiss` (building a plan uploads from a pooled pinned
host buffer, which the replays would read stale), a plan cached for another
stream of the same device may be used, and every plan or table handed out
during capture is pinned: never evicted or freed, so the graph's pointers
stay valid for the life of the process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


class CaptureMiss(RuntimeError):
    """A plan or table was not cached when a CUDA graph capture needed it."""


class Group:
    """The items of one kernel specialisation: rows ``rows`` (call order), items ``[w0, w1)``."""

    __slots__ = ("key", "rows", "w0", "w1", "max_numel")

    def __init__(self, key, rows: list[int], w0: int, w1: int, max_numel: int):
        self.key, self.rows, self.w0, self.w1, self.max_numel = key, rows, w0, w1, max_numel

    def __repr__(self) -> str:
        return f"Group(key={self.key!r}, rows={self.rows}, items=[{self.w0}, {self.w1}))"


class ChunkPlan:
    """Device tables of one parameter set (see the module docstring).

    ``item_row`` int32 [W], ``item_start`` int64 [W], ``item_range`` int64 [T, 2],
    ``numels`` int64 [T], ``numels_and_total`` int64 [T + 1] (shared by every
    call's ``StatsResult.numel``: never written), ``codes`` int32 [T] (dtype
    codes, :data:`fastgrad.spec.DTYPE_CODES`); ``groups``; ``host_numels`` on
    the CPU. ``tables`` caches small int64 device tables (pointer tables) by
    their values.
    """

    def __init__(self, numels: Sequence[int], codes: Sequence[int], chunk: int, device: torch.device,
                 group_keys: Sequence | None = None, max_tables: int = 4):
        if chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
        T = len(numels)
        if len(codes) != T or (group_keys is not None and len(group_keys) != T):
            raise ValueError("numels, codes and group_keys must have one entry per tensor")
        self.chunk, self.num_tensors = chunk, T
        keys = [0] * T if group_keys is None else list(group_keys)
        by_key: dict = {}
        for row, k in enumerate(keys):
            by_key.setdefault(k, []).append(row)
        order = [row for rows in by_key.values() for row in rows]

        n = torch.tensor(list(numels), dtype=torch.int64)
        if T and int(n.min()) < 0:
            raise ValueError("element counts must be >= 0")
        per = (n + (chunk - 1)) // chunk  # chunks per tensor; 0 for an empty tensor
        order_t = torch.tensor(order, dtype=torch.int64)
        per_o = per[order_t] if T else per
        first = torch.zeros(T + 1, dtype=torch.int64)
        first[1:] = per_o.cumsum(0)
        W = int(first[-1])
        ranges = torch.empty(T, 2, dtype=torch.int64)
        if T:
            ranges[order_t, 0] = first[:-1]
            ranges[order_t, 1] = first[1:]
        item_row = torch.repeat_interleave(order_t, per_o).to(torch.int32)
        item_start = (torch.arange(W, dtype=torch.int64) - torch.repeat_interleave(first[:-1], per_o)) * chunk

        groups, at = [], 0
        for k, rows in by_key.items():
            w0 = int(first[at])
            at += len(rows)
            groups.append(Group(k, rows, w0, int(first[at]), int(n[rows].max())))
        self.groups = tuple(groups)
        self.num_items = W
        self.host_numels = n
        self.host_ranges = ranges
        self.host_item_row = item_row
        self.host_item_start = item_start
        self.device = device
        self.numels = n.to(device)
        self.numels_and_total = torch.cat([n, n.sum().reshape(1)]).to(device)
        self.codes = torch.tensor(list(codes), dtype=torch.int32).to(device)
        self.item_row = item_row.to(device)
        self.item_start = item_start.to(device)
        self.item_range = ranges.to(device)
        self.signature = None  # set by PlanCache: what a hit is compared with
        self.tables: OrderedDict = OrderedDict()
        self.max_tables = max_tables
        self.pinned = False

    # The CUDA kernels' names for the same tables.
    item_tensor = property(lambda self: self.item_row)
    item_begin = property(lambda self: self.item_start)
    dtypes = property(lambda self: self.codes)

    def table(self, values: Sequence[int], capturing: bool = False) -> torch.Tensor:
        """``values`` as an int64 tensor on the plan's device, reused while they repeat.

        Pinned host memory and a non-blocking copy on the GPU: the upload queues
        behind earlier work instead of making the host wait. During a CUDA graph
        capture a miss raises :class:`CaptureMiss` and a hit is pinned.
        """
        key = tuple(values)
        t = self.tables.get(key)
        if t is not None:
            self.tables.move_to_end(key)
            if capturing:
                _PINNED.append(t)
            return t
        if capturing:
            raise CaptureMiss("a pointer table")
        if self.device.type == "cuda":
            t = torch.tensor(key, dtype=torch.int64).pin_memory().to(self.device, non_blocking=True)
        else:
            t = torch.tensor(key, dtype=torch.int64, device=self.device)
        self.tables[key] = t
        if len(self.tables) > self.max_tables:
            old_key, old = self.tables.popitem(last=False)
            del old_key, old
        return t


# Tables handed out during CUDA graph capture: a graph replays raw pointers to them.
_PINNED: list = []


def fnv1a(values: Sequence[int]) -> int:
    """64-bit FNV-1a over ``values`` (as the C++ reader hashes sizes and codes), shifted to fit int64."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class PlanCache:
    """A bounded LRU cache of :class:`ChunkPlan` keyed per (device, stream), hash-then-compare."""

    def __init__(self, max_plans: int = 32, max_tables: int = 4):
        self.max_plans = max_plans
        self.max_tables = max_tables
        self._plans: OrderedDict = OrderedDict()
        self.builds = 0  # plans built so far (tests count them)

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def get(self, device: torch.device, stream: int, chunk: int, numels: Sequence[int], codes: Sequence[int],
            group_keys: Sequence | None = None, *, capturing: bool = False, what: str = "fastgrad") -> ChunkPlan:
        """The plan of tensors with these sizes, dtype codes and group keys (tuples of ints / hashables)."""
        sig = (tuple(numels), tuple(codes), None if group_keys is None else tuple(group_keys))
        key = ("tuple", device, stream, chunk, len(sig[0]), hash(sig))
        return self._lookup(key, sig, lambda: sig, lambda: ChunkPlan(
            sig[0], sig[1], chunk, device, sig[2], self.max_tables), device, capturing, what)

    def get_by_hash(self, device: torch.device, stream: int, chunk: int, meta: torch.Tensor, T: int,
                    key_hash: int, *, capturing: bool = False, what: str = "fastgrad") -> ChunkPlan:
        """The plan of the parameter set whose sizes and dtype codes are ``meta[T:3T]`` (int64, on the
        CPU: ``[numels..., codes...]`` after ``T`` other values), found by ``key_hash`` and confirmed
        by comparing ``meta`` with the plan's copy. One group, in call order."""
        sig_t = meta[T: 3 * T]
        key = ("hash", device, stream, chunk, T, key_hash)

        def make():
            n = sig_t[:T].tolist()
            return ChunkPlan(n, sig_t[T:].tolist(), chunk, device, None, self.max_tables)

        return self._lookup(key, sig_t, lambda: sig_t.clone(), make, device, capturing, what)

    def _lookup(self, key, sig, own_sig, make, device, capturing: bool, what: str) -> ChunkPlan:
        plan = self._plans.get(key)
        if plan is not None and _same(plan.signature, sig):
            self._plans.move_to_end(key)
            if capturing:
                _pin(plan)
            return plan
        if capturing:
            # Plans cached for another stream of this device serve a capture: the graph then holds
            # them, so they are pinned (never freed) rather than evicted under a running replay.
            for k, p in self._plans.items():
                if k[0] == key[0] and k[1] == device and k[3:] == key[3:] and _same(p.signature, sig):
                    _pin(p)
                    return p
            raise CaptureMiss(
                f"{what}: no cached chunk plan for these tensors while a CUDA graph is being captured "
                "(building one uploads tables from a pooled host buffer that the replays would read "
                "stale). Run the same call once before capturing (a warm-up), with the same tensors."
            )
        plan = make()
        plan.signature = own_sig()
        self.builds += 1
        if plan is not None and key in self._plans:
            del self._plans[key]
        self._plans[key] = plan
        while len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)
        return plan


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _pin(plan: ChunkPlan) -> None:
    if not plan.pinned:
        plan.pinned = True
        _PINNED.append(plan)


__all__ = ["CaptureMiss", "ChunkPlan", "Group", "PlanCache", "fnv1a"]
