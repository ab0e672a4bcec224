"""A small GPU workload for compute-sanitizer (memcheck, racecheck, synccheck); bench/gpu_session.sh runs it.

    compute-sanitizer --tool memcheck --error-exitcode 3 python tools/gpu_sanitize.py [cuda triton]

For each GPU backend available (default: cuda and triton): statistics with the
widest histogram (the CUDA kernel's shared-memory opt-in) and with six norm
types, over a chunk-crossing float32 tensor, a misaligned bfloat16 view,
empty tensors, a float64 tensor and a transposed view; then scale_ and
clamp_ over the same list (general and fast forms), and the empty list.
Results are checked against the float64 reference so a wrong answer is
reported even where the sanitizer sees nothing. Sizes are small: the
sanitizer slows kernels down 10-100x. Exit status 1 if any result is wrong.
"""

from __future__ import annotations

import sys

import torch

from fastgrad import dispatch
from fastgrad.backends import get_backend
from fastgrad.reference import stats_reference
from fastgrad.spec import HistogramSpec, StatsSpec, make_spec


def _close(got, want) -> bool:
    if not torch.equal(got.counts.cpu(), want.counts):
        return False
    g, w = got.floats.cpu(), want.floats
    same = (g == w) | (g.isnan() & w.isnan())
    return bool((same | ((g - w).abs() <= 1e-6 * w.abs())).all())


def run(name: str) -> int:
    b = get_backend(name)
    dev = torch.device("cuda")
    reason = b.why_not(dev, torch.float32)
    if reason is not None:
        print(f"{name}: skipped ({reason})")
        return 0
    torch.manual_seed(0)
    base = torch.randn(70_001, device=dev).bfloat16()
    ts = [torch.randn(65_537, device=dev) * torch.exp2(torch.randint(-40, 10, (65_537,), device=dev).float()),
          base[3:],  # misaligned bfloat16 view
          torch.empty(0, device=dev), torch.empty(0, dtype=torch.bfloat16, device=dev),
          torch.randn(1000, dtype=torch.float64, device=dev) * 1e200,
          torch.randn(33, 17, device=dev).t()]
    ts[0][7] = float("nan")
    bad = 0
    for spec in (StatsSpec((2.0, 1.0), HistogramSpec(-126, 128)), make_spec((2, 1, 3, "inf", 0.5, 7), True)):
        res = b.stats(ts, spec)
        torch.cuda.synchronize()
        want = stats_reference([t.cpu() for t in ts], spec)
        ok = _close(res.raw, want)
        print(f"{name}: stats, {spec.num_count_cols - 4} bins, {len(spec.finite_norms)} norms: {'ok' if ok else 'WRONG'}")
        bad += not ok
    plain = ts[:5]
    coef = torch.tensor(0.5, dtype=torch.float64, device=dev)
    want = [t.cpu() for t in ts]
    b.scale_(ts, coef)
    b.clamp_(ts, 0.1)
    dispatch.scale_(plain, coef, backend=name)  # the fast form where the backend has one
    dispatch.clamp_(plain, 0.05, backend=name)
    dispatch.compute(plain, make_spec((2.0,), True), name)
    b.scale_([], coef)
    b.clamp_([], 1.0)
    torch.cuda.synchronize()
    for i, (t, w) in enumerate(zip(ts, want)):
        c = 0.5 if t.dtype == torch.float64 else torch.tensor(0.5)
        w = (w * c).clamp(-0.1, 0.1)
        if i < 5:
            w = (w * c).clamp(-0.05, 0.05)
        ok = torch.equal(t.cpu().isnan(), w.isnan()) and torch.equal(t.cpu().nan_to_num(), w.nan_to_num())
        if not ok:
            print(f"{name}: scale_/clamp_ WRONG on tensor {i} ({t.dtype}, {tuple(t.shape)})")
            bad += 1
    print(f"{name}: scale_/clamp_ {'ok' if not bad else 'see above'}")
    return bad


def main(argv) -> int:
    names = argv or ["cuda", "triton"]
    bad = sum(run(n) for n in names)
    print("sanitize workload done", "with WRONG results" if bad else "")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
