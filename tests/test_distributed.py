"""Sharded gradients: every rank gets the unsharded model's statistics and clipping, from <= 2 all-reduces.

Multi-process tests on CPU with gloo (2 and 4 ranks, torch.multiprocessing
spawn, a FileStore in tmp_path so runs never collide). Every collective has a
60 s timeout and the parent kills the ranks after JOIN_TIMEOUT, so nothing hangs.
Each rank also builds the single-process model and compares against it.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
from conftest import assert_raw_close, make_tensor, spawn_ranks

import fastgrad
from fastgrad import distributed as fgdist

JOIN_TIMEOUT = 150  # seconds for a whole multi-rank run
TOL = 1e-9  # float64 training: only reduction order differs


# -- harness ------------------------------------------------------------------------------------

def _entry(rank: int, world: int, store: str, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for name in scenarios:
            try:
                SCENARIOS[name](rank, world)
            except Exception as e:
                raise AssertionError(f"rank {rank}/{world}, scenario {name}: {e}") from e
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path, scenarios: list[str]) -> None:
    store = os.path.join(str(tmp_path), "store")
    spawn_ranks(_entry, (world, store, scenarios), world, JOIN_TIMEOUT, str(scenarios))


@contextlib.contextmanager
def count_collectives():
    """Count the float64 ``all_reduce`` calls (the statistics) issued by fastgrad inside the block.

    The one-time layout check (an int64 all-reduce on the first call per group, see
    fastgrad/dist_layout.py) is not a per-step cost: it is left out here and counted in
    tests/test_parallel_layouts.py.
    """
    calls = []
    real = dist.all_reduce

    def counting(t, *args, **kwargs):
        if t.dtype != torch.int64:
            calls.append(t.numel())
        return real(t, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = real


def assert_stats_equal(got: fastgrad.GradStats, want: fastgrad.GradStats, rel: float, what: str) -> None:
    assert got.names == want.names, (what, got.names, want.names)
    assert torch.equal(got.numel, want.numel), (what, got.numel, want.numel)
    assert_raw_close(got.raw, want.raw, rel=rel, what=what)
    assert_raw_close(got.total.raw, want.total.raw, rel=rel, what=what + " total")
    if want.groups is not None:
        assert got.groups.names == want.groups.names
        assert_raw_close(got.groups.raw, want.groups.raw, rel=rel, what=what + " groups")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 16, 5, 3 rows: uneven shards on 2 and 4 ranks, and an empty one (3 rows on 4 ranks)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3),
    ).double()


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(8, 3, generator=g, dtype=torch.float64)


STAT_KW = {"norm_types": (2, 1, 3, "inf"), "histogram": (-40, 8)}
MAX_NORM = 0.05  # small enough that every step clips


def _train(model, opt, rank, world, steps, on_step) -> None:
    """Local batch slice, mean loss (DDP and FSDP average gradients: equals the full batch)."""
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(steps):
        x, y = _batch(step)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_stats = fastgrad.grad_stats(ref, **STAT_KW)
        ref_total = fastgrad.clip_grad_norm_(ref.parameters(), MAX_NORM)

        opt.zero_grad()
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        on_step(model, ref, ref_stats, ref_total)  # may change both models' gradients alike
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full.detach(), q.detach(), rtol=TOL, atol=1e-12, msg=name)


# -- scenarios (run inside each rank) -----------------------------------------------------------

def scenario_ddp(rank: int, world: int) -> None:
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def check(model, ref, ref_stats, ref_total):
        with count_collectives() as calls:
            st = fastgrad.grad_stats(model.module, **STAT_KW)
            st_pg = fastgrad.grad_stats(model.module, process_group=dist.group.WORLD, **STAT_KW)
            total = fastgrad.clip_grad_norm_(model.parameters(), MAX_NORM, process_group=dist.group.WORLD)
        assert calls == [], f"replicated gradients need no collective, got {calls}"
        assert_stats_equal(st, ref_stats, TOL, "ddp")
        assert_stats_equal(st_pg, ref_stats, TOL, "ddp process_group")
        assert total.item() == pytest.approx(ref_total.item(), rel=TOL)

    _train(model, opt, rank, world, 3, check)


def scenario_fsdp(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for layer in model:
        if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def check(model, ref, ref_stats, ref_total):
        grads = [p.grad for p in model.parameters()]
        assert all(type(g).__name__ == "DTensor" for g in grads)
        full = [g.full_tensor() for g in grads]  # the unsharded gradients, for an exact check
        names = [n for n, _ in model.named_parameters()]
        with count_collectives() as calls:
            st = fastgrad.grad_stats(model, **STAT_KW)  # no argument: the DTensors' mesh
        assert len(calls) == 2, calls
        exact = fastgrad.grad_stats(list(zip(names, full)), groups="module", **STAT_KW)
        assert_stats_equal(st, exact, 1e-12, "fsdp vs gathered")
        assert_stats_equal(st, ref_stats, TOL, "fsdp vs single process")
        assert st.to_dict().keys() == exact.to_dict().keys()
        with count_collectives() as calls:
            total = fastgrad.clip_grad_norm_(model.parameters(), MAX_NORM)
        assert len(calls) == 2, calls  # float64 gradients: the scaled (MAX, SUM) path
        assert total.item() == pytest.approx(ref_total.item(), rel=TOL)
        for name, p, q in zip(names, model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=TOL, atol=1e-14, msg=name)
        # clipping from the statistics already reduced: no further collective (<= 2 per step)
        with count_collectives() as calls:
            fastgrad.clip_grads_with_norm_(model.parameters(), 1e-3, st.total_norm)
        assert calls == []
        coef = 1e-3 / (total.item() + 1e-6)
        for name, p, q in zip(names, model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad * coef, rtol=TOL, atol=1e-14, msg=name)
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad.mul_(coef)  # keep the reference in step

    _train(model, opt, rank, world, 3, check)


def scenario_fsdp_wrap(rank: int, world: int) -> None:
    """fastgrad.wrap on an FSDP2 model clips by the global norm, like clip_grad_norm_ + step unsharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for layer in model:
        if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.5), max_norm=MAX_NORM, model=model)
    totals = []

    def check(model, ref, ref_stats, ref_total):
        if opt.last_stats is not None:
            totals.append(opt.last_stats.total_norm.item())
        totals.append(ref_total.item())  # pairs: (previous step's wrapped total, this step's reference)

    _train(model, opt, rank, world, 3, check)  # asserts the trained parameters match
    assert opt.last_stats.total_norm.item() == pytest.approx(totals[-1], rel=TOL)
    for got, want in zip(totals[1::2], totals[0::2]):
        assert got == pytest.approx(want, rel=TOL)


