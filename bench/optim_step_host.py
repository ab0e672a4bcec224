"""Host cost of a wrapped optimizer step: fastgrad.wrap(fused AdamW, max_norm) against torch.

    python bench/optim_step_host.py [--params 16] [--numel 16] [--rounds 40] [--calls 100] [--wall]

CPU tensors so small that every kernel is ~free: what is timed is the host's work per step (on a
GPU, most of it is kernel launches). One thread; the variants run round-robin in one process,
``--calls`` calls per timing, best of ``--rounds`` each. The clock is the thread's CPU time
(``time.thread_time``: time the shared machine gives to other processes is not counted;
``--wall`` for wall time).

* ``plain``         ``opt.step()``                                   (torch fused AdamW)
* ``torch_clip``    ``clip_grad_norm_(params, 1.0); opt.step()``
* ``fastgrad``      ``fastgrad.wrap(opt, max_norm=1.0).step()``       (skip_nonfinite on)

and the number of top-level aten ops each runs (torch.profiler: ops not nested in another aten op).
Targets (issue #10): fastgrad at most torch_clip, and within 1.3x of plain.

The floor rows say what the wrapped step cannot go below with today's C++ calls (the lean lane,
fastgrad/optim/lane.py, adds Python glue to exactly these):

* ``floor``         ``plain`` with ``grad_scale`` set, plus the statistics call alone
                    (``_C.grad_stats_list`` into a preallocated buffer): the two calls a clipped
                    fused step must make.
* ``plain + empty`` ``plain`` plus one ``torch.empty``: the cost of interleaving *any* small
                    work with a step run back to back (its caches and predictors are no longer
                    its own); compare with ``empty alone``.
* ``stats call``, ``prepare``: the C++ statistics call alone, and the guard's whole
  statistics + epilogue stage alone (``Guard.prepare``, the lane).
"""

from __future__ import annotations

import argparse
import time

import torch

import fastgrad
from fastgrad.optim.folding import folded_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=16)
    ap.add_argument("--numel", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--wall", action="store_true", help="wall time instead of the thread's CPU time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from harness import per_call, table, top_level_ops

    def params():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.params)]
        for p in ps:
            p.grad = torch.randn(args.numel) * 0.1  # clipped by max_norm=1 (norm ~ 0.1 sqrt(P N))
        return ps

    p_plain, p_clip, p_fg, p_floor = params(), params(), params(), params()
    plain = torch.optim.AdamW(p_plain, lr=1e-3, fused=True)
    ref = torch.optim.AdamW(p_clip, lr=1e-3, fused=True)
    wrapped = fastgrad.wrap(torch.optim.AdamW(p_fg, lr=1e-3, fused=True), max_norm=1.0)
    floor_opt = torch.optim.AdamW(p_floor, lr=1e-3, fused=True)

    def torch_clip():
        torch.nn.utils.clip_grad_norm_(p_clip, 1.0)
        ref.step()

    # the floor: the statistics call into a preallocated buffer, and the step with grad_scale
    from fastgrad import _C
    from fastgrad.spec import DTYPES_BY_CODE

    T = len(p_floor)
    buf = torch.empty(8 * (T + 1) + 8, dtype=torch.float64)
    base = buf.data_ptr()
    grad_scale = torch.tensor(0.5)

    def stats_call():
        _C.grad_stats_list([p.grad for p in p_floor], torch.Tensor, DTYPES_BY_CODE, torch.strided, [2.0], False,
                           0, 1, base, base + 8 * 2 * (T + 1), base + 8 * 6 * (T + 1), 1)

    def floor():
        stats_call()
        folded_step(floor_opt, grad_scale, None)

    guard, groups = wrapped._guard, wrapped.optimizer.param_groups
    fns = {"plain": plain.step, "torch_clip": torch_clip, "fastgrad": wrapped.step,
           "floor": floor,
           "plain + empty": lambda: (torch.empty(8 * T + 16, dtype=torch.float64), plain.step()),
           "empty alone": lambda: torch.empty(8 * T + 16, dtype=torch.float64),
           "stats call": stats_call,
           "prepare": lambda: guard.prepare(groups, None, None)}
    ops = {k: top_level_ops(fns[k]) for k in ("plain", "torch_clip", "fastgrad")}
    clock = time.perf_counter if args.wall else time.thread_time
    best = per_call(fns, args.calls, args.rounds, clock, warmup=max(20, args.calls))
    rows = [{"variant": k, "host us": best[k] * 1e6, "x plain": best[k] / best["plain"],
             "x torch_clip": best[k] / best["torch_clip"], "aten ops": len(ops[k]) if k in ops else ""}
            for k in fns]
    print(f"torch {torch.__version__}, 1 thread, {args.params} CPU parameters of {args.numel} elements, "
          f"best of {args.rounds} x {args.calls} calls interleaved, {'wall' if args.wall else 'thread CPU'} time")
    print(table(rows, ["variant", "host us", "x plain", "x torch_clip", "aten ops"]))
    print("fastgrad ops:", " ".join(o.removeprefix("aten::") for o in ops["fastgrad"]))
    fg, pl = best["fastgrad"], best["plain"]
    us = {k: v * 1e6 for k, v in best.items()}
    print(f"fastgrad - plain = {us['fastgrad'] - us['plain']:.1f} us: prepare alone {us['prepare']:.1f} "
          f"(of which the statistics call {us['stats call']:.1f}); interleaving cost of one torch.empty "
          f"{us['plain + empty'] - us['plain'] - us['empty alone']:.1f}; the rest (grad_scale in the step, "
          f"the wrapper, interleaving) {us['fastgrad'] - us['plain'] - us['prepare']:.1f}")
    print(f"floor (plain with grad_scale + the statistics call) = {best['floor'] / pl:.2f}x plain")
    print(f"target fastgrad <= torch_clip: {'met' if fg <= best['torch_clip'] else 'MISSED'}; "
          f"fastgrad <= 1.3x plain: {'met' if fg <= 1.3 * pl else 'MISSED'} ({fg / pl:.2f}x)")


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
