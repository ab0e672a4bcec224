"""fastgrad.wrap / attach / detach: same result as clip_grad_norm_ + step, sync-free, bit-exact skips."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastgrad
from fastgrad import clip
from fastgrad.optim import FastgradOptimizer, SpikeSkip

REL = 1e-6  # the bound on parameters after 50 steps

OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd_momentum_fused": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(11, 8), torch.nn.Flatten(), torch.nn.Linear(24, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    )


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 11, (16, 3), generator=g), torch.randn(16, 4, generator=g)


def loss_of(model, step: int, factor: float = 1.0):
    x, y = batch(step)
    return ((model(x) - y) ** 2).mean() * (10.0 * factor)  # large enough that max_norm clips


def assert_params_close(a: torch.nn.Module, b: torch.nn.Module, rel: float = REL) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        scale = pb.detach().abs().max().clamp_min(1e-30)
        err = ((pa - pb).abs().max() / scale).item()
        assert err <= rel, f"{name}: max |ours - torch| / max |torch| = {err:.3g} > {rel}"


def float64_norm(model) -> float:
    """The global 2-norm of the model's gradients, summed in float64 (math.fsum) from the float32 values."""
    return math.sqrt(math.fsum(x * x for p in model.parameters() if p.grad is not None
                               for x in p.grad.double().flatten().tolist()))


def assert_same_state(a: dict, b: dict) -> None:
    """Two optimizer ``state_dict()["state"]`` equal: same keys, tensors bit for bit."""
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].keys() == b[k].keys(), k
        for kk, v in a[k].items():
            w = b[k][kk]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, kk)


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def assert_bitwise_same(before, model, opt):
    params, state = before
    for p0, p in zip(params, model.parameters()):
        assert torch.equal(p0, p), "a parameter changed on a skipped step"
    now = opt.state_dict()["state"]
    assert state.keys() == now.keys()
    for k in state:
        for kk, v in state[k].items():
            w = now[k][kk]
            assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), f"state[{k}][{kk}] changed"


# -- equivalence with torch -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["wrap", "attach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_clip_grad_norm_then_step(name, how):
    ours, theirs = make_model(), make_model()
    make = OPTIMIZERS[name]
    base = make(ours.parameters())
    if how == "wrap":
        opt = fastgrad.wrap(base, max_norm=0.5, model=ours)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt._folds == ("fused" in name)
    else:
        fastgrad.attach(base, max_norm=0.5, model=ours)
        opt = base
    ref = make(theirs.parameters())
    sched_a = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(ref, step_size=10, gamma=0.5)
    clipped = 0
    for step in range(50):
        opt.zero_grad()
        loss_of(ours, step).backward()
        n64 = float64_norm(ours)  # the gradients the step receives
        opt.step()
        # the coefficient against the float64 norm at 1e-12: torch's 1e-6 epsilon included
        assert opt.last_stats.clip_coef.item() == pytest.approx(min(0.5 / (n64 + 1e-6), 1.0), rel=1e-12, abs=0)
        assert opt.last_stats.total_norm.item() == pytest.approx(n64, rel=1e-12)
        sched_a.step()
        ref.zero_grad()
        loss_of(theirs, step).backward()
        norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        clipped += bool(norm > 0.5)
        ref.step()
        sched_b.step()
        want = min(0.5 / (norm.item() + 1e-6), 1.0)
        assert opt.last_stats.clip_coef.item() == pytest.approx(want, rel=1e-6)
    assert clipped > 10, "the test must exercise clipping"
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == pytest.approx(0.05 / 32 if "sgd" in name else 1e-2 / 32)
    assert_params_close(ours, theirs)
    if "adam" in name:
        assert opt.state_dict()["state"][0]["step"].item() == 50


def test_per_tensor_clipper_with_fused_optimizer_matches_manual():
    ours, theirs = make_model(), make_model()
    opt = fastgrad.wrap(torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True), clipper=clip.PerTensorNorm(0.2))
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    for step in range(10):
        for m, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            loss_of(m, step).backward()
        for p in theirs.parameters():  # Keras clipnorm, per tensor
            n = p.grad.double().norm()
            p.grad.mul_(0.2 / max(n.item(), 0.2))
        opt.step()
        ref.step()
    assert opt.last_stats.clip_coef.shape == (5,)
    assert_params_close(ours, theirs)


def test_closure_is_evaluated_once_and_returned():
    model = make_model()
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.5)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor)
    assert opt.last_stats.clip_coef.item() < 1


# -- no host sync -----------------------------------------------------------------------------

_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")


