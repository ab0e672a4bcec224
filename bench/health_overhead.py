"""End-to-end cost of training health (issue #13): everything on every 10 steps, against nothing on
and against composer/OLMo-style per-parameter torch reductions computing the same numbers.

    OMP_NUM_THREADS=1 python bench/health_overhead.py [--models mlp,transformer] [--optims fused,foreach]
        [--rounds 12] [--threads 1] [--clip]

A realistic small CPU training loop: gradient accumulation over 2 micro-batches, AdamW (fused or
foreach), on

* ``mlp``          4 x Linear(1024, 1024) + GELU, a Linear(1024, 10) head, micro-batches of 64
                   (4.2 M parameters, 10 tensors);
* ``transformer``  token embedding, 4 pre-norm encoder layers d_model 256 (4 heads, ff 1024),
                   LM head, vocabulary 2048, micro-batches of 4 x 127 tokens (4.2 M parameters,
                   51 tensors);
* ``deep``         the same with 24 layers of d_model 128 (ff 512): 5.3 M parameters in 291 tensors,
                   where per-parameter loops pay per tensor (``--models deep``).

Variants (each trains its own copy of the same model from the same initial weights):

* ``off``       the loop with nothing on;
* ``fastgrad``  ``fastgrad.wrap(opt, monitor=GradMonitor(every=10, weights=True, noise_scale=ns),
                track_updates=True)``: per-layer gradient statistics and weight norms (one fused
                pass, ``params=True``), update norms and ratios (derived from AdamW's state),
                ``NoiseScale.first_micro_batch`` (one fused norm pass) and ``accumulated`` given
                the statistics pass's ``last_stats.total_norm`` (no pass of its own); JSONL
                written and flushed at every monitored step (``log_every=1``: the pessimistic
                setting; detectors on, histograms off: the per-parameter loops have none);
* ``fastgrad standalone``  the same numbers without ``wrap``: ``GradMonitor.stats_request()``,
                ``grad_stats(model, **request)`` (gradients and weights), ``UpdateTracker`` taking
                ``||w_before||`` from that pass (``before_step(param_norms=)``), ``opt.step()``,
                ``monitor.record(stats, updates=...)``; unmonitored steps run ``opt.step()`` alone
                (``wrap`` guards every step: a statistics pass per step, monitored or not);
* ``per-param (clone)``  composer ``OptimizerMonitor`` / OLMo style on the same steps: one
                ``torch.linalg.vector_norm`` per parameter for the gradient (after the first
                micro-batch too, for the noise scale) and the weight, a clone of every weight
                before the step and one norm of each difference after, ratios, the same noise-
                scale EMA, every value read with ``.item()`` and one JSON line written per
                monitored step;
* ``per-param (derived)``  the same, but the update of each parameter rebuilt from AdamW's
                state after the step as composer's ``DecoupledAdamW`` does for its update
                metrics (``exp_avg / (sqrt(exp_avg_sq)/sqrt(bc2) + eps) * step_size`` plus the
                decay term): no weight copy.

Every 10th step is monitored in all three. ``--clip``: every variant also clips at 1.0
(fastgrad through ``wrap(max_norm=1.0)``, the others with ``clip_grad_norm_``).

How it is timed on a shared machine: by default with this process's CPU time
(``time.process_time``), so that time slices given to other processes on a shared machine do not
count (memory-bandwidth and cache contention still do; with more than one torch thread it sums
the threads, OpenMP spin-waits included: use ``--clock wall`` on a quiet machine). A block is 10
consecutive training steps (exactly one
monitored); each round runs one block of every variant, in an order rotated from round to round.
``overhead % (best)``: each variant's fastest block against ``off``'s fastest; ``overhead %
(median)``: the median over rounds of the block's time over ``off``'s block in the same round
(paired, so slow phases of the machine hit both). Both are end to end and swing by several % on
a shared 2-core VM, so the extra work of one monitored step is also timed alone on real gradients
(``direct``: monitored step minus ``opt.step()``, best of ``--direct-reps``, interleaved), and
``direct %`` = direct / 10 / the ``off`` step: the cost of the monitored work amortised over the
10 steps (it leaves out what ``wrap`` does on unmonitored steps, which the end-to-end rows see).
Target (issue #13): fastgrad under 3% of the training step on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import table  # noqa: E402
from monitor_overhead import SmallTransformer  # noqa: E402  (the same model as the monitor benchmark)

import fastgrad  # noqa: E402

EVERY = 10
MICRO = 2  # micro-batches per step
CLOCK = time.process_time  # --clock: process CPU time (default) or wall time (time.perf_counter)


class MLP(torch.nn.Module):
    def __init__(self, d=1024, layers=4, classes=10):
        super().__init__()
        self.body = torch.nn.Sequential(*[m for _ in range(layers) for m in (torch.nn.Linear(d, d), torch.nn.GELU())])
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.body(x))

def make_task(kind: str):
    """(model, micro-batches [(x, y)], loss_fn, micro-batch size), the same for every variant."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = MLP()
        batches = [(torch.randn(64, 1024, generator=g), torch.randint(0, 10, (64,), generator=g))
                   for _ in range(MICRO)]
        return model, batches, torch.nn.functional.cross_entropy, 64
    if kind == "transformer":
        model = SmallTransformer()
        ids = torch.randint(0, 2048, (MICRO, 4, 128), generator=g)
        batches = [(ids[j][:, :-1], ids[j][:, 1:]) for j in range(MICRO)]

        def loss_fn(out, y):
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

        return model, batches, loss_fn, 4
    if kind == "deep":
        model = SmallTransformer(d=128, heads=4, layers=24, ff=512)
        ids = torch.randint(0, 2048, (MICRO, 4, 128), generator=g)
        batches = [(ids[j][:, :-1], ids[j][:, 1:]) for j in range(MICRO)]

        def loss_fn(out, y):
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

        return model, batches, loss_fn, 4
    raise ValueError(kind)


