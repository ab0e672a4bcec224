"""The guard's lean lane: the common CPU step's statistics and epilogue at the cost of two C++ calls.

The data path is the one every entry point takes (collect -> plan -> compute -> result,
docs/architecture.md); what the lane drops is the per-call work that only depends on the
parameter set, decided once in :func:`build` and kept while the set stays:

* collect: the gradients are read straight from the optimizer's parameters (the
  :class:`~fastgrad.optim.names.ParamIndex` list; its names are the collector's);
* plan: backend (the ``cpu`` backend's fast form, as :func:`fastgrad.dispatch.compute` would
  choose it), spec, table layout, the per-tensor ``bad`` counts and the epilogue's fixed
  arguments;
* compute: ``_C.grad_stats_list`` (the fast form of the ``cpu`` backend, bitwise the tables
  :func:`fastgrad.grad_stats` returns) then ``_C.step_epilogue`` (the fused epilogue), both
  writing into **one** float64 allocation (:class:`StepTables`);
* result: the :class:`~fastgrad.stats.GradStats` and the epilogue's 0-d tensors are made when
  first read (float64 ones as views of that allocation, integer and bool ones copied out of it):
  a step nobody inspects makes none. The wrapper's folded step makes no ``Plan`` either.

Measured (bench/optim_step_host.py, 16 parameters of 16 elements, one thread): the guard's
statistics + epilogue stage went from ~45 us to ~14 us, of which ~10 us is the C++ statistics
call itself; the wrapped fused AdamW step from ~2.3x to ~1.4x the plain step.

Nothing is re-validated that the C++ reader does not check itself: it takes the list only if
every gradient is a plain contiguous CPU tensor of a supported dtype (a parameter without a
gradient, ``None``, fails that check), and otherwise computes nothing and the step takes the
general path (:meth:`fastgrad.optim.guard.Guard.prepare`), which also raises the errors. So new
``.grad`` tensors every step (``zero_grad(set_to_none=True)``), a dtype or device change, or
parameters gaining and losing gradients all go through the same check each step.

The lane serves eager steps without a GradScaler, without distributed arguments, on the
automatic or ``cpu`` backend, with the C++ epilogue (the built-in clippers) and with
:func:`fastgrad.optim.grad_stats` not replaced (it is the statistics seam tests observe).
"""

from __future__ import annotations

import os
import sys

import torch

from .. import dispatch
from .. import stats as _stats
from ..backends import cpu as _cpu
from ..spec import DTYPES_BY_CODE, RawStats, StatsResult, StatsSpec
from . import epilogue as _ep

_CPU = torch.device("cpu")
_ENV = dispatch.ENV_VAR
_compiling = torch.compiler.is_compiling
# the package fastgrad.optim: its grad_stats is the guard's statistics seam (fastgrad/optim/guard.py)
_optim = sys.modules[__package__]
_Tensor, _strided = torch.Tensor, torch.strided
_grad_stats_list = _cpu._C.grad_stats_list if _cpu._C is not None else None
_step_epilogue = getattr(_ep._C, "step_epilogue", None)


