"""``grad_stats``: every statistic of a set of gradients from one fused pass, and ``GradStats``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import aggregate, distributed
from .collect import collect
from .ops import stats_op, total_norm_op
from .spec import (COUNT_NAMES, NAN, NEGINF, NUM_COUNTS, POSINF, ZERO, HistogramSpec, RawStats, StatsResult,
                   StatsSpec, make_spec)


@dataclass(frozen=True, eq=False)
class GradStats:
    """Statistics of gradients, one row per tensor (or per group, or the single total row).

    All tensors live on the gradients' (first) device; nothing here synchronises
    with the host except :meth:`to_dict`, :meth:`summary` and :meth:`nonfinite_names`.

    Attributes:
        names: row names (parameter names, ``[i]`` positions, or group names).
        spec: what was computed (norm types, histogram bins).
        numel: int64 ``[R]`` element counts (on a GPU possibly shared with other calls over the
            same parameter set: read it, do not write it).
        raw: the backend tables (:class:`fastgrad.spec.RawStats`).
        groups: per-group :class:`GradStats` when ``groups=`` was given (or a Module), else None.
        params: with ``grad_stats(..., params=True)``, the same statistics of the weights, on the
            same rows (and groups, and total): ``params.tensor_norms`` etc.; else None.
    """

    names: tuple[str, ...]
    spec: StatsSpec
    numel: torch.Tensor
    raw: RawStats
    groups: GradStats | None = None
    _total: GradStats | None = None
    params: GradStats | None = None

    # -- per-row views ---------------------------------------------------------
    @property
    def norm_type(self) -> float:
        """The first requested norm type, the one ``tensor_norms`` and ``total_norm`` report."""
        return self.spec.norm_types[0]

    def norm(self, p: float | str | None = None) -> torch.Tensor:
        """float64 ``[R]`` p-norms of the rows (``p`` must be among the requested norm types).

        ``inf`` is ``max_abs`` unless the row holds a NaN (then NaN), as torch's inf-norm.
        """
        return row_norms(self.spec, self.raw, self.norm_type if p is None else float(p))

    @property
    def tensor_norms(self) -> torch.Tensor:
        """float64 ``[R]``: the ``norm_type``-norm of each row."""
        return self.norm()

    @property
    def max_abs(self) -> torch.Tensor:
        """float64 ``[R]``: ``max |x|`` over non-NaN elements (+Inf if any Inf; 0 if empty)."""
        return self.raw.floats[:, -1]

    @property
    def nan_count(self) -> torch.Tensor:
        return self.raw.counts[:, NAN]

    @property
    def posinf_count(self) -> torch.Tensor:
        return self.raw.counts[:, POSINF]

    @property
    def neginf_count(self) -> torch.Tensor:
        return self.raw.counts[:, NEGINF]

    @property
    def zero_count(self) -> torch.Tensor:
        return self.raw.counts[:, ZERO]

    @property
    def nonfinite_count(self) -> torch.Tensor:
        """int64 ``[R]``: NaN + Inf + -Inf elements."""
        return self.raw.counts[:, :ZERO].sum(dim=1)

    @property
    def histogram(self) -> torch.Tensor | None:
        """int64 ``[R, B]`` magnitude histogram per row (see :class:`HistogramSpec`), or None."""
        return self.raw.counts[:, NUM_COUNTS:] if self.spec.histogram else None

    @property
    def hist_spec(self) -> HistogramSpec | None:
        return self.spec.histogram

    # -- totals --------------------------------------------------------------------
    @property
    def total(self) -> GradStats:
        """One-row :class:`GradStats` over everything (name ``"total"``)."""
        if self._total is None:
            t = GradStats(
                ("total",), self.spec, self.numel.sum().reshape(1),
                aggregate.aggregate(self.raw, self.spec, aggregate.TOTAL),
            )
            object.__setattr__(self, "_total", t)
        return self._total

    @property
    def total_norm(self) -> torch.Tensor:
        """float64 0-d: the global ``norm_type``-norm, as if all gradients were one vector."""
        p = self.norm_type
        if math.isinf(p):
            return self.total.norm()[0]
        return self.total.raw.floats[0, self.spec.finite_norms.index(p)]

    # -- weights (grad_stats(..., params=True)) ------------------------------------------
    def _weights(self) -> GradStats:
        if self.params is None:
            raise ValueError("weight statistics were not computed: call grad_stats(..., params=True)")
        return self.params

    @property
    def param_norms(self) -> torch.Tensor:
        """float64 ``[R]``: the L2 norm of each row's weights ``||w||``."""
        return self._weights().norm(2.0)

    @property
    def grad_param_ratio(self) -> torch.Tensor:
        """float64 ``[R]``: ``||g|| / ||w||`` per row (L2; the ratio AGC and LAMB use). IEEE
        division: a zero weight norm gives +Inf (or NaN for a zero gradient too)."""
        return self.norm(2.0) / self.param_norms

    @property
    def total_param_norm(self) -> torch.Tensor:
        """float64 0-d: the L2 norm of all weights as one vector."""
        return self._weights().total.norm(2.0)[0]

    @property
    def global_histogram(self) -> torch.Tensor | None:
        """int64 ``[B]``: the histogram of all elements (None without histograms)."""
        h = self.total.histogram
        return None if h is None else h[0]

    # -- host-side helpers (these synchronise) ------------------------------------
    def _host_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tabs = [self.raw.floats, self.raw.counts, self.numel]
        out = [t.to("cpu", non_blocking=True) for t in tabs]
        if any(t.device.type == "cuda" for t in tabs):
            torch.cuda.synchronize()
        return tuple(out)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        """Plain Python numbers per row: ``{name: {"norm": ..., "max_abs": ..., ...}}`` (one sync)."""
        floats, counts, numel = self._host_tables()
        ps = self.spec.finite_norms
        out: dict = {}
        for r, name in enumerate(self.names):
            row: dict = {"numel": int(numel[r])}
            nan = int(counts[r, NAN])
            for p in self.spec.norm_types:
                v = float("nan") if (math.isinf(p) and nan) else (
                    float(floats[r, -1]) if math.isinf(p) else float(floats[r, ps.index(p)])
                )
                row["norm" if p == self.norm_type else f"norm_{p:g}"] = v
            row["max_abs"] = float(floats[r, -1])
            for k, cname in enumerate(COUNT_NAMES):
                row[cname] = int(counts[r, k])
            if self.spec.histogram:
                row["histogram"] = counts[r, NUM_COUNTS:].tolist()
            out[name] = row
        return out

    def nonfinite_names(self) -> list[str]:
        """Names of the rows holding NaN or ±Inf (one sync)."""
        bad = self.nonfinite_count.to("cpu").tolist()
        return [n for n, b in zip(self.names, bad) if b]

    def summary(self, max_rows: int = 40, sort_by_norm: bool = False) -> str:
        """A text table: total, then groups (if any) else tensors, in order or largest norm first (one sync)."""
        rows = self.groups if self.groups is not None else self
        d_total = self.total.to_dict()["total"]
        d = rows.to_dict()
        lines = [f"{'name':<40} {'numel':>11} {'norm':>11} {'max_abs':>10} {'nan':>6} {'inf':>6} {'zeros':>9}"]

        def fmt(name: str, r: dict) -> str:
            return (
                f"{name[:40]:<40} {r['numel']:>11d} {r['norm']:>11.4e} {r['max_abs']:>10.3e} "
                f"{r['nan']:>6d} {r['posinf'] + r['neginf']:>6d} {r['zero']:>9d}"
            )

        lines.append(fmt("total", d_total))
        order = list(d)
        if sort_by_norm:  # NaN first: it is what needs looking at
            order.sort(key=lambda n: -d[n]["norm"] if not math.isnan(d[n]["norm"]) else -math.inf)
        for name in order[:max_rows]:
            lines.append(fmt(name, d[name]))
        if len(order) > max_rows:
            lines.append(f"... {len(order) - max_rows} more rows")
        return "\n".join(lines)


