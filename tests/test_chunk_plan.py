"""The chunk planner and plan cache shared by the CUDA and Triton backends (fastgrad/backends/chunk_plan.py),
and the in-place ops' handling of tensors that share memory (fastgrad/backends/_layout.py, csrc/common/plain_reader.h).

All on CPU tensors: plans are device tables built with torch ops, so the CPU stands in for a GPU here.
"""

import pytest
import torch

from fastgrad.backends import _layout, chunk_plan
from fastgrad.backends.chunk_plan import CaptureMiss, ChunkPlan, PlanCache, fnv1a

CPU = torch.device("cpu")


def expected_items(numels, chunk, order=None):
    """(row, start) of every chunk, rows in ``order`` (default: call order): the definition."""
    order = range(len(numels)) if order is None else order
    return [(r, s) for r in order for s in range(0, numels[r], chunk)]


def items_of(plan: ChunkPlan):
    return list(zip(plan.item_row.tolist(), plan.item_start.tolist()))


# -- the planner ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 5, 16])
def test_chunk_boundaries_at_powers_of_two(k):
    chunk = 16
    numels = [2**k - 1, 2**k, 2**k + 1, 1, 0, chunk - 1, chunk, chunk + 1]
    plan = ChunkPlan(numels, [0] * len(numels), chunk, CPU)
    assert items_of(plan) == expected_items(numels, chunk)
    assert plan.num_items == sum(-(-n // chunk) for n in numels)
    # each tensor's items are consecutive and cover exactly its elements
    for t, n in enumerate(numels):
        w0, w1 = plan.item_range[t].tolist()
        starts = plan.item_start[w0:w1].tolist()
        assert plan.item_row[w0:w1].tolist() == [t] * (w1 - w0)
        assert starts == list(range(0, n, chunk))
        assert sum(min(chunk, n - s) for s in starts) == n
    assert plan.numels.tolist() == numels
    assert plan.numels_and_total.tolist() == [*numels, sum(numels)]


def test_empty_tensors_and_empty_lists():
    plan = ChunkPlan([0, 0], [1, 3], 16, CPU)
    assert plan.num_items == 0 and plan.item_row.numel() == 0
    assert plan.item_range.tolist() == [[0, 0], [0, 0]]
    assert plan.numels_and_total.tolist() == [0, 0, 0]
    none = ChunkPlan([], [], 16, CPU)
    assert none.num_items == 0 and none.item_range.shape == (0, 2) and none.numels_and_total.tolist() == [0]
    # an empty tensor between two others owns no items and shifts nothing
    mid = ChunkPlan([20, 0, 5], [0, 0, 0], 16, CPU)
    assert mid.item_range.tolist() == [[0, 2], [2, 2], [2, 3]]


def test_groups_keep_each_tensors_items_together_in_chunk_order():
    numels, chunk = [40, 3, 17, 16, 0, 33], 16
    keys = ["a", "b", "a", "c", "b", "b"]
    plan = ChunkPlan(numels, [0] * 6, chunk, CPU, group_keys=keys)
    assert [g.key for g in plan.groups] == ["a", "b", "c"]  # first appearance
    assert [g.rows for g in plan.groups] == [[0, 2], [1, 4, 5], [3]]
    assert items_of(plan) == expected_items(numels, chunk, order=[0, 2, 1, 4, 5, 3])
    for g in plan.groups:
        assert all(plan.item_row[w] in g.rows for w in range(g.w0, g.w1))
        assert g.max_numel == max(numels[r] for r in g.rows)
    for t, n in enumerate(numels):
        w0, w1 = plan.item_range[t].tolist()
        assert plan.item_start[w0:w1].tolist() == list(range(0, n, chunk))


def test_bad_chunk_sizes_and_lengths_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        ChunkPlan([4], [0], 24, CPU)
    with pytest.raises(ValueError, match="one entry per tensor"):
        ChunkPlan([4, 5], [0], 16, CPU)


# -- the cache --------------------------------------------------------------------------


def test_cache_hit_per_stream_and_device():
    cache = PlanCache()
    a = cache.get(CPU, 0, 16, [40, 3], [0, 1])
    assert cache.get(CPU, 0, 16, (40, 3), (0, 1)) is a and cache.builds == 1
    b = cache.get(CPU, 7, 16, [40, 3], [0, 1])  # another stream: its own plan (allocator safety)
    assert b is not a and cache.builds == 2
    assert cache.get(CPU, 0, 16, [40, 3], [0, 3]) is not a  # another dtype
    assert cache.get(CPU, 0, 16, [40, 3], [0, 1], [(0, True), (1, False)]) is not a  # other groups
    assert cache.get(CPU, 0, 32, [40, 3], [0, 1]) is not a  # other chunk size


def test_hash_collision_is_caught_by_the_compare():
    cache = PlanCache()
    meta_a = torch.tensor([0, 0, 70_000, 3, 0, 3])  # pointers, numels, dtype codes (T = 2)
    meta_b = torch.tensor([0, 0, 70_000, 4, 0, 3])
    a = cache.get_by_hash(CPU, 0, 1 << 16, meta_a, 2, key_hash=12345)
    assert cache.get_by_hash(CPU, 0, 1 << 16, meta_a.clone(), 2, key_hash=12345) is a
    b = cache.get_by_hash(CPU, 0, 1 << 16, meta_b, 2, key_hash=12345)  # same hash, other sizes
    assert b is not a and b.numels.tolist() == [70_000, 4]
    assert items_of(a) == [(0, 0), (0, 65536), (1, 0)] and a.codes.tolist() == [0, 3]
    # the plan keeps its own copy of the key: the caller's buffer may be reused
    meta_a[2] = 5
    c = cache.get_by_hash(CPU, 0, 1 << 16, meta_b, 2, key_hash=12345)
    assert c is b


def test_the_reader_hash_matches_the_python_definition():
    C = pytest.importorskip("fastgrad._C")
    from fastgrad.spec import DTYPES_BY_CODE

    ts = [torch.zeros(5), torch.zeros(0, dtype=torch.bfloat16), torch.zeros(3, 4, dtype=torch.float64)]
    meta = torch.empty(3 * len(ts), dtype=torch.int64)
    mask, _, h = C.describe_plain(ts, torch.Tensor, DTYPES_BY_CODE, torch.strided, False, meta.data_ptr())
    assert mask == 0b1011
    assert h == fnv1a([v for t in ts for v in (t.numel(), DTYPES_BY_CODE.index(t.dtype))])


def test_eviction_is_bounded_and_least_recently_used():
    cache = PlanCache(max_plans=3)
    plans = [cache.get(CPU, 0, 16, [n], [0]) for n in (1, 2, 3)]
    assert cache.get(CPU, 0, 16, [1], [0]) is plans[0]  # touch: now most recent
    cache.get(CPU, 0, 16, [4], [0])  # evicts [2], the least recently used
    assert len(cache) == 3
    assert cache.get(CPU, 0, 16, [1], [0]) is plans[0]
    assert cache.get(CPU, 0, 16, [3], [0]) is plans[2]
    assert cache.get(CPU, 0, 16, [2], [0]) is not plans[1]


def test_pointer_tables_are_reused_and_bounded():
    plan = ChunkPlan([4, 4], [0, 0], 16, CPU, max_tables=2)
    t1 = plan.table([1, 2])
    assert plan.table((1, 2)) is t1 and t1.tolist() == [1, 2] and t1.dtype == torch.int64
    plan.table([3, 4])
    plan.table([5, 6])
    assert len(plan.tables) == 2 and plan.table([1, 2]) is not t1


def test_capture_uses_only_cached_plans_and_pins_them(monkeypatch):
    monkeypatch.setattr(chunk_plan, "_PINNED", [])
    cache = PlanCache(max_plans=2)
    with pytest.raises(CaptureMiss, match="warm-up"):
        cache.get(CPU, 0, 16, [40], [0], capturing=True, what="fastgrad's Triton backend")
    warm = cache.get(CPU, 5, 16, [40], [0])  # warmed up on stream 5
    # captured on stream 9: the plan of stream 5 serves, and is pinned (the graph holds its pointers)
    assert cache.get(CPU, 9, 16, [40], [0], capturing=True) is warm
    assert warm.pinned and warm in chunk_plan._PINNED
    tab = warm.table([123])
    with pytest.raises(CaptureMiss):
        warm.table([456], capturing=True)
    assert warm.table([123], capturing=True) is tab and any(t is tab for t in chunk_plan._PINNED)
    # eviction after capture drops it from the cache but the pin keeps its memory alive
    cache.get(CPU, 0, 16, [1], [0])
    cache.get(CPU, 0, 16, [2], [0])
    assert any(p is warm for p in chunk_plan._PINNED)


# -- tensors sharing memory ----------------------------------------------------------


def test_overlap_layers():
    x = torch.zeros(10, 8)
    L = _layout.overlap_layers
    assert L([x[:5], x[5:], torch.zeros(3), torch.zeros(0)]) is None
    assert L([x, x]) == [[0], [1]]
    assert L([x[1:], x[:2], x[5:]]) == [[0], [1, 2]]
    assert L([x, torch.zeros(3), x[2], x]) == [[0, 1], [2], [3]]
    assert L([x[:, ::2], x[:, 1::2]]) == [[0], [1]]  # spans overlap: conservative, still correct
    assert L([x.t(), x[0]]) == [[0], [1]]
    neg_free = torch.zeros(6)
    assert L([neg_free[:3], neg_free[3:]]) is None


def _seq(fn, xs):
    for x in xs:
        fn(x)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_scale_and_clamp_of_aliasing_tensors_follow_list_order(backend):
    """``[x, x[3:]]`` scaled by c: x[3:] is scaled twice, as a per-tensor loop would (one launch
    over both would race). The CPU backend's fast form declines such lists (the C++ reader sees
    the overlap) and its general form runs one layer after another."""
    if backend == "cpu":
        pytest.importorskip("fastgrad._C")
    from fastgrad import dispatch

    base = torch.randn(1000, dtype=torch.float64)
    coef = torch.tensor(0.5, dtype=torch.float64)
    for make in (lambda b: [b, b[3:]], lambda b: [b[:600], b[400:], b[100:700]], lambda b: [b, b]):
        got, want = base.clone(), base.clone()
        dispatch.scale_(make(got), coef, backend=backend)
        _seq(lambda t: t.mul_(0.5), make(want))
        assert torch.equal(got, want)
        got, want = base.clone() * 4, base.clone() * 4
        dispatch.clamp_(make(got), 1.0, backend=backend)
        _seq(lambda t: t.clamp_(-1.0, 1.0), make(want))
        assert torch.equal(got, want)


def test_cpu_fast_forms_decline_aliasing_lists():
    C = pytest.importorskip("fastgrad._C")
    from fastgrad.spec import DTYPES_BY_CODE

    x = torch.ones(64)
    coef = torch.tensor(0.5, dtype=torch.float64)
    args = (torch.Tensor, DTYPES_BY_CODE, torch.strided)
    assert C.scale_list([x, x[8:]], *args, coef.data_ptr(), 1) is False
    assert C.clamp_list([x, x[8:]], *args, -0.1, 0.1, 1) is False
    assert torch.equal(x, torch.ones(64))  # nothing written
    assert C.scale_list([x[:8], x[8:]], *args, coef.data_ptr(), 1) is True
    assert torch.equal(x, torch.full((64,), 0.5))
    meta = torch.empty(6, dtype=torch.int64)
    assert C.describe_plain([x, x], *args, False, meta.data_ptr(), True) == (0, -1, 0)
    assert C.describe_plain([x, x], *args, False, meta.data_ptr())[0] == 1  # statistics may alias


def test_cuda_backend_runs_aliasing_lists_layer_by_layer(monkeypatch):
    """The CUDA backend's general scale_ launches once per layer of disjoint tensors, in order
    (checked with a stand-in for the extension: no GPU here)."""
    cuda = pytest.importorskip("fastgrad.backends.cuda")
    calls = []

    class FakeExt:
        @staticmethod
        def chunk_size():
            return 1 << 16

        @staticmethod
        def scale_(ptrs, *rest):
            calls.append(("scale", tuple(tables[ptrs])))

        @staticmethod
        def clamp_(ptrs, *rest):
            calls.append(("clamp", tuple(tables[ptrs])))

    tables = {}

    def pointers(device, ts):
        t = torch.tensor([x.data_ptr() for x in ts], dtype=torch.int64)
        tables[t.data_ptr()] = t.tolist()
        keep.append(t)
        return t

    keep = []
    monkeypatch.setattr(cuda, "_cuda", FakeExt)
    monkeypatch.setattr(cuda, "_pointers", pointers)
    monkeypatch.setattr(cuda, "_stream", lambda device: 0)
    monkeypatch.setattr(cuda, "_check_not_capturing", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    x = torch.zeros(100)
    y = torch.zeros(10)
    cuda.BACKEND.scale_([x, y, x[5:], x[:3]], torch.tensor(2.0, dtype=torch.float64))
    p = x.data_ptr()
    # layers: [x, y], then [x[5:], x[:3]] (each overlaps x only)
    assert calls == [("scale", (p, y.data_ptr())), ("scale", (p + 20, p))]
    calls.clear()
    cuda.BACKEND.clamp_([x[:50], x[50:], y], 1.0)
    assert calls == [("clamp", (p, p + 200, y.data_ptr()))]  # disjoint: one launch
