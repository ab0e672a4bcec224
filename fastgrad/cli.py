"""The ``fastgrad`` command line: ``fastgrad demo``, ``fastgrad report RUN_DIR``, ``fastgrad backends``.

Exit codes: 0 done; 2 bad input said in one line on stderr (a non-empty ``demo --out``
without ``--force``; a missing, unreadable or malformed run for ``report``, with file and
line; matplotlib missing). ``report`` skips a run's cut-off last line with a warning.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time


# -- demo -------------------------------------------------------------------------------
DEMO_DIR = "fastgrad_demo"  # without --out, each demo writes a new DEMO_DIR/<date-time>


def _sigmoid_mlp(depth: int, width: int):
    import torch

    layers: list = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Sigmoid()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def _bad_init_relu_mlp(depth: int, width: int, gain: float):
    """A ReLU MLP with weights ``N(0, gain^2 / fan_in)``; He init is ``gain = sqrt(2)``, above it the
    activations and gradients grow by ``gain / sqrt(2)`` per layer."""
    import torch

    layers: list = []
    for _ in range(depth):
        lin = torch.nn.Linear(width, width)
        torch.nn.init.normal_(lin.weight, std=gain / math.sqrt(width))
        torch.nn.init.zeros_(lin.bias)
        layers += [lin, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def _data(width: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, width, generator=g)
    w = torch.randn(width, 1, generator=g) / math.sqrt(width)
    return x, torch.sin(3 * x @ w)  # a smooth target any healthy MLP fits


class _DemoRun:
    def __init__(self, key: str, label: str, loss0: float, loss1: float, first_nan: int | None, monitor, run_dir: str):
        self.key, self.label, self.loss0, self.loss1, self.first_nan = key, label, loss0, loss1, first_nan
        self.monitor, self.run_dir = monitor, run_dir

    @property
    def clipped(self) -> int:
        return sum(1 for r in self.monitor.records if r.clipped)

    @property
    def skipped(self) -> int:
        return sum(1 for r in self.monitor.records if r.skipped)


def _train(key: str, label: str, make_model, *, protected: bool, steps: int, lr: float, max_norm: float,
           out: str, seed: int, bar) -> _DemoRun:
    import torch

    import fastgrad

    torch.manual_seed(seed)
    model = make_model()
    x, y = _data(64, seed)
    run_dir = os.path.join(out, key)
    monitor = fastgrad.GradMonitor(model, every=1, histogram_every=5, log_every=25, groups="module",
                                   loggers=("jsonl",), run_dir=run_dir, max_norm=max_norm if protected else None)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    wrapped = None
    if protected and hasattr(fastgrad, "wrap"):
        # The monitor rides on the wrapper's single statistics pass, which also clips and skips.
        wrapped = fastgrad.wrap(opt, max_norm=max_norm, model=model, monitor=monitor)
    losses: list[float] = []
    first_nan = None
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if wrapped is not None:
            wrapped.step()
        elif protected:  # without wrap(): one statistics pass serves both the clip and the monitor
            req = monitor.stats_request()
            stats = fastgrad.grad_stats(model, **(req or {"histogram": False}))
            coef = (max_norm / (stats.total_norm + 1e-6)).clamp(max=1.0)
            fastgrad.clip_grads_with_norm_(model.parameters(), max_norm, stats.total_norm)
            monitor.record(stats, clip_coef=coef)
            opt.step()
        else:
            monitor.step()
            opt.step()
        # The demo prints losses, so it reads them; a real loop would not sync every step.
        v = loss.item()
        losses.append(v)
        if first_nan is None and not math.isfinite(v):
            first_nan = i
        bar.update(1)
    monitor.close()
    return _DemoRun(key, label, losses[0], losses[-1], first_nan, monitor, run_dir)


def _describe(r: _DemoRun) -> str:
    end = f"{r.loss1:.3g}" if math.isfinite(r.loss1) else "nan"
    s = f"    {r.label:<44} loss {r.loss0:.3g} -> {end}"
    if r.first_nan is not None:
        s += f"  (non-finite from step {r.first_nan})"
    if any(rec.clip_coef is not None for rec in r.monitor.records):
        s += f"  {r.clipped}/{len(r.monitor.records)} steps clipped"
        if r.skipped:
            s += f", {r.skipped} skipped"
    return s


def _indent(text: str, n: int = 6) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _demo(args: argparse.Namespace) -> int:
    import torch

    import fastgrad

    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety; the demo runs without it
        tqdm = None
    t0 = time.perf_counter()
    steps = args.steps or (30 if args.quick else 150)
    out = _demo_out(args.out, args.force)
    if out is None:
        return 2
    # Tiny matrices: one thread is fastest and does not fight other processes for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    depth, max_norm = 16, 1.0
    # Findings are printed below, grouped per run; keep the monitor's log lines out of the bar.
    mlog = logging.getLogger("fastgrad.monitor")
    old_level = mlog.level
    mlog.setLevel(logging.ERROR)
    plan = [
        ("vanishing-plain", "plain SGD", lambda: _sigmoid_mlp(depth, 64), False, 0.1),
        ("vanishing-fastgrad", f"fastgrad: clip at {max_norm:g} + monitor", lambda: _sigmoid_mlp(depth, 64),
         True, 0.1),
        ("exploding-plain", "plain SGD", lambda: _bad_init_relu_mlp(depth, 64, 1.6), False, 0.01),
        ("exploding-fastgrad", f"fastgrad: clip at {max_norm:g} + monitor", lambda: _bad_init_relu_mlp(depth, 64, 1.6),
         True, 0.01),
    ]
    how = "fastgrad.wrap(max_norm, monitor)" if hasattr(fastgrad, "wrap") else "clip_grads_with_norm_ + GradMonitor"
    print(f"fastgrad {fastgrad.__version__} demo: vanishing and exploding gradients, seen per layer and "
          f"handled ({len(plan)} runs x {steps} steps on {'CPU'}; protected runs use {how})\n", flush=True)
    bar = (tqdm(total=len(plan) * steps, unit="step", leave=False, dynamic_ncols=True)
           if tqdm is not None and not args.no_progress else _NoBar())
    runs: dict[str, _DemoRun] = {}
    try:
        for key, label, make, protected, lr in plan:
            bar.set_description(key)
            runs[key] = _train(key, label, make, protected=protected, steps=steps, lr=lr, max_norm=max_norm,
                               out=out, seed=args.seed, bar=bar)
    finally:
        bar.close()
        mlog.setLevel(old_level)
        torch.set_num_threads(threads)

    sections = [
        ("1. Deep sigmoid MLP", (f"{depth} x (Linear 64 + Sigmoid): each sigmoid passes back at most 1/4 of the "
         "gradient, so it vanishes toward the input"), "vanishing",
         ("clipping cannot help a vanishing gradient; the monitor names the starved layers and when "
         "they went quiet (fix: ReLU/GELU, residual connections, normalisation)")),
        ("2. Badly initialised deep ReLU MLP", (f"{depth} x (Linear 64 + ReLU), weights N(0, 1.6^2/fan_in) "
         "(He init: 2/fan_in), 13% too large per layer: with SGD + momentum the norm runs away"), "exploding",
         ("plain SGD blows up within a few steps (the detectors name the step and layers); clipping "
         "the global norm from the same fused pass keeps it finite and it trains")),
    ]
    for title, why, k, lesson in sections:
        plain, prot = runs[f"{k}-plain"], runs[f"{k}-fastgrad"]
        print(f"{title}: {why}")
        print(_describe(plain))
        print(_describe(prot))
        print("\n    per-layer health, plain SGD (last monitored step; norm range over the run):")
        print(_indent(plain.monitor.summary(max_rows=args.max_rows)))
        for r in (plain, prot):
            print(f"\n    detectors, {r.label}:")
            print(_indent(_wrap_lines(_first_findings(r.monitor, 3))))
        print(f"\n    => {lesson}\n")
    if not args.no_report:
        try:
            from .report import make_report
        except ImportError:  # pragma: no cover - report.py always imports; matplotlib is checked inside
            make_report = None
        try:
            paths = [make_report(r.run_dir, title=f"fastgrad demo: {r.key}")["html"] for r in runs.values()]
        except ImportError as e:
            print(f"(no report: {e})")
        else:
            print("reports (open in a browser):")
            for p in paths:
                print(f"    {p}")
    print(f"\nrun data (JSONL, see `fastgrad report RUN_DIR`): {out}   [{time.perf_counter() - t0:.1f} s]")
    return 0


def _demo_out(out: str | None, force: bool) -> str | None:
    """The demo's output directory, or None after saying why not (never an earlier run's, unless forced).

    No ``--out``: a new ``fastgrad_demo/<date-time>`` each time (``-2``... if taken), so
    repeated ``fastgrad demo`` runs sit side by side. ``--out DIR``: DIR must be new or
    empty; a non-empty DIR is refused (nothing written) unless ``--force``, which writes
    the demo's files over those of an earlier demo and leaves other files alone.
    """
    from .loggers.files import fresh_dir

    if out is None:
        try:
            return fresh_dir(os.path.join(DEMO_DIR, time.strftime("%Y%m%d-%H%M%S")))
        except OSError as e:
            print(f"fastgrad demo: {e}", file=sys.stderr)
            return None
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"fastgrad demo: --out {out} is a file, not a directory; nothing was written. "
              "Give a new or empty directory.", file=sys.stderr)
        return None
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not force:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        print(f"fastgrad demo: --out {out} is not empty (it holds {shown}); nothing was written, so an "
              f"earlier run is not overwritten. Use a new directory (e.g. `fastgrad demo --out "
              f"{out.rstrip(os.sep)}-2`), leave out --out for a fresh {DEMO_DIR}/<date-time>, or add --force "
              "to write over the demo's files in it.", file=sys.stderr)
        return None
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        print(f"fastgrad demo: cannot create --out {out}: {e}", file=sys.stderr)
        return None
    return out


def _first_findings(monitor, n: int) -> str:
    fs = monitor.findings
    if not fs:
        return monitor.findings_text()
    lines = [f"[{f.kind}] {f.message}" for f in fs[:n]]
    if len(fs) > n:
        lines.append(f"... and {len(fs) - n} more findings (in the report)")
    return "\n".join(lines)


def _wrap_lines(text: str, width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width, subsequent_indent="    ") for line in text.splitlines())


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


# -- report -----------------------------------------------------------------------------
def _report(args: argparse.Namespace) -> int:
    import warnings

    from .report import make_report

    # A damaged run is the usual case here (a crash cut the last line): say what was
    # skipped or wrong in one line each, never with a traceback.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            paths = make_report(args.run_dir, out_dir=args.out, title=args.title)
        except (OSError, ValueError, ImportError) as e:
            paths = None
            error = e
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            print(f"fastgrad report: warning: {w.message}", file=sys.stderr)
    if paths is None:
        print(f"fastgrad report: {error}", file=sys.stderr)
        return 2
    for key in ("heatmap", "global_norm", "histogram", "html"):
        print(f"{key:12s} {paths[key]}")
    return 0


# -- backends ---------------------------------------------------------------------------
def _backends(args: argparse.Namespace) -> int:
    import fastgrad

    for dev in ("cpu", "cuda"):
        for name, why in fastgrad.available_backends(dev).items():
            print(f"{dev:5s} {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    print(_cpu_path_line())
    return 0


def _cpu_path_line() -> str:
    """Which instruction-set path the C++ CPU kernels run (fastgrad.cpu_isa)."""
    from fastgrad import cpu_isa

    compiled = cpu_isa.compiled()
    if not compiled:
        return "cpu path   none: the C++ CPU kernels (fastgrad._C) are not available"
    detail = (f"this build: {', '.join(compiled)}; this CPU runs: {', '.join(cpu_isa.supported())}; "
              f"FASTGRAD_CPU_ISA={'|'.join(compiled)} forces one")
    running = cpu_isa.current()
    if running is None:
        return f"cpu path   none: {cpu_isa.error()} ({detail})"
    return f"cpu path   {running} ({detail})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastgrad", description="fused gradient statistics, clipping and monitoring")
    from ._version import __version__

    ap.add_argument("--version", action="version", version=f"fastgrad {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="train vanishing and exploding networks on the CPU, unprotected then with "
                                    "fastgrad, and write reports (under a minute)")
    p.add_argument("--out", default=None,
                   help=f"directory for the runs and reports; must be new or empty unless --force "
                        f"(default: a new {DEMO_DIR}/<date-time> each run)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out, over the files of an earlier demo run")
    p.add_argument("--quick", action="store_true", help="30 steps per run instead of 150 (for tests)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (overrides --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rows", type=int, default=20, help="layers shown per health table")
    p.add_argument("--no-report", action="store_true", help="skip the PNG/HTML reports")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("report", help="turn a GradMonitor run (RUN_DIR/gradients.jsonl) into PNGs and one HTML page")
    p.add_argument("run_dir", help="a run directory holding gradients.jsonl, or the .jsonl file")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    p.add_argument("--title", default=None)
    p.set_defaults(fn=_report)
    p = sub.add_parser("backends", help="list the backends usable here, and why others are not")
    p.set_defaults(fn=_backends)
    args = ap.parse_args(argv)
    if getattr(args, "steps", None) is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
