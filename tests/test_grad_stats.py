"""The public grad_stats API: inputs, names, groups, GradStats views and helpers, errors."""

import math

import pytest
import torch

import fastgrad
from fastgrad.reference import tensor_norm_reference

from conftest import make_tensor

BACKENDS = ["reference", "cpu"]


def tiny_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    )
    m(torch.randn(5, 6)).pow(2).sum().backward()
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_input_names_groups_and_totals(backend):
    m = tiny_model()
    s = fastgrad.grad_stats(m, backend=backend, norm_types=(2, 1, "inf"))
    names = [n for n, _ in m.named_parameters()]
    assert list(s.names) == names
    grads = [p.grad for p in m.parameters()]
    for i, g in enumerate(grads):
        assert s.tensor_norms[i].item() == pytest.approx(g.double().norm().item(), rel=1e-12)
        assert s.norm(1)[i].item() == pytest.approx(g.double().abs().sum().item(), rel=1e-12)
        assert s.norm("inf")[i].item() == g.abs().max().item()
        assert s.max_abs[i].item() == g.abs().max().item()
    flat = torch.cat([g.double().flatten() for g in grads])
    assert s.total_norm.item() == pytest.approx(flat.norm().item(), rel=1e-12)
    assert s.total_norm.dtype == torch.float64
    # grouped by owning module by default for a Module
    assert s.groups is not None
    assert list(s.groups.names) == ["0", "2.0", "2.1"]
    g0 = torch.cat([m[0].weight.grad.flatten(), m[0].bias.grad.flatten()]).double()
    assert s.groups.tensor_norms[0].item() == pytest.approx(g0.norm().item(), rel=1e-12)
    assert s.groups.numel.tolist() == [6 * 8 + 8, 8 * 8 + 8, 8 * 2 + 2]
    assert int(s.global_histogram.sum()) == flat.numel() - int((flat == 0).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_params_tensors_pairs(backend):
    m = tiny_model()
    params = list(m.parameters())
    params[1].grad = None  # skipped, like torch
    s1 = fastgrad.grad_stats(params, backend=backend)
    assert list(s1.names) == ["[0]", "[2]", "[3]", "[4]", "[5]"]
    s2 = fastgrad.grad_stats([p.grad for p in params if p.grad is not None], backend=backend)
    assert torch.equal(s1.tensor_norms, s2.tensor_norms)
    s3 = fastgrad.grad_stats(m.named_parameters(), backend=backend)
    assert s3.names[0] == "0.weight" and "0.bias" not in s3.names
    s4 = fastgrad.grad_stats(params, names=[f"p{i}" for i in range(6)], backend=backend)
    assert s4.names[0] == "p0"
    single = fastgrad.grad_stats(torch.ones(4), backend=backend)
    assert single.total_norm.item() == 2.0


@pytest.mark.parametrize(
    "groups, want",
    [("module", ["a.b", "a", "c"]), (1, ["a", "c"]), (lambda n: n[0], ["a", "c"]),
     ({"a.b.w": "x", "a.w": "x"}, ["x", "c.w"]), (["g1", "g2", "g1"], ["g1", "g2"])],
)
def test_group_arguments(groups, want):
    xs = [torch.full((4,), 1.0), torch.full((9,), 2.0), torch.full((16,), 3.0)]
    s = fastgrad.grad_stats(xs, names=["a.b.w", "a.w", "c.w"], groups=groups)
    assert list(s.groups.names) == want
    labels = fastgrad.stats.group_labels(["a.b.w", "a.w", "c.w"], groups)
    for gi, gname in enumerate(want):
        members = torch.cat([x for x, lab in zip(xs, labels) if lab == gname]).double()
        assert s.groups.tensor_norms[gi].item() == pytest.approx(members.norm().item(), rel=1e-14)
        assert s.groups.numel[gi].item() == members.numel()


def test_group_norms_with_nan_inf_and_zero_groups():
    xs = [torch.tensor([1.0, float("nan")]), torch.tensor([3.0]), torch.tensor([float("inf"), 1.0]),
          torch.zeros(3), torch.empty(0)]
    s = fastgrad.grad_stats(xs, groups=["a", "a", "b", "c", "c"], norm_types=(2, "inf"))
    n = s.groups.tensor_norms.tolist()
    assert math.isnan(n[0]) and n[1] == math.inf and n[2] == 0.0
    assert math.isnan(s.groups.norm("inf")[0].item()) and s.groups.norm("inf")[1].item() == math.inf
    assert s.groups.nan_count.tolist() == [1, 0, 0]
    assert s.groups.zero_count.tolist() == [0, 0, 3]
    assert math.isnan(s.total_norm.item())
    assert s.nonfinite_names() == ["[0]", "[2]"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_total_norm_scaled_combination_extremes(backend):
    # per-tensor norms of 1e200 and 1e-200 (float64) combine without overflow or loss
    xs = [torch.full((4,), 1e200, dtype=torch.float64), torch.full((4,), 1e-200, dtype=torch.float64)]
    s = fastgrad.grad_stats(xs, backend=backend)
    assert s.total_norm.item() == pytest.approx(2e200, rel=1e-14)
    assert s.tensor_norms[1].item() == pytest.approx(2e-200, rel=1e-14)


def test_to_dict_summary_nonfinite_names():
    m = tiny_model()
    m[0].weight.grad[0, 0] = float("nan")
    s = fastgrad.grad_stats(m, norm_types=(2, "inf"))
    d = s.to_dict()
    assert set(d) == {n for n, _ in m.named_parameters()}
    assert d["0.weight"]["nan"] == 1 and math.isnan(d["0.weight"]["norm"])
    assert math.isnan(d["0.weight"]["norm_inf"])
    assert len(d["0.bias"]["histogram"]) == fastgrad.HistogramSpec().num_bins
    assert d["0.bias"]["numel"] == 8
    assert s.nonfinite_names() == ["0.weight"]
    text = s.summary()
    assert "total" in text and "2.1" in text


def test_histogram_options():
    x = make_tensor(1000, torch.float32, "wide")
    s = fastgrad.grad_stats([x], histogram=(-4, 4))
    assert s.histogram.shape == (1, 10) and s.hist_spec == fastgrad.HistogramSpec(-4, 4)
    assert int(s.histogram.sum()) == 1000
    assert fastgrad.grad_stats([x], histogram=False).histogram is None
    with pytest.raises(TypeError, match="histogram"):
        fastgrad.grad_stats([x], histogram="yes")


def test_norm_not_requested_is_an_error():
    s = fastgrad.grad_stats([torch.ones(3)])
    with pytest.raises(ValueError, match="was not computed"):
        s.norm(1)


def test_empty_inputs():
    with pytest.warns(UserWarning, match="no tensors were given"):
        s = fastgrad.grad_stats([])
    assert s.total_norm.item() == 0.0 and s.names == ()
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match=r"\.grad None"):
        assert fastgrad.grad_stats([p]).total_norm.item() == 0.0  # grad None -> skipped
    z = fastgrad.grad_stats([torch.empty(0), torch.empty(0, 5)])
    assert z.tensor_norms.tolist() == [0.0, 0.0] and z.max_abs.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "bad, exc, match",
    [([torch.ones(3, dtype=torch.int64)], TypeError,
      r"^gradient of \[0\] has non-floating dtype torch\.int64; fastgrad supports float16, bfloat16, float32 "
      r"and float64$"),
     ([torch.ones(2), torch.ones(3, dtype=torch.complex64)], TypeError,
      r"^gradient of \[1\] has complex dtype torch\.complex64; fastgrad supports float16, bfloat16, float32 and "
      r"float64 \(use torch\.view_as_real to read it as a float tensor\)$"),
     ([torch.ones(3).to_sparse()], RuntimeError,
      r"^gradient of \[0\] has layout torch\.sparse_coo; fastgrad reads dense \(strided\) gradients only: "
      r"convert it with \.to_dense\(\) first$"),
     ([torch.ones(3), "x"], TypeError, r"^\[1\]: expected a Tensor, got str$"),
     (42, TypeError, r"iterable of tensors, got int$")],
)
def test_bad_gradients(bad, exc, match):
    with pytest.raises(exc, match=match):
        fastgrad.grad_stats(bad)


