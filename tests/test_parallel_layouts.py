"""Large-model layouts (issue 12): expert parallel on sub-meshes, FSDP2 + EP, HSDP, DTensor/plain
mixes, pipeline stages x FSDP2 (a real torch.distributed.pipelining schedule) and x TP.

4 gloo ranks on CPU (the harness of tests/test_distributed.py: FileStore in tmp_path, a 60 s
timeout on every collective, the ranks killed after JOIN_TIMEOUT). For each layout: every
statistic equals the single-process float64 model's (1e-9 relative), every rank holds bitwise
the same total (and the same rows within a pipeline stage), clipping and a training step equal
the unsharded clip + step, and the steady-state collective count is the documented one. Layout
mistakes raise the same LayoutError on every rank instead of crashing or hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
from conftest import make_tensor, spawn_ranks
from test_distributed import assert_stats_equal

import fastgrad
from fastgrad import dist_layout

TOL = 1e-9
STAT_KW = {"norm_types": (2, 1, 3, "inf"), "histogram": (-40, 8)}
MAX_NORM = 0.05  # every step clips


@contextlib.contextmanager
def count_collectives():
    """``(stats, checks)``: float64 all-reduces (the per-step cost: numel each, with the group size)
    and int64 ones (the one-time layout check and dtype agreement)."""
    stats, checks = [], []
    real = dist.all_reduce

    def counting(t, *args, group=None, **kwargs):
        size = dist.get_world_size(group) if group is not None else dist.get_world_size()
        (checks if t.dtype == torch.int64 else stats).append((t.numel(), size))
        return real(t, *args, group=group, **kwargs)

    dist.all_reduce = counting
    try:
        yield stats, checks
    finally:
        dist.all_reduce = real


def same_on(group_ranks, *tensors) -> None:
    """Bitwise the same ``tensors`` on every rank of ``group_ranks`` (gathered over the world)."""
    mine = [t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() for t in tensors]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ref = everyone[group_ranks[0]]
    for r in group_ranks:
        assert everyone[r] == ref, f"rank {r} differs bitwise from rank {group_ranks[0]}"


def all_ranks() -> list[int]:
    return list(range(dist.get_world_size()))


def _raises_everywhere(fn, match: str) -> None:
    """``fn`` raises LayoutError matching ``match`` on this rank; every rank checks the same."""
    with pytest.raises(dist_layout.LayoutError, match=match):
        fn()
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, True)
    assert all(flags)


# -- expert parallel: the reproduction, dense on a sub-mesh ----------------------------------

def scenario_ep_submesh(rank: int, world: int) -> None:
    """Mesh (dp=2, ep=2): dense Shard(0) on mesh["ep"], expert (Replicate, Shard(0)) on the 2-D mesh.

    Before issue 12, get_total_norm([dense, expert]) reduced over the first gradient's mesh
    (ranks 0-1 and 2-3 disagreed) and [expert, dense] counted the dense gradient twice."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    other_root = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_all",))
    for dtype in (torch.float32, torch.float64):
        dense_full = make_tensor(6 * 4, dtype, seed=1).reshape(6, 4) * 3
        expert_full = make_tensor(4 * 15, dtype, "wide", seed=2).reshape(4, 15)
        dense = distribute_tensor(dense_full, mesh["ep"], [Shard(0)])
        expert = distribute_tensor(expert_full, mesh, [Replicate(), Shard(0)])
        want = fastgrad.get_total_norm([dense_full, expert_full]).item()
        rel = 1e-6 if dtype == torch.float32 else 1e-12
        for label, order in (("dense first", [dense, expert]), ("expert first", [expert, dense])):
            with count_collectives() as (stats, _):
                got = fastgrad.get_total_norm(order)
            assert got.item() == pytest.approx(want, rel=rel), (dtype, label, got.item(), want)
            assert len(stats) == (1 if dtype == torch.float32 else 2), stats
            same_on(all_ranks(), got)
        for p in (1.0, 3.0, math.inf):
            got = fastgrad.get_total_norm([expert, dense], p)
            assert got.item() == pytest.approx(fastgrad.get_total_norm([dense_full, expert_full], p).item(), rel=rel)
        # several roots: a third gradient on its own 1-D mesh over the same 4 ranks
        other_full = make_tensor(9 * 2, dtype, seed=3).reshape(9, 2)
        other = distribute_tensor(other_full, other_root, [Shard(0)])
        full = [("dense", dense_full), ("expert", expert_full), ("other", other_full)]
        with count_collectives() as (stats, _):
            st = fastgrad.grad_stats([("dense", dense), ("expert", expert), ("other", other)], groups=["a", "b", "b"],
                                     **STAT_KW)
        assert len(stats) == 2, stats
        assert_stats_equal(st, fastgrad.grad_stats(full, groups=["a", "b", "b"], **STAT_KW), 1e-12, f"ep {dtype}")
        same_on(all_ranks(), st.raw.floats, st.raw.counts, st.total.raw.floats, st.numel)
        got = fastgrad.get_total_norm([other, expert, dense])
        assert got.item() == pytest.approx(fastgrad.get_total_norm([t for _, t in full]).item(), rel=rel)


