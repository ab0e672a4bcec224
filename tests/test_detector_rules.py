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
    kinds = [d.kind for d in make_detectors("default")]  # the four gradient detectors first, then others
    assert kinds[:4] == ["nonfinite", "exploding", "vanishing", "dead"] and len(set(kinds)) == len(kinds)
    assert make_detectors(None) == [] and make_detectors(()) == []


# -- messages, configuration, flagged layers and argument checks (pinned for mutation testing) ----


def test_vanishing_message_value_and_flagged():
    det = VanishingDetector(relative=1e-3, patience=2, cooldown=1)
    recs = [record(s, [1.0, 2e-4, 1.0, 5e-4, 3.0]) for s in range(3)]
    assert det.update(recs[0]) == [] and det.flagged() == {}
    (f,) = det.update(recs[1])
    assert (f.kind, f.step, f.first_step, f.layers, f.value) == ("vanishing", 1, 0, ("l1", "l3"), 2e-4)
    assert f.message == ("vanishing gradients: 2 layer(s) [l1, l3] have gradient RMS 2.0e-04 to 5.0e-04, below "
                         "0.001 x the median layer's 1.0e+00 (or below 1e-08), for 2 consecutive monitored steps "
                         "(steps 0-1)")
    assert det.flagged() == {"l1": 0, "l3": 0}
    det.update(record(2, [1.0, 1.0, 1.0, 5e-4, 3.0]))
    assert det.flagged() == {"l3": 0}
    one = VanishingDetector(relative=1e-2, min_rms=None, patience=1)
    (f,) = one.update(record(7, [1.0, 1e-3, 1.0]))
    assert f.message == ("vanishing gradients: 1 layer(s) [l1] have gradient RMS 1.0e-03, below 0.01 x the median "
                         "layer's 1.0e+00, for 1 consecutive monitored steps (steps 7-7)")
    # no live layer (all zero or non-finite): nothing, and streaks are cleared
    assert one.update(record(8, [0.0, math.nan, 0.0])) == [] and one.flagged() == {}


def test_exploding_messages_values_and_flagged():
    det = ExplodingDetector(max_norm=1e4, max_rms=10.0, z_threshold=None)
    (f,) = det.update(record(3, [1.0, 20.0, 30.0, 40.0, 50.0], total=2e4))
    assert f.layers == (GLOBAL, "l1", "l2", "l3", "l4") and f.value == 2e4 and f.step == f.first_step == 3
    assert f.message == ("exploding gradients at step 3: global norm 2.00e+04 > max_norm 10000; 4 layer(s) "
                         "[l1, l2, l3, l4] (l4: RMS 5.00e+01 > max_rms 10; l3: RMS 4.00e+01 > max_rms 10; "
                         "l2: RMS 3.00e+01 > max_rms 10 and 1 more)")
    assert det.flagged() == {GLOBAL: 3, "l1": 3, "l2": 3, "l3": 3, "l4": 3}
    det2 = ExplodingDetector(max_norm=1e4, max_rms=10.0, z_threshold=None)
    (f,) = det2.update(record(0, [1.0, 20.0, 12.0], total=1.0))
    assert f.layers == ("l1", "l2") and f.value == 20.0
    assert f.message == ("exploding gradients at step 0: 2 layer(s) [l1, l2] (l1: RMS 2.00e+01 > max_rms 10; "
                         "l2: RMS 1.20e+01 > max_rms 10)")
    # non-finite norms are the non-finite detector's: no max_norm / max_rms finding
    assert ExplodingDetector().update(record(0, [math.inf, math.nan], total=math.inf)) == []


def test_exploding_spike_message_and_zero_variance():
    det = ExplodingDetector(max_norm=None, max_rms=None, warmup=5)
    for s in range(10):  # constant: variance 0, any rise is z = inf, the 10x floor decides
        assert det.update(record(s, [1.0], total=2.0)) == []
    assert det.update(record(10, [1.0], total=20.0 * DOWN)) == []
    assert det.update(record(11, [1.0], total=0.5)) == []  # below the mean: z < 0
    det = ExplodingDetector(max_norm=None, max_rms=None, warmup=5)
    for s in range(10):
        det.update(record(s, [1.0], total=2.0))
    (f,) = det.update(record(10, [1.0], total=30.0))
    assert f.layers == (GLOBAL,) and f.value == 30.0
    assert f.message == "exploding gradients at step 10: global norm 3.00e+01 spiked (z = inf, 15x its EMA)"


