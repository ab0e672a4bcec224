"""Backend choice: one dispatch point, explicit requests raise with reasons, auto falls back."""

import pytest
import torch

import fastgrad
from fastgrad import dispatch


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="reference, cpu, triton, cuda"):
        fastgrad.grad_stats([torch.ones(2)], backend="fast")
    monkeypatch.setenv("FASTGRAD_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTGRAD_BACKEND="):
        fastgrad.grad_stats([torch.ones(2)])


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTGRAD_BACKEND", "reference")
    assert dispatch.requested_backend(None) == "reference"
    assert dispatch.requested_backend("cpu") == "cpu"  # the argument wins
    monkeypatch.setenv("FASTGRAD_BACKEND", "auto")
    assert dispatch.requested_backend(None) is None


def test_explicit_backend_that_cannot_serve_raises():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot handle"):
        fastgrad.grad_stats([torch.ones(2)], backend="cuda")


def test_auto_prefers_cpu_kernel_for_cpu_tensors():
    b = dispatch.choose(torch.device("cpu"), torch.float32, None)
    cpu_reason = fastgrad.get_backend("cpu").why_not(torch.device("cpu"), torch.float32)
    assert b.name == ("cpu" if cpu_reason is None else "reference")


def test_available_backends_reports_reasons():
    avail = fastgrad.available_backends("cpu")
    assert set(avail) == {"reference", "cpu", "triton", "cuda"}
    assert avail["reference"] is None
    assert isinstance(avail["cuda"], str)


def test_backends_agree_through_the_public_api():
    torch.manual_seed(0)
    xs = [torch.randn(1000), torch.randn(33, 7).t(), torch.randn(5, dtype=torch.bfloat16)]
    a = fastgrad.grad_stats(xs, backend="reference", norm_types=(2, 1, "inf"))
    b = fastgrad.grad_stats(xs, backend="cpu", norm_types=(2, 1, "inf"))
    assert torch.equal(a.raw.counts, b.raw.counts)
    torch.testing.assert_close(a.raw.floats, b.raw.floats, rtol=1e-12, atol=0)


def test_missing_cpu_extension_falls_back_with_one_warning(monkeypatch):
    from fastgrad.backends import cpu

    monkeypatch.setattr(cpu, "_C", None)
    monkeypatch.setattr(cpu, "LOAD_ERROR", "the C++ extension fastgrad._C is not available (simulated)")
    dispatch.choose.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="reference backend.*cpu: the C\\+\\+ extension.*simulated"):
            s = fastgrad.grad_stats([torch.ones(4)])
        assert s.total_norm.item() == 2.0
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call must not warn again
            fastgrad.grad_stats([torch.ones(4)])
        with pytest.raises(RuntimeError, match="simulated"):
            fastgrad.grad_stats([torch.ones(4)], backend="cpu")
    finally:
        dispatch.choose.cache_clear()


# -- the plain-CPU fast path (one C++ call that reads each tensor's metadata) ----------------

needs_cpu_kernel = pytest.mark.skipif(
    fastgrad.get_backend("cpu").why_not(torch.device("cpu"), torch.float32) is not None,
    reason="C++ CPU backend unavailable",
)


def _plain_inputs():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(n, generator=g).to(dt) for n, dt in
            [(1000, torch.float32), (70_000, torch.bfloat16), (3, torch.float16), (0, torch.float32),
             (129, torch.float64)]] + [torch.tensor([0.0, float("nan"), float("inf"), -1e-40])]


@needs_cpu_kernel
@pytest.mark.parametrize("with_nonfinite", [False, True])
def test_plain_fast_path_equals_general_path_bitwise(with_nonfinite):
    ts = _plain_inputs() if with_nonfinite else _plain_inputs()[:-1]
    spec = fastgrad.spec.make_spec((2, 1, "inf", 3), True)
    cpu = fastgrad.get_backend("cpu")
    (raw, numel, total), mask = cpu.stats_plain(ts, spec)
    dtypes = fastgrad.spec.dtypes_of_mask(mask)
    general = cpu.stats(ts, spec).raw
    assert torch.equal(raw.floats.isnan(), general.floats.isnan())
    assert torch.equal(raw.floats.nan_to_num(), general.floats.nan_to_num())
    assert torch.equal(raw.counts, general.counts)
    assert numel.tolist() == [t.numel() for t in ts] + [sum(t.numel() for t in ts)]
    # the C++ total row against the general path's aggregation (torch ops)
    want = fastgrad.aggregate.aggregate(general, spec, fastgrad.aggregate.TOTAL)
    assert torch.equal(total.counts, want.counts)
    assert torch.equal(total.floats.isnan(), want.floats.isnan())
    torch.testing.assert_close(total.floats, want.floats, rtol=1e-15, atol=0, equal_nan=True)
    assert dtypes == [torch.float32, torch.float64, torch.float16, torch.bfloat16]  # code order
    assert total.floats[0, 0].isnan() == with_nonfinite


