"""Size and time of fastgrad's cross-rank reduction for a 70B-parameter layout (Llama-2-70B shapes).

Part 1 (no processes): the message each rank sends per step, from the layout
alone (T tensors, P finite norms, B histogram bins), next to the gradient bytes
each rank reads: the message does not grow with the model or the world size.

Part 2 (real gloo ranks on this CPU, ``--world`` processes): the time of
``grad_stats(process_group=...)``'s reduction (MAX [T, P+1] + SUM [T, P+5+B],
float64) and of the clip path's 2-number all-reduce, for the 70B table sizes,
next to a bare all-reduce of the same bytes; then an end-to-end check on the
70B layout scaled down 64x per dimension (same 723 tensors, 17M parameters),
row-sharded across the ranks: every statistic against the unsharded result.

    python bench/collective_size.py --world 4
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import table

import fastgrad
from fastgrad import distributed as fgdist
from fastgrad.spec import HistogramSpec, RawStats, make_spec


def llama_70b_shapes(scale: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-2-70B parameter shapes (80 layers, GQA with 8 KV heads), each dim divided by ``scale``."""
    d, f, v, kv, layers = 8192 // scale, 28672 // scale, 32000 // scale, 1024 // scale, 80
    shapes = [("embed_tokens.weight", (v, d))]
    for i in range(layers):
        h = f"layers.{i}."
        shapes += [(h + "self_attn.q_proj.weight", (d, d)), (h + "self_attn.k_proj.weight", (kv, d)),
                   (h + "self_attn.v_proj.weight", (kv, d)), (h + "self_attn.o_proj.weight", (d, d)),
                   (h + "mlp.gate_proj.weight", (f, d)), (h + "mlp.up_proj.weight", (f, d)),
                   (h + "mlp.down_proj.weight", (d, f)),
                   (h + "input_layernorm.weight", (d,)), (h + "post_attention_layernorm.weight", (d,))]
    return shapes + [("norm.weight", (d,)), ("lm_head.weight", (v, d))]


CONFIGS = {  # name -> (norm_types, histogram)
    "grad_stats default (L2, 82 bins)": ((2,), True),
    "grad_stats L2 + inf, no histogram": ((2, "inf"), False),
    "grad_stats L2, L1, 32 bins": ((2, 1), (-24, 6)),
}


def message_floats(T: int, P: int, B: int) -> tuple[int, int]:
    """float64 values in the MAX and SUM all-reduces of reduce_raw."""
    return T * (P + 1), T * (P + 4 + B + 1)


def part1(shapes) -> None:
    T = len(shapes)
    numel = sum(math.prod(s) for _, s in shapes)
    print(f"Llama-2-70B layout: T = {T} tensors, {numel / 1e9:.2f}B parameters, "
          f"{2 * numel / 1e9:.0f} GB of bf16 gradients\n")
    rows = []
    for name, (norms, hist) in CONFIGS.items():
        spec = make_spec(norms, hist)
        P, B = len(spec.finite_norms), spec.histogram.num_bins if spec.histogram else 0
        mx, sm = message_floats(T, P, B)
        rows.append({"statistics": name, "P": P, "B": B, "MAX floats": mx, "SUM floats": sm,
                     "bytes": 8 * (mx + sm)})
    rows.append({"statistics": "clip_grad_norm_ (total only)", "P": 1, "B": 0, "MAX floats": 0,
                 "SUM floats": 2, "bytes": 16})
    print(table(rows, ["statistics", "P", "B", "MAX floats", "SUM floats", "bytes"]))
    mx, sm = message_floats(T, 1, HistogramSpec().num_bins)
    msg = 8 * (mx + sm)
    print("\nPer rank, default statistics, FSDP over W ranks (bf16 gradients):")
    rows = [{"W": w, "gradient bytes read": 2 * numel / w, "message bytes": msg,
             "message / gradient": msg / (2 * numel / w)} for w in (8, 64, 512, 1024, 4096)]
    print(table(rows, ["W", "gradient bytes read", "message bytes", "message / gradient"]))


