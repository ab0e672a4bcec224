"""Training-step overhead of gradient monitoring: fastgrad's GradMonitor against what people use today.

A small transformer (token embedding, 4 pre-norm encoder layers, d_model 256,
LM head; AdamW) is trained with:

* ``none``            no monitoring (the baseline);
* ``fastgrad``        ``GradMonitor``: per-layer norms every step, histograms every 100th (the defaults);
* ``fastgrad+hist``   ``GradMonitor``: per-layer norms *and* magnitude histograms every step;
* ``fastgrad wrap``   the same monitor riding on ``fastgrad.wrap(max_norm=1.0)``'s pass, against
                      ``none + torch clip_grad_norm_`` (only when ``fastgrad.wrap`` exists);
* ``wandb.watch``     ``wandb.watch(model, log="gradients", log_freq=1)`` in offline mode;
* ``norm loop + TB``  ``for n, p in model.named_parameters(): writer.add_scalar(n, p.grad.norm(), step)``.

Training health, "everything on every 10 steps" (issue #13). These rows accumulate two
micro-batches of 4 per step (the noise scale needs two batch sizes) and clip at 1.0, against
``accum: none + clip_grad_norm_`` (the same without monitoring):

* ``accum: health/10 fastgrad``  ``GradMonitor(every=10, weights=True, noise_scale=ns,
  log_every=2)`` on ``fastgrad.wrap(max_norm=1.0, track_updates=True)``: per-layer gradient
  stats, weight norms (same launch), update norms and ratios (derived from AdamW's state),
  and ``NoiseScale.first_micro_batch`` / ``accumulated`` on the monitored steps; a flush (one
  transfer, detectors, JSONL) every 20 steps;
* ``accum: health/10 per-param loop``  composer/OLMo style on the same steps: one
  ``vector_norm`` per parameter for the gradient and the weight, a clone of every weight before
  the step and one norm of each difference after, the two squared gradient norms of the noise
  scale summed over parameters, every value read with ``.item()``; the same EMA in Python.

The fuller end-to-end comparison of training health (three models, fused and foreach AdamW,
fastgrad through ``wrap`` and standalone, composer-style clone and derived per-parameter loops,
CPU-time clock for shared machines) is ``bench/health_overhead.py``.

All fastgrad variants write JSONL (flushing every 50 steps); for the
GradMonitor rows the monitor's own work is also timed alone on real
gradients (``direct``), since it is below the end-to-end noise. Each variant
trains its own copy of the same model; rounds interleave the variants and
each variant's time is its best round's mean step time (the least disturbed
run on a shared machine). Printed: ms/step, overhead over the baseline in %
and, for fastgrad, how many times lower its overhead is than wandb.watch's.
Runs on the CPU, and on CUDA when available (``--device``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import table

import fastgrad


class SmallTransformer(torch.nn.Module):
    def __init__(self, vocab=2048, d=256, heads=4, layers=4, ff=1024):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.layers(self.emb(ids)))


def make_variant(name: str, device: str, tmp: str):
    """(step function, cleanup) for one variant, on a fresh model with the same initial weights."""
    torch.manual_seed(0)
    model = SmallTransformer().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, 2048, (8, 128), generator=g).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    run_dir = os.path.join(tmp, name.replace(" ", "_").replace("+", "_"))
    cleanup = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        out = model(ids[:, :-1])
        loss = loss_fn(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss

    if name == "none":
        def step():
            fwd_bwd()
            opt.step()
    elif name == "none + clip_grad_norm_":
        def step():
            fwd_bwd()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    elif name in ("fastgrad", "fastgrad+hist"):
        mon = fastgrad.GradMonitor(model, histogram_every=1 if name.endswith("hist") else 100, log_every=50,
                                   run_dir=run_dir, detectors="default")
        cleanup.append(mon.close)

        def step():
            fwd_bwd()
            mon.step()
            opt.step()

        def direct(n=100):
            """The monitor's own cost per step (statistics, buffering, amortised flush + JSONL), on real grads."""
            fwd_bwd()
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                mon.step()
            mon.flush()
            sync()
            return (time.perf_counter() - t0) / n

        step.direct = direct
    elif name == "fastgrad wrap":
        mon = fastgrad.GradMonitor(model, histogram_every=100, log_every=50, run_dir=run_dir)
        wopt = fastgrad.wrap(opt, max_norm=1.0, model=model, monitor=mon)
        cleanup.append(mon.close)

        def step():
            fwd_bwd()
            wopt.step()
    elif name == "wandb.watch":
        import wandb

        os.makedirs(run_dir, exist_ok=True)
        run = wandb.init(mode="offline", dir=run_dir, project="fastgrad-bench")
        wandb.watch(model, log="gradients", log_freq=1)  # its hooks log through the global wandb.run
        cleanup.append(run.finish)

        def step():
            loss = fwd_bwd()
            opt.step()
            run.log({"loss": loss})  # commits the step; watch's hooks logged the gradients during backward
    elif name == "norm loop + TB":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir)
        cleanup.append(writer.close)
        named = list(model.named_parameters())
        counter = [0]

        def step():
            fwd_bwd()
            for n, p in named:  # what people write today: one reduction and one sync per parameter
                writer.add_scalar(f"grad_norm/{n}", p.grad.norm(), counter[0])
            counter[0] += 1
            opt.step()
    elif name.startswith("accum:"):
        micro = ids.reshape(2, 4, ids.shape[1])
        counter = [0]

        def accum_bwd(first_hook=None):
            opt.zero_grad(set_to_none=True)
            for j in range(2):
                out = model(micro[j][:, :-1])
                loss = loss_fn(out.reshape(-1, out.shape[-1]), micro[j][:, 1:].reshape(-1)) / 2
                loss.backward()
                if j == 0 and first_hook is not None:
                    first_hook()

        if name == "accum: none + clip_grad_norm_":
            def step():
                accum_bwd()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
        elif name == "accum: health/10 fastgrad":
            ns = fastgrad.NoiseScale()
            mon = fastgrad.GradMonitor(model, every=10, log_every=2, weights=True, noise_scale=ns, run_dir=run_dir)
            wopt = fastgrad.wrap(opt, max_norm=1.0, model=model, monitor=mon, track_updates=True)
            cleanup.append(mon.close)

            def step():
                on = counter[0] % 10 == 0
                counter[0] += 1
                accum_bwd((lambda: ns.first_micro_batch(model)) if on else None)
                if on:
                    ns.accumulated(model, micro_batch_size=4, micro_batches=2)
                wopt.step()
        elif name == "accum: health/10 per-param loop":
            params = [p for p in model.parameters()]
            ema = {"g2": 0.0, "tr": 0.0}
            first = [0.0]
            log: list = []

            def sq():
                return sum(torch.linalg.vector_norm(p.grad).item() ** 2 for p in params if p.grad is not None)

            def step():
                on = counter[0] % 10 == 0
                counter[0] += 1
                accum_bwd((lambda: first.__setitem__(0, sq())) if on else None)
                if on:
                    big = sq()
                    g2 = (8 * big - 4 * first[0]) / 4  # two_batch_estimates(b_small=4, b_big=8)
                    tr = (first[0] - big) / (1 / 4 - 1 / 8)
                    ema["g2"] = 0.99 * ema["g2"] + 0.01 * g2
                    ema["tr"] = 0.99 * ema["tr"] + 0.01 * tr
                    gn = [torch.linalg.vector_norm(p.grad).item() for p in params]
                    wn = [torch.linalg.vector_norm(p).item() for p in params]
                    before = [p.detach().clone() for p in params]
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if on:
                    un = [torch.linalg.vector_norm(p.detach() - b).item() for p, b in zip(params, before)]
                    log.append((gn, wn, un, [u / w if w else 0.0 for u, w in zip(un, wn)],
                                ema["tr"] / ema["g2"] if ema["g2"] else float("nan")))
        else:
            raise ValueError(name)
    else:
        raise ValueError(name)
    return step, cleanup


