"""The guard's lean lane (fastgrad/optim/lane.py): bitwise the general path's results, and every
change of the gradients between steps handled (new .grad objects, None, dtype, views, bad input)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fastgrad
from fastgrad import clip
from fastgrad.optim import SpikeSkip
from fastgrad.optim.lane import StepTables

CLIPPERS = {
    "none": dict(),
    "global": dict(max_norm=0.5),
    "global_inf": dict(max_norm=0.05, norm_type="inf"),
    "global_l1": dict(max_norm=2.0, norm_type=1.0),
    "autoclip": dict(clipper=clip.AutoClip(percentile=50, history=8)),
    "zclip": dict(clipper=clip.ZClip(warmup=3)),
    "global_spike": dict(max_norm=0.5, spike_skip=SpikeSkip(window=4, sigma=1.0)),
}
OPTS = {
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
}


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def fill_grads(m, step, scale=3.0, fresh=True):
    """Gradients of step ``step``: new tensors (zero_grad(set_to_none=True)) or written in place."""
    g = torch.Generator().manual_seed(100 + step)
    for p in m.parameters():
        v = (torch.randn(p.shape, generator=g) * scale * (1 + step % 3)).to(p.dtype)
        if fresh or p.grad is None:
            p.grad = v
        else:
            p.grad.copy_(v)


def general_only(opt):
    """Force ``opt``'s guard onto the general path (the reference the lane is compared with)."""
    opt._guard._lane_ok = False
    return opt


def pair(opt_name, kw):
    a, b = model(), model()
    wa = fastgrad.wrap(OPTS[opt_name](a.parameters()), model=a, **copy.deepcopy(kw))
    wb = general_only(fastgrad.wrap(OPTS[opt_name](b.parameters()), model=b, **copy.deepcopy(kw)))
    return a, wa, b, wb