def row_norms(spec: StatsSpec, raw: RawStats, p: float) -> torch.Tensor:
    """float64 p-norms of the rows of ``raw`` (``p`` among ``spec``'s norm types; ``inf`` is
    ``max|x|``, NaN where the row holds a NaN, as torch's inf-norm)."""
    if math.isinf(p):
        return torch.where(raw.counts[:, NAN] > 0, float("nan"), raw.floats[:, -1])
    try:
        j = spec.finite_norms.index(p)
    except ValueError:
        raise ValueError(
            f"norm {p} was not computed; pass norm_types including it (computed: {spec.norm_types})"
        ) from None
    return raw.floats[:, j]


GroupsArg = str | int | Callable[[str], str] | Mapping[str, str] | Sequence[str] | None


def module_group(name: str) -> str:
    """The owning module of a parameter name: ``layers.3.attn.weight`` -> ``layers.3.attn``."""
    head, _, _ = name.rpartition(".")
    return head or name


def group_labels(names: Sequence[str], groups: GroupsArg) -> list[str] | None:
    """One group label per tensor from the ``groups=`` argument (None = no grouping).

    ``"module"`` groups by owning module, an int ``k`` by the first ``k`` name
    components (``k=2``: ``layers.3``), a callable maps names to labels, a mapping
    looks names up (unlisted names keep their own), a sequence gives labels in order.
    """
    if groups is None:
        return None
    if groups == "module":
        return [module_group(n) for n in names]
    if isinstance(groups, bool):
        raise TypeError("groups must be 'module', an int depth, a callable, a mapping or a sequence")
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups depth must be >= 1, got {groups}")
        return [".".join(n.split(".")[:groups]) for n in names]
    if callable(groups):
        return [str(groups(n)) for n in names]
    if isinstance(groups, Mapping):
        return [str(groups.get(n, n)) for n in names]
    if isinstance(groups, str):
        raise ValueError(f"groups={groups!r}: the only string accepted is 'module'")
    labels = [str(g) for g in groups]
    if len(labels) != len(names):
        raise ValueError(f"groups has {len(labels)} labels for {len(names)} gradients")
    return labels


