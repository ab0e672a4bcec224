"""fastgrad.clip: each clipper against a plain float64 Python implementation of its paper's rule."""

from __future__ import annotations

import math
import random

import pytest
import torch

import fastgrad
from fastgrad import clip
from fastgrad.clip import ClipContext

TORCH_EPS = 1e-6


def ctx_for_norms(norms, updates=None):
    """One ClipContext per global norm (float64 0-d), as the optimizer integration builds them."""
    updates = updates or [True] * len(norms)
    for n, u in zip(norms, updates):
        t = torch.tensor(n, dtype=torch.float64)
        yield ClipContext([], [], [], t, t.reshape(1), None, torch.tensor(u))


def lognormal_norms(n, seed, spikes=()):
    rng = random.Random(seed)
    out = [math.exp(rng.gauss(0.0, 0.3)) for _ in range(n)]
    for i, factor in spikes:
        out[i] *= factor
    return out


# -- reference rules (plain Python floats) ---------------------------------------------------


def percentile_linear(values, q):
    """numpy.percentile(values, q) with the default 'linear' method."""
    v = sorted(values)
    rank = (len(v) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)


def autoclip_reference(norms, updates, percentile, history):
    """Seetharaman et al.: append the norm, clip to the percentile of the (windowed) history."""
    hist, coefs = [], []
    for n, u in zip(norms, updates):
        if u:
            hist.append(n)
            hist = hist[-history:]
        t = percentile_linear(hist, percentile) if hist else math.inf
        coefs.append(min(t / (n + TORCH_EPS), 1.0))
    return coefs


def zclip_reference(norms, alpha, z_thresh, warmup, eps=1e-6, max_norm=None, mode="adaptive"):
    """Kumar et al. 2025, as the authors' ZClip.step (zscore mode) with the norm given."""
    buf, mean, var, coefs, init = [], None, None, [], False
    for n in norms:
        if not init:
            buf.append(n)
            if len(buf) >= warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
                init = True
            coefs.append(1.0 if max_norm is None else min(max_norm / (n + TORCH_EPS), 1.0))
            continue
        std = var**0.5
        z = (n - mean) / (std + eps)
        clip_val = None
        if z > z_thresh:
            clip_val = mean + z_thresh * std / (z / z_thresh) if mode == "adaptive" else mean
        effective = clip_val if clip_val is not None else n
        if max_norm is not None:
            effective = min(effective, max_norm)
        coefs.append(effective / (n + TORCH_EPS) if n > effective else 1.0)
        x = clip_val if clip_val is not None else n
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return coefs, mean, var


def agc_reference(w, g, clip_factor, eps):
    """Brock et al. 2021, unit = index of dim 0 for dim >= 2, the whole tensor otherwise."""
    w, g = w.double(), g.double()
    if w.dim() <= 1:
        units = [(slice(None),)]
    else:
        units = [(i,) for i in range(w.shape[0])]
    out = g.clone()
    for u in units:
        wn = math.sqrt(sum(x * x for x in w[u].flatten().tolist()))
        gn = math.sqrt(sum(x * x for x in g[u].flatten().tolist()))
        cap = clip_factor * max(wn, eps)
        if gn > cap:
            out[u] = g[u] * (cap / max(gn, 1e-6))
    return out


# -- the tests -----------------------------------------------------------------------------------


def test_global_norm_coefficient():
    c = clip.GlobalNorm(1.5)
    for n in (0.0, 0.3, 1.5, 1.5000001, 7.0, 1e30):
        got = c.coefficient(next(ctx_for_norms([n]))).item()
        assert got == pytest.approx(min(1.5 / (n + TORCH_EPS), 1.0), rel=1e-15)


@pytest.mark.parametrize("percentile,history", [(10, 1000), (50, 7), (0, 5), (100, 3)])
def test_autoclip_matches_reference(percentile, history):
    norms = lognormal_norms(120, seed=history, spikes=[(30, 50.0), (90, 1e3)])
    updates = [i % 17 != 5 for i in range(len(norms))]  # some skipped steps leave the history alone
    c = clip.AutoClip(percentile=percentile, history=history)
    got = [c.coefficient(ctx).item() for ctx in ctx_for_norms(norms, updates)]
    want = autoclip_reference(norms, updates, percentile, history)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-12), f"step {i}"
    assert any(x < 1 for x in got)


def test_autoclip_first_step_skipped_does_not_clip():
    c = clip.AutoClip()
    ctx = next(ctx_for_norms([float("nan")], [False]))
    c.coefficient(ctx)
    assert c.count.item() == 0
    assert c.coefficient(next(ctx_for_norms([3.0]))).item() == pytest.approx(1.0)


