"""GPU benchmark: fastgrad's fused statistics pass and clipping against torch, with launch counts.

    python bench/gpu_stats.py [--quick] [--llama-layers 8] [--skip-huge]

For each parameter set (GPT-2-124M, Llama-7B-shaped in bf16 and fp32 with
the layer count scaled to fit memory, 10,000 small tensors, one 2^31+1-element
tensor) it prints the time and GB/s of
  * fastgrad.grad_stats, all statistics, per backend (cuda, triton),
  * fastgrad.clip_grad_norm_ (norm + clip),
  * torch.nn.utils.clip_grad_norm_(foreach=True), torch._foreach_norm alone,
    and the per-tensor ``p.grad.norm()`` loop people use for per-layer norms,
with the % of the copy bandwidth measured in the same run (bytes read once)
and kernel launches per call from the torch profiler.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import fastgrad  # noqa: E402
from harness import nbytes, table, timeit  # noqa: E402
from param_sets import gpt2_124m_shapes, llama_7b_shapes, make  # noqa: E402


def copy_bandwidth(numel: int = 1 << 28) -> float:
    """GB/s of a device-to-device copy (bytes read + written)."""
    src = torch.empty(numel, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), reps=20, device="cuda")
    return 2 * numel * 4 / t / 1e9


def launches(fn) -> int:
    """CUDA kernels (and memsets/copies) launched by one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--llama-layers", type=int, default=8, help="decoder layers of the Llama-7B-shaped set")
    ap.add_argument("--skip-huge", action="store_true", help="skip the 2^31+1-element tensor")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_stats.py needs a CUDA device")
    bw = copy_bandwidth(1 << 24 if args.quick else 1 << 28)
    name = torch.cuda.get_device_name()
    print(f"# fastgrad GPU benchmark — {name}, torch {torch.__version__}")
    print(f"# measured copy bandwidth: {bw:.0f} GB/s (read + write)\n")
    backends = [b for b in ("cuda", "triton") if fastgrad.available_backends("cuda")[b] is None]
    sets = [
        ("gpt2-124M", gpt2_124m_shapes(), torch.float32),
        ("gpt2-124M", gpt2_124m_shapes(), torch.bfloat16),
        (f"llama-7B shapes, {args.llama_layers} layers", llama_7b_shapes(args.llama_layers), torch.bfloat16),
        (f"llama-7B shapes, {args.llama_layers} layers", llama_7b_shapes(args.llama_layers), torch.float32),
        ("10,000 small", [(f"p{i}", (97 + (i * 37) % 904,)) for i in range(10_000)], torch.float32),
    ]
    if not (args.quick or args.skip_huge):
        sets.append(("one 2^31+1 tensor", [("x", (2**31 + 1,))], torch.bfloat16))
    if args.quick:
        sets = [(n, s[:12] if len(s) > 12 else s, d) for n, s, d in sets[:1] + sets[4:5]]
    rows = []
    for set_name, shapes, dtype in sets:
        params = [torch.nn.Parameter(g) for g in make(shapes, dtype, "cuda")]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        grads = [p.grad for p in params]
        gb = nbytes(grads) / 1e9
        cases = {f"fastgrad stats [{b}]": (lambda b=b: fastgrad.grad_stats(grads, backend=b)) for b in backends}
        cases.update({f"fastgrad clip_grad_norm_ [{b}]": (lambda b=b: fastgrad.clip_grad_norm_(params, 1e9, backend=b))
                      for b in backends})
        cases["torch clip_grad_norm_(foreach)"] = lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)
        cases["torch _foreach_norm"] = lambda: torch._foreach_norm(grads)
        if len(grads) <= 2000:
            cases["torch per-tensor .norm() loop"] = lambda: [g.norm() for g in grads]
        base = None
        for impl, fn in cases.items():
            t = timeit(fn, reps=20, device="cuda")
            if impl.startswith("torch clip"):
                base = t
            rows.append({"set": set_name, "dtype": str(dtype).split(".")[1], "impl": impl, "ms": t * 1e3,
                         "GB/s": gb / t, "% copy BW": 100 * gb / t / bw, "launches": launches(fn), "_t": t})
        for r in rows[-len(cases):]:
            r["vs torch clip"] = base / r.pop("_t")
        del params, grads
        torch.cuda.empty_cache()
    print(table(rows, ["set", "dtype", "impl", "ms", "GB/s", "% copy BW", "vs torch clip", "launches"]))
    print("\n% copy BW: gradient bytes read once per second / the copy's bytes moved per second. "
          "'vs torch clip' > 1: faster than "
          "torch.nn.utils.clip_grad_norm_(foreach=True) in this run.")


if __name__ == "__main__":
    main()
