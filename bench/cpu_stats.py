"""CPU benchmark: fastgrad's full statistics pass against torch on realistic gradient sets.

    python bench/cpu_stats.py [--quick] [--dtypes float32,bfloat16]

For each parameter set and dtype it times
  * fastgrad.grad_stats (norm, max|x|, NaN/Inf/zero counts, 82-bin histogram,
    per tensor and total) with the C++ CPU backend,
  * (a) torch._foreach_norm alone (what clip_grad_norm_ reads),
  * (b) the torch composite computing the same numbers: foreach norms,
    per-tensor abs-max, non-finite and zero counts, torch.histc of log2|x|,
  * fastgrad.grad_stats(params=True) without histograms: weights read in the same call
    (its GB/s and % count gradient + weight bytes: the target is one more read, no more),
and prints ms, GB/s (gradient bytes read once), % of the bandwidth of x.sum()
over a flat tensor of the same dtype and bytes (timed round-robin with the
rows, so that load from other processes hits all alike), and the speed-up
over (a) and (b).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import fastgrad  # noqa: E402
from harness import nbytes, table, timeit, timeit_interleaved  # noqa: E402
from param_sets import make, sets  # noqa: E402

HIST = fastgrad.HistogramSpec()


def torch_composite(grads):
    """Per-tensor norm, abs-max, NaN/Inf/zero counts and log2 histogram with plain torch ops."""
    norms = torch._foreach_norm(grads, 2.0)
    maxes = [g.abs().max() for g in grads]
    nonfinite = [(~g.isfinite()).sum() for g in grads]
    zeros = [(g == 0).sum() for g in grads]
    hists = [torch.histc(g.float().abs().log2(), bins=HIST.num_bins, min=HIST.min_exp - 1,
                         max=HIST.max_exp + 1) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms)), maxes, nonfinite, zeros, hists


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args(argv)
    assert fastgrad.available_backends("cpu")["cpu"] is None, fastgrad.available_backends("cpu")["cpu"]

    reps = 5 if args.quick else 15
    print(f"# fastgrad CPU statistics benchmark — {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("# yardstick per row: x.sum() over one flat tensor of the same dtype and byte count, timed")
    print("# round-robin with the rows it is compared to (best of each), so machine load hits all alike\n")
    rows = []
    for set_name, shapes in sets(args.quick).items():
        for dt_name in args.dtypes.split(","):
            dtype = getattr(torch, dt_name)
            grads = make(shapes, dtype)
            flat = torch.randn(sum(g.numel() for g in grads)).to(dtype)
            gb = nbytes(grads) / 1e9
            slow = sum(g.numel() for g in grads) > 10_000_000
            params = [torch.nn.Parameter(torch.randn_like(g)) for g in grads]
            for p_, g in zip(params, grads):
                p_.grad = g
            t = timeit_interleaved({
                "fastgrad full stats": lambda: fastgrad.grad_stats(grads, backend="cpu").total_norm,
                "fastgrad, no histogram": lambda: fastgrad.grad_stats(grads, backend="cpu", histogram=False)
                .total_norm,
                "fastgrad, no histogram, + weights": lambda: fastgrad.grad_stats(
                    params, backend="cpu", histogram=False, params=True).total_norm,
                "(a) torch _foreach_norm": lambda: torch._foreach_norm(grads, 2.0),
                "x.sum()": lambda: flat.sum(),
            }, reps=reps)
            t["(b) torch composite"] = timeit(lambda: torch_composite(grads), reps=2 if slow else 5, warmup=1)
            t_sum, t_fe, t_comp = t.pop("x.sum()"), t["(a) torch _foreach_norm"], t["(b) torch composite"]
            for impl, ti in t.items():
                k = 2 if impl.endswith("+ weights") else 1  # gradient + weight bytes
                rows.append({
                    "set": set_name, "dtype": dt_name, "impl": impl, "ms": ti * 1e3, "GB/s": k * gb / ti,
                    "x.sum() GB/s": gb / t_sum, "% of x.sum() BW": 100 * k * t_sum / ti,
                    "vs (a)": t_fe / ti, "vs (b)": t_comp / ti,
                })
    print(table(rows, ["set", "dtype", "impl", "ms", "GB/s", "x.sum() GB/s", "% of x.sum() BW", "vs (a)",
                       "vs (b)"]))
    print("\n'vs' columns: how many times faster than (a) / (b) (>1 = this row is faster).")


if __name__ == "__main__":
    main()