def make_opt(params, kind: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=(kind == "fused"),
                             foreach=(kind == "foreach") or None)


class PerParamHealth:
    """composer/OLMo style: one torch reduction per parameter, values read with .item()."""

    def __init__(self, model, opt, b_small, b_big, path, derived: bool):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.opt, self.b_small, self.b_big, self.derived = opt, b_small, b_big, derived
        self.ema = {"g2": 0.0, "tr": 0.0}
        self.fh = open(path, "w")
        self.first = 0.0

    def first_micro_batch(self):
        self.first = sum(torch.linalg.vector_norm(p.grad).item() ** 2 for _, p in self.named if p.grad is not None)

    def before_step(self):
        self.gn = [torch.linalg.vector_norm(p.grad).item() for _, p in self.named]
        self.wn = [torch.linalg.vector_norm(p).item() for _, p in self.named]
        if not self.derived:
            self.before = [p.detach().clone() for _, p in self.named]

    @torch.no_grad()
    def _derived_update(self, p):
        # composer DecoupledAdamW / torch AdamW: Δw = -(lr wd) w_b - step_size m / (sqrt(v)/sqrt(bc2) + eps)
        group = next(g for g in self.opt.param_groups if any(q is p for q in g["params"]))
        st = self.opt.state[p]
        t = float(st["step"])
        b1, b2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
        u = st["exp_avg"] / denom * (-lr / (1 - b1 ** t))
        w_b = (p.detach() - u) / (1 - lr * wd)
        return torch.linalg.vector_norm(p.detach() - w_b).item()

    def after_step(self, step):
        if self.derived:
            un = [self._derived_update(p) for _, p in self.named]
        else:
            un = [torch.linalg.vector_norm(p.detach() - b).item() for (_, p), b in zip(self.named, self.before)]
            self.before = None
        big = sum(x * x for x in self.gn)
        bs, bb = self.b_small, self.b_big
        self.ema["g2"] = 0.99 * self.ema["g2"] + 0.01 * (bb * big - bs * self.first) / (bb - bs)
        self.ema["tr"] = 0.99 * self.ema["tr"] + 0.01 * (self.first - big) / (1 / bs - 1 / bb)
        rec = {"step": step, "layers": {n: {"norm": g, "param_norm": w, "grad_param_ratio": g / w if w else None,
                                            "update_norm": u, "update_ratio": u / w if w else None}
                                        for (n, _), g, w, u in zip(self.named, self.gn, self.wn, un)},
               "total": {"norm": math.sqrt(big), "param_norm": math.sqrt(sum(w * w for w in self.wn)),
                         "update_norm": math.sqrt(sum(u * u for u in un))},
               "noise_scale": self.ema["tr"] / self.ema["g2"] if self.ema["g2"] else None}
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()

    def close(self):
        self.fh.close()


