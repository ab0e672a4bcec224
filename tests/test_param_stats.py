"""grad_stats(..., params=True): weight norms and ||g||/||w|| from the same launch as the gradients.

Checked against float64 norms of the weights computed here, for every backend available on the
CPU, all dtypes (gradients and weights of different dtypes too) and non-contiguous weights.
"""

import math

import pytest
import torch

import fastgrad

from conftest import make_tensor

CPU = torch.device("cpu")


def cpu_backends():
    out = []
    for name, reason in fastgrad.available_backends("cpu").items():
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


def named_params(dtype_w, dtype_g, seed=0):
    """(name, parameter) pairs with gradients; one weight is a transposed (non-contiguous) view."""
    shapes = [(33,), (7, 5), (4097,), (1,), (0,), (12, 9)]
    out = []
    for i, shape in enumerate(shapes):
        n = math.prod(shape)
        w = make_tensor(n, dtype_w, "wide", seed=seed + i).reshape(shape)
        if i == 5:
            w = make_tensor(n, dtype_w, seed=seed + i).reshape(9, 12).t()  # a view
        p = torch.nn.Parameter(w, requires_grad=True) if i != 5 else w.requires_grad_()
        if dtype_g != dtype_w:
            p.grad_dtype = None  # mixed precision: bf16 gradients of fp32 weights
        p.grad = make_tensor(n, dtype_g, "wide", seed=100 + seed + i).reshape(p.shape)
        out.append((f"layer{i // 2}.t{i}", p))
    return out


def f64_norm(ts):
    flat = [t.detach().double().flatten() for t in ts]
    return torch.linalg.vector_norm(torch.cat(flat)) if flat else torch.tensor(0.0, dtype=torch.float64)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype_w, dtype_g", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.float64, torch.float64)], ids=str)
def test_param_norms_and_ratio_against_float64(backend, dtype_w, dtype_g):
    pairs = named_params(dtype_w, dtype_g)
    st = fastgrad.grad_stats(pairs, params=True, groups=1, backend=backend, norm_types=("inf",))
    ws = [p for _, p in pairs]
    want_w = torch.stack([f64_norm([w]) for w in ws])
    want_g = torch.stack([f64_norm([w.grad]) for w in ws])
    torch.testing.assert_close(st.param_norms, want_w, rtol=1e-6, atol=0)
    ratio = st.grad_param_ratio
    assert ratio[4].isnan()  # the empty tensor: 0 / 0
    keep = torch.tensor([i != 4 for i in range(len(ws))])
    torch.testing.assert_close(ratio[keep], (want_g / want_w)[keep], rtol=2e-6, atol=0)
    torch.testing.assert_close(st.total_param_norm, f64_norm(ws), rtol=1e-6, atol=0)
    # groups: layer0 = t0, t1; layer1 = t2, t3; layer2 = t4, t5
    assert st.groups.names == ("layer0", "layer1", "layer2")
    for g, members in enumerate(([0, 1], [2, 3], [4, 5])):
        torch.testing.assert_close(st.groups.param_norms[g], f64_norm([ws[i] for i in members]), rtol=1e-6, atol=0)
    # the first norm type stays total_norm's; L2 was added for the weights
    assert st.norm_type == math.inf and 2.0 in st.spec.norm_types
    torch.testing.assert_close(st.total_norm, torch.stack([w.grad.double().abs().max() for w in ws if w.numel()]).max())
    # every statistic of the weights, on the same rows
    assert st.params.names == st.names
    assert st.params.numel.tolist() == [w.numel() for w in ws]
    assert st.params.zero_count.tolist() == [int((w == 0).sum()) for w in ws]


def test_params_true_reads_weights_in_the_same_backend_call(monkeypatch):
    """One pass over gradients and weights: the backend is called once per grad_stats call."""
    from fastgrad import dispatch

    calls = []
    real = dispatch.compute
    monkeypatch.setattr(dispatch, "compute", lambda ts, *a, **k: calls.append(len(ts)) or real(ts, *a, **k))
    pairs = named_params(torch.float32, torch.float32)
    fastgrad.grad_stats(pairs, params=True)
    assert calls == [2 * len(pairs)]


def test_params_true_with_a_module_and_zero_weights():
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.bias.zero_()
    m(torch.randn(4, 3)).sum().backward()
    st = fastgrad.grad_stats(m, params=True)
    assert st.names == ("weight", "bias")
    assert st.param_norms[1].item() == 0.0 and math.isinf(st.grad_param_ratio[1].item())


def test_params_true_needs_parameters():
    with pytest.raises(ValueError, match="params=True"):
        fastgrad.grad_stats([torch.randn(3)], params=True)
    st = fastgrad.grad_stats([torch.randn(3)])
    with pytest.raises(ValueError, match="params=True"):
        st.param_norms