@pytest.mark.parametrize("nt, exc", [(0, ValueError), (-1, ValueError), (float("nan"), ValueError),
                                     ("two", TypeError), ((), ValueError)])
def test_bad_norm_types(nt, exc):
    with pytest.raises(exc):
        fastgrad.grad_stats([torch.ones(2)], norm_types=nt)


def test_names_length_mismatch():
    with pytest.raises(ValueError, match="names"):
        fastgrad.grad_stats([torch.ones(2)], names=["a", "b"])


def test_reference_norm_used_by_stats_is_the_definition():
    x = make_tensor(5000, torch.bfloat16, "wide")
    s = fastgrad.grad_stats([x], norm_types=(3,))
    assert s.tensor_norms[0].item() == pytest.approx(tensor_norm_reference(x, 3.0).item(), rel=1e-12)


# -- what collect() takes a gradient to be (pinned by mutation testing) ---------------------------


def test_frozen_parameters_are_parameters_not_gradients():
    frozen = torch.nn.Parameter(torch.full((3,), 5.0), requires_grad=False)
    live = torch.nn.Parameter(torch.ones(2))
    live.grad = torch.full((2,), 2.0)
    # fast path (tensors and parameters) and pair path: a frozen parameter without .grad is skipped,
    # never read as if its values were a gradient
    assert fastgrad.grad_stats([frozen, live]).names == ("[1]",)
    s = fastgrad.grad_stats([("frozen", frozen), ("live", live)])
    assert s.names == ("live",) and s.total_norm.item() == pytest.approx(math.sqrt(8), rel=1e-15)
    frozen.grad = torch.full((3,), 1.0)  # a frozen parameter that has a .grad: that is read
    s = fastgrad.grad_stats([("frozen", frozen), ("live", live)])
    assert s.names == ("frozen", "live") and s.total_norm.item() == pytest.approx(math.sqrt(11), rel=1e-15)


