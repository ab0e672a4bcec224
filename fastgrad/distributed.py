"""Statistics of sharded gradients: local partials on every rank, then small fixed-shape collectives.

Every rank computes the usual per-tensor tables (:mod:`fastgrad.spec`) of the
gradient pieces it holds (``g.to_local()`` for a DTensor; a piece may be
empty), then the rows are combined across ranks exactly as chunks of one
tensor are combined (:mod:`fastgrad.aggregate`). With ``M`` the largest piece
norm of a tensor and ``n_r`` the norm of its piece on rank ``r``::

    norm_p = M * (sum_r (n_r / M)^p)^(1/p)      max|x| = max_r max|x_r|

Where (:mod:`fastgrad.dist_layout`): the **stage** is the set of ranks that
hold the same tensors (the DTensors' root mesh without its ``"pp"``
dimension, else ``process_group``); the **domain** is every rank of the model
(all pipeline stages). Per-tensor rows are combined over the stage, totals
over the domain; no collective whose size depends on the rows ever reaches a
rank of another stage.

Per-tensor statistics (:func:`reduce_stats`, used by ``grad_stats``): two
float64 all-reduces over the stage (:func:`reduce_raw`), over ``T`` tensors
with ``P`` finite norms and ``B`` histogram bins::

    MAX  [T, P + 1]           piece norms (the scale M) and max|x|
    SUM  [T, P + 4 + B + 1]   (n_r / M)^p, NaN/+Inf/-Inf/zero counts, bins, numel

then, under pipeline parallelism, the same two of one row (each stage's
total, sent by the stage's first rank) over the domain. Float64 counts are
exact below 2^53 elements per tensor. The total norm alone
(:func:`reduce_total_norm`, used by ``clip_grad_norm_``) is 2 numbers in one
all-reduce over the domain: ``sum_r n_r^p`` unscaled when that cannot
overflow or underflow (p <= 6 and fp16/bf16/fp32 gradients), else a MAX then
a SUM of 2 numbers.

Counting once. A row contributes from this rank only where it should:

* DTensor: on every mesh dim where it is ``Replicate`` only the coordinate-0
  rank contributes (``Shard`` dims contribute everywhere; ``Partial``
  gradients raise: reduce them first). A DTensor on a sub-mesh (or a
  flattened mesh) is implicitly replicated over the root's other
  non-pipeline dims: it contributes at coordinate 0 of those only.
* Plain tensors, as the ``placements=`` argument says: ``"shard"`` (this
  rank's tensor is a disjoint piece, or the one counted copy: it contributes),
  ``"replicate"`` (every rank of the stage holds the same values: counted
  once, from the stage's first rank; the default), ``"duplicate"`` (a copy
  counted on another rank, e.g. a tied embedding on the last pipeline stage:
  never contributes).

No collective is issued when the stage has one rank or every row is
replicated (DDP), and no pipeline. Whether to communicate is decided locally
from the placements, so all ranks of a stage must call with the same kinds of
rows; that they hold the same rows is checked once per group
(:func:`fastgrad.dist_layout.check_layout`, one int64 all-reduce) before the
first collective whose size depends on them, and a mismatch raises the same
:class:`~fastgrad.dist_layout.LayoutError` on every rank. The collectives are
ordinary ``torch.distributed.all_reduce`` calls on the gradients' device: no
host synchronisation beyond the collective itself (the one-time check reads
its 4 numbers on the host).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import dist_layout
from .aggregate import TOTAL, aggregate, scaled_ratio, unscale
from .dist_layout import RankSet
from .spec import NAN, NEGINF, POSINF, RawStats, StatsResult, StatsSpec

PLACEMENTS = ("shard", "replicate", "duplicate")
PlacementsArg = str | Mapping[str, str] | Callable[[str], str | None] | None
# sum_r n_r^p needs no scale when |x|^p of any fp16/bf16/fp32 value (1.4e-45 .. 3.4e38)
# is a normal float64 and numel * max^p stays finite: p <= 6 leaves > 30 decades of room.
_UNSCALED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNSCALED_MAX_P = 6.0


@dataclass
class DistPlan:
    """How this rank's gradients enter the cross-rank reductions (built per call by :func:`plan`).

    Attributes:
        local: the tensors this rank reads (DTensor -> its local shard).
        contributes: per row, whether this rank's piece counts (the count-once rule).
        communicate: per-tensor rows need combining over the stage (``stage`` has several ranks
            and some row is sharded).
        stage: the ranks that hold the same tensors and combine rows
            (:class:`fastgrad.dist_layout.RankSet`).
        domain: every rank of the model; differs from ``stage`` under pipeline parallelism.
        leader: this rank is the stage's first rank (its stage totals count across stages).
        checked: the stage comes from a mesh, so its ranks must hold the same list (validated).
        describe: the rows' fingerprint material (name, shape, dtype, placement), built only
            when the layout is checked.
    """

    local: list[torch.Tensor]
    contributes: list[bool]
    communicate: bool
    stage: RankSet
    domain: RankSet
    leader: bool
    checked: bool
    describe: Callable[[], list[tuple]]

    @property
    def group(self):
        """The process group the per-tensor rows are combined over (the stage)."""
        return self.stage.group()

    @property
    def cross(self) -> bool:
        """Totals must cross pipeline stages (the domain is larger than the stage)."""
        return self.domain.ranks != self.stage.ranks

    @property
    def communicate_total(self) -> bool:
        """The total norm needs a collective (rows sharded, or stages to combine)."""
        return self.communicate or self.cross

    def mask(self, device: torch.device) -> torch.Tensor | None:
        """bool ``[T]`` rows that count here, or None when all do."""
        if all(self.contributes):
            return None
        return _device_tensor(tuple(self.contributes), torch.bool, device)

    def numel(self, device: torch.device) -> torch.Tensor:
        """int64 ``[T]`` elements of this rank's pieces."""
        return _device_tensor(tuple(g.numel() for g in self.local), torch.int64, device)