@needs_cpu_kernel
def test_plain_fast_path_is_what_grad_stats_takes(monkeypatch):
    def general(*a, **k):
        raise AssertionError("general path taken")

    monkeypatch.setattr(dispatch, "_route", general)
    monkeypatch.setattr(dispatch, "check_grads", general)
    st = fastgrad.grad_stats(_plain_inputs()[:3])
    assert st.numel.tolist() == [1000, 70_000, 3]


class _Sub(torch.Tensor):
    """A tensor subclass: its attributes may be overridden, so the plain reader must decline it."""


@needs_cpu_kernel
@pytest.mark.parametrize("case", ["non_contiguous", "int_dtype", "subclass", "meta", "sparse"])
def test_plain_fast_path_declines_anything_else(case):
    ts = _plain_inputs()[:2]
    odd = {
        "non_contiguous": lambda: torch.randn(6, 4).t(),
        "int_dtype": lambda: torch.ones(3, dtype=torch.int32),
        # a real subclass (exact Parameters are plain for the read-only paths: the reader takes them)
        "subclass": lambda: _Sub(torch.randn(3)),
        "meta": lambda: torch.empty(3, device="meta"),
        "sparse": lambda: torch.randn(4, 4).to_sparse(),
    }[case]()
    spec = fastgrad.spec.make_spec((2,), True)
    assert fastgrad.get_backend("cpu").stats_plain(ts + [odd], spec) is None


@needs_cpu_kernel
def test_plain_fast_path_respects_backend_choice(monkeypatch):
    spec = fastgrad.spec.make_spec((2,), True)
    ts = _plain_inputs()[:1]
    taken = []
    cpu = fastgrad.get_backend("cpu")
    real = cpu.stats_plain
    monkeypatch.setattr(cpu, "stats_plain", lambda *a: taken.append(1) or real(*a))
    dispatch.compute(ts, spec, "reference")
    assert taken == []
    monkeypatch.setenv("FASTGRAD_BACKEND", "reference")
    dispatch.compute(ts, spec)
    assert taken == []
    dispatch.compute(ts, spec, "cpu")  # the argument wins
    assert taken == [1]