_segments_cache: dict = {}


def _segments(labels: list[str], device: torch.device) -> tuple[list[str], aggregate.Segments]:
    key = (tuple(labels), device)
    hit = _segments_cache.get(key)
    if hit is None:
        order: dict[str, int] = {}
        index = [order.setdefault(lab, len(order)) for lab in labels]
        hit = (list(order), aggregate.Segments(index, len(order), device))
        if len(_segments_cache) > 64:
            _segments_cache.clear()
        _segments_cache[key] = hit
    return hit


def build_stats(names: Sequence[str], spec: StatsSpec, res: StatsResult, labels: list[str] | None,
                params: GradStats | None = None) -> GradStats:
    """Wrap a :class:`StatsResult` into a :class:`GradStats`, adding per-group rows if ``labels``."""
    T = len(names)
    stats_numel = res.numel[:T]
    groups = None
    total = GradStats(("total",), spec, res.numel[T:], res.total, params=None if params is None else params.total)
    if labels is not None:
        device = res.raw.floats.device
        gnames, seg = _segments(labels, device)
        # groups partition the tensors: their total row is the same one (set now: a GradStats is
        # never changed after construction, which torch.compile needs to rebuild it)
        groups = GradStats(tuple(gnames), spec, seg.sum(stats_numel), aggregate.aggregate(res.raw, spec, seg),
                           _total=total, params=None if params is None else params.groups)
    return GradStats(tuple(names), spec, stats_numel, res.raw, groups, total, params)


def _split_rows(res: StatsResult, spec: StatsSpec, T: int) -> tuple[StatsResult, StatsResult]:
    """The results of one pass over ``grads + weights`` (2T rows) as two results with their own
    total rows (combined from the rows: the pass's own total row covers both)."""
    out = []
    for rows in (slice(0, T), slice(T, 2 * T)):
        raw = RawStats(res.raw.floats[rows], res.raw.counts[rows])
        n = res.numel[rows]
        out.append(StatsResult(raw, torch.cat([n, n.sum().reshape(1)]), aggregate.aggregate(raw, spec, aggregate.TOTAL)))
    return out[0], out[1]


def compute_stats(names: Sequence[str], grads: Sequence[torch.Tensor], spec: StatsSpec, backend: str | None,
                  process_group=None, placements: distributed.PlacementsArg = None,
                  ) -> tuple[StatsResult, list[torch.dtype]]:
    """compute -> reduce: the :class:`StatsResult` of ``grads`` (global when sharded) and their dtypes.

    The path of every entry point below collection: the backend pass on this
    rank's tensors, then, for sharded gradients, the cross-rank reduction
    (:func:`fastgrad.distributed.reduce_stats`): per-tensor rows over the ranks that hold
    them (a pipeline stage), the total row over every stage.
    """
    plan = distributed.plan(names, grads, process_group, placements)
    if plan is None:
        return stats_op(grads, spec, backend, names)
    local, dtypes = stats_op(plan.local, spec, backend, names)
    return distributed.reduce_stats(local, spec, plan), dtypes


