"""The Triton backend against the float64 reference, on CPU tensors under the Triton interpreter.

Triton decides compiled versus interpreted when a kernel is defined, so
``TRITON_INTERPRET=1`` is set before Triton and ``fastgrad.triton_kernels``
are imported. It is then put back as it was, and an autouse fixture sets it
only while these tests run, so that other modules' automatic backend choice
for CPU tensors is not diverted to the (slow) interpreter.

GPU tests (``@pytest.mark.cuda``) run in a subprocess without the variable:
in this process the kernels are interpreted and can only read CPU memory.
"""

import math
import os
import subprocess
import sys
import textwrap

_saved_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

import fastgrad  # noqa: E402
from fastgrad import dispatch  # noqa: E402
from fastgrad import triton_kernels as K  # noqa: E402
from fastgrad.backends import get_backend  # noqa: E402
from fastgrad.reference import clamp_reference_, scale_reference_, stats_reference  # noqa: E402
from fastgrad.spec import HistogramSpec, make_spec  # noqa: E402

if _saved_interpret is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _saved_interpret

pytestmark = [
    pytest.mark.skipif(
        not K.INTERPRETED,
        reason="fastgrad.triton_kernels was imported without TRITON_INTERPRET=1 before this module",
    ),
    # The interpreter evaluates with numpy, which warns on IEEE results such as inf * 0, and on
    # overflow to inf (float64 norms beyond 1.8e308 are inf, as in the reference).
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

BACKEND = get_backend("triton")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RTOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    dispatch.choose.cache_clear()
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    dispatch.choose.cache_clear()


# -- helpers ------------------------------------------------------------------


def _mismatch_report(got: torch.Tensor, want: torch.Tensor, bad: torch.Tensor, what: str) -> str:
    idx = bad.nonzero()[:8]
    lines = [f"{what}: {int(bad.sum())} of {bad.numel()} entries differ; first ones (index: got / want):"]
    for i in idx.tolist():
        i = tuple(i)
        lines.append(f"  {i}: {got[i].item()!r} / {want[i].item()!r}")
    return "\n".join(lines)


def assert_floats_close(got: torch.Tensor, want: torch.Tensor, what: str = "floats", rtol: float = RTOL):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype)
    got, want = got.cpu(), want.cpu()
    both_nan = got.isnan() & want.isnan()
    same = (got == want) | both_nan
    close = (got - want).abs() <= rtol * want.abs()
    bad = ~(same | (close & want.isfinite()))
    assert not bad.any(), _mismatch_report(got, want, bad, what)


def assert_equal(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype)
    bad = got.cpu() != want.cpu()
    assert not bad.any(), _mismatch_report(got.cpu(), want.cpu(), bad, what)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str, nan_payload: bool = True):
    """Bitwise equality (``nan_payload=False``: any NaN matches any NaN, as torch canonicalises them)."""
    g, w = got.detach().flatten(), want.detach().flatten()
    ib = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[g.element_size()]
    bad = g.view(ib) != w.view(ib)
    if not nan_payload:
        bad &= ~(g.isnan() & w.isnan())
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        rows = [f"  [{i}]: got {g[i].item()!r} / want {w[i].item()!r}" for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} elements differ:\n" + "\n".join(rows))


def check_stats(tensors, norm_types=(2, 1, 3, "inf"), histogram=True, via="api", **kw):
    spec = make_spec(norm_types, histogram)
    want = stats_reference(tensors, spec)
    if via == "api":
        got = fastgrad.grad_stats(tensors, norm_types=norm_types, histogram=histogram, backend="triton").raw
    elif via == "backend":
        got = BACKEND.stats(tensors, spec).raw
    else:
        got = K.grad_stats(tensors, spec, **kw)
    assert_floats_close(got.floats, want.floats, "floats (norms..., max|x|)")
    assert_equal(got.counts, want.counts, "counts (nan, +inf, -inf, zero, bins...)")
    return got


