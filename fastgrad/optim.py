"""Drop-in optimizer integration: clipping folded into the step, sync-free skip of bad steps.

One line changes, everything else (LR schedulers, GradScaler, checkpoints,
trainers) stays::

    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True),
                        max_norm=1.0, model=model)

Each ``step()``:

1. reads every gradient once (:func:`fastgrad.grad_stats`: global and
   per-tensor norms, non-finite counts; extra statistics when a monitor asks),
2. computes the clip coefficient on the device (:mod:`fastgrad.clip`),
3. decides on the device whether to skip the step (non-finite gradients, a
   GradScaler's ``found_inf``, an optional norm spike),
4. applies both without an extra pass where the optimizer allows it.

Two paths, chosen per optimizer:

**Folded** (torch's fused Adam, AdamW, SGD, Adagrad: ``fused=True``). These
honour the GradScaler protocol: before the kernel runs they read
``optimizer.grad_scale`` (each gradient is divided by it inside the fused
update) and ``optimizer.found_inf`` (1.0 skips the whole update on the
device, and the step counts are incremented then decremented by it). A
global clip coefficient ``c`` rides on the first::

    grad_scale = S / c        (S = the GradScaler's scale if it has not unscaled, else 1)
    found_inf  = 1.0 if (non-finite | GradScaler found_inf | spike) else 0.0

so clipping and skipping cost no pass over the gradients and no host read.
``.grad`` keeps its unclipped values; the update sees ``g / S * c``.

**Scaled** (every other optimizer, and per-tensor / element-wise / unit-wise
clippers): one fused multiply by ``c / S`` (:func:`fastgrad.dispatch.scale_`,
which writes nothing when that is exactly 1), then ``step()``. Skipping needs
the decision on the host: at most one read of one 0-d flag per step, as
GradScaler does, and none at all when nothing can cause a skip
(``skip_nonfinite=False``, no GradScaler, no spike detection). A skipped step
calls nothing: parameters, optimizer state and step counts are unchanged.
Per-tensor clippers with a fused optimizer write the gradients and still skip
through ``found_inf``.

With a GradScaler (``torch.amp.GradScaler``, CUDA or CPU): the wrapper
declares ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` hands it
``grad_scale = S`` and ``found_inf`` instead of unscaling the gradients
itself (when ``scaler.unscale_(opt)`` ran first, ``grad_scale`` is None and
the gradients are already true). Norms are divided by ``S`` before
clipping, so thresholds apply to true gradients, as in the documented
``unscale_`` + ``clip_grad_norm_`` + ``step`` recipe; ``scaler.update()``
still sees only its own ``found_inf`` (spike skips do not shrink the scale).

After each step ``optimizer.last_stats`` is a :class:`StepStats` of device
tensors; reading them is the caller's choice of when to synchronise.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import clip as _clip
from .dispatch import scale_
from .spec import parse_norm_type
from .distributed import local_tensors
from .stats import GradStats, grad_stats

__all__ = ["FastgradOptimizer", "SpikeSkip", "StepStats", "attach", "detach", "wrap"]

_STATE_KEY = "fastgrad"
_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# What a step reports
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepStats:
    """What one ``step()`` saw and did. All tensors are on the gradients' device; nothing syncs
    until you read them.

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
    """

    stats: GradStats
    total_norm: torch.Tensor
    clip_coef: torch.Tensor | None
    skipped: torch.Tensor
    nonfinite: torch.Tensor
    spike: torch.Tensor | None
    amp_scale: torch.Tensor | None

    @property
    def names(self) -> tuple[str, ...]:
        return self.stats.names

    def nonfinite_names(self) -> list[str]:
        """Names of the parameters whose gradient held NaN/Inf in this step (one sync)."""
        return self.stats.nonfinite_names()


# ----------------------------------------------------------------------------------------------
# Spike detection
# ----------------------------------------------------------------------------------------------


class SpikeSkip:
    """Skip a step whose global norm is a z-score outlier against a running window (OLMo-core's rule).

    With the previous (up to) ``window`` finite norms ``h``: once at least
    ``max(2, window // 2)`` norms including this one are known, the step is skipped if
    ``n - mean(h) > sigma * std(h)`` (``std`` unbiased, as ``torch.std``). The window is a
    float64 device ring buffer; the decision is a 0-d tensor, never read on the host here.
    Every finite norm enters the window, skipped or not, so a lasting change of level is
    accepted after a while.
    """

    def __init__(self, sigma: float = 6.0, window: int = 128) -> None:
        s = float(sigma)
        if math.isnan(s) or s <= 0:
            raise ValueError(f"SpikeSkip: sigma must be > 0, got {sigma!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"SpikeSkip: window must be an int >= 2, got {window!r}")
        self.sigma = s
        self.window = window
        self.buffer: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None

    def _ensure(self, device: torch.device) -> None:
        if self.buffer is None:
            self.buffer = torch.zeros(self.window, dtype=torch.float64, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
            self.pos = torch.zeros((), dtype=torch.int64, device=device)
        elif self.buffer.device != device:
            self.buffer, self.count, self.pos = (t.to(device) for t in (self.buffer, self.count, self.pos))

    def check(self, norm: torch.Tensor) -> torch.Tensor:
        """bool 0-d: is ``norm`` (float64 0-d) a spike against the window?"""
        self._ensure(norm.device)
        valid = torch.arange(self.window, device=norm.device) < self.count
        n = self.count.to(torch.float64)
        mean = torch.where(valid, self.buffer, 0.0).sum() / n.clamp(min=1)
        var = torch.where(valid, (self.buffer - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
        active = (self.count + 1 >= max(2, self.window // 2)) & (self.count >= 2)
        return active & ((norm - mean) > self.sigma * var.sqrt())

    def update(self, norm: torch.Tensor, ok: torch.Tensor) -> None:
        """Append ``norm`` to the window where ``ok`` (bool 0-d)."""
        self._ensure(norm.device)
        slot = torch.arange(self.window, device=norm.device) == self.pos
        self.buffer = torch.where(slot & ok, norm, self.buffer)
        step = ok.to(torch.int64)
        self.count = torch.clamp(self.count + step, max=self.window)
        self.pos = (self.pos + step) % self.window

    def state_dict(self) -> dict[str, Any]:
        self._ensure(torch.device("cpu"))
        return {"sigma": self.sigma, "window": self.window, "buffer": self.buffer.clone(),
                "count": self.count.clone(), "pos": self.pos.clone()}

    def check_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("window") != self.window or sd.get("sigma") != self.sigma:
            raise ValueError(
                f"SpikeSkip: saved window/sigma {sd.get('window')}/{sd.get('sigma')} differ from "
                f"{self.window}/{self.sigma}"
            )

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.check_state_dict(sd)
        self.buffer, self.count, self.pos = (sd[k].clone() for k in ("buffer", "count", "pos"))

    def __repr__(self) -> str:
        return f"SpikeSkip(sigma={self.sigma}, window={self.window})"


# ----------------------------------------------------------------------------------------------
# The shared engine of wrap() and attach()
# ----------------------------------------------------------------------------------------------


def _folds_into_kernel(opt: torch.optim.Optimizer) -> bool:
    """True for optimizers whose step reads ``grad_scale`` / ``found_inf`` (torch's fused ones)."""
    if not getattr(opt, "_step_supports_amp_scaling", False):
        return False
    fused = opt.defaults.get("fused") and all(g.get("fused", True) for g in opt.param_groups)
    # torch's own fused optimizers are the ones known to read the attributes and to undo
    # their step counts by found_inf; a custom optimizer that merely declares the flag may
    # expect the older ``grad_scaler=`` keyword instead.
    return bool(fused) and type(opt).__module__.startswith("torch.optim")


@dataclass
class _Plan:
    """One step's decisions, between the statistics pass and the optimizer step."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    record: StepStats
    global_coef: torch.Tensor | None  # folded/applied by the caller (folding clippers only)
    skip: torch.Tensor  # bool 0-d
    may_skip: bool  # False: skip is all-False by construction, never read it
    inv_scale: torch.Tensor | None  # float64 0-d 1/S while the gradients carry a GradScaler's scale
    tensor_norms: torch.Tensor  # float64 [T], true gradients
    update: torch.Tensor  # bool 0-d: applied and finite, stateful clippers advance


class _Guard:
    """Clipping, skipping, counters and state shared by :class:`FastgradOptimizer` and :func:`attach`."""

    def __init__(self, *, clipper: _clip.Clipper | None, norm_type: float, skip_nonfinite: bool,
                 spike_skip: SpikeSkip | None, model_names: dict[int, str] | None, monitor: Any,
                 backend: str | None, dist_kwargs: dict[str, Any] | None = None) -> None:
        self.clipper = clipper
        self.dist_kwargs = dist_kwargs or {}  # process_group / placements for grad_stats
        self.norm_type = norm_type
        self.skip_nonfinite = skip_nonfinite
        self.spike_skip = spike_skip
        self.model_names = model_names
        self.monitor = monitor
        self.backend = backend
        self.counters: dict[str, torch.Tensor] | None = None
        self.last_stats: StepStats | None = None
        self._bad: tuple[tuple[str, ...], torch.Tensor] | None = None
        self._cache_key: tuple | None = None
        self._all_params: list[torch.Tensor] = []
        self._all_names: list[str] = []

    # -- names ------------------------------------------------------------------------------
    def _refresh(self, param_groups: list[dict]) -> None:
        key = (id(param_groups), tuple((id(g["params"]), len(g["params"])) for g in param_groups))
        if key == self._cache_key:
            return
        params, names = [], []
        for gi, g in enumerate(param_groups):
            given = g.get("param_names")
            for pi, p in enumerate(g["params"]):
                params.append(p)
                if self.model_names is not None and id(p) in self.model_names:
                    names.append(self.model_names[id(p)])
                elif given is not None and pi < len(given):
                    names.append(str(given[pi]))
                else:
                    names.append(f"param_groups[{gi}][{pi}]")
        self._all_params, self._all_names, self._cache_key = params, names, key

    def with_grads(self, param_groups: list[dict]) -> tuple[list[torch.Tensor], list[str]]:
        self._refresh(param_groups)
        ps = self._all_params
        if all(p.grad is not None for p in ps):
            return ps, self._all_names
        keep = [i for i, p in enumerate(ps) if p.grad is not None]
        return [ps[i] for i in keep], [self._all_names[i] for i in keep]

    # -- counters ---------------------------------------------------------------------------
    def _ensure_counters(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self.counters is None:
            self.counters = {k: torch.zeros((), dtype=torch.int64, device=device)
                             for k in ("steps", "skipped_steps", "nonfinite_steps", "spike_steps")}
        elif self.counters["steps"].device != device:
            self.counters = {k: v.to(device) for k, v in self.counters.items()}
        return self.counters

    # -- the statistics request -------------------------------------------------------------
    def _stats_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"norm_types": (self.norm_type,), "histogram": False, "backend": self.backend,
                              **self.dist_kwargs}
        req = self.monitor.stats_request() if self.monitor is not None else None
        if not req:
            return kw
        if not isinstance(req, dict):
            raise TypeError(f"monitor.stats_request() must return None or a dict, got {type(req).__name__}")
        for k, v in req.items():
            if k == "norm_types":  # ours first: total_norm / tensor_norms report it
                extra = (v,) if isinstance(v, (int, float, str)) else tuple(v)
                kw["norm_types"] = (self.norm_type,) + tuple(
                    p for p in extra if parse_norm_type(p) != self.norm_type)
            elif k in ("histogram", "groups", "backend"):
                kw[k] = v
            else:
                raise ValueError(
                    f"monitor.stats_request() asked for {k!r}; the optimizer integration passes only "
                    "norm_types, histogram, groups and backend on to grad_stats"
                )
        return kw

    # -- before the step --------------------------------------------------------------------
    def prepare(self, param_groups: list[dict], amp_scale: torch.Tensor | None,
                amp_found: torch.Tensor | None, folds: bool) -> _Plan | None:
        """Statistics, coefficient and skip decision for this step (no host sync); None if no grads."""
        params, names = self.with_grads(param_groups)
        if not params:
            return None
        grads = [p.grad for p in params]
        stats = grad_stats(params, names=names, **self._stats_kwargs())
        dev = stats.raw.floats.device
        c = self._ensure_counters(dev)

        inv_scale = None if amp_scale is None else 1.0 / amp_scale.to(dev, torch.float64)
        total = stats.total_norm if inv_scale is None else stats.total_norm * inv_scale
        tensor_norms = stats.tensor_norms if inv_scale is None else stats.tensor_norms * inv_scale
        nonfinite = ~total.isfinite()

        skip = torch.zeros((), dtype=torch.bool, device=dev)
        may_skip = False
        if self.skip_nonfinite:
            skip = skip | nonfinite
            may_skip = True
        if amp_found is not None:
            skip = skip | (amp_found.to(dev) > 0)
            may_skip = True
        spike = None
        if self.spike_skip is not None:
            spike = self.spike_skip.check(total) & ~nonfinite
            self.spike_skip.update(total, ~nonfinite)
            skip = skip | spike
            may_skip = True

        update = ~skip & ~nonfinite  # stateful clippers advance on applied, finite steps only
        global_coef = None
        if self.clipper is not None and self.clipper.folds:
            ctx = _clip.ClipContext(params, grads, names, total, tensor_norms, inv_scale, update)
            global_coef = self.clipper.coefficient(ctx)

        c["steps"] += 1
        c["skipped_steps"] += skip
        c["nonfinite_steps"] += nonfinite
        if spike is not None:
            c["spike_steps"] += spike
        # names of the last step with non-finite gradients, kept on the device (no sync)
        bad_now = stats.nonfinite_count
        if self._bad is not None and self._bad[0] == stats.names:
            self._bad = (stats.names, torch.where(nonfinite, bad_now, self._bad[1]))
        else:
            self._bad = (stats.names, torch.where(nonfinite, bad_now, 0))

        record = StepStats(stats, total, global_coef, skip, nonfinite, spike, amp_scale)
        return _Plan(params, grads, record, global_coef, skip, may_skip, inv_scale, tensor_norms, update)

    def apply_clip(self, plan: _Plan, *, fold: bool) -> torch.Tensor | None:
        """Write what cannot be folded; return the ``grad_scale`` a fused kernel should divide by.

        ``fold=True``: a folding clipper's ``c`` and the AMP scale go into the returned
        float32 0-d ``S / c`` (or None if there is nothing to divide by). Otherwise the
        gradients are scaled here (``c / S`` in one pass, or the clipper's own pass).
        """
        inv = plan.inv_scale
        rec = plan.record
        if self.clipper is not None and not self.clipper.folds:
            ctx = _clip.ClipContext(plan.params, plan.grads, rec.names, rec.total_norm,
                                    plan.tensor_norms, inv, plan.update)
            coefs = self.clipper.apply_(ctx)
            if coefs is not None:
                object.__setattr__(rec, "clip_coef", coefs)
            return None  # the AMP scale went into the clipper's pass
        coef = plan.global_coef
        if fold:
            if coef is None:
                return None if rec.amp_scale is None else rec.amp_scale.to(torch.float32)
            s = 1.0 if rec.amp_scale is None else rec.amp_scale.to(coef.device, torch.float64)
            return (s / coef).to(torch.float32)  # the fused kernels read grad_scale as float32
        factor = coef if inv is None else (inv if coef is None else coef * inv)
        if factor is not None:
            scale_(local_tensors(plan.grads), factor, self.backend)  # DTensor grads: scale own shards
        return None

    # -- after the step ---------------------------------------------------------------------
    def finish(self, plan: _Plan) -> None:
        self.last_stats = plan.record
        if self.monitor is not None:
            self.monitor.record(plan.record.stats, clip_coef=plan.record.clip_coef, skipped=plan.skip)

    def last_nonfinite_names(self) -> list[str]:
        """Names of the gradients that held NaN/Inf in the most recent step that had any (one sync)."""
        if self._bad is None:
            return []
        names, counts = self._bad
        return [n for n, k in zip(names, counts.to("cpu").tolist()) if k]

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        counters = self.counters or self._ensure_counters(torch.device("cpu"))
        return {
            "version": _STATE_VERSION,
            "counters": {k: v.detach().clone() for k, v in counters.items()},
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "spike_skip": None if self.spike_skip is None else self.spike_skip.state_dict(),
        }

    def check_state_dict(self, sd: Any) -> None:
        """Raise ``ValueError`` if ``sd`` cannot be loaded; changes nothing."""
        if not isinstance(sd, dict) or sd.get("version") != _STATE_VERSION:
            raise ValueError(f"not a fastgrad optimizer state (version {_STATE_VERSION}): {type(sd).__name__}")
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
        self.counters = {k: v.detach().clone() for k, v in sd["counters"].items()}
        if self.clipper is not None:
            self.clipper.load_state_dict(sd["clipper"])
        if self.spike_skip is not None:
            self.spike_skip.load_state_dict(sd["spike_skip"])


def _build_guard(optimizer: Any, *, max_norm, norm_type, clip_value, clipper, skip_nonfinite, spike_skip,
                 model, monitor, backend, what: str, process_group=None, placements=None) -> _Guard:
    """Validate every argument (raising before anything is touched) and build the engine."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{what}() takes a torch.optim.Optimizer, got {type(optimizer).__name__}; build the optimizer "
            f"first, e.g. {what}(torch.optim.AdamW(model.parameters()), max_norm=1.0)"
        )
    if isinstance(optimizer, FastgradOptimizer) or hasattr(optimizer, "_fastgrad_attachment"):
        raise ValueError(f"{what}(): this optimizer is already wrapped or attached by fastgrad")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError(
            f"{what}(): LBFGS re-evaluates its closure inside step(), so gradients cannot be clipped "
            "once before it; clip inside the closure instead (fastgrad.clip_grad_norm_)"
        )
    given = [n for n, v in (("max_norm", max_norm), ("clip_value", clip_value), ("clipper", clipper))
             if v is not None]
    if len(given) > 1:
        raise ValueError(
            f"{what}(): pass only one of max_norm, clip_value and clipper (got {', '.join(given)}): "
            "max_norm is clip.GlobalNorm(max_norm) and clip_value is clip.Value(clip_value); "
            "clamping elements and clipping the norm in one step is not offered"
        )
    p = parse_norm_type(norm_type)
    if max_norm is not None:
        clipper = _clip.GlobalNorm(max_norm)  # raises on negative / NaN
    elif clip_value is not None:
        clipper = _clip.Value(clip_value)
    elif not isinstance(clipper, (_clip.Clipper, type(None))):
        raise TypeError(f"clipper must be a fastgrad.clip.Clipper (e.g. clip.AutoClip()), got "
                        f"{type(clipper).__name__}")
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
    if spike_skip is True:
        spike_skip = SpikeSkip()
    elif spike_skip is False:
        spike_skip = None
    elif spike_skip is not None and not isinstance(spike_skip, SpikeSkip):
        raise TypeError(f"spike_skip must be a bool or a fastgrad.optim.SpikeSkip, got {type(spike_skip).__name__}")
    if monitor is not None and not (callable(getattr(monitor, "stats_request", None))
                                    and callable(getattr(monitor, "record", None))):
        raise TypeError("monitor must have stats_request() and record(stats, clip_coef=..., skipped=...) methods "
                        f"(e.g. fastgrad.GradMonitor), got {type(monitor).__name__}")
    model_names = None
    if model is None and isinstance(getattr(monitor, "model", None), torch.nn.Module):
        # a GradMonitor knows the module: use its names (layers, not [i]) if it holds every parameter
        known = {id(q) for q in monitor.model.parameters()}
        if all(id(q) in known for g in optimizer.param_groups for q in g["params"]):
            model = monitor.model
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model_names = {id(q): n for n, q in model.named_parameters()}
        opt_params = [q for g in optimizer.param_groups for q in g["params"]]
        foreign = [i for i, q in enumerate(opt_params) if id(q) not in model_names]
        if foreign:
            raise ValueError(
                f"{len(foreign)} of the optimizer's {len(opt_params)} parameters are not parameters of "
                f"model (first at flat index {foreign[0]}, shape {tuple(opt_params[foreign[0]].shape)}); "
                "pass the module the optimizer was built from, or model=None"
            )
    return _Guard(clipper=clipper, norm_type=p, skip_nonfinite=skip_nonfinite, spike_skip=spike_skip,
                  model_names=model_names, monitor=monitor, backend=backend,
                  dist_kwargs={k: v for k, v in (("process_group", process_group), ("placements", placements))
                               if v is not None})


# ----------------------------------------------------------------------------------------------
# wrap(): an Optimizer that owns the step
# ----------------------------------------------------------------------------------------------


class FastgradOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` around another one, clipping and guarding its step (see :func:`wrap`).

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, so LR
    schedulers, ``add_param_group``, ``zero_grad`` and anything that edits groups act on it.
    ``state_dict()`` is the wrapped optimizer's plus a ``"fastgrad"`` entry (clipper state,
    spike window, counters); ``load_state_dict()`` also accepts a plain torch state dict.
    Attributes not defined here are looked up on the wrapped optimizer.
    """

    # GradScaler then hands us grad_scale / found_inf instead of unscaling and reading found_inf
    # itself: we fold them into the clip (see the module docstring).
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, guard: _Guard) -> None:
        # Optimizer.__init__ is not called: it would build a second set of param groups.
        self.__dict__["optimizer"] = optimizer
        self._guard = guard
        self._folds = _folds_into_kernel(optimizer)
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
        return self._guard.counters or self._guard._ensure_counters(torch.device("cpu"))

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
        names = self._guard.model_names
        if names is not None:
            ps = param_group.get("params", [])
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            foreign = [q for q in ps if id(q) not in names]
            if foreign:
                raise ValueError(f"add_param_group: {len(foreign)} parameters are not parameters of the "
                                 "model given to fastgrad.wrap()")
            param_group = {**param_group, "params": ps}
        self.optimizer.add_param_group(param_group)
        self._folds = _folds_into_kernel(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"fastgrad"``: clipper state, spike window, counters."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd[_STATE_KEY] = self._guard.state_dict()
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
        ours = state_dict.get(_STATE_KEY)
        if ours is not None:
            self._guard.check_state_dict(ours)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != _STATE_KEY})
        if ours is not None:
            self._guard.load_state_dict(ours)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Clip, guard and apply one step; returns ``closure()``'s value if a closure is given.

        No host sync on the folded path; at most one read of one 0-d flag otherwise.
        """
        for hook in self._optimizer_step_pre_hooks.values():
            hook(self, (closure,), {})
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inner = self.optimizer
        amp_scale = self.__dict__.get("grad_scale")  # set by GradScaler.step for this call only
        amp_found = self.__dict__.get("found_inf")
        plan = self._guard.prepare(self.param_groups, amp_scale, amp_found, self._folds)
        if plan is None:  # no gradients: nothing to clip; pass any GradScaler state through
            self._inner_step(amp_scale if self._folds else None, amp_found if self._folds else None)
        elif self._folds:
            grad_scale = self._guard.apply_clip(plan, fold=True)
            found = plan.skip.to(torch.float32) if plan.may_skip else None
            self._inner_step(grad_scale, found)
        elif not (plan.may_skip and bool(plan.skip)):  # the one host read, as GradScaler's
            self._guard.apply_clip(plan, fold=False)
            inner.step()
        if plan is not None:
            self._guard.finish(plan)
        for hook in self._optimizer_step_post_hooks.values():
            hook(self, (closure,), {})
        return loss

    def _inner_step(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        inner = self.optimizer
        if grad_scale is not None:
            inner.grad_scale = grad_scale
        if found_inf is not None:
            inner.found_inf = found_inf
        try:
            inner.step()
        finally:
            inner.__dict__.pop("grad_scale", None)
            inner.__dict__.pop("found_inf", None)


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
) -> FastgradOptimizer:
    """Return ``optimizer`` wrapped so that every ``step()`` clips and guards, without extra passes or syncs.

    Args:
        optimizer: any ``torch.optim.Optimizer`` except LBFGS. torch's fused Adam / AdamW / SGD /
            Adagrad take the folded path (clip and skip inside their kernel, no host sync).
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
            parameter of the optimizer); defaults to ``monitor.model`` when the monitor has one.
        monitor: an object with ``stats_request()`` (None or extra :func:`grad_stats` keyword
            arguments for this step, merged into the one pass) and
            ``record(stats, clip_coef=, skipped=)`` (called after each step).
        backend: the :func:`grad_stats` backend (None = automatic).
        process_group, placements: for sharded or replicated plain-tensor gradients, as in
            :func:`fastgrad.grad_stats` (DTensor gradients, e.g. FSDP2, need neither: their
            mesh is used); statistics and the clip coefficient are then global, and each
            rank scales its own shards.

    Returns:
        A :class:`FastgradOptimizer`: a ``torch.optim.Optimizer`` sharing the wrapped optimizer's
        ``param_groups`` and ``state``; ``last_stats`` holds each step's :class:`StepStats`.

    Raises:
        TypeError / ValueError for invalid arguments; nothing is modified then.
    """
    guard = _build_guard(optimizer, max_norm=max_norm, norm_type=norm_type, clip_value=clip_value,
                         clipper=clipper, skip_nonfinite=skip_nonfinite, spike_skip=spike_skip, model=model,
                         monitor=monitor, backend=backend, what="wrap", process_group=process_group,
                         placements=placements)
    return FastgradOptimizer(optimizer, guard)


# ----------------------------------------------------------------------------------------------
# attach(): the same through step hooks, for code that cannot replace the optimizer object
# ----------------------------------------------------------------------------------------------


class Attachment:
    """What :func:`attach` installed on an optimizer; :meth:`detach` removes it.

    The optimizer also gets ``last_stats`` (the latest :class:`StepStats`) and
    ``fastgrad_nonfinite_names()``; its ``state_dict()`` gains a ``"fastgrad"`` entry.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, guard: _Guard) -> None:
        self.optimizer = optimizer
        self.guard = guard
        self.folds = _folds_into_kernel(optimizer)
        self._saved: dict[str, Any] = {}
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._plan: _Plan | None = None
        self._pending_state: dict[str, Any] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
            optimizer.register_state_dict_post_hook(self._state_dict_post),
            optimizer.register_load_state_dict_pre_hook(self._load_pre),
            optimizer.register_load_state_dict_post_hook(self._load_post),
        ]
        optimizer._fastgrad_attachment = self  # type: ignore[attr-defined]
        optimizer.last_stats = None  # type: ignore[attr-defined]
        optimizer.fastgrad_nonfinite_names = guard.last_nonfinite_names  # type: ignore[attr-defined]

    @property
    def last_stats(self) -> StepStats | None:
        return self.guard.last_stats

    @property
    def counters(self) -> dict[str, torch.Tensor]:
        return self.guard.counters or self.guard._ensure_counters(torch.device("cpu"))

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
        self.folds = _folds_into_kernel(opt)
        d = opt.__dict__
        amp_scale, amp_found = d.get("grad_scale"), d.get("found_inf")
        with torch.no_grad():
            plan = self.guard.prepare(opt.param_groups, amp_scale if self.folds else None, amp_found,
                                      self.folds)
            self._plan = plan
            if plan is None:
                return
            if self.folds:
                self._saved = {k: d[k] for k in ("grad_scale", "found_inf") if k in d}
                grad_scale = self.guard.apply_clip(plan, fold=True)
                d.pop("grad_scale", None)
                if grad_scale is not None:
                    opt.grad_scale = grad_scale
                if plan.may_skip:
                    opt.found_inf = plan.skip.to(torch.float32)
            elif plan.may_skip and bool(plan.skip):  # the one host read
                # a hook cannot cancel step(): hide the gradients instead. torch's optimizers
                # leave parameters without .grad (and their state and step counts) untouched.
                self._hidden = [(p, p.grad) for p in plan.params]
                for p in plan.params:
                    p.grad = None
            else:
                self.guard.apply_clip(plan, fold=False)
        return

    def _post(self, opt, args, kwargs) -> None:
        d = opt.__dict__
        if self.folds and self._plan is not None:
            d.pop("grad_scale", None)
            d.pop("found_inf", None)
            d.update(self._saved)  # GradScaler deletes its own attributes after step()
            self._saved = {}
        for p, g in self._hidden:
            p.grad = g
        self._hidden = []
        if self._plan is not None:
            self.guard.finish(self._plan)
            opt.last_stats = self.guard.last_stats
        self._plan = None

    def _state_dict_post(self, opt, state_dict):
        state_dict[_STATE_KEY] = self.guard.state_dict()
        return state_dict

    def _load_pre(self, opt, state_dict):
        ours = state_dict.get(_STATE_KEY)
        if ours is None:
            return None
        self.guard.check_state_dict(ours)  # raises before torch loads anything
        self._pending_state = ours
        return {k: v for k, v in state_dict.items() if k != _STATE_KEY}

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
) -> Attachment:
    """Give ``optimizer`` what :func:`wrap` gives, in place, through step pre/post hooks.

    Same arguments and behaviour as :func:`wrap`, for code that cannot replace the optimizer
    object. ``optimizer.last_stats`` then holds each step's :class:`StepStats`, and its
    ``state_dict()`` carries fastgrad's state. Differences: a step with a closure raises
    (the closure would make the gradients after the hook ran), and a skipped step on the
    scaled path runs ``step()`` with the gradients hidden (``.grad = None`` for its
    duration, restored after), which torch's optimizers treat as "no update" for every
    parameter. Undo with :func:`detach`.
    """
    guard = _build_guard(optimizer, max_norm=max_norm, norm_type=norm_type, clip_value=clip_value,
                         clipper=clipper, skip_nonfinite=skip_nonfinite, spike_skip=spike_skip, model=model,
                         monitor=monitor, backend=backend, what="attach", process_group=process_group,
                         placements=placements)
    return Attachment(optimizer, guard)


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
    for k in ("_fastgrad_attachment", "last_stats", "fastgrad_nonfinite_names"):
        optimizer.__dict__.pop(k, None)
