"""The one timing harness of bench/: best-of-N wall time, bytes moved, bandwidth, ratios.

Every script prints ms, GB/s, % of the copy/sum bandwidth measured in the
same run, and the ratio to the torch baseline in the same run. CUDA work is
synchronised around each timed call; CPU timings take the minimum over
repetitions (the least disturbed run on a shared machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


def timeit(fn: Callable[[], object], reps: int = 10, warmup: int = 2, max_seconds: float = 5.0,
           device: str = "cpu") -> float:
    """Best wall time of ``fn()`` in seconds over up to ``reps`` runs (fewer if slow)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best, spent = float("inf"), 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > max_seconds:
            break
    return best


def timeit_interleaved(fns: dict[str, Callable[[], object]], reps: int = 10, warmup: int = 1,
                       device: str = "cpu") -> dict[str, float]:
    """Best wall time of each ``fns[k]()`` with the variants run round-robin, so that load from
    other processes on a shared machine hits all of them alike (minimum per variant, as timeit)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            best[k] = min(best[k], timeit(fn, reps=1, warmup=0, device=device))
    return best


def per_call(fns: dict[str, Callable[[], object]], calls: int, rounds: int,
             clock: Callable[[], float] = time.perf_counter, warmup: int | None = None) -> dict[str, float]:
    """Best-of-``rounds`` mean seconds per call of each ``fns[k]`` over ``calls`` calls, the variants
    interleaved (host cost of small calls; ``clock`` e.g. ``time.thread_time`` on a shared machine)."""
    for fn in fns.values():
        for _ in range(max(3, calls // 10) if warmup is None else warmup):
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = clock()
            for _ in range(calls):
                fn()
            best[k] = min(best[k], (clock() - t0) / calls)
    return best


def top_level_ops(fn: Callable[[], object]) -> list[str]:
    """The aten and fastgrad ops one call of ``fn`` runs that no other such op contains (torch.profiler,
    after one warm-up call): on a GPU each is a launch."""
    def counted(name: str) -> bool:
        return name.startswith("aten::") or name.startswith("fastgrad::")

    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    out = []
    for e in prof.events():
        if not counted(e.name):
            continue
        parent = e.cpu_parent
        while parent is not None and not counted(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            out.append(e.name)
    return out


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sum_bandwidth(device: str = "cpu", numel: int = 50_000_000) -> float:
    """GB/s of ``x.sum()`` over a float32 tensor: the read-bandwidth yardstick of this run."""
    x = torch.randn(numel, device=device)
    t = timeit(lambda: x.sum(), reps=30, device=device)
    return x.numel() * 4 / t / 1e9


def table(rows: list[dict], columns: Sequence[str]) -> str:
    """Markdown table of ``rows`` (dicts) in ``columns`` order."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
