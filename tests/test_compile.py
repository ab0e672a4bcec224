"""The fused passes are torch custom ops: opcheck passes and torch.compile(fullgraph=True) traces the API."""

import pytest
import torch

import fastgrad
from fastgrad import ops  # noqa: F401  (registers the ops)

from conftest import make_tensor


def model_with_grads():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    m(torch.randn(4, 8)).sum().backward()
    return m


@pytest.mark.parametrize("backend", ["", "reference"])
def test_opcheck(backend):
    grads = [make_tensor(100, torch.float32, "wide"), make_tensor(7, torch.bfloat16).reshape(7, 1)]
    torch.library.opcheck(torch.ops.fastgrad.grad_stats.default, (grads, [2.0, 1.0], True, -8, 8, backend))
    torch.library.opcheck(torch.ops.fastgrad.grad_stats.default, (grads, [2.0], False, 0, 1, backend))
    coef = torch.tensor(0.5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastgrad.scale_.default, ([g.clone() for g in grads], coef, backend))
    torch.library.opcheck(torch.ops.fastgrad.clamp_.default, ([g.clone() for g in grads], 0.1, backend))


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compile_fullgraph_grad_stats_and_clipping(compile_backend):
    m = model_with_grads()
    grads = [p.grad for p in m.parameters()]

    def stats(gs):
        s = fastgrad.grad_stats(gs, norm_types=(2, "inf"))
        return s.total_norm, s.max_abs, s.global_histogram, s.norm("inf")

    got = torch.compile(stats, fullgraph=True, backend=compile_backend)(grads)
    want = stats(grads)
    for a, b in zip(got, want):
        assert torch.equal(a, b)

    def grouped(model):
        return fastgrad.grad_stats(model).groups.tensor_norms

    assert torch.equal(torch.compile(grouped, fullgraph=True, backend=compile_backend)(m), grouped(m))

    twin = model_with_grads()
    clip = torch.compile(lambda ps: fastgrad.clip_grad_norm_(ps, 0.1), fullgraph=True, backend=compile_backend)
    n_compiled = clip(list(m.parameters()))
    n_eager = fastgrad.clip_grad_norm_(list(twin.parameters()), 0.1)
    assert torch.equal(n_compiled, n_eager)
    for a, b in zip(m.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)  # the in-place scaling happened under compile too

    clipv = torch.compile(lambda ps: fastgrad.clip_grad_value_(ps, 0.01), fullgraph=True, backend=compile_backend)
    clipv(list(m.parameters()))
    assert all(p.grad.abs().max() <= 0.01 for p in m.parameters())


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_eager_and_compiled_results_are_bitwise_identical(compile_backend):
    """Eager calls and the traced custom op run the same code below the op boundary: every table
    — rows, groups, the total row, element counts — bitwise equal, fast path and general path."""
    from conftest import nasty_values

    plain = [make_tensor(1000, torch.float32, "wide"), make_tensor(70_001, torch.bfloat16, seed=2),
             make_tensor(33, torch.float16), make_tensor(5, torch.float64)]
    views = plain + [make_tensor(96, torch.float32).reshape(8, 12).t(), nasty_values(torch.float32)]

    def everything(gs):
        s = fastgrad.grad_stats(gs, norm_types=(2, 1, 3, "inf"), groups=[str(i % 2) for i in range(len(gs))])
        return (s.raw.floats, s.raw.counts, s.numel, s.total.raw.floats, s.total.raw.counts, s.total.numel,
                s.groups.raw.floats, s.groups.raw.counts, s.groups.numel,
                fastgrad.get_total_norm(gs, 2.0), fastgrad.get_total_norm(gs, "inf"))

    compiled = torch.compile(everything, fullgraph=True, backend=compile_backend)
    for gs in (plain, views):
        for a, b in zip(compiled(gs), everything(gs)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
