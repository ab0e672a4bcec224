"""Statistics of sharded gradients: local partials on every rank, then one small collective.

Every rank computes the usual per-tensor tables (:mod:`fastgrad.spec`) of the
gradient pieces it holds (``g.to_local()`` for a DTensor; a piece may be
empty), then the rows are combined across ranks exactly as chunks of one
tensor are combined (:mod:`fastgrad.aggregate`). With ``M`` the largest piece
norm of a tensor and ``n_r`` the norm of its piece on rank ``r``::

    norm_p = M * (sum_r (n_r / M)^p)^(1/p)      max|x| = max_r max|x_r|

Per-tensor statistics (:func:`reduce_raw`, used by ``grad_stats``) take two
all-reduces per call, both float64, over ``T`` tensors with ``P`` finite norms
and ``B`` histogram bins::

    MAX  [T, P + 1]           piece norms (the scale M) and max|x|
    SUM  [T, P + 4 + B + 1]   (n_r / M)^p, NaN/+Inf/-Inf/zero counts, bins, numel

Float64 counts are exact below 2^53 elements per tensor. The total norm alone
(:func:`reduce_total_norm`, used by ``clip_grad_norm_``) is 2 numbers in one
all-reduce: ``sum_r n_r^p`` unscaled when that cannot overflow or underflow
(p <= 6 and fp16/bf16/fp32 gradients), else a MAX then a SUM of 2 numbers.

Counting once. A row contributes from this rank only where it should:

* DTensor: on every mesh dim where it is ``Replicate`` only the coordinate-0
  rank contributes (``Shard`` dims contribute everywhere; ``Partial``
  gradients raise: reduce them first).
* Plain tensors, as the ``placements=`` argument says: ``"shard"`` (this
  rank's tensor is a disjoint piece, or the one counted copy: it contributes),
  ``"replicate"`` (every rank of the group holds the same values: counted
  once, from group rank 0; the default), ``"duplicate"`` (a copy counted on
  another rank, e.g. a tied embedding on the last pipeline stage: never
  contributes).

No collective is issued when the group has one rank or every row is
replicated (DDP). Whether to communicate is decided locally from the
placements, so all ranks of the group must call with the same kinds of rows.
The collectives are ordinary ``torch.distributed.all_reduce`` calls on the
gradients' device: no host synchronisation beyond the collective itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .aggregate import scaled_ratio, unscale
from .spec import NAN, NEGINF, POSINF, RawStats, StatsSpec

PLACEMENTS = ("shard", "replicate", "duplicate")
PlacementsArg = str | Mapping[str, str] | Callable[[str], str | None] | None
# sum_r n_r^p needs no scale when |x|^p of any fp16/bf16/fp32 value (1.4e-45 .. 3.4e38)
# is a normal float64 and numel * max^p stays finite: p <= 6 leaves > 30 decades of room.
_UNSCALED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNSCALED_MAX_P = 6.0


@dataclass
class DistPlan:
    """How this rank's gradients enter a cross-rank reduction (built per call by :func:`plan`).

    Attributes:
        group: the process group the collective runs over.
        local: the tensors this rank reads (DTensor -> its local shard).
        contributes: per row, whether this rank's piece counts (the count-once rule).
        communicate: False when nothing needs combining (one rank, or every row replicated).
    """

    group: object
    local: list[torch.Tensor]
    contributes: list[bool]
    communicate: bool

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


def _mesh_group(mesh):
    """The process group spanning every rank of ``mesh``."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == torch.distributed.get_world_size():
        return torch.distributed.group.WORLD
    return mesh._flatten().get_group()  # a cached sub-group of exactly the mesh's ranks


def _as_group(process_group):
    if process_group is None:
        return None
    if hasattr(process_group, "get_group") and hasattr(process_group, "ndim"):  # a DeviceMesh
        return _mesh_group(process_group)
    return process_group


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