def _manual_tensors(rank: int, world: int, dtype: torch.dtype):
    """A TP-style layout: row-split weight, replicated bias, tied embedding owned by rank 0."""
    w = make_tensor(9 * 6, dtype, "wide", seed=1).reshape(9, 6)  # 9 rows: uneven pieces
    b = make_tensor(6, dtype, seed=2)
    emb = make_tensor(20, dtype, seed=3).reshape(5, 4)
    big = make_tensor(11, dtype, seed=4) * (1e30 if dtype == torch.float32 else 1e200)
    big = big.to(dtype)
    full = {"w": w, "b": b, "emb": emb, "big": big}
    local = {"w": w.tensor_split(world)[rank], "b": b.clone(), "emb": emb.clone(),
             "big": big.tensor_split(world)[rank]}
    placements = {"w": "shard", "b": "replicate", "emb": "shard" if rank == 0 else "duplicate",
                  "big": "shard"}
    return full, local, placements


def scenario_placements(rank: int, world: int) -> None:
    kw = {"process_group": dist.group.WORLD}
    for dtype in (torch.float32, torch.float64):
        full, local, placements = _manual_tensors(rank, world, dtype)
        names = list(full)
        groups = ["mlp", "mlp", "embed", "big"]
        want = fastgrad.grad_stats(list(full.items()), groups=groups, **STAT_KW)
        with count_collectives() as calls:
            got = fastgrad.grad_stats(list(local.items()), groups=groups, placements=placements, **kw,
                                      **STAT_KW)
        assert len(calls) == 2, calls
        assert_stats_equal(got, want, 1e-12, f"placements {dtype}")
        # a callable works the same way
        got2 = fastgrad.grad_stats(list(local.items()), groups=groups, placements=placements.get, **kw,
                                   **STAT_KW)
        assert_stats_equal(got2, want, 1e-12, "placements callable")

        for p in (2.0, 1.0, 3.0, 8.0, math.inf):
            want_n = fastgrad.get_total_norm(list(full.values()), p)
            with count_collectives() as calls:
                got_n = fastgrad.get_total_norm([local[n] for n in names], p,
                                                placements=_by_index(names, placements), **kw)
            one = math.isinf(p) or (p <= 6 and dtype == torch.float32)
            assert len(calls) == (1 if one else 2), (p, dtype, calls)
            assert got_n.item() == pytest.approx(want_n.item(), rel=1e-6 if dtype == torch.float32 else 1e-12)

        # clip_grad_norm_ on parameters: every rank scales its own piece by the global coefficient
        params = [torch.nn.Parameter(torch.zeros_like(local[n])) for n in names]
        for q, n in zip(params, names):
            q.grad = local[n].clone()
        ref = [torch.nn.Parameter(torch.zeros_like(full[n])) for n in names]
        for q, n in zip(ref, names):
            q.grad = full[n].clone()
        t_ref = fastgrad.clip_grad_norm_(ref, 1.0)
        t_got = fastgrad.clip_grad_norm_(params, 1.0, placements=_by_index(names, placements), **kw)
        assert t_got.item() == pytest.approx(t_ref.item(), rel=1e-6)
        tol = {"rtol": 2e-7 if dtype == torch.float32 else 1e-12, "atol": 0.0}
        torch.testing.assert_close(params[0].grad, ref[0].grad.tensor_split(world)[rank], **tol)
        torch.testing.assert_close(params[1].grad, ref[1].grad, **tol)

    # non-finite values on one rank only reach every rank
    full, local, placements = _manual_tensors(rank, world, torch.float32)
    full["w"][-1, 0] = math.nan  # the last row lives on the last rank
    full["big"][0] = -math.inf  # on rank 0
    local["w"] = full["w"].tensor_split(world)[rank]
    local["big"] = full["big"].tensor_split(world)[rank]
    want = fastgrad.grad_stats(list(full.items()), **STAT_KW)
    got = fastgrad.grad_stats(list(local.items()), placements=placements, **kw, **STAT_KW)
    assert_stats_equal(got, want, 1e-12, "non-finite")
    assert math.isnan(got.total_norm.item())
    for p in (2.0, math.inf, 8.0):
        assert math.isnan(fastgrad.get_total_norm(list(local.values()), p, placements=_by_index(
            list(local), placements), **kw).item())

    # error_if_nonfinite raises on every rank, also where the local piece is finite
    bad = [torch.nn.Parameter(torch.zeros_like(t)) for t in local.values()]
    for q, t in zip(bad, local.values()):
        q.grad = t.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        fastgrad.clip_grad_norm_(bad, 1.0, error_if_nonfinite=True,
                                 placements=_by_index(list(local), placements), **kw)
    for q, t in zip(bad, local.values()):
        torch.testing.assert_close(q.grad, t, rtol=0, atol=0, equal_nan=True)  # nothing modified

    # pipeline-style: a different number of tensors per rank; the total norm still works
    mine = [make_tensor(7 + k, torch.float32, seed=10 * r + k) for r in range(world) for k in range(r + 1)
            if r == rank]
    everything = [make_tensor(7 + k, torch.float32, seed=10 * r + k) for r in range(world) for k in range(r + 1)]
    got_n = fastgrad.get_total_norm(mine, 2.0, placements="shard", **kw)
    assert got_n.item() == pytest.approx(fastgrad.get_total_norm(everything, 2.0).item(), rel=1e-6)

    # a one-rank group: no collective at all
    groups = [dist.new_group([r]) for r in range(world)]
    with count_collectives() as calls:
        st = fastgrad.grad_stats(list(local.items()), process_group=groups[rank], placements="shard")
        fastgrad.get_total_norm(list(local.values()), process_group=groups[rank], placements="shard")
    assert calls == []
    assert_stats_equal(st, fastgrad.grad_stats(list(local.items())), 0.0, "one-rank group")

    with pytest.raises(ValueError, match="placement of w"):
        fastgrad.grad_stats(list(local.items()), placements={"w": "sharded"}, **kw)