def same(x, y) -> bool:
    """Same dtype, shape and values (NaN where the other has NaN): bitwise for every finite value."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype.is_floating_point:
        return bool(((x == y) | (x.isnan() & y.isnan())).all())
    return torch.equal(x, y)


def assert_same_step(sa, sb):
    assert type(sa._stats) is StepTables, "the lane did not take the step"
    assert not isinstance(sb._stats, StepTables)
    for f in ("total_norm", "skipped", "nonfinite"):
        x, y = getattr(sa, f), getattr(sb, f)
        assert same(x, y), f
    if sb.clip_coef is None:
        assert sa.clip_coef is None
    else:
        assert same(sa.clip_coef, sb.clip_coef)
    assert (sa.spike is None) == (sb.spike is None) and (sa.spike is None or same(sa.spike, sb.spike))
    ga, gb = sa.stats, sb.stats
    assert ga.names == gb.names and ga.spec == gb.spec
    assert same(ga.raw.floats, gb.raw.floats) and torch.equal(ga.raw.counts, gb.raw.counts)
    assert torch.equal(ga.numel, gb.numel)
    assert same(ga.total.raw.floats, gb.total.raw.floats)
    assert torch.equal(ga.total.raw.counts, gb.total.raw.counts) and torch.equal(ga.total.numel, gb.total.numel)
    assert same(ga.total_norm, gb.total_norm) and same(ga.tensor_norms, gb.tensor_norms)


def assert_same_model(a, wa, b, wb):
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        assert (pa.grad is None) == (pb.grad is None) and (pa.grad is None or same(pa.grad, pb.grad))
    for k in wa.counters:
        assert torch.equal(wa.counters[k], wb.counters[k]), k
    sa, sb = wa.state_dict(), wb.state_dict()
    for k in sa["state"]:
        for kk, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][kk]), (k, kk)


@pytest.mark.parametrize("opt_name", list(OPTS))
@pytest.mark.parametrize("clip_name", list(CLIPPERS))
def test_lane_is_bitwise_the_general_path(opt_name, clip_name):
    a, wa, b, wb = pair(opt_name, CLIPPERS[clip_name])
    for step in range(8):
        fresh = step % 2 == 0  # new .grad objects and in-place writes alternate
        fill_grads(a, step, fresh=fresh)
        fill_grads(b, step, fresh=fresh)
        wa.step()
        wb.step()
        assert_same_step(wa.last_stats, wb.last_stats)
        assert_same_model(a, wa, b, wb)
    assert int(wa.counters["steps"]) == 8


def test_nonfinite_step_on_the_lane_changes_nothing_and_names_the_tensor():
    a, wa, b, wb = pair("adamw_fused", dict(max_norm=0.5))
    for step in range(4):
        fill_grads(a, step)
        fill_grads(b, step)
        if step == 2:
            a[2].bias.grad[1] = float("nan")
            b[2].bias.grad[1] = float("nan")
            before = [p.detach().clone() for p in a.parameters()]
        wa.step()
        wb.step()
        assert_same_step(wa.last_stats, wb.last_stats)
        assert_same_model(a, wa, b, wb)
        if step == 2:
            assert bool(wa.last_stats.skipped) and bool(wa.last_stats.nonfinite)
            assert all(torch.equal(x, p) for x, p in zip(before, a.parameters()))
            assert wa.last_stats.nonfinite_names() == ["2.bias"]
    # the latest step that had any: kept over the finite steps after it
    assert wa.nonfinite_names() == wb.nonfinite_names() == ["2.bias"]
    assert int(wa.counters["skipped_steps"]) == 1 and int(wa.counters["nonfinite_steps"]) == 1


def test_gradients_that_change_kind_between_steps():
    """None gradients, a non-contiguous view, another dtype, back to plain: every step right."""
    a, wa, b, wb = pair("adam_foreach", dict(max_norm=0.5))
    taken = []
    for step in range(12):
        fill_grads(a, step)
        fill_grads(b, step)
        if step in (1, 2, 3):  # a parameter without a gradient: the general path, the lane after
            a[0].bias.grad = b[0].bias.grad = None
        if step == 5:  # a transposed (non-contiguous) gradient
            for m in (a, b):
                m[0].weight.grad = m[0].weight.grad.t().contiguous().t()
        if step == 7:  # a contiguous view at an offset into a larger buffer: the lane reads it
            for m in (a, b):
                g = m[2].bias.grad
                m[2].bias.grad = torch.cat([torch.full((1,), 7.0), g])[1:]
        if step == 8:  # a strided view (every other element of a buffer): the general path
            for m in (a, b):
                g = m[2].bias.grad
                m[2].bias.grad = torch.zeros(6)[::2].copy_(g)
        wa.step()
        wb.step()
        taken.append(type(wa.last_stats._stats) is StepTables)
        sa, sb = wa.last_stats, wb.last_stats
        assert sa.names == sb.names
        assert torch.equal(sa.total_norm, sb.total_norm) and torch.equal(sa.clip_coef, sb.clip_coef)
        assert torch.equal(sa.stats.raw.floats, sb.stats.raw.floats)
        assert_same_model(a, wa, b, wb)
    # the lane: step 0; not 1-3 (a None gradient) nor 4 (waiting after misses); 5 (a view) and 8
    # (strided) not; 7 (an offset view) and the plain steps after yes
    assert taken[0] and not any(taken[1:4]) and not taken[5] and taken[7] and not taken[8] and taken[-1], taken


def test_dtype_of_the_whole_set_changes():
    """Same Parameter objects (the lane's plan stays), other dtypes: read per step."""
    a, wa, b, wb = pair("sgd", dict(max_norm=0.5))
    for step in range(6):
        if step in (2, 4):
            for m in (a, b):
                m.to(torch.float64 if step == 2 else torch.bfloat16)
                for p in m.parameters():
                    p.grad = None
        fill_grads(a, step)
        fill_grads(b, step)
        wa.step()
        wb.step()
        assert_same_step(wa.last_stats, wb.last_stats)
        assert_same_model(a, wa, b, wb)


def test_bad_gradient_raises_and_changes_nothing():
    w = torch.nn.Parameter(torch.randn(4))
    z = torch.nn.Parameter(torch.randn(3))
    opt = fastgrad.wrap(torch.optim.SGD([w, z], lr=0.1, momentum=0.9), max_norm=0.5)
    w.grad, z.grad = torch.randn(4), torch.randn(3)
    opt.step()
    assert type(opt.last_stats._stats) is StepTables
    z.grad_dtype = None  # let z take a gradient no backend reads
    w.grad, z.grad = torch.randn(4), torch.randn(3, dtype=torch.complex64)
    before = [w.detach().clone(), z.detach().clone()]
    state = copy.deepcopy(opt.state_dict())
    last = opt.last_stats
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    assert torch.equal(before[0], w) and torch.equal(before[1], z)
    now = opt.state_dict()
    assert all(torch.equal(state["fastgrad"]["counters"][k], now["fastgrad"]["counters"][k])
               for k in now["fastgrad"]["counters"])
    assert all(torch.equal(v, now["state"][i][k]) for i, s in state["state"].items() for k, v in s.items())
    assert opt.last_stats is last
    z.grad = torch.randn(3)
    opt.step()  # and the next good step is the lane's again (after the general path's retry wait)
    opt.step()
    assert int(opt.counters["steps"]) == 3


def test_add_param_group_plans_the_lane_again():
    m = model()
    opt = fastgrad.wrap(torch.optim.AdamW([m[0].weight, m[0].bias], lr=1e-2, fused=True), max_norm=0.5, model=m)
    fill_grads(m, 0)
    opt.step()
    assert opt.last_stats.names == ("0.weight", "0.bias")
    opt.add_param_group({"params": [m[2].weight]})
    fill_grads(m, 1)
    ref = fastgrad.grad_stats([m[0].weight, m[0].bias, m[2].weight], histogram=False)  # before the step
    opt.step()
    assert type(opt.last_stats._stats) is StepTables
    assert opt.last_stats.names == ("0.weight", "0.bias", "2.weight")
    assert torch.equal(opt.last_stats.stats.raw.floats, ref.raw.floats)


def test_stats_are_built_when_first_read_and_copies_hold_them():
    m = model()
    opt = fastgrad.wrap(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), max_norm=0.5, model=m)
    fill_grads(m, 0)
    opt.step()
    st = opt.last_stats
    assert type(st._stats) is StepTables  # nothing built yet
    first = st.stats
    assert st.stats is first and type(st._stats) is not StepTables
    fill_grads(m, 1)
    opt.step()
    st2 = opt.last_stats
    for clone in (copy.deepcopy(st2), pickle.loads(pickle.dumps(st2))):
        assert torch.equal(clone.total_norm, st2.total_norm) and clone.names == st2.names
        assert torch.equal(clone.stats.raw.floats, st2.stats.raw.floats)
    # each step has its own tables: the first step's stats are unchanged by the second
    assert not torch.equal(first.raw.floats, st2.stats.raw.floats)
    assert torch.equal(first.total_norm, st.total_norm)