def make_variant(name: str, model_kind: str, opt_kind: str, tmp: str, clip: bool):
    """(step(), close(), monitored_extra()): one training step; cleanup; the direct timing."""
    model, batches, loss_fn, b = make_task(model_kind)
    params = list(model.parameters())
    opt = make_opt(params, opt_kind)
    counter = [0]
    run_dir = os.path.join(tmp, f"{model_kind}_{opt_kind}_{name}".replace(" ", "_").replace("(", "").replace(")", ""))

    def accumulate(first_hook=None):
        opt.zero_grad(set_to_none=True)
        for j, (x, y) in enumerate(batches):
            (loss_fn(model(x), y) / MICRO).backward()
            if j == 0 and first_hook is not None:
                first_hook()

    def clip_():
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)

    if name == "off":
        def step():
            accumulate()
            clip_()
            opt.step()
        return step, (lambda: None), None

    if name == "fastgrad":
        ns = fastgrad.NoiseScale()
        mon = fastgrad.GradMonitor(model, every=EVERY, log_every=1, weights=True, noise_scale=ns, run_dir=run_dir,
                                   histogram_every=0)
        wopt = fastgrad.wrap(opt, max_norm=1.0 if clip else None, model=model, monitor=mon, track_updates=True)

        def step():
            on = counter[0] % EVERY == 0
            counter[0] += 1
            accumulate((lambda: ns.first_micro_batch(model)) if on else None)
            wopt.step()
            if on:  # the big batch's norm is the statistics pass's total (before clipping): no extra pass
                ns.accumulated(micro_batch_size=b, micro_batches=MICRO, total_norm=wopt.last_stats.total_norm)

        def extra(reps):
            """One monitored step's work beyond opt.step(), on the gradients as they are (every=1)."""
            ns2 = fastgrad.NoiseScale()
            mon2 = fastgrad.GradMonitor(model, every=1, log_every=1, weights=True, noise_scale=ns2,
                                        run_dir=run_dir + "_direct", histogram_every=0)
            w2 = fastgrad.wrap(make_opt(params, opt_kind), max_norm=1.0 if clip else None, model=model, monitor=mon2,
                               track_updates=True)
            plain = make_opt(params, opt_kind)

            def monitored():
                ns2.first_micro_batch(model)  # (the cost is one fused norm pass over .grad, whatever it holds)
                w2.step()
                ns2.accumulated(micro_batch_size=b, micro_batches=MICRO, total_norm=w2.last_stats.total_norm)

            return _extra(accumulate, monitored, clip_, plain, reps, mon2.close)

        return step, mon.close, extra

    if name == "fastgrad standalone":
        ns = fastgrad.NoiseScale()
        mon = fastgrad.GradMonitor(model, every=EVERY, log_every=1, weights=True, noise_scale=ns, run_dir=run_dir,
                                   histogram_every=0)
        tracker = fastgrad.UpdateTracker(opt, model=model)
        monitored_step = _standalone(model, opt, mon, ns, tracker, b, clip)

        def step():
            on = counter[0] % EVERY == 0
            counter[0] += 1
            accumulate((lambda: ns.first_micro_batch(model)) if on else None)
            monitored_step()  # on unmonitored steps: stats_request() says no, then clip + opt.step()

        def extra(reps):
            ns2 = fastgrad.NoiseScale()
            mon2 = fastgrad.GradMonitor(model, every=1, log_every=1, weights=True, noise_scale=ns2,
                                        run_dir=run_dir + "_direct", histogram_every=0)
            opt2, plain = make_opt(params, opt_kind), make_opt(params, opt_kind)
            tr2 = fastgrad.UpdateTracker(opt2, model=model)
            inner = _standalone(model, opt2, mon2, ns2, tr2, b, clip)

            def monitored():
                ns2.first_micro_batch(model)
                inner()

            return _extra(accumulate, monitored, clip_, plain, reps, mon2.close)

        return step, mon.close, extra

    if name.startswith("per-param"):
        derived = "derived" in name
        os.makedirs(run_dir, exist_ok=True)
        h = PerParamHealth(model, opt, b, b * MICRO, os.path.join(run_dir, "health.jsonl"), derived)

        def step():
            on = counter[0] % EVERY == 0
            counter[0] += 1
            accumulate(h.first_micro_batch if on else None)
            clip_()
            if on:
                h.before_step()
            opt.step()
            if on:
                h.after_step(counter[0] - 1)

        def extra(reps):
            plain = make_opt(params, opt_kind)
            h2 = PerParamHealth(model, opt, b, b * MICRO, os.path.join(run_dir, "direct.jsonl"), derived)

            def monitored():
                h2.first_micro_batch()
                clip_()
                h2.before_step()
                opt.step()
                h2.after_step(0)

            return _extra(accumulate, monitored, clip_, plain, reps, h2.close)

        return step, h.close, extra
    raise ValueError(name)


def _standalone(model, opt, mon, ns, tracker, b, clip):
    """One optimizer step with GradMonitor and UpdateTracker used directly (no wrap): on a
    monitored step the statistics pass (gradients and weights), the tracker taking ``||w_before||``
    from that pass (``before_step(param_norms=)``), the step, ``record(stats, updates=)``, and the
    noise scale's big batch from the pass's total norm; otherwise clip + ``opt.step()`` only."""
    named = dict(model.named_parameters())
    cache = {}

    @torch.no_grad()
    def step():
        req = mon.stats_request()
        if req is None:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return
        stats = fastgrad.grad_stats(model, **req)
        if clip:
            fastgrad.clip_grads_with_norm_(model.parameters(), 1.0, stats.total_norm)
        ps = cache.get(stats.names)
        if ps is None:
            ps = cache[stats.names] = [named[n] for n in stats.names]
        tracker.before_step(param_norms=(ps, stats.params.tensor_norms))
        opt.step()
        mon.record(stats, updates=tracker.after_step())
        ns.accumulated(micro_batch_size=b, micro_batches=MICRO, total_norm=stats.total_norm)

    return step


