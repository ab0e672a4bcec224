"""``wrap()``: a ``torch.optim.Optimizer`` that owns the step and clips and guards it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .. import clip as _clip
from . import lane as _lane
from .folding import folded_step, folds_into_kernel
from .guard import STATE_KEY, Guard, StepStats
from .options import GuardOptions
from .spike import SpikeSkip

_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled


class FastgradOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` around another one, clipping and guarding its step (see :func:`wrap`).

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, so LR
    schedulers, ``add_param_group``, ``zero_grad`` and anything that edits groups act on it.
    ``state_dict()`` is the wrapped optimizer's plus a ``"fastgrad"`` entry (clipper state,
    spike window, counters); ``load_state_dict()`` also accepts a plain torch state dict.
    Attributes not defined here are looked up on the wrapped optimizer.
    """

    # GradScaler then hands us grad_scale / found_inf instead of unscaling and reading found_inf
    # itself: we fold them into the clip (fastgrad.optim.folding).
    _step_supports_amp_scaling = True
    _fastgrad_wrapper = True

    def __init__(self, optimizer: torch.optim.Optimizer, guard: Guard) -> None:
        # Optimizer.__init__ is not called: it would build a second set of param groups.
        self.__dict__["optimizer"] = optimizer
        self._guard = guard
        self._folds = folds_into_kernel(optimizer)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(optimizer).__name__}.zero_grad"

    # -- the wrapped optimizer's containers, shared ------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails. grad_scale / found_inf are GradScaler's, set on
        # us per step: never borrow stale ones from the inner optimizer.
        if name.startswith("__") or name in ("optimizer", "_guard", "grad_scale", "found_inf"):
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        g = self._guard
        extra = [f"clipper={g.clipper!r}", f"skip_nonfinite={g.skip_nonfinite}",
                 f"path={'folded into fused step' if self._folds else 'scaling pass'}"]
        if g.spike_skip is not None:
            extra.append(f"spike_skip={g.spike_skip!r}")
        return f"fastgrad.wrap({self.optimizer!r}, {', '.join(extra)})"

    # -- what fastgrad adds ----------------------------------------------------------------
    @property
    def last_stats(self) -> StepStats | None:
        """The :class:`StepStats` of the latest ``step()`` (None before the first)."""
        return self._guard.last_stats

    @property
    def clipper(self) -> _clip.Clipper | None:
        return self._guard.clipper

    @property
    def counters(self) -> dict[str, torch.Tensor]:
        """int64 0-d device tensors: ``steps``, ``skipped_steps``, ``nonfinite_steps``, ``spike_steps``."""
        return self._guard.counters or self._guard.ensure_counters(torch.device("cpu"))

    @property
    def skipped_steps(self) -> torch.Tensor:
        """int64 0-d device tensor: steps not applied so far (no sync until read)."""
        return self.counters["skipped_steps"]

    def nonfinite_names(self) -> list[str]:
        """Parameters whose gradient held NaN/Inf in the latest step that had any (one sync)."""
        return self._guard.last_nonfinite_names()

    # -- Optimizer API -----------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``. With a model (``model=`` or a monitor's), the new parameters
        must be parameters of the model as it is now (a layer added after ``wrap`` is accepted and
        named from the model); anything else raises ``ValueError`` and changes nothing."""
        names = self._guard.model_names
        if names is not None:
            ps = param_group.get("params", [])
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            foreign = names.foreign(ps)
            if foreign:
                raise ValueError(f"add_param_group: {len(foreign)} parameters are not parameters of the "
                                 "model given to fastgrad.wrap() (its named_parameters() now); add the layer "
                                 "to the model first")
            param_group = {**param_group, "params": ps}
        self.optimizer.add_param_group(param_group)
        self._folds = folds_into_kernel(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"fastgrad"``: clipper state, spike window, counters."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd[STATE_KEY] = self._guard.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (or a plain torch one: fastgrad's state is then left as is).

        The fastgrad part is validated before anything is loaded; on error nothing changes.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        ours = state_dict.get(STATE_KEY)
        if ours is not None:
            self._guard.check_state_dict(ours)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != STATE_KEY})
        if ours is not None:
            self._guard.load_state_dict(ours)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Clip, guard and apply one step; returns ``closure()``'s value if a closure is given.

        No host sync on the folded path; at most one read of one 0-d flag otherwise. After an
        applied step ``.grad`` holds the clipped gradient (a GradScaler's scale divided out) on
        both paths; after a skipped step it is as the step received it
        (see :mod:`fastgrad.optim.folding`).
        """
        # no_grad for the whole step, set directly: the decorator form costs ~2 us a step
        # (a context object per call), a tenth of what the guard may add to a small fused step
        grad_mode = _grad_enabled()
        _set_grad_enabled(False)
        try:
            return self._step(closure)
        finally:
            _set_grad_enabled(grad_mode)

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        for hook in self._optimizer_step_pre_hooks.values():
            hook(self, (closure,), {})
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        d = self.__dict__
        amp_scale = d.get("grad_scale")  # set by GradScaler.step for this call only
        amp_found = d.get("found_inf")
        guard = self._guard
        try_lane = True
        if amp_scale is None and amp_found is None and self._folds and guard.lean:
            # the common folded step without a Plan: lane statistics + epilogue, the fused step,
            # the record (what the general path below does, less the per-step objects nobody
            # reads: fastgrad.optim.lane)
            out = _lane.step(guard, self.optimizer.param_groups)
            if out is not None:
                tables, result = out
                folded_step(self.optimizer, result.grad_scale, result.found_inf if result.host_skipped else None)
                guard.last_stats = StepStats(tables, result)
                for hook in self._optimizer_step_post_hooks.values():
                    hook(self, (closure,), {})
                return loss
            try_lane = False  # the lane declined this step: the general path, without asking again
        plan = guard.prepare(self.optimizer.param_groups, amp_scale, amp_found, try_lane)
        if plan is None:  # no gradients: nothing to clip; pass any GradScaler state through
            folded_step(self.optimizer, amp_scale if self._folds else None, amp_found if self._folds else None)
        elif self._folds:
            grad_scale = guard.fold(plan)
            guard.begin_update(plan)  # the tracker's pre-hook reads found_inf from the folded step
            folded_step(self.optimizer, grad_scale, plan.found_inf())
        else:
            guard.scale(plan)  # c / S, or 1 on a skipped step
            if not (plan.may_skip and plan.skipped_on_host()):  # the one host read, as GradScaler's
                guard.write_clipped(plan)
                guard.begin_update(plan)
                self.optimizer.step()
            else:
                guard.begin_update(plan)  # not stepped: the tracker reports zeros
        if plan is not None:
            guard.end_update(plan)
            guard.finish(plan)
        for hook in self._optimizer_step_post_hooks.values():
            hook(self, (closure,), {})
        return loss


