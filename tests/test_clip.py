"""Drop-in clipping: same results as torch.nn.utils (>= 2.6), better accuracy, clear errors, no partial writes."""

import copy
import math
import warnings

import pytest
import torch

import fastgrad
from fastgrad.reference import tensor_norm_reference

from conftest import make_tensor

BACKENDS = ["reference", "cpu"]
DTYPE_TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def params_with_grads(dtype=torch.float32, scale=1.0, seed=0):
    shapes = [(64, 32), (32,), (7, 5, 3), (1,), (300,)]
    ps = []
    for i, sh in enumerate(shapes):
        p = torch.nn.Parameter(torch.zeros(sh, dtype=dtype))
        n = math.prod(sh)
        p.grad = (make_tensor(n, torch.float64, seed=seed + i) * scale).to(dtype).reshape(sh)
        ps.append(p)
    return ps


def clone_params(ps):
    out = copy.deepcopy(ps)
    for a, b in zip(out, ps):
        a.grad = b.grad.clone()
    return out


def exact_total(ps, p):
    flat = torch.cat([q.grad.double().flatten() for q in ps])
    return tensor_norm_reference(flat, p).item() if math.isfinite(p) else flat.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clip_grad_norm_matches_torch(backend, dtype, norm_type, max_norm):
    ps = params_with_grads(dtype)
    ours, theirs = clone_params(ps), clone_params(ps)
    n_ours = fastgrad.clip_grad_norm_(ours, max_norm, norm_type, backend=backend)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    tol = DTYPE_TOL[dtype]
    assert n_ours.dtype == n_theirs.dtype and n_ours.device == n_theirs.device and n_ours.dim() == 0
    assert n_ours.item() == pytest.approx(n_theirs.item(), rel=tol)
    # ours is the float64 value rounded once to the dtype: at most half an ulp off
    exact = exact_total(ps, norm_type)
    assert abs(n_ours.item() - exact) <= max(0.5 * torch.finfo(dtype).eps, 1e-13) * exact * 1.0001
    coef = min(max_norm / (exact + 1e-6), 1.0)
    eps = torch.finfo(dtype).eps
    for a, b, p in zip(ours, theirs, ps):
        # one rounding of g * coef (in float) from the exact coefficient ...
        want = (p.grad.double() * coef).to(dtype)
        torch.testing.assert_close(a.grad, want, rtol=max(eps, 1e-12), atol=0)
        # ... and torch's answer up to its own rounding of the norm to the dtype
        tol2 = max(2 * eps, 1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=tol2, atol=tol2 * b.grad.abs().max().item())
    if max_norm == 1e9:  # coefficient 1: untouched, bit for bit
        for a, b in zip(ours, ps):
            assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_total_norm_and_clip_grads_with_norm(backend):
    ps = params_with_grads()
    grads = [p.grad for p in ps]
    t_ours = fastgrad.get_total_norm(grads, 2.0, backend=backend)
    t_theirs = torch.nn.utils.get_total_norm(grads, 2.0)
    assert t_ours.item() == pytest.approx(t_theirs.item(), rel=1e-6)
    ours, theirs = clone_params(ps), clone_params(ps)
    fastgrad.clip_grads_with_norm_(ours, 1.0, t_ours, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, t_theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    # a single tensor, mixed dtypes promote like torch, empty -> tensor(0.)
    assert fastgrad.get_total_norm(torch.ones(4)).item() == 2.0
    mixed = fastgrad.get_total_norm([torch.ones(3, dtype=torch.bfloat16), torch.ones(1)])
    assert mixed.dtype == torch.nn.utils.get_total_norm([torch.ones(3, dtype=torch.bfloat16), torch.ones(1)]).dtype
    assert mixed.item() == 2.0
    empty = fastgrad.get_total_norm([])
    assert empty.item() == 0.0 and empty.dtype == torch.float32


def test_tensor_max_norm():
    ps = params_with_grads()
    ours, theirs = clone_params(ps), clone_params(ps)
    fastgrad.clip_grad_norm_(ours, torch.tensor(0.25))
    torch.nn.utils.clip_grad_norm_(theirs, torch.tensor(0.25))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_bf16_norm_is_more_accurate_than_torch():
    ps = params_with_grads(torch.bfloat16, seed=5)
    exact = exact_total(ps, 2.0)
    ours = fastgrad.clip_grad_norm_(clone_params(ps), 1e9).item()
    assert abs(ours - exact) <= 0.5 * torch.finfo(torch.bfloat16).eps * exact


def test_float32_huge_values_do_not_overflow():
    # torch's float32 foreach norm overflows to inf here and then zeroes every gradient
    ps = params_with_grads(torch.float32, scale=1e25)
    exact = exact_total(ps, 2.0)
    ours = clone_params(ps)
    n = fastgrad.clip_grad_norm_(ours, 1.0)
    assert n.item() == pytest.approx(exact, rel=1e-6)
    clipped = math.sqrt(sum(q.grad.double().square().sum().item() for q in ours))
    assert clipped == pytest.approx(1.0, rel=1e-5)


def test_drop_in_replacement_over_training_steps(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    twin = copy.deepcopy(model)
    data = [(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(10)]

    def train(m, clip):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        norms = []
        for x, y in data:
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            norms.append(clip(m.parameters(), 0.5).item())
            opt.step()
        return norms

    want = train(twin, torch.nn.utils.clip_grad_norm_)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", fastgrad.clip_grad_norm_)
    got = train(model, torch.nn.utils.clip_grad_norm_)
    assert got == pytest.approx(want, rel=1e-5)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_if_nonfinite_names_culprits_and_changes_nothing(backend):
    ps = params_with_grads()
    ps[2].grad[0, 0, 0] = float("nan")
    ps[4].grad[7] = float("-inf")
    before = [p.grad.clone() for p in ps]
    with pytest.raises(RuntimeError, match=r"non-finite.*\[2\] \(1 NaN.*\[4\] \(0 NaN, 0 \+Inf, 1 -Inf\)"):
        fastgrad.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True, backend=backend)
    for p, b in zip(ps, before):
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())
    with pytest.raises(RuntimeError, match="non-finite"):
        fastgrad.get_total_norm([p.grad for p in ps], error_if_nonfinite=True, backend=backend)
    # without the flag: like torch, the norm is nan and the gradients become nan
    n = fastgrad.clip_grad_norm_(ps, 1.0, backend=backend)
    assert math.isnan(n.item())


@pytest.mark.parametrize("bad", [-1.0, float("nan"), torch.tensor(-2.0)])
def test_bad_max_norm_changes_nothing(bad):
    ps = params_with_grads()
    before = [p.grad.clone() for p in ps]
    with pytest.raises(ValueError, match="max_norm"):
        fastgrad.clip_grad_norm_(ps, bad)
    with pytest.raises(ValueError, match="max_norm"):
        fastgrad.clip_grads_with_norm_(ps, bad, torch.tensor(1.0))
    for p, b in zip(ps, before):
        assert torch.equal(p.grad, b)


@pytest.mark.parametrize("bad", [float("nan")])  # p <= 0 is accepted as torch does (test_torch_semantics.py)
def test_bad_norm_type(bad):
    ps = params_with_grads()
    with pytest.raises(ValueError, match="norm_type"):
        fastgrad.clip_grad_norm_(ps, 1.0, norm_type=bad)
    with pytest.raises(ValueError, match="norm_type"):
        fastgrad.get_total_norm([p.grad for p in ps], norm_type=bad)


def test_norm_type_string_inf():
    ps = params_with_grads()
    assert fastgrad.clip_grad_norm_(clone_params(ps), 1e9, "inf").item() == pytest.approx(
        exact_total(ps, math.inf), rel=1e-7)


def test_bad_gradient_dtype_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    p.grad = torch.ones(3, dtype=torch.complex64)
    q = torch.nn.Parameter(torch.ones(3))
    q.grad = torch.full((3,), 10.0)
    with pytest.raises(TypeError, match="complex"):
        fastgrad.clip_grad_norm_([q, p], 1.0)
    assert torch.equal(q.grad, torch.full((3,), 10.0))


def test_no_grads_and_empty_generator():
    p = torch.nn.Parameter(torch.ones(3))
    assert fastgrad.clip_grad_norm_([p], 1.0).item() == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        fastgrad.clip_grad_norm_((x for x in []), 1.0)
    fastgrad.clip_grad_value_([p], 1.0)  # nothing to do, no error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastgrad.clip_grad_norm_([], 1.0)  # a list, not a generator: no warning


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
def test_clip_grad_value_matches_torch(backend, dtype):
    ps = params_with_grads(dtype)
    ps[0].grad[0, 0] = float("nan")
    ours, theirs = clone_params(ps), clone_params(ps)
    assert fastgrad.clip_grad_value_(ours, 0.3, backend=backend) is None
    torch.nn.utils.clip_grad_value_(theirs, 0.3)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num())
        assert torch.equal(a.grad.isnan(), b.grad.isnan())


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_bad_clip_value_changes_nothing(bad):
    ps = params_with_grads()
    before = [p.grad.clone() for p in ps]
    with pytest.raises(ValueError, match="clip_value"):
        fastgrad.clip_grad_value_(ps, bad)
    for p, b in zip(ps, before):
        assert torch.equal(p.grad, b)


