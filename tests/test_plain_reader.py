"""The C++ plain-tensor reader (csrc/common/plain_reader.h) and the one-read clipping path.

What the reader may take, and what it must leave to the general path:
* attributes are read through the C functions of torch's descriptors; a replaced
  ``torch.Tensor`` attribute or an attribute set on the instance takes the generic lookup;
* negated views (``torch._neg_view``) are read as their memory holds them only by callers whose
  results do not see signs (norms, NaN counts) or whose ops commute with negation (scale, clamp
  to ``[-v, v]``); the full statistics tables (signed +Inf / -Inf counts) decline them;
* ``clip_grad_norm_`` reads the gradient list once: the norm pass keeps the metadata, the
  scale uses it, only for the very objects read, in list order where they share memory.
"""

import gc
import math
import weakref

import pytest
import torch

import fastgrad
from fastgrad import dispatch
from fastgrad.backends import cpu as cpu_backend
from fastgrad.backends import get_backend
from fastgrad.reference import stats_reference
from fastgrad.spec import DTYPES_BY_CODE, NAN, NEGINF, POSINF, make_spec

from conftest import assert_raw_close

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(
    CPU.why_not(torch.device("cpu"), torch.float32) is not None,
    reason=f"C++ CPU backend unavailable: {CPU.why_not(torch.device('cpu'), torch.float32)}",
)
_C = cpu_backend._C


def _describe(ts, types=torch.Tensor, signed=True, disjoint=False, mod=None):
    buf = torch.empty(3 * max(1, len(ts)), dtype=torch.int64)
    mask, _, _ = (mod or _C).describe_plain(ts, types, DTYPES_BY_CODE, torch.strided, False, buf.data_ptr(), disjoint,
                                   signed)
    T = len(ts)
    return mask, buf[:T].tolist(), buf[T:2 * T].tolist(), buf[2 * T:3 * T].tolist()


def _mixed():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(5, generator=g), torch.randn(3, 4, generator=g).double(),
            torch.randn(7, generator=g).half(), torch.randn(2, 2, 2, generator=g).bfloat16(),
            torch.empty(0), torch.tensor(3.0)]


def test_reads_pointers_counts_and_codes_of_every_dtype():
    ts = _mixed()
    mask, ptrs, numels, codes = _describe(ts)
    assert mask == 0b1111
    assert ptrs == [t.data_ptr() for t in ts]
    assert numels == [t.numel() for t in ts]
    assert codes == [DTYPES_BY_CODE.index(t.dtype) for t in ts]


@pytest.mark.parametrize("case", ["non_contiguous", "int_dtype", "subclass", "meta", "sparse", "csr",
                                  "mkldnn", "zero_tensor", "complex", "not_a_tensor"])
def test_declines_anything_else(case):
    class Sub(torch.Tensor):
        pass

    odd = {
        "non_contiguous": lambda: torch.randn(6, 4).t(),
        "int_dtype": lambda: torch.ones(3, dtype=torch.int32),
        "subclass": lambda: torch.randn(3).as_subclass(Sub),
        "meta": lambda: torch.empty(3, device="meta"),
        "sparse": lambda: torch.randn(4, 4).to_sparse(),
        "csr": lambda: torch.randn(4, 4).to_sparse_csr(),
        "mkldnn": lambda: torch.randn(4, 4).to_mkldnn(),
        "zero_tensor": lambda: torch._efficientzerotensor(5),
        "complex": lambda: torch.randn(3, dtype=torch.complex64),
        "not_a_tensor": lambda: 1.0,
    }[case]()
    for signed in (True, False):
        assert _describe(_mixed() + [odd], signed=signed)[0] == 0, (case, signed)
    # and the in-place forms touch nothing
    assert _C.scale_list([torch.ones(3), odd], torch.Tensor, DTYPES_BY_CODE, torch.strided,
                         torch.tensor(2.0, dtype=torch.float64).data_ptr(), 1) is False


