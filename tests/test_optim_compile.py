"""A wrapped step under torch.compile: no more graph breaks than torch's own clip_grad_norm_ + step(),
and the same result as in eager mode.

Graph breaks are counted as ``torch._dynamo.explain`` counts them (graphs - 1). torch's fused
optimizers run their kernel outside the graph (``torch.compiler.disable``: "don't trace into fused
optimizer") and ``Optimizer.step`` breaks around itself (torch's ``_use_grad``); both hold for
torch's baseline and fastgrad alike. The scaling path reads one skip flag on the host (a data-dependent
branch), placed after the statistics, epilogue and scaling so that they stay one graph.
"""

from __future__ import annotations

import pytest
import torch

import fastgrad
from fastgrad.optim import SpikeSkip


def make_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    m(torch.randn(4, 8)).sum().backward()
    return m


def make_opt(kind, params):
    return torch.optim.AdamW(params, lr=1e-3, **({"fused": True} if kind == "fused" else {"foreach": True}))


def count_breaks(fn) -> int:
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(fn)().graph_break_count
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("spike", [False, True])
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_wrapped_step_breaks_no_more_than_torch_clip_and_step(kind, spike):
    m_torch = make_model()
    opt_torch = make_opt(kind, m_torch.parameters())

    def torch_step():
        torch.nn.utils.clip_grad_norm_(m_torch.parameters(), 1.0)
        opt_torch.step()

    m = make_model()
    opt = fastgrad.wrap(make_opt(kind, m.parameters()), max_norm=1.0, spike_skip=SpikeSkip() if spike else None)

    def our_step():
        opt.step()

    theirs, ours = count_breaks(torch_step), count_breaks(our_step)
    assert ours <= theirs, f"fastgrad.wrap step: {ours} graph breaks, torch clip_grad_norm_ + step: {theirs}"


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_compiled_wrapped_step_matches_eager(kind):
    """Same parameters, counters and decisions, bitwise, over steps that clip, and one that is skipped."""
    models = [make_model(), make_model()]
    opts = [fastgrad.wrap(make_opt(kind, m.parameters()), max_norm=0.05, spike_skip=SpikeSkip(window=4))
            for m in models]
    compiled = torch.compile(opts[1].step, backend="eager")
    torch._dynamo.reset()
    try:
        for step in range(6):
            for m, run in ((models[0], opts[0].step), (models[1], compiled)):
                for p in m.parameters():
                    p.grad = torch.full_like(p, 0.1 * (step + 1))
                if step == 3:
                    m[2].bias.grad[0] = float("nan")
                run()
            a, b = opts[0].last_stats, opts[1].last_stats
            for x, y in ((a.total_norm, b.total_norm), (a.clip_coef, b.clip_coef)):
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN included
            assert a.skipped.item() == b.skipped.item() == (step == 3)
            for p, q in zip(*(m.parameters() for m in models)):  # the gradients fastgrad left: bitwise
                torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)
    finally:
        torch._dynamo.reset()
    for k, v in opts[0].counters.items():
        assert torch.equal(v, opts[1].counters[k]), k
    # The parameters: torch's fused kernel runs outside the graph (bitwise); torch's foreach AdamW
    # traced by dynamo rounds differently from its eager run by itself (~5e-8 here, without fastgrad).
    tol = {"rtol": 0, "atol": 0} if kind == "fused" else {"rtol": 1e-6, "atol": 1e-7}
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, **tol)