def test_exploding_skips_nonfinite_and_zero_norms_in_its_statistics():
    kw = dict(z_threshold=4.0, min_ratio=3.0, alpha=0.1, warmup=10)
    det = ExplodingDetector(max_norm=None, max_rms=None, cooldown=1, **kw)
    ref = EmaReference(**kw)
    norms = _steady(60, seed=9)
    for k in (20, 21, 35):
        norms[k] = (math.nan, 0.0, math.inf)[k % 3]
    for k in (30, 45, 50):
        norms[k] *= 30.0
    want = [s for s, v in enumerate(norms) if math.isfinite(v) and v > 0 and ref.update(v)]
    got = [s for s, _ in fired(det, [record(s, [1.0], total=v) for s, v in enumerate(norms)])]
    assert got == want and len(want) >= 2


def test_dead_and_nonfinite_messages():
    det = DeadLayerDetector(patience=2)
    det.update(record(4, [0.0, 1.0, 0.0], zero=[4, 0, 4]))
    (f,) = det.update(record(5, [0.0, 1.0, 0.0], zero=[4, 0, 4]))
    assert (f.layers, f.first_step, f.value) == (("l0", "l2"), 4, 2.0)
    assert f.message == ("dead layers: 2 layer(s) [l0, l2] had all-zero gradients for 2 consecutive monitored "
                         "steps (steps 4-5)")
    assert det.flagged() == {"l0": 4, "l2": 4}
    nf = NonFiniteDetector()
    (f,) = nf.update(record(9, [1.0, 1.0], total=math.nan, nan=[2, 0], posinf=[1, 0], neginf=[0, 0]))
    assert f.message == ("non-finite gradients first at step 9: 1 of 2 layer(s) hold NaN/Inf: "
                         "l0 (NaN 2, +Inf 1 of 4); global norm nan")
    assert nf.flagged() == {"l0": 9}
    nf.update(record(10, [1.0, 1.0], total=1.0))
    assert nf.flagged() == {}
    many = NonFiniteDetector()
    (f,) = many.update(record(0, [1.0] * 6, total=math.nan, nan=[1] * 6))
    assert f.message.endswith("l3 (NaN 1 of 4); and 2 more; global norm nan") and f.value == 6.0