def test_lane_yields_to_the_seam_the_env_and_a_grad_scaler(monkeypatch):
    import fastgrad.optim as fo

    m = model()
    opt = fastgrad.wrap(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), max_norm=0.5)
    fill_grads(m, 0)
    opt.step()
    assert type(opt.last_stats._stats) is StepTables
    calls = []
    real = fo.grad_stats
    monkeypatch.setattr(fo, "grad_stats", lambda *a, **k: calls.append(k) or real(*a, **k))
    fill_grads(m, 1)
    opt.step()
    assert len(calls) == 1 and not isinstance(opt.last_stats._stats, StepTables)
    monkeypatch.setattr(fo, "grad_stats", real)
    monkeypatch.setenv("FASTGRAD_BACKEND", "reference")
    fill_grads(m, 2)
    opt.step()
    assert not isinstance(opt.last_stats._stats, StepTables)
    monkeypatch.delenv("FASTGRAD_BACKEND")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for p in m.parameters():
        p.grad = None
    scaler.scale(m(torch.randn(5, 6)).square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert not isinstance(opt.last_stats._stats, StepTables)
    fill_grads(m, 4)
    opt.step()
    assert type(opt.last_stats._stats) is StepTables
    assert int(opt.counters["steps"]) == 5


def test_monitor_gets_the_lane_steps_stats():
    class Every2:
        def __init__(self):
            self.n, self.records = 0, []

        def stats_request(self):
            self.n += 1
            return {"histogram": True} if self.n % 2 else None

        def record(self, stats, *, clip_coef, skipped):
            self.records.append((stats, clip_coef, skipped))

    m = model()
    mon = Every2()
    opt = fastgrad.wrap(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), max_norm=0.5, model=m, monitor=mon)
    for step in range(4):
        fill_grads(m, step)
        ref = fastgrad.grad_stats(m.parameters(), histogram=False)
        opt.step()
        st, coef, skipped = mon.records[-1]
        assert (st.histogram is not None) == (step % 2 == 0)  # the monitored steps: the general path
        assert torch.equal(st.raw.floats[:, :1], ref.raw.floats[:, :1])
        assert coef is opt.last_stats.clip_coef and not bool(skipped)
    assert mon.n == 4 and len(mon.records) == 4


