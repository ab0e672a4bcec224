"""The float64 reference checked against independent definitions (math.fsum, math.frexp)."""

import math

import pytest
import torch

from fastgrad.reference import stats_reference, tensor_norm_reference
from fastgrad.spec import HistogramSpec, StatsSpec, make_spec

from conftest import DTYPES, make_tensor, nasty_values


def _py_norm(vals: list[float], p: float) -> float:
    if any(math.isnan(v) for v in vals):
        return math.nan
    if any(math.isinf(v) for v in vals):
        return math.inf
    m = max((abs(v) for v in vals), default=0.0)
    if m == 0:
        return 0.0
    return m * math.fsum((abs(v) / m) ** p for v in vals) ** (1 / p)


def _py_bin(v: float, spec: HistogramSpec) -> int:
    _, e = math.frexp(abs(v))
    return min(max(e - 1 - spec.min_exp + 1, 0), spec.num_bins - 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5])
def test_norm_matches_fsum(dtype, p):
    for x in (make_tensor(1000, dtype, "wide"), nasty_values(dtype)[:9], torch.zeros(3, dtype=dtype)):
        vals = x.double().tolist()
        want = _py_norm(vals, p)
        got = tensor_norm_reference(x, p).item()
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, rel=1e-13, abs=0.0), (dtype, p)


def _nonfinite_cases(dtype):
    v = nasty_values(dtype)
    inf, nan = float("inf"), float("nan")
    t = lambda xs: torch.tensor(xs, dtype=torch.float64).to(dtype)  # noqa: E731
    return {
        "nasty": v,  # NaN, +Inf, -Inf among finite extremes
        "inf_no_nan": v[~v.isnan()],
        "neginf_only": t([-inf]),
        "neginf_and_finite": t([-inf, 1.0, -2.0]),
        "posinf_and_neginf": t([inf, -inf, 0.0]),
        "nan_only": t([nan]),
        "nan_and_inf": t([inf, nan, -1.0]),
        "nan_and_zeros": t([0.0, nan, -0.0]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5])
def test_norm_matches_fsum_with_nan_and_inf(dtype, p):
    for what, x in _nonfinite_cases(dtype).items():
        want = _py_norm(x.double().tolist(), p)
        got = tensor_norm_reference(x, p).item()
        assert (math.isnan(got) and math.isnan(want)) or got == want, (what, dtype, p, got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_counts_max_abs_and_histogram_with_nan_and_inf_match_python(dtype):
    spec = make_spec((2, 1), HistogramSpec(-30, 8))
    cases = _nonfinite_cases(dtype)
    raw = stats_reference(list(cases.values()), spec)
    for row, (what, x) in enumerate(cases.items()):
        vals = x.double().tolist()
        counts = [sum(math.isnan(v) for v in vals), sum(v == math.inf for v in vals),
                  sum(v == -math.inf for v in vals), sum(v == 0 for v in vals)]
        assert raw.counts[row, :4].tolist() == counts, what
        finite = [abs(v) for v in vals if not math.isnan(v)]
        assert raw.floats[row, -1].item() == max(finite, default=0.0), what
        for j, p in enumerate((2.0, 1.0)):
            want, got = _py_norm(vals, p), raw.floats[row, j].item()
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-13), (what, p)
        hist = [0] * spec.histogram.num_bins
        for v in vals:
            if math.isfinite(v) and v != 0:
                hist[_py_bin(v, spec.histogram)] += 1
        assert raw.counts[row, 4:].tolist() == hist, what