def compute_total_norm(names: Sequence[str], grads: Sequence[torch.Tensor], p: float, backend: str | None,
                       process_group=None, placements: distributed.PlacementsArg = None,
                       ) -> tuple[float | torch.Tensor, list[torch.dtype]]:
    """compute -> reduce for the global ``p``-norm alone (the clipping path): ``(total, dtypes
    present)``, the total a float64 0-d tensor on the gradients' device, or a Python float where
    the backend reads host memory (:func:`fastgrad.dispatch.total_norm`).

    Sharded gradients send only the total across ranks (2 numbers over every rank of the
    model, :func:`fastgrad.distributed.reduce_total_norm`): pipeline stages holding
    different tensors reduce together.
    """
    plan = distributed.plan(names, grads, process_group, placements)
    if plan is None:
        return total_norm_op(grads, p, backend, names)
    spec = StatsSpec((p,), None)
    local, dtypes = stats_op(plan.local, spec, backend, names)
    if plan.communicate_total:
        return distributed.reduce_total_norm(local.raw, p, plan, dtypes), dtypes
    return row_norms(spec, local.total, p)[0], dtypes


def grad_stats(
    tensors_or_params,
    *,
    names: Sequence[str] | None = None,
    groups: GroupsArg = None,
    norm_types: Sequence[float | str] | float | str = (2,),
    histogram: bool | HistogramSpec | tuple[int, int] = True,
    backend: str | None = None,
    process_group=None,
    placements: distributed.PlacementsArg = None,
    params: bool = False,
) -> GradStats:
    """Every statistic of a set of gradients, from one read of each gradient.

    Args:
        tensors_or_params: a ``torch.nn.Module`` (names from ``named_parameters()``,
            grouped by owning module unless ``groups`` says otherwise), an iterable of
            parameters (their ``.grad``; None grads skipped), of ``(name, param)`` pairs,
            or of gradient tensors.
        names: names for the items of an iterable (default ``[i]``).
        groups: per-layer aggregation: ``"module"``, an int depth, a callable
            ``name -> label``, a mapping or a sequence of labels (see :func:`group_labels`).
        norm_types: the p-norms to compute (``p > 0``, ``inf`` allowed); the first is
            ``total_norm``'s.
        histogram: power-of-two magnitude histogram: True (default bins), False, a
            :class:`HistogramSpec` or ``(min_exp, max_exp)``.
        backend: ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or None (auto;
            ``FASTGRAD_BACKEND`` overrides).
        process_group: combine the statistics of sharded gradients across this
            ``ProcessGroup`` or ``DeviceMesh`` (default: the mesh of DTensor gradients,
            e.g. under FSDP2; none for plain tensors). Two small all-reduces, none
            when nothing is sharded or the group has one rank; every rank must call.
        placements: for plain tensors with ``process_group``: ``"shard"``,
            ``"replicate"`` (default) or ``"duplicate"``, or a mapping / callable
            ``name -> kind``; each logical parameter is counted once
            (see :mod:`fastgrad.distributed`).
        params: also the statistics of the weights (a Module or parameters must be given),
            read in the same launch as the gradients: ``param_norms``, ``grad_param_ratio``,
            ``total_param_norm`` and ``.params`` (every statistic of the weights, same rows).
            The L2 norm is added to ``norm_types`` if absent.

    Returns:
        :class:`GradStats` of device tensors. Per tensor ``x`` (float64 math,
        see :mod:`fastgrad.reference`): ``norm_p = (sum |x|^p)^(1/p)``,
        ``max_abs = max |x|``, NaN/+Inf/-Inf/zero counts, histogram of
        ``floor(log2 |x|)``; ``total_norm`` is the norm of all gradients as one
        vector. No host synchronisation.
    """
    collected = collect(tensors_or_params, names, with_params=params)
    spec = make_spec(norm_types, histogram)
    if params and 2.0 not in spec.norm_types:
        spec = StatsSpec(spec.norm_types + (2.0,), spec.histogram)
    if groups is None and isinstance(tensors_or_params, torch.nn.Module):
        groups = "module"
    labels = group_labels(collected.names, groups)
    if not params:
        res, _ = compute_stats(collected.names, collected.grads, spec, backend, process_group, placements)
        return build_stats(collected.names, spec, res, labels)
    # the weights ride in the same launch as the gradients: one pass over 2T tensors
    both, _ = compute_stats(collected.names * 2, collected.grads + collected.params, spec, backend,
                            process_group, placements)
    g_res, w_res = _split_rows(both, spec, len(collected.names))
    weights = build_stats(collected.names, spec, w_res, labels)
    return build_stats(collected.names, spec, g_res, labels, weights)
