"""Step-time overhead of fastgrad.wrap on a small transformer: plain vs torch clip vs fastgrad.

    python bench/optim_overhead.py [--reps 20] [--layers 4] [--d-model 256]

For each device (CPU; CUDA when available) and optimizer (AdamW fused and
foreach), three variants are timed in the same run:

* ``plain``       ``opt.step()``
* ``torch_clip``  ``torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()``
* ``fastgrad``    ``fastgrad.wrap(opt, max_norm=1.0)`` with full statistics every step
                  (norms, non-finite/zero counts, magnitude histogram, per-module groups,
                  requested through the monitor hook), non-finite skip on

twice: the whole training step (forward + backward + optimizer) and the
optimizer part alone (gradients made once, then only the step timed). Ratios
are to ``plain`` of the same device and optimizer; ``GB/s`` is gradient
bytes over the optimizer-only time beyond ``plain`` (the cost of the
statistics / clipping work), against the ``x.sum()`` read bandwidth measured in
this run. Targets: GPU, fastgrad's extra optimizer time below torch_clip's;
CPU, whole fastgrad step at most 1.1x plain.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import nbytes, sum_bandwidth, table, timeit_interleaved

import fastgrad


class FullStats:
    """A stand-in monitor: asks for every statistic every step, keeps the last."""

    def __init__(self) -> None:
        self.last = None

    def stats_request(self) -> dict:
        return {"histogram": True, "groups": "module"}

    def record(self, stats, *, clip_coef, skipped) -> None:
        self.last = (stats, clip_coef, skipped)


def make_model(layers: int, d_model: int, vocab: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d_model, nhead=max(1, d_model // 64), dim_feedforward=4 * d_model,
                                         dropout=0.0, batch_first=True, norm_first=True),
        num_layers=layers, enable_nested_tensor=False,
    )
    return torch.nn.Sequential(torch.nn.Embedding(vocab, d_model), enc, torch.nn.Linear(d_model, vocab)).to(device)


def bench_device(device: str, args) -> list[dict]:
    rows: list[dict] = []
    vocab = 1000
    x = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    y = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    read_bw = sum_bandwidth(device, numel=20_000_000)
    for opt_name, kw in (("AdamW fused", {"fused": True}), ("AdamW foreach", {"foreach": True})):
        train, opt_only, gbytes = {}, {}, 0
        for variant in ("plain", "torch_clip", "fastgrad"):
            model = make_model(args.layers, args.d_model, vocab, device)
            params = list(model.parameters())
            opt = torch.optim.AdamW(params, lr=1e-4, **kw)
            if variant == "fastgrad":
                opt = fastgrad.wrap(opt, max_norm=1.0, model=model, monitor=FullStats())

            def opt_step(opt=opt, params=params, variant=variant):
                if variant == "torch_clip":
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()

            def train_step(model=model, opt=opt, opt_step=opt_step):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
                loss.backward()
                opt_step()

            for _ in range(3):  # warm-up; leaves fresh gradients for the optimizer-only timing
                train_step()
            train[variant], opt_only[variant] = train_step, opt_step
            gbytes = nbytes([p.grad for p in params])
        t_train = timeit_interleaved(train, args.reps, device=device)
        t_opt = timeit_interleaved(opt_only, args.reps * 3, device=device)
        for variant in train:
            extra = t_opt[variant] - t_opt["plain"]
            gbs = gbytes / extra / 1e9 if extra > 0 and variant != "plain" else float("nan")
            rows.append({
                "device": device, "optimizer": opt_name, "variant": variant,
                "train ms": t_train[variant] * 1e3, "train x plain": t_train[variant] / t_train["plain"],
                "opt ms": t_opt[variant] * 1e3, "opt x plain": t_opt[variant] / t_opt["plain"],
                "extra opt ms": extra * 1e3, "extra GB/s": gbs,
                "% read bw": 100 * gbs / read_bw,  # NaN stays NaN
            })
        n_params = sum(p.numel() for p in make_model(args.layers, args.d_model, vocab, "cpu").parameters())
        print(f"[{device}] {opt_name}: {n_params / 1e6:.1f}M parameters, {gbytes / 1e6:.1f} MB of gradients, "
              f"x.sum() read bandwidth {read_bw:.1f} GB/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # Adam's second moments of tiny gradients must not time denormal math
    devices = ["cpu"] if args.device == "cpu" else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    if args.device == "all":
        devices.insert(0, "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastgrad {fastgrad.__version__}")
    rows = [r for d in devices for r in bench_device(d, args)]
    cols = ["device", "optimizer", "variant", "train ms", "train x plain", "opt ms", "opt x plain",
            "extra opt ms", "extra GB/s", "% read bw"]
    print(table(rows, cols))
    for d in devices:
        for o in ("AdamW fused", "AdamW foreach"):
            r = {x["variant"]: x for x in rows if x["device"] == d and x["optimizer"] == o}
            fg, tc = r["fastgrad"], r["torch_clip"]
            if d == "cpu":
                verdict = "meets" if fg["train x plain"] <= 1.1 else "MISSES"
                print(f"{d} {o}: fastgrad train step {fg['train x plain']:.3f}x plain ({verdict} the <= 1.1x target); "
                      f"torch_clip {tc['train x plain']:.3f}x")
            else:
                verdict = "meets" if fg["extra opt ms"] < tc["extra opt ms"] else "MISSES"
                print(f"{d} {o}: fastgrad extra {fg['extra opt ms']:.3f} ms vs torch clip_grad_norm_ "
                      f"{tc['extra opt ms']:.3f} ms ({verdict} the target)")


if __name__ == "__main__":
    main()
