"""The drop-ins against torch where an adversarial pass found them apart (issue #11, items 1-4, 11, 12).

Each test names the behaviour; where torch has one, fastgrad matches it (values, dtypes,
error types), where torch's is wrong for a reason fastgrad avoids (float16 overflow),
the documented difference is tested.
"""

import math

import pytest
import torch

import fastgrad


def _params(*grads):
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps


# -- overlapping memory (expand): raise like torch, before writing anything ------------------------

@pytest.mark.parametrize("shape", [(4,), (1000, 3)])
def test_clipping_an_expanded_gradient_raises_like_torch_and_writes_nothing(shape):
    base = torch.tensor([3.0]) if shape == (4,) else torch.tensor([[1.0, 2.0, 3.0]])
    p = torch.nn.Parameter(torch.zeros(shape))
    p.grad = base.expand(shape)
    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([1.0, 2.0])
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.nn.utils.clip_grad_norm_([p], 1.0)  # torch's behaviour, the model to follow
    before = base.clone()
    with pytest.raises(RuntimeError, match="single memory location.*clone"):
        fastgrad.clip_grad_norm_([q, p], 1.0)
    assert torch.equal(base, before) and torch.equal(q.grad, torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="single memory location"):
        fastgrad.clip_grad_value_([p], 0.1)
    with pytest.raises(RuntimeError, match="single memory location"):
        fastgrad.clip_grads_with_norm_([p], 1.0, torch.tensor(100.0))
    assert torch.equal(base, before)
    # statistics of such a tensor stay right: every alias counts as an element
    st = fastgrad.grad_stats([p.grad])
    assert st.total_norm.item() == pytest.approx(torch.linalg.vector_norm(p.grad.double()).item(), rel=1e-12)


def test_wrapped_sgd_step_with_an_expanded_gradient_changes_nothing():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0]).expand(4)
    opt = fastgrad.wrap(torch.optim.SGD([p], lr=1.0), max_norm=1.0)
    with pytest.raises(RuntimeError, match="single memory location"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4)) and torch.equal(p.grad, torch.full((4,), 3.0))
    p.grad = p.grad.clone()  # what the error says to do
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.5), rtol=1e-6, atol=0)


# -- gradients that require grad (create_graph=True) ------------------------------------------------

def test_gradients_made_with_create_graph_are_read_as_gradients():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    m(torch.randn(3, 5)).pow(2).sum().backward(create_graph=True)
    grads = [p.grad for p in m.parameters()]
    assert all(g.requires_grad for g in grads)  # the case in question
    want = torch.linalg.vector_norm(torch.cat([g.detach().double().flatten() for g in grads]))
    st = fastgrad.grad_stats(grads)
    assert len(st.names) == len(grads)
    assert st.total_norm.item() == pytest.approx(want.item(), rel=1e-12)
    assert fastgrad.get_total_norm(grads).item() == pytest.approx(want.item(), rel=1e-6)
    # parameters (and leaf tensors that require grad) still stand for their .grad
    assert fastgrad.grad_stats(list(m.parameters())).total_norm.item() == pytest.approx(want.item(), rel=1e-12)
    leaf = torch.ones(3, requires_grad=True)
    leaf.grad = torch.full((3,), 2.0)
    assert fastgrad.grad_stats([leaf]).total_norm.item() == pytest.approx(math.sqrt(12.0), rel=1e-15)


def test_an_empty_result_is_never_silent():
    p = torch.nn.Parameter(torch.ones(3))  # .grad is None
    for call in (lambda: fastgrad.grad_stats([p]), lambda: fastgrad.grad_stats([("w", p)]),
                 lambda: fastgrad.grad_stats([p], params=True), lambda: fastgrad.grad_stats([])):
        with pytest.warns(UserWarning, match="no gradients to read") as rec:
            st = call()
        assert rec[0].filename == __file__  # points at the caller's line
        assert st.names == () and st.total_norm.item() == 0.0


# -- norm_type 0 and negative: accepted with torch's values -----------------------------------------