@pytest.mark.parametrize("mode,max_norm", [("adaptive", None), ("mean", None), ("adaptive", 1.3)])
def test_zclip_matches_reference(mode, max_norm):
    norms = lognormal_norms(200, seed=7, spikes=[(40, 5.0), (41, 8.0), (120, 30.0), (150, 3.0)])
    c = clip.ZClip(alpha=0.9, z_thresh=2.0, warmup=10, max_norm=max_norm, mode=mode)
    got = [c.coefficient(ctx).item() for ctx in ctx_for_norms(norms)]
    want, mean, var = zclip_reference(norms, 0.9, 2.0, 10, max_norm=max_norm, mode=mode)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-12), f"step {i}"
    assert sum(x < 1 for x in got) >= 4
    assert c.mean.item() == pytest.approx(mean, rel=1e-12) and c.var.item() == pytest.approx(var, rel=1e-12)


def test_zclip_defaults_and_skipped_steps():
    norms = lognormal_norms(80, seed=3, spikes=[(60, 20.0)])
    c = clip.ZClip()  # alpha=0.97, z_thresh=2.5, warmup=25
    got = [c.coefficient(ctx).item() for ctx in ctx_for_norms(norms)]
    want, _, _ = zclip_reference(norms, 0.97, 2.5, 25)
    assert got == pytest.approx(want, rel=1e-12) and got[60] < 1
    # a step that is not applied leaves the state alone
    before = {k: v.clone() for k, v in c.state_dict().items() if isinstance(v, torch.Tensor)}
    c.coefficient(next(ctx_for_norms([float("nan")], [False])))
    after = c.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_per_tensor_norm_matches_keras():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((5, 3), (7,), (2, 2, 2), (1,))]
    scales = [10.0, 0.01, 1.0, 0.0]
    for p, s in zip(params, scales):
        p.grad = torch.randn(p.shape) * s
    want = []
    for p in params:
        g = p.grad.double()
        n = math.sqrt(sum(x * x for x in g.flatten().tolist()))
        want.append(g * 0.5 / max(n, 0.5))  # tf.clip_by_norm: t * c / max(||t||, c)
    stats = fastgrad.grad_stats(params, histogram=False)
    ctx = ClipContext(params, [p.grad for p in params], list(stats.names), stats.total_norm, stats.tensor_norms,
                      None, torch.tensor(True))
    coefs = clip.PerTensorNorm(0.5).apply_(ctx)
    assert coefs.shape == (4,) and coefs[1].item() == 1.0 and coefs[3].item() == 1.0
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad.double(), w, rtol=1e-6, atol=1e-12)


def test_value_clamps():
    params = [torch.nn.Parameter(torch.zeros(50))]
    params[0].grad = torch.linspace(-2, 2, 50)
    want = params[0].grad.double().clamp(-0.3, 0.3)
    ctx = ClipContext(params, [params[0].grad], ["w"], torch.tensor(1.0, dtype=torch.float64),
                      torch.ones(1, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), torch.tensor(True))
    params[0].grad.mul_(2.0)  # as if a GradScaler with S = 2 had not unscaled yet
    clip.Value(0.3).apply_(ctx)
    torch.testing.assert_close(params[0].grad.double(), want, rtol=0, atol=1e-7)


def _agc_layers():
    torch.manual_seed(1)
    mods = {
        "linear": torch.nn.Linear(12, 5),
        "conv": torch.nn.Conv2d(3, 4, 3),
        "embedding": torch.nn.Embedding(9, 6),
        "norm": torch.nn.LayerNorm(6),
    }
    named = [(f"{k}.{n}", p) for k, m in mods.items() for n, p in m.named_parameters()]
    for i, (name, p) in enumerate(named):
        g = torch.randn(p.shape) * (0.001 if i % 2 else 0.5)  # some units clipped, some not
        if name == "embedding.weight":
            with torch.no_grad():
                p[2].zero_()  # a zero unit: the eps floor applies
        p.grad = g
    return named


