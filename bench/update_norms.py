"""Cost of update norms (fastgrad.updates) around one optimizer step, against composer-style torch.

    python bench/update_norms.py [--reps 10] [--layers 12] [--d-model 256] [--device cpu]

Parameters of a transformer-like stack (per layer: 4 square matrices, 2 MLP matrices, biases,
2 norms), gradients made once; each variant times the optimizer step with its update norms:

* ``plain``      ``opt.step()``
* ``derived``    ``tracker.before_step(); opt.step(); tracker.after_step()`` (closed form)
* ``snapshot``   the same with ``UpdateTracker(mode="snapshot")``
* ``torch``      composer/OLMo style: clone the weights, step, one ``vector_norm`` per tensor for
                 ``w - w_before`` and for ``w_before`` (no group/total rows, float32 norms)

Ratios are to ``plain`` for the same optimizer (run round-robin, best of ``reps``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import table, timeit_interleaved  # noqa: E402

from fastgrad.updates import UpdateTracker  # noqa: E402


def make_params(layers: int, d: int, device: str) -> list[torch.nn.Parameter]:
    shapes = []
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d), (4 * d,), (d,), (d,), (d,), (d,), (d,)]
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(device) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
    return ps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    params = make_params(args.layers, args.d_model, args.device)
    numel = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {numel / 1e6:.1f} M parameters, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    optimizers = {
        "AdamW foreach": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True),
        "AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True),
        "SGD momentum": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=True),
    }
    for name, make in optimizers.items():
        opt = make()
        derived = UpdateTracker(opt)
        snap = UpdateTracker(opt, mode="snapshot")

        def with_tracker(tr):
            def run():
                tr.before_step()
                opt.step()
                tr.after_step()
            return run

        def torch_style():
            before = [p.detach().clone() for p in params]
            opt.step()
            with torch.no_grad():
                upd = [torch.linalg.vector_norm(p - b) for p, b in zip(params, before)]
                wn = [torch.linalg.vector_norm(b) for b in before]
            return upd, wn

        t = timeit_interleaved({"plain": opt.step, "derived": with_tracker(derived),
                                "snapshot": with_tracker(snap), "torch": torch_style},
                               reps=args.reps, device=args.device)
        row = {"optimizer": name}
        for k, v in t.items():
            row[f"{k} ms"] = v * 1e3
        for k in ("derived", "snapshot", "torch"):
            row[f"{k}/plain"] = t[k] / t["plain"]
        rows.append(row)
    cols = ["optimizer", "plain ms", "derived ms", "snapshot ms", "torch ms",
            "derived/plain", "snapshot/plain", "torch/plain"]
    print(table(rows, cols))


if __name__ == "__main__":
    main()
