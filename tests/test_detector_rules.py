"""The detectors' documented thresholds, pinned by synthetic step records just either side of them.

The networks in tests/test_monitor.py show the detectors on real failures (huge effects); these
tests feed exact records (``numel`` chosen so that ``rms = norm / sqrt(numel)`` is exact) and put
each rule's input a relative 1e-9 above and below its threshold. They were checked to fail
against the two detector bugs of issue 16 planted in a scratch copy: the vanishing threshold
taken relative to the largest layer instead of the median one, and the exploding detector's EMA
fed the raw spike instead of the value clamped at the threshold (docs/testing.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastgrad.detectors import (
    GLOBAL,
    DeadLayerDetector,
    ExplodingDetector,
    NonFiniteDetector,
    VanishingDetector,
    make_detectors,
)
from fastgrad.loggers.base import StepRecord

UP, DOWN = 1 + 1e-9, 1 - 1e-9


def record(step: int, rms: list[float], *, numel: list[int] | None = None, total: float | None = None,
           zero: list[int] | None = None, nan: list[int] | None = None, posinf: list[int] | None = None,
           neginf: list[int] | None = None, names: list[str] | None = None) -> StepRecord:
    """A step record whose layer ``i`` has RMS ``rms[i]`` (norm = rms * sqrt(numel), numel 4 by default)."""
    k = len(rms)
    numel_a = np.array(numel or [4] * k, dtype=np.int64)
    norm = np.array(rms, dtype=np.float64) * np.sqrt(numel_a)
    z = np.zeros(k, dtype=np.int64)
    if total is None:
        total = float(np.sqrt(np.sum(norm**2))) if np.all(np.isfinite(norm)) else math.nan
    return StepRecord(step, 0.0, tuple(names or [f"l{i}" for i in range(k)]), numel_a, norm, norm.copy(),
                      np.array(nan, np.int64) if nan else z, np.array(posinf, np.int64) if posinf else z,
                      np.array(neginf, np.int64) if neginf else z, np.array(zero, np.int64) if zero else z, total)


def fired(det, records) -> list[tuple[int, tuple[str, ...]]]:
    out = []
    for r in records:
        out += [(f.step, f.layers) for f in det.update(r)]
    return out


# -- vanishing: rms < relative * median(rms of live layers), or rms < min_rms, for patience steps --


@pytest.mark.parametrize("relative", [1e-3, 0.05])
def test_vanishing_threshold_is_relative_to_the_median_layer(relative):
    # live layers 1, 1, 1, 100 and the probe: the median is 1 (the largest layer is 100)
    def run(x):
        det = VanishingDetector(relative=relative, min_rms=None, patience=3)
        return fired(det, [record(s, [1.0, 100.0, 1.0, x, 1.0]) for s in range(5)])

    assert run(relative * DOWN) == [(2, ("l3",))]  # fires after patience 3: steps 0-2
    assert run(relative * UP) == []
    assert run(relative) == []  # strictly below


def test_vanishing_median_of_an_even_count_and_of_live_layers_only():
    # live RMS 1, 3, probe, 100 -> median = (1 + 3) / 2 = 2 when the probe is the smallest;
    # all-zero and non-finite layers are the other detectors' and stay out of the median
    rel = 1e-2

    def run(x):
        det = VanishingDetector(relative=rel, min_rms=None, patience=1)
        r = record(0, [1.0, 0.0, 3.0, x, 0.0, math.inf, 100.0, 0.0, math.nan])
        return fired(det, [r])

    assert run(2 * rel * DOWN) == [(0, ("l3",))]
    assert run(2 * rel * UP) == []


def test_vanishing_min_rms_floor_either_side():
    def run(x):
        det = VanishingDetector(relative=1e-6, min_rms=1e-8, patience=2)
        return fired(det, [record(s, [x, x * 1.5, x * 2]) for s in range(3)])

    assert run(1e-8 * DOWN) == [(1, ("l0",))]  # the layer below the floor, not the median rule
    assert run(1e-8 * UP) == []


def test_vanishing_patience_streak_and_cooldown():
    det = VanishingDetector(relative=0.1, min_rms=None, patience=3, cooldown=2)
    low, ok = [1.0, 1.0, 0.01], [1.0, 1.0, 1.0]
    seq = [low, low, ok, low, low, low, low, ok, low, low, low, ok, ok, low, low, low]
    got = fired(det, [record(s, r) for s, r in enumerate(seq)])
    # streak broken at 2; fires at 5 (steps 3-5); one clear step (7) is not the cooldown of 2;
    # two clear steps (11, 12) re-arm it: fires again at 15 (steps 13-15)
    assert got == [(5, ("l2",)), (15, ("l2",))]
    f = VanishingDetector(relative=0.1, min_rms=None, patience=3).update
    for s in range(2):
        assert f(record(s, low)) == []
    (finding,) = f(record(2, low))
    assert finding.first_step == 0 and finding.value == pytest.approx(0.01, rel=1e-12)
    assert "steps 0-2" in finding.message and "l2" in finding.message


# -- exploding: max_norm, max_rms, and the log-norm z-score spike ---------------------------------


def test_exploding_max_norm_and_max_rms_either_side():
    def glob(tn):
        det = ExplodingDetector(max_norm=100.0, max_rms=None, z_threshold=None)
        return fired(det, [record(0, [1.0], total=tn)])

    assert glob(100.0 * UP) == [(0, (GLOBAL,))]
    assert glob(100.0) == [] and glob(100.0 * DOWN) == []

    def layer(r):
        det = ExplodingDetector(max_norm=None, max_rms=10.0, z_threshold=None)
        return fired(det, [record(0, [1.0, r, 2.0], numel=[4, 16, 9])])  # rms = norm / sqrt(numel)

    assert layer(10.0 * UP) == [(0, ("l1",))]
    assert layer(10.0) == [] and layer(10.0 * DOWN) == []


class EmaReference:
    """The documented spike rule in plain Python: EMA (alpha) of log10 norms, z against its std,
    spikes after ``warmup`` steps seen, the EMA fed the value clamped at the threshold (ZClip)."""

    def __init__(self, z_threshold=6.0, min_ratio=10.0, alpha=0.05, warmup=25):
        self.z, self.ratio, self.alpha, self.warmup = z_threshold, min_ratio, alpha, warmup
        self.mean = self.var = None
        self.seen = 0

    def threshold(self) -> float:
        """The smallest log10 norm that is a spike now (both conditions), +inf during warm-up."""
        if self.seen < self.warmup:
            return math.inf
        return self.mean + max(self.z * math.sqrt(self.var), math.log10(self.ratio))

    def update(self, value: float) -> bool:
        x = math.log10(value)
        if self.seen == 0:
            self.mean, self.var, self.seen = x, 0.0, 1
            return False
        std = math.sqrt(self.var)
        z = (x - self.mean) / std if std > 0 else (math.inf if x > self.mean else 0.0)
        spike = self.seen >= self.warmup and z > self.z and x - self.mean >= math.log10(self.ratio)
        if spike:
            x = self.mean + self.z * std
        d = x - self.mean
        self.mean += self.alpha * d
        self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        self.seen += 1
        return spike


def _steady(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(10 ** rng.normal(0.0, 0.2)) for _ in range(n)]


@pytest.mark.parametrize("where", ["above", "below"])
def test_exploding_spike_z_threshold_either_side(where):
    ref = EmaReference(z_threshold=6.0, min_ratio=1.0001, warmup=10)
    det = ExplodingDetector(max_norm=None, max_rms=None, z_threshold=6.0, min_ratio=1.0001, warmup=10)
    norms = _steady(40)
    for s, v in enumerate(norms):
        assert det.update(record(s, [1.0], total=v)) == [] and not ref.update(v)
    t = ref.threshold()
    assert t - ref.mean > math.log10(1.0001) * 10  # the z-rule, not the ratio floor, decides here
    v = 10 ** (t + (1e-9 if where == "above" else -1e-9))
    got = [f.layers for f in det.update(record(40, [1.0], total=v))]
    assert got == ([(GLOBAL,)] if where == "above" else [])


@pytest.mark.parametrize("where", ["above", "below"])
def test_exploding_spike_min_ratio_either_side(where):
    # a very steady series: 6 sigma is tiny, the 10x floor decides
    ref = EmaReference(warmup=25)
    det = ExplodingDetector(max_norm=None, max_rms=None)
    rng = np.random.default_rng(1)
    for s in range(40):
        v = float(10 ** rng.normal(0.0, 1e-3))
        det.update(record(s, [1.0], total=v))
        ref.update(v)
    assert 6.0 * math.sqrt(ref.var) < 0.1
    v = 10 ** (ref.mean + 1.0) * (UP if where == "above" else DOWN)
    got = [f.layers for f in det.update(record(40, [1.0], total=v))]
    assert got == ([(GLOBAL,)] if where == "above" else [])


def test_exploding_no_spike_before_warmup():
    det = ExplodingDetector(max_norm=None, max_rms=None, warmup=25)
    got = fired(det, [record(s, [1.0], total=(1e6 if s == 20 else 1.0 + 0.01 * (s % 3))) for s in range(24)])
    assert got == []


def test_exploding_ema_is_fed_the_clamped_spike():
    """Spikes in a row, cooldown 1: with the clamp the EMA moves by alpha * 6 sigma per spike and
    each spike fires; fed raw, the first spike would lift the mean and variance so far that the
    next ones look ordinary."""
    kw = dict(z_threshold=6.0, min_ratio=10.0, alpha=0.05, warmup=25)
    ref = EmaReference(**kw)
    det = ExplodingDetector(max_norm=None, max_rms=None, cooldown=1, **kw)
    norms = _steady(90, seed=3)
    for k in range(60, 90, 2):  # a spike every other step, a normal step between (re-arms cooldown 1)
        norms[k] = 1e3
    want = [s for s, v in enumerate(norms) if ref.update(v)]
    got = [s for s, _ in fired(det, [record(s, [1.0], total=v) for s, v in enumerate(norms)])]
    assert got == want
    assert got[:2] == [60, 62]


def test_exploding_per_layer_spike_matches_the_reference():
    kw = dict(z_threshold=4.0, min_ratio=3.0, alpha=0.1, warmup=10)
    det = ExplodingDetector(max_norm=None, max_rms=None, cooldown=1, **kw)
    refs = {name: EmaReference(**kw) for name in ("l0", "l1")}
    a, b = _steady(80, seed=5), _steady(80, seed=6)
    for k in (30, 31, 50, 70):
        b[k] *= 40.0
    want, armed = [], {"l0": True, "l1": True}  # cooldown 1: re-armed by one clear step
    for s in range(80):
        hit = []
        for n, v in (("l0", a[s]), ("l1", b[s])):
            spike = refs[n].update(v)
            if spike and armed[n]:
                hit.append(n)
            armed[n] = not spike
        if hit:
            want.append((s, tuple(hit)))
    recs = [record(s, [a[s] / 2, b[s] / 2], total=1.0) for s in range(80)]  # numel 4: norm = 2 * rms
    got = [(s, tuple(layer for layer in lay if layer != GLOBAL)) for s, lay in fired(det, recs)]
    assert got == want and len(want) >= 3


# -- non-finite and dead ----------------------------------------------------------------------------


def test_nonfinite_detector_names_layers_spread_and_episodes():
    det = NonFiniteDetector(cooldown=2)
    clean = dict(nan=[0, 0, 0], posinf=[0, 0, 0], neginf=[0, 0, 0])
    seq = [
        clean,
        dict(nan=[0, 0, 0], posinf=[0, 0, 0], neginf=[0, 2, 0]),  # -Inf only: first finding
        dict(nan=[1, 0, 0], posinf=[0, 0, 0], neginf=[0, 2, 0]),  # spreads to l0
        dict(nan=[1, 0, 0], posinf=[0, 0, 0], neginf=[0, 2, 0]),  # nothing new
        clean, clean,  # cooldown 2: the episode ends
        dict(nan=[0, 0, 0], posinf=[0, 0, 3], neginf=[0, 0, 0]),  # again
    ]
    out = []
    for s, c in enumerate(seq):
        out += det.update(record(s, [1.0, 1.0, 1.0], total=1.0, **c))
    assert [(f.step, f.layers, f.value) for f in out] == [(1, ("l1",), 2.0), (2, ("l0",), 3.0), (6, ("l2",), 3.0)]
    assert "first at step 1" in out[0].message and "-Inf 2 of 4" in out[0].message
    assert "spread" in out[1].message and "again at step 6" in out[2].message and "+Inf 3" in out[2].message
    assert det.nonfinite_steps == 4 and det.first_step == 1


def test_dead_layer_detector_patience_and_empty_layers():
    det = DeadLayerDetector(patience=2)
    recs = [record(s, [1.0, 0.0, 0.0, 0.0], numel=[4, 4, 4, 0], zero=[0, 4 if s != 1 else 3, 4, 0])
            for s in range(4)]
    # l1 is all-zero at steps 0, 2, 3 (not 1): fires at 3; l2 at 1; l3 has no elements: never dead
    assert fired(det, recs) == [(1, ("l2",)), (3, ("l1",))]


def test_default_thresholds_are_the_documented_ones():
    van, exp = VanishingDetector(), ExplodingDetector()
    assert (van.relative, van.min_rms, van.patience, van.cooldown) == (1e-3, 1e-8, 10, 50)
    assert (exp.max_norm, exp.max_rms, exp.z_threshold, exp.min_ratio, exp.alpha, exp.warmup, exp.cooldown) == (
        1e4, 1e2, 6.0, 10.0, 0.05, 25, 50)
    assert DeadLayerDetector().patience == 3 and NonFiniteDetector().cooldown == 50
    assert [d.kind for d in make_detectors("default")] == ["nonfinite", "exploding", "vanishing", "dead"]
    assert make_detectors(None) == [] and make_detectors(()) == []
