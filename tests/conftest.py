"""Shared test inputs: the dtype / size / layout / value matrix every backend is checked on."""

from __future__ import annotations

import pytest
import torch

from fastgrad.spec import RawStats

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


def layouts(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Non-contiguous views a gradient can arrive as."""
    base = make_tensor(6 * 35 * 4, dtype, "wide", seed=3)
    m = base.reshape(24, 35)
    nchw = base.reshape(2, 12, 5, 7)
    return {
        "transposed": m.t(),
        "column_slice": m[:, ::2],
        "offset_view": base[1:],
        "channels_last": nchw.contiguous(memory_format=torch.channels_last),
        "permuted_strided": nchw.permute(3, 1, 0, 2)[::2],
        "expanded": make_tensor(35, dtype).reshape(1, 35).expand(4, 35),
    }


def assert_raw_close(got: RawStats, want: RawStats, rel: float = REL_TOL, what: str = "") -> None:
    """Counts/histograms exactly equal; floats within ``rel`` with identical NaN/Inf pattern."""
    assert got.floats.shape == want.floats.shape, (what, got.floats.shape, want.floats.shape)
    assert got.counts.shape == want.counts.shape, (what, got.counts.shape, want.counts.shape)
    gc, wc = got.counts.cpu(), want.counts.cpu()
    if not torch.equal(gc, wc):
        bad = (gc != wc).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: counts differ at {bad}: got {[gc[i][j].item() for i, j in bad]}, "
                             f"want {[wc[i][j].item() for i, j in bad]}")
    gf, wf = got.floats.cpu().to(torch.float64), want.floats.cpu()
    same_special = torch.equal(gf.isnan(), wf.isnan()) and torch.equal(gf.isinf(), wf.isinf())
    finite = wf.isfinite() & gf.isfinite()
    err = ((gf - wf).abs() / wf.abs().clamp_min(1e-300))[finite]
    if not same_special or (err.numel() and err.max() > rel):
        i = int(err.argmax()) if err.numel() else 0
        raise AssertionError(f"{what}: floats differ (max rel err {err.max() if err.numel() else 'n/a'}, "
                             f"at flat finite index {i})\n got  {gf}\n want {wf}")


has_cuda = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")