def _timed(fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, each started together after a barrier (rank-local)."""
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, world: int, store: str, reps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    shapes = llama_70b_shapes()
    T = len(shapes)
    rows = []
    for name, (norms, hist) in CONFIGS.items():
        spec = make_spec(norms, hist)
        P, K = len(spec.finite_norms), spec.num_count_cols
        g = torch.Generator().manual_seed(rank)
        raw = RawStats(torch.rand(T, P + 1, generator=g, dtype=torch.float64),
                       torch.randint(0, 1 << 30, (T, K), generator=g))
        local = [torch.empty(0)] * T  # only numel is read
        plan = fgdist.DistPlan(group, local, [True] * T, communicate=True)
        t_reduce = _timed(lambda raw=raw, spec=spec, plan=plan: fgdist.reduce_raw(raw, spec, plan), reps)
        mx, sm = message_floats(T, P, K - 4)
        a, b = torch.zeros(mx, dtype=torch.float64), torch.zeros(sm, dtype=torch.float64)
        t_bare = _timed(lambda a=a, b=b: (dist.all_reduce(a, op=dist.ReduceOp.MAX), dist.all_reduce(b)), reps)
        rows.append({"statistics": name, "bytes": 8 * (mx + sm), "reduce_raw ms": 1e3 * t_reduce,
                     "2 bare all-reduces ms": 1e3 * t_bare})
    spec = make_spec((2,), False)
    raw = RawStats(torch.rand(T, 2, dtype=torch.float64), torch.zeros(T, 4, dtype=torch.int64))
    plan = fgdist.DistPlan(group, [torch.empty(0)] * T, [True] * T, communicate=True)
    t_clip = _timed(lambda: fgdist.reduce_total_norm(raw, 2.0, plan, [torch.float32]), reps)
    rows.append({"statistics": "clip total (L2, fp32 grads)", "bytes": 16, "reduce_raw ms": 1e3 * t_clip})

    # end to end on the scaled layout: row shards of every tensor, compared with the whole tensors
    small = llama_70b_shapes(scale=64)
    g = torch.Generator().manual_seed(0)
    full = [(n, torch.randn(s, generator=g) * 10.0 ** torch.randint(-6, 1, (), generator=g).item())
            for n, s in small]
    mine = [(n, t.tensor_split(world)[rank]) for n, t in full]
    kw = {"norm_types": (2, 1, "inf"), "groups": 2}
    def run():
        return fastgrad.grad_stats(mine, process_group=group, placements="shard", **kw)

    got = run()  # first call: one-time set-up
    t_e2e = _timed(run, 5)
    want = fastgrad.grad_stats(full, **kw)
    rel = ((got.raw.floats - want.raw.floats).abs() / want.raw.floats.abs().clamp_min(1e-300)).max().item()
    grel = ((got.groups.raw.floats - want.groups.raw.floats).abs()
            / want.groups.raw.floats.abs().clamp_min(1e-300)).max().item()
    exact = torch.equal(got.raw.counts, want.raw.counts) and torch.equal(got.numel, want.numel)
    if rank == 0:
        print(f"\nReal gloo all-reduces, {world} ranks on this CPU (median of {reps}):")
        print(table(rows, ["statistics", "bytes", "reduce_raw ms", "2 bare all-reduces ms"]))
        nparam = sum(t.numel() for _, t in full)
        print(f"\nEnd to end, 70B layout / 64 per dim ({len(full)} tensors, {nparam / 1e6:.1f}M params), "
              f"row-sharded over {world} ranks: grad_stats(process_group=...) {1e3 * t_e2e:.1f} ms; "
              f"max rel err per-tensor {rel:.2e}, per-layer {grel:.2e}; "
              f"counts, histograms and numel {'exact' if exact else 'DIFFER'}")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    part1(llama_70b_shapes())
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args.world, os.path.join(tmp, "store"), args.reps),
                           nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
