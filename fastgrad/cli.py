"""The ``fastgrad`` command line: ``fastgrad demo``, ``fastgrad backends``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    import fastgrad

    torch.manual_seed(0)
    depth, width = 12, 64
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Sigmoid()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    x, y = torch.randn(256, width), torch.randn(256, 1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    stats = fastgrad.grad_stats(model, groups=1)  # per top-level layer
    print(f"A {depth}-layer sigmoid MLP after one backward pass (fastgrad {fastgrad.__version__}):\n")
    print(stats.summary())
    norms = stats.groups.tensor_norms
    print(f"\nfirst / last hidden layer gradient norm: {norms[0].item():.3e} / {norms[-2].item():.3e}: "
          f"{(norms[-2] / norms[0]).item():.1e}x smaller at the input, the gradient vanishes.")
    return 0


def _backends(args: argparse.Namespace) -> int:
    import fastgrad

    for dev in ("cpu", "cuda"):
        for name, why in fastgrad.available_backends(dev).items():
            print(f"{dev:5s} {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastgrad", description="fused gradient statistics and clipping")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="show per-layer gradient statistics of a small network (CPU)")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("backends", help="list the backends usable here, and why others are not")
    p.set_defaults(fn=_backends)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