def test_configs_and_argument_errors():
    assert VanishingDetector(relative=0.01, min_rms=None, patience=4, cooldown=7).config() == {
        "kind": "vanishing", "relative": 0.01, "min_rms": None, "patience": 4, "cooldown": 7}
    assert ExplodingDetector(max_norm=5.0, max_rms=None, z_threshold=3.0, min_ratio=2.0, alpha=0.1, warmup=9,
                             cooldown=8).config() == {
        "kind": "exploding", "max_norm": 5.0, "max_rms": None, "z_threshold": 3.0, "min_ratio": 2.0, "alpha": 0.1,
        "warmup": 9, "cooldown": 8}
    assert NonFiniteDetector(cooldown=3).config() == {"kind": "nonfinite", "cooldown": 3}
    assert DeadLayerDetector(patience=2, cooldown=5).config() == {"kind": "dead", "patience": 2, "cooldown": 5}
    bad = [
        (lambda: VanishingDetector(relative=1.0), ValueError,
         r"^relative must be < 1 \(a fraction of the median layer\), got 1\.0$"),
        (lambda: VanishingDetector(relative=0.0), ValueError, r"^relative must be > 0, got 0\.0$"),
        (lambda: VanishingDetector(min_rms="1"), TypeError, r"^min_rms must be a number, got '1'$"),
        (lambda: VanishingDetector(min_rms=True), TypeError, r"^min_rms must be a number, got True$"),
        (lambda: VanishingDetector(patience=0), ValueError, r"^patience must be >= 1, got 0$"),
        (lambda: VanishingDetector(patience=2.0), TypeError, r"^patience must be an int, got 2\.0$"),
        (lambda: VanishingDetector(cooldown=True), TypeError, r"^cooldown must be an int, got True$"),
        (lambda: ExplodingDetector(alpha=1.0), ValueError, r"^alpha must be in \(0, 1\), got 1\.0$"),
        (lambda: ExplodingDetector(alpha=-0.1), ValueError, r"^alpha must be > 0, got -0\.1$"),
        (lambda: ExplodingDetector(min_ratio=None), TypeError, r"^min_ratio must be a number, got None$"),
        (lambda: ExplodingDetector(max_norm=-1.0), ValueError, r"^max_norm must be > 0, got -1\.0$"),
        (lambda: ExplodingDetector(max_rms=float("nan")), ValueError, r"^max_rms must be > 0, got nan$"),
        (lambda: ExplodingDetector(z_threshold=0), ValueError, r"^z_threshold must be > 0, got 0$"),
        (lambda: ExplodingDetector(warmup=0), ValueError, r"^warmup must be >= 1, got 0$"),
        (lambda: ExplodingDetector(cooldown=0), ValueError, r"^cooldown must be >= 1, got 0$"),
        (lambda: DeadLayerDetector(cooldown=0), ValueError, r"^cooldown must be >= 1, got 0$"),
        (lambda: make_detectors("all"), ValueError, r"^detectors='all': the only string accepted is 'default'$"),
        (lambda: make_detectors([VanishingDetector(), 3]), TypeError,
         r"^detectors must be Detector instances, got int$"),
    ]
    for make, exc, match in bad:
        with pytest.raises(exc, match=match):
            make()
    van = VanishingDetector()
    assert make_detectors(van) == [van] and make_detectors([van]) == [van]
    for v in (None,):
        assert ExplodingDetector(max_norm=v, max_rms=v, z_threshold=v).config()["max_norm"] is None


def test_flagged_keeps_the_episode_start_and_single_element_layers_can_die():
    nf = NonFiniteDetector()
    nf.update(record(1, [1.0, 1.0], total=math.nan, nan=[1, 0]))
    nf.update(record(2, [1.0, 1.0], total=math.nan, nan=[1, 1]))
    assert nf.flagged() == {"l0": 1, "l1": 2}  # l0 since step 1, l1 joined at 2
    dead = DeadLayerDetector(patience=1)
    (f,) = dead.update(record(0, [0.0, 1.0], numel=[1, 1], zero=[1, 0]))
    assert f.layers == ("l0",)


def test_base_detector_for_custom_subclasses():
    from fastgrad.detectors import Detector

    class Custom(Detector):
        kind = "custom"

    c = Custom()
    assert c.config() == {"kind": "custom"} and c.flagged() == {}
    with pytest.raises(NotImplementedError):
        c.update(record(0, [1.0]))
    assert make_detectors([c]) == [c]


def test_nonfinite_message_lists_four_layers_then_counts():
    for k, tail in ((4, "l3 (NaN 1 of 4); global norm nan"), (5, "l3 (NaN 1 of 4); and 1 more; global norm nan")):
        (f,) = NonFiniteDetector().update(record(0, [1.0] * k, total=math.nan, nan=[1] * k))
        assert f.message.endswith(tail), (k, f.message)


def test_nonfinite_episode_needs_cooldown_clear_steps_in_a_row():
    det = NonFiniteDetector(cooldown=3)
    bad = dict(nan=[1, 0], posinf=[0, 0], neginf=[0, 0])
    steps = [bad, {}, {}, bad, {}, {}, {}, bad]  # 2 clear steps keep the episode; 3 end it
    got = []
    for s, c in enumerate(steps):
        got += [f.step for f in det.update(record(s, [1.0, 1.0], total=math.nan if c else 1.0, **c))]
    assert got == [0, 7]