@pytest.mark.parametrize("how", ["attach", "track_updates"])
def test_attach_and_update_tracking_take_the_lane_with_the_same_results(how):
    """attach() (step hooks) and wrap(track_updates=True) build a Plan around the lane's step."""
    a, b = model(), model()
    if how == "attach":
        oa = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)
        fastgrad.attach(oa, max_norm=0.5, model=a)
    else:
        oa = fastgrad.wrap(torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True), max_norm=0.5, model=a,
                           track_updates=True)
    wb = general_only(fastgrad.wrap(torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True), max_norm=0.5, model=b))
    for step in range(4):
        fill_grads(a, step)
        fill_grads(b, step)
        oa.step()
        wb.step()
        assert_same_step(oa.last_stats, wb.last_stats)
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    if how == "track_updates":
        assert oa.last_stats.update_norms is not None and oa.last_stats.update_norms.shape == (4,)


def test_step_stats_save_and_load_with_torch_save(tmp_path):
    """No tensor a reader sees shares its storage under another dtype (torch.save refuses that)."""
    m = model()
    opt = fastgrad.wrap(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), max_norm=0.5, model=m)
    fill_grads(m, 0)
    opt.step()
    st = opt.last_stats
    path = tmp_path / "stats.pt"
    torch.save({"norm": st.total_norm, "skipped": st.skipped, "nonfinite": st.nonfinite, "coef": st.clip_coef,
                "floats": st.stats.raw.floats, "counts": st.stats.raw.counts, "numel": st.stats.numel,
                "last": st}, path)
    back = torch.load(path, weights_only=False)
    assert torch.equal(back["norm"], st.total_norm) and back["skipped"].dtype == torch.bool
    assert not bool(back["skipped"]) and not bool(back["nonfinite"])
    assert torch.equal(back["counts"], st.stats.raw.counts) and torch.equal(back["numel"], st.stats.numel)
    assert torch.equal(back["last"].stats.raw.floats, st.stats.raw.floats) and back["last"].names == st.names


@pytest.mark.parametrize("lane", [True, False])
def test_a_deep_copy_steps_on_its_own_state(lane):
    """The epilogue's cached pointers are not carried into a copy (they would write the original's
    counters and grad_scale buffer): model and optimizer copied together step identically."""
    m = model()
    opt = fastgrad.wrap(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), max_norm=0.1, model=m)
    if not lane:
        general_only(opt)
    fill_grads(m, 0)
    opt.step()
    twin = copy.deepcopy({"m": m, "opt": opt})
    m2, opt2 = twin["m"], twin["opt"]
    for step in (1, 2):
        fill_grads(m, step)
        fill_grads(m2, step)
        opt.step()
        opt2.step()
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))
        assert torch.equal(opt.last_stats.clip_coef, opt2.last_stats.clip_coef)
    assert int(opt.counters["steps"]) == int(opt2.counters["steps"]) == 3