def test_foreach_argument_gives_the_same_results():
    """``foreach`` is accepted for torch compatibility and changes nothing: same norm, same gradients
    as ``foreach=None``, and as torch's own clip with the same flag."""
    ps = params_with_grads(scale=3.0)
    base = clone_params(ps)
    n_base = fastgrad.clip_grad_norm_(base, 1.0)
    assert n_base.item() > 1.0  # the call clips
    v_base = clone_params(ps)
    fastgrad.clip_grad_value_(v_base, 0.5)
    for fe in (True, False):
        ours, theirs = clone_params(ps), clone_params(ps)
        n = fastgrad.clip_grad_norm_(ours, 1.0, foreach=fe)
        n_t = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=fe)
        assert torch.equal(n, n_base) and n.item() == pytest.approx(n_t.item(), rel=1e-6)
        for a, b, t in zip(ours, base, theirs):
            assert torch.equal(a.grad, b.grad)
            torch.testing.assert_close(a.grad, t.grad, rtol=1e-6, atol=0)
        ours, theirs = clone_params(ps), clone_params(ps)
        assert fastgrad.clip_grad_value_(ours, 0.5, foreach=fe) is None
        torch.nn.utils.clip_grad_value_(theirs, 0.5, foreach=fe)
        for a, b, t in zip(ours, v_base, theirs):
            assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, t.grad)
        assert any((a.grad.abs() == 0.5).any() for a in ours)


