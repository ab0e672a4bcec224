"""Training health through wrap/attach and GradMonitor (issue #13): update norms and ratios,
weight norms, the noise scale; JSONL schema 1.1, loggers, report figures, the update-spike detector."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import fastgrad
from fastgrad.detectors import UpdateRatioSpikeDetector, make_detectors
from fastgrad.loggers.base import health_scalars
from fastgrad.loggers.jsonl import read_run
from fastgrad.records import StepRecord


def model64(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def backward(m, nan=False):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    m(torch.randn(7, 6, dtype=torch.float64)).pow(2).sum().backward()
    if nan:
        m[0].weight.grad[0, 0] = float("nan")


OPTS = {
    "adamw": lambda ps, fused: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, fused=fused),
    "sgd_momentum": lambda ps, fused: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=fused),
    "nadam": lambda ps, fused: torch.optim.NAdam(ps, lr=0.05),  # no closed form: snapshot path
}


def make(kind, fused, how, m, **kw):
    opt = OPTS[kind](m.parameters(), fused)
    if how == "wrap":
        o = fastgrad.wrap(opt, max_norm=0.5, model=m, track_updates=True, **kw)
        return o, o, (lambda: o.last_stats)
    att = fastgrad.attach(opt, max_norm=0.5, model=m, track_updates=True, **kw)
    return opt, att, (lambda: opt.last_stats)


def snapshot_norms(before, m):
    return torch.stack([(p.detach() - b).norm() for p, b in zip(m.parameters(), before)])


@pytest.mark.parametrize("how", ["wrap", "attach"])
@pytest.mark.parametrize("kind,fused", [("adamw", False), ("adamw", True), ("sgd_momentum", False),
                                        ("sgd_momentum", True), ("nadam", False)])
def test_update_norms_match_a_float64_snapshot(how, kind, fused):
    m = model64()
    stepper, _, last = make(kind, fused, how, m)
    for _ in range(4):
        backward(m)
        before = [p.detach().clone() for p in m.parameters()]
        stepper.step()
        ls = last()
        ref = snapshot_norms(before, m)
        assert ls.updates is not None and ls.updates.names == ("0.weight", "0.bias", "2.weight", "2.bias")
        torch.testing.assert_close(ls.update_norms, ref, rtol=1e-6, atol=0)
        w = torch.stack([b.norm() for b in before])
        torch.testing.assert_close(ls.update_ratio, ref / w, rtol=1e-6, atol=0)
        tot = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(m.parameters(), before)]).norm()
        torch.testing.assert_close(ls.updates.total_update_norm, tot, rtol=1e-6, atol=0)
        assert ls.update_norms.dtype == torch.float64
        assert (ls.update_norms > 0).all()


@pytest.mark.parametrize("how", ["wrap", "attach"])
@pytest.mark.parametrize("kind,fused", [("adamw", False), ("adamw", True), ("sgd_momentum", True),
                                        ("nadam", False)])
def test_skipped_step_reports_zero_update(how, kind, fused):
    m = model64()
    stepper, _, last = make(kind, fused, how, m)
    backward(m)
    stepper.step()  # one applied step first (optimizer state exists)
    backward(m, nan=True)
    before = [p.detach().clone() for p in m.parameters()]
    stepper.step()
    ls = last()
    assert bool(ls.skipped)
    assert all(torch.equal(p.detach(), b) for p, b in zip(m.parameters(), before))
    assert torch.equal(ls.update_norms, torch.zeros(4, dtype=torch.float64))
    assert float(ls.updates.total_update_ratio) == 0.0


def test_track_updates_off_and_bad_argument():
    m = model64()
    o = fastgrad.wrap(torch.optim.SGD(m.parameters(), lr=0.1), model=m)
    backward(m)
    o.step()
    assert o.last_stats.updates is None and o.last_stats.update_norms is None and o.last_stats.update_ratio is None
    with pytest.raises(TypeError, match="track_updates must be a bool"):
        fastgrad.wrap(torch.optim.SGD(m.parameters(), lr=0.1), track_updates=1)


def test_detach_removes_the_tracker_hook():
    m = model64()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    att = fastgrad.attach(opt, model=m, track_updates=True)
    tracker = att.guard.tracker
    assert tracker._handles
    fastgrad.optim.detach(opt)
    assert not tracker._handles and not opt._optimizer_step_pre_hooks


class OldMonitor:
    """A monitor written before ``updates=``: must keep working (and is not passed it)."""

    def __init__(self):
        self.calls = []

    def stats_request(self):
        return {}

    def record(self, stats, *, clip_coef=None, skipped=None):
        self.calls.append(stats)


class KwMonitor(OldMonitor):
    def record(self, stats, **kw):
        self.calls.append(kw.get("updates"))


def test_old_monitors_keep_working_and_kwargs_monitors_get_updates():
    for mon_cls, expect in ((OldMonitor, False), (KwMonitor, True)):
        m = model64()
        mon = mon_cls()
        o = fastgrad.wrap(torch.optim.AdamW(m.parameters(), lr=0.01), model=m, monitor=mon, track_updates=True)
        backward(m)
        o.step()
        assert len(mon.calls) == 1
        got = mon.calls[0]
        if expect:
            assert got is o.last_stats.updates
        else:
            assert isinstance(got, fastgrad.GradStats)


def test_request_params_is_passed_to_grad_stats_and_checked():
    m = model64()

    class Mon(OldMonitor):
        def __init__(self, req):
            super().__init__()
            self.req = req

        def stats_request(self):
            return self.req

    o = fastgrad.wrap(torch.optim.SGD(m.parameters(), lr=0.1), model=m, monitor=Mon({"params": True}))
    backward(m)
    ref = torch.stack([p.detach().norm() for p in m.parameters()])  # the weights the pass read
    o.step()
    st = o.last_stats.stats
    torch.testing.assert_close(st.param_norms, ref, rtol=1e-12, atol=0)
    o2 = fastgrad.wrap(torch.optim.SGD(m.parameters(), lr=0.1), model=m, monitor=Mon({"params": "yes"}))
    backward(m)
    with pytest.raises(TypeError, match="params"):
        o2.step()


def run_monitored(tmp_path, steps=8, every=2, log_every=2, how="wrap"):
    m = model64()
    ns = fastgrad.NoiseScale(beta=0.5)
    mon = fastgrad.GradMonitor(m, every=every, log_every=log_every, weights=True, noise_scale=ns,
                               run_dir=tmp_path, histogram_every=0)
    opt = torch.optim.AdamW(m.parameters(), lr=0.02)
    if how == "wrap":
        o = fastgrad.wrap(opt, max_norm=1.0, monitor=mon, track_updates=True)
        stepper, last = o, (lambda: o.last_stats)
    else:
        fastgrad.attach(opt, max_norm=1.0, monitor=mon, track_updates=True)
        stepper, last = opt, (lambda: opt.last_stats)
    expected = {}
    ns_values = []
    for i in range(steps):
        backward(m)
        ns.update(torch.tensor(3.0 + i, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), 1, 4)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        stepper.step()
        assert (last().updates is not None) == (i % every == 0)
        if i % every == 0:
            exp = {}
            for layer in ("0", "2"):
                d = torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in m.named_parameters()
                               if n.startswith(layer + ".")])
                wb = torch.cat([before[n].reshape(-1) for n in before if n.startswith(layer + ".")])
                exp[layer] = (float(d.norm()), float(d.norm() / wb.norm()), float(wb.norm()))
            expected[i] = exp
            if (i // every + 1) % log_every == 0:
                ns_values.append((i, float(ns.b_simple)))
    mon.close()
    return m, mon, expected, ns_values


@pytest.mark.parametrize("how", ["wrap", "attach"])
def test_monitor_logs_weights_updates_and_noise_scale_per_layer(tmp_path, how):
    _, mon, expected, ns_values = run_monitored(tmp_path, how=how)
    recs = list(mon.records)
    assert [r.step for r in recs] == sorted(expected)
    for r in recs:
        exp = expected[r.step]
        assert r.layers == ("0", "2")
        np.testing.assert_allclose(r.update_norm, [exp[k][0] for k in r.layers], rtol=1e-6)
        np.testing.assert_allclose(r.update_ratio, [exp[k][1] for k in r.layers], rtol=1e-6)
        np.testing.assert_allclose(r.param_norm, [exp[k][2] for k in r.layers], rtol=1e-12)
        assert r.total_update_ratio > 0 and r.total_param_norm > 0
    assert [(r.step, r.noise_scale) for r in recs if r.noise_scale is not None] == [
        (s, pytest.approx(v, rel=1e-12)) for s, v in ns_values]

    lines = [json.loads(x) for x in (tmp_path / "gradients.jsonl").read_text().splitlines()]
    assert lines[0]["schema"] == 1 and lines[0]["schema_minor"] == 1
    step0 = next(x for x in lines if x["type"] == "step")
    assert {"param_norm", "update_norm", "update_ratio"} <= set(step0["layers"]["0"])
    assert {"param_norm", "update_norm", "update_ratio"} <= set(step0["total"])
    run = read_run(tmp_path)
    assert run.info.schema_minor == 1
    for a, b in zip(run.steps, recs):
        np.testing.assert_array_equal(a.update_ratio, b.update_ratio)
        np.testing.assert_array_equal(a.param_norm, b.param_norm)
        assert a.noise_scale == b.noise_scale and a.total_update_norm == b.total_update_norm


def test_monitor_without_health_options_writes_no_new_keys(tmp_path):
    m = model64()
    mon = fastgrad.GradMonitor(m, run_dir=tmp_path, log_every=2, histogram_every=0)
    o = fastgrad.wrap(torch.optim.SGD(m.parameters(), lr=0.1), monitor=mon)
    for _ in range(2):
        backward(m)
        o.step()
    mon.close()
    step = [json.loads(x) for x in (tmp_path / "gradients.jsonl").read_text().splitlines()][1]
    assert "param_norm" not in step["layers"]["0"] and "noise_scale" not in step
    r = mon.records[0]
    assert r.param_norm is None and r.update_ratio is None and r.noise_scale is None
    assert health_scalars(r) == []


def test_monitor_option_errors():
    m = model64()
    with pytest.raises(TypeError, match="weights must be a bool"):
        fastgrad.GradMonitor(m, loggers=(), weights=1)
    with pytest.raises(TypeError, match="noise_scale must be a fastgrad.NoiseScale"):
        fastgrad.GradMonitor(m, loggers=(), noise_scale=3.0)


def test_old_jsonl_without_version_loads_and_reports(tmp_path):
    """A schema 1.0 file (no schema_minor, no health keys) reads and draws the three figures."""
    pytest.importorskip("matplotlib")
    meta = {"type": "meta", "schema": 1, "norm_type": 2.0, "hist_min_exp": -64, "hist_max_exp": 16, "every": 1,
            "histogram_every": 100, "log_every": 50, "max_norm": None, "model": "Old", "detectors": [],
            "fastgrad_version": "0.0.9", "created": 0.0}
    lines = [meta] + [{"type": "step", "step": i, "time": 0.0,
                       "total": {"norm": 1.0, "max_abs": 0.5, "numel": 4, "nonfinite": 0, "zero": 0},
                       "clip_coef": None, "skipped": None,
                       "layers": {"a": {"norm": 1.0, "max_abs": 0.5, "numel": 4, "nan": 0, "posinf": 0,
                                        "neginf": 0, "zero": 0}}} for i in range(3)]
    (tmp_path / "gradients.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    run = read_run(tmp_path)
    assert run.info.schema_minor == 0
    assert all(s.update_ratio is None and s.param_norm is None and s.noise_scale is None for s in run.steps)
    from fastgrad.report import make_report
    out = make_report(tmp_path)
    assert set(out) == {"heatmap", "global_norm", "histogram", "html"}


def test_report_draws_update_ratio_heatmap_and_noise_scale(tmp_path):
    pytest.importorskip("matplotlib")
    run_monitored(tmp_path)
    from fastgrad.report import make_report, update_ratio_matrix
    out = make_report(tmp_path)
    assert {"update_ratio", "noise_scale"} <= set(out)
    for k in ("update_ratio", "noise_scale"):
        with open(out[k], "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    html = open(out["html"], encoding="utf-8").read()
    assert "Update-to-weight ratio" in html and "Gradient noise scale" in html
    layers, steps, ratio = update_ratio_matrix(read_run(tmp_path))
    assert layers == ["0", "2"] and steps.tolist() == [0, 2, 4, 6] and np.isfinite(ratio).all()


# -- the update-ratio spike detector ----------------------------------------------------------------
def rec(step, ratios, total=None):
    n = len(ratios)
    z = np.zeros(n, np.int64)
    return StepRecord(step=step, time=0.0, layers=tuple(f"l{i}" for i in range(n)), numel=np.ones(n, np.int64),
                      norm=np.ones(n), max_abs=np.ones(n), nan=z, posinf=z, neginf=z, zero=z, total_norm=1.0,
                      update_ratio=np.asarray(ratios, np.float64), total_update_ratio=total)


def feed(det, values, start=0):
    out = []
    for i, v in enumerate(values):
        out += det.update(rec(start + i, [v]))
    return out


@pytest.mark.parametrize("mult,fires", [(9.9, False), (10.1, True)])
def test_spike_relative_rule_either_side(mult, fires):
    det = UpdateRatioSpikeDetector(max_ratio=math.inf)
    base = [1e-3 * (1 + 0.2 * ((i % 5) - 2) / 2) for i in range(30)]  # 0.8e-3..1.2e-3, median 1e-3
    assert feed(det, base) == []
    f = feed(det, [1e-3 * mult], start=30)
    assert bool(f) == fires
    if fires:
        assert f[0].kind == "update_spike" and f[0].layers == ("l0",) and f[0].step == 30
        assert f[0].value == pytest.approx(1e-2 * mult / 10)
        assert det.flagged() == {"l0": 30}


@pytest.mark.parametrize("value,fires", [(0.099, False), (0.101, True)])
def test_spike_absolute_bound_either_side(value, fires):
    det = UpdateRatioSpikeDetector(factor=1e6)  # relative rule out of the way
    assert feed(det, [0.05] * 10) == []
    assert bool(feed(det, [value], start=10)) == fires


def test_spike_warmup_skipped_steps_cooldown_and_level_shift():
    det = UpdateRatioSpikeDetector(warmup=10, cooldown=3)
    # inside the warm-up nothing fires, however large (Adam's first steps, zero-init layers: Inf)
    assert feed(det, [math.inf, 0.5] + [1e-3] * 8) == []
    # skipped steps (ratio 0) carry no information and do not count
    assert feed(det, [0.0] * 5, start=10) == []
    assert det._seen["l0"] == 10
    f = feed(det, [5e-2], start=15)
    assert f and f[0].step == 15
    assert feed(det, [5e-2] * 3, start=16) == []  # same excursion: one finding
    # a lasting level shift is absorbed (clamped values fill the window's median) and then
    # stays quiet; the detector re-arms after the cooldown
    det2 = UpdateRatioSpikeDetector(max_ratio=math.inf, cooldown=3)
    feed(det2, [1e-3] * 20)
    found = feed(det2, [2e-2] * 60, start=20)
    assert len(found) == 1 and found[0].step == 20
    assert "l0" not in det2.flagged()


def test_spike_global_row_and_records_without_updates():
    det = UpdateRatioSpikeDetector(max_ratio=math.inf)
    for i in range(12):
        assert det.update(rec(i, [1e-3, 2e-3], total=1.5e-3)) == []
    f = det.update(rec(12, [1e-3, 2e-3], total=0.2))
    assert f and f[0].layers == ("<global>",)
    plain = rec(13, [1.0])
    object.__setattr__(plain, "update_ratio", None)
    assert det.update(plain) == []


def test_default_detectors_include_the_spike_detector():
    kinds = [d.kind for d in make_detectors("default")]
    assert "update_spike" in kinds
    with pytest.raises(ValueError, match="factor"):
        UpdateRatioSpikeDetector(factor=1.0)
    with pytest.raises(ValueError, match="max_ratio"):
        UpdateRatioSpikeDetector(max_ratio=0)


def test_health_scalars_tags():
    r = rec(0, [1e-3, 2e-3], total=1.5e-3)
    r.param_norm = np.array([1.0, 2.0])
    r.update_norm = np.array([1e-3, 4e-3])
    r.total_param_norm, r.total_update_norm, r.noise_scale = 2.2, 4.1e-3, 800.0
    tags = dict(health_scalars(r))
    assert tags == {"health/total_weight_norm": 2.2, "health/total_update_norm": 4.1e-3,
                    "health/total_update_ratio": 1.5e-3, "health/noise_scale": 800.0,
                    "weight_norm/l0": 1.0, "weight_norm/l1": 2.0, "update_norm/l0": 1e-3, "update_norm/l1": 4e-3,
                    "update_ratio/l0": 1e-3, "update_ratio/l1": 2e-3}
    assert set(dict(health_scalars(r, layers=False))) == {"health/total_weight_norm", "health/total_update_norm",
                                                          "health/total_update_ratio", "health/noise_scale"}


def test_tensorboard_writes_health_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = model64()
    mon = fastgrad.GradMonitor(m, run_dir=tmp_path, loggers=("tensorboard",), weights=True, log_every=2,
                               histogram_every=0)
    o = fastgrad.wrap(torch.optim.AdamW(m.parameters(), lr=0.01), monitor=mon, track_updates=True)
    for _ in range(2):
        backward(m)
        o.step()
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"health/total_weight_norm", "health/total_update_ratio", "update_ratio/0", "weight_norm/2"} <= tags
    got = [e.value for e in acc.Scalars("update_ratio/0")]
    np.testing.assert_allclose(got, [r.update_ratio[0] for r in mon.records], rtol=1e-6)


def test_pickled_and_copied_wrapper_keeps_tracking_on_its_own_optimizer():
    import copy
    import pickle

    m = model64()
    o = fastgrad.wrap(torch.optim.AdamW(m.parameters(), lr=0.05), model=m, track_updates=True)
    backward(m)
    o.step()
    for c in (copy.deepcopy(o), pickle.loads(pickle.dumps(o))):
        assert c._guard.tracker is not None and c._guard.tracker.optimizer is c.optimizer
        backward(c._guard.options.model)  # the copy's own model (its parameters are the copy's)
        before = [p.detach().clone() for p in c.optimizer.param_groups[0]["params"]]
        c.step()
        after = c.optimizer.param_groups[0]["params"]
        ref = torch.stack([(p.detach() - b).norm() for p, b in zip(after, before)])
        assert (ref > 0).all()
        torch.testing.assert_close(c.last_stats.update_norms, ref, rtol=1e-6, atol=0)
