"""Host cost per call: fastgrad's Python/C++ layer against torch's, with kernels that are ~free.

    python bench/host_overhead.py [--quick] [--threads 1]

CPU tensors of 16 elements, one thread: what is left is the work each call
does on the host — argument handling, dispatch, metadata reads, small tensor
ops (on a GPU each of those is a kernel launch). Rows: ``clip_grad_norm_``
and ``get_total_norm`` at 1 to 2,000 tensors, ``grad_stats`` against the torch
composite that gives its norms (one ``vector_norm`` per tensor + the total),
and an AdamW(fused) step on 16 parameters: plain, torch's clip + step, and
``fastgrad.wrap(max_norm=1)``; ``grad_stats(params=True)`` against the per-tensor torch loop
that computes gradient and weight norms. Best of several rounds of many calls each, the
variants of a row timed round-robin; ratios are torch's time / fastgrad's.
Targets (issue #10): clip/get_total_norm <= torch at 1 tensor and >= 3x faster
at 2,000; the wrapped step <= torch's clip + step and <= 1.3x the plain step.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import fastgrad  # noqa: E402
from harness import per_call, table, top_level_ops  # noqa: E402


def small_params(n: int, numel: int = 16) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(n)
    ps = [torch.nn.Parameter(torch.randn(numel, generator=g)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(numel, generator=g)
    return ps


def clip_rows(counts: list[int], calls: int, rounds: int) -> list[dict]:
    rows = []
    for n in counts:
        theirs, ours = small_params(n), small_params(n)
        k = max(5, calls // max(1, n // 10))
        for what, t_fn, f_fn in (
            ("clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(theirs, 1e30, foreach=True),
             lambda: fastgrad.clip_grad_norm_(ours, 1e30)),
            ("clip_grad_norm_ (scaling)", lambda: torch.nn.utils.clip_grad_norm_(theirs, 1e-30, foreach=True),
             lambda: fastgrad.clip_grad_norm_(ours, 1e-30)),
            ("get_total_norm", lambda: torch.nn.utils.get_total_norm([p.grad for p in theirs], foreach=True),
             lambda: fastgrad.get_total_norm([p.grad for p in ours])),
        ):
            t = per_call({"torch": t_fn, "fastgrad": f_fn}, k, rounds)
            rows.append({"case": what, "tensors": n, "torch us": t["torch"] * 1e6,
                         "fastgrad us": t["fastgrad"] * 1e6, "x torch": t["torch"] / t["fastgrad"]})
    return rows


def stats_rows(counts: list[int], calls: int, rounds: int) -> list[dict]:
    rows = []
    for n in counts:
        grads = [p.grad for p in small_params(n)]

        def composite():
            norms = torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads])
            return norms, torch.linalg.vector_norm(norms, 2.0)

        t = per_call({"torch": composite,
                      "fastgrad": lambda: fastgrad.grad_stats(grads, histogram=False).total_norm},
                     max(5, calls // max(1, n // 10)), rounds)
        rows.append({"case": "grad_stats (norms) vs per-tensor vector_norm", "tensors": n,
                     "torch us": t["torch"] * 1e6, "fastgrad us": t["fastgrad"] * 1e6,
                     "x torch": t["torch"] / t["fastgrad"]})
    return rows


def param_rows(counts: list[int], calls: int, rounds: int) -> list[dict]:
    """grad_stats(params=True) (gradient and weight norms, ||g||/||w||, from one pass) against the
    composer-style torch loop computing the same numbers (issue #13), and against fastgrad's own
    gradient-only call (what the weights add)."""
    rows = []
    for n in counts:
        ps = small_params(n)

        def composite():
            g = torch.stack([torch.linalg.vector_norm(p.grad, 2.0) for p in ps])
            w = torch.stack([torch.linalg.vector_norm(p.detach(), 2.0) for p in ps])
            return g / w, torch.linalg.vector_norm(g, 2.0), torch.linalg.vector_norm(w, 2.0)

        t = per_call({"torch": composite,
                      "fastgrad": lambda: fastgrad.grad_stats(ps, histogram=False, params=True).grad_param_ratio,
                      "grads only": lambda: fastgrad.grad_stats(ps, histogram=False).total_norm},
                     max(5, calls // max(1, n // 10)), rounds)
        rows.append({"case": "grad_stats(params=True) vs per-tensor vector_norm of g and w", "tensors": n,
                     "torch us": t["torch"] * 1e6, "fastgrad us": t["fastgrad"] * 1e6,
                     "x torch": t["torch"] / t["fastgrad"], "x grads only": t["fastgrad"] / t["grads only"]})
    return rows


def optim_rows(calls: int, rounds: int, n: int = 16) -> list[dict]:
    def opt(ps):
        return torch.optim.AdamW(ps, lr=1e-3, fused=True)

    plain_ps, clip_ps, wrap_ps = small_params(n), small_params(n), small_params(n)
    plain, clip_opt = opt(plain_ps), opt(clip_ps)
    wrapped = fastgrad.wrap(opt(wrap_ps), max_norm=1.0)

    def torch_clip_step():
        torch.nn.utils.clip_grad_norm_(clip_ps, 1.0, foreach=True)
        clip_opt.step()

    t = per_call({"plain step": plain.step, "torch clip + step": torch_clip_step, "wrap step": wrapped.step},
                 calls, rounds)
    ops = len(top_level_ops(wrapped.step)), len(top_level_ops(plain.step)), len(top_level_ops(torch_clip_step))
    return [{"case": f"AdamW(fused) step, {n} params: {k}", "tensors": n, "fastgrad us": v * 1e6,
             "x plain": v / t["plain step"], "x torch clip+step": v / t["torch clip + step"],
             "aten ops": ops[("wrap step", "plain step", "torch clip + step").index(k)]}
            for k, v in t.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls, rounds = (50, 3) if args.quick else (400, 7)
    print(f"# host cost per call, CPU tensors of 16 elements, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}\n")
    rows = clip_rows([1, 10, 100, 2000], calls, rounds) + stats_rows([1, 100, 2000], calls, rounds)
    print(table(rows, ["case", "tensors", "torch us", "fastgrad us", "x torch"]))
    print()
    print(table(param_rows([100, 2000], calls, rounds), ["case", "tensors", "torch us", "fastgrad us", "x torch",
                                                         "x grads only"]))
    print("\n'x grads only': grad_stats(params=True)'s time over the gradient-only call's (the weights' cost).")
    print("\n'x torch': torch's time / fastgrad's (>1 = fastgrad faster). clip_grad_norm_ with max_norm 1e30"
          " (coefficient 1: fastgrad skips the write, torch multiplies) and 1e-30 (both scale).\n")
    print(table(optim_rows(calls, rounds), ["case", "fastgrad us", "x plain", "x torch clip+step", "aten ops"]))
    print("\n'x plain' / 'x torch clip+step': this row's time over the plain step's / torch clip + step's.")


if __name__ == "__main__":
    main()