def available(name: str) -> str | None:
    """None if the variant can run here, else why not."""
    if name == "wandb.watch":
        try:
            import wandb  # noqa: F401
        except ImportError:
            return "wandb not installed"
    if name == "norm loop + TB":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            return "tensorboard not installed"
    if name == "fastgrad wrap" and not hasattr(fastgrad, "wrap"):
        return "fastgrad.wrap not available"
    return None


def bench(device: str, steps: int, rounds: int, threads: int | None, only=None) -> list[dict]:
    names = ["none", "fastgrad", "fastgrad+hist", "none + clip_grad_norm_", "fastgrad wrap", "wandb.watch",
             "norm loop + TB", "accum: none + clip_grad_norm_", "accum: health/10 fastgrad",
             "accum: health/10 per-param loop"]
    if only:
        names = [n for n in names if n in only]
    skipped = {n: available(n) for n in names}
    names = [n for n in names if skipped[n] is None]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = {n: float("inf") for n in names}
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
        variants = {}
        # wandb prints to stdout/stderr; keep the table readable
        with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            os.environ.setdefault("WANDB_SILENT", "true")
            for n in names:
                variants[n] = make_variant(n, device, tmp)
                for _ in range(3):  # warm-up: allocator, autograd graph, first flush of files
                    variants[n][0]()
        sync()
        for r in range(rounds):
            for n in names:
                step = variants[n][0]
                with contextlib.redirect_stdout(devnull):
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        step()
                    sync()
                    dt = (time.perf_counter() - t0) / steps
                best[n] = min(best[n], dt)
            print(f"  [{device}] round {r + 1}/{rounds}: " + ", ".join(f"{n} {best[n] * 1e3:.1f}" for n in names),
                  file=sys.stderr, flush=True)
        direct = {}
        for n in names:
            fn = getattr(variants[n][0], "direct", None)
            if fn is not None:
                direct[n] = min(fn() for _ in range(3))
        with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            for n in names:
                for fn in variants[n][1]:
                    fn()
    base = best.get("none", float("nan"))
    wandb_over = best["wandb.watch"] - base if "wandb.watch" in best else None
    rows = []
    for n in names:
        ref = (best.get("none + clip_grad_norm_", float("nan")) if n == "fastgrad wrap" else
               best.get("accum: none + clip_grad_norm_", float("nan")) if n.startswith("accum:") else base)
        over = best[n] - ref
        row = {"device": device, "variant": n, "ms/step": best[n] * 1e3,
               "overhead %": 100 * over / ref if n not in ("none", "accum: none + clip_grad_norm_") else 0.0}
        if n == "fastgrad wrap":
            row["variant"] = "fastgrad wrap (vs clip_grad_norm_)"
        if n in direct:
            # End-to-end differences of < ~2% are within this machine's noise; the direct timing is not.
            row["monitor ms (direct)"] = direct[n] * 1e3
            row["direct %"] = 100 * direct[n] / base
            if wandb_over:
                row["x lower than wandb.watch"] = wandb_over / direct[n]
        rows.append(row)
    for n, why in skipped.items():
        if why:
            rows.append({"device": device, "variant": n, "ms/step": "skipped: " + why})
    return rows