def wrap(
    optimizer: torch.optim.Optimizer,
    *,
    max_norm: float | None = None,
    norm_type: float | str = 2.0,
    clip_value: float | None = None,
    clipper: _clip.Clipper | None = None,
    skip_nonfinite: bool = True,
    spike_skip: bool | SpikeSkip | None = None,
    model: torch.nn.Module | None = None,
    monitor: Any = None,
    backend: str | None = None,
    process_group: Any = None,
    placements: Any = None,
    track_updates: bool = False,
) -> FastgradOptimizer:
    """Return ``optimizer`` wrapped so that every ``step()`` clips and guards, without extra passes or syncs.

    Args:
        optimizer: any ``torch.optim.Optimizer`` except LBFGS (re-evaluates its closure) and
            SparseAdam (sparse gradients). torch's fused Adam / AdamW / SGD / Adagrad take the
            folded path (clip and skip inside their kernel, no host sync).
        max_norm: clip the global ``norm_type``-norm (:class:`fastgrad.clip.GlobalNorm`).
        norm_type: the p of the norms (``2.0``, ``'inf'``, ...).
        clip_value: clamp every element instead (:class:`fastgrad.clip.Value`).
        clipper: any :mod:`fastgrad.clip` clipper (AutoClip, ZClip, AGC, PerTensorNorm, ...).
            At most one of ``max_norm``, ``clip_value``, ``clipper``; none = no clipping
            (statistics and skipping only).
        skip_nonfinite: skip the step if any gradient holds NaN/Inf (counted; names via
            ``nonfinite_names()`` / ``last_stats.nonfinite_names()``).
        spike_skip: True or a :class:`SpikeSkip` to also skip steps whose norm is a z-score outlier.
        model: the module the parameters belong to, for parameter names (must contain every
            parameter of the optimizer; layers added later are named from the module as it is
            then); defaults to ``monitor.model`` when the monitor has one.
        monitor: an object with ``stats_request()`` (None or extra :func:`grad_stats` keyword
            arguments for this step, merged into the one pass) and
            ``record(stats, clip_coef=, skipped=)`` (called after each step).
        backend: the :func:`grad_stats` backend (None = automatic).
        process_group, placements: for sharded or replicated plain-tensor gradients, as in
            :func:`fastgrad.grad_stats` (DTensor gradients, e.g. FSDP2, need neither: their
            mesh is used); statistics and the clip coefficient are then global, and each
            rank scales its own shards.
        track_updates: also measure each step's update ``Δw = w_after - w_before``
            (:class:`fastgrad.UpdateTracker`): ``last_stats.updates`` (an :class:`UpdateStats`:
            per tensor, per optimizer param group and total ``||Δw||``, ``||w_before||`` and
            their ratio), ``last_stats.update_norms`` / ``update_ratio`` (float64 ``[T]``), handed
            to ``monitor.record(..., updates=)`` when it takes that keyword. With a monitor, only
            on its monitored steps; without one, on every step. Cost per tracked step (no host
            sync): derived from the optimizer's state for torch's Adam/AdamW/SGD/Adagrad/RMSprop
            (about one more read of the state and weights plus one fused norm pass), else one
            copy of the weights held over the step (docs/health.md, "Update norms").

    Each step: one statistics pass, one fused epilogue call (:mod:`fastgrad.optim.epilogue`:
    the coefficient ``c = min(max_norm / (n + 1e-6), 1)`` of the true norm ``n``, the skip
    decision, clipper and spike state, counters), then the optimizer: ``grad_scale = S / c``
    and ``found_inf`` folded into a fused kernel, or ``.grad *= c / S`` in one pass and a
    ``step()`` that a skipped step does not call. After an applied step ``.grad`` holds the
    clipped gradient (either path); after a skipped step it is left as received.

    Returns:
        A :class:`FastgradOptimizer`: a ``torch.optim.Optimizer`` sharing the wrapped optimizer's
        ``param_groups`` and ``state``; ``last_stats`` holds each step's :class:`StepStats`.

    Raises:
        TypeError / ValueError for invalid arguments; nothing is modified then.
    """
    options = GuardOptions.build(optimizer, "wrap", max_norm=max_norm, norm_type=norm_type, clip_value=clip_value,
                                 clipper=clipper, skip_nonfinite=skip_nonfinite, spike_skip=spike_skip,
                                 model=model, monitor=monitor, backend=backend, process_group=process_group,
                                 placements=placements, track_updates=track_updates)
    guard = Guard(options)
    if track_updates:
        guard.install_tracker(optimizer)
    return FastgradOptimizer(optimizer, guard)