def test_norm_extremes_do_not_overflow_or_underflow():
    big = torch.tensor([1e200, 1e200], dtype=torch.float64)
    # abs=0: pytest.approx's default absolute tolerance (1e-12) would accept 0 for 2e-200
    assert tensor_norm_reference(big, 2).item() == pytest.approx(math.sqrt(2) * 1e200, rel=1e-15, abs=0)
    tiny = torch.tensor([1e-200] * 4, dtype=torch.float64)
    assert tensor_norm_reference(tiny, 2).item() == pytest.approx(2e-200, rel=1e-15, abs=0)
    for p in (0.5, 1.0, 3.0):
        want = 4 ** (1 / p) * 1e-200
        assert tensor_norm_reference(tiny, p).item() == pytest.approx(want, rel=1e-14, abs=0), p
    f32 = torch.full((10,), 1e30, dtype=torch.float32)
    assert tensor_norm_reference(f32, 2).item() == pytest.approx(math.sqrt(10) * 1e30, rel=1e-7)
    sub = torch.tensor([1e-40, -1e-40], dtype=torch.float32)  # float32 subnormals
    assert tensor_norm_reference(sub, 2).item() == pytest.approx(math.sqrt(2) * float(sub[0]), rel=1e-15, abs=0)


def test_norm_with_max_exactly_one_and_result_types():
    x = torch.tensor([1.0, -0.5, 0.25])
    for p in (1.0, 2.0, 3.0, 0.5):
        want = math.fsum(abs(v) ** p for v in (1.0, 0.5, 0.25)) ** (1 / p)
        assert tensor_norm_reference(x, p).item() == pytest.approx(want, rel=1e-15, abs=0), p
    for t in (x, torch.empty(0), torch.empty(0, 3, dtype=torch.float16)):
        out = tensor_norm_reference(t, 2.0)
        assert out.dtype == torch.float64 and out.dim() == 0 and out.device == t.device
    assert tensor_norm_reference(torch.empty(0), 2.0).item() == 0.0
    raw = stats_reference([x, torch.empty(0)], make_spec((2, 1), HistogramSpec(-4, 4)))
    assert raw.floats.dtype == torch.float64 and raw.counts.dtype == torch.int64
    assert raw.floats.shape == (2, 3) and raw.counts.shape == (2, 4 + 10)
    assert raw.floats[0].tolist() == [tensor_norm_reference(x, 2).item(), 1.75, 1.0]
    assert raw.counts[1].tolist() == [0] * 14
    empty = stats_reference([], make_spec((2,), None))
    assert empty.floats.shape == (0, 2) and empty.counts.dtype == torch.int64


def test_counts_and_histogram_match_python():
    spec = make_spec((2,), HistogramSpec(-20, 4))
    x = torch.cat([make_tensor(5000, torch.float32, "wide"), nasty_values(torch.float32)])
    raw = stats_reference([x], spec)
    vals = x.double().tolist()
    nan = sum(math.isnan(v) for v in vals)
    pinf = sum(v == math.inf for v in vals)
    ninf = sum(v == -math.inf for v in vals)
    zero = sum(v == 0 for v in vals)
    assert raw.counts[0, :4].tolist() == [nan, pinf, ninf, zero]
    hist = [0] * spec.histogram.num_bins
    for v in vals:
        if math.isfinite(v) and v != 0:
            hist[_py_bin(v, spec.histogram)] += 1
    assert raw.counts[0, 4:].tolist() == hist
    assert raw.floats[0, -1].item() == math.inf  # max |x| includes Inf, ignores NaN


def test_max_abs_ignores_nan_and_empty_is_zero():
    spec = StatsSpec((2.0,), None)
    raw = stats_reference([torch.tensor([float("nan"), -3.0, 2.0]), torch.empty(0)], spec)
    assert raw.floats[0, -1].item() == 3.0
    assert math.isnan(raw.floats[0, 0].item())
    assert raw.floats[1].tolist() == [0.0, 0.0]


def test_histogram_spec_validation():
    with pytest.raises(ValueError, match="min_exp"):
        HistogramSpec(-200, 0)
    with pytest.raises(ValueError):
        HistogramSpec(3, 3)
    spec = HistogramSpec(-2, 1)
    assert spec.num_bins == 5
    assert spec.edges() == [0.0, 0.25, 0.5, 1.0, 2.0, math.inf]
