"""``attach()`` / ``detach()``: what :func:`fastgrad.wrap` gives, installed in place through step hooks."""

from __future__ import annotations

from typing import Any

import torch

from .. import clip as _clip
from .folding import folds_into_kernel
from .guard import STATE_KEY, Guard, Plan, StepStats
from .options import GuardOptions
from .spike import SpikeSkip


class Attachment:
    """What :func:`attach` installed on an optimizer; :meth:`detach` removes it.

    The optimizer also gets ``last_stats`` (the latest :class:`StepStats`) and
    ``fastgrad_nonfinite_names()``; its ``state_dict()`` gains a ``"fastgrad"`` entry.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, guard: Guard) -> None:
        self.optimizer = optimizer
        self.guard = guard
        self.folds = folds_into_kernel(optimizer)
        self._saved: dict[str, Any] = {}
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._plan: Plan | None = None
        self._pending_state: dict[str, Any] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
            optimizer.register_state_dict_post_hook(self._state_dict_post),
            optimizer.register_load_state_dict_pre_hook(self._load_pre),
            optimizer.register_load_state_dict_post_hook(self._load_post),
        ]
        if guard.options.track_updates:
            # after our own hooks: the tracker's pre-hook then sees the gradients (hidden on a
            # skipped step) and the found_inf our pre-hook set
            guard.install_tracker(optimizer)
        optimizer._fastgrad_attachment = self  # type: ignore[attr-defined]
        optimizer.last_stats = None  # type: ignore[attr-defined]
        optimizer.fastgrad_nonfinite_names = guard.last_nonfinite_names  # type: ignore[attr-defined]

    @property
    def last_stats(self) -> StepStats | None:
        return self.guard.last_stats

    @property
    def counters(self) -> dict[str, torch.Tensor]:
        return self.guard.counters or self.guard.ensure_counters(torch.device("cpu"))

    def detach(self) -> None:
        detach(self.optimizer)

    # -- hooks ----------------------------------------------------------------------------------
    def _pre(self, opt, args, kwargs):
        # args holds the optimizer itself first (torch's profile_hook_step passes them through)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is not None:
            raise RuntimeError(
                "fastgrad.attach() cannot clip a step driven by a closure (the gradients are made inside "
                "step()); use fastgrad.wrap(), which evaluates the closure first"
            )
        self.folds = folds_into_kernel(opt)
        d = opt.__dict__
        amp_scale, amp_found = d.get("grad_scale"), d.get("found_inf")
        with torch.no_grad():
            plan = self.guard.prepare(opt.param_groups, amp_scale if self.folds else None, amp_found)
            self._plan = plan
            if plan is None:
                return
            if self.folds:
                self._saved = {k: d[k] for k in ("grad_scale", "found_inf") if k in d}
                grad_scale = self.guard.fold(plan)
                d.pop("grad_scale", None)
                if grad_scale is not None:
                    opt.grad_scale = grad_scale
                found_inf = plan.found_inf()
                if found_inf is not None:
                    opt.found_inf = found_inf
                self.guard.begin_update(plan)
                return
            self.guard.scale(plan)  # c / S, or 1 on a skipped step
            if plan.may_skip and plan.skipped_on_host():  # the one host read
                # a hook cannot cancel step(): hide the gradients instead. torch's optimizers
                # leave parameters without .grad (and their state and step counts) untouched.
                self._hidden = [(p, p.grad) for p in plan.params]
                for p in plan.params:
                    p.grad = None
            else:
                self.guard.write_clipped(plan)
            self.guard.begin_update(plan)
        return

    def _post(self, opt, args, kwargs) -> None:
        d = opt.__dict__
        if self.folds and self._plan is not None:
            d.pop("grad_scale", None)
            d.pop("found_inf", None)
            d.update(self._saved)  # GradScaler deletes its own attributes after step()
            self._saved = {}
        self.guard.end_update(self._plan)  # before the gradients come back
        for p, g in self._hidden:
            p.grad = g
        self._hidden = []
        if self._plan is not None:
            opt.last_stats = self.guard.finish(self._plan)
        self._plan = None

    def _state_dict_post(self, opt, state_dict):
        state_dict[STATE_KEY] = self.guard.state_dict()
        return state_dict

    def _load_pre(self, opt, state_dict):
        ours = state_dict.get(STATE_KEY)
        if ours is None:
            return None
        self.guard.check_state_dict(ours)  # raises before torch loads anything
        self._pending_state = ours
        return {k: v for k, v in state_dict.items() if k != STATE_KEY}

    def _load_post(self, opt) -> None:
        if self._pending_state is not None:
            self.guard.load_state_dict(self._pending_state)
            self._pending_state = None


def attach(
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
) -> Attachment:
    """Give ``optimizer`` what :func:`wrap` gives, in place, through step pre/post hooks.

    Same arguments and behaviour as :func:`wrap` (one :class:`GuardOptions`), for code that
    cannot replace the optimizer object. ``optimizer.last_stats`` then holds each step's
    :class:`StepStats`, and its ``state_dict()`` carries fastgrad's state. Differences: a step
    with a closure raises (the closure would make the gradients after the hook ran), and a
    skipped step on the scaled path runs ``step()`` with the gradients hidden (``.grad = None``
    for its duration, restored after), which torch's optimizers treat as "no update" for every
    parameter. ``.grad`` afterwards: as with :func:`wrap`. ``track_updates=True``: as with
    :func:`wrap` (the tracker's hook is registered after attach's own). Undo with :func:`detach`.
    """
    options = GuardOptions.build(optimizer, "attach", max_norm=max_norm, norm_type=norm_type,
                                 clip_value=clip_value, clipper=clipper, skip_nonfinite=skip_nonfinite,
                                 spike_skip=spike_skip, model=model, monitor=monitor, backend=backend,
                                 process_group=process_group, placements=placements,
                                 track_updates=track_updates)
    return Attachment(optimizer, Guard(options))


def detach(optimizer: torch.optim.Optimizer | Attachment) -> None:
    """Remove what :func:`attach` installed; the optimizer behaves as before (its state is kept)."""
    if isinstance(optimizer, Attachment):
        optimizer = optimizer.optimizer
    att = getattr(optimizer, "_fastgrad_attachment", None)
    if att is None:
        raise ValueError("detach(): fastgrad is not attached to this optimizer (wrap() results need no "
                         "detach: keep using the inner optimizer, `.optimizer`)")
    for h in att._handles:
        h.remove()
    if att.guard.tracker is not None:
        att.guard.tracker.remove()
    for k in ("_fastgrad_attachment", "last_stats", "fastgrad_nonfinite_names"):
        optimizer.__dict__.pop(k, None)