# -- FSDP2 + EP: a toy MoE trained against one process ----------------------------------------------

class ToyMoE(torch.nn.Module):
    """Soft-gated experts: y = sum_e softmax(router(x))_e * (x @ W_e), then a dense head."""

    def __init__(self, d: int = 6, experts: int = 4, out: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.router = torch.nn.Linear(d, experts).double()
        self.experts = torch.nn.Module()
        self.experts.w = torch.nn.Parameter(torch.randn(experts, d, d, dtype=torch.float64) / 3)
        self.head = torch.nn.Linear(d, out).double()

    def expert_weights(self) -> torch.Tensor:
        return self.experts.w

    def forward(self, x):
        gates = torch.softmax(self.router(x), dim=-1)  # [b, E]
        h = torch.einsum("be,bi,eij->bj", gates, x, self.expert_weights())
        return self.head(torch.tanh(h))


class ShardedMoE(ToyMoE):
    """Experts a DTensor (Replicate over dp_mod_ep, Shard(0) over ep); the forward gathers them and
    sends the gradient back as Partial sums (reduce-scatter over ep, all-reduce over dp_mod_ep)."""

    def __init__(self, mesh):
        super().__init__()
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        self.mesh = mesh
        self.experts.w = torch.nn.Parameter(distribute_tensor(self.experts.w.detach(), mesh, [Replicate(), Shard(0)]))

    def expert_weights(self) -> torch.Tensor:
        from torch.distributed.tensor import Partial, Replicate

        full = self.experts.w.redistribute(self.mesh, [Replicate(), Replicate()])
        return full.to_local(grad_placements=[Partial(), Partial()])


def _moe_batch(step: int):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)


def scenario_fsdp_ep(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_mod_ep", "ep"))
    dp = mesh["dp_mod_ep", "ep"]._flatten("dp")  # the 4 data-parallel ranks (torchtitan's dp_shard)
    model, ref = ShardedMoE(mesh), ToyMoE()
    fully_shard(model.router, mesh=dp)
    fully_shard(model.head, mesh=dp)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, foreach=False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(2):
        x, y = _moe_batch(step)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.zero_grad()
        rows = slice(2 * rank, 2 * rank + 2)
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        model.experts.w.grad.div_(world)  # Partial sums of 4 local means -> the global mean (FSDP2 averages)
        with count_collectives() as (stats, _):
            st = fastgrad.grad_stats(model, **STAT_KW)
        assert len(stats) == 2, stats
        assert_stats_equal(st, fastgrad.grad_stats(ref, **STAT_KW), TOL, "fsdp+ep")
        same_on(all_ranks(), st.raw.floats, st.raw.counts, st.total.raw.floats, st.groups.raw.floats)
        with count_collectives() as (stats, _):
            total = fastgrad.clip_grad_norm_(model.parameters(), MAX_NORM)
        assert len(stats) == 2, stats  # float64 gradients: the scaled MAX + SUM of 2 numbers
        ref_total = fastgrad.clip_grad_norm_(ref.parameters(), MAX_NORM)
        assert total.item() == pytest.approx(ref_total.item(), rel=TOL)
        same_on(all_ranks(), total)
        opt.step()
        ref_opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor().detach(), q.detach(), rtol=TOL, atol=1e-12, msg=n)


# -- HSDP and a DTensor / plain mix -----------------------------------------------------------------

def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3),
    ).double()