@pytest.mark.parametrize("amp_scale", [None, 8.0])
def test_agc_matches_reference(amp_scale):
    named = _agc_layers()
    want = {n: agc_reference(p, p.grad, 0.05, 1e-3) for n, p in named}
    want["norm.bias"] = dict(named)["norm.bias"].grad.double().clone()  # excluded: only unscaled
    params = [p for _, p in named]
    if amp_scale is not None:
        for p in params:
            p.grad.mul_(amp_scale)
    inv = None if amp_scale is None else torch.tensor(1 / amp_scale, dtype=torch.float64)
    ctx = ClipContext(params, [p.grad for p in params], [n for n, _ in named],
                      torch.tensor(1.0, dtype=torch.float64), torch.ones(len(params), dtype=torch.float64),
                      inv, torch.tensor(True))
    before = {n: p.grad.double() / (amp_scale or 1.0) for n, p in named}
    clip.AGC(clip_factor=0.05, eps=1e-3, exclude={"norm.bias"}).apply_(ctx)
    for n, p in named:
        torch.testing.assert_close(p.grad.double(), want[n], rtol=2e-6, atol=1e-12, msg=n)
    clipped = sum(not torch.allclose(want[n], before[n]) for n in want)
    assert 3 <= clipped < len(want), "the inputs must clip some tensors and leave others"


def test_agc_clips_some_units_only():
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.fill_(1.0)  # unit norm 2 -> cap 0.02 with clip_factor 0.01
    lin.weight.grad = torch.tensor([[1.0, 0, 0, 0], [0.001, 0, 0, 0], [0, 0, 0, 0.5]])
    lin.bias.grad = torch.zeros(3)
    ctx = ClipContext([lin.weight, lin.bias], [lin.weight.grad, lin.bias.grad], ["w", "b"],
                      torch.tensor(1.0, dtype=torch.float64), torch.ones(2, dtype=torch.float64), None,
                      torch.tensor(True))
    clip.AGC().apply_(ctx)
    rows = lin.weight.grad.norm(dim=1)
    assert rows[0].item() == pytest.approx(0.02, rel=1e-5) and rows[1].item() == pytest.approx(0.001)
    assert rows[2].item() == pytest.approx(0.02, rel=1e-5)


