"""The guard: one step's statistics, decisions and clipping, shared by :func:`fastgrad.wrap` and :func:`fastgrad.attach`.

A step goes through four stages, each one call:

1. collect: the parameters with a gradient and their names (:class:`~fastgrad.optim.names.ParamIndex`);
2. statistics: one :func:`fastgrad.grad_stats` pass (norms and non-finite counts, plus what a
   monitor asks for this step);
3. decide: the epilogue (:mod:`fastgrad.optim.epilogue`): true norm, skip flag, clip
   coefficient, clipper and spike state, counters, the folded ``grad_scale`` / ``found_inf``;
4. apply: fold into a fused optimizer (the caller hands ``grad_scale`` / ``found_inf`` to it,
   :mod:`fastgrad.optim.folding`), or scale the gradients by ``c / S`` in one pass
   (:func:`fastgrad.ops.scale_op_`), or let a per-tensor / element-wise / unit-wise clipper
   write them; then :meth:`Guard.finish` records the :class:`StepStats`.

Stages 1-3 of the common CPU step run in the lean lane (:mod:`fastgrad.optim.lane`): the same
path with everything that depends only on the parameter set planned once, two C++ calls per step,
and results built when first read.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .. import clip as _clip
from ..distributed import local_tensors
from ..ops import scale_op_
from ..stats import GradStats
from ..spec import parse_norm_type
from . import epilogue as _ep
from . import lane as _lane
from .names import ParamIndex
from .options import GuardOptions

# The statistics function is looked up on the package at call time, so that
# ``fastgrad.optim.grad_stats`` is the one seam to observe or replace it (tests count passes;
# the lean lane runs only while it is the real one).
_pkg = sys.modules[__package__]
_compiling = torch.compiler.is_compiling
_CPU = torch.device("cpu")

STATE_KEY = "fastgrad"
STATE_VERSION = 1


class StepStats:
    """What one ``step()`` saw and did. All tensors are on the gradients' device; nothing syncs
    until you read them. Read-only.

    Attributes:
        stats: the :class:`GradStats` of the gradients as the step received them, before
            clipping (times the GradScaler's scale when it had not unscaled them yet;
            ``total_norm`` below is always the true norm). Includes what a monitor asked for.
        total_norm: float64 0-d, the global ``norm_type``-norm of the true gradients before clipping.
        clip_coef: float64 0-d global coefficient (1 = not clipped), float64 ``[T]`` per-tensor
            coefficients (:class:`fastgrad.clip.PerTensorNorm`), or None (element-/unit-wise clippers,
            or no clipping).
        skipped: bool 0-d, True if the update was not applied.
        nonfinite: bool 0-d, True if some gradient held NaN or Inf.
        spike: bool 0-d from the spike detector, or None without one.
        amp_scale: the GradScaler's scale the gradients still carried (float32 0-d), or None.
        updates: the :class:`fastgrad.UpdateStats` of this step (``track_updates=True`` on a
            tracked step: every step without a monitor, the monitored ones with one), else None.
        update_norms, update_ratio: its float64 ``[T]`` ``||w_after - w_before||`` and
            ``||Δw|| / ||w_before||`` per optimizer tensor (``updates.names`` order), or None.

    The 0-d tensors are views of the fused epilogue's outputs, made when first read.
    """

    __slots__ = ("_stats", "_result", "_clip_coef", "_amp_scale", "_updates")
    _UNSET = object()

    def __init__(self, stats, result: _ep.EpilogueResult, clip_coef: Any = _UNSET, amp_scale=None,
                 updates=None) -> None:
        # ``stats`` may be the lean lane's StepTables: the GradStats is built when first read
        object.__setattr__(self, "_updates", updates)
        object.__setattr__(self, "_stats", stats)
        object.__setattr__(self, "_result", result)
        object.__setattr__(self, "_clip_coef", clip_coef)
        object.__setattr__(self, "_amp_scale", amp_scale)

    def __setattr__(self, name, value):
        raise AttributeError(f"StepStats is read-only (tried to set {name!r})")

    def __getstate__(self) -> dict[str, Any]:  # copy / pickle
        state = {k: getattr(self, k) for k in StepStats.__slots__}
        state["_stats"] = self.stats
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "_updates", None)  # states pickled before updates existed
        for k, v in state.items():
            object.__setattr__(self, k, v)

    @property
    def stats(self):
        st = self._stats
        if type(st) is _lane.StepTables:
            st = st.get()
            object.__setattr__(self, "_stats", st)
        return st

    updates = property(lambda self: self._updates)
    update_norms = property(lambda self: None if self._updates is None else self._updates.update_norms)
    update_ratio = property(lambda self: None if self._updates is None else self._updates.update_ratio)
    amp_scale = property(lambda self: self._amp_scale)
    total_norm = property(lambda self: self._result.total)
    skipped = property(lambda self: self._result.skipped)
    nonfinite = property(lambda self: self._result.nonfinite)
    spike = property(lambda self: self._result.spike)

    @property
    def clip_coef(self) -> torch.Tensor | None:
        return self._result.coef if self._clip_coef is StepStats._UNSET else self._clip_coef

    @property
    def names(self) -> tuple[str, ...]:
        return self.stats.names

    def nonfinite_names(self) -> list[str]:
        """Names of the parameters whose gradient held NaN/Inf in this step (one sync)."""
        return self.stats.nonfinite_names()

    def __repr__(self) -> str:
        return (f"StepStats(names={len(self.names)} tensors, total_norm={self.total_norm}, "
                f"clip_coef={self.clip_coef}, skipped={self.skipped}, nonfinite={self.nonfinite}, "
                f"spike={self.spike})")


class Plan:
    """One step between the statistics pass and the optimizer step."""

    __slots__ = ("params", "names", "_stats", "result", "may_skip", "amp_scale", "clip_coef", "track", "updates")

    def __init__(self, params, names, stats, result: _ep.EpilogueResult, may_skip: bool, amp_scale,
                 track: bool = False) -> None:
        self.track = track  # measure this step's update (UpdateTracker armed around the inner step)
        self.updates = None
        self.params = params
        self.names = names
        self._stats = stats  # a GradStats, or the lean lane's StepTables (built when first read)
        self.result = result
        self.may_skip = may_skip  # False: skipped is all-False by construction, never read it
        self.amp_scale = amp_scale
        self.clip_coef = StepStats._UNSET  # per-tensor coefficients replace it (PerTensorNorm)

    @property
    def stats(self):
        st = self._stats
        if type(st) is _lane.StepTables:
            st = self._stats = st.get()
        return st

    @property
    def skipped(self) -> torch.Tensor:
        return self.result.skipped

    def skipped_on_host(self) -> bool:
        """The skip decision as a Python bool: one read of the 0-d flag (on a GPU, a sync, as
        GradScaler's). The CPU epilogue also returns it (``result.host_skipped``); the scaled path
        reads the tensor all the same, so that both devices read it the one way."""
        return bool(self.result.skipped)

    def found_inf(self) -> torch.Tensor | None:
        """What a fused optimizer's ``found_inf`` should be: the device flag; or, when the decision
        is already on the host (CPU), the flag (1.0) on a skipped step and None on an applied one,
        which spares torch's fused step its ``found_inf`` bookkeeping (a ``_foreach_sub_`` over the
        step counts); None when nothing can skip."""
        if not self.may_skip:
            return None
        hs = self.result.host_skipped
        return self.result.found_inf if hs is None or hs else None

    @property
    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]


class Guard:
    """Clipping, skipping, counters and state of one wrapped or attached optimizer."""

    def __init__(self, options: GuardOptions) -> None:
        self.options = options
        self.clipper = options.clipper
        self.norm_type = options.norm_type
        self.skip_nonfinite = options.skip_nonfinite
        self.spike_skip = options.spike_skip
        self.monitor = options.monitor
        self.backend = options.backend
        self.index = ParamIndex(options.model)
        self.state = _ep.FusedState()
        self.epilogue_config = _ep.config_for(self.clipper, self.spike_skip, self.skip_nonfinite, self.norm_type)
        # None: the fused epilogue where it can run, else the reference; "reference", "cpu" or
        # "triton" force one (tests compare them)
        self.epilogue_impl: str | None = None
        self.last_stats: StepStats | None = None
        self._bad: tuple | None = None  # (name list, names, int64 [T] counts, device) of the latest step
        self._fused_ok: tuple[torch.device, bool] | None = None
        self._stats_kwargs = {"norm_types": (self.norm_type,), "histogram": False, "backend": self.backend,
                              **options.dist_kwargs}
        self.tracker = None  # UpdateTracker with track_updates=True (install_tracker)
        self._monitored = True  # whether the monitor's latest request asked for this step
        self._record_takes_updates: bool | None = None
        self._lane: _lane.Lane | None = None  # the lean lane's plan for the current parameter set
        self._lane_ok = _lane.eligible(self)

    # -- copies ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # the tracker holds closed-form functions that pickle cannot name, and its hook lives on
        # the optimizer (whose hooks torch does not pickle): rebuild it on the copy's optimizer
        state = self.__dict__.copy()
        tracker = state.pop("tracker", None)
        state["_tracker_optimizer"] = None if tracker is None else tracker.optimizer
        state["_lane"] = None  # planned again on the copy's first step
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        opt = state.pop("_tracker_optimizer", None)
        self.__dict__.update(state)
        self.tracker = None
        self._lane = None
        if "_lane_ok" not in state:  # pickled before the lane existed
            self._lane_ok = _lane.eligible(self)
        if opt is not None:
            self.install_tracker(opt)

    # -- update norms (track_updates=True) ---------------------------------------------------
    def install_tracker(self, optimizer: torch.optim.Optimizer) -> None:
        """Build the :class:`fastgrad.UpdateTracker` of ``optimizer`` (the inner one). Called by
        wrap/attach after they registered their own step hooks: hooks run in registration order,
        so the tracker's pre-hook sees the gradients and ``found_inf`` the step really gets."""
        from ..updates import UpdateTracker

        self.tracker = UpdateTracker(optimizer, model=self.options.model)

    def begin_update(self, plan: Plan | None) -> None:
        """Right before the inner ``step()`` (after clipping / hiding the gradients): arm the tracker."""
        if plan is not None and plan.track:
            # weights measured by this step's statistics pass (a monitor's params=True): their L2
            # norms are ||w_before||, so the tracker need not read the weights again
            # (a lane step's lazy tables never hold weights: the lane stands aside for params=True)
            w = plan._stats.params if isinstance(plan._stats, GradStats) else None
            if w is not None and self.norm_type == 2.0:
                self.tracker.before_step(param_norms=(plan.params, w.tensor_norms))
            else:
                self.tracker.before_step()

    def end_update(self, plan: Plan | None) -> None:
        """Right after the inner ``step()`` (or instead of it, on a skipped step: zeros)."""
        if plan is not None and plan.track:
            plan.updates = self.tracker.after_step()

    @property
    def model_names(self):
        return self.index.model_names

    # -- counters ---------------------------------------------------------------------------
    @property
    def counters(self) -> dict[str, torch.Tensor] | None:
        """int64 0-d device tensors ``steps``, ``skipped_steps``, ``nonfinite_steps``, ``spike_steps``
        (views of one buffer), or None before the first step."""
        return self.state.counters

    def ensure_counters(self, device: torch.device) -> dict[str, torch.Tensor]:
        return self.state.ensure(device)

    # -- the statistics request -------------------------------------------------------------
    def stats_kwargs(self) -> dict[str, Any]:
        """:func:`fastgrad.grad_stats` arguments: ours, merged with the monitor's request for this step."""
        req = self.monitor.stats_request() if self.monitor is not None else None
        self._monitored = self.monitor is None or req is not None
        if not req:
            return self._stats_kwargs
        if not isinstance(req, dict):
            raise TypeError(f"monitor.stats_request() must return None or a dict, got {type(req).__name__}")
        kw = dict(self._stats_kwargs)
        for k, v in req.items():
            if k == "norm_types":  # ours first: total_norm / tensor_norms report it
                extra = (v,) if isinstance(v, (int, float, str)) else tuple(v)
                kw["norm_types"] = (self.norm_type,) + tuple(
                    p for p in extra if parse_norm_type(p) != self.norm_type)
            elif k in ("histogram", "groups", "backend"):
                kw[k] = v
            elif k == "params":  # weight norms in the same launch (grad_stats(..., params=True))
                if not isinstance(v, bool):
                    raise TypeError(f"monitor.stats_request()['params'] must be a bool, got {type(v).__name__}")
                if v:
                    kw["params"] = True
            else:
                raise ValueError(
                    f"monitor.stats_request() asked for {k!r}; the optimizer integration passes only "
                    "norm_types, histogram, groups, backend and params on to grad_stats"
                )
        return kw

    # -- before the step --------------------------------------------------------------------
    def prepare(self, param_groups: list[dict], amp_scale: torch.Tensor | None,
                amp_found: torch.Tensor | None, try_lane: bool = True) -> Plan | None:
        """Statistics and decisions for this step (no host sync); None if no parameter has a gradient.

        The common CPU step takes the lean lane (:mod:`fastgrad.optim.lane`: the same data path
        with the per-parameter-set work cached); anything it does not serve, the general one.
        ``try_lane=False``: the caller just tried the lane for this step."""
        # (asks the monitor, once per step; without one, ours: _monitored stays True)
        kwargs = self._stats_kwargs if self.monitor is None else self.stats_kwargs()
        if try_lane and kwargs is self._stats_kwargs and amp_scale is None and amp_found is None:
            out = _lane.step(self, param_groups)
            if out is not None:
                lane = self._lane
                return Plan(lane.params, lane.names, out[0], out[1], self.skip_nonfinite or self.spike_skip is not None,
                            None, self.tracker is not None and self._monitored)
        params, names = self.index.with_grads(param_groups)
        if not params:
            return None
        stats = _pkg.grad_stats(params, names=names, **kwargs)
        dev = stats.raw.floats.device
        self.state.ensure(dev)
        bad = self._bad_counts(names, stats.names, dev)
        result = self._epilogue(stats, amp_scale, amp_found, bad, (params, names), dev)
        self._bad = (names, stats.names, result.bad, dev)
        may_skip = self.skip_nonfinite or self.spike_skip is not None or amp_found is not None
        # with a monitor, updates are measured on its monitored steps only (the cost is per
        # tracked step, docs/health.md); without one, on every step
        track = self.tracker is not None and self._monitored
        return Plan(params, names, stats, result, may_skip, amp_scale, track)

    @property
    def lean(self) -> bool:
        """Whether a folded step may skip the :class:`Plan` (:func:`fastgrad.optim.lane.step`, then the fused
        optimizer, then ``last_stats``): no monitor, no update tracker, a folding clipper or none."""
        return (self.monitor is None and self.tracker is None and self._lane_ok
                and (self.clipper is None or self.clipper.folds))

    def _bad_counts(self, key: list[str], names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """The per-tensor non-finite counts of the latest bad step over these names (zeros for new
        names). ``key``: the collector's name list, the same object while the parameter set stays."""
        bad = self._bad
        if bad is not None and (bad[0] is key or bad[1] == names) and bad[3] == device:
            return bad[2]
        return torch.zeros(len(names), dtype=torch.int64, device=device)

    def _use_fused(self, device: torch.device) -> bool:
        impl = self.epilogue_impl
        if self.epilogue_config is None or impl == "reference":
            return False
        if impl is not None:
            why = _ep.fused_why_not(device, impl)
            if why is not None:
                raise RuntimeError(f"fastgrad: epilogue_impl={impl!r} cannot run here: {why}")
            return True
        last = self._fused_ok
        if last is None or last[0] != device:
            last = self._fused_ok = (device, _ep.fused_why_not(device) is None)
        return last[1]

    def _epilogue(self, stats, amp_scale, amp_found, bad, items, device) -> _ep.EpilogueResult:
        if self._use_fused(device):
            return _ep.fused_epilogue(self.epilogue_config, stats, amp_scale, amp_found, clipper=self.clipper,
                                      spike_skip=self.spike_skip, state=self.state, bad=bad,
                                      impl=self.epilogue_impl)
        params, names = items
        return _ep.reference_epilogue(stats, amp_scale, amp_found, skip_nonfinite=self.skip_nonfinite,
                                      clipper=self.clipper, spike_skip=self.spike_skip,
                                      counters=self.state.counters, bad=bad,
                                      ctx_items=(params, [p.grad for p in params], names))

    def fold(self, plan: Plan) -> torch.Tensor | None:
        """The folded path: let a non-folding clipper write the gradients, then return the
        ``grad_scale`` a fused kernel should divide by (float32 0-d ``S / c``, or None when there
        is nothing to divide by)."""
        if self.write_clipped(plan):
            return None  # the AMP scale went into the clipper's pass
        return plan.result.grad_scale

    def scale(self, plan: Plan) -> None:
        """The scaling path, before the skip flag is read: ``.grad *= c / S`` in one pass
        (:func:`fastgrad.ops.scale_op_`; the factor is 1 on a skipped step, which writes nothing).
        Scaling first keeps this pass in the same compiled graph as the statistics."""
        if self.clipper is not None and not self.clipper.folds:
            return
        if plan.result.has_coef or plan.amp_scale is not None:
            scale_op_(local_tensors(plan.grads), plan.result.factor, self.backend)  # DTensor grads: own shards

    def write_clipped(self, plan: Plan) -> bool:
        """A per-tensor / element-wise / unit-wise clipper writes the gradients (AMP unscale
        included); False when the clipper folds (or there is none)."""
        if self.clipper is None or self.clipper.folds:
            return False
        res = plan.result
        dev = res.total.device
        inv = None if plan.amp_scale is None else 1.0 / plan.amp_scale.to(dev, torch.float64)
        norms = plan.stats.tensor_norms
        ctx = _clip.ClipContext(plan.params, plan.grads, plan.names, res.total,
                                norms if inv is None else norms * inv, inv, ~res.skipped & ~res.nonfinite)
        coefs = self.clipper.apply_(ctx)
        if coefs is not None:
            plan.clip_coef = coefs
        return True

    # -- after the step ---------------------------------------------------------------------
    def finish(self, plan: Plan) -> StepStats:
        record = StepStats(plan._stats, plan.result, plan.clip_coef, plan.amp_scale, plan.updates)
        self.last_stats = record
        if self.monitor is not None:
            if plan.updates is not None and self._takes_updates():
                self.monitor.record(record.stats, clip_coef=record.clip_coef, skipped=record.skipped,
                                    updates=plan.updates)
            else:
                self.monitor.record(record.stats, clip_coef=record.clip_coef, skipped=record.skipped)
        return record

    def _takes_updates(self) -> bool:
        """Whether ``monitor.record`` accepts ``updates=`` (the keyword is optional in the
        contract: monitors written before it keep working and simply do not get it)."""
        if self._record_takes_updates is None:
            import inspect

            try:
                ps = inspect.signature(self.monitor.record).parameters.values()
            except (TypeError, ValueError):
                ps = ()
            self._record_takes_updates = any(
                q.name == "updates" or q.kind is inspect.Parameter.VAR_KEYWORD for q in ps)
        return self._record_takes_updates

    def last_nonfinite_names(self) -> list[str]:
        """Names of the gradients that held NaN/Inf in the most recent step that had any (one sync)."""
        if self._bad is None:
            return []
        _, names, counts, _ = self._bad
        return [n for n, k in zip(names, counts.to("cpu").tolist()) if k]

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        counters = self.state.counters or self.state.ensure(torch.device("cpu"))
        return {
            "version": STATE_VERSION,
            "counters": {k: v.detach().clone() for k, v in counters.items()},
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "spike_skip": None if self.spike_skip is None else self.spike_skip.state_dict(),
        }

    def check_state_dict(self, sd: Any) -> None:
        """Raise ``ValueError`` if ``sd`` cannot be loaded; changes nothing."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"not a fastgrad optimizer state (version {STATE_VERSION}): {type(sd).__name__}")
        counters = sd.get("counters")
        if not isinstance(counters, dict) or not all(
                isinstance(counters.get(k), torch.Tensor) and counters[k].numel() == 1 for k in _ep.COUNTER_KEYS):
            raise ValueError(f"fastgrad optimizer state: 'counters' must hold 0-d tensors {_ep.COUNTER_KEYS}")
        saved = sd.get("clipper")
        if (saved is None) != (self.clipper is None):
            have = "no clipper" if self.clipper is None else repr(self.clipper)
            raise ValueError(f"the checkpoint was saved with clipper state {saved and saved.get('type')!r}, "
                             f"this optimizer has {have}")
        if saved is not None:
            probe = type(self.clipper).__new__(type(self.clipper))
            probe.__dict__.update(self.clipper.__dict__)
            probe.load_state_dict(saved)  # validation on a throw-away copy
        sp = sd.get("spike_skip")
        if (sp is None) != (self.spike_skip is None):
            raise ValueError("the checkpoint and this optimizer disagree on spike_skip")
        if sp is not None:
            self.spike_skip.check_state_dict(sp)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.check_state_dict(sd)
        counts = [sd["counters"][k].detach().reshape(()).to(torch.int64) for k in _ep.COUNTER_KEYS]
        self.state.set_counters(torch.stack(counts))
        if self.clipper is not None:
            self.clipper.load_state_dict(sd["clipper"])
        if self.spike_skip is not None:
            self.spike_skip.load_state_dict(sd["spike_skip"])
