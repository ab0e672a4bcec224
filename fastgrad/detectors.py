"""Gradient-health detectors: vanishing, exploding, non-finite and dead layers.

Detectors run on the host, on :class:`~fastgrad.records.StepRecord` s,
when the :class:`~fastgrad.GradMonitor` flushes (every ``log_every``
monitored steps, or on ``flush()``/``close()``). They never touch device
tensors, so they cost no sync of their own; the price is that a finding is
reported up to ``log_every`` steps after the step it names (the step number
in the finding is exact).

Each detector fires a :class:`Finding` when a condition *starts* (a layer
crosses into it), not on every step it lasts, and re-arms only after the
condition has stayed clear for ``cooldown = 50`` monitored steps, so a layer
hovering around a threshold makes one finding, not one per crossing, and a
long run does not drown in repeats.

Why RMS and not the norm: a layer's gradient norm grows like
``sqrt(numel)``, so a bias and a 4096x4096 weight differ by 60x at equal
per-element size. ``rms = norm / sqrt(numel)`` compares layers of any size;
the layer-relative rules below use it (with the 2-norm; for other
``norm_type`` the same ratio is still a per-element scale).

Default thresholds and why:

* Vanishing: ``rms < relative * median(rms of all layers)`` with
  ``relative = 1e-3`` or ``rms < min_rms = 1e-8``, for ``patience = 10``
  consecutive monitored steps. Healthy networks keep their layers' gradient
  RMS within one or two orders of magnitude of each other (biases, norms,
  embeddings included); three orders below the median layer means that
  layer learns at least 1000x slower than the rest. ``1e-8`` is Adam's
  default ``eps``: below it Adam's update ``g / (sqrt(v) + eps)`` shrinks in
  proportion to ``g`` and fp32 weights of size ~1e-2 stop changing under
  SGD (their ulp is ~1e-9). Ten steps keep one quiet batch from firing.
* Exploding: the global norm above ``max_norm = 1e4``, a layer's RMS above
  ``max_rms = 1e2``, or a spike: ``log10(norm)`` more than ``z_threshold =
  6`` standard deviations above its EMA (``alpha = 0.05``, ZClip's
  statistics) *and* at least ``min_ratio = 10x`` above the EMA's typical
  value, for the global norm or any layer, after ``warmup = 25`` monitored
  steps. Mean-reduced losses rarely see global norms above ~1e2 (the usual
  clip threshold is 1.0); 1e4 leaves room for sum-reduced losses and still
  catches divergence long before it overflows. An element RMS of 100 moves
  every weight by 100x the learning rate under SGD. Six sigma on a
  log-normal-ish series is a rare event even with heavy tails, and the 10x
  floor stops a very steady series from firing on a 1.5x bump. Spikes feed
  the EMA clamped at the threshold (as ZClip does), so a lasting level
  shift is absorbed over ~1/alpha steps instead of being flagged forever or
  poisoning the statistics at once.
* Non-finite: any NaN or ±Inf in a layer's gradient, immediately. The
  finding names the first step and the layers holding them (model order),
  and a new finding is made when the non-finite values spread to more
  layers or come back after finite steps.
* Dead: every element of a layer's gradient exactly zero for ``patience =
  3`` monitored steps (dead ReLU units, a detached branch, a frozen layer
  that still has a ``.grad``). Parameters whose ``.grad`` is None are not
  in the statistics at all and cannot be seen here.
* Update-ratio spike (:class:`UpdateRatioSpikeDetector`, training health; only on records that
  carry ``update_ratio``, i.e. ``wrap(..., track_updates=True)`` with a monitor): a layer's (or
  the whole model's) ``r = ||Δw|| / ||w_before||`` above ``factor = 10`` times the median of its
  last ``window = 50`` monitored values, or above ``max_ratio = 0.1``, once the layer has
  ``warmup = 10`` values. Why: update-norm spikes come before loss spikes and are largest in
  the lower layers (marin#1368), and a ratio is comparable across layers and runs where a raw
  update norm is not. The *relative* rule is the main one: it is scale-free, so it holds for any
  optimizer and learning rate. In steady training a layer's ratio moves within ~2-3x from step
  to step (Adam normalises the step; schedules change the learning rate over thousands of
  steps, a few percent over a window), so an order of magnitude above the median is an event,
  not noise, and the spikes reported there are 10-100x. The median, not the mean, so that the
  spikes themselves do not raise the baseline; values enter the window clamped at
  ``factor x median`` (as ZClip clamps), so a lasting level shift (a learning-rate jump) is
  absorbed once it fills half the window, ~25 monitored steps, instead of firing for ever. The
  *absolute* bound is for Adam-like optimizers, whose per-element step is at most about
  ``lr``, so that ``r ~ lr / rms(w)``: with usual learning rates (<= 1e-3) and trained weight
  RMS (1e-2..1e-1) healthy ratios are 1e-4..1e-2 (the 1e-3 rule of thumb); ``r > 0.1``
  changes the layer by a tenth in one step, ten such steps replace it. It catches a layer that
  is off from the start, which a median of its own history cannot. The warm-up skips the first
  steps, where Adam's normalised steps are largest (``m ~ g``) and zero-initialised layers
  have an infinite ratio. For plain SGD, whose ratio is ``lr ||g|| / ||w||`` and has no such
  scale, pass ``max_ratio=math.inf`` to keep only the relative rule. Skipped steps (ratio 0)
  are not counted. One finding per layer per excursion (``cooldown = 50``, as above).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .records import Finding, StepRecord, format_layers

KINDS = ("vanishing", "exploding", "nonfinite", "dead", "update_spike")
GLOBAL = "<global>"


class Detector:
    """Base class: :meth:`update` is called once per monitored step, in step order."""

    kind: str = ""

    def update(self, rec: StepRecord) -> list[Finding]:
        raise NotImplementedError

    def flagged(self) -> dict[str, int]:
        """Layers currently in this detector's condition -> the step it began."""
        return {}

    def config(self) -> dict:
        """The detector's thresholds (written to the run's header)."""
        return {"kind": self.kind}