def plan(
    names: Sequence[str],
    grads: Sequence[torch.Tensor],
    process_group=None,
    placements: PlacementsArg = None,
) -> DistPlan | None:
    """The reduction plan for ``grads``, or None when they are plain local tensors (no group).

    ``process_group`` is a ``ProcessGroup``, a ``DeviceMesh`` (its ranks) or None
    (the DTensors' mesh, if any gradient is a DTensor). ``placements`` says
    what plain tensors are (see the module docstring) and may mark DTensors
    ``"duplicate"``. Cheap and host-only: reads placements, never data.
    """
    if process_group is None and all(type(g) is torch.Tensor for g in grads):
        return None  # the common case, decided without importing DTensor
    DTensor = _dtensor_type()
    if process_group is None and (DTensor is None or not any(isinstance(g, DTensor) for g in grads)):
        return None  # other tensor subclasses are local tensors
    dist = torch.distributed
    group = _as_group(process_group)
    mesh = None
    local: list[torch.Tensor] = []
    contributes: list[bool] = []
    sharded = False
    for name, g in zip(names, grads):
        user = _user_placement(placements, name)
        if DTensor is not None and isinstance(g, DTensor):
            if mesh is None:
                mesh = g.device_mesh
            coord = g.device_mesh.get_coordinate()
            if coord is None:
                raise RuntimeError(f"gradient of {name}: this rank is not in its DTensor's mesh")
            keep = user != "duplicate"
            sharded = sharded or not keep
            for d, pl in enumerate(g.placements):
                if pl.is_partial():
                    raise ValueError(
                        f"gradient of {name} is a Partial DTensor (unreduced sums); reduce it "
                        "first (e.g. .redistribute(placements=[Replicate()])) before reading stats"
                    )
                if pl.is_replicate():
                    keep = keep and coord[d] == 0
                else:
                    sharded = True
            local.append(g.to_local())
            contributes.append(keep)
        else:
            kind = user or "replicate"
            local.append(g)
            contributes.append(kind)  # resolved below, once the group is known
            sharded = sharded or kind != "replicate"
    if group is None:
        group = _mesh_group(mesh) if mesh is not None else None
    if group is None or not dist.is_initialized():
        raise RuntimeError(
            "fastgrad: DTensor gradients or process_group= need an initialised torch.distributed"
        )
    size = dist.get_world_size(group)
    rank0 = dist.get_rank(group) == 0
    if dist.get_rank(group) < 0:
        raise RuntimeError("fastgrad: this rank is not a member of process_group")
    contributes = [
        c if isinstance(c, bool) else (c == "shard" or (c == "replicate" and rank0))
        for c in contributes
    ]
    return DistPlan(group, local, contributes, communicate=size > 1 and sharded)


def local_tensors(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` with every DTensor replaced by its local shard (same storage: in-place ops write through)."""
    if all(type(g) is torch.Tensor for g in grads):
        return list(grads)
    DTensor = _dtensor_type()
    return [g.to_local() if DTensor is not None and isinstance(g, DTensor) else g for g in grads]


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=op, group=group)
    return t


def reduce_raw(raw: RawStats, spec: StatsSpec, plan: DistPlan) -> tuple[RawStats, torch.Tensor]:
    """The global per-tensor tables and int64 ``[T]`` global element counts from this rank's partials.

    ``raw`` holds the tables of ``plan.local`` (same rows on every rank, same
    order). Two all-reduces (MAX, then SUM; sizes in the module docstring), or
    none when ``plan.communicate`` is False. Every rank gets identical results.
    """
    floats, counts = raw
    device = floats.device
    numel = plan.numel(device)
    if not plan.communicate:
        return raw, numel
    P = len(spec.finite_norms)
    keep = plan.mask(device)
    f = torch.where(floats.isnan(), 0.0, floats)  # NaN comes back from the NaN counts
    c = counts.to(torch.float64)
    n = numel.to(torch.float64)
    if keep is not None:
        f = torch.where(keep[:, None], f, 0.0)
        c = torch.where(keep[:, None], c, 0.0)
        n = torch.where(keep, n, 0.0)
    top = _all_reduce(f.clone(), torch.distributed.ReduceOp.MAX, plan.group)
    m = top[:, :P]
    ps = torch.tensor(spec.finite_norms, dtype=torch.float64, device=device)
    ratio = scaled_ratio(f[:, :P], m) ** ps
    packed = _all_reduce(torch.cat([ratio, c, n[:, None]], dim=1), torch.distributed.ReduceOp.SUM, plan.group)
    norms = unscale(m, packed[:, :P], ps)
    gcounts = packed[:, P:P + counts.shape[1]].round().to(torch.int64)
    has_inf = (gcounts[:, POSINF] + gcounts[:, NEGINF] > 0)[:, None]
    norms = torch.where(has_inf, math.inf, norms)
    norms = torch.where((gcounts[:, NAN] > 0)[:, None], math.nan, norms)
    out = RawStats(torch.cat([norms, top[:, P:]], dim=1), gcounts)
    return out, packed[:, -1].round().to(torch.int64)


def reduce_total_norm(raw: RawStats, p: float, plan: DistPlan, dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    """float64 0-d global ``p``-norm from this rank's per-tensor tables (``StatsSpec((p,), None)``).

    Rows may differ between ranks (pipeline stages): only a total crosses the
    wire. One all-reduce of 2 float64 (MAX for ``p = inf``; SUM of unscaled
    ``n^p`` when ``p <= 6`` and every gradient is fp16/bf16/fp32), else two
    (MAX of the scale, then SUM). Call only when ``plan.communicate``; otherwise
    the local total is already global.
    """
    floats, counts = raw
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
        buf = _all_reduce(torch.stack([top, has_nan]), MAX, plan.group)
        return torch.where(buf[1] > 0, math.nan, buf[0])
    if p <= _UNSCALED_MAX_P and all(dt in _UNSCALED_DTYPES for dt in dtypes):
        buf = _all_reduce(torch.stack([col.pow(p).sum(), has_nan]), SUM, plan.group)
        return torch.where(buf[1] > 0, math.nan, buf[0] ** (1.0 / p))
    top = col.amax() if col.numel() else col.new_zeros(())
    head = _all_reduce(torch.stack([top, has_nan]), MAX, plan.group)
    m = head[0]
    s = scaled_ratio(col, m).pow(p).sum()
    s = _all_reduce(s.reshape(1), SUM, plan.group)[0]
    total = unscale(m, s, p)
    return torch.where(head[1] > 0, math.nan, total)