def test_the_cuda_module_reads_as_the_cpu_module():
    """fastgrad._cuda compiles its own copy of the reader (header-only): same answers (on CPU
    tensors with cuda=False; cuda=True declines them)."""
    try:
        from fastgrad import _cuda
    except ImportError as e:
        pytest.skip(f"fastgrad._cuda not built here ({e})")
    x = torch.tensor([1.0, -2.0])
    cases = [(_mixed(), torch.Tensor, True), ([x, torch._neg_view(x)], torch.Tensor, False),
             ([x, torch._neg_view(x)], torch.Tensor, True),
             ([x, torch.nn.Parameter(torch.randn(3))], (torch.Tensor, torch.nn.Parameter), True),
             ([x, torch.nn.Parameter(torch.randn(3))], torch.Tensor, True)]
    for ts, types, signed in cases:
        got, want = _describe(ts, types, signed, mod=_cuda), _describe(ts, types, signed)
        assert got[0] == want[0] and (not want[0] or got == want)  # (a declined call writes nothing)
    buf = torch.empty(6, dtype=torch.int64)
    assert _cuda.describe_plain([x], torch.Tensor, DTYPES_BY_CODE, torch.strided, True, buf.data_ptr()) == (0, -1, 0)


def test_parameters_only_where_the_caller_accepts_them():
    ps = [torch.nn.Parameter(t) for t in _mixed()[:4]]
    assert _describe(ps)[0] == 0  # torch.Tensor only: a Parameter is another type
    mask, ptrs, numels, _ = _describe(ps, types=(torch.Tensor, torch.nn.Parameter))
    assert mask == 0b1111 and ptrs == [p.data_ptr() for p in ps] and numels == [p.numel() for p in ps]


def test_negated_views_only_for_sign_blind_callers():
    x = torch.tensor([1.0, -math.inf, 0.5, -2.0, math.nan, 0.0])
    neg = torch._neg_view(x)
    assert neg.is_neg()
    assert _describe([x, neg], signed=True)[0] == 0
    mask, ptrs, _, _ = _describe([x, neg], signed=False)
    assert mask == 1 and ptrs == [x.data_ptr(), neg.data_ptr()]
    # the full tables (signed +Inf / -Inf counts) decline it, and the general path gets the signs right
    spec = make_spec((2, 1, "inf"), True)
    assert CPU.stats_plain([x, neg], spec) is None
    st = fastgrad.grad_stats([x, neg], norm_types=(2, 1, "inf"))
    want = stats_reference([x, neg.resolve_neg()], spec)
    assert_raw_close(st.raw, want)
    assert st.raw.counts[1, POSINF] == 1 and st.raw.counts[1, NEGINF] == 0 and st.raw.counts[1, NAN] == 1


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf])
def test_norm_of_negated_views_from_the_fast_form(p, monkeypatch):
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(33, generator=g), torch.randn(8, generator=g).double(), torch.randn(9, generator=g).half()]
    ts = [torch._neg_view(t) if i % 2 == 0 else t for i, t in enumerate(base)]
    calls = []
    real = CPU.total_norm_plain
    monkeypatch.setattr(CPU, "total_norm_plain", lambda *a: calls.append(real(*a)) or calls[-1])
    got = fastgrad.get_total_norm(ts, p)
    assert calls and calls[0] is not None  # the fast form took the negated views
    resolved = [t.resolve_neg() for t in ts]
    ref = torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in resolved]), p)
    assert got.dtype == torch.float64  # promoted dtype of float32, float64, float16
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    # torch rounds each tensor's norm to its dtype (float16 here): its own tolerance
    torch.testing.assert_close(got, torch.nn.utils.get_total_norm(resolved, p).double(), rtol=1e-3, atol=0)
    # a NaN in a negated view: NaN inf-norm, as torch
    if p == math.inf:
        y = torch.tensor([1.0, math.nan])
        assert fastgrad.get_total_norm([torch._neg_view(y)], p).isnan()


