"""Documented rules pinned exactly, each by a test that fails on the small realistic bug it exists for.

Every test here was checked to fail against its bug planted in a scratch copy (docs/testing.md
lists them): ``GradStats.neginf_count`` returning the +Inf counts, ``nonfinite_count`` /
``nonfinite_names()`` ignoring -Inf, SpikeSkip's standard deviation taken with ``n`` instead of
``n - 1``, PerTensorNorm ignoring a GradScaler's scale. (The detector rules are pinned in
tests/test_detector_rules.py.) Inputs are synthetic and exact: norms sit a relative 1e-9 either
side of each threshold, far above float64 rounding and far below any real effect.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import fastgrad
from fastgrad import clip
from fastgrad.optim import SpikeSkip

BACKENDS = ["reference", "cpu"]
INF = math.inf


def f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# -- GradStats counts: +Inf, -Inf, NaN kept apart ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_posinf_neginf_nan_counts_are_distinct(backend, dtype):
    # different numbers of each kind, so that any swap of two columns shows
    xs = [
        torch.tensor([-INF, -INF, -INF, INF, math.nan, math.nan, 0.0, -0.0, 1.5], dtype=dtype),
        torch.tensor([INF, INF, -INF, 2.0], dtype=dtype),
        torch.tensor([math.nan, 3.0, 0.0], dtype=dtype),
    ]
    s = fastgrad.grad_stats(xs, backend=backend, groups=["a", "a", "b"])
    assert s.neginf_count.tolist() == [3, 1, 0]
    assert s.posinf_count.tolist() == [1, 2, 0]
    assert s.nan_count.tolist() == [2, 0, 1]
    assert s.zero_count.tolist() == [2, 0, 1]
    assert s.nonfinite_count.tolist() == [6, 3, 1]
    assert s.groups.neginf_count.tolist() == [4, 0] and s.groups.posinf_count.tolist() == [3, 0]
    assert s.total.neginf_count.tolist() == [4] and s.total.posinf_count.tolist() == [3]
    assert s.total.nonfinite_count.tolist() == [10]
    d = s.to_dict()
    assert (d["[0]"]["neginf"], d["[0]"]["posinf"], d["[0]"]["nan"], d["[0]"]["zero"]) == (3, 1, 2, 2)
    assert (d["[1]"]["neginf"], d["[1]"]["posinf"]) == (1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_holding_only_neginf_is_nonfinite(backend):
    xs = [torch.ones(3), torch.tensor([-INF]), torch.full((4,), -INF), torch.tensor([0.5, -0.25])]
    s = fastgrad.grad_stats(xs, names=["ok", "one", "all", "fine"], backend=backend)
    assert s.nonfinite_count.tolist() == [0, 1, 4, 0]
    assert s.nonfinite_names() == ["one", "all"]
    assert s.total.nonfinite_count.item() == 5
    assert s.tensor_norms[1].item() == INF and s.total_norm.item() == INF
    assert s.max_abs[2].item() == INF
    # the summary's inf column counts both signs
    row = next(line for line in s.summary().splitlines() if line.startswith("all"))
    assert row.split()[5] == "4"


def test_only_neginf_gradient_is_skipped_and_named_by_the_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0, model=model)
    model(torch.ones(4, 3)).sum().backward()
    model[1].bias.grad.fill_(-INF)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.last_stats.nonfinite.item() and opt.last_stats.skipped.item()
    assert opt.last_stats.nonfinite_names() == ["1.bias"] and opt.nonfinite_names() == ["1.bias"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_clip_grad_norm_error_names_a_neginf_only_gradient():
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    for p in ps:
        p.grad = torch.ones(2)
    ps[1].grad = torch.full((2,), -INF)
    with pytest.raises(RuntimeError, match=r"\[1\] \(0 NaN, 0 \+Inf, 2 -Inf\)"):
        fastgrad.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)


# -- SpikeSkip: n - mean(h) > sigma * std(h), std unbiased -----------------------------------------


def _fed(window: int, history: list[float], sigma: float = 1.0) -> SpikeSkip:
    s = SpikeSkip(sigma=sigma, window=window)
    for v in history:
        s.update(f64(v), torch.tensor(True))
    return s


@pytest.mark.parametrize("history", [[1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 0.6, 0.9, 0.4, 0.8], [10.0, 10.5, 9.0]])
@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_spike_skip_threshold_uses_the_unbiased_std(history, sigma):
    thr = statistics.fmean(history) + sigma * statistics.stdev(history)  # stdev: n - 1
    biased = statistics.fmean(history) + sigma * statistics.pstdev(history)
    assert biased < thr * (1 - 1e-6)  # the n-denominator threshold sits inside the gap tested below
    s = _fed(len(history), history, sigma)
    assert s.check(f64(thr * (1 + 1e-9))).item() is True
    assert s.check(f64(thr * (1 - 1e-9))).item() is False
    assert s.check(f64((thr + biased) / 2)).item() is False


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_spike_skip_threshold_exact_case_is_strict(sigma):
    # h = [1, 3, 5]: mean 3, unbiased variance 8 / 2 = 4, std 2, all exact in float64
    s = _fed(3, [1.0, 3.0, 5.0], sigma)
    thr = 3.0 + 2.0 * sigma
    assert s.check(f64(thr)).item() is False  # "n - mean > sigma * std": equal is not a spike
    assert s.check(f64(math.nextafter(thr, INF))).item() is True
    assert s.check(f64(3.0 + math.sqrt(8 / 3) * sigma + 0.01)).item() is False  # above the n-denominator rule


def test_spike_skip_window_is_a_ring_of_the_last_norms():
    s = _fed(3, [100.0, 100.0, 100.0, 1.0, 2.0, 3.0])  # the 100s have left the window
    thr = 2.0 + statistics.stdev([1.0, 2.0, 3.0])
    assert s.check(f64(thr * (1 + 1e-9))).item() and not s.check(f64(thr * (1 - 1e-9))).item()
    s.update(f64(50.0), torch.tensor(False))  # not ok: not appended
    assert s.check(f64(thr * (1 + 1e-9))).item() and not s.check(f64(thr * (1 - 1e-9))).item()
    assert s.count.item() == 3


@pytest.mark.parametrize("window", [2, 3, 8, 9])
def test_spike_skip_becomes_active_at_half_the_window(window):
    need = max(2, window // 2)  # norms known including the one checked
    s = SpikeSkip(sigma=1.0, window=window)
    for k in range(window):
        active = k + 1 >= need and k >= 2
        assert s.check(f64(1e30)).item() is active, (window, k)
        s.update(f64(1.0 + 0.5 * (k % 2)), torch.tensor(True))


def test_spike_skip_through_wrap_skips_at_the_threshold_and_keeps_the_spike_in_the_window():
    """Through the optimizer: the global norm of a one-element gradient is |g| exactly."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = fastgrad.wrap(torch.optim.SGD([p], lr=1.0), spike_skip=SpikeSkip(sigma=2.0, window=4))
    history = [1.0, 1.5, 1.25]
    for v in history:
        p.grad = torch.tensor([-v], dtype=torch.float64)
        opt.step()
        assert not opt.last_stats.skipped.item()
    thr = statistics.fmean(history) + 2.0 * statistics.stdev(history)
    p.grad = torch.tensor([thr * (1 - 1e-9)], dtype=torch.float64)
    opt.step()
    assert not opt.last_stats.spike.item()
    window = history + [thr * (1 - 1e-9)]
    thr2 = statistics.fmean(window) + 2.0 * statistics.stdev(window)
    p.grad = torch.tensor([thr2 * (1 + 1e-9)], dtype=torch.float64)
    before = p.detach().clone()
    opt.step()
    assert opt.last_stats.spike.item() and opt.last_stats.skipped.item() and torch.equal(p, before)
    assert opt.counters["spike_steps"].item() == 1 and opt.counters["skipped_steps"].item() == 1
    # the skipped spike entered the window (every finite norm does): the oldest norm left it
    window = (window + [thr2 * (1 + 1e-9)])[-4:]
    thr3 = statistics.fmean(window) + 2.0 * statistics.stdev(window)
    sk = opt._guard.spike_skip
    assert sk.check(f64(thr3 * (1 + 1e-9))).item() and not sk.check(f64(thr3 * (1 - 1e-9))).item()