class StepTables:
    """One step's statistics tables and epilogue outputs, all in one float64 allocation; also the
    lazy source of the step's :class:`~fastgrad.stats.GradStats` (:meth:`get`).

    Layout (8-byte slots, :class:`Layout`): the floats table ``[T + 1, F]`` (row ``T`` the total),
    the epilogue's float64 ``[3]`` (total, coef, factor), the counts table ``[T + 1, C]`` (int64),
    the element counts ``[T + 1]`` (int64), and one slot whose first three bytes are the
    epilogue's bool ``[3]`` (skipped, nonfinite, spike). The C++ calls write them all; the
    tensors a reader sees are made when first read (:meth:`views`).
    """

    __slots__ = ("buf", "lane", "_views", "_built")

    def __init__(self, buf: torch.Tensor, lane: Lane) -> None:
        self.buf, self.lane, self._views, self._built = buf, lane, None, None

    def views(self) -> tuple[torch.Tensor, ...]:
        """``(floats [T+1, F], counts [T+1, C], numel [T+1], out_f64 [3], out_bool [3])``.

        The float64 tensors are views of the allocation; the integer and bool ones are copied out
        of it (one int64 copy, one bool conversion) when first read, so that no storage is seen
        under two dtypes (``torch.save`` refuses that, and a caller may save any of them)."""
        v = self._views
        if v is None:
            L, b = self.lane.layout, self.buf
            rows = L.T + 1
            ints = b[L.o_counts:L.o_bool].view(torch.int64).clone()
            v = self._views = (b[:L.o_f64].view(rows, L.F), ints[:rows * L.C].view(rows, L.C), ints[rows * L.C:],
                               b[L.o_f64:L.o_counts], b[L.o_bool:].view(torch.uint8)[:3].to(torch.bool))
        return v

    def result(self) -> StatsResult:
        """The tables as the ``cpu`` backend's fast form returns them."""
        floats, counts, numel, _, _ = self.views()
        T = self.lane.layout.T
        return StatsResult(RawStats(floats[:T], counts[:T]), numel, RawStats(floats[T:], counts[T:]))

    def get(self) -> _stats.GradStats:
        """The step's :class:`~fastgrad.stats.GradStats`, built once (as :func:`fastgrad.grad_stats`
        builds it for a list of parameters)."""
        if self._built is None:
            lane = self.lane
            self._built = _stats.build_stats(lane.names, lane.spec, self.result(), None)
        return self._built


class Layout:
    """Slot offsets of :class:`StepTables` for ``T`` tensors and a spec (see there)."""

    __slots__ = ("T", "F", "C", "o_f64", "o_counts", "o_numel", "o_bool", "size")

    def __init__(self, T: int, spec: StatsSpec) -> None:
        self.T, self.F, self.C = T, spec.num_float_cols, spec.num_count_cols
        rows = T + 1
        self.o_f64 = rows * self.F
        self.o_counts = self.o_f64 + 3
        self.o_numel = self.o_counts + rows * self.C
        self.o_bool = self.o_numel + rows
        self.size = self.o_bool + 1


class LaneResult(_ep.EpilogueResult):
    """:class:`~fastgrad.optim.epilogue.EpilogueResult` whose two small output tensors are views of
    the step's :class:`StepTables`, made when first read."""

    __slots__ = ("_tables",)

    def __init__(self, tables: StepTables, lane: Lane, grad_scale, found_inf, host_skipped) -> None:
        self._tables = tables
        self._f64 = self._flags = self._views = None
        self.has_coef, self.has_spike = lane.has_coef, lane.has_spike
        self.grad_scale, self.found_inf, self.bad, self.host_skipped = grad_scale, found_inf, lane.bad, host_skipped

    def _view(self, name: str):
        if self._f64 is None:
            _, _, _, self._f64, self._flags = self._tables.views()
        return super()._view(name)


class Lane:
    """What the lane keeps per parameter set (see the module docstring)."""

    __slots__ = ("params", "names", "names_tuple", "spec", "layout", "norms", "ints", "has_coef", "has_spike",
                 "stateless", "bad", "backoff", "wait")

    def __init__(self, params, names, spec: StatsSpec, cfg: _ep.EpilogueConfig, bad: torch.Tensor,
                 has_spike: bool, stateless: bool) -> None:
        self.params, self.names, self.names_tuple = params, names, tuple(names)
        self.spec = spec
        self.layout = L = Layout(len(params), spec)
        self.norms = list(spec.finite_norms)
        self.has_coef = cfg.kind != _ep.CLIP_NONE
        self.has_spike = has_spike
        self.stateless = stateless  # no SpikeSkip and a clipper without state tensors (GlobalNorm, none)
        self.bad = bad
        self.backoff = self.wait = 0  # steps to leave to the general path after a miss (Guard.prepare)
        self.ints = _ep.epilogue_ints(cfg, L.F, L.T, L.C)  # the C++ epilogue's ints for this layout


def eligible(guard) -> bool:
    """Whether ``guard``'s configuration lets its steps take the lane at all (fixed at wrap time;
    the per-step conditions are checked in :func:`step`)."""
    o = guard.options
    return (guard.epilogue_config is not None and not o.dist_kwargs and o.backend in (None, "auto", "cpu")
            and _grad_stats_list is not None and _step_epilogue is not None)