def test_scale_and_clamp_of_negated_views_in_place():
    x = torch.tensor([1.0, -math.inf, 0.5, -2.0, math.nan, 3.0, -0.0])
    y = torch.randn(11, dtype=torch.float64)
    nx, ny = torch._neg_view(x), torch._neg_view(y)
    want_x, want_y = nx.clone(), ny.clone()
    dispatch.scale_([nx, ny], 0.25)
    assert _C.scale_list([nx, ny], torch.Tensor, DTYPES_BY_CODE, torch.strided,
                         torch.tensor(1.0, dtype=torch.float64).data_ptr(), 1)  # (coef 1: taken, nothing read)
    torch.testing.assert_close(nx.clone(), want_x * 0.25, equal_nan=True)
    torch.testing.assert_close(ny.clone(), want_y * 0.25)
    assert nx.is_neg()
    ok = _C.clamp_list([nx, ny], torch.Tensor, DTYPES_BY_CODE, torch.strided, -0.3, 0.3, 1)
    assert ok  # symmetric bounds: the fast form takes negated views
    torch.testing.assert_close(nx.clone(), (want_x * 0.25).clamp(-0.3, 0.3), equal_nan=True)
    torch.testing.assert_close(ny.clone(), (want_y * 0.25).clamp(-0.3, 0.3))
    # asymmetric bounds would not commute with negation: declined, nothing written
    before = nx.clone()
    assert not _C.clamp_list([nx], torch.Tensor, DTYPES_BY_CODE, torch.strided, -0.1, 0.3, 1)
    torch.testing.assert_close(nx.clone(), before, equal_nan=True)


@pytest.mark.parametrize("scaling", [True, False])
def test_clip_of_negated_views_matches_torch(scaling):
    g = torch.Generator().manual_seed(3)
    vals = [torch.randn(17, generator=g), torch.randn(4, 4, generator=g)]
    ours, theirs = [], []
    for v in vals:
        p, q = torch.nn.Parameter(torch.zeros_like(v)), torch.nn.Parameter(torch.zeros_like(v))
        p.grad, q.grad = torch._neg_view(v.clone()), -v.clone()
        ours.append(p)
        theirs.append(q)
    max_norm = 0.5 if scaling else 1e6
    got = fastgrad.clip_grad_norm_(ours, max_norm)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for p, q in zip(ours, theirs):
        assert p.grad.is_neg()
        torch.testing.assert_close(p.grad.clone(), q.grad, rtol=1e-6, atol=0)
    fastgrad.clip_grad_value_(ours, 0.1)
    torch.nn.utils.clip_grad_value_(theirs, 0.1)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad.clone(), q.grad, rtol=1e-6, atol=0)


def test_a_replaced_tensor_attribute_takes_the_generic_lookup(monkeypatch):
    """Someone patched torch.Tensor: the reader sees the patch, as attribute access would."""
    ts = [torch.randn(4), torch.randn(5)]
    calls = []
    real = torch.Tensor.data_ptr
    monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: calls.append(1) or real(self))
    mask, ptrs, _, _ = _describe(ts)
    assert mask == 1 and ptrs == [t.data_ptr() for t in ts] and len(calls) >= 2
    monkeypatch.setattr(torch.Tensor, "is_contiguous", lambda self, memory_format=None: False)
    assert _describe(ts)[0] == 0  # the patched answer is honoured: not plain
    monkeypatch.undo()
    monkeypatch.setattr(torch.Tensor, "dtype", property(lambda self: torch.int64))
    assert _describe(ts)[0] == 0


def test_an_instance_attribute_shadowing_a_method_is_honoured():
    ts = [torch.randn(4), torch.randn(5)]
    ts[1].is_contiguous = lambda memory_format=None: False  # shadows the method, as t.is_contiguous() does
    assert ts[1].is_contiguous() is False
    assert _describe(ts)[0] == 0
    del ts[1].is_contiguous
    ts[1].some_tag = "x"  # other instance attributes change nothing
    assert _describe(ts)[0] == 1


