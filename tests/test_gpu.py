"""Every GPU backend against the float64 reference on CUDA tensors (skipped without a GPU).

Run on a GPU machine with ``python -m pytest -q -m cuda``.
"""

import math

import pytest
import torch

import fastgrad
from fastgrad.backends import get_backend
from fastgrad.reference import stats_reference
from fastgrad.spec import HistogramSpec, StatsSpec, make_spec

from conftest import DTYPES, NORM_TYPES, assert_raw_close, layouts, make_tensor, nasty_values

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SPEC = make_spec(NORM_TYPES, True)
GPU_SIZES = [0, 1, 127, 4097, 65536, 65537, 1_000_003]


def gpu_backends():
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out = []
    for name in ("cuda", "triton"):
        reason = get_backend(name).why_not(dev, torch.float32)
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


@pytest.fixture(params=gpu_backends())
def backend(request):
    return get_backend(request.param)


def check(backend, tensors, spec=SPEC, what=""):
    got = backend.stats(tensors, spec).raw
    assert got.floats.device.type == "cuda" and got.counts.device.type == "cuda"
    assert_raw_close(got, stats_reference([t.cpu() for t in tensors], spec), what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", GPU_SIZES)
@pytest.mark.parametrize("kind", ["normal", "wide", "relu"])
def test_single_tensor(backend, dtype, n, kind):
    check(backend, [make_tensor(n, dtype, kind).cuda()], what=f"{dtype} {n} {kind}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nasty_and_layouts(backend, dtype):
    x = nasty_values(dtype).cuda()
    big = make_tensor(150_001, dtype).cuda()
    big[:: 150_001 // len(x)][: len(x)] = x
    check(backend, [x, big, *[v.cuda() for v in layouts(dtype).values()]])


def test_many_tensors_one_call(backend):
    ts = [make_tensor(3 + i % 50, torch.float32, seed=i).cuda() for i in range(10_000)]
    ts += [make_tensor(70_000, torch.bfloat16).cuda(), torch.empty(0, device="cuda")]
    check(backend, ts, StatsSpec((2.0,), HistogramSpec()))


def test_float32_extremes(backend):
    x = torch.full((100_000,), 1e30, device="cuda")
    check(backend, [x, x * 1e-70, x.double() * 1e170])
    # float64 maxima at the ends of the range (subnormal; >= 2^1023): rescaling must stay finite
    d = [torch.tensor([1e-310, 0.0, 3e-311], dtype=torch.float64), torch.tensor([1.5e308, 1.0, -1e308],
         dtype=torch.float64), torch.full((70_000,), 5e-324, dtype=torch.float64)]
    check(backend, [t.cuda() for t in d], make_spec((2.0, 1.0, 3.0, 0.5, "inf"), True))


@pytest.mark.parametrize("bins", [(-64, 16), (-74, 16), (-126, 128)], ids=["default", "91_bins", "widest"])
def test_histogram_widths(backend, bins):
    """Bin counts around the CUDA kernel's 48 KiB shared-memory opt-in, and the widest spec."""
    ts = [make_tensor(200_003, torch.float32, "wide").cuda(), make_tensor(70_001, torch.bfloat16, "wide").cuda()]
    check(backend, ts, StatsSpec((2.0, 1.0), HistogramSpec(*bins)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_chunks_near_float_range(backend, dtype):
    """16-bit values summed in float first: finite chunks whose squares leave float's range."""
    x = make_tensor(140_000, torch.float64)
    scales = [1.0, 2.0**-70, 2.0**-45] + ([1e30, 2.0**70] if dtype == torch.bfloat16 else [])
    ts = [(x * s).to(dtype).cuda() for s in scales]
    check(backend, ts, make_spec((2.0, 1.0, "inf"), True))
    check(backend, ts, make_spec((2.0,), False))


def test_total_row_made_on_the_device(backend):
    """GPU backends write the total row in their last kernel (no aggregation ops)."""
    ts = [make_tensor(3 + i % 500, torch.float32, "wide", seed=i).cuda() for i in range(3000)]
    ts += [make_tensor(300_001, torch.bfloat16).cuda(), nasty_values(torch.float32).cuda()]
    spec = make_spec((2.0, 1.0, 3.0, "inf"), True)
    for tensors in (ts, ts[:-1]):  # with and without NaN/Inf
        raw, numel, total = backend.stats(tensors, spec)
        want = fastgrad.aggregate.aggregate(raw, spec, fastgrad.aggregate.TOTAL)
        assert torch.equal(total.counts, want.counts)
        torch.testing.assert_close(total.floats, want.floats, rtol=1e-14, atol=0, equal_nan=True)
        assert numel.tolist() == [t.numel() for t in tensors] + [sum(t.numel() for t in tensors)]
        assert_raw_close(total, stats_reference([torch.cat([t.cpu().double().flatten() for t in tensors])], spec))


def test_bitwise_deterministic(backend):
    ts = [make_tensor(3_000_001, torch.float32, "wide").cuda(), make_tensor(70_000, torch.bfloat16).cuda()]
    a, b = backend.stats(ts, SPEC).raw, backend.stats(ts, SPEC).raw
    assert torch.equal(a.floats, b.floats) and torch.equal(a.counts, b.counts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_and_clamp(backend, dtype):
    x = make_tensor(200_003, dtype, "wide").cuda()
    want = x.clone().mul_(torch.tensor(0.3, device="cuda"))
    backend.scale_([x], torch.tensor(0.3, dtype=torch.float64, device="cuda"))
    torch.testing.assert_close(x, want, rtol=torch.finfo(dtype).eps, atol=0)
    before = x.clone()
    backend.scale_([x], torch.tensor(1.0, dtype=torch.float64, device="cuda"))
    assert torch.equal(x.view(torch.uint8), before.view(torch.uint8))
    backend.clamp_([x], 0.01)
    assert torch.equal(x, before.clamp(-0.01, 0.01))


def test_public_api_without_host_sync(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    model(torch.randn(32, 64, device="cuda")).sum().backward()
    fastgrad.grad_stats(model, backend=backend.name)  # warm the plan caches
    fastgrad.clip_grad_norm_(model.parameters(), 1.0, backend=backend.name)
    ref = fastgrad.grad_stats(model, backend="reference")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = fastgrad.grad_stats(model, backend=backend.name)
        fastgrad.clip_grad_norm_(model.parameters(), 0.1, backend=backend.name)
        fastgrad.clip_grad_value_(model.parameters(), 0.05, backend=backend.name)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert stats.total_norm.device.type == "cuda"
    assert math.isclose(stats.total_norm.item(), ref.total_norm.item(), rel_tol=1e-6)
    assert all(p.grad.abs().max().item() <= 0.05 for p in model.parameters())