def _check_positive(name: str, v: float | None, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {v!r}")
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")


def _check_count(name: str, v: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")


class _Streaks:
    """Per-key streaks with hysteresis, keyed by layer name (layers may come and go).

    A key fires when its condition has held for ``patience`` consecutive steps,
    and can fire again only after the condition has been clear for ``cooldown``
    consecutive steps: a layer hovering around a threshold makes one finding,
    not one per crossing.
    """

    def __init__(self, patience: int, cooldown: int) -> None:
        self.patience, self.cooldown = patience, cooldown
        self.start: dict[str, int] = {}
        self.count: dict[str, int] = {}
        self.clear: dict[str, int] = {}
        self.fired: set[str] = set()

    def update(self, step: int, keys: Sequence[str], cond: Sequence[bool]) -> list[str]:
        """Advance the streaks of ``keys``; return the keys that fire now."""
        new = []
        for name, c in zip(keys, cond):
            if c:
                self.clear[name] = 0
                self.start.setdefault(name, step)
                self.count[name] = self.count.get(name, 0) + 1
                if self.count[name] >= self.patience and name not in self.fired:
                    self.fired.add(name)
                    new.append(name)
            else:
                self.start.pop(name, None)
                self.count.pop(name, None)
                if name in self.fired:
                    self.clear[name] = self.clear.get(name, 0) + 1
                    if self.clear[name] >= self.cooldown:
                        self.fired.discard(name)
        return new

    def active(self) -> dict[str, int]:
        """Keys that fired and are still in their condition -> the step it began."""
        return {n: self.start[n] for n in self.fired if n in self.start}


class VanishingDetector(Detector):
    """A layer's gradient RMS below ``relative`` x the median layer's, or below ``min_rms``, for ``patience`` steps."""

    kind = "vanishing"

    def __init__(self, *, relative: float = 1e-3, min_rms: float | None = 1e-8, patience: int = 10,
                 cooldown: int = 50):
        _check_positive("relative", relative)
        if relative >= 1:
            raise ValueError(f"relative must be < 1 (a fraction of the median layer), got {relative}")
        _check_positive("min_rms", min_rms, allow_none=True)
        _check_count("patience", patience)
        _check_count("cooldown", cooldown)
        self.relative, self.min_rms, self.patience, self.cooldown = float(relative), min_rms, patience, cooldown
        self._streaks = _Streaks(patience, cooldown)

    def config(self) -> dict:
        return {"kind": self.kind, "relative": self.relative, "min_rms": self.min_rms, "patience": self.patience,
                "cooldown": self.cooldown}

    def flagged(self) -> dict[str, int]:
        return self._streaks.active()

    def update(self, rec: StepRecord) -> list[Finding]:
        rms = rec.rms
        # All-zero layers are the dead detector's; non-finite ones the non-finite detector's.
        live = np.isfinite(rms) & (rms > 0)
        if not live.any():
            self._streaks.update(rec.step, rec.layers, [False] * len(rec.layers))
            return []
        median = float(np.median(rms[live]))
        cond = live & (rms < self.relative * median)
        if self.min_rms is not None:
            cond |= live & (rms < self.min_rms)
        new = self._streaks.update(rec.step, rec.layers, cond.tolist())
        if not new:
            return []
        idx = [rec.layers.index(n) for n in new]
        lo, hi = float(rms[idx].min()), float(rms[idx].max())
        first = min(self._streaks.start[n] for n in new)
        rng = f"{lo:.1e}" if lo == hi else f"{lo:.1e} to {hi:.1e}"
        floor = f" (or below {self.min_rms:g})" if self.min_rms is not None else ""
        msg = (f"vanishing gradients: {len(new)} layer(s) [{format_layers(new)}] have gradient RMS {rng}, "
               f"below {self.relative:g} x the median layer's {median:.1e}{floor}, for {self.patience} "
               f"consecutive monitored steps (steps {first}-{rec.step})")
        return [Finding(self.kind, rec.step, first, tuple(new), msg, lo)]


class ExplodingDetector(Detector):
    """Global norm above ``max_norm``, a layer RMS above ``max_rms``, or a z-score spike of the log-norm."""

    kind = "exploding"

    def __init__(self, *, max_norm: float | None = 1e4, max_rms: float | None = 1e2,
                 z_threshold: float | None = 6.0, min_ratio: float = 10.0, alpha: float = 0.05,
                 warmup: int = 25, cooldown: int = 50):
        _check_positive("max_norm", max_norm, allow_none=True)
        _check_positive("max_rms", max_rms, allow_none=True)
        _check_positive("z_threshold", z_threshold, allow_none=True)
        _check_positive("min_ratio", min_ratio)
        _check_positive("alpha", alpha)
        if alpha >= 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        _check_count("warmup", warmup)
        _check_count("cooldown", cooldown)
        self.cooldown = cooldown
        self.max_norm, self.max_rms, self.z_threshold = max_norm, max_rms, z_threshold
        self.min_ratio, self.alpha, self.warmup = float(min_ratio), float(alpha), warmup
        # EMA of log10 norms per key (layer names and GLOBAL): mean, variance, steps seen.
        self._mean: dict[str, float] = {}
        self._var: dict[str, float] = {}
        self._seen: dict[str, int] = {}
        self._streaks = _Streaks(1, cooldown)  # keys: layer names and GLOBAL

    def config(self) -> dict:
        return {"kind": self.kind, "max_norm": self.max_norm, "max_rms": self.max_rms,
                "z_threshold": self.z_threshold, "min_ratio": self.min_ratio, "alpha": self.alpha,
                "warmup": self.warmup, "cooldown": self.cooldown}

    def flagged(self) -> dict[str, int]:
        return self._streaks.active()

    def _spike(self, key: str, value: float) -> tuple[float, float] | None:
        """Update the EMA of ``log10(value)``; return ``(z-score, ratio to the EMA)`` if ``value`` is a spike."""
        if not (math.isfinite(value) and value > 0):
            return None
        x = math.log10(value)
        n = self._seen.get(key, 0)
        if n == 0:
            self._mean[key], self._var[key], self._seen[key] = x, 0.0, 1
            return None
        mean, var = self._mean[key], self._var[key]
        std = math.sqrt(var)
        z = (x - mean) / std if std > 0 else (math.inf if x > mean else 0.0)
        spike = (self.z_threshold is not None and n >= self.warmup and z > self.z_threshold
                 and x - mean >= math.log10(self.min_ratio))
        if spike:  # feed the EMA the threshold, not the spike (ZClip)
            x = mean + self.z_threshold * std
        d = x - mean
        self._mean[key] = mean + self.alpha * d
        self._var[key] = (1 - self.alpha) * (var + self.alpha * d * d)
        self._seen[key] = n + 1
        return (z, 10 ** (math.log10(value) - mean)) if spike else None

    def update(self, rec: StepRecord) -> list[Finding]:
        reasons: dict[str, str] = {}
        values: dict[str, float] = {}
        tn = rec.total_norm
        z = self._spike(GLOBAL, tn)
        if self.max_norm is not None and math.isfinite(tn) and tn > self.max_norm:
            reasons[GLOBAL], values[GLOBAL] = f"global norm {tn:.2e} > max_norm {self.max_norm:g}", tn
        elif z is not None:
            reasons[GLOBAL], values[GLOBAL] = (f"global norm {tn:.2e} spiked (z = {z[0]:.1f}, "
                                               f"{z[1]:.0f}x its EMA)"), tn
        rms = rec.rms
        for i, name in enumerate(rec.layers):
            nz = self._spike(name, float(rec.norm[i]))
            r = float(rms[i])
            if self.max_rms is not None and math.isfinite(r) and r > self.max_rms:
                reasons[name], values[name] = f"RMS {r:.2e} > max_rms {self.max_rms:g}", r
            elif nz is not None:
                reasons[name], values[name] = f"norm spiked (z = {nz[0]:.1f}, {nz[1]:.0f}x its EMA)", float(rec.norm[i])
        keys = [GLOBAL, *rec.layers]
        new = self._streaks.update(rec.step, keys, [k in reasons for k in keys])
        if not new:
            return []
        glob = GLOBAL in new
        layers = [k for k in new if k != GLOBAL]
        parts = []
        if glob:
            parts.append(reasons[GLOBAL])
        if layers:
            worst = sorted(layers, key=lambda k: -values[k])
            detail = "; ".join(f"{k}: {reasons[k]}" for k in worst[:3])
            more = f" and {len(layers) - 3} more" if len(layers) > 3 else ""
            parts.append(f"{len(layers)} layer(s) [{format_layers(layers)}] ({detail}{more})")
        key_value = values[GLOBAL] if glob else max(values[k] for k in layers)
        msg = f"exploding gradients at step {rec.step}: " + "; ".join(parts)
        return [Finding(self.kind, rec.step, rec.step, tuple(([GLOBAL] if glob else []) + layers), msg, key_value)]


class NonFiniteDetector(Detector):
    """Any NaN/±Inf in a layer's gradient: names the first step and the layers, then spreads and returns.

    A new finding is made when non-finite values reach layers not yet reported
    in the current episode; an episode ends after ``cooldown`` consecutive
    finite steps (so a GradScaler's occasional overflow makes one finding per
    burst, not one per step).
    """

    kind = "nonfinite"

    def __init__(self, *, cooldown: int = 50) -> None:
        _check_count("cooldown", cooldown)
        self.cooldown = cooldown
        self._episode: dict[str, int] = {}  # layers reported in the current episode -> step
        self._clear = 0
        self._bad_now: dict[str, int] = {}
        self.nonfinite_steps = 0
        self.first_step: int | None = None

    def config(self) -> dict:
        return {"kind": self.kind, "cooldown": self.cooldown}

    def flagged(self) -> dict[str, int]:
        return dict(self._bad_now)

    def update(self, rec: StepRecord) -> list[Finding]:
        nf = rec.nonfinite
        bad = [n for n, c in zip(rec.layers, nf.tolist()) if c]
        self._bad_now = {n: self._episode.get(n, rec.step) for n in bad}
        if not bad:
            self._clear += 1
            if self._clear >= self.cooldown:
                self._episode.clear()
            return []
        self._clear = 0
        self.nonfinite_steps += 1
        if self.first_step is None:
            self.first_step = rec.step
        new = [n for n in bad if n not in self._episode]
        if not new:
            return []
        fresh = not self._episode
        for n in new:
            self._episode[n] = rec.step
        self._bad_now.update({n: rec.step for n in new})
        idx = {n: i for i, n in enumerate(rec.layers)}

        def what(n: str) -> str:
            i = idx[n]
            kinds = [f"{k} {int(v[i])}" for k, v in (("NaN", rec.nan), ("+Inf", rec.posinf), ("-Inf", rec.neginf))
                     if v[i]]
            return f"{n} ({', '.join(kinds)} of {int(rec.numel[i])})"

        shown = "; ".join(what(n) for n in new[:4]) + (f"; and {len(new) - 4} more" if len(new) > 4 else "")
        if fresh:
            lead = "non-finite gradients first" if rec.step == self.first_step else "non-finite gradients again"
            msg = (f"{lead} at step {rec.step}: {len(bad)} of {len(rec.layers)} layer(s) hold NaN/Inf: {shown}; "
                   f"global norm {rec.total_norm:.3g}")
        else:
            msg = f"non-finite gradients spread at step {rec.step} to {len(new)} more layer(s): {shown}"
        return [Finding(self.kind, rec.step, rec.step, tuple(new), msg, float(nf.sum()))]


class DeadLayerDetector(Detector):
    """Every gradient element of a layer exactly zero for ``patience`` monitored steps."""

    kind = "dead"

    def __init__(self, *, patience: int = 3, cooldown: int = 50):
        _check_count("patience", patience)
        _check_count("cooldown", cooldown)
        self.patience, self.cooldown = patience, cooldown
        self._streaks = _Streaks(patience, cooldown)

    def config(self) -> dict:
        return {"kind": self.kind, "patience": self.patience, "cooldown": self.cooldown}

    def flagged(self) -> dict[str, int]:
        return self._streaks.active()

    def update(self, rec: StepRecord) -> list[Finding]:
        cond = (rec.numel > 0) & (rec.zero == rec.numel)
        new = self._streaks.update(rec.step, rec.layers, cond.tolist())
        if not new:
            return []
        first = min(self._streaks.start[n] for n in new)
        msg = (f"dead layers: {len(new)} layer(s) [{format_layers(new)}] had all-zero gradients for "
               f"{self.patience} consecutive monitored steps (steps {first}-{rec.step})")
        return [Finding(self.kind, rec.step, first, tuple(new), msg, float(len(new)))]


class UpdateRatioSpikeDetector(Detector):
    """A layer's update ratio ``||Δw|| / ||w_before||`` above ``factor`` x its running median (over
    ``window`` monitored steps) or above ``max_ratio``, after ``warmup`` values (module docstring)."""

    kind = "update_spike"

    def __init__(self, *, factor: float = 10.0, max_ratio: float = 0.1, window: int = 50, warmup: int = 10,
                 cooldown: int = 50):
        if not (isinstance(factor, (int, float)) and factor > 1):
            raise ValueError(f"factor must be a number > 1, got {factor!r}")
        if not (isinstance(max_ratio, (int, float)) and max_ratio > 0):
            raise ValueError(f"max_ratio must be a positive number (math.inf: no absolute bound), got {max_ratio!r}")
        _check_count("window", window)
        _check_count("warmup", warmup)
        _check_count("cooldown", cooldown)
        self.factor, self.max_ratio = float(factor), float(max_ratio)
        self.window, self.warmup, self.cooldown = window, warmup, cooldown
        self._hist: dict[str, list[float]] = {}
        self._seen: dict[str, int] = {}
        self._streaks = _Streaks(1, cooldown)

    def config(self) -> dict:
        return {"kind": self.kind, "factor": self.factor, "max_ratio": self.max_ratio, "window": self.window,
                "warmup": self.warmup, "cooldown": self.cooldown}

    def flagged(self) -> dict[str, int]:
        return self._streaks.active()

    def update(self, rec: StepRecord) -> list[Finding]:
        if rec.update_ratio is None:
            return []
        keys = list(rec.layers)
        vals = [float(v) for v in rec.update_ratio]
        if rec.total_update_ratio is not None:
            keys.append(GLOBAL)
            vals.append(float(rec.total_update_ratio))
        cond, why = [], {}
        for name, r in zip(keys, vals):
            if not r > 0 or math.isnan(r):  # not stepped (skipped, no gradient): no information
                cond.append(name in self._streaks.active())  # keeps an ongoing excursion as it is
                continue
            hist = self._hist.setdefault(name, [])
            seen = self._seen.get(name, 0)
            self._seen[name] = seen + 1
            med = float(np.median(hist)) if hist else math.nan
            spike = False
            if seen >= self.warmup:
                if r > self.factor * med:
                    spike, why[name] = True, (r, f"{r:.3g} = {r / med:.3g}x its median {med:.3g}")
                elif r > self.max_ratio:
                    spike, why[name] = True, (r, f"{r:.3g} > {self.max_ratio:g}")
            cond.append(spike)
            hist.append(min(r, self.factor * med) if hist and math.isfinite(med) else r)
            if len(hist) > self.window:
                del hist[0]
        new = self._streaks.update(rec.step, keys, cond)
        if not new:
            return []
        shown = "; ".join(f"{n}: {why[n][1]}" for n in new[:4]) + (
            f"; and {len(new) - 4} more" if len(new) > 4 else "")
        msg = (f"update-ratio spike at step {rec.step} in {len(new)} layer(s) (||Δw||/||w|| above "
               f"{self.factor:g}x its running median or {self.max_ratio:g}): {shown}")
        return [Finding(self.kind, rec.step, rec.step, tuple(new), msg, max(why[n][0] for n in new))]


def default_detectors() -> list[Detector]:
    """One of each gradient detector with the default thresholds documented in this module."""
    return [NonFiniteDetector(), ExplodingDetector(), VanishingDetector(), DeadLayerDetector()]


def health_detectors() -> list[Detector]:
    """The training-health detectors (silent on records without update ratios)."""
    return [UpdateRatioSpikeDetector()]


def make_detectors(detectors) -> list[Detector]:
    """``"default"`` -> :func:`default_detectors` + :func:`health_detectors`; None/() -> none; else a
    sequence of :class:`Detector`."""
    if detectors is None:
        return []
    if isinstance(detectors, str):
        if detectors != "default":
            raise ValueError(f"detectors={detectors!r}: the only string accepted is 'default'")
        return default_detectors() + health_detectors()
    if isinstance(detectors, Detector):
        return [detectors]
    out = list(detectors)
    for d in out:
        if not isinstance(d, Detector):
            raise TypeError(f"detectors must be Detector instances, got {type(d).__name__}")
    return out