def test_torch_function_mode_sees_the_reads():
    """A TorchFunctionMode intercepts attribute reads (torch's getters call it): the reader
    calls the same C functions, so the mode still sees them and may decline the fast form."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Lie(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            out = func(*args, **(kwargs or {}))
            return False if seen[-1] == "is_contiguous" else out

    ts = [torch.randn(4)]
    with Lie():
        assert _describe(ts)[0] == 0
    assert "is_contiguous" in seen
    assert _describe(ts)[0] == 1


# -- clip_grad_norm_: one read of the list ------------------------------------------------------

def _params(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(6, dtype=dtype, generator=g)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(6, generator=g).to(dtype) * 3
    return ps


def test_clip_reads_the_gradients_once_and_scales_from_the_kept_metadata(monkeypatch):
    ps, ref = _params(40), _params(40)
    scaled = []
    real_meta = _C.scale_meta

    class Spy:
        def __getattr__(self, name):
            if name == "scale_list":
                raise AssertionError("the scale read the list again")
            if name == "scale_meta":
                return lambda *a: scaled.append(real_meta(*a)) or scaled[-1]
            return getattr(_C, name)

    monkeypatch.setattr(cpu_backend, "_C", Spy())
    got = fastgrad.clip_grad_norm_(ps, 1.0)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert scaled == [True]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    # nothing kept after the call: no gradient is held
    assert getattr(cpu_backend._local, "kept", None) is None and not cpu_backend._local.keeping


def test_clip_keeps_no_reference_to_the_gradients():
    ps = _params(3)
    ref = weakref.ref(ps[0].grad)
    fastgrad.clip_grad_norm_(ps, 1e-3)
    for p in ps:
        p.grad = None
    gc.collect()
    assert ref() is None


def test_clip_with_shared_memory_keeps_list_order():
    """[x, x] (one gradient twice, as torch's clip tests do) is scaled twice, as torch's loop."""
    x = torch.randn(10)
    ours = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 10, 5)]
    theirs = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 10, 5)]
    ours[0].grad = ours[1].grad = x.clone()
    ours[2].grad = ours[0].grad[2:7]  # overlapping view (plain: contiguous)
    theirs[0].grad = theirs[1].grad = x.clone()
    theirs[2].grad = theirs[0].grad[2:7]
    got = fastgrad.clip_grad_norm_(ours, 0.5)
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.5, foreach=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[0].grad, theirs[0].grad, rtol=1e-6, atol=0)


def test_scale_meta_takes_only_the_objects_it_read():
    a, b = torch.randn(4), torch.randn(4)
    meta = torch.empty(6, dtype=torch.int64)
    coef = torch.tensor(2.0, dtype=torch.float64)
    floats, counts, numel = torch.empty(6, dtype=torch.float64), torch.empty(12, dtype=torch.int64), torch.empty(3, dtype=torch.int64)
    assert _C.grad_stats_list([a, b], torch.Tensor, DTYPES_BY_CODE, torch.strided, [2.0], False, 0, 1,
                              floats.data_ptr(), counts.data_ptr(), numel.data_ptr(), 1, False, meta.data_ptr())
    assert meta.tolist() == [a.data_ptr(), b.data_ptr(), 4, 4, 0, 0]
    a0, b0 = a.clone(), b.clone()
    for wrong in ([b, a], [a], [a, b, a], [a, a.clone()]):
        assert _C.scale_meta(wrong, (a, b), meta.data_ptr(), coef.data_ptr(), 1) is False
    torch.testing.assert_close(a, a0) and torch.testing.assert_close(b, b0)
    assert _C.scale_meta([a, b], (a, b), meta.data_ptr(), coef.data_ptr(), 1) is True
    torch.testing.assert_close(a, a0 * 2)
    torch.testing.assert_close(b, b0 * 2)


def test_clip_error_if_nonfinite_writes_nothing():
    ps = _params(5)
    ps[3].grad[2] = math.inf
    before = [p.grad.clone() for p in ps]
    with pytest.raises(RuntimeError, match="non-finite"):
        fastgrad.clip_grad_norm_(ps, 1e-3, error_if_nonfinite=True)
    for p, b in zip(ps, before):
        assert torch.equal(p.grad, b)
    assert getattr(cpu_backend._local, "kept", None) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_clip_one_read_matches_torch_per_dtype(dtype):
    ps, ref = _params(9, seed=5, dtype=dtype), _params(9, seed=5, dtype=dtype)
    got = fastgrad.clip_grad_norm_(ps, 0.7)
    want = torch.nn.utils.clip_grad_norm_(ref, 0.7)
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=0)


# -- grad_stats(params=True): weights read as the Parameters they are --------------------------

def _weights(n=6, seed=11):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(3 + i, generator=g).to(dt))
          for i, dt in zip(range(n), [torch.float32, torch.float64, torch.float16, torch.bfloat16] * 4)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    return ps


@pytest.mark.parametrize("form", ["list", "pairs", "module"])
def test_params_true_passes_the_parameters_without_detach(form, monkeypatch):
    from fastgrad.collect import collect

    ps = _weights()
    ps[2].grad = None  # skipped, with its weight
    if form == "module":
        obj = torch.nn.Module()
        for i, p in enumerate(ps):
            obj.register_parameter(f"w{i}", p)
    else:
        obj = [(f"w{i}", p) for i, p in enumerate(ps)] if form == "pairs" else ps
    monkeypatch.setattr(torch.Tensor, "detach", lambda self: pytest.fail("a weight was detached"))
    col = collect(obj, with_params=True)
    monkeypatch.undo()
    kept = [p for p in ps if p.grad is not None]
    assert all(w is p for w, p in zip(col.params, kept)) and len(col.params) == len(kept)
    assert all(g is p.grad for g, p in zip(col.grads, kept))
    want_names = ["[0]", "[1]", "[3]", "[4]", "[5]"] if form == "list" else ["w0", "w1", "w3", "w4", "w5"]
    assert col.names == want_names
    # the general collector gives the same (names, gradients, weight values)
    from fastgrad.collect import _collect_items
    items = list(obj.named_parameters()) if form == "module" else list(obj)
    slow = _collect_items(items, [f"[{i}]" for i in range(len(items))], with_params=True)
    assert slow.names == col.names and all(a is b for a, b in zip(slow.grads, col.grads))
    assert all(a.data_ptr() == b.data_ptr() and not a.requires_grad for a, b in zip(slow.params, col.params))


def test_params_true_weights_take_the_fast_form_and_match_the_reference(monkeypatch):
    ps = _weights()
    taken = []
    real = CPU.stats_plain
    monkeypatch.setattr(CPU, "stats_plain", lambda ts, spec: taken.append(real(ts, spec)) or taken[-1])
    st = fastgrad.grad_stats(ps, params=True, norm_types=(2, 1, "inf"))
    assert len(taken) == 1 and taken[0] is not None  # one call over grads + Parameters, the fast form
    spec = make_spec((2, 1, "inf"), True)
    assert_raw_close(st.params.raw, stats_reference([p.detach() for p in ps], spec))
    assert_raw_close(st.raw, stats_reference([p.grad for p in ps], spec))
    assert not st.param_norms.requires_grad and not st.grad_param_ratio.requires_grad
    want_ratio = torch.tensor([float(p.grad.double().norm() / p.detach().double().norm()) for p in ps],
                              dtype=torch.float64)
    torch.testing.assert_close(st.grad_param_ratio, want_ratio, rtol=1e-6, atol=0)


def test_params_true_general_path_with_parameters_records_no_history():
    """Weights the fast form declines (a transposed weight) reach the general path as Parameters:
    the results hold no autograd history, whatever the backend."""
    w = torch.nn.Parameter(torch.randn(5, 6).t())
    w.grad = torch.randn(6, 5)
    v = torch.nn.Parameter(torch.randn(4))
    v.grad = torch.randn(4)
    for backend in ("cpu", "reference"):
        st = fastgrad.grad_stats([w, v], params=True, backend=backend)
        assert not st.params.raw.floats.requires_grad and not st.param_norms.requires_grad
        torch.testing.assert_close(st.param_norms, torch.stack([w.detach().double().norm(), v.detach().double().norm()]),
                                   rtol=1e-6, atol=0)
