"""Triton-specific tests: backend choice, chunk planning and launch counts, small chunks, read-only
memory, and compilation for the GPU. What every backend must do (values, sizes, layouts, totals,
scale_/clamp_) is checked for Triton by the conformance matrix, tests/test_backends.py.

Triton decides compiled versus interpreted when ``fastgrad.triton_kernels`` is
first imported; tests/conftest.py fixes that once for the whole session
(``TRITON_INTERPRET=1`` when no GPU is present), so these tests no longer
depend on which file imported the kernels first. They run on CPU tensors
under the interpreter and on CUDA tensors when the kernels are compiled. If
Triton is installed but can run in neither mode, the tests that need the
kernels FAIL (with the reason) instead of skipping.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from fastgrad import triton_kernels as K  # noqa: E402
from fastgrad.backends import get_backend  # noqa: E402
from fastgrad.reference import stats_reference  # noqa: E402
from fastgrad.spec import make_spec  # noqa: E402

from conftest import assert_bits_equal, assert_raw_close, reference_stats  # noqa: E402

pytestmark = [
    # The interpreter evaluates with numpy, which warns on IEEE results such as inf * 0, and on
    # overflow to inf (float64 norms beyond 1.8e308 are inf, as in the reference).
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

BACKEND = get_backend("triton")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DEVICE = torch.device("cpu" if K.INTERPRETED else "cuda")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def dev() -> torch.device:
    """The device the kernels run on in this session; a failure (not a skip) if they run nowhere."""
    reason = BACKEND.why_not(DEVICE, torch.float32)
    if reason is not None:
        pytest.fail(f"Triton is installed but its kernels cannot run in this session ({DEVICE}: {reason}). "
                    "tests/conftest.py sets TRITON_INTERPRET=1 without a GPU; on a GPU machine unset it.")
    return DEVICE


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


def test_why_not(dev):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for dt in DTYPES:
        assert BACKEND.why_not(dev, dt) is None
    assert "not supported" in BACKEND.why_not(dev, torch.int32)
    if K.INTERPRETED:
        # Interpreted kernels dereference the pointer table on the host: never CUDA memory.
        assert "TRITON_INTERPRET" in BACKEND.why_not(cuda, torch.float32)
    else:
        assert "TRITON_INTERPRET" in BACKEND.why_not(cpu, torch.float32)
    assert BACKEND.why_not(torch.device("meta"), torch.float32) is not None


def test_why_not_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in BACKEND.why_not(torch.device("cpu"), torch.float32)


# -- statistics: chunk planning and launches ------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_many_small_chunks(dev, dtype):
    """chunk=128 makes every combine path run on small inputs: scaled float64 chunks 1e-300 apart,
    runs of zero chunks, NaN/Inf in one chunk only; rows and the total row against the reference."""
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
    ts = [t.to(dev) for t in (x, z, w, x[:129], x[:1])]
    spec = make_spec((2, 1, 3, 7, "inf"), True)
    raw, numel, total = K.grad_stats_full(ts, spec, chunk=128)
    want_rows, want_total = reference_stats(ts, spec)
    assert_raw_close(raw, want_rows, what=f"{dtype} rows, chunk=128")
    assert_raw_close(total, want_total, what=f"{dtype} total row, chunk=128")
    assert numel.tolist() == [t.numel() for t in ts] + [sum(t.numel() for t in ts)]
    assert_raw_close(K.grad_stats(ts, spec, chunk=128), stats_reference([t.cpu() for t in ts], spec))


def test_planned_once_one_launch_per_dtype_and_deterministic(dev, monkeypatch):
    ts = [nasty(5000, torch.float32, seed=2), nasty(300, torch.bfloat16, seed=3), torch.randn(10, dtype=torch.float64)]
    ts = [t.to(dev) for t in ts]
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
    monkeypatch.setattr(K, "_stats_total_kernel", Count(K._stats_total_kernel))
    again = BACKEND.stats(ts, spec).raw
    assert len(K._PLANS) == plans, "a second call with the same shapes built a new plan"
    assert len(launches) == 3 + 2, f"expected one launch per dtype plus reduce and total, got {launches}"
    assert_bits_equal(again.floats, first.floats, "floats of two identical calls")
    assert torch.equal(again.counts, first.counts), "counts of two identical calls"


# -- in-place ops on memory no store may touch ------------------------------------


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
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"


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
                       cwd=ROOT, timeout=300)
    if r.returncode == 0 and r.stdout.startswith("skip:"):
        pytest.skip(f"cannot compile for the GPU here: {r.stdout.strip()}")
    assert r.returncode == 0 and "ok" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
