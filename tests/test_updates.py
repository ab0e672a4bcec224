"""Update norms (fastgrad.updates) against a float64 snapshot difference, for every path.

Reference: the weights copied to float64 before the step, ``||w_after.double() - w_before||``
per tensor (exact: a difference of two representable numbers in float64), the groups and the
total as the norm of the concatenation. Float64 weights: the closed forms must agree to 1e-6
relative (they agree to ~1e-13: only the order of float64 operations differs). Float32 weights:
the stored weights are rounded after the update, so the derived ||Δw|| (the update the optimizer
computed) differs from the realised one by rounding of w: the test uses update ratios ~1e-2 and
allows 1e-5 (the worst case is ~6e-8 ||w|| / ||Δw|| = 6e-6).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastgrad.updates import UpdateTracker

def make_model(dtype):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
    return m.to(dtype)


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)


def reference(params, before, groups):
    """float64 [T] update norms, [T] before norms, per group and total (norm of concatenations)."""
    diffs = [p.detach().double() - b for p, b in zip(params, before)]
    un = torch.stack([d.norm() for d in diffs])
    wn = torch.stack([b.norm() for b in before])
    gu, gw = [], []
    for idx in groups:
        gu.append(torch.cat([diffs[i].reshape(-1) for i in idx]).norm())
        gw.append(torch.cat([before[i].reshape(-1) for i in idx]).norm())
    tu = torch.cat([d.reshape(-1) for d in diffs]).norm()
    tw = torch.cat([b.reshape(-1) for b in before]).norm()
    return un, wn, torch.stack(gu), torch.stack(gw), tu, tw


def check(opt_fn, dtype=torch.float64, steps=4, rel=1e-6, expect="derived", two_groups=True, device="cpu"):
    model = make_model(dtype).to(device)
    params = list(model.parameters())
    if two_groups:
        groups = [{"params": params[:2]}, {"params": params[2:], "lr_scale": 1}]
        group_idx = [[0, 1], [2, 3]]
    else:
        groups = params
        group_idx = [[0, 1, 2, 3]]
    opt = opt_fn(groups)
    tracker = UpdateTracker(opt, model=model)
    for step in range(steps):
        set_grads(model, step)
        before = [p.detach().double().clone() for p in params]
        tracker.before_step()
        opt.step()
        upd = tracker.after_step()
        assert set(upd.paths) == {expect}, upd.paths
        un, wn, gu, gw, tu, tw = reference(params, before, group_idx)
        for got, want in ((upd.update_norms, un), (upd.param_norms, wn), (upd.group_update_norms, gu),
                          (upd.group_param_norms, gw), (upd.total_update_norm, tu),
                          (upd.total_param_norm, tw)):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=rel, atol=0)
        torch.testing.assert_close(upd.update_ratio, un / wn, rtol=2 * rel, atol=0)
        torch.testing.assert_close(upd.total_update_ratio, tu / tw, rtol=2 * rel, atol=0)
        assert float(tu) > 0
    assert upd.names == tuple(n for n, _ in model.named_parameters())
    return upd


OPTIMIZERS = {
    "sgd": lambda g, **k: torch.optim.SGD(g, lr=0.05, **k),
    "sgd_wd": lambda g, **k: torch.optim.SGD(g, lr=0.05, weight_decay=0.1, **k),
    "sgd_momentum": lambda g, **k: torch.optim.SGD(g, lr=0.05, momentum=0.9, dampening=0.1,
                                                    weight_decay=0.1, **k),
    "sgd_nesterov": lambda g, **k: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True,
                                                    weight_decay=0.1, maximize=True, **k),
    "adam": lambda g, **k: torch.optim.Adam(g, lr=0.01, **k),
    "adam_l2_amsgrad_max": lambda g, **k: torch.optim.Adam(g, lr=0.01, weight_decay=0.1, amsgrad=True,
                                                           maximize=True, **k),
    "adamw": lambda g, **k: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1, **k),
    "adamw_amsgrad": lambda g, **k: torch.optim.AdamW(g, lr=0.01, weight_decay=0.5,
                                                      amsgrad=True, betas=(0.8, 0.9), **k),
    "adagrad": lambda g, **k: torch.optim.Adagrad(g, lr=0.05, lr_decay=0.1, weight_decay=0.1,
                                                  initial_accumulator_value=0.1, **k),
    "adagrad_maximize": lambda g, **k: torch.optim.Adagrad(g, lr=0.05, maximize=True, **k),
    "rmsprop": lambda g, **k: torch.optim.RMSprop(g, lr=0.01, weight_decay=0.1, **k),
    "rmsprop_centered_momentum": lambda g, **k: torch.optim.RMSprop(g, lr=0.01, centered=True,
                                                                    momentum=0.5, **k),
    "rmsprop_centered": lambda g, **k: torch.optim.RMSprop(g, lr=0.01, centered=True, maximize=True, **k),
}


@pytest.mark.parametrize("impl", ["single", "foreach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_derived_matches_snapshot_float64(name, impl):
    fn = OPTIMIZERS[name]
    check(lambda g: fn(g, foreach=(impl == "foreach")))


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "adam_l2_amsgrad_max", "adamw", "adamw_amsgrad"])
def test_derived_fused(name):
    check(lambda g: OPTIMIZERS[name](g, fused=True))


@pytest.mark.parametrize("name", ["sgd", "sgd_nesterov", "adagrad"])
def test_fused_gradient_formulas_take_the_snapshot(name):
    # a fused kernel may unscale .grad in place: formulas that read the gradient are not used
    check(lambda g: OPTIMIZERS[name](g, fused=True), expect="snapshot")


def test_tensor_lr():
    check(lambda g: torch.optim.AdamW(g, lr=torch.tensor(0.01), weight_decay=0.1, foreach=False))
    check(lambda g: torch.optim.SGD(g, lr=torch.tensor(0.05), momentum=0.9, nesterov=True, foreach=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturable Adam needs a CUDA device")
@pytest.mark.parametrize("foreach", [False, True])
def test_capturable_adam(foreach):
    check(lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1, capturable=True, foreach=foreach),
          device="cuda")


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw", "rmsprop"])
def test_derived_float32(name):
    # lr large enough that rounding of w (eps ~ 6e-8 relative) stays below 1e-5 of ||Δw||
    check(OPTIMIZERS[name], dtype=torch.float32, rel=1e-5)


@pytest.mark.parametrize("opt_fn", [
    lambda g: torch.optim.NAdam(g, lr=0.01, weight_decay=0.1),
    lambda g: torch.optim.Adamax(g, lr=0.01),
    lambda g: torch.optim.Rprop(g, lr=0.01),
], ids=["nadam", "adamax", "rprop"])
def test_no_closed_form_takes_the_snapshot(opt_fn):
    check(opt_fn, expect="snapshot")


def test_bfloat16_weights_take_the_snapshot():
    check(OPTIMIZERS["adamw"], dtype=torch.bfloat16, expect="snapshot", rel=1e-6)


def test_custom_optimizer_and_snapshot_mode():
    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign(), alpha=-group["lr"])

    check(lambda g: SignSGD(g, lr=0.01), expect="snapshot")
    model = make_model(torch.float64)
    # differentiable=True optimizers step through autograd: no closed form is assumed
    opt = torch.optim.Adam(model.parameters(), lr=0.01, differentiable=True)
    tr = UpdateTracker(opt)
    set_grads(model, 0)
    tr.before_step()
    assert set(tr._armed["paths"]) == {"snapshot"}
    tracker = UpdateTracker(torch.optim.Adam(model.parameters(), lr=0.01), mode="snapshot")
    set_grads(model, 0)
    tracker.before_step()
    tracker.optimizer.step()
    assert set(tracker.after_step().paths) == {"snapshot"}


def _one_step(opt, model, tracker, step_fn=None, grads=True):
    if grads:
        set_grads(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    tracker.before_step()
    (step_fn or opt.step)()
    upd = tracker.after_step()
    return upd, before


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "sgd"])
def test_skipped_step_gives_zero(name):
    """No update: step() not called (a GradScaler skip), or every gradient None."""
    model = make_model(torch.float64)
    opt = OPTIMIZERS[name](model.parameters())
    tracker = UpdateTracker(opt, model=model)
    _one_step(opt, model, tracker)  # create the state
    upd, before = _one_step(opt, model, tracker, step_fn=lambda: None)
    assert float(upd.total_update_norm) == 0.0 and float(upd.total_update_ratio) == 0.0
    want = torch.cat([b.reshape(-1) for b in before]).norm()
    torch.testing.assert_close(upd.total_param_norm, want, rtol=1e-12, atol=0)
    model.zero_grad(set_to_none=True)
    upd, _ = _one_step(opt, model, tracker, grads=False)
    assert float(upd.total_update_norm) == 0.0


@pytest.mark.parametrize("fused_name", ["adamw", "sgd_momentum"])
def test_fused_found_inf_skip_gives_zero(fused_name):
    """A fused kernel skipping on found_inf (the GradScaler / fastgrad.wrap protocol)."""
    model = make_model(torch.float32)
    opt = OPTIMIZERS[fused_name](model.parameters(), fused=True)
    tracker = UpdateTracker(opt, model=model)
    _one_step(opt, model, tracker)
    before = [p.detach().clone() for p in model.parameters()]

    def skipped_step():
        opt.grad_scale = torch.ones(())
        opt.found_inf = torch.ones(())
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf

    set_grads(model, 1)
    tracker.before_step()
    skipped_step()
    upd = tracker.after_step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)  # the kernel did skip
    assert float(upd.total_update_norm) == 0.0


def test_partial_gradients_and_groups_argument():
    model = make_model(torch.float64)
    params = list(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    tracker = UpdateTracker(opt, model=model, groups=lambda n: n.split(".")[0])
    set_grads(model, 0)
    tracker.before_step()
    opt.step()
    tracker.after_step()
    set_grads(model, 1)
    params[1].grad = None  # not updated by this step (AdamW skips it, weight decay included)
    before = [p.detach().clone() for p in params]
    tracker.before_step()
    opt.step()
    upd = tracker.after_step()
    assert upd.group_names == ("0", "2")
    assert float(upd.update_norms[1]) == 0.0
    un, wn, gu, gw, tu, tw = reference(params, before, [[0, 1], [2, 3]])
    torch.testing.assert_close(upd.update_norms, un, rtol=1e-6, atol=0)
    torch.testing.assert_close(upd.group_update_norms, gu, rtol=1e-6, atol=0)
    d = upd.to_dict()
    assert d["total"]["update_norm"] == pytest.approx(float(tu), rel=1e-6)
    assert d["tensors"]["0.bias"]["update_ratio"] == 0.0


@pytest.mark.parametrize("batch_bytes", [1, 3000, 1 << 28])
def test_batches_and_workspace_reuse(batch_bytes):
    """One tensor per fused pass, a few per pass, all in one; the workspace is reused over steps."""
    model = make_model(torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    tracker = UpdateTracker(opt, max_batch_bytes=batch_bytes)
    for step in range(3):
        set_grads(model, step)
        before = [p.detach().double().clone() for p in model.parameters()]
        tracker.before_step()
        opt.step()
        upd = tracker.after_step()
        un, wn = reference(list(model.parameters()), before, [[0, 1, 2, 3]])[:2]
        torch.testing.assert_close(upd.update_norms, un, rtol=1e-6, atol=0)
        torch.testing.assert_close(upd.param_norms, wn, rtol=1e-6, atol=0)
    held = sum(b.numel() for b in tracker._workspace.buffers.values())
    largest = max(p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert held <= max(2 * total if batch_bytes > 8 * 2 * total else 0, batch_bytes // 8 + 2 * largest)


def test_errors():
    model = make_model(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = UpdateTracker(opt)
    set_grads(model, 0)
    tracker.before_step()
    opt.step()
    upd = tracker.after_step()
    assert upd.names == ("0.0", "0.1", "0.2", "0.3")
    with pytest.raises(RuntimeError, match="before_step"):
        tracker.after_step()
    with pytest.raises(TypeError, match="Optimizer"):
        UpdateTracker(model)
    with pytest.raises(ValueError, match="mode"):
        UpdateTracker(opt, mode="copy")
    tracker.remove()
    assert not opt._optimizer_step_pre_hooks
    assert math.isfinite(float(upd.total_update_ratio))


def test_zero_weights_and_zero_lr():
    """w_before = 0 (zero-initialised biases): ||w_before|| is exactly 0 and the ratio Inf, not a
    rounding residue of w - Δw; lr = 0: every update norm is exactly 0."""
    model = make_model(torch.float32)
    for mod in (model[0], model[2]):
        torch.nn.init.zeros_(mod.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    tracker = UpdateTracker(opt, model=model)
    upd, before = _one_step(opt, model, tracker)
    names = list(upd.names)
    for b in ("0.bias", "2.bias"):
        i = names.index(b)
        assert float(upd.param_norms[i]) == 0.0 and float(upd.update_norms[i]) > 0
        assert math.isinf(float(upd.update_ratio[i]))
    un = torch.stack([(p.detach().double() - b.double()).norm() for p, b in zip(model.parameters(), before)])
    torch.testing.assert_close(upd.update_norms, un, rtol=1e-5, atol=0)
    opt.param_groups[0]["lr"] = 0.0
    upd, before = _one_step(opt, model, tracker)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert float(upd.update_norms.abs().sum()) == 0.0 and float(upd.total_update_ratio) == 0.0


@pytest.mark.parametrize("name", ["sgd_momentum", "sgd", "rmsprop_centered_momentum"])
def test_scaled_state_is_normed_in_place(name):
    """Δw = -lr * buf (momentum) or -lr * g (plain SGD): normed where it lies, no workspace."""
    check(OPTIMIZERS[name])
    model = make_model(torch.float64)
    opt = OPTIMIZERS[name](model.parameters())
    tracker = UpdateTracker(opt)
    for step in range(2):
        _one_step(opt, model, tracker)
    assert tracker._workspace.buffers == {}


def test_param_groups_added_between_steps_reuse_the_workspace_correctly():
    """The workspace hands out cached views per (offset, shape): a new group changes the layout."""
    model = make_model(torch.float64)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params[:2], lr=0.01, weight_decay=0.1)
    tracker = UpdateTracker(opt)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": params[2:], "lr": 0.02})
        set_grads(model, step)
        held = [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().double().clone() for p in held]
        tracker.before_step()
        opt.step()
        upd = tracker.after_step()
        un, wn = reference(held, before, [list(range(len(held)))])[:2]
        torch.testing.assert_close(upd.update_norms, un, rtol=1e-6, atol=0)
        torch.testing.assert_close(upd.param_norms, wn, rtol=1e-12, atol=0)


def test_param_norms_given_by_the_statistics_pass():
    """before_step(param_norms=(params, norms)) takes ||w_before|| from a pass that already read
    the weights (grad_stats(params=True)): the values given are the ones used; a set that misses
    a tensor falls back to reading the weights; a malformed one is refused."""
    import fastgrad

    model = make_model(torch.float64)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    tracker = UpdateTracker(opt, model=model)
    for step in range(3):
        set_grads(model, step)
        before = [p.detach().clone() for p in params]
        order = params[::-1]  # any order: picked out by identity
        st = fastgrad.grad_stats(order, params=True)
        tracker.before_step(param_norms=(order, st.params.tensor_norms))
        opt.step()
        upd = tracker.after_step()
        un, wn = reference(params, before, [[0, 1, 2, 3]])[:2]
        torch.testing.assert_close(upd.param_norms, wn, rtol=1e-12, atol=0)
        torch.testing.assert_close(upd.update_norms, un, rtol=1e-6, atol=0)
    fake = torch.arange(1.0, 5.0, dtype=torch.float64)
    set_grads(model, 9)
    tracker.before_step(param_norms=(params, fake))
    opt.step()
    assert torch.equal(tracker.after_step().param_norms, fake)
    set_grads(model, 10)
    before = [p.detach().clone() for p in params]
    tracker.before_step(param_norms=(params[:3], fake[:3]))  # one tensor missing: read them all
    opt.step()
    torch.testing.assert_close(tracker.after_step().param_norms, reference(params, before, [[0]])[1],
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="param_norms"):
        tracker.before_step(param_norms=(params, fake[:2]))