class _NoHostReads:
    """Make every way of reading a tensor on the host raise (CPU tensors never really sync)."""

    def __enter__(self):
        self.saved = {k: getattr(torch.Tensor, k) for k in _READS}

        def boom(*args, **kwargs):
            raise AssertionError("host read of a tensor inside step()")

        for k in _READS:
            setattr(torch.Tensor, k, boom)
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(torch.Tensor, k, v)


def test_no_host_read_on_the_fused_path():
    with _NoHostReads(), pytest.raises(AssertionError, match="host read"):
        bool(torch.tensor(True))  # the guard itself works
    model = make_model()
    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=0.5, model=model,
                        spike_skip=SpikeSkip(window=4))
    for step in range(6):
        opt.zero_grad()
        loss_of(model, step, factor=float("nan") if step == 4 else 1.0).backward()
        with _NoHostReads():
            opt.step()
    assert opt.counters["skipped_steps"].item() == 1
    for clipper in (clip.AutoClip(history=8), clip.ZClip(warmup=2), clip.PerTensorNorm(0.1), clip.AGC(), clip.Value(0.01)):
        opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), clipper=clipper)
        for step in range(3):
            opt.zero_grad()
            loss_of(model, step).backward()
            with _NoHostReads():
                opt.step()


def test_scaled_path_reads_one_flag_at_most():
    model = make_model()
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.5, skip_nonfinite=False)
    opt.zero_grad()
    loss_of(model, 0).backward()
    with _NoHostReads():
        opt.step()  # nothing can skip: no read at all
    reads = []
    orig = torch.Tensor.__bool__
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.5)
    opt.zero_grad()
    loss_of(model, 0).backward()
    torch.Tensor.__bool__ = lambda t: reads.append(t.shape) or orig(t)
    try:
        opt.step()
    finally:
        torch.Tensor.__bool__ = orig
    assert reads == [torch.Size([])]


# -- skipping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["wrap", "attach"])
@pytest.mark.parametrize("name", ["sgd_momentum", "adam_foreach", "adamw_fused", "sgd_momentum_fused"])
def test_nonfinite_step_changes_nothing(name, how):
    model = make_model()
    base = OPTIMIZERS[name](model.parameters())
    if how == "wrap":
        opt = fastgrad.wrap(base, max_norm=0.5, model=model)
        counters = lambda: opt.counters
        names = opt.nonfinite_names
    else:
        att = fastgrad.attach(base, max_norm=0.5, model=model)
        opt, counters, names = base, (lambda: att.counters), base.fastgrad_nonfinite_names
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    before = snapshot(model, opt)
    opt.zero_grad()
    loss_of(model, 3).backward()
    model[2].weight.grad[1, 2] = float("nan")
    model[4].bias.grad[0] = float("inf")
    opt.step()
    assert_bitwise_same(before, model, opt)
    assert opt.last_stats.skipped.item() and opt.last_stats.nonfinite.item()
    assert counters()["skipped_steps"].item() == 1 and counters()["steps"].item() == 4
    assert opt.last_stats.nonfinite_names() == ["2.weight", "4.bias"]
    # a good step afterwards moves on normally, and the names of the bad step stay available
    opt.zero_grad()
    loss_of(model, 4).backward()
    opt.step()
    assert not opt.last_stats.skipped.item()
    assert names() == ["2.weight", "4.bias"]
    assert any(not torch.equal(p0, p) for p0, p in zip(before[0], model.parameters()))


def test_skip_nonfinite_false_applies_the_step():
    model = make_model()
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), skip_nonfinite=False)
    opt.zero_grad()
    loss_of(model, 0).backward()
    model[4].bias.grad[0] = float("nan")
    opt.step()
    assert math.isnan(model[4].bias[0].item()) and not opt.last_stats.skipped.item()


@pytest.mark.parametrize("name", ["adamw_fused", "adam_foreach"])
def test_spike_skip(name):
    model = make_model()
    opt = fastgrad.wrap(OPTIMIZERS[name](model.parameters()), spike_skip=SpikeSkip(sigma=3.0, window=8))
    for step in range(8):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        assert not opt.last_stats.skipped.item()
    before = snapshot(model, opt)
    opt.zero_grad()
    loss_of(model, 8, factor=1e4).backward()
    opt.step()
    assert opt.last_stats.spike.item() and opt.last_stats.skipped.item()
    assert opt.counters["spike_steps"].item() == 1 and opt.counters["nonfinite_steps"].item() == 0
    assert_bitwise_same(before, model, opt)