def test_spike_skip_ignores_nonfinite_norms():
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    spike = SpikeSkip(sigma=6.0, window=4)
    opt = fastgrad.wrap(torch.optim.SGD([p], lr=1.0), spike_skip=spike)
    for v in (1.0, 2.0, float("inf"), 1.5):
        p.grad = torch.tensor([v], dtype=torch.float64)
        opt.step()
    assert spike.count.item() == 3  # the Inf step is skipped as non-finite, not entered
    assert opt.counters["nonfinite_steps"].item() == 1 and opt.counters["spike_steps"].item() == 0


# -- PerTensorNorm with a GradScaler: thresholds apply to true gradients ----------------------------


TRUE_GRADS = [[3.0, 4.0], [0.06, 0.08, 0.0], [-1.5, 2.0], [0.0, 0.0]]  # norms 5, 0.1, 2.5, 0


def _keras(g: list[float], max_norm: float) -> list[float]:
    n = math.sqrt(math.fsum(x * x for x in g))
    return [x * max_norm / max(n, max_norm) for x in g]


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_fused", "adamw_fused"])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_per_tensor_norm_under_a_grad_scaler_clips_true_gradients(opt_name, unscale_first):
    ps = [torch.nn.Parameter(torch.zeros(len(g))) for g in TRUE_GRADS]
    targets = [torch.tensor(g) for g in TRUE_GRADS]
    make = {"sgd": lambda: torch.optim.SGD(ps, lr=1.0),
            "sgd_fused": lambda: torch.optim.SGD(ps, lr=1.0, fused=True),
            "adamw_fused": lambda: torch.optim.AdamW(ps, lr=1e-3, fused=True)}[opt_name]
    opt = fastgrad.wrap(make(), clipper=clip.PerTensorNorm(1.0))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    loss = sum((p * t).sum() for p, t in zip(ps, targets))  # d loss / d p = t exactly
    scaler.scale(loss).backward()
    assert ps[0].grad[0].item() == 3.0 * 2**12
    if unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    want = [_keras(g, 1.0) for g in TRUE_GRADS]
    for p, w in zip(ps, want):
        torch.testing.assert_close(p.grad, torch.tensor(w), rtol=1e-6, atol=1e-9)
    if opt_name.startswith("sgd"):  # p = 0 - lr * clipped true gradient
        for p, w in zip(ps, want):
            torch.testing.assert_close(p.detach(), -torch.tensor(w), rtol=1e-6, atol=1e-9)
    coefs = opt.last_stats.clip_coef
    assert coefs.dtype == torch.float64
    assert coefs.tolist() == pytest.approx([0.2, 1.0, 0.4, 1.0], rel=1e-12)
    assert opt.last_stats.total_norm.item() == pytest.approx(math.sqrt(25 + 0.01 + 6.25), rel=1e-6)


def test_per_tensor_norm_coefficients_either_side_of_max_norm():
    c = clip.PerTensorNorm(2.0)
    n = torch.tensor([2.0 * (1 - 1e-9), 2.0, 2.0 * (1 + 1e-9), 0.0, 8.0], dtype=torch.float64)
    got = c.coefficients(n).tolist()
    assert got[:2] == [1.0, 1.0] and got[3] == 1.0
    assert got[2] == pytest.approx(1 / (1 + 1e-9), rel=1e-15) and got[2] < 1.0
    assert got[4] == 0.25
    assert clip.PerTensorNorm(0.0).coefficients(n).tolist() == [0.0] * 5
