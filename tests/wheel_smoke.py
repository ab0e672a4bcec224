"""Smoke test of an installed fastgrad wheel, run by tests/test_wheel.py inside a fresh venv
(no compiler on PATH, the source tree not importable). Standalone: torch and the wheel only.

    python wheel_smoke.py VENV_PREFIX

Checks: fastgrad (with its compiled fastgrad._C) is imported from the venv; statistics, clipping
and a wrapped optimizer step match plain torch on a small model; every CPU path this machine runs
(fastgrad.cpu_isa) gives bitwise the same statistics and clipped gradients on every dtype with
nasty values; FASTGRAD_CPU_ISA refusals; the console script answers --version and backends.
Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import fastgrad
from fastgrad import cpu_isa
from fastgrad.backends.cpu import _C


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def nasty(dtype: torch.dtype, n: int) -> torch.Tensor:
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g, dtype=torch.float64)
         * torch.exp2(torch.randint(-40, 12, (n,), generator=g).double())).to(dtype)
    vals = torch.tensor([0.0, -0.0, info.tiny, info.tiny / 4, info.max, -info.max, float("nan"), float("inf"),
                         float("-inf")], dtype=torch.float64).to(dtype)
    x[torch.linspace(0, n - 1, vals.numel()).long()] = vals
    return x


def main() -> None:
    prefix = os.path.realpath(sys.argv[1])
    check(os.path.realpath(fastgrad.__file__).startswith(prefix), f"fastgrad imported from the venv ({fastgrad.__file__})")
    check(_C is not None and os.path.realpath(_C.__file__).startswith(prefix), "fastgrad._C (C++ kernels) loads")
    check(fastgrad.__version__ not in ("", "0+unknown"), f"version {fastgrad.__version__}")
    check(fastgrad.available_backends("cpu")["cpu"] is None, "the C++ CPU backend is available")
    check(cpu_isa.current() is not None and cpu_isa.current() == cpu_isa.supported()[-1],
          f"CPU path {cpu_isa.current()} (built: {cpu_isa.compiled()}, runs here: {cpu_isa.supported()})")

    # statistics and clipping against torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    model(torch.randn(32, 64)).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    st = fastgrad.grad_stats(model, backend="cpu")
    want = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    check(abs(float(st.total_norm) - float(want)) <= 1e-6 * float(want), f"grad_stats total norm {float(st.total_norm):.6g}")
    ref = [g.clone() for g in grads]
    tn_ref = torch.nn.utils.clip_grad_norm_([_with_grad(g) for g in ref], max_norm=0.01)
    tn = fastgrad.clip_grad_norm_(model.parameters(), max_norm=0.01)
    check(abs(float(tn) - float(tn_ref)) <= 1e-5 * float(tn_ref), "clip_grad_norm_ total matches torch")
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    check(abs(float(clipped) - 0.01) < 1e-4, f"clipped to max_norm (norm now {float(clipped):.6g})")

    # a wrapped optimizer step
    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), max_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(32, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    check(all(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "wrapped AdamW step updated weights")

    # every CPU path: bitwise identical statistics and clipped gradients
    tensors = [nasty(dt, n) for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
               for n in (37, 4099, 70_001)]
    results = {}
    for path in cpu_isa.supported():
        with cpu_isa.forced(path):
            s = fastgrad.grad_stats(tensors, norm_types=(2, 1, 3), backend="cpu")
            scaled = [t.clone() for t in tensors]
            fastgrad.get_backend("cpu").scale_(scaled, torch.tensor(0.37, dtype=torch.float64))
            results[path] = ([s.norm(2).clone(), s.norm(1).clone(), s.norm(3).clone(), s.max_abs.clone(),
                              s.total_norm.clone(), s.histogram.clone(), s.nonfinite_count.clone()],
                             [t.view(torch.int16 if t.element_size() == 2 else
                                     torch.int32 if t.element_size() == 4 else torch.int64) for t in scaled])
    first = next(iter(results.values()))
    for path, (floats, scaled) in results.items():
        same = all(torch.equal(a.view(torch.int64), b.view(torch.int64)) for a, b in zip(floats, first[0]))
        same &= all(torch.equal(a, b) for a, b in zip(scaled, first[1]))
        check(same, f"CPU path {path}: statistics and scaled gradients bitwise equal to {next(iter(results))}")

    # refusal of an unknown path, through the environment
    r = subprocess.run([sys.executable, "-c", "import torch, fastgrad; fastgrad.grad_stats([torch.ones(3)], backend='cpu')"],
                       env={**os.environ, "FASTGRAD_CPU_ISA": "avx9"}, capture_output=True, text=True)
    check(r.returncode != 0 and "no CPU path 'avx9'" in r.stderr, "FASTGRAD_CPU_ISA=avx9 refused with a clear error")

    # the console script
    exe = os.path.join(os.path.dirname(sys.executable), "fastgrad")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    check(out == f"fastgrad {fastgrad.__version__}", f"`fastgrad --version`: {out}")
    out = subprocess.run([exe, "backends"], capture_output=True, text=True, check=True).stdout
    check(f"cpu path   {cpu_isa.current()}" in out, "`fastgrad backends` names the CPU path")
    print("wheel smoke test passed")


def _with_grad(g: torch.Tensor) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g
    return p


if __name__ == "__main__":
    main()