# -- GradScaler -------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit_unscale", [False, True])
@pytest.mark.parametrize("name", ["adamw_fused", "adamw_foreach", "sgd_momentum"])
def test_grad_scaler_cpu(name, explicit_unscale):
    ours, theirs = make_model(), make_model()
    opt = fastgrad.wrap(OPTIMIZERS[name](ours.parameters()), max_norm=0.5, model=ours)
    ref = OPTIMIZERS[name](theirs.parameters())
    s_ours = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    for step in range(15):
        factor = float("inf") if step == 6 else 1.0  # the scaler must back off in both
        opt.zero_grad()
        s_ours.scale(loss_of(ours, step, factor)).backward()
        if explicit_unscale:
            s_ours.unscale_(opt)
        s_ours.step(opt)
        s_ours.update()
        ref.zero_grad()
        s_ref.scale(loss_of(theirs, step, factor)).backward()
        s_ref.unscale_(ref)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        s_ref.step(ref)
        s_ref.update()
        assert s_ours.get_scale() == s_ref.get_scale()
        assert "grad_scale" not in opt.__dict__ and "grad_scale" not in opt.optimizer.__dict__
    assert opt.counters["skipped_steps"].item() == 1
    assert_params_close(ours, theirs)
    if "adam" in name:
        assert opt.state_dict()["state"][0]["step"].item() == ref.state_dict()["state"][0]["step"].item() == 14


def test_grad_scaler_with_attach_fused():
    ours, theirs = make_model(), make_model()
    opt = OPTIMIZERS["adamw_fused"](ours.parameters())
    fastgrad.attach(opt, max_norm=0.5)
    ref = OPTIMIZERS["adamw_fused"](theirs.parameters())
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    for step in range(10):
        for m, o, s, clip_ref in ((ours, opt, scalers[0], False), (theirs, ref, scalers[1], True)):
            o.zero_grad()
            s.scale(loss_of(m, step)).backward()
            if clip_ref:
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            s.step(o)
            s.update()
    assert_params_close(ours, theirs)


# -- checkpoints ------------------------------------------------------------------------------


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()


@pytest.mark.parametrize("clipper_factory", [lambda: clip.AutoClip(percentile=20, history=6),
                                             lambda: clip.ZClip(warmup=3, z_thresh=1.0)])
def test_state_dict_round_trip(clipper_factory):
    model = make_model()
    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), clipper=clipper_factory(),
                        spike_skip=SpikeSkip(window=4))
    _train(model, opt, 5)
    opt.zero_grad()
    loss_of(model, 5, factor=float("nan")).backward()
    opt.step()  # one skipped step: counters must survive
    sd = copy.deepcopy(opt.state_dict())
    assert sd["fastgrad"]["counters"]["skipped_steps"].item() == 1

    model2 = copy.deepcopy(model)
    opt2 = fastgrad.wrap(torch.optim.AdamW(model2.parameters(), lr=1e-2, fused=True), clipper=clipper_factory(),
                         spike_skip=SpikeSkip(window=4))
    opt2.load_state_dict(sd)
    assert opt2.counters["skipped_steps"].item() == 1 and opt2.counters["steps"].item() == 6
    for k, v in opt.clipper.state_dict().items():
        w = opt2.clipper.state_dict()[k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, k
    _train(model, opt, 6, start=6)
    _train(model2, opt2, 6, start=6)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt.last_stats.clip_coef, opt2.last_stats.clip_coef)


def test_state_dict_interoperates_with_plain_torch():
    model = make_model()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = fastgrad.wrap(plain, max_norm=0.5)
    _train(model, opt, 2)
    sd = opt.state_dict()
    assert "fastgrad" in sd and sd["state"][0]["step"].item() == 2
    twin = copy.deepcopy(model)
    other = torch.optim.AdamW(twin.parameters(), lr=0.5)
    other.load_state_dict(sd)  # torch ignores the extra "fastgrad" entry
    assert_same_state(other.state_dict()["state"], plain.state_dict()["state"])
    assert other.param_groups[0]["lr"] == 1e-2 and "fastgrad" not in other.state_dict()
    wrapped = fastgrad.wrap(torch.optim.AdamW(copy.deepcopy(model).parameters(), lr=0.5), max_norm=0.5)
    wrapped.load_state_dict(plain.state_dict())  # a plain checkpoint: fastgrad state stays fresh
    assert wrapped.counters["steps"].item() == 0
    assert_same_state(wrapped.state_dict()["state"], plain.state_dict()["state"])
    assert wrapped.param_groups[0]["lr"] == 1e-2
    # both continue the same trajectory as the original (clipping at 0.5 on both wrapped ones)
    other_w = fastgrad.wrap(other, max_norm=0.5)
    for m, o in ((model, opt), (twin, other_w)):
        _train(m, o, 2, start=2)
    assert_same_state(other.state_dict()["state"], plain.state_dict()["state"])


