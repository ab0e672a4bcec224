"""Kernel-development loop: exactness against the reference on nasty inputs, then 1e8-element timings.

    python bench/cpu_kernel_quick.py

For the full benchmark tables use bench/cpu_stats.py.
"""
import time

import torch

import fastgrad
from fastgrad.backends.cpu import BACKEND as CPU
from fastgrad.reference import stats_reference
from fastgrad.spec import make_spec

torch.manual_seed(0)
spec = make_spec((2, 1, 3, "inf"), True)
nasty = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, 3.0, 1e30, -1e-30])
ts = [torch.randn(1000), torch.randn(70000) * 1e-3, torch.randn(5, 7).t(), torch.randn(10, 10)[:, ::3],
      nasty, torch.cat([nasty] * 50), torch.randn(300, dtype=torch.bfloat16), torch.randn(300, dtype=torch.float16),
      torch.randn(100000, dtype=torch.float64) * 1e200, torch.empty(0), torch.randn(4097) * 2.0 ** -60,
      torch.randn(200001).relu()]
r, c = stats_reference(ts, spec), CPU.stats(ts, spec).raw
assert torch.equal(r.counts, c.counts), "counts differ"
rel = ((r.floats - c.floats).abs() / r.floats.abs()).nan_to_num(0.0, 0.0, 0.0).max().item()
assert rel < 1e-12 and torch.equal(r.floats.isnan(), c.floats.isnan()), rel
print("correct; max rel err", rel)

x = torch.randn(10**8)
def best(f, n=7):
    f(); b = 1e9
    for _ in range(n):
        s = time.perf_counter(); f(); b = min(b, time.perf_counter() - s)
    return b
for dt in (torch.float32, torch.bfloat16):
    y = x.to(dt)
    ts_ = best(lambda: y.sum())
    for h in (True, False):
        tt = best(lambda: fastgrad.grad_stats([y], histogram=h))
        print(f"{dt} hist={h}: {tt*1e3:.1f} ms, {y.numel()*y.element_size()/tt/1e9:.1f} GB/s, "
              f"{ts_/tt*100:.0f}% of x.sum() ({ts_*1e3:.1f} ms)")