@pytest.mark.parametrize("p", [0, 0.0, -1, -2, -0.5, -3.5, "-inf", -math.inf])
def test_nonpositive_norm_types_give_torchs_values(p):
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(7, generator=g), torch.zeros(4), torch.tensor([0.0, 2.5, -1.0])]
    want = torch.nn.utils.get_total_norm([x.clone() for x in grads], p)
    got = fastgrad.get_total_norm(grads, p)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True)
    theirs, ours = _params(*[x.clone() for x in grads]), _params(*[x.clone() for x in grads])
    nt = torch.nn.utils.clip_grad_norm_(theirs, 0.5, p)
    no = fastgrad.clip_grad_norm_(ours, 0.5, p)
    torch.testing.assert_close(no, nt, rtol=1e-6, atol=0, equal_nan=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("p", [0, -1, -2])
def test_error_if_nonfinite_with_nonpositive_norm_types_as_torch(p):
    """torch's own test of error_if_nonfinite runs through these norm types."""
    for bad in (float("nan"), float("inf")):
        theirs, ours = _params(torch.tensor([1.0, bad])), _params(torch.tensor([1.0, bad]))
        raised = []
        for fn, ps in ((torch.nn.utils.clip_grad_norm_, theirs), (fastgrad.clip_grad_norm_, ours)):
            try:
                fn(ps, 1.0, p, error_if_nonfinite=True)
                raised.append(False)
            except RuntimeError:
                raised.append(True)
        assert raised[0] == raised[1], (p, bad, raised)
        if raised[1]:
            assert torch.equal(ours[0].grad.isnan(), torch.tensor([False, bad != bad]))


# -- float16 beyond 65504: the returned norm, error_if_nonfinite and the clipping agree --------------

def test_float16_norm_beyond_its_range():
    grads = [torch.full((4,), 60000.0, dtype=torch.float16)]  # norm 120000 > 65504
    true_norm = 120000.0
    theirs, ours = _params(grads[0].clone()), _params(grads[0].clone())
    nt = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    no = fastgrad.clip_grad_norm_(ours, 1.0)
    # the returned value: the norm in the gradients' dtype, as torch (inf)
    assert no.dtype == nt.dtype == torch.float16 and math.isinf(no.item()) and math.isinf(nt.item())
    # the clipping: fastgrad uses the float64 norm (torch zeroes the gradients: max_norm / inf)
    assert torch.equal(theirs[0].grad, torch.zeros(4, dtype=torch.float16))
    torch.testing.assert_close(ours[0].grad.double(), torch.full((4,), 60000.0 / (true_norm + 1e-6)).double(),
                               rtol=1e-3, atol=0)
    # error_if_nonfinite: raises as torch does (the norm it would return is inf), and writes nothing
    fresh = _params(grads[0].clone())
    with pytest.raises(RuntimeError, match="beyond the range of torch.float16"):
        fastgrad.clip_grad_norm_(fresh, 1.0, error_if_nonfinite=True)
    assert torch.equal(fresh[0].grad, grads[0])
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(_params(grads[0].clone()), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="beyond the range"):
        fastgrad.get_total_norm(grads, error_if_nonfinite=True)


# -- meta tensors --------------------------------------------------------------------------------------

def test_meta_tensors_give_meta_results():
    grads = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta", dtype=torch.bfloat16)]
    st = fastgrad.grad_stats(grads, norm_types=(2, 1))
    assert st.total_norm.device.type == "meta" and st.total_norm.dtype == torch.float64
    assert st.tensor_norms.shape == (2,) and st.histogram.shape == (2, st.spec.histogram.num_bins)
    with pytest.raises(RuntimeError, match="meta tensors cannot be mixed"):
        fastgrad.grad_stats([grads[0], torch.ones(2)])


# -- argument types as torch takes them ---------------------------------------------------------------

def test_max_norm_as_a_string_is_accepted_as_torch_does():
    theirs, ours = _params(torch.tensor([3.0, 4.0])), _params(torch.tensor([3.0, 4.0]))
    nt = torch.nn.utils.clip_grad_norm_(theirs, "1.0")
    no = fastgrad.clip_grad_norm_(ours, "1.0")
    torch.testing.assert_close(no, nt)
    torch.testing.assert_close(ours[0].grad, theirs[0].grad)
    with pytest.raises(TypeError, match="max_norm must be a number"):
        fastgrad.clip_grad_norm_(ours, "one")


def test_clip_grads_with_norm_wants_a_tensor_total_norm_as_torch():
    ps = _params(torch.tensor([3.0, 4.0]))
    with pytest.raises(TypeError):
        torch.nn.utils.clip_grads_with_norm_(_params(torch.tensor([3.0, 4.0])), 1.0, 10.0)
    with pytest.raises(TypeError, match="total_norm must be a tensor"):
        fastgrad.clip_grads_with_norm_(ps, 1.0, 10.0)
    assert torch.equal(ps[0].grad, torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_returned_norm_is_the_float64_norm_rounded_once_to_the_dtype(dtype):
    """The CPU path carries the norm as a Python float; the returned tensor must round it exactly as
    ``.to(dtype)`` does, including values beyond the dtype's range (inf) and NaN."""
    from fastgrad.clip_grad import _as_dtype

    g = torch.Generator().manual_seed(5)
    vals = (torch.rand(2000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-40, 40, (2000,), generator=g)).tolist()
    vals += [65503.9, 65504.0, 65519.99, 65520.0, 3.4e38, 3.5e38, 1e300, math.inf, math.nan, 0.0]
    got = torch.stack([_as_dtype(v, dtype) for v in vals])
    want = torch.tensor(vals, dtype=torch.float64).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("p", [2.0, math.inf, 3.0, 0, -1])
def test_get_total_norm_of_gradients_with_a_graph_records_no_history(backend, p):
    """get_total_norm runs without a no_grad() context (host cost): nothing it returns may carry
    autograd history, whichever path computed it."""
    g = [torch.randn(5, requires_grad=True) * 2, torch.randn(3).to(torch.bfloat16).requires_grad_()]
    r = fastgrad.get_total_norm(g, p, backend=backend)
    assert not r.requires_grad and r.grad_fn is None