def nasty(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values of several magnitudes with zeros, -0.0, subnormals, huge values, NaN and ±Inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-30, 30, (n,), generator=g).to(torch.float64)
    )
    specials = {
        torch.float32: [0.0, -0.0, 1e-40, -3e-45, 1e30, -1e30, 3e38],
        torch.float64: [0.0, -0.0, 1e-310, -5e-324, 1e300, -1e200, 1.7e308],
        torch.float16: [0.0, -0.0, 6e-8, -1e-6, 6e4, -3e4],
        torch.bfloat16: [0.0, -0.0, 1e-39, -5e-40, 1e30, -3e38],
    }[dtype] + [math.nan, math.inf, -math.inf]
    x = x.to(dtype)
    if n:
        pos = torch.randperm(n, generator=g)[: len(specials)]
        x[pos] = torch.tensor(specials[: len(pos)], dtype=torch.float64).to(dtype)
    return x


# -- selection ----------------------------------------------------------------


def test_why_not():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for dt in DTYPES:
        assert BACKEND.why_not(cpu, dt) is None
    assert "not supported" in BACKEND.why_not(cpu, torch.int32)
    # Interpreted kernels dereference the pointer table on the host: never CUDA memory.
    assert "TRITON_INTERPRET" in BACKEND.why_not(cuda, torch.float32)
    assert BACKEND.why_not(torch.device("meta"), torch.float32) is not None


def test_why_not_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in BACKEND.why_not(torch.device("cpu"), torch.float32)


# -- statistics -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 127, 4097])
def test_stats_sizes_dtypes(dtype, n):
    check_stats([nasty(n, dtype, seed=n)])
    if n:  # the same sizes without NaN/Inf, so the norms are finite numbers to compare
        x = nasty(n, dtype, seed=n)
        check_stats([torch.where(x.isfinite(), x, 0.5)], via="backend")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_finite_norms_of_nasty_values(dtype):
    x = nasty(3000, dtype, seed=7)
    x = torch.where(x.isfinite(), x, -2.0)
    check_stats([x], norm_types=(2, 1, 3, "inf", 0.5, 7), via="backend")