def test_named_plain_tensors_are_gradients_themselves():
    g = [("a", torch.ones(4)), ("b", torch.full((1,), 2.0))]
    s = fastgrad.grad_stats(g)
    assert s.names == ("a", "b") and s.tensor_norms.tolist() == [2.0, 2.0]
    leaf = torch.ones(3, requires_grad=True)
    out = leaf * 3  # a non-leaf tensor that requires grad is a value, not a parameter
    s = fastgrad.grad_stats([("out", out), ("plain", torch.ones(1))])
    assert s.names == ("out", "plain") and s.tensor_norms[0].item() == pytest.approx(math.sqrt(27), rel=1e-15)
    leaf.grad = torch.full((3,), 4.0)
    assert fastgrad.grad_stats([("leaf", leaf)]).tensor_norms.tolist() == [pytest.approx(math.sqrt(48))]


def test_empty_input_warns_saying_why():
    with pytest.warns(UserWarning, match="no tensors were given"):
        fastgrad.grad_stats([])
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match=r"all 2 parameters given have \.grad None"):
        fastgrad.grad_stats([p, ("q", torch.nn.Parameter(torch.ones(1)))])
    with pytest.warns(UserWarning, match=r"all 1 parameters"):
        fastgrad.grad_stats([p])
    with pytest.raises(TypeError, match="got int"):
        fastgrad.grad_stats(42)


# -- GradStats views, to_dict and summary pinned (mutation survivors) ------------------------------


def _rows():
    xs = [torch.tensor([3.0, -4.0, 0.0]), torch.tensor([float("nan"), 1.0]), torch.tensor([-0.5, float("-inf")]),
          torch.tensor([0.25, 0.0, 0.0, 0.0]), torch.tensor([2.0 ** -70])]
    return fastgrad.grad_stats(xs, names=["a", "b", "c", "d", "e"], norm_types=(1, 2, "inf"), histogram=(-8, 4))