_device_cache: dict = {}


def _device_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a device tensor, copied once per parameter set (steady state: no copies)."""
    key = (values, dtype, device)
    hit = _device_cache.get(key)
    if hit is None:
        if len(_device_cache) > 64:
            _device_cache.clear()
        hit = _device_cache[key] = torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
    return hit


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_mesh(obj) -> bool:
    return hasattr(obj, "get_group") and hasattr(obj, "ndim") and hasattr(obj, "mesh")


def _user_placement(placements: PlacementsArg, name: str) -> str | None:
    if placements is None:
        return None
    if isinstance(placements, str):
        kind = placements
    elif isinstance(placements, Mapping):
        kind = placements.get(name)
    elif callable(placements):
        kind = placements(name)
    else:
        raise TypeError(
            "placements must be 'shard', 'replicate', 'duplicate', a mapping name -> one of "
            f"those, or a callable; got {type(placements).__name__}"
        )
    if kind is not None and kind not in PLACEMENTS:
        raise ValueError(f"placement of {name} is {kind!r}; choose one of {PLACEMENTS}")
    return kind


def _dtensor_rule(name: str, placements, info) -> tuple[bool, bool]:
    """``(counts here, sharded)`` for a DTensor: ``Replicate`` dims and the root dims its mesh does
    not span count at coordinate 0 only; ``Shard`` dims count everywhere."""
    keep = info.replicated_elsewhere_zero
    sharded = False
    for d, pl in enumerate(placements):
        if pl.is_partial():
            raise ValueError(
                f"gradient of {name} is a Partial DTensor (unreduced sums); reduce it "
                "first (e.g. .redistribute(placements=[Replicate()])) before reading stats"
            )
        if pl.is_replicate():
            keep = keep and info.coordinate[d] == 0
        else:
            sharded = True
    return keep, sharded


_LOCAL_TYPES = {torch.Tensor, torch.nn.Parameter}  # never DTensors: no isinstance scan needed


def plan(
    names: Sequence[str],
    grads: Sequence[torch.Tensor],
    process_group=None,
    placements: PlacementsArg = None,
) -> DistPlan | None:
    """The reduction plan for ``grads``, or None when they are plain local tensors (no group).

    ``process_group`` is a ``ProcessGroup``, a ``DeviceMesh`` (its ranks; a dimension named
    ``"pp"`` makes its coordinates pipeline stages) or None (the DTensors' meshes). The stage
    (ranks combining rows) comes from the DTensors' root meshes without their pipeline
    dimensions, else from ``process_group``; the domain (ranks combining totals) is the union
    of the roots and ``process_group``. ``placements`` says what plain tensors are (see the
    module docstring) and may mark DTensors ``"duplicate"``. Host-only: reads meshes and
    placements (cached per mesh), never data.
    """
    if process_group is None and set(map(type, grads)) <= _LOCAL_TYPES:
        return None  # the common case (weights passed as Parameters too), decided without importing DTensor
    DTensor = _dtensor_type()
    if process_group is None and (DTensor is None or not any(isinstance(g, DTensor) for g in grads)):
        return None  # other tensor subclasses are local tensors
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fastgrad: DTensor gradients or process_group= need an initialised torch.distributed"
        )
    pg_stage = pg_domain = None
    checked = False
    if process_group is not None:
        if _is_mesh(process_group):
            info = dist_layout.mesh_info(process_group, as_root=True)
            pg_stage, pg_domain, checked = info.stage, info.domain, True
        else:
            try:
                member = dist.get_rank(process_group) >= 0
            except (RuntimeError, ValueError, TypeError, AttributeError) as e:
                raise RuntimeError(f"fastgrad: process_group is not a usable ProcessGroup or DeviceMesh ({e})") from e
            if not member:
                raise RuntimeError("fastgrad: this rank is not a member of process_group")
            pg_stage = pg_domain = dist_layout.group_rank_set(process_group)
    stage = None
    domains = [pg_domain] if pg_domain is not None else []
    local: list[torch.Tensor] = []
    contributes: list = []
    sharded = False
    for name, g in zip(names, grads):
        user = _user_placement(placements, name)
        if DTensor is not None and isinstance(g, DTensor):
            info = dist_layout.mesh_info(g.device_mesh)
            if stage is None:
                stage = info.stage
            elif info.stage.ranks != stage.ranks:
                raise dist_layout.LayoutError(
                    f"fastgrad: gradient of {name} lives on a mesh whose stage is ranks {info.stage.ranks}, "
                    f"others on {stage.ranks}: build every mesh from one root DeviceMesh (pipeline "
                    f"dimension named {sorted(dist_layout.PIPELINE_DIM_NAMES)[0]!r})"
                )
            if info.domain not in domains:
                domains.append(info.domain)
            keep, shard = _dtensor_rule(name, g.placements, info)
            checked = True
            local.append(_local_of(g))
            contributes.append(keep and user != "duplicate")
            sharded = sharded or shard or user == "duplicate"
        else:
            kind = user or "replicate"
            local.append(g)
            contributes.append(kind)  # resolved below, once the stage is known
            sharded = sharded or kind != "replicate"
    if stage is None:
        stage = pg_stage
    union = set().union(*(d.ranks for d in domains))
    domain = next((d for d in domains if set(d.ranks) == union), None)
    if domain is None:
        raise dist_layout.LayoutError(
            f"fastgrad: the gradients' meshes and process_group span different ranks ({sorted(union)} in all, "
            "no one mesh or group covers them): build every mesh from one root DeviceMesh"
        )
    if not set(stage.ranks) <= set(domain.ranks):
        raise dist_layout.LayoutError("fastgrad: process_group must contain every rank of the gradients' meshes")
    leader = dist.get_rank() == stage.ranks[0]
    contributes = [c if isinstance(c, bool) else (c == "shard" or (c == "replicate" and leader))
                   for c in contributes]
    descr = lambda: _describe(names, grads, placements, DTensor)  # noqa: E731 (only built when checking)
    return DistPlan(local, contributes, len(stage.ranks) > 1 and sharded, stage, domain, leader, checked, descr)


def _describe(names, grads, placements, DTensor) -> list[tuple]:
    """What must agree across a stage, per row: name, global shape, dtype (and a DTensor's placements)."""
    rows = []
    for i, g in enumerate(grads):
        name = names[i]
        if DTensor is not None and isinstance(g, DTensor):
            rows.append((name, tuple(g.shape), str(g.dtype), tuple(str(p) for p in g.placements)))
        else:
            # plain pieces may differ in shape and kind across ranks (uneven shards; a tied weight
            # counted on one rank and "duplicate" elsewhere): only replicated ones show a shape
            kind = _user_placement(placements, name) or "replicate"
            rows.append((name, tuple(g.shape) if kind == "replicate" else None, str(g.dtype)))
    return rows


def local_tensors(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` with every DTensor replaced by its local shard (same storage: in-place ops write through)."""
    if set(map(type, grads)) <= _LOCAL_TYPES:
        return list(grads)
    DTensor = _dtensor_type()
    return [_local_of(g) if DTensor is not None and isinstance(g, DTensor) else g for g in grads]


def _local_of(g) -> torch.Tensor:
    """A DTensor's local shard. ``to_local()`` is an autograd Function (~20 us a call, most of a
    1000-tensor plan); a gradient that needs no graph is read directly (the same tensor)."""
    return g.to_local() if g.requires_grad else g._local_tensor


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=op, group=group)
    return t


def _check(plan: DistPlan, kind: str, device: torch.device) -> None:
    """Same rows on every rank of the stage, or the same :class:`~fastgrad.dist_layout.LayoutError`
    on all of them (a fixed-size all-reduce before any collective whose size depends on the rows)."""
    if plan.checked or kind == "rows":
        dist_layout.check_layout(plan.stage, kind, plan.describe, device)


def _reduce_table(floats: torch.Tensor, counts: torch.Tensor, numel: torch.Tensor, keep: torch.Tensor | None,
                  spec: StatsSpec, group) -> tuple[RawStats, torch.Tensor]:
    """Rows of pieces -> rows of the whole tensors over ``group``: MAX ``[R, P+1]`` then SUM
    ``[R, P+4+B+1]`` (rows where ``keep`` is False send zeros). Every rank gets the same result."""
    P = len(spec.finite_norms)
    f = torch.where(floats.isnan(), 0.0, floats)  # NaN comes back from the NaN counts
    c = counts.to(torch.float64)
    n = numel.to(torch.float64)
    if keep is not None:
        f = torch.where(keep[:, None], f, 0.0)
        c = torch.where(keep[:, None], c, 0.0)
        n = torch.where(keep, n, 0.0)
    top = _all_reduce(f.clone(), torch.distributed.ReduceOp.MAX, group)
    m = top[:, :P]
    ps = torch.tensor(spec.finite_norms, dtype=torch.float64, device=floats.device)
    ratio = scaled_ratio(f[:, :P], m) ** ps
    packed = _all_reduce(torch.cat([ratio, c, n[:, None]], dim=1), torch.distributed.ReduceOp.SUM, group)
    norms = unscale(m, packed[:, :P], ps)
    gcounts = packed[:, P:P + counts.shape[1]].round().to(torch.int64)
    has_inf = (gcounts[:, POSINF] + gcounts[:, NEGINF] > 0)[:, None]
    norms = torch.where(has_inf, math.inf, norms)
    norms = torch.where((gcounts[:, NAN] > 0)[:, None], math.nan, norms)
    return RawStats(torch.cat([norms, top[:, P:]], dim=1), gcounts), packed[:, -1].round().to(torch.int64)


def reduce_raw(raw: RawStats, spec: StatsSpec, plan: DistPlan) -> tuple[RawStats, torch.Tensor]:
    """The stage's per-tensor tables and int64 ``[T]`` element counts from this rank's partials.

    ``raw`` holds the tables of ``plan.local`` (same rows on every rank of the stage, same
    order: checked by a fingerprint on the first call). Two all-reduces over the stage (MAX,
    then SUM; sizes in the module docstring), or none when ``plan.communicate`` is False.
    Every rank gets identical results.
    """
    device = raw.floats.device
    numel = plan.numel(device)
    if not plan.communicate:
        return raw, numel
    _check(plan, "rows", device)
    return _reduce_table(raw.floats, raw.counts, numel, plan.mask(device), spec, plan.group)


def reduce_stats(local: StatsResult, spec: StatsSpec, plan: DistPlan) -> StatsResult:
    """The global :class:`StatsResult` from this rank's: rows over the stage (:func:`reduce_raw`),
    then, under pipeline parallelism, the total row over every stage (MAX and SUM of one row
    over the domain, from each stage's first rank). Per-tensor rows stay per stage."""
    T = len(plan.local)
    device = local.raw.floats.device
    if plan.communicate:
        raw, numel = reduce_raw(local.raw, spec, plan)
        total, total_numel = aggregate(raw, spec, TOTAL), numel.sum().reshape(1)
    else:
        raw, numel, total, total_numel = local.raw, local.numel[:T], local.total, local.numel[T:]
        keep = plan.mask(device)
        if plan.cross and keep is not None:  # a one-rank stage with a "duplicate" row: not in the total
            kept = RawStats(torch.where(keep[:, None], raw.floats, 0.0), torch.where(keep[:, None], raw.counts, 0))
            total, total_numel = aggregate(kept, spec, TOTAL), torch.where(keep, numel, 0).sum().reshape(1)
    if plan.cross:
        if not plan.communicate:
            _check(plan, "rows", device)
        keep = _device_tensor((plan.leader,), torch.bool, device)
        total, total_numel = _reduce_table(total.floats, total.counts, total_numel, keep, spec,
                                           plan.domain.group())
    elif not plan.communicate:
        return local
    return StatsResult(raw, torch.cat([numel, total_numel]), total)


_cross_unscaled: dict = {}


def _unscaled_ok(plan: DistPlan, dtypes: Sequence[torch.dtype], device: torch.device) -> bool:
    """Whether the one-SUM total is exact: every gradient fp16/bf16/fp32. Across pipeline stages
    the ranks hold different dtypes possibly, and all must take the same path: the first call per
    domain agrees on it (one MAX of 1 int64) and later calls reuse that answer (a rank whose
    gradients later turn float64 still sums unscaled: exact unless a float64 norm exceeds
    ~1e150, where the total becomes inf)."""
    mine = all(dt in _UNSCALED_DTYPES for dt in dtypes)
    if not plan.cross:
        return mine
    key = (plan.domain.ranks, plan.domain.origin)
    hit = _cross_unscaled.get(key)
    if hit is None:
        flag = torch.tensor([0 if mine else 1], dtype=torch.int64).to(device)  # one-time: int64 as the check
        flag = _all_reduce(flag, torch.distributed.ReduceOp.MAX, plan.domain.group())
        hit = _cross_unscaled[key] = bool(flag.item() == 0)
    return hit


def reduce_total_norm(raw: RawStats, p: float, plan: DistPlan, dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    """float64 0-d global ``p``-norm from this rank's per-tensor tables (``StatsSpec((p,), None)``).

    Only a total crosses the wire, over the whole domain (every pipeline stage): rows may
    differ between stages. One all-reduce of 2 float64 (MAX for ``p = inf``; SUM of unscaled
    ``n^p`` when ``p <= 6`` and every gradient is fp16/bf16/fp32), else two (MAX of the
    scale, then SUM). Call only when ``plan.communicate_total``; otherwise the local total is
    already global.
    """
    floats, counts = raw
    _check(plan, "total", floats.device)
    group = plan.domain.group()
    keep = plan.mask(floats.device)
    col = torch.where(floats[:, 0].isnan(), 0.0, floats[:, 0])  # NaN travels as a flag
    nan = counts[:, NAN]
    if keep is not None:
        col = torch.where(keep, col, 0.0)
        nan = torch.where(keep, nan, 0)
    has_nan = (nan.sum() > 0).to(torch.float64)
    MAX, SUM = torch.distributed.ReduceOp.MAX, torch.distributed.ReduceOp.SUM
    if math.isinf(p):
        top = col.amax() if col.numel() else col.new_zeros(())
        buf = _all_reduce(torch.stack([top, has_nan]), MAX, group)
        return torch.where(buf[1] > 0, math.nan, buf[0])
    if p <= _UNSCALED_MAX_P and _unscaled_ok(plan, dtypes, floats.device):
        buf = _all_reduce(torch.stack([col.pow(p).sum(), has_nan]), SUM, group)
        return torch.where(buf[1] > 0, math.nan, buf[0] ** (1.0 / p))
    top = col.amax() if col.numel() else col.new_zeros(())
    head = _all_reduce(torch.stack([top, has_nan]), MAX, group)
    m = head[0]
    s = scaled_ratio(col, m).pow(p).sum()
    s = _all_reduce(s.reshape(1), SUM, group)[0]
    total = unscale(m, s, p)
    return torch.where(head[1] > 0, math.nan, total)