def health_direct(device: str, reps: int) -> list[dict]:
    """The health/10 rows' own work, timed alone on real gradients (end-to-end differences are
    below the noise of a shared CPU): per monitored step, the extra time of (a) fastgrad
    (``wrap(max_norm, monitor=GradMonitor(weights=True, noise_scale), track_updates=True)`` step
    + the two NoiseScale passes + an amortised flush) and (b) the per-parameter loop, each over
    ``clip_grad_norm_ + opt.step()``; divided by 10 (every 10th step) and by the accumulation step."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = SmallTransformer().to(device)
    params = list(model.parameters())
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, 2048, (2, 4, 128), generator=g).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def accum():
        opt.zero_grad(set_to_none=True)
        for j in range(2):
            out = model(ids[j][:, :-1])
            (loss_fn(out.reshape(-1, out.shape[-1]), ids[j][:, 1:].reshape(-1)) / 2).backward()

    def best(fn, n=reps):
        ts = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    def plain():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    t_step = best(lambda: (accum(), plain()))
    accum()
    t_plain = best(plain)
    with tempfile.TemporaryDirectory() as tmp:
        ns = fastgrad.NoiseScale()
        mon = fastgrad.GradMonitor(model, every=1, log_every=2, weights=True, noise_scale=ns, run_dir=tmp,
                                   histogram_every=0)
        wopt = fastgrad.wrap(opt, max_norm=1.0, model=model, monitor=mon, track_updates=True)

        def fg():
            ns.first_micro_batch(model)  # (on .grad as it is: the cost is one fused norm pass)
            ns.accumulated(model, micro_batch_size=4, micro_batches=2)
            wopt.step()

        fg()
        t_fg = best(fg)
        t_flush = best(lambda: (fg(), fg(), mon.flush())) - 2 * t_fg  # one flush per 2 monitored steps
        mon.close()
        opt = wopt.optimizer
    ema = {"g2": 0.0, "tr": 0.0}

    def loop():
        first = sum(torch.linalg.vector_norm(p.grad).item() ** 2 for p in params)
        big = sum(torch.linalg.vector_norm(p.grad).item() ** 2 for p in params)
        ema["g2"] = 0.99 * ema["g2"] + 0.01 * (8 * big - 4 * first) / 4
        ema["tr"] = 0.99 * ema["tr"] + 0.01 * (first - big) / (1 / 4 - 1 / 8)
        gn = [torch.linalg.vector_norm(p.grad).item() for p in params]
        wn = [torch.linalg.vector_norm(p).item() for p in params]
        before = [p.detach().clone() for p in params]
        plain()
        un = [torch.linalg.vector_norm(p.detach() - b).item() for p, b in zip(params, before)]
        return gn, wn, un, [u / w if w else 0.0 for u, w in zip(un, wn)]

    t_loop = best(loop)
    fg_extra = max(t_fg - t_plain, 0.0) + max(t_flush, 0.0) / 2
    loop_extra = max(t_loop - t_plain, 0.0)
    rows = [{"device": device, "variant": "accum step (2 x 4, clip, AdamW)", "ms/step": t_step * 1e3}]
    for name, extra in (("health/10 fastgrad (direct)", fg_extra), ("health/10 per-param loop (direct)", loop_extra)):
        rows.append({"device": device, "variant": name, "ms/step": extra * 1e3,
                     "overhead %": 100 * extra / 10 / t_step})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="cpu, cuda, or all available (default)")
    ap.add_argument("--steps", type=int, default=None, help="steps per round (default: 20 CPU, 100 CUDA)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all), e.g. "
                    "'accum: none + clip_grad_norm_,accum: health/10 fastgrad,accum: health/10 per-param loop'")
    ap.add_argument("--health-direct", action="store_true",
                    help="only the health/10 direct timing (monitored-step extra work / 10 over the step)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions for --health-direct (best of)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if args.health_direct:
        rows = [r for dev in devices for r in health_direct(dev, args.reps)]
        print(table(rows, ["device", "variant", "ms/step", "overhead %"]))
        print("\nms/step of the direct rows: the extra work of one monitored step (gradients, weights, updates, "
              "noise scale, amortised flush) over clip_grad_norm_ + opt.step(); overhead %: that / 10 "
              "(every 10th step) / the accumulation step. Target < 3% on CPU.")
        return 0
    rows = []
    for dev in devices:
        steps = args.steps or (20 if dev == "cpu" else 100)
        only = None if args.only is None else [x.strip() for x in args.only.split(",")]
        rows += bench(dev, steps, args.rounds, args.threads, only)
    print(f"\nSmall transformer (4 x d256 encoder layers, 2048-token vocab, batch 8 x 127, AdamW), torch "
          f"{torch.__version__}, {torch.get_num_threads()} CPU threads; best of {args.rounds} rounds\n")
    print(table(rows, ["device", "variant", "ms/step", "overhead %", "monitor ms (direct)", "direct %",
                       "x lower than wandb.watch"]))
    print("\noverhead %: end-to-end step time over the baseline (none; the wrap row: over none + "
          "clip_grad_norm_), noise about +-2% on a shared CPU. direct: the monitor's own work timed alone "
          "(GradMonitor.step + flush + JSONL, per step); 'x lower' = wandb.watch's end-to-end overhead / "
          "fastgrad's direct cost.")
    print("accum rows: 2 micro-batches of 4, clip 1.0; overhead over 'accum: none + clip_grad_norm_'. "
          "health/10: gradients, weights, updates and the noise scale every 10th step.")
    print("\nTargets: fastgrad overhead < 3% of the step on CPU, < 1% on GPU, and >= 10x below wandb.watch's; "
          "health/10 < 3% on CPU, < 1% on GPU.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