def _train_against_reference(model, ref, data_rows, steps: int, budget: tuple[int, int], extra=None) -> None:
    """Steps of: grad_stats, clip_grad_norm_, SGD; each compared with the single-process model."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, foreach=False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(steps):
        x, y = _moe_batch(step)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[data_rows]), y[data_rows]).backward()
        with count_collectives() as (stats, _):
            st = fastgrad.grad_stats(model, **STAT_KW)
        assert len(stats) == budget[0], stats
        assert_stats_equal(st, fastgrad.grad_stats(ref, **STAT_KW), TOL, "layout")
        same_on(all_ranks(), st.raw.floats, st.raw.counts, st.total.raw.floats, st.groups.raw.floats)
        with count_collectives() as (stats, _):
            total = fastgrad.clip_grad_norm_(model.parameters(), MAX_NORM)
        assert len(stats) == budget[1], stats
        assert total.item() == pytest.approx(fastgrad.clip_grad_norm_(ref.parameters(), MAX_NORM).item(), rel=TOL)
        same_on(all_ranks(), total)
        opt.step()
        ref_opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full.detach(), q.detach(), rtol=TOL, atol=1e-12, msg=n)


def scenario_hsdp(rank: int, world: int) -> None:
    """HSDP: a (replicate=2, shard=2) mesh, gradients (Replicate, Shard(0))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    model = _mlp()
    for layer in model:
        if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x_rows = slice(2 * rank, 2 * rank + 2)
    _train_against_reference(model, _mlp(), x_rows, 2, (2, 2))
    pl = tuple(next(model.parameters()).grad.placements)
    assert pl[0].is_replicate() and pl[1].is_shard(), pl


