"""CPU benchmark: fastgrad.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_(foreach=True).

    python bench/cpu_clip.py [--quick]

For each parameter set and dtype, both with a coefficient below 1 (every
gradient is scaled) and with max_norm so large that the coefficient is 1
(fastgrad then writes nothing): ms, GB/s of gradient bytes read once, and the
speed-up over torch in the same run (variants timed round-robin).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import fastgrad  # noqa: E402
from harness import nbytes, table, timeit_interleaved  # noqa: E402
from param_sets import make, sets  # noqa: E402


def params_with_grads(grads):
    ps = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    return ps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = ap.parse_args(argv)
    print(f"# clip_grad_norm_ on the CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    rows = []
    for set_name, shapes in sets(args.quick).items():
        for dtype in (torch.float32, torch.bfloat16):
            grads = make(shapes, dtype)
            gb = nbytes(grads) / 1e9
            theirs, ours = params_with_grads(grads), params_with_grads(grads)
            for case, max_norm in (("coef < 1", 1e-3), ("coef = 1", 1e30)):
                t = timeit_interleaved({
                    "torch": lambda m=max_norm: torch.nn.utils.clip_grad_norm_(theirs, m, foreach=True),
                    "fastgrad": lambda m=max_norm: fastgrad.clip_grad_norm_(ours, m),
                }, reps=5 if args.quick else 10)
                for impl, ti in t.items():
                    rows.append({"set": set_name, "dtype": str(dtype).split(".")[1], "case": case, "impl": impl,
                                 "ms": ti * 1e3, "GB/s": gb / ti, "x torch": t["torch"] / ti})
    print(table(rows, ["set", "dtype", "case", "impl", "ms", "GB/s", "x torch"]))
    print("\n'x torch': torch's time / this row's (>1 = faster than torch).")


if __name__ == "__main__":
    main()
