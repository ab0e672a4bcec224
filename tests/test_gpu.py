"""GPU-only behaviour of the CUDA and Triton backends (skipped without a GPU).

What every backend must compute — values, sizes, layouts made on the device,
totals, scale_/clamp_, aliasing, no host sync — is in the conformance matrix
(tests/test_backends.py, its ``@cuda`` targets). This file holds what only a
GPU has: the public API without a host sync, many back-to-back calls on one
or several streams (recycled pinned buffers and cached plans), a tensor of
more than 2^31 elements, and CUDA-graph capture.

Run on a GPU machine with ``python -m pytest -q -m cuda`` (bench/gpu_session.sh does).
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastgrad
from fastgrad import aggregate, dispatch
from fastgrad.backends import get_backend
from fastgrad.spec import make_spec

from conftest import (CHUNK, assert_bits_equal, assert_raw_close, expected_scale, layouts, make_tensor,
                      reference_stats)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = make_spec((2.0, 1.0, "inf"), True)


def gpu_backends():
    out = []
    for name in ("cuda", "triton"):
        reason = get_backend(name).why_not(torch.device("cuda"), torch.float32) if torch.cuda.is_available() else "no GPU"
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")))
    return out


@pytest.fixture(params=gpu_backends())
def backend(request):
    return get_backend(request.param)


def backend_or_skip(name: str):
    b = get_backend(name)
    reason = b.why_not(torch.device("cuda"), torch.float32)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return b


def assert_same_result(got, want, what: str) -> None:
    """Two StatsResults bit for bit (rows, element counts, total row)."""
    for g, w, part in ((got.raw, want.raw, "rows"), (got.total, want.total, "total")):
        assert_bits_equal(g.floats, w.floats, f"{what}: {part} floats")
        assert torch.equal(g.counts, w.counts), f"{what}: {part} counts"
    assert torch.equal(got.numel, want.numel), f"{what}: numel"


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


# -- many calls back to back, on one stream and on several ------------------------------------


def _param_set(T: int, seed: int) -> list[torch.Tensor]:
    """T tensors of mixed sizes and dtypes (one crossing a chunk, one misaligned view), made on the GPU."""
    ts = [make_tensor(1 + (i * 37) % 300, torch.float32 if i % 3 else torch.bfloat16, "wide", seed=seed * 100_003 + i)
          .cuda() for i in range(T - 2)]
    ts.append(make_tensor(CHUNK + 17, torch.float32, "wide", seed=seed).cuda())
    ts.append(make_tensor(CHUNK + 40, torch.bfloat16, seed=seed).cuda()[3:])
    return ts


@pytest.mark.parametrize("streams", ["default", "side", "two_at_once"])
@pytest.mark.parametrize("T", [9, 10_001])
def test_200_back_to_back_calls(backend, T, streams):
    """200 calls without a sync, alternating two parameter sets of the same shapes (so plans are shared and
    pointer tables alternate) and the fast and general forms: every call's rows, counts and total row equal
    those of a lone synchronised call, whose total equals the aggregation of its rows and the reference."""
    sets = [_param_set(T, seed) for seed in (1, 2)]
    want = [backend.stats(s, SPEC) for s in sets]
    torch.cuda.synchronize()
    for w, s in zip(want, sets):
        agg = aggregate.aggregate(w.raw, SPEC, aggregate.TOTAL)
        assert torch.equal(w.total.counts, agg.counts)
        torch.testing.assert_close(w.total.floats, agg.floats, rtol=1e-12, atol=0, equal_nan=True)
        assert_raw_close(w.total, reference_stats(s, SPEC)[1], what=f"T={T} total vs reference")
    if T == 9:
        assert_raw_close(want[0].raw, reference_stats(sets[0], SPEC)[0], what="T=9 rows vs reference")

    main = torch.cuda.current_stream()
    pool = {"default": [main], "side": [torch.cuda.Stream()], "two_at_once": [torch.cuda.Stream(), torch.cuda.Stream()]}
    streams_used = pool[streams]
    for s in streams_used:
        s.wait_stream(main)  # the inputs were made on the default stream
    results = []
    for i in range(200):
        stream = streams_used[i % len(streams_used)]
        which = (i // len(streams_used)) % 2
        with torch.cuda.stream(stream):
            if i % 4 < 2:
                res = dispatch.compute(sets[which], SPEC, backend.name)[0]
            else:
                res = backend.stats(sets[which], SPEC)
        results.append((i, which, res))
    torch.cuda.synchronize()
    for i, which, res in results:
        assert_same_result(res, want[which], f"call {i} ({streams}, T={T}, set {which})")

    # the same pointers holding new values: no stale data from any cache
    for t in sets[0]:
        t.mul_(2)
    doubled = backend.stats(sets[0], SPEC)
    torch.cuda.synchronize()
    torch.testing.assert_close(doubled.raw.floats, want[0].raw.floats * 2, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(doubled.total.floats, want[0].total.floats * 2, rtol=1e-12, atol=0, equal_nan=True)
    assert torch.equal(doubled.raw.counts[:, :4], want[0].raw.counts[:, :4])  # NaN, +-Inf, zeros


# -- more than 2^31 elements --------------------------------------------------------------------


def test_bf16_tensor_beyond_2_31_elements(backend):
    """2^31 + 17 bfloat16 values: norms against a float64 sum computed in slices, exact counts and
    histogram, and scale_ reaching the last elements (32-bit index arithmetic would wrap)."""
    n = 2**31 + 17
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip(f"needs 16 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
    x[-1] = 0.0
    x[2**31 + 3] = float("inf")
    spec = make_spec((2.0, 1.0, "inf"), True)
    res = backend.stats([x], spec)
    sq = torch.zeros((), dtype=torch.float64, device="cuda")
    ab = torch.zeros((), dtype=torch.float64, device="cuda")
    hist = torch.zeros(spec.histogram.num_bins, dtype=torch.int64, device="cuda")
    zeros = torch.zeros((), dtype=torch.int64, device="cuda")
    mx = torch.zeros((), dtype=torch.float64, device="cuda")
    from fastgrad.reference import histogram_reference

    finite = x.clone()
    finite[2**31 + 3] = 0.0
    for s in finite.split(2**27):
        d = s.double()
        sq += d.square().sum()
        ab += d.abs().sum()
        hist += histogram_reference(d, spec.histogram)
        zeros += (d == 0).sum()
        mx = torch.maximum(mx, d.abs().max())
    zeros -= 1  # the Inf made 0 in `finite`
    del finite
    assert res.numel.tolist() == [n, n]
    for row in (res.raw, res.total):
        f, c = row.floats[0].cpu(), row.counts[0].cpu()
        assert math.isinf(f[0]) and math.isinf(f[1]) and math.isinf(f[2])  # an Inf makes every norm Inf
        assert c[1].item() == 1 and c[0].item() == 0 and c[2].item() == 0  # NaN, +Inf, -Inf
        assert c[3].item() == zeros.item()
        assert torch.equal(c[4:], hist.cpu())
    x[2**31 + 3] = 0.0
    res = backend.stats([x], spec)
    f = res.total.floats[0].cpu()
    assert abs(f[0].item() / sq.sqrt().item() - 1) < 1e-6, (f[0].item(), sq.sqrt().item())
    assert abs(f[1].item() / ab.item() - 1) < 1e-6, (f[1].item(), ab.item())
    assert f[2].item() == mx.item()
    head, tail, mid = x[:17].clone(), x[-17:].clone(), x[2**31 - 9 : 2**31 + 9].clone()
    backend.scale_([x], torch.tensor(0.5, dtype=torch.float64, device="cuda"))
    for got, before, where in ((x[:17], head, "head"), (x[-17:], tail, "tail"), (x[2**31 - 9 : 2**31 + 9], mid, "2^31")):
        assert_bits_equal(got, before * 0.5, f"scale_ by 0.5 at the {where}")  # exact: a power of two


# -- CUDA graphs ------------------------------------------------------------------------------------


def _graph_inputs():
    ts = [make_tensor(n, dt, "wide", seed=n).cuda() for n, dt in
          [(4097, torch.float32), (CHUNK + 1, torch.bfloat16), (31, torch.float64), (0, torch.float16)]]
    ts.append(layouts(torch.float16, "cuda")["offset_3"])  # misaligned, read flat
    return ts


def test_cuda_backend_raises_under_graph_capture():
    """The CUDA backend uploads a pointer table from a pooled pinned buffer on every call: capturing that
    would replay stale pointers, so every entry raises a clear error and writes nothing."""
    b = backend_or_skip("cuda")
    ts = _graph_inputs()
    plain = ts[:-1]
    coef = torch.tensor(0.5, dtype=torch.float64, device="cuda")
    calls = {
        "stats (general)": lambda: b.stats(ts, SPEC),
        "stats (fast form, via dispatch)": lambda: dispatch.compute(plain, SPEC, "cuda"),
        "scale_ (general)": lambda: b.scale_(ts, coef),
        "scale_ (fast form, via dispatch)": lambda: dispatch.scale_(plain, coef, backend="cuda"),
        "clamp_ (general)": lambda: b.clamp_(ts, 0.1),
        "clamp_ (fast form, via dispatch)": lambda: dispatch.clamp_(plain, 0.1, backend="cuda"),
    }
    for f in calls.values():  # warm every cache first: the refusal must not depend on a cache miss
        f()
    torch.cuda.synchronize()
    before = [t.clone() for t in ts]
    s = torch.cuda.Stream()
    for what, f in calls.items():
        g = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="(?i)fastgrad.*graph"):
            with torch.cuda.graph(g, stream=s):
                f()
    torch.cuda.synchronize()
    for t, t0 in zip(ts, before):
        assert_bits_equal(t, t0, "written under a refused capture")
    res = b.stats(ts, SPEC)  # and the backend still works afterwards
    assert_raw_close(res.raw, reference_stats(ts, SPEC)[0], what="after refused captures")


def test_triton_graph_replay_equals_eager_with_warm_caches():
    """Triton under capture, caches warmed on the capture stream: replays follow new values written into
    the same tensors, bit for bit as eager calls, for statistics, scale_ and clamp_."""
    b = backend_or_skip("triton")
    ts = _graph_inputs()
    coef = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm: plans, pointer tables, the norm table (scale by 1 writes nothing)
            b.stats(ts, SPEC)
            b.scale_(ts, coef)
            b.clamp_(ts, 1e3)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g_stats, g_scale, g_clamp = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_stats, stream=s):
        out = b.stats(ts, SPEC)
    with torch.cuda.graph(g_scale, stream=s):
        b.scale_(ts, coef)
    with torch.cuda.graph(g_clamp, stream=s):
        b.clamp_(ts, 1e3)
    for trial in range(3):
        for i, t in enumerate(ts):  # new values, same memory
            t.copy_(make_tensor(t.numel(), t.dtype, "wide", seed=50 + 7 * trial + i).cuda().view(t.shape))
        torch.cuda.synchronize()
        g_stats.replay()
        torch.cuda.synchronize()
        eager = b.stats(ts, SPEC)
        assert_same_result(out, eager, f"replay {trial} vs eager")
        assert_raw_close(out.raw, reference_stats(ts, SPEC)[0], what=f"replay {trial} vs reference")
        before = [t.cpu() for t in ts]
        coef.fill_(0.3 + trial)
        g_scale.replay()
        torch.cuda.synchronize()
        for t, t0 in zip(ts, before):
            assert_bits_equal(t, expected_scale(t0, 0.3 + trial), "scale_ replay", nan_payload=False)
        before = [t.cpu() for t in ts]
        g_clamp.replay()
        torch.cuda.synchronize()
        for t, t0 in zip(ts, before):
            assert_bits_equal(t, t0.clamp(-1e3, 1e3), "clamp_ replay", nan_payload=False)


def test_triton_graph_capture_with_a_cold_cache_raises_or_is_correct():
    """Shapes first seen inside a capture (and a strided view, whose staging copy is new each call): the
    Triton backend must raise before recording, or its replays must be right after the pinned buffers it
    used were recycled. Run in a fresh process: a bad replay can leave the CUDA context unusable."""
    backend_or_skip("triton")
    script = textwrap.dedent(
        """
        import torch
        from fastgrad.backends import get_backend
        from fastgrad.reference import stats_reference
        from fastgrad.spec import make_spec
        b = get_backend("triton")
        spec = make_spec((2.0, 1.0, "inf"), True)
        torch.manual_seed(0)
        for case in ("cold", "strided"):
            base = torch.randn(64, 48, device="cuda")
            ts = [torch.randn(777 + (case == "strided"), device="cuda"), torch.randn(5000, device="cuda").bfloat16()[1:]]
            if case == "strided":
                ts.append(base[:, ::2])
                b.stats(ts, spec)  # warm everything but the staging copy's pointer
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, stream=s):
                    out = b.stats(ts, spec)
            except RuntimeError as e:
                assert "fastgrad" in str(e), ("not fastgrad's own clear error", repr(e))
                print(case, "raised:", str(e).splitlines()[0])
                continue
            junk = [torch.full((1 << 16,), -1, dtype=torch.int64).pin_memory() for _ in range(8)]  # recycle pinned memory
            for t in ts:
                t.copy_(torch.randn(t.shape, device="cuda").to(t.dtype))
            g.replay()
            torch.cuda.synchronize()
            want = stats_reference([t.cpu() for t in ts], spec)
            ok = torch.equal(out.raw.counts.cpu(), want.counts)
            err = ((out.raw.floats.cpu() - want.floats).abs() / want.floats.abs().clamp_min(1e-300)).max().item()
            assert ok and err < 1e-6, (case, "replay differs from the reference", err, out.raw.floats, want.floats)
            print(case, "replay correct")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