def test_to_dict_keys_and_values():
    d = _rows().to_dict()
    assert list(d) == ["a", "b", "c", "d", "e"]
    a = d["a"]
    assert set(a) == {"numel", "norm", "norm_2", "norm_inf", "max_abs", "nan", "posinf", "neginf", "zero",
                      "histogram"}
    assert (a["numel"], a["norm"], a["norm_2"], a["norm_inf"], a["max_abs"]) == (3, 7.0, 5.0, 4.0, 4.0)
    assert (a["nan"], a["posinf"], a["neginf"], a["zero"]) == (0, 0, 0, 1)
    # 14 bins: [0] below 2^-8, [k] = [2^(k-9), 2^(k-8)) for k = 1..12, [13] at or above 2^4
    assert a["histogram"] == [0] * 10 + [1, 1, 0, 0]  # 3 in [2, 4), 4 in [4, 8)
    assert d["d"]["histogram"] == [0] * 7 + [1] + [0] * 6  # 0.25 in [2^-2, 2^-1)
    b = d["b"]
    assert math.isnan(b["norm"]) and math.isnan(b["norm_2"]) and math.isnan(b["norm_inf"])
    assert b["max_abs"] == 1.0 and b["nan"] == 1
    c = d["c"]
    assert c["norm"] == c["norm_2"] == c["norm_inf"] == c["max_abs"] == math.inf and c["neginf"] == 1
    assert d["e"]["histogram"][0] == 1 and d["e"]["norm"] == 2.0 ** -70
    s = fastgrad.grad_stats([torch.ones(2)], norm_types=("inf", 2), histogram=False).to_dict()["[0]"]
    assert s["norm"] == 1.0 and s["norm_2"] == pytest.approx(math.sqrt(2), rel=1e-15) and "histogram" not in s


def test_summary_table_rows_sorting_and_truncation():
    s = _rows()
    lines = s.summary().splitlines()
    assert lines[0].split() == ["name", "numel", "norm", "max_abs", "nan", "inf", "zeros"]
    total = lines[1].split()
    assert total[0] == "total" and total[1] == "12" and total[2] == "nan" and total[4:] == ["1", "1", "4"]
    assert [line.split()[0] for line in lines[2:]] == ["a", "b", "c", "d", "e"]
    a = lines[2].split()
    assert a[1:] == ["3", f"{7.0:.4e}", f"{4.0:.3e}", "0", "0", "1"]
    by_norm = [line.split()[0] for line in s.summary(sort_by_norm=True).splitlines()[2:]]
    assert by_norm == ["b", "c", "a", "d", "e"]  # NaN first, then largest norm first
    cut = s.summary(max_rows=2).splitlines()
    assert [line.split()[0] for line in cut[2:4]] == ["a", "b"] and cut[4] == "... 3 more rows" and len(cut) == 5
    assert len(s.summary(max_rows=5).splitlines()) == 7
    m = tiny_model()
    g = fastgrad.grad_stats(m).summary().splitlines()
    assert [line.split()[0] for line in g[2:]] == ["0", "2.0", "2.1"]  # groups, when there are groups


def test_views_without_histogram_and_group_argument_errors():
    s = fastgrad.grad_stats([torch.ones(2)], histogram=False)
    assert s.histogram is None and s.hist_spec is None and s.global_histogram is None
    assert s.norm_type == 2.0 and s.total.names == ("total",) and s.total.numel.tolist() == [2]
    with pytest.raises(ValueError, match=r"norm 1\.0 was not computed; pass norm_types including it"):
        s.norm(1)
    xs, names = [torch.ones(1)] * 2, ["a.b", "c"]
    with pytest.raises(TypeError, match="groups must be"):
        fastgrad.grad_stats(xs, names=names, groups=True)
    with pytest.raises(ValueError, match="groups depth must be >= 1, got 0"):
        fastgrad.grad_stats(xs, names=names, groups=0)
    with pytest.raises(ValueError, match="the only string accepted is 'module'"):
        fastgrad.grad_stats(xs, names=names, groups="layers")
    with pytest.raises(ValueError, match="groups has 1 labels for 2 gradients"):
        fastgrad.grad_stats(xs, names=names, groups=["x"])
    assert fastgrad.stats.module_group("layers.3.attn.weight") == "layers.3.attn"
    assert fastgrad.stats.module_group("weight") == "weight"
    assert fastgrad.stats.group_labels(["a.b.c", "d"], 2) == ["a.b", "d"]
    assert fastgrad.stats.group_labels(["a", "b"], None) is None


def test_no_warning_when_there_are_gradients():
    import warnings

    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for arg in ([p], [("p", p)], [("g", torch.ones(3)), p], [torch.ones(1)], torch.nn.Linear(1, 1)):
            if isinstance(arg, torch.nn.Module):
                arg(torch.ones(1, 1)).sum().backward()
            fastgrad.grad_stats(arg)