def build(guard, params: list, names: list[str]) -> Lane | None:
    """A lane for this parameter set, or None when the cpu backend would not serve it."""
    spec = StatsSpec((guard.norm_type,), None)
    try:
        b = dispatch.choose(_CPU, torch.float32, dispatch.requested_backend(guard.backend))
    except RuntimeError:
        return None
    if b is not _cpu.BACKEND or _ep.fused_why_not(_CPU) is not None:
        return None
    bad = guard._bad_counts(names, tuple(names), _CPU)
    has_spike = guard.spike_skip is not None
    stateless = not has_spike and not getattr(guard.clipper, "_state_keys", ())
    return Lane(params, names, spec, guard.epilogue_config, bad, has_spike, stateless)


def step(guard, param_groups: list[dict]) -> tuple[StepTables, LaneResult] | None:
    """One step's statistics and epilogue (see the module docstring), or None, having changed
    nothing, when the lane does not serve this step: the general path then takes it.

    One flat function on purpose: this runs between two optimizer steps, where every extra Python
    call costs about twice its own time (the step after it finds its caches and predictors cold)."""
    if (not guard._lane_ok or guard.epilogue_impl is not None or _compiling()
            or _optim.grad_stats is not _stats.grad_stats or (_ENV_KEY in _ENV_DATA and not env_allows())):
        return None
    index = guard.index
    index.refresh(param_groups)
    lane = guard._lane
    if lane is None or lane.names is not index.names:  # a new parameter set: plan it once
        if not index.params:
            return None
        lane = guard._lane = build(guard, index.params, index.names)
        if lane is None:
            guard._lane_ok = False
            return None
    if lane.wait:  # recent steps had gradients the lane does not take (below)
        lane.wait -= 1
        return None
    bad = guard._bad
    if bad is None or bad[2] is not lane.bad:  # the general path ran in between
        lane.bad = guard._bad_counts(lane.names, lane.names_tuple, _CPU)
        guard._bad = (lane.names, lane.names_tuple, lane.bad, _CPU)
    L = lane.layout
    buf = torch.empty(L.size, dtype=torch.float64)
    base = buf.data_ptr()
    if not _grad_stats_list([p.grad for p in lane.params], _Tensor, DTYPES_BY_CODE, _strided, lane.norms, False,
                            0, 1, base, base + L.o_counts * 8, base + L.o_numel * 8, torch.get_num_threads()):
        # a parameter without a gradient, or a view / subclass / other device (the C++ reader
        # computed nothing): the general path serves this step; retry after 1, 2, 4, ... 64
        # steps, so that a set that stays so pays the failed read rarely
        lane.backoff = min(64, 2 * lane.backoff or 1)
        lane.wait = lane.backoff
        return None
    lane.backoff = 0
    state = guard.state
    b = state.binding
    # the epilogue's fixed pointers: rebuilt (_cpu_binding) when the counters or any state
    # tensor were replaced (first step, load_state_dict, a move); without state, the counters decide
    if b is None or b[0] is not state.buffer or not lane.stateless:
        if state.buffer is None:
            state.ensure(_CPU)
        b = _ep._cpu_binding(guard.epilogue_config, guard.clipper, guard.spike_skip, state)
        if b is None:  # counters on another device: the general path moves them
            return None
    T = L.T
    host_skipped = _step_epilogue(
        [base + T * L.F * 8, base + (L.o_counts + T * L.C) * 8, base + L.o_counts * 8, lane.bad.data_ptr(), 0, 0,
         *b[2], base + L.o_f64 * 8, base + L.o_bool * 8, b[3]],
        lane.ints, b[6])
    tables = StepTables(buf, lane)
    return tables, LaneResult(tables, lane, b[4] if lane.has_coef else None, b[5], host_skipped)


# os.environ's own dict, read without the KeyError an absent key costs (~0.5 us a step); where
# os.environ has no such dict, a dict that always holds the key sends every step to env_allows
try:
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey(_ENV)  # type: ignore[attr-defined]
except AttributeError:
    _ENV_DATA, _ENV_KEY = {_ENV: None}, _ENV


def env_allows() -> bool:
    """``FASTGRAD_BACKEND`` unset, ``auto`` or ``cpu`` (read per step, as the general path does)."""
    return os.environ.get(_ENV) in (None, "", "auto", "cpu")