def test_load_state_dict_mismatch_changes_nothing():
    model = make_model()
    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), clipper=clip.AutoClip(history=5))
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    other = fastgrad.wrap(torch.optim.AdamW(make_model(1).parameters(), lr=0.5), clipper=clip.AutoClip(history=7))
    with pytest.raises(ValueError, match="history"):
        other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.5 and not other.state
    assert other.clipper.buffer is None


# -- attach / detach ----------------------------------------------------------------------------


def test_detach_restores_plain_behaviour():
    ours, theirs = make_model(), make_model()
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    n_hooks = (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks))
    att = fastgrad.attach(opt, max_norm=0.5)
    assert opt.last_stats is None
    with pytest.raises(ValueError, match="already"):
        fastgrad.attach(opt, max_norm=1.0)
    _train(ours, opt, 3)
    assert att.last_stats is opt.last_stats and opt.last_stats.clip_coef.item() < 1
    for step in range(3):
        ref.zero_grad()
        loss_of(theirs, step).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        ref.step()
    fastgrad.detach(opt)
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == n_hooks
    assert not hasattr(opt, "last_stats") and "fastgrad" not in opt.state_dict()
    _train(ours, opt, 3, start=3)
    _train(theirs, ref, 3, start=3)  # no clipping on either side now
    assert_params_close(ours, theirs)
    with pytest.raises(ValueError, match="not attached"):
        fastgrad.detach(opt)


def test_attach_state_dict_and_closure_error():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fastgrad.attach(opt, clipper=clip.AutoClip(history=4))
    _train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["fastgrad"]["clipper"]["count"].item() == 3
    opt2 = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=1e-2)
    att2 = fastgrad.attach(opt2, clipper=clip.AutoClip(history=4))
    opt2.load_state_dict(sd)
    assert att2.guard.clipper.count.item() == 3
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: loss_of(model, 0))


# -- the Optimizer surface ----------------------------------------------------------------------


def test_optimizer_surface():
    model = make_model()
    inner = torch.optim.AdamW(model[0].parameters(), lr=1e-2)
    opt = fastgrad.wrap(inner, max_norm=1.0, model=model)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 1e-3})
    assert len(inner.param_groups) == 2
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    assert len(inner.param_groups) == 2
    _train(model, opt, 2)
    assert opt.last_stats.names == ("0.weight", "2.weight", "2.bias")
    opt.zero_grad()
    assert all(p.grad is None for g in inner.param_groups for p in g["params"])
    assert "fastgrad.wrap(AdamW" in repr(opt)
    inner.custom_attribute = 7
    assert opt.custom_attribute == 7  # unknown attributes are the inner optimizer's
    clone = copy.deepcopy(opt)
    assert isinstance(clone, FastgradOptimizer)


def test_names_from_named_parameters_groups():
    model = make_model()
    opt = fastgrad.wrap(torch.optim.SGD(model.named_parameters(), lr=0.1))
    _train(model, opt, 1)
    assert opt.last_stats.names[0] == "0.weight"


# -- the monitor contract -----------------------------------------------------------------------


class FakeMonitor:
    def __init__(self, model=None):
        self.calls = 0
        self.records = []
        self.model = model
        self.norms = []  # float64 norm of the model's gradients when the step asks (before it writes them)

    def stats_request(self):
        self.calls += 1
        if self.model is not None:
            self.norms.append(float64_norm(self.model))
        return {"histogram": True, "groups": "module", "norm_types": (1.0, 2.0)} if self.calls % 2 else None

    def record(self, stats, *, clip_coef, skipped):
        self.records.append((stats, clip_coef, skipped))


def test_monitor_contract_one_pass(monkeypatch):
    import fastgrad.optim as fo

    passes = []
    real = fo.grad_stats
    monkeypatch.setattr(fo, "grad_stats", lambda *a, **k: passes.append(k) or real(*a, **k))
    model = make_model()
    mon = FakeMonitor(model)
    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=0.5, model=model,
                        monitor=mon)
    coefs = []
    for step in range(4):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        coefs.append(opt.last_stats.clip_coef)
    assert len(passes) == 4 and mon.calls == 4 and len(mon.records) == 4
    assert passes[0]["histogram"] is True and passes[0]["norm_types"] == (2.0, 1.0)
    assert passes[1]["histogram"] is False
    stats, coef, skipped = mon.records[0]
    assert stats.histogram is not None and stats.groups is not None and stats.norm_type == 2.0
    # each record carries that step's coefficient object, whose value is torch's rule on the
    # float64 norm of the gradients the step received
    assert [r[1] for r in mon.records] == coefs and all(r[1] is c for r, c in zip(mon.records, coefs))
    for (st, c, sk), n in zip(mon.records, mon.norms):
        assert c.dtype == torch.float64 and c.dim() == 0
        assert c.item() == pytest.approx(min(0.5 / (n + 1e-6), 1.0), rel=1e-12, abs=0)
        assert st.total_norm.item() == pytest.approx(n, rel=1e-12) and not sk.item()
    assert sum(c.item() < 1 for c in coefs) >= 2, "the test must exercise clipping"
    assert skipped.dtype == torch.bool and skipped.dim() == 0
    assert mon.records[1][0].histogram is None