def test_params_true_collects_the_weights_of_each_gradient():
    lin = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.full((4,), 7.0))  # no .grad: skipped with its weight
    lin(torch.ones(5, 3)).sum().backward()
    s = fastgrad.grad_stats([("w", lin.weight), ("frozen", frozen), lin.bias], params=True)
    assert s.names == ("w", "[2]")
    w = [lin.weight.detach().double(), lin.bias.detach().double()]
    assert s.param_norms.tolist() == pytest.approx([x.norm().item() for x in w], rel=1e-12, abs=0)
    g = [lin.weight.grad.double(), lin.bias.grad.double()]
    assert s.grad_param_ratio.tolist() == pytest.approx([a.norm().item() / b.norm().item() for a, b in zip(g, w)],
                                                        rel=1e-12, abs=0)
    assert s.total_param_norm.item() == pytest.approx(torch.cat([x.flatten() for x in w]).norm().item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"^\[0\]: params=True reads each gradient's parameter, but this is a "
                                         r"gradient tensor"):
        fastgrad.grad_stats([torch.ones(2)], params=True)
    with pytest.raises(TypeError, match=r"^x: expected a Tensor, got int$"):
        fastgrad.grad_stats([("x", 3)], params=True)
    with pytest.raises(ValueError, match=r"weight statistics were not computed: call grad_stats\(\.\.\., params=True\)"):
        fastgrad.grad_stats([lin.weight]).param_norms
    with pytest.warns(UserWarning, match=r"all 1 parameters given have \.grad None"):
        fastgrad.grad_stats([frozen], params=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norms_of_small_and_tiny_members(backend):
    """Group rows combine member norms scaled by the group's largest: exact for members whose
    largest norm is exactly 1, below 1, and 1e-200 (whose squares underflow unscaled)."""
    xs = [torch.tensor([1.0]), torch.tensor([0.5, 0.5]),  # group a: norms 1 and sqrt(0.5)
          torch.tensor([0.25]), torch.tensor([0.125, 0.0]),  # group b: below 1
          torch.full((4,), 1e-200, dtype=torch.float64), torch.full((1,), 3e-200, dtype=torch.float64)]  # c
    s = fastgrad.grad_stats(xs, groups=["a", "a", "b", "b", "c", "c"], norm_types=(2, 1, 0.5), backend=backend)
    want = {2: [math.sqrt(1.5), math.sqrt(0.25**2 + 0.125**2), math.sqrt(4 + 9) * 1e-200],
            1: [2.0, 0.375, 7e-200],
            0.5: [(1 + 2 * math.sqrt(0.5)) ** 2, (0.5 + math.sqrt(0.125)) ** 2, (4e-100 + math.sqrt(3e-200)) ** 2]}
    for p, w in want.items():
        assert s.groups.norm(p).tolist() == pytest.approx(w, rel=1e-13, abs=0), p
    assert s.total_norm.item() == pytest.approx(math.sqrt(1.5 + 0.25**2 + 0.125**2), rel=1e-13, abs=0)
    empty = fastgrad.stats.group_labels([], [])
    assert empty == []
    with pytest.warns(UserWarning, match="no tensors were given"):
        z = fastgrad.grad_stats([], groups=[], backend=backend)
    assert z.groups.names == () and z.groups.tensor_norms.shape == (0,) and z.groups.max_abs.shape == (0,)


def test_weights_follow_groups_and_total_and_lists_are_not_grouped():
    m = tiny_model()
    s = fastgrad.grad_stats(m, params=True)
    ws = {n: p.detach().double() for n, p in m.named_parameters()}
    want0 = torch.cat([ws["0.weight"].flatten(), ws["0.bias"].flatten()]).norm().item()
    assert s.groups.names == ("0", "2.0", "2.1")
    assert s.groups.param_norms[0].item() == pytest.approx(want0, rel=1e-12, abs=0)
    assert s.total.param_norms[0].item() == pytest.approx(s.total_param_norm.item(), rel=1e-15, abs=0)
    assert fastgrad.grad_stats(list(m.parameters())).groups is None  # only a Module is grouped by default
    assert fastgrad.grad_stats([p.grad for p in m.parameters()]).groups is None