def _by_index(names, placements):
    """get_total_norm names its tensors ``[i]``: map those to the placements of ``names``."""
    return lambda n: placements[names[int(n[1:-1])]]


def scenario_dtensor_2d(rank: int, world: int) -> None:
    """Shard/Replicate over a 2-D mesh (FSDP x TP layouts): replicated dims counted once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    layouts = {
        "fsdp_only": [Shard(0), Replicate()],
        "tp_only": [Replicate(), Shard(1)],
        "fsdp_tp": [Shard(0), Shard(1)],
        "nested": [Shard(0), Shard(0)],
        "replicated": [Replicate(), Replicate()],
    }
    full = {n: make_tensor(7 * 5, torch.float32, "wide", seed=i).reshape(7, 5) for i, n in enumerate(layouts)}
    full["tiny"] = make_tensor(3, torch.float32, seed=9)  # 3 elements on 4 ranks: an empty piece
    full["nested"][2, 3] = math.inf
    layouts["tiny"] = [Shard(0), Shard(0)]
    dts = {n: distribute_tensor(full[n], mesh, layouts[n]) for n in full}
    want = fastgrad.grad_stats(list(full.items()), **STAT_KW)
    with count_collectives() as calls:
        got = fastgrad.grad_stats(list(dts.items()), **STAT_KW)
    assert len(calls) == 2, calls
    assert_stats_equal(got, want, 1e-12, "2-D mesh")
    for p in (2.0, math.inf):
        n = fastgrad.get_total_norm(list(dts.values()), p)
        assert n.item() == pytest.approx(fastgrad.get_total_norm(list(full.values()), p).item(), rel=1e-6)

    # only replicated DTensors: nothing to combine, no collective
    with count_collectives() as calls:
        rep = fastgrad.grad_stats([("replicated", dts["replicated"])])
    assert calls == []
    assert_stats_equal(rep, fastgrad.grad_stats([("replicated", full["replicated"])]), 0.0, "replicated")

    from torch.distributed.tensor import DTensor

    pt = DTensor.from_local(full["fsdp_only"] / 2, mesh, [Partial(), Replicate()], run_check=False)
    with pytest.raises(ValueError, match="Partial"):
        fastgrad.grad_stats([pt])


def scenario_tensor_parallel(rank: int, world: int) -> None:
    """FSDP2 over dp x tensor parallel over tp (parallelize_module), trained against one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    x, y = _batch(0)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    dp = mesh.get_coordinate()[0]
    rows = slice(dp * 4, dp * 4 + 4)
    torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
    # "2.bias" is Replicate on tp: counted once, not twice
    placements = {n: tuple(p.grad.placements) for n, p in model.named_parameters()}
    assert any(pl.is_replicate() for pl in placements["2.bias"]), placements
    with count_collectives() as calls:
        st = fastgrad.grad_stats(model, **STAT_KW)
    assert len(calls) == 2, calls
    want = fastgrad.grad_stats(ref, **STAT_KW)
    assert_stats_equal(st, want, TOL, "fsdp x tp")
    t = fastgrad.clip_grad_norm_(model.parameters(), 0.01)
    t_ref = fastgrad.clip_grad_norm_(ref.parameters(), 0.01)
    assert t.item() == pytest.approx(t_ref.item(), rel=TOL)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=TOL, atol=1e-14, msg=n)