# -- bad input -----------------------------------------------------------------------------------


def test_bad_input_raises_and_changes_nothing():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = len(opt._optimizer_step_pre_hooks)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fastgrad.wrap(model.parameters(), max_norm=1.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fastgrad.attach(model, max_norm=1.0)
    with pytest.raises(ValueError, match="only one of max_norm, clip_value"):
        fastgrad.wrap(opt, max_norm=1.0, clip_value=0.1)
    with pytest.raises(ValueError, match="only one of"):
        fastgrad.attach(opt, max_norm=1.0, clipper=clip.AutoClip())
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            fastgrad.wrap(opt, max_norm=bad)
        with pytest.raises(ValueError, match="clip_value"):
            fastgrad.attach(opt, clip_value=bad)
    with pytest.raises(ValueError, match="norm_type"):
        fastgrad.wrap(opt, max_norm=1.0, norm_type=0)
    with pytest.raises(ValueError, match="not parameters of model"):
        fastgrad.attach(opt, max_norm=1.0, model=make_model(1))
    with pytest.raises(TypeError, match="clipper"):
        fastgrad.wrap(opt, clipper=lambda g: g)
    with pytest.raises(TypeError, match="monitor"):
        fastgrad.wrap(opt, monitor=object())
    with pytest.raises(TypeError, match="LBFGS"):
        fastgrad.wrap(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="already"):
        fastgrad.wrap(fastgrad.wrap(opt))
    assert len(opt._optimizer_step_pre_hooks) == hooks and not hasattr(opt, "_fastgrad_attachment")


def test_no_grads_is_a_plain_step():
    model = make_model()
    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1.0)
    opt.step()
    assert opt.last_stats is None and not opt.state


# -- pinned for mutation testing (survivors in fastgrad/optim/) ----------------------------------


def test_inf_norm_clip_matches_torch_and_error_texts():
    ours, theirs = make_model(), make_model()
    opt = fastgrad.wrap(torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True), max_norm=0.05, norm_type="inf")
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    for step in range(5):
        opt.zero_grad()
        loss_of(ours, step).backward()
        n_inf = max(p.grad.abs().max().item() for p in ours.parameters())
        opt.step()
        assert opt.last_stats.total_norm.item() == n_inf
        assert opt.last_stats.clip_coef.item() == pytest.approx(min(0.05 / (n_inf + 1e-6), 1.0), rel=1e-12, abs=0)
        ref.zero_grad()
        loss_of(theirs, step).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05, norm_type="inf")
        ref.step()
    assert_params_close(ours, theirs)
    model = make_model()
    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters()), clipper=clip.AutoClip(history=5))
    with pytest.raises(ValueError, match=r"^not a fastgrad optimizer state \(version \d+\): list$"):
        opt.load_state_dict({**opt.state_dict(), "fastgrad": []})
    plain = fastgrad.wrap(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match=r"this optimizer has no clipper"):
        plain.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"this optimizer has AutoClip\(percentile=10\.0, history=5\)"):
        opt.load_state_dict(plain.state_dict())
    a = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), spike_skip=SpikeSkip(sigma=3.0, window=4))
    b = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), spike_skip=SpikeSkip(sigma=2.0, window=4))
    with pytest.raises(ValueError, match=r"SpikeSkip: saved window/sigma 4/3\.0 differ from 4/2\.0"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="clamping elements and clipping the norm in one step is not offered"):
        fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0, clip_value=0.1)


def test_wrapper_never_borrows_grad_scale_or_found_inf():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), fused=True)
    inner.grad_scale = torch.tensor(4.0)  # stale attributes left on the inner optimizer
    inner.found_inf = torch.tensor(1.0)
    opt = fastgrad.wrap(inner)
    for name in ("grad_scale", "found_inf"):
        with pytest.raises(AttributeError):
            getattr(opt, name)
    assert opt.defaults is inner.defaults
