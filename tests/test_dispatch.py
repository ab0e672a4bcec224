"""Backend choice: one dispatch point, explicit requests raise with reasons, auto falls back."""

import pytest
import torch

import fastgrad
from fastgrad import dispatch


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="reference, cpu, triton, cuda"):
        fastgrad.grad_stats([torch.ones(2)], backend="fast")
    monkeypatch.setenv("FASTGRAD_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTGRAD_BACKEND="):
        fastgrad.grad_stats([torch.ones(2)])


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTGRAD_BACKEND", "reference")
    assert dispatch.requested_backend(None) == "reference"
    assert dispatch.requested_backend("cpu") == "cpu"  # the argument wins
    monkeypatch.setenv("FASTGRAD_BACKEND", "auto")
    assert dispatch.requested_backend(None) is None


def test_explicit_backend_that_cannot_serve_raises():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot handle"):
        fastgrad.grad_stats([torch.ones(2)], backend="cuda")


def test_auto_prefers_cpu_kernel_for_cpu_tensors():
    b = dispatch.choose(torch.device("cpu"), torch.float32, None)
    cpu_reason = fastgrad.get_backend("cpu").why_not(torch.device("cpu"), torch.float32)
    assert b.name == ("cpu" if cpu_reason is None else "reference")


def test_available_backends_reports_reasons():
    avail = fastgrad.available_backends("cpu")
    assert set(avail) == {"reference", "cpu", "triton", "cuda"}
    assert avail["reference"] is None
    assert isinstance(avail["cuda"], str)


def test_backends_agree_through_the_public_api():
    torch.manual_seed(0)
    xs = [torch.randn(1000), torch.randn(33, 7).t(), torch.randn(5, dtype=torch.bfloat16)]
    a = fastgrad.grad_stats(xs, backend="reference", norm_types=(2, 1, "inf"))
    b = fastgrad.grad_stats(xs, backend="cpu", norm_types=(2, 1, "inf"))
    assert torch.equal(a.raw.counts, b.raw.counts)
    torch.testing.assert_close(a.raw.floats, b.raw.floats, rtol=1e-12, atol=0)


def test_missing_cpu_extension_falls_back_with_one_warning(monkeypatch):
    from fastgrad.backends import cpu

    monkeypatch.setattr(cpu, "_C", None)
    monkeypatch.setattr(cpu, "LOAD_ERROR", "the C++ extension fastgrad._C is not available (simulated)")
    dispatch.choose.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="reference backend.*cpu: the C\\+\\+ extension.*simulated"):
            s = fastgrad.grad_stats([torch.ones(4)])
        assert s.total_norm.item() == 2.0
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call must not warn again
            fastgrad.grad_stats([torch.ones(4)])
        with pytest.raises(RuntimeError, match="simulated"):
            fastgrad.grad_stats([torch.ones(4)], backend="cpu")
    finally:
        dispatch.choose.cache_clear()
