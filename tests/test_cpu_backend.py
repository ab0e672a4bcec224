"""C++ CPU backend specifics: thread-count independence, 1e8-element accuracy, the float-run bound of
16-bit squares. What every backend must compute (dtypes, sizes, layouts, nasty values, totals, histograms,
scale_/clamp_) is checked for the CPU backend by the conformance matrix, tests/test_backends.py.
"""

import pytest
import torch

from fastgrad.backends import get_backend
from fastgrad.reference import stats_reference
from fastgrad.spec import make_spec

from conftest import NORM_TYPES, assert_raw_close, make_tensor

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(
    CPU.why_not(torch.device("cpu"), torch.float32) is not None,
    reason=f"C++ CPU backend unavailable: {CPU.why_not(torch.device('cpu'), torch.float32)}",
)
SPEC = make_spec(NORM_TYPES, True)


def test_bitwise_deterministic_and_thread_independent():
    ts = [make_tensor(300_001, torch.float32, "wide"), make_tensor(70_000, torch.bfloat16)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CPU.stats(ts, SPEC).raw
        torch.set_num_threads(max(2, old))
        many = CPU.stats(ts, SPEC).raw
        again = CPU.stats(ts, SPEC).raw
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one.floats, many.floats) and torch.equal(one.counts, many.counts)
    assert torch.equal(many.floats, again.floats)
    assert torch.equal(many.counts, again.counts)


@pytest.mark.slow
def test_1e8_elements_accuracy():
    """torch 2.13's CPU vector_norm is ~1% off here; fastgrad must be within 1e-6."""
    import fastgrad

    x = torch.randn(10**8, generator=torch.Generator().manual_seed(0))
    exact = x.double().square().sum().sqrt()  # float64 pairwise sum: ~1e-15 relative
    got = fastgrad.grad_stats([x], backend="cpu", histogram=False).total_norm
    assert abs(got.item() / exact.item() - 1) < 1e-6
    big = x * 1e30  # sum of squares ~1e68: beyond float32's range, fine in fastgrad's
    got_big = fastgrad.grad_stats([big], backend="cpu", histogram=False).total_norm
    assert abs(got_big.item() / (exact.item() * 1e30) - 1) < 1e-6
    # bfloat16: squares summed in float runs, then in double (the float64 row, not the bf16 total)
    xb = x.bfloat16()
    exact_b = xb.double().square().sum().sqrt().item()
    got_b = fastgrad.grad_stats([xb], backend="cpu").tensor_norms[0].item()
    assert abs(got_b / exact_b - 1) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_squares_summed_in_float(dtype):
    """16-bit squares are summed in float before double: within 1e-6 also where they leave float's range."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300_000, generator=g, dtype=torch.float64)
    ts = [x.to(dtype)]
    if dtype == torch.bfloat16:
        ts += [(x * 1e30).to(dtype),  # squares overflow float: those blocks are summed again in double
               (x * 2.0**-70).to(dtype),  # squares underflow float
               # a block whose largest value is just above the re-sum threshold, the rest subnormal when squared
               torch.cat([torch.full((1,), 2.0**-39), x[:5000] * 2.0**-70]).to(dtype)]
    spec = make_spec((2.0,), False)  # no p = 1: the float-squares path
    got, want = CPU.stats(ts, spec).raw, stats_reference(ts, spec)
    assert_raw_close(got, want, rel=1e-6)
    # the bound is 14 float roundings per run of 15 squares; random rounding errors stay far below it
    err = ((got.floats[:, 0] - want.floats[:, 0]).abs() / want.floats[:, 0]).max().item()
    assert err < 1e-7, err