SCENARIOS = {
    "ddp": scenario_ddp,
    "fsdp": scenario_fsdp,
    "fsdp_wrap": scenario_fsdp_wrap,
    "placements": scenario_placements,
    "dtensor_2d": scenario_dtensor_2d,
    "tensor_parallel": scenario_tensor_parallel,
}


# -- tests ----------------------------------------------------------------------------------------

def test_two_ranks(tmp_path):
    _spawn(2, tmp_path, ["ddp", "fsdp", "fsdp_wrap", "placements"])


def test_four_ranks(tmp_path):
    _spawn(4, tmp_path, ["fsdp", "placements", "dtensor_2d", "tensor_parallel"])


def test_plain_tensors_without_group_take_the_local_path():
    grads = [make_tensor(10, torch.float32)]
    assert fgdist.plan(["[0]"], grads) is None
    param = torch.nn.Parameter(make_tensor(10, torch.float32), requires_grad=False)  # a subclass
    assert fgdist.plan(["[0]"], [param]) is None
    assert fgdist.local_tensors(grads)[0] is grads[0]


def test_process_group_needs_initialised_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        fastgrad.grad_stats([make_tensor(10, torch.float32)], process_group=object(), placements="shard")


def test_bad_placements_argument():
    with pytest.raises(TypeError, match="placements must be"):
        fgdist._user_placement(3, "w")
    with pytest.raises(ValueError, match="choose one of"):
        fgdist._user_placement("sharded", "w")