def test_expanded_gradient_is_refused_before_anything_is_written():
    """A gradient whose elements share memory (``expand``) cannot be scaled in place: a clear
    RuntimeError naming it, as torch's in-place ops raise, and no gradient written."""
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(4, 3))
    a.grad = torch.full((3,), 2.0)
    b.grad = torch.ones(1, 3).expand(4, 3)
    msg = (r"gradient \[1\] \(shape \(4, 3\), stride \(0, 1\)\): more than one element of the written-to "
           r"tensor refers to a single memory location, so it cannot be scaled or clamped in place\. "
           r"Please clone\(\) the gradient \(p\.grad = p\.grad\.clone\(\)\) first\.")
    for backend in BACKENDS:
        with pytest.raises(RuntimeError, match=msg):
            fastgrad.clip_grad_norm_([a, b], 0.1, backend=backend)
        with pytest.raises(RuntimeError, match=msg):
            fastgrad.clip_grad_value_([a, b], 0.5, backend=backend)
        assert torch.equal(a.grad, torch.full((3,), 2.0))
    b.grad = b.grad.clone()  # the suggested fix works
    fastgrad.clip_grad_value_([a, b], 0.5)
    assert torch.equal(a.grad, torch.full((3,), 0.5))


def test_nonfinite_error_lists_twenty_gradients_and_counts_the_rest():
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(24)]
    for i, p in enumerate(ps):
        p.grad = torch.ones(2)
        if i % 8 != 7:  # 21 bad gradients, one good one in every 8
            p.grad[i % 2] = (float("nan"), float("inf"), float("-inf"))[i % 3]
    bad = [i for i in range(24) if i % 8 != 7]
    kinds = {0: "1 NaN, 0 +Inf, 0 -Inf", 1: "0 NaN, 1 +Inf, 0 -Inf", 2: "0 NaN, 0 +Inf, 1 -Inf"}
    listed = ", ".join(f"[{i}] ({kinds[i % 3]})" for i in bad[:20])
    want = ("The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot be clipped. "
            "To disable this error and scale the gradients by the non-finite norm anyway, set "
            f"`error_if_nonfinite=False`. Non-finite gradients: {listed} and 1 more")
    for backend in BACKENDS:
        with pytest.raises(RuntimeError) as e:
            fastgrad.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True, backend=backend)
        assert str(e.value) == want


