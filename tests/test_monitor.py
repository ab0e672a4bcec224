"""GradMonitor and the detectors: on real vanishing / exploding / healthy / dead networks, and the sync contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastgrad
from fastgrad.detectors import (
    DeadLayerDetector,
    ExplodingDetector,
    NonFiniteDetector,
    VanishingDetector,
    default_detectors,
)
from fastgrad.monitor import GradMonitor, block_group


def sigmoid_mlp(depth=16, width=32):
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Sigmoid()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def relu_mlp(depth=6, width=32, std=None):
    layers = []
    for _ in range(depth):
        lin = torch.nn.Linear(width, width)
        if std is not None:
            torch.nn.init.normal_(lin.weight, std=std / math.sqrt(width))
            torch.nn.init.zeros_(lin.bias)
        layers += [lin, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def data(width=32, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    return x, torch.sin(3 * x[:, :1])


def train(model, monitor, steps, opt=None, width=32, on_step=None):
    x, y = data(width)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if on_step is not None:
            on_step(i, model)
        monitor.step()
        opt.step()
    monitor.flush()


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Tiny matrices: one thread is fastest, and OpenMP spinning on a busy 2-core CI box is not.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# -- detectors on real networks ------------------------------------------------------------
def test_vanishing_fires_on_deep_sigmoid_mlp_naming_the_input_layers():
    m = GradMonitor(sigmoid_mlp(), loggers=(), log_every=7, histogram_every=0)
    train(m.model, m, 20)
    van = [f for f in m.findings if f.kind == "vanishing"]
    assert van, m.findings_text()
    f = van[0]
    assert "0" in f.layers and "32" not in f.layers  # the input layer vanishes, the output layer does not
    assert f.step == f.first_step + 10 - 1  # patience 10, exact step although found at a later flush
    assert "0" in f.message and f"steps {f.first_step}-{f.step}" in f.message
    assert not [f for f in m.findings if f.kind in ("exploding", "nonfinite")]
    assert "VANISHING" in m.summary()


def test_exploding_and_nonfinite_fire_on_badly_initialised_relu_mlp():
    model = relu_mlp(depth=16, std=1.6)
    first_bad = []

    def watch(i, model):  # independent truth: the first step with a non-finite gradient
        if not first_bad and not all(torch.isfinite(p.grad).all() for p in model.parameters()):
            first_bad.append(i)

    m = GradMonitor(model, loggers=(), log_every=4, histogram_every=0)
    train(model, m, 12, opt=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), on_step=watch)
    kinds = [f.kind for f in m.findings]
    assert "exploding" in kinds and "nonfinite" in kinds, m.findings_text()
    nf = next(f for f in m.findings if f.kind == "nonfinite")
    assert first_bad and nf.step == first_bad[0]
    assert f"first at step {first_bad[0]}" in nf.message
    ex = next(f for f in m.findings if f.kind == "exploding")
    assert ex.step < nf.step  # the norm ran away before it overflowed
    assert kinds.count("nonfinite") == 1  # one episode, not one finding per NaN step


@pytest.mark.parametrize("which", ["mlp", "transformer"])
def test_detectors_stay_silent_on_healthy_networks(which):
    if which == "mlp":
        model = relu_mlp(depth=6)
        x, y = data()
        loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
    else:
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                                    torch.nn.Linear(32, 1))
        x = torch.randn(8, 12, 32)
        y = torch.randn(8, 12, 1)
        loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    m = GradMonitor(model, loggers=(), log_every=10, histogram_every=5)
    for _ in range(40):
        opt.zero_grad()
        loss_fn().backward()
        m.step()
        opt.step()
    m.close()
    assert m.findings == [], m.findings_text()
    assert len(m.records) == 40


def test_dead_layer_detector_fires_on_all_zero_gradients():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alive = torch.nn.Linear(8, 8)
            self.dead = torch.nn.Linear(8, 8)
            self.out = torch.nn.Linear(8, 1)

        def forward(self, x):  # ReLU of a hugely negative pre-activation: no gradient ever reaches `dead`
            return self.out(self.alive(x) + torch.relu(self.dead(x) - 1e4))

    m = GradMonitor(Net(), loggers=(), log_every=2)
    train(m.model, m, 5, width=8)
    dead = [f for f in m.findings if f.kind == "dead"]
    assert len(dead) == 1 and dead[0].layers == ("dead",) and dead[0].step == 2
    assert not [f for f in m.findings if f.kind == "vanishing" and "dead" in f.layers]


def test_exploding_zscore_spike_and_hysteresis():
    from fastgrad.loggers.base import StepRecord

    def rec(step, norm):
        one = np.ones(1, np.int64)
        return StepRecord(step, 0.0, ("a",), one * 100, np.array([norm]), np.array([norm]), one * 0, one * 0,
                          one * 0, one * 0, norm)

    det = ExplodingDetector(max_norm=None, max_rms=None)
    rng = np.random.default_rng(0)
    fired = []
    for s in range(200):
        norm = 1.0 * math.exp(rng.normal(0, 0.05))
        if s in (60, 62, 64):  # three spikes close together: one episode
            norm = 50.0
        if s == 150:  # a later, separate spike
            norm = 80.0
        fired += det.update(rec(s, norm))
    assert [f.step for f in fired] == [60, 150], [f.message for f in fired]
    assert "spiked" in fired[0].message and "<global>" in fired[0].layers


def test_detector_arguments_are_checked():
    with pytest.raises(ValueError):
        VanishingDetector(relative=2.0)
    with pytest.raises(TypeError):
        VanishingDetector(patience=1.5)
    with pytest.raises(ValueError):
        ExplodingDetector(alpha=1.5)
    with pytest.raises(ValueError):
        DeadLayerDetector(patience=0)
    with pytest.raises(ValueError):
        NonFiniteDetector(cooldown=0)
    assert {d.kind for d in default_detectors()} == {"vanishing", "exploding", "nonfinite", "dead"}


# -- the monitor's contract -----------------------------------------------------------------
def tiny():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def backward(model):
    model.zero_grad()
    model(torch.randn(5, 4)).pow(2).sum().backward()


def test_every_and_histogram_every_pick_the_steps():
    model = tiny()
    m = GradMonitor(model, every=2, histogram_every=4, log_every=100, loggers=())
    for _ in range(9):
        backward(model)
        m.step()
    m.flush()
    assert [r.step for r in m.records] == [0, 2, 4, 6, 8]
    assert [r.step for r in m.records if r.histograms is not None] == [0, 4, 8]
    assert m.num_steps == 9


def test_records_equal_grad_stats():
    model = tiny()
    m = GradMonitor(model, loggers=(), histogram_every=1)
    backward(model)
    stats = m.step()
    m.flush()
    r = m.records[-1]
    g = stats.groups
    assert r.layers == g.names == ("0", "2")
    np.testing.assert_array_equal(r.norm, g.norm(2).numpy())
    np.testing.assert_array_equal(r.max_abs, g.max_abs.numpy())
    np.testing.assert_array_equal(r.histograms, g.histogram.numpy())
    np.testing.assert_array_equal(r.zero, g.zero_count.numpy())
    assert r.numel.tolist() == [4 * 8 + 8, 8 * 2 + 2]
    assert r.total_norm == pytest.approx(float(stats.total_norm), rel=1e-12)


def test_record_from_a_wrapper_with_clip_and_skip():
    model = tiny()
    m = GradMonitor(model, every=2, loggers=(), histogram_every=0)
    for i in range(4):
        backward(model)
        req = m.stats_request()
        assert (req is None) == (i % 2 == 1)
        stats = fastgrad.grad_stats(model, **(req or {}))
        m.record(stats, clip_coef=torch.tensor(0.25, dtype=torch.float64), skipped=torch.tensor(i == 2))
    m.flush()
    assert [(r.step, r.clip_coef, r.skipped, r.clipped) for r in m.records] == [(0, 0.25, False, True),
                                                                                 (2, 0.25, True, True)]


def test_no_host_sync_until_flush_then_one_transfer(monkeypatch):
    model = tiny()
    m = GradMonitor(model, log_every=5, loggers=(), histogram_every=1)
    backward(model)
    m.step()  # warm up caches outside the watch

    def forbidden(*a, **k):
        raise AssertionError("host sync between flushes")

    transfers = []
    real_numpy = torch.Tensor.numpy
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self, *a, **k: transfers.append(1) or real_numpy(self, *a, **k))
    for _ in range(3):
        backward(model)
        m.step()
    assert not m.records and not transfers
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):  # flushing may read the host copy
        monkeypatch.setattr(torch.Tensor, name, getattr(torch._C.TensorBase, name))
    backward(model)
    m.step()  # the 5th buffered step: flushes
    assert len(m.records) == 5 and len(transfers) == 1


def test_groups_block_and_module():
    assert block_group("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert block_group("0.weight") == "0"
    assert block_group("transformer.wte.weight") == "transformer.wte"
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model(torch.randn(2, 3, 8)).sum().backward()
    for groups, expect in (("block", ("layers.0", "layers.1")), (1, ("layers",))):
        m = GradMonitor(model, groups=groups, loggers=())
        m.step()
        m.close()
        assert m.records[0].layers == expect


def test_bad_arguments_raise():
    model = tiny()
    with pytest.raises(TypeError):
        GradMonitor("model")
    with pytest.raises(ValueError):
        GradMonitor(model, every=0)
    with pytest.raises(TypeError):
        GradMonitor(model, every=1.5)
    with pytest.raises(ValueError):
        GradMonitor(model, every=3, histogram_every=10)
    with pytest.raises(ValueError):
        GradMonitor(model, groups="layers")
    with pytest.raises(ValueError):
        GradMonitor(model, loggers=("nope",))
    with pytest.raises(TypeError):
        GradMonitor(model, loggers=(42,))
    with pytest.raises(ValueError):
        GradMonitor(model, detectors="all")
    with pytest.raises(TypeError):
        GradMonitor(model, detectors=[object()])
    with pytest.raises(ValueError):
        GradMonitor(model, max_norm=-1.0)
    with pytest.raises(TypeError):
        GradMonitor(model, loggers=()).record("stats")


def test_context_manager_closes_and_flushes():
    model = tiny()
    with GradMonitor(model, loggers=(), log_every=50) as m:
        backward(model)
        m.step()
        assert not m.records
    assert m.closed and len(m.records) == 1
    with pytest.raises(RuntimeError, match="closed"):
        m.step()
    m.close()  # idempotent


@pytest.mark.skipif(not hasattr(fastgrad, "wrap"), reason="fastgrad.wrap (the optimizer issue) is not there yet")
def test_monitor_through_wrap_shares_the_single_pass(monkeypatch):
    import fastgrad.monitor as monitor_mod
    import fastgrad.optim as optim_mod

    model = tiny()
    m = GradMonitor(model, loggers=(), histogram_every=2, log_every=3)
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.1, model=model, monitor=m)
    calls = []
    real = optim_mod.grad_stats
    monkeypatch.setattr(optim_mod, "grad_stats", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(monitor_mod, "grad_stats", lambda *a, **k: pytest.fail("monitor made its own pass"))
    for _ in range(4):
        backward(model)
        opt.step()
    m.close()
    assert len(calls) == 4 and calls[0]["groups"] == "module" and calls[1]["histogram"] is False
    assert [r.step for r in m.records] == [0, 1, 2, 3]
    assert [r.histograms is not None for r in m.records] == [True, False, True, False]
    for r in m.records:
        assert r.layers == ("0", "2")
        assert r.clip_coef == pytest.approx(min(1.0, 0.1 / (r.total_norm + 1e-6)), rel=1e-9)
        assert r.skipped is False