def scenario_dtensor_plain_mix(rank: int, world: int) -> None:
    """Tensor parallel on some layers (DTensor), plain replicated parameters elsewhere (the
    transformers#47734 MoE mix): plain gradients count once, DTensors by their placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = _mlp()
    from torch.distributed.tensor import Replicate

    parallelize_module(model, mesh, {"0": ColwiseParallel(output_layouts=Replicate()),
                                     "5": RowwiseParallel(input_layouts=Replicate())})
    kinds = {n: type(p).__name__ for n, p in model.named_parameters()}
    assert kinds["0.weight"] == "DTensor" and kinds["2.weight"] == "Parameter", kinds
    _train_against_reference(model, _mlp(), slice(0, 8), 2, (2, 2))  # the same batch on every TP rank; fp64: MAX + SUM


# -- pipeline parallel -------------------------------------------------------------------------------

class Stage(torch.nn.Module):
    """Layers ``keep`` of a Sequential under their global names (torchtitan keeps FQNs per stage)."""

    def __init__(self, full: torch.nn.Sequential, keep: list[int]):
        super().__init__()
        for i in keep:
            self.add_module(str(i), full[i])

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


def _pipeline_check(stage_mod, ref, pp_ranks_of_stage, budget_stats: int) -> fastgrad.GradStats:
    """Stage rows equal the reference's rows of those layers; the total is the whole model's."""
    names = [n for n, _ in stage_mod.named_parameters()]
    ref_grads = dict(ref.named_parameters())
    with count_collectives() as (stats, _):
        st = fastgrad.grad_stats(stage_mod, **STAT_KW)  # no argument beyond the mesh
    assert len(stats) == budget_stats, stats
    sizes = sorted({s for _, s in stats})
    want_rows = fastgrad.grad_stats([(n, ref_grads[n].grad) for n in names], groups="module", **STAT_KW)
    want_all = fastgrad.grad_stats(ref, **STAT_KW)
    assert st.names == want_rows.names
    from conftest import assert_raw_close

    assert_raw_close(st.raw, want_rows.raw, rel=TOL, what="stage rows")
    assert_raw_close(st.groups.raw, want_rows.groups.raw, rel=TOL, what="stage layers")
    assert torch.equal(st.numel, want_rows.numel)
    assert_raw_close(st.total.raw, want_all.total.raw, rel=TOL, what="whole-model total")
    assert torch.equal(st.total.numel, want_all.total.numel)
    assert st.total_norm.item() == pytest.approx(want_all.total_norm.item(), rel=TOL)
    same_on(all_ranks(), st.total.raw.floats, st.total.raw.counts, st.total.numel)
    same_on(pp_ranks_of_stage, st.raw.floats, st.raw.counts, st.groups.raw.floats)
    assert sizes == [2, 4] or budget_stats == 0, sizes  # rows over the stage (2), totals over all (4)
    return st


def _pp_schedule(stage_mod, stage_idx: int, mesh, x, y):
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    stage = PipelineStage(stage_mod, stage_idx, 2, torch.device("cpu"), group=mesh.get_group("pp"))
    sched = ScheduleGPipe(stage, n_microbatches=2, loss_fn=torch.nn.functional.mse_loss)
    if stage_idx == 0:
        sched.step(x)
    else:
        sched.step(target=y, losses=[])


def scenario_pp_fsdp(rank: int, world: int) -> None:
    """2 stages x FSDP2 over 2 ranks, 6 and 2 gradients (unequal), a real GPipe schedule.

    Before issue 12 grad_stats(..., process_group=WORLD) died in gloo (16 vs 8 elements): the
    per-tensor tables of different stages went into one all-reduce."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp_shard"))
    pp, dp = mesh.get_coordinate()
    keep = [0, 1, 2, 3] if pp == 0 else [4, 5]
    stage_mod = Stage(_mlp(), keep)
    for i in keep:
        if isinstance(stage_mod.get_submodule(str(i)), (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(stage_mod.get_submodule(str(i)), mesh=mesh["dp_shard"])
    fully_shard(stage_mod, mesh=mesh["dp_shard"])
    ref = _mlp()
    opt = torch.optim.SGD(stage_mod.parameters(), lr=0.5, foreach=False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    stage_ranks = [r for r in all_ranks() if r // 2 == pp]
    mon = fastgrad.GradMonitor(stage_mod, loggers=(), log_every=1, histogram_every=0)
    for step in range(2):
        x, y = _moe_batch(step)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.zero_grad()
        rows = slice(4 * dp, 4 * dp + 4)
        _pp_schedule(stage_mod, pp, mesh, x[rows], y[rows])
        # the reproduction: process_group=WORLD with stages holding different tables
        st_world = fastgrad.grad_stats(stage_mod, process_group=dist.group.WORLD, **STAT_KW)
        assert st_world.total_norm.item() == pytest.approx(fastgrad.grad_stats(ref).total_norm.item(), rel=TOL)
        _pipeline_check(stage_mod, ref, stage_ranks, 4)
        # GradMonitor: each stage logs its own layers; the statistics it receives carry the whole
        # model's total (its StepRecord.total_norm is recombined from the stage's layers in
        # monitor_buffer.py: the monitor owner's change, see the issue notes)
        mon_stats = mon.step()
        mon.flush()
        rec = mon.records[-1]
        want = fastgrad.grad_stats(ref)
        mine = [want.groups.names.index(layer) for layer in rec.layers]
        assert set(rec.layers) == {n.rpartition(".")[0] for n, _ in stage_mod.named_parameters()}
        assert rec.norm.tolist() == pytest.approx(want.groups.tensor_norms[mine].tolist(), rel=TOL)
        assert mon_stats.total_norm.item() == pytest.approx(want.total_norm.item(), rel=TOL)
        with count_collectives() as (stats, _):
            total = fastgrad.clip_grad_norm_(stage_mod.parameters(), MAX_NORM)
        assert len(stats) == 2 and {s for _, s in stats} == {4}, stats  # float64: MAX + SUM over all stages
        assert total.item() == pytest.approx(fastgrad.clip_grad_norm_(ref.parameters(), MAX_NORM).item(), rel=TOL)
        same_on(all_ranks(), total)
        opt.step()
        ref_opt.step()
    ref_params = dict(ref.named_parameters())
    for n, p in stage_mod.named_parameters():
        torch.testing.assert_close(p.full_tensor().detach(), ref_params[n].detach(), rtol=TOL, atol=1e-12, msg=n)



def scenario_pp_tp(rank: int, world: int) -> None:
    """2 stages x tensor parallel over 2 ranks (Colwise/Rowwise per stage, replicated biases, a plain
    layer), stepped by fastgrad.wrap against torch's clip + step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def net():
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6), torch.nn.Tanh(),
            torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3), torch.nn.Linear(3, 3),
        ).double()

    # torchtitan's names and order, dp_shard of size 1: the stage is a flattened (dp_shard, tp) group
    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "dp_shard", "tp"))
    pp, _, _ = mesh.get_coordinate()
    keep = [0, 1, 2, 3] if pp == 0 else [4, 5, 6, 7]
    stage_mod = Stage(net(), keep)
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()} if pp == 0 else \
        {"4": ColwiseParallel(), "6": RowwiseParallel()}  # "7" stays plain, replicated over tp
    parallelize_module(stage_mod, mesh["tp"], plan)
    ref = net()
    stage_ranks = [r for r in all_ranks() if r // 2 == pp]
    # the wrapped optimizer (fastgrad.wrap): its one statistics pass gives the whole model's norm
    opt = fastgrad.wrap(torch.optim.SGD(stage_mod.parameters(), lr=0.5, foreach=False), max_norm=MAX_NORM,
                        model=stage_mod)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(2):
        x, y = _moe_batch(step)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.zero_grad()
        _pp_schedule(stage_mod, pp, mesh, x, y)
        _pipeline_check(stage_mod, ref, stage_ranks, 4)
        opt.step()
        ref_total = fastgrad.clip_grad_norm_(ref.parameters(), MAX_NORM)
        ref_opt.step()
        assert opt.last_stats.total_norm.item() == pytest.approx(ref_total.item(), rel=TOL)
        same_on(all_ranks(), opt.last_stats.total_norm)
    ref_params = dict(ref.named_parameters())
    for n, p in stage_mod.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full.detach(), ref_params[n].detach(), rtol=TOL, atol=1e-12, msg=n)


def scenario_pp_only(rank: int, world: int) -> None:
    """4 stages of one rank each, plain tensors, an embedding tied between the first and last stage
    (counted on the first, "duplicate" on the last): per-tensor rows need no collective, totals 2
    all-reduces of one row over all stages, clipping 1."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    emb = make_tensor(12, torch.float32, "wide", seed=50)
    layers = {r: [(f"layers.{r}.w", make_tensor(5 + r, torch.float32, seed=r))] for r in range(world)}
    layers[0].insert(0, ("emb", emb))
    layers[world - 1].append(("emb", emb.clone()))
    mine = layers[rank]
    placements = {"emb": "shard" if rank == 0 else "duplicate"}
    model = [t for r in range(world) for n, t in layers[r] if not (r == world - 1 and n == "emb")]
    want = fastgrad.grad_stats([(str(i), t) for i, t in enumerate(model)], **STAT_KW)
    with count_collectives() as (stats, _):
        st = fastgrad.grad_stats(mine, process_group=mesh, placements=placements, **STAT_KW)
    assert [s for _, s in stats] == [world, world], stats
    from conftest import assert_raw_close

    assert_raw_close(st.raw, fastgrad.grad_stats(mine, **STAT_KW).raw, rel=0, what="local rows")
    assert_raw_close(st.total.raw, want.total.raw, rel=1e-12, what="pp total")
    assert int(st.total.numel) == sum(t.numel() for t in model)
    same_on(all_ranks(), st.total.raw.floats, st.total.raw.counts, st.total.numel)
    for p in (2.0, math.inf):
        with count_collectives() as (stats, _):
            n = fastgrad.get_total_norm([t for _, t in mine], p, process_group=mesh,
                                        placements=lambda k: "duplicate" if (rank and mine[int(k[1:-1])][0] == "emb")
                                        else "shard")
        assert len(stats) == 1, stats
        assert n.item() == pytest.approx(fastgrad.get_total_norm(model, p).item(), rel=1e-6)
        same_on(all_ranks(), n)


# -- layout mistakes ----------------------------------------------------------------------------------

def scenario_mistakes(rank: int, world: int) -> None:
    """Each mistake raises the same LayoutError on every rank, and the ranks stay in step after it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    # 1. pipeline stages on a mesh whose pipeline dimension is not named "pp": the stage looks
    #    like all 4 ranks, whose lists differ (3 vs 1 gradients)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("stage", "dp"))
    st_idx = mesh.get_coordinate()[0]
    n = 3 if st_idx == 0 else 1
    grads = [(f"s{st_idx}.w{k}", distribute_tensor(make_tensor(8, torch.float64, seed=k), mesh["dp"], [Shard(0)]))
             for k in range(n)]
    _raises_everywhere(lambda: fastgrad.grad_stats(grads), r"hold different gradient lists \(between 1 and 3")
    _raises_everywhere(lambda: fastgrad.get_total_norm([g for _, g in grads]), "name the|named 'pp'")
    # the same lists with the dimension named "pp": fine
    mesh_pp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    grads_pp = [(name, distribute_tensor(g.full_tensor(), mesh_pp["dp"], [Shard(0)])) for name, g in grads]
    st = fastgrad.grad_stats(grads_pp)
    everything = [make_tensor(8, torch.float64, seed=k) for k in (0, 1, 2, 0)]
    assert st.total_norm.item() == pytest.approx(fastgrad.get_total_norm(everything).item(), rel=1e-12)
    # plain-tensor stages say the same with the mesh: process_group=<mesh with "pp">, placements
    # within a stage; rows over the stage, the total over both stages
    plain = [(name, g.full_tensor().tensor_split(2)[mesh_pp.get_coordinate()[1]].clone()) for name, g in grads_pp]
    with count_collectives() as (stats, _):
        st_plain = fastgrad.grad_stats(plain, process_group=mesh_pp, placements="shard", **STAT_KW)
    assert [s for _, s in stats] == [2, 2, 4, 4], stats
    full_rows = fastgrad.grad_stats([(name, g.full_tensor()) for name, g in grads_pp], **STAT_KW)
    from conftest import assert_raw_close

    assert_raw_close(st_plain.raw, full_rows.raw, rel=1e-12, what="plain stage rows")
    assert torch.equal(st_plain.numel, full_rows.numel)
    whole = fastgrad.grad_stats([(str(k), e) for k, e in enumerate(everything)], **STAT_KW)
    assert_raw_close(st_plain.total.raw, whole.total.raw, rel=1e-12, what="plain stages: total")
    same_on(all_ranks(), st_plain.total.raw.floats, st_plain.total.raw.counts)
    # float32 across stages: clipping alone is one all-reduce of 2 numbers over all stages
    # (after a one-time int64 agreement on the path, since stages could hold other dtypes)
    g32 = [g.to(torch.float32) for _, g in grads_pp]
    with count_collectives() as (stats, checks):
        t32 = [fastgrad.get_total_norm(g32) for _ in range(3)]
    assert [s for s in stats] == [(2, 4)] * 3 and len(checks) <= 2, (stats, checks)
    assert t32[0].item() == pytest.approx(fastgrad.get_total_norm([e.float() for e in everything]).item(), rel=1e-6)
    same_on(all_ranks(), *t32)

    # 2. plain tensors over process_group=WORLD with different lists (the old PP grad_stats crash)
    mine = [make_tensor(5 + k, torch.float32, seed=k) for k in range(1 + rank % 2)]
    _raises_everywhere(lambda: fastgrad.grad_stats(mine, process_group=dist.group.WORLD, placements="shard"),
                       "between 1 and 2 gradients")
    # the total alone needs only a fixed-size message: allowed, as documented
    fastgrad.get_total_norm(mine, process_group=dist.group.WORLD, placements="shard")

    # 3. the same row count, other tensors (names, or the shape of a replicated tensor): caught by
    #    the fingerprint of names, shapes, dtypes and placements
    odd = [("w" if rank < 2 else "v", make_tensor(6, torch.float32, seed=3)), ("b", make_tensor(3, torch.float32))]
    _raises_everywhere(lambda: fastgrad.grad_stats(odd, process_group=dist.group.WORLD, placements={"w": "shard", "v": "shard"}),
                       "different names, shapes")
    shapes = [("w", make_tensor(6, torch.float32, seed=3)), ("b", make_tensor(3 if rank < 2 else 4, torch.float32))]
    _raises_everywhere(lambda: fastgrad.grad_stats(shapes, process_group=dist.group.WORLD, placements={"w": "shard"}),
                       "different names, shapes")

    # 4. a bad FASTGRAD_CHECK_LAYOUT value is refused
    os.environ[dist_layout.CHECK_ENV] = "sometimes"
    try:
        with pytest.raises(ValueError, match="first, always or off"):
            fastgrad.grad_stats(odd, process_group=dist.group.WORLD, placements="shard")
    finally:
        del os.environ[dist_layout.CHECK_ENV]


SCENARIOS = {
    "ep_submesh": scenario_ep_submesh,
    "fsdp_ep": scenario_fsdp_ep,
    "hsdp": scenario_hsdp,
    "mix": scenario_dtensor_plain_mix,
    "pp_fsdp": scenario_pp_fsdp,
    "pp_tp": scenario_pp_tp,
    "pp_only": scenario_pp_only,
    "mistakes": scenario_mistakes,
}


JOIN_TIMEOUT = 240  # seconds for one 4-rank run (each collective: 60 s)


def _entry(rank: int, world: int, store: str, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name in scenarios:
            try:
                SCENARIOS[name](rank, world)
            except Exception as e:
                raise AssertionError(f"rank {rank}/{world}, scenario {name}: {e}") from e
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, scenarios: list[str], world: int = 4) -> None:
    store = os.path.join(str(tmp_path), "store")
    spawn_ranks(_entry, (world, store, scenarios), world, JOIN_TIMEOUT, str(scenarios))


def test_expert_hybrid_and_mixed_layouts(tmp_path):
    _spawn(tmp_path, ["ep_submesh", "fsdp_ep", "hsdp", "mix"])


def test_pipeline_layouts_and_mistakes(tmp_path):
    _spawn(tmp_path, ["pp_fsdp", "pp_tp", "pp_only", "mistakes"])
