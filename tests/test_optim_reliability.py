"""wrap/attach as users meet them: layers added after wrap (#11.9), SparseAdam (#11.10), and what
``.grad`` holds after a wrapped step on every path (#11.14)."""

from __future__ import annotations

import pytest
import torch

import fastgrad
from fastgrad import clip


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def backward(model: torch.nn.Module, scale: float = 10.0) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    (((model(x) - y) ** 2).mean() * scale).backward()


# -- a layer added to the model after wrap() ----------------------------------------------------


@pytest.mark.parametrize("how", ["model", "monitor"])
def test_add_param_group_accepts_a_layer_added_after_wrap(how, tmp_path):
    model = make_model()
    if how == "model":
        opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0, model=model)
    else:
        mon = fastgrad.GradMonitor(model, loggers=None, run_dir=tmp_path)
        opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0, monitor=mon)
    head = torch.nn.Linear(3, 3)
    model.add_module("head", head)
    opt.add_param_group({"params": list(head.parameters()), "lr": 0.01})
    assert len(opt.param_groups) == 2
    opt.zero_grad()
    backward(model)
    opt.step()
    assert opt.last_stats.names[-2:] == ("head.weight", "head.bias")
    assert "head.weight" in opt.last_stats.stats.names
    # still refused: a parameter the model does not hold, and nothing changes then
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    assert len(opt.param_groups) == 2


def test_attach_names_a_layer_added_later():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fastgrad.attach(opt, max_norm=1.0, model=model)
    head = torch.nn.Linear(3, 3)
    model.add_module("head", head)
    opt.add_param_group({"params": list(head.parameters())})
    backward(model)
    opt.step()
    assert opt.last_stats.names[-2:] == ("head.weight", "head.bias")


# -- SparseAdam ------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["wrap", "attach"])
def test_sparse_adam_is_refused_at_wrap_time(entry):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="SparseAdam.*sparse gradients"):
        getattr(fastgrad, entry)(opt)  # no clipping requested: refused all the same
    assert not hasattr(opt, "_fastgrad_attachment") and not opt._optimizer_step_pre_hooks
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()  # the optimizer is untouched and works


# -- .grad after a wrapped step --------------------------------------------------------------------

OPTIMIZERS = {
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),  # folded: grad_scale / found_inf
    "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),  # scaled: .grad *= c
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2),
}


def _wrapped(name, model, how, **kw):
    base = OPTIMIZERS[name](model.parameters())
    if how == "wrap":
        return fastgrad.wrap(base, **kw)
    fastgrad.attach(base, **kw)
    return base


@pytest.mark.parametrize("how", ["wrap", "attach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_holds_the_clipped_gradient_after_an_applied_step(name, how):
    """Documented: after an applied step ``.grad`` holds ``g * c`` on the folded and scaled paths alike."""
    model = make_model()
    opt = _wrapped(name, model, how, max_norm=0.1)
    backward(model)
    received = [p.grad.clone() for p in model.parameters()]
    opt.step()
    c = opt.last_stats.clip_coef
    assert c.item() < 0.5, "the test must clip"
    for g0, p in zip(received, model.parameters()):
        torch.testing.assert_close(p.grad, g0 * c.to(torch.float32), rtol=2e-7, atol=0)


@pytest.mark.parametrize("name", ["adamw_fused", "adamw_foreach"])
def test_grad_is_unscaled_and_clipped_under_a_grad_scaler(name):
    model = make_model()
    opt = _wrapped(name, model, "wrap", max_norm=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    scaler.scale(((model(x) - y) ** 2).mean() * 10).backward()
    received = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    c = opt.last_stats.clip_coef.item()
    assert c < 0.5 and not opt.last_stats.skipped.item()
    for g0, p in zip(received, model.parameters()):
        torch.testing.assert_close(p.grad, g0 / 2.0**8 * c, rtol=1e-6, atol=0)


@pytest.mark.parametrize("how", ["wrap", "attach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_is_left_as_received_after_a_skipped_step(name, how):
    model = make_model()
    opt = _wrapped(name, model, how, max_norm=0.1)
    backward(model)
    model[2].bias.grad[0] = float("nan")
    received = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert opt.last_stats.skipped.item()
    for g0, p in zip(received, model.parameters()):
        assert torch.equal(g0.nan_to_num(7.0), p.grad.nan_to_num(7.0))


def test_per_tensor_clipper_on_a_fused_optimizer_writes_grad_even_when_skipped():
    """The documented exception: such clippers write .grad before the device decides to skip."""
    model = make_model()
    opt = fastgrad.wrap(OPTIMIZERS["adamw_fused"](model.parameters()), clipper=clip.PerTensorNorm(1e-3))
    backward(model)
    model[2].bias.grad[0] = float("nan")
    before = model[0].weight.grad.clone()
    opt.step()
    assert opt.last_stats.skipped.item()
    assert model[0].weight.grad.norm() <= 1e-3 * (1 + 1e-6) < before.norm()