def test_clippers_through_wrap_match_reference():
    """AutoClip and ZClip inside a wrapped optimizer see the same norms as their references."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.0), clipper=clip.AutoClip(percentile=25, history=10))
    norms, coefs = [], []
    for step in range(25):
        opt.zero_grad()
        x = torch.randn(8, 6) * (20.0 if step in (9, 17) else 1.0)
        model(x).pow(2).mean().backward()
        norms.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm().item())
        opt.step()
        coefs.append(opt.last_stats.clip_coef.item())
    want = autoclip_reference(norms, [True] * len(norms), 25, 10)
    assert coefs == pytest.approx(want, rel=1e-9)


def test_state_dict_round_trip_and_mismatch():
    a = clip.AutoClip(percentile=30, history=4)
    for ctx in ctx_for_norms([1.0, 2.0, 3.0, 4.0, 5.0]):
        a.coefficient(ctx)
    sd = a.state_dict()
    b = clip.AutoClip(percentile=30, history=4)
    b.load_state_dict(sd)
    assert torch.equal(a.buffer, b.buffer) and a.count.item() == b.count.item() == 4
    nxt = list(ctx_for_norms([2.5]))
    assert a.coefficient(nxt[0]).item() == b.coefficient(nxt[0]).item()
    with pytest.raises(ValueError, match="configuration"):
        clip.AutoClip(percentile=31, history=4).load_state_dict(sd)
    with pytest.raises(ValueError, match="ZClip"):
        clip.ZClip().load_state_dict(sd)
    z = clip.ZClip(warmup=2)
    for ctx in ctx_for_norms([1.0, 2.0, 3.0]):
        z.coefficient(ctx)
    z2 = clip.ZClip(warmup=2)
    z2.load_state_dict(z.state_dict())
    assert z2.mean.item() == z.mean.item() and z2.initialized.item()


@pytest.mark.parametrize("factory,match", [
    (lambda: clip.GlobalNorm(-1.0), "max_norm"),
    (lambda: clip.PerTensorNorm(float("nan")), "max_norm"),
    (lambda: clip.Value(-0.1), "clip_value"),
    (lambda: clip.AutoClip(percentile=101), "percentile"),
    (lambda: clip.AutoClip(history=0), "history"),
    (lambda: clip.ZClip(alpha=1.0), "alpha"),
    (lambda: clip.ZClip(z_thresh=0), "z_thresh"),
    (lambda: clip.ZClip(warmup=0), "warmup"),
    (lambda: clip.ZClip(mode="pct"), "mode"),
    (lambda: clip.AGC(clip_factor=-0.01), "clip_factor"),
    (lambda: clip.AGC(eps=-1), "eps"),
])
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# -- messages, repr, state validation and edge values (pinned for mutation testing) -------------


@pytest.mark.parametrize("factory,exc,match", [
    (lambda: clip.GlobalNorm(-1.0), ValueError, r"^GlobalNorm: max_norm must be >= 0, got -1\.0$"),
    (lambda: clip.GlobalNorm("-1"), ValueError, r"^GlobalNorm: max_norm must be >= 0, got '-1'$"),
    (lambda: clip.GlobalNorm(None), TypeError, r"^GlobalNorm: max_norm must be a number, got NoneType$"),
    (lambda: clip.PerTensorNorm(float("nan")), ValueError, r"^PerTensorNorm: max_norm must be >= 0, got nan$"),
    (lambda: clip.Value(-0.1), ValueError, r"^Value: clip_value must be >= 0, got -0\.1$"),
    (lambda: clip.AutoClip(percentile=101), ValueError, r"^AutoClip: percentile must be in \[0, 100\], got 101$"),
    (lambda: clip.AutoClip(history=0), ValueError, r"^AutoClip: history must be a positive int, got 0$"),
    (lambda: clip.AutoClip(history=True), ValueError, r"^AutoClip: history must be a positive int, got True$"),
    (lambda: clip.AutoClip(history=2.0), ValueError, r"^AutoClip: history must be a positive int, got 2\.0$"),
    (lambda: clip.ZClip(alpha=1.0), ValueError, r"^ZClip: alpha must be in \[0, 1\), got 1\.0$"),
    (lambda: clip.ZClip(z_thresh=0), ValueError, r"^ZClip: z_thresh must be > 0, got 0$"),
    (lambda: clip.ZClip(warmup=0), ValueError, r"^ZClip: warmup must be an int >= 1, got 0$"),
    (lambda: clip.ZClip(warmup=True), ValueError, r"^ZClip: warmup must be an int >= 1, got True$"),
    (lambda: clip.ZClip(mode="pct"), ValueError, r"^ZClip: mode must be 'adaptive' or 'mean', got 'pct'$"),
    (lambda: clip.ZClip(max_norm=-1.0), ValueError, r"^ZClip: max_norm must be >= 0, got -1\.0$"),
    (lambda: clip.ZClip(eps=-1.0), ValueError, r"^ZClip: eps must be >= 0, got -1\.0$"),
    (lambda: clip.AGC(clip_factor=0.0), ValueError, r"^AGC: clip_factor must be > 0, got 0\.0$"),
    (lambda: clip.AGC(exclude=3), TypeError,
     r"^AGC: exclude must be a container of parameter names or a callable name -> bool$"),
])
def test_argument_error_messages(factory, exc, match):
    with pytest.raises(exc, match=match):
        factory()


def test_edge_values_accepted():
    assert clip.AutoClip(percentile=0).percentile == 0.0 and clip.AutoClip(percentile=100).percentile == 100.0
    assert clip.ZClip(alpha=0.0).alpha == 0.0 and clip.ZClip(warmup=1).warmup == 1
    assert clip.AutoClip(history=1).history == 1 and clip.ZClip(eps=0.0).eps == 0.0
    assert clip.GlobalNorm(0).coefficient(next(ctx_for_norms([3.0]))).item() == 0.0
    assert repr(clip.AutoClip()) == "AutoClip(percentile=10.0, history=1000)"
    assert repr(clip.GlobalNorm(2)) == "GlobalNorm(max_norm=2.0)"
    assert repr(clip.ZClip(max_norm=1.0)) == ("ZClip(alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-06, max_norm=1.0, "
                                              "mode='adaptive')")
    assert repr(clip.AGC()) == "AGC(clip_factor=0.01, eps=0.001)"


def test_autoclip_threshold_edges():
    c = clip.AutoClip(percentile=50, history=3)
    c._ensure(torch.device("cpu"))
    assert c.threshold().item() == math.inf  # empty history: no clipping
    got = [c.coefficient(ctx).item() for ctx in ctx_for_norms([2.0, 4.0, 4.0, 1.0])]
    # histories [2] -> 2, [2,4] -> 3, [2,4,4] -> 4, [4,4,1] -> 4 (torch's 1e-6: clipped at equality)
    assert got == pytest.approx([2 / (2 + TORCH_EPS), 3 / (4 + TORCH_EPS), 4 / (4 + TORCH_EPS), 1.0], rel=1e-15, abs=0)
    assert c.count.item() == 3 and c.pos.item() == 1 and c.buffer.tolist() == [1.0, 4.0, 4.0]
    assert c.threshold().item() == 4.0
    big = clip.AutoClip(percentile=100, history=2)
    big.coefficient(next(ctx_for_norms([float("inf")])))
    assert big.threshold().item() == math.inf  # inf - inf avoided: repeated values are exact


def _loaded_error(c, sd, match):
    with pytest.raises(ValueError, match=match):
        c.load_state_dict(sd)


def test_state_dict_validation_messages_and_dtypes():
    a = clip.AutoClip(percentile=30, history=4)
    for ctx in ctx_for_norms([1.0, 2.0]):
        a.coefficient(ctx)
    sd = a.state_dict()
    assert sd["type"] == "AutoClip" and sd["config"] == {"percentile": 30.0, "history": 4}
    assert sd["buffer"] is not a.buffer and torch.equal(sd["buffer"], a.buffer)
    fresh = lambda: clip.AutoClip(percentile=30, history=4)  # noqa: E731
    _loaded_error(fresh(), {**sd, "type": "ZClip"}, r"^state_dict is for clipper 'ZClip', not AutoClip$")
    _loaded_error(fresh(), {k: v for k, v in sd.items() if k != "pos"}, r"^AutoClip: state_dict lacks \['pos'\]$")
    _loaded_error(fresh(), {**sd, "buffer": torch.zeros(5, dtype=torch.float64)},
                  r"^AutoClip: state_dict\['buffer'\] must be a tensor of shape \(4,\)")
    _loaded_error(fresh(), {**sd, "count": 2}, r"^AutoClip: state_dict\['count'\] must be a tensor of shape \(\)")
    b = fresh()
    b.load_state_dict({**sd, "buffer": sd["buffer"].float(), "count": sd["count"].int()})
    assert b.buffer.dtype == torch.float64 and b.count.dtype == torch.int64 and b.count.item() == 2
    assert b.buffer.is_contiguous() and b.buffer.tolist() == [1.0, 2.0, 0.0, 0.0]
    sd["buffer"][0] = 99.0  # the loaded state is a copy
    assert b.buffer[0].item() == 1.0
    z = clip.ZClip(warmup=3)
    zsd = z.state_dict()
    assert set(zsd) == {"type", "config", "buffer", "seen", "mean", "var"} and zsd["buffer"].shape == (3,)
    _loaded_error(clip.ZClip(warmup=3), {**zsd, "mean": torch.zeros(2, dtype=torch.float64)},
                  r"^ZClip: state_dict\['mean'\] must be a tensor of shape \(\)")
    _loaded_error(clip.ZClip(warmup=3, alpha=0.5), zsd, r"^ZClip: saved configuration .* differs from this clipper's")
    assert clip.GlobalNorm(1.0).state_dict() == {"type": "GlobalNorm", "config": {"max_norm": 1.0}}


def test_zclip_warmup_cap_and_mean_mode_spike():
    c = clip.ZClip(alpha=0.5, z_thresh=1.0, warmup=2, max_norm=3.0, mode="mean")
    got = [c.coefficient(ctx).item() for ctx in ctx_for_norms([1.0, 6.0, 3.5, 20.0])]
    # warm-up: the cap 3 only; then mu = 3.5, var = 6.25 (population): 3.5 is no spike but the cap
    # clips it; 20 is a spike (z = 6.6) clipped to mu = 3.5, then the cap 3
    assert got[0] == 1.0 and got[1] == pytest.approx(3 / (6 + TORCH_EPS), rel=1e-15, abs=0)
    assert got[2] == pytest.approx(3 / (3.5 + TORCH_EPS), rel=1e-15, abs=0)
    assert got[3] == pytest.approx(3 / (20 + TORCH_EPS), rel=1e-15, abs=0)
    assert c.initialized.item() and c.seen.item() == 2
    # the EMA after 3.5 (no spike) then 20 fed as mu (a spike in mean mode)
    mu1 = 0.5 * 3.5 + 0.5 * 3.5
    var1 = 0.5 * 6.25 + 0.5 * (3.5 - mu1) ** 2
    mu2 = 0.5 * mu1 + 0.5 * mu1
    var2 = 0.5 * var1 + 0.5 * (mu1 - mu2) ** 2
    assert c.mean.item() == pytest.approx(mu2, rel=1e-15) and c.var.item() == pytest.approx(var2, rel=1e-15)


def test_per_tensor_norm_and_value_config():
    assert repr(clip.PerTensorNorm(0.5)) == "PerTensorNorm(max_norm=0.5)"
    assert clip.PerTensorNorm(0.5).state_dict() == {"type": "PerTensorNorm", "config": {"max_norm": 0.5}}
    assert repr(clip.Value(0.25)) == "Value(clip_value=0.25)"
    with pytest.raises(ValueError, match="configuration"):
        clip.PerTensorNorm(0.5).load_state_dict(clip.PerTensorNorm(1.0).state_dict())