def test_norm_beyond_the_dtype_range_error_and_clip_without_it():
    """float16 gradients whose norm (169706) is beyond float16's range: torch's norm overflows and
    its clip zeroes the gradients; fastgrad names the cause, and without the flag still clips with
    the float64 norm."""
    ps = [torch.nn.Parameter(torch.zeros(4, dtype=torch.float16)) for _ in range(2)]
    for p in ps:
        p.grad = torch.full((4,), 60000.0, dtype=torch.float16)
    want = ("The total norm of order 2.0 for gradients from `parameters` is 169706, beyond the range of "
            "torch.float16, so the returned norm would be non-finite. To disable this error, set "
            "`error_if_nonfinite=False` (fastgrad still clips correctly, using the float64 norm).")
    with pytest.raises(RuntimeError) as e:
        fastgrad.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    assert str(e.value) == want
    assert torch.equal(ps[0].grad, torch.full((4,), 60000.0, dtype=torch.float16))
    n = fastgrad.clip_grad_norm_(ps, 1.0)
    assert n.dtype == torch.float16 and n.item() == math.inf
    want_g = 60000.0 * (1.0 / (math.sqrt(8) * 60000.0 + 1e-6))
    for p in ps:
        torch.testing.assert_close(p.grad, torch.full((4,), want_g, dtype=torch.float16), rtol=1e-3, atol=0)


def test_clip_grads_with_norm_argument_errors():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match=r"^total_norm must be a tensor \(as get_total_norm returns\), got float; "
                                        r"wrap a number with torch\.tensor\(\.\.\.\)$"):
        fastgrad.clip_grads_with_norm_([p], 1.0, 2.0)
    q = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    q.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"gradient of \[1\] has complex dtype"):
        fastgrad.clip_grads_with_norm_([p, q], 1.0, torch.tensor(2.0))
    assert torch.equal(p.grad, torch.ones(3))
    with pytest.raises(ValueError, match="max_norm"):
        fastgrad.clip_grads_with_norm_([p], -1.0, torch.tensor(2.0))
    fastgrad.clip_grads_with_norm_([p], 1.0, torch.tensor(3.0))
    assert p.grad.tolist() == pytest.approx([1 / (3.0 + 1e-6)] * 3, rel=1e-6)


@pytest.mark.parametrize("p", [0, 0.0, -1.0, -float("inf")])
def test_norm_types_torch_accepts_below_one(p):
    """torch accepts p <= 0 (not norms): the same values, computed its way."""
    gs = [torch.tensor([0.5, 3.0, -4.0]), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0])]
    want = torch.nn.utils.get_total_norm(gs, p)
    got = fastgrad.get_total_norm(gs, p)
    assert got.dtype == want.dtype and got.item() == pytest.approx(want.item(), rel=1e-6, abs=0)
    ours, theirs = clone_params(params_with_grads()), clone_params(params_with_grads())
    n = fastgrad.clip_grad_norm_(ours, 0.5, p)
    m = torch.nn.utils.clip_grad_norm_(theirs, 0.5, p)
    assert n.item() == pytest.approx(m.item(), rel=1e-6, abs=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coefficient_one_writes_nothing_and_a_single_gradient_is_clipped(backend):
    """Documented: no write when the coefficient is 1 (not even ``x *= 1``: the version counter,
    which autograd checks, stays); and the one-tensor case (the scaling reads its device)."""
    ps = params_with_grads()
    versions = [p.grad._version for p in ps]
    fastgrad.clip_grad_norm_(ps, 1e9, backend=backend)
    fastgrad.clip_grads_with_norm_(ps, 1.0, torch.tensor(0.5), backend=backend)
    assert [p.grad._version for p in ps] == versions
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.full((3,), 2.0)
    n = fastgrad.clip_grad_norm_([q], 1.0, backend=backend)
    assert n.item() == pytest.approx(math.sqrt(12), rel=1e-7)
    torch.testing.assert_close(q.grad, torch.full((3,), 2.0 / (math.sqrt(12) + 1e-6)), rtol=1e-7, atol=0)


def test_max_norm_zero_and_tensor_threshold_shapes():
    ps = params_with_grads()
    ours, theirs = clone_params(ps), clone_params(ps)
    n = fastgrad.clip_grad_norm_(ours, 0.0)  # allowed, as in torch: every gradient becomes 0
    m = torch.nn.utils.clip_grad_norm_(theirs, 0.0)
    assert n.item() == pytest.approx(m.item(), rel=1e-6)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad) and not a.grad.any()
    fastgrad.clip_grad_norm_(clone_params(ps), torch.tensor([0.5]))  # a one-element tensor is fine
    with pytest.raises(ValueError, match=r"^max_norm must be a number or a one-element tensor, got shape \(2,\)"):
        fastgrad.clip_grad_norm_(clone_params(ps), torch.tensor([0.5, 1.0]))