def _extra(accumulate, monitored, clip_, plain, reps: int, close) -> float:
    """Best time of ``monitored()`` minus best time of the unmonitored step (``clip_()`` then
    ``plain.step()``), interleaved, on fresh gradients; ``close()`` afterwards, whatever happens."""
    def base():
        clip_()
        plain.step()

    try:
        accumulate()
        monitored()
        base()
        bm = bb = float("inf")
        for _ in range(reps):
            t0 = CLOCK()
            monitored()
            t1 = CLOCK()
            base()
            t2 = CLOCK()
            bm, bb = min(bm, t1 - t0), min(bb, t2 - t1)
        return max(bm - bb, 0.0)
    finally:
        close()


VARIANTS = ["off", "fastgrad", "fastgrad standalone", "per-param (clone)", "per-param (derived)"]


def run(model_kind: str, opt_kind: str, rounds: int, direct_reps: int, clip: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vs = {n: make_variant(n, model_kind, opt_kind, tmp, clip) for n in VARIANTS}
        for n, (step, _, _) in vs.items():
            for _ in range(EVERY):  # warm-up: allocator, autograd graph, optimizer state, files
                step()
        best = {n: float("inf") for n in VARIANTS}
        ratios: dict[str, list[float]] = {n: [] for n in VARIANTS}
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]  # rotate: no fixed position
            block = {}
            for n in order:
                step = vs[n][0]
                t0 = CLOCK()
                for _ in range(EVERY):
                    step()
                block[n] = (CLOCK() - t0) / EVERY
                best[n] = min(best[n], block[n])
            for n in VARIANTS:
                ratios[n].append(block[n] / block["off"])
            print(f"  [{model_kind}/{opt_kind}] round {r + 1}/{rounds}: "
                  + ", ".join(f"{n} {block[n] * 1e3:.1f}" for n in VARIANTS), file=sys.stderr, flush=True)
        direct = {n: vs[n][2](direct_reps) for n in VARIANTS if vs[n][2] is not None}
        for n in VARIANTS:
            vs[n][1]()
    base = best["off"]
    for n in VARIANTS:
        row = {"model": model_kind, "AdamW": opt_kind, "variant": n, "ms/step": best[n] * 1e3,
               "overhead % (best)": 100 * (best[n] - base) / base,
               "overhead % (median)": 100 * (statistics.median(ratios[n]) - 1)}
        if n in direct:
            row["direct ms"] = direct[n] * 1e3
            row["direct %"] = 100 * direct[n] / EVERY / base
        rows.append(row)
    fg = next(r for r in rows if r["variant"] == "fastgrad")
    fs = next(r for r in rows if r["variant"] == "fastgrad standalone")
    for r in rows:
        if r["variant"].startswith("per-param") and fg.get("direct ms"):
            r["x fastgrad (direct)"] = r["direct ms"] / fg["direct ms"]
            r["x standalone (direct)"] = r["direct ms"] / fs["direct ms"]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,transformer,deep", help="mlp, transformer, deep")
    ap.add_argument("--optims", default="fused,foreach")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of 10-step blocks per variant (best block kept)")
    ap.add_argument("--direct-reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--clip", action="store_true", help="every variant clips at 1.0")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: this process's CPU time (default; other processes' time slices on a shared "
                         "machine do not count; with several threads it sums them); wall: elapsed time")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for mk in args.models.split(","):
        for ok in args.optims.split(","):
            rows += run(mk.strip(), ok.strip(), args.rounds, args.direct_reps, args.clip)
    print(f"\nHealth every {EVERY} steps, {MICRO} micro-batches per step, AdamW, clip {'1.0' if args.clip else 'off'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {args.rounds} rounds of 10-step blocks; "
          f"{'process CPU' if args.clock == 'cpu' else 'wall'} time\n")
    print(table(rows, ["model", "AdamW", "variant", "ms/step", "overhead % (best)", "overhead % (median)",
                       "direct ms", "direct %", "x fastgrad (direct)", "x standalone (direct)"]))
    print("\noverhead %: end-to-end, over 'off': (best) fastest 10-step block against off's fastest; (median) the "
          "median over rounds of each round's block / off's block of the same round (noise: several % on a shared "
          "CPU). direct ms: one monitored step's extra work (gradients, weights, updates, noise scale, JSONL) timed "
          "alone; direct % = direct / 10 / off step. x fastgrad: the per-parameter loop's direct cost / fastgrad "
          "(wrap)'s. Target: fastgrad < 3% on CPU.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
