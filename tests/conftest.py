"""Shared test inputs: the dtype / size / layout / value matrix every backend is checked on.

Triton mode for the whole session: Triton decides compiled versus interpreted
when ``fastgrad.triton_kernels`` is first imported (at kernel definition), so
whichever test file imported it first used to decide for every other file.
Here, before any test file or fastgrad module is imported: without a GPU,
``TRITON_INTERPRET=1`` is set for the session (the Triton backend then runs on
CPU tensors; the dispatcher never picks it automatically for CPU tensors, so
no other test is diverted to the interpreter); with a GPU nothing is set and
the kernels compile. An explicit ``TRITON_INTERPRET`` in the environment wins.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
if TRITON_INSTALLED and not HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

from fastgrad.reference import stats_reference  # noqa: E402  (after TRITON_INTERPRET is decided)
from fastgrad.spec import RawStats, StatsSpec  # noqa: E402

TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def pytest_report_header(config):
    triton = ("not installed" if not TRITON_INSTALLED
              else "interpreted (TRITON_INTERPRET=1: CPU tensors)" if TRITON_INTERPRETED
              else "compiled (CUDA tensors)")
    return f"fastgrad: CUDA device {'present' if HAS_CUDA else 'absent'}; Triton kernels {triton}"


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [0, 1, 2, 127, 4097, 65537, 200_003]  # 65537 and 200_003 cross the 65536 chunk size
NORM_TYPES = (2.0, 1.0, 3.0, 0.5, float("inf"))
REL_TOL = 1e-6  # the project's accuracy target for every norm, any size and dtype


def nasty_values(dtype: torch.dtype) -> torch.Tensor:
    """Zeros of both signs, subnormals, extremes of the dtype, NaN and ±Inf."""
    info = torch.finfo(dtype)
    vals = [0.0, -0.0, 1.0, -1.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max,
            info.eps, float("nan"), float("inf"), float("-inf")]
    if dtype == torch.float32:
        vals += [1e30, -1e30, 1e-40]
    if dtype == torch.float64:
        vals += [1e200, 1e-200, 1e-310]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


def make_tensor(n: int, dtype: torch.dtype, kind: str = "normal", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + n)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "wide":  # magnitudes spread over ~60 binades
        x = x * torch.exp2(torch.randint(-45, 15, (n,), generator=g).to(torch.float64))
    elif kind == "relu":
        x = x.clamp_min(0)
    elif kind == "tiny":
        x = x * 2.0**-60
    return x.to(dtype)


CHUNK = 1 << 16  # every backend's chunk: C++ kChunk, CUDA chunk_size(), Triton CHUNK
ODD_OFFSETS = (1, 2, 3, 5)  # element offsets that misalign a view's pointer for every dtype (k * size % 16 != 0)
LAYOUT_BASE_NUMEL = 840  # = 24 * 35 = 2 * 12 * 5 * 7

# Views of a 1-D base of LAYOUT_BASE_NUMEL elements that can be written in place (no element aliases
# another): applied to the base on the tensor's own device, so offsets and strides survive (a view made
# on the CPU and then moved with .cuda() arrives compacted: offset 0, dense).
WRITABLE_VIEWS = {
    "transposed": lambda b: b.reshape(24, 35).t(),
    "column_slice": lambda b: b.reshape(24, 35)[:, ::2],
    "block": lambda b: b.reshape(24, 35)[3:7, 5:],
    "transposed_step": lambda b: b.reshape(24, 35).t()[::3],
    "permuted_strided": lambda b: b.reshape(2, 12, 5, 7).permute(3, 1, 0, 2)[::2],
    **{f"offset_{k}": (lambda b, k=k: b[k:]) for k in ODD_OFFSETS},
    "offset_3_column_slice": lambda b: b[3 : 3 + 24 * 34].reshape(24, 34)[:, ::2],
}


def layout_base(dtype: torch.dtype, device="cpu", seed: int = 3) -> torch.Tensor:
    """The 1-D base tensor the views of :data:`WRITABLE_VIEWS` are taken from, made on ``device``."""
    return make_tensor(LAYOUT_BASE_NUMEL, dtype, "wide", seed=seed).to(device)


def layouts(dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
    """Non-contiguous and misaligned views a gradient can arrive as, made on ``device`` itself."""
    base = layout_base(dtype, device)
    out = {name: f(base) for name, f in WRITABLE_VIEWS.items()}
    out["channels_last"] = base.reshape(2, 12, 5, 7).contiguous(memory_format=torch.channels_last)
    out["expanded"] = make_tensor(35, dtype).to(device).reshape(1, 35).expand(4, 35)
    return out


# -- the float64 reference, cached ----------------------------------------------------------

_REF_CACHE: dict = {}


def _digest(tensors) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    for t in tensors:
        h.update(repr((t.dtype, t.numel())).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def reference_stats(tensors, spec: StatsSpec) -> tuple[RawStats, RawStats]:
    """``(rows, total)`` of ``tensors`` by the float64 reference, computed on CPU copies.

    The total row is the reference of the concatenation of every element (as
    float64, an exact upcast), independent of any backend's way of combining
    rows. Cached by the tensors' bytes: the backend matrix asks for the same
    inputs once per backend.
    """
    cpu = [t.detach().cpu() for t in tensors]
    key = (_digest(cpu), spec)
    hit = _REF_CACHE.get(key)
    if hit is None:
        rows = stats_reference(cpu, spec)
        flat = torch.cat([t.reshape(-1).double() for t in cpu]) if cpu else torch.zeros(0, dtype=torch.float64)
        total = stats_reference([flat], spec)
        if len(_REF_CACHE) >= 512:
            _REF_CACHE.clear()
        hit = _REF_CACHE[key] = (rows, total)
    return hit


def expected_scale(x: torch.Tensor, coef: float) -> torch.Tensor:
    """``x * coef`` built as torch computes it on the CPU: a float64 multiply for float64, float32 op-math
    (``coef`` rounded to float32, one rounding to the dtype) otherwise. A new CPU tensor."""
    c = torch.tensor(coef, dtype=torch.float64)
    x = x.detach().cpu().clone()
    return x.mul_(c if x.dtype == torch.float64 else c.to(torch.float32))


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str = "", nan_payload: bool = True,
                      any_nan_where: torch.Tensor | None = None) -> None:
    """Bitwise equality of two tensors of one dtype (compared on the CPU).

    ``nan_payload=False``: any NaN matches any NaN (torch canonicalises NaNs);
    ``any_nan_where``: a bool mask of the places where that holds (elsewhere, bits must match,
    e.g. a signalling NaN outside a written view must survive untouched).
    """
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    g, w = got.detach().cpu().reshape(-1), want.detach().cpu().reshape(-1)
    ib = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[g.element_size()]
    bad = g.view(ib) != w.view(ib)
    both_nan = g.isnan() & w.isnan()
    if any_nan_where is not None:
        bad &= ~(both_nan & any_nan_where.cpu().reshape(-1))
    elif not nan_payload:
        bad &= ~both_nan
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        rows = [f"  [{i}]: got {g[i].item()!r} ({g.view(ib)[i].item():#x}) / want {w[i].item()!r} "
                f"({w.view(ib)[i].item():#x})" for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ:\n" + "\n".join(rows))


def assert_raw_close(got: RawStats, want: RawStats, rel: float = REL_TOL, what: str = "",
                     names=None) -> None:
    """Counts/histograms exactly equal; floats within ``rel`` with identical NaN/Inf pattern.

    ``names`` (one per row) label the first differing row in the message.
    """
    assert got.floats.shape == want.floats.shape, (what, got.floats.shape, want.floats.shape)
    assert got.counts.shape == want.counts.shape, (what, got.counts.shape, want.counts.shape)
    assert got.floats.dtype == torch.float64 and got.counts.dtype == torch.int64, (what, got.floats.dtype,
                                                                                   got.counts.dtype)

    def label(r):
        return f"row {r}" + (f" ({names[r]})" if names is not None and r < len(names) else "")

    gc, wc = got.counts.cpu(), want.counts.cpu()
    if not torch.equal(gc, wc):
        bad = (gc != wc).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: counts differ at {[(label(i), j) for i, j in bad]}: got "
                             f"{[gc[i][j].item() for i, j in bad]}, want {[wc[i][j].item() for i, j in bad]}")
    gf, wf = got.floats.cpu().to(torch.float64), want.floats.cpu()
    special = (gf.isnan() != wf.isnan()) | (gf.isinf() != wf.isinf()) | (gf.isinf() & wf.isinf() & (gf != wf))
    finite = wf.isfinite() & gf.isfinite()
    err = torch.where(finite, (gf - wf).abs() / wf.abs().clamp_min(1e-300), 0.0)
    bad = special | (err > rel)
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: floats differ at {int(bad.sum())} places (max rel err {err.max().item():.3g}); "
                             f"first at {label(r)}, column {c}: got {gf[r, c].item()!r}, want {wf[r, c].item()!r}\n"
                             f" got row  {gf[r].tolist()}\n want row {wf[r].tolist()}")


has_cuda = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")


def spawn_ranks(entry, args: tuple, world: int, timeout: float, what: str) -> None:
    """Run ``entry(rank, *args)`` in ``world`` spawned processes; kill them all and fail the test
    if the run has not finished within ``timeout`` seconds (a hung collective must not hang CI)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(entry, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world}-rank run {what} did not finish in {timeout}s")