def test_bad_input_still_gets_the_general_error_messages():
    with pytest.raises(TypeError, match="non-floating dtype torch.int32"):
        fastgrad.grad_stats([torch.ones(2), torch.ones(3, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match="layout torch.sparse_coo"):
        fastgrad.grad_stats([torch.ones(2), torch.randn(4, 4).to_sparse()])


@needs_cpu_kernel
@pytest.mark.parametrize("op", ["scale", "clamp"])
def test_plain_fast_path_for_in_place_ops(monkeypatch, op):
    ts = [t for t in _plain_inputs() if t.numel()]
    want = [t.clone() for t in ts]
    cpu = fastgrad.get_backend("cpu")  # the general path's call into the same kernels
    if op == "scale":
        cpu.scale_(want, torch.tensor(0.3, dtype=torch.float64))
    else:
        cpu.clamp_(want, 0.5)
    assert not all(torch.equal(w, t) for w, t in zip(want, ts))
    monkeypatch.setattr(dispatch, "_route", lambda *a: (_ for _ in ()).throw(AssertionError("general path")))
    if op == "scale":
        dispatch.scale_(ts, torch.tensor(0.3, dtype=torch.float64))
    else:
        dispatch.clamp_(ts, 0.5)
    for got, w in zip(ts, want):
        assert torch.equal(got.nan_to_num(), w.nan_to_num()) and torch.equal(got.isnan(), w.isnan())


@needs_cpu_kernel
def test_plain_fast_path_in_place_declines_without_writing():
    cpu = fastgrad.get_backend("cpu")
    ts = [torch.ones(5), torch.ones(6, 4).t()]  # the second is not contiguous
    assert not cpu.scale_plain_(ts, torch.tensor(0.5, dtype=torch.float64))
    assert not cpu.clamp_plain_(ts, 0.25)
    assert all(torch.equal(t, torch.ones_like(t)) for t in ts)
    dispatch.scale_(ts, torch.tensor(0.5, dtype=torch.float64))  # the general path handles it
    assert all(torch.equal(t, torch.full_like(t, 0.5)) for t in ts)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_full_stats_total_row_equals_aggregation(backend):
    """Every backend makes the total row; it equals the aggregation of its rows, and element counts
    come with their sum."""
    ts = _plain_inputs() + [torch.randn(8, 6).t(), torch.randn(10)[::3].to(torch.bfloat16)]  # views too
    spec = fastgrad.spec.make_spec((2, 1, 3, "inf"), True)
    b = fastgrad.get_backend(backend)
    if b.why_not(torch.device("cpu"), torch.float32) is not None:
        pytest.skip(b.why_not(torch.device("cpu"), torch.float32))
    (raw, numel, total), _ = dispatch.compute(ts, spec, backend)
    assert torch.equal(raw.counts, b.stats(ts, spec).raw.counts)
    assert numel.tolist() == [t.numel() for t in ts] + [sum(t.numel() for t in ts)]
    want = fastgrad.aggregate.aggregate(raw, spec, fastgrad.aggregate.TOTAL)
    assert torch.equal(total.counts, want.counts)
    torch.testing.assert_close(total.floats, want.floats, rtol=1e-15, atol=0, equal_nan=True)
    st = fastgrad.grad_stats(ts, backend=backend, norm_types=(2, 1, 3, "inf"))  # the general path uses it
    assert torch.equal(st.total.raw.floats.nan_to_num(), total.floats.nan_to_num())


@pytest.mark.parametrize("kind", ["negated_view", "zero_tensor"])
def test_tensors_whose_memory_does_not_hold_their_values(kind):
    """A negated view's memory holds -x; a forward-mode AD zero tensor has no memory at all. The
    fast path declines them, the general path reads their values, in-place ops stay correct."""
    x = torch.tensor([1.0, -float("inf"), 0.5, -2.0, 3.0])
    odd = torch._neg_view(x) if kind == "negated_view" else torch._efficientzerotensor(5)
    values = odd.clone()  # a plain tensor with the same values
    spec = fastgrad.spec.make_spec((2, "inf"), True)
    assert fastgrad.get_backend("cpu").stats_plain([x, odd], spec) is None
    st, want = fastgrad.grad_stats([x, odd]), fastgrad.grad_stats([x, values], backend="reference")
    assert torch.equal(st.raw.counts, want.raw.counts)
    torch.testing.assert_close(st.raw.floats, want.raw.floats, rtol=1e-12, atol=0)
    dispatch.scale_([odd], torch.tensor(0.5, dtype=torch.float64))
    dispatch.clamp_([odd], 1.0)
    torch.testing.assert_close(odd.clone(), values.mul(0.5).clamp(-1, 1))


@needs_cpu_kernel
def test_describe_plain_reads_pointers_sizes_and_dtypes():
    from fastgrad.backends.cpu import DTYPES_BY_CODE, _C

    ts = _plain_inputs()
    T = len(ts)
    meta = torch.empty(3 * T, dtype=torch.int64)
    mask, dev, h = _C.describe_plain(ts, torch.Tensor, DTYPES_BY_CODE, torch.strided, False, meta.data_ptr())
    assert meta[:T].tolist() == [t.data_ptr() for t in ts]
    assert meta[T : 2 * T].tolist() == [t.numel() for t in ts]
    assert meta[2 * T :].tolist() == [DTYPES_BY_CODE.index(t.dtype) for t in ts]
    assert mask == 0b1111 and dev == -1
    # the hash keys plans: same sizes and dtypes, same hash; another size, another hash
    same = [torch.empty_like(t) for t in ts]
    other = ts[:-1] + [torch.empty(5)]

    def hash_of(xs):
        buf = torch.empty(3 * len(xs), dtype=torch.int64)  # alive until the call returns
        return _C.describe_plain(xs, torch.Tensor, DTYPES_BY_CODE, torch.strided, False, buf.data_ptr())[2]

    assert hash_of(same) == h != hash_of(other)
    # cuda=True takes only CUDA tensors (all on one device)
    assert _C.describe_plain(ts, torch.Tensor, DTYPES_BY_CODE, torch.strided, True, meta.data_ptr()) == (0, -1, 0)


def test_cuda_plan_cache_checks_what_the_hash_says(monkeypatch):
    """The CUDA backend finds plans by a hash of sizes and dtypes, then compares the full key:
    a colliding hash must not return another parameter set's plan (checked on CPU tensors)."""
    cuda = pytest.importorskip("fastgrad.backends.cuda")
    if cuda._cuda is None:
        pytest.skip("fastgrad._cuda not built")
    monkeypatch.setattr(cuda, "_stream", lambda device: 0)  # plans are cached per stream
    cpu = torch.device("cpu")
    meta_a = torch.tensor([0, 0, 70_000, 3, 0, 3])  # pointers, numels, dtype codes (T = 2)
    meta_b = torch.tensor([0, 0, 70_000, 4, 0, 3])
    a = cuda._plan_from_meta(cpu, meta_a, 2, key_hash=12345)
    assert cuda._plan_from_meta(cpu, meta_a.clone(), 2, key_hash=12345) is a
    b = cuda._plan_from_meta(cpu, meta_b, 2, key_hash=12345)  # same hash, other sizes
    assert b is not a and b.numels.tolist() == [70_000, 4]
    assert a.num_items == 3 and a.item_tensor.tolist() == [0, 0, 1] and a.item_begin.tolist() == [0, 65536, 0]
    assert a.numels_and_total.tolist() == [70_000, 3, 70_003] and a.dtypes.tolist() == [0, 3]
    monkeypatch.setattr(cuda, "_stream", lambda device: 7)  # another stream: its own plan
    assert cuda._plan_from_meta(cpu, meta_a, 2, key_hash=12345) is not a