def test_stats_larger_than_a_chunk():
    x = torch.randn(K.CHUNK + 77) * 1e30
    x[K.CHUNK + 5] = 0.0
    y = torch.randn(K.CHUNK + 3, dtype=torch.float64)
    y[:100] *= 1e-300  # chunks of very different scales must combine exactly
    y[K.CHUNK :] *= 1e300
    check_stats([x, y], norm_types=(2, 1, 3, 7, "inf"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_many_small_chunks(dtype):
    # chunk=128 makes every combine path run on small inputs: scaled float64
    # chunks 1e-300 apart, runs of zero chunks, NaN/Inf in one chunk only.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g, dtype=torch.float64)
    if dtype == torch.float64:
        x[:128] *= 1e-300
        x[512:640] *= 1e300
    x[256:384] = 0
    x = x.to(dtype)
    z = x.clone()
    z[900] = math.nan
    w = x.clone()
    w[5] = -math.inf
    check_stats([x, z, w, x[:129], x[:1]], norm_types=(2, 1, 3, 7, "inf"), via="kernels", chunk=128)


def test_stats_several_tensors_mixed_dtypes():
    ts = [nasty(n, dt, seed=i) for i, (n, dt) in enumerate(
        [(100, torch.float32), (0, torch.float16), (4097, torch.bfloat16), (31, torch.float64),
         (1, torch.float32), (300, torch.float16), (0, torch.float64)])]
    check_stats(ts)
    check_stats(ts, norm_types=("inf",), histogram=False, via="backend")


@pytest.mark.parametrize("with_nonfinite", [False, True])
def test_total_row_from_the_last_kernel(with_nonfinite):
    """``stats``: the total row equals the aggregation of the rows (and the reference)."""
    ts = [nasty(n, dt, seed=i) for i, (n, dt) in enumerate(
        [(100, torch.float32), (0, torch.float16), (4097, torch.bfloat16), (31, torch.float64), (300, torch.float16)])]
    if not with_nonfinite:
        ts = [t.nan_to_num(0.0, 0.0, 0.0) for t in ts]
    spec = make_spec((2, 1, 3, 0.5, "inf"), True)
    raw, numel, total = BACKEND.stats(ts, spec)
    want = fastgrad.aggregate.aggregate(raw, spec, fastgrad.aggregate.TOTAL)
    assert torch.equal(total.counts, want.counts)
    torch.testing.assert_close(total.floats, want.floats, rtol=1e-12, atol=0, equal_nan=True)
    assert numel.tolist() == [t.numel() for t in ts] + [sum(t.numel() for t in ts)]
    assert bool(total.floats[0, 0].isnan()) == with_nonfinite


def test_stats_empty_list():
    got = fastgrad.grad_stats([], backend="triton").raw
    assert got.floats.shape == (0, 2) and got.counts.shape[0] == 0
    spec = make_spec((2, 1), True)
    raw = BACKEND.stats([], spec).raw
    assert raw.floats.shape == (0, 3) and raw.counts.shape == (0, spec.num_count_cols)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_views(dtype):
    base = nasty(24 * 33, dtype, seed=3).reshape(24, 33)
    cl = nasty(2 * 3 * 5 * 7, dtype, seed=4).reshape(2, 3, 5, 7).to(memory_format=torch.channels_last)
    views = [base.t(), base[:, ::2], base[1:], base[3:7, 5:], cl, base[0].expand(4, 33), base.t()[::3]]
    check_stats(views)


@pytest.mark.parametrize(
    "hist", [HistogramSpec(), HistogramSpec(-126, 128), HistogramSpec(-3, 4), False], ids=str
)
def test_stats_histogram_specs(hist):
    ts = [nasty(700, dt, seed=9) for dt in DTYPES]
    check_stats(ts, norm_types=(2,), histogram=hist, via="backend")


def test_stats_exponent_edges():
    # Powers of two and their neighbours land in the right bin for every dtype.
    e = torch.arange(-140, 130, dtype=torch.float64)
    p = torch.exp2(e)
    vals = torch.cat([p, -p, p * (1 - 2**-9), p * (1 + 2**-7)])
    ts = [vals.to(dt) for dt in DTYPES] + [torch.exp2(torch.arange(-1074, 1024, 7, dtype=torch.float64))]
    check_stats(ts, norm_types=(2, 1, "inf"), histogram=HistogramSpec(-126, 128), via="backend")


def test_stats_deterministic_and_planned_once(monkeypatch):
    ts = [nasty(5000, torch.float32, seed=2), nasty(300, torch.bfloat16, seed=3), torch.randn(10, dtype=torch.float64)]
    spec = make_spec((2, 1), True)
    first = BACKEND.stats(ts, spec).raw
    plans = len(K._PLANS)

    launches = []

    class Count:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(K, "_stats_chunk_kernel", Count(K._stats_chunk_kernel))
    monkeypatch.setattr(K, "_stats_reduce_kernel", Count(K._stats_reduce_kernel))
    again = BACKEND.stats(ts, spec).raw
    assert len(K._PLANS) == plans, "a second call with the same shapes built a new plan"
    assert len(launches) == 3 + 1, f"expected one launch per dtype plus one, got {launches}"
    assert_bits_equal(again.floats, first.floats, "floats of two identical calls")
    assert_equal(again.counts, first.counts, "counts of two identical calls")


# -- scale_ ---------------------------------------------------------------------


def _expected_scale(x: torch.Tensor, coef: float) -> torch.Tensor:
    if x.dtype == torch.float64:
        return x * coef
    return (x.float() * torch.tensor(coef, dtype=torch.float64).float()).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale(dtype):
    xs = [nasty(n, dtype, seed=n) for n in (0, 1, 127, 4097)]
    got = [x.clone() for x in xs]
    for coef in (0.3, 2.0**-20, 0.0):
        got = [x.clone() for x in xs]
        fastgrad.dispatch.scale_(got, torch.tensor(coef, dtype=torch.float64), backend="triton")
        for x, g in zip(xs, got):
            assert_bits_equal(g, _expected_scale(x, coef), f"{dtype} * {coef}", nan_payload=False)
        want = [x.clone() for x in xs]
        scale_reference_(want, torch.tensor(coef, dtype=torch.float64))
        for g, w in zip(got, want):
            assert_floats_close(g.double(), w.double(), "scale_ vs reference", rtol=2**-7)


def test_scale_views_and_mixed_dtypes():
    base = torch.randn(8, 10)
    other = torch.randn(50, dtype=torch.bfloat16)
    want_base, want_other = base.clone(), other.clone()
    views = [base[:, ::2], base[1:, 1], other]
    BACKEND.scale_(views, torch.tensor(0.5, dtype=torch.float64))
    want_base[:, ::2] *= 0.5
    want_base[1:, 1] *= 0.5  # column 1 is not in ::2, so scaled once
    want_other = _expected_scale(want_other, 0.5)
    assert_bits_equal(base, want_base, "float32 base of strided views")
    assert_bits_equal(other, want_other, "bfloat16")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_by_one_writes_nothing(dtype):
    # A signalling NaN turns quiet under x * 1: unchanged bits mean nothing was rewritten.
    bits = {torch.float32: 0x7F800001, torch.float64: 0x7FF0000000000001, torch.float16: 0x7C01,
            torch.bfloat16: 0x7F81}[dtype]
    ib = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
          torch.bfloat16: torch.int16}[dtype]
    x = nasty(500, dtype, seed=5)
    x.view(ib)[::7] = bits
    before = x.clone()
    BACKEND.scale_([x, x[3:]], torch.tensor(1.0, dtype=torch.float64))
    assert_bits_equal(x, before, f"{dtype} after scale_ by 1")
    BACKEND.scale_([x], torch.tensor(1.0 + 2**-40, dtype=torch.float64))  # != 1: the pass runs
    if dtype == torch.float64:
        assert not torch.equal(x.view(ib), before.view(ib))


def test_scale_by_one_on_read_only_memory():
    # The strongest check: the tensor lives in pages mapped read-only, so any
    # store would crash the (separate) process.
    script = textwrap.dedent(
        """
        import mmap, os, torch
        os.environ["TRITON_INTERPRET"] = "1"
        from fastgrad.backends import get_backend
        buf = mmap.mmap(-1, 1 << 16)
        buf.write(torch.randn(1 << 14).numpy().tobytes())
        import ctypes
        libc = ctypes.CDLL(None)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        x = torch.frombuffer(buf, dtype=torch.float32)
        before = x.clone()
        assert libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(1 << 16), 1) == 0  # PROT_READ
        get_backend("triton").scale_([x, x[5:900]], torch.tensor(1.0, dtype=torch.float64))
        assert torch.equal(x, before)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"


# -- clamp_ ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", [1.3, 0.0, 1e-3, math.inf])
def test_clamp(dtype, clip):
    xs = [nasty(n, dtype, seed=n) for n in (0, 1, 127, 4097)]
    base = nasty(20 * 9, dtype, seed=11).reshape(20, 9)
    got = [x.clone() for x in xs]
    got_base = base.clone()
    fastgrad.dispatch.clamp_(got + [got_base[:, ::2], got_base[2:, 1]], clip, backend="triton")
    want = [x.clone() for x in xs]
    want_base = base.clone()
    clamp_reference_(want + [want_base[:, ::2], want_base[2:, 1]], clip)
    for g, w in zip(got + [got_base], want + [want_base]):
        assert_bits_equal(g, w, f"{dtype} clamp to {clip}", nan_payload=False)
        assert (g.isnan() == w.isnan()).all()


def test_clamp_and_scale_empty():
    BACKEND.clamp_([], 1.0)
    BACKEND.scale_([], torch.tensor(0.5, dtype=torch.float64))
    x = torch.zeros(0)
    BACKEND.clamp_([x], 1.0)
    BACKEND.scale_([x], torch.tensor(0.5, dtype=torch.float64))


# -- GPU ------------------------------------------------------------------------


def test_kernels_compile_for_gpu(tmp_path):
    # No GPU needed: Triton's front end, LLVM and the bundled ptxas build the
    # sm_90 kernels, which catches what the interpreter lets through (non-
    # constexpr globals, unsupported casts) and checks the loads vectorise.
    script = textwrap.dedent(
        """
        import os, sys
        import triton, triton.language as tl
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
            from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        except Exception as e:
            print("skip:", e); sys.exit(0)
        from fastgrad import triton_kernels as K
        assert not K.INTERPRETED
        target = GPUTarget("cuda", 90, 32)
        ptr = {"ptr_table": "*i64", "numels": "*i64", "chunk_row": "*i32", "chunk_start": "*i64"}

        def build(fn, sig, consts):
            sig = dict(sig, **{k: "constexpr" for k in consts})
            return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)

        try:
            first = build(K._stats_chunk_kernel, dict(ptr, ps="*fp64", fpart="*fp64", cpart="*i32"), dict(
                DTYPE=tl.float32, IS_F64=False, ALIGNED=True, CHUNK=65536, BLOCK=2048, NPP=1,
                SCALED=False, GENERIC_P=False, HIST=True, MIN_EXP=-64, NBINS=82, NSLOTS=128))
        except Exception as e:
            if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                print("skip:", e); sys.exit(0)
            raise
        assert "ld.global.v4.b32" in first.asm["ptx"], "fp32 statistics loads did not vectorise"
        for dt in (tl.bfloat16, tl.float16, tl.float64):
            f64 = dt == tl.float64
            build(K._stats_chunk_kernel, dict(ptr, ps="*fp64", fpart="*fp64", cpart="*i32"), dict(
                DTYPE=dt, IS_F64=f64, ALIGNED=False, CHUNK=65536, BLOCK=1024, NPP=4,
                SCALED=True, GENERIC_P=True, HIST=False, MIN_EXP=0, NBINS=1, NSLOTS=8))
            build(K._scale_kernel, dict(ptr, coef_ptr="*fp64"),
                  dict(DTYPE=dt, IS_F64=f64, ALIGNED=True, CHUNK=65536, BLOCK=2048))
            build(K._clamp_kernel, dict(ptr, bounds_at="i32"),
                  dict(DTYPE=dt, IS_F64=f64, ALIGNED=True, CHUNK=65536, BLOCK=2048))
        build(K._stats_reduce_kernel, {"chunk_range": "*i64", "ps": "*fp64", "fpart": "*fp64",
              "cpart": "*i32", "floats": "*fp64", "counts": "*i64"},
              dict(NP=3, NPP=4, NC=86, NSLOTS=128, BW=32))
        build(K._stats_total_kernel, {"ps": "*fp64", "floats": "*fp64", "counts": "*i64", "T": "i32"},
              dict(NP=3, NPP=4, NC=86, NSLOTS=128, BW=32))
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    if r.returncode == 0 and r.stdout.startswith("skip:"):
        pytest.skip(f"cannot compile for the GPU here: {r.stdout.strip()}")
    assert r.returncode == 0 and "ok" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_kernels():
    # A fresh process without TRITON_INTERPRET, so the kernels compile for the GPU.
    script = textwrap.dedent(
        """
        import math, torch
        from fastgrad.backends import get_backend
        from fastgrad.reference import stats_reference
        from fastgrad.spec import make_spec
        b = get_backend("triton")
        dev = torch.device("cuda")
        assert b.why_not(dev, torch.float32) is None, b.why_not(dev, torch.float32)
        torch.manual_seed(0)
        ts = [torch.randn(n, device=dev).to(dt) for n, dt in
              [(3, torch.float32), (1 << 20, torch.bfloat16), (70000, torch.float64), (0, torch.float16)]]
        ts[0][1] = math.nan
        ts += [torch.randn(64, 48, device=dev).t(), torch.randn(64, 48, device=dev)[:, ::2]]
        spec = make_spec((2, 1, 3, "inf"), True)
        got, want = b.stats(ts, spec).raw, stats_reference(ts, spec)
        ok = (got.floats - want.floats).abs() <= 1e-6 * want.floats.abs()
        ok |= (got.floats == want.floats) | (got.floats.isnan() & want.floats.isnan())
        assert ok.all(), (got.floats, want.floats)
        assert torch.equal(got.counts, want.counts)
        again = b.stats(ts, spec).raw
        assert torch.equal(again.floats.nan_to_num(), got.floats.nan_to_num())
        x = torch.randn(5000, device=dev, dtype=torch.bfloat16)
        y = x.clone()
        b.scale_([y], torch.tensor(0.3, device=dev, dtype=torch.float64))
        assert torch.equal(y, (x.float() * 0.3).to(torch.bfloat16))
        b.scale_([y], torch.tensor(1.0, device=dev, dtype=torch.float64))
        b.clamp_([y], 0.1)
        assert torch.equal(y, (x.float() * 0.3).to(torch.bfloat16).clamp(-0.1, 0.1))
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
