"""Host cost of a wrapped optimizer step: fastgrad.wrap(fused AdamW, max_norm) against torch.

    python bench/optim_step_host.py [--params 16] [--numel 16] [--reps 400]

CPU tensors so small that every kernel is ~free: what is timed is the host's work per step (on a
GPU, most of it is kernel launches). One thread; the variants run round-robin in one process
(harness.timeit_interleaved), best time each:

* ``plain``       ``opt.step()``                                     (torch fused AdamW)
* ``torch_clip``  ``clip_grad_norm_(params, 1.0); opt.step()``
* ``fastgrad``    ``fastgrad.wrap(opt, max_norm=1.0).step()``         (skip_nonfinite on)

and the number of top-level aten ops each runs (torch.profiler: ops not nested in another aten op).
Targets (issue #10): fastgrad at most torch_clip, and within 1.3x of plain.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import table, timeit_interleaved

import fastgrad


def top_level_ops(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out = []
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        par = e.cpu_parent
        while par is not None and not par.name.startswith("aten::"):
            par = par.cpu_parent
        if par is None:
            out.append(e.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=16)
    ap.add_argument("--numel", type=int, default=16)
    ap.add_argument("--reps", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)

    def params():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.params)]
        for p in ps:
            p.grad = torch.randn(args.numel) * 0.01
        return ps

    p_plain, p_clip, p_fg = params(), params(), params()
    plain = torch.optim.AdamW(p_plain, lr=1e-3, fused=True)
    ref = torch.optim.AdamW(p_clip, lr=1e-3, fused=True)
    wrapped = fastgrad.wrap(torch.optim.AdamW(p_fg, lr=1e-3, fused=True), max_norm=1.0)

    def torch_clip():
        torch.nn.utils.clip_grad_norm_(p_clip, 1.0)
        ref.step()

    names = [f"[{i}]" for i in range(len(p_fg))]
    fns = {"plain": plain.step, "torch_clip": torch_clip, "fastgrad": wrapped.step,
           # the statistics pass alone, as the wrapped step requests it: the part of fastgrad's
           # time that is grad_stats' rather than the step's (epilogue, folding, bookkeeping)
           "(grad_stats alone)": lambda: fastgrad.grad_stats(p_fg, names=names, norm_types=(2.0,),
                                                             histogram=False)}
    ops = {k: top_level_ops(f) for k, f in fns.items()}
    best = timeit_interleaved(fns, reps=args.reps, warmup=20)
    rows = [{"variant": k, "host us": best[k] * 1e6, "x plain": best[k] / best["plain"],
             "x torch_clip": best[k] / best["torch_clip"], "aten ops": len(ops[k])} for k in fns]
    print(f"torch {torch.__version__}, 1 thread, {args.params} CPU parameters of {args.numel} elements, "
          f"best of {args.reps} interleaved")
    print(table(rows, ["variant", "host us", "x plain", "x torch_clip", "aten ops"]))
    print("fastgrad ops:", " ".join(o.removeprefix("aten::") for o in ops["fastgrad"]))
    fg = best["fastgrad"]
    rest = fg - best["plain"] - best["(grad_stats alone)"]
    print(f"fastgrad = plain {best['plain'] * 1e6:.1f} + grad_stats {best['(grad_stats alone)'] * 1e6:.1f} "
          f"+ the rest of the wrapped step {rest * 1e6:.1f} us (epilogue, folding, bookkeeping)")
    print(f"target fastgrad <= torch_clip: {'met' if fg <= best['torch_clip'] else 'MISSED'}; "
          f"fastgrad <= 1.3x plain: {'met' if fg <= 1.3 * best['plain'] else 'MISSED'} ({fg / best['plain']:.2f}x)")


if __name__ == "__main__":
    main()
