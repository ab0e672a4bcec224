"""The C++ CPU backend against the float64 reference over dtypes, sizes, layouts and nasty values."""

import pytest
import torch

from fastgrad.backends import get_backend
from fastgrad.reference import stats_reference
from fastgrad.spec import HistogramSpec, StatsSpec, make_spec

from conftest import DTYPES, NORM_TYPES, SIZES, assert_raw_close, layouts, make_tensor, nasty_values

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(
    CPU.why_not(torch.device("cpu"), torch.float32) is not None,
    reason=f"C++ CPU backend unavailable: {CPU.why_not(torch.device('cpu'), torch.float32)}",
)
SPEC = make_spec(NORM_TYPES, True)
# Without p = 1 the kernel takes other loops (no sum |x|; bfloat16 in 16-bit lanes): both are checked.
SPECS = {"all_norms": SPEC, "l2_inf": make_spec((2.0, "inf"), True)}


def check(tensors, spec=SPEC, what=""):
    assert_raw_close(CPU.stats(tensors, spec).raw, stats_reference(tensors, spec), what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["normal", "wide", "relu", "tiny"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_single_tensor(dtype, n, kind, spec):
    check([make_tensor(n, dtype, kind)], SPECS[spec], what=f"{dtype} n={n} {kind}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", list(SPECS))
def test_nasty_values(dtype, spec):
    x = nasty_values(dtype)
    check([x], SPECS[spec], what="nasty")
    # the same values spread through a large tensor, across chunks and vector lanes
    big = make_tensor(150_001, dtype)
    big[:: 150_001 // len(x)][: len(x)] = x
    check([big], SPECS[spec], what="nasty in big")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(layouts(torch.float32)))
def test_layouts(dtype, name):
    x = layouts(dtype)[name]
    assert not x.is_contiguous() or x.storage_offset() % 2 == 1  # misaligned view
    check([x], what=name)


def test_many_tensors_mixed_dtypes_in_one_call():
    ts = [make_tensor(n, dt, k, seed=i)
          for i, (n, dt, k) in enumerate(
              [(0, torch.float32, "normal"), (1, torch.bfloat16, "wide"), (127, torch.float16, "normal"),
               (65537, torch.float32, "relu"), (4097, torch.float64, "wide"), (0, torch.float16, "normal")])]
    ts += list(layouts(torch.bfloat16).values())
    ts += [make_tensor(3, torch.float32, seed=s) for s in range(3000)]  # many small tensors
    check(ts, what="mixed")


def test_empty_list():
    raw = CPU.stats([], SPEC).raw
    assert raw.floats.shape == (0, SPEC.num_float_cols) and raw.counts.shape == (0, SPEC.num_count_cols)


@pytest.mark.parametrize("bins", [(-126, 128), (0, 1), (-8, 8), (-126, -125), (127, 128)])
def test_histogram_ranges(bins):
    spec = StatsSpec((2.0,), HistogramSpec(*bins))
    x = torch.cat([make_tensor(20000, torch.float32, "wide"), nasty_values(torch.float32)])
    check([x, x.double(), x.bfloat16()], spec, what=str(bins))


def test_without_histogram():
    spec = StatsSpec((2.0, 1.0), None)
    check([nasty_values(torch.float32), make_tensor(70000, torch.bfloat16)], spec)


def test_float64_extremes_are_rescaled():
    big = torch.full((100_000,), 1e200, dtype=torch.float64)
    tiny = torch.full((100_000,), 1e-200, dtype=torch.float64)
    mixed = torch.cat([big[:10], tiny])
    check([big, tiny, mixed, big.neg()])


def test_bitwise_deterministic_and_thread_independent():
    ts = [make_tensor(300_001, torch.float32, "wide"), make_tensor(70_000, torch.bfloat16)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CPU.stats(ts, SPEC).raw
        torch.set_num_threads(max(2, old))
        many = CPU.stats(ts, SPEC).raw
        again = CPU.stats(ts, SPEC).raw
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one.floats, many.floats) and torch.equal(one.counts, many.counts)
    assert torch.equal(many.floats, again.floats)


def test_result_does_not_depend_on_how_a_tensor_is_split():
    import fastgrad

    x = make_tensor(1_000_003, torch.float32, "wide")
    whole = fastgrad.grad_stats([x], backend="cpu").total_norm
    pieces = fastgrad.grad_stats(list(x.split(12345)), backend="cpu").total_norm
    assert torch.allclose(whole, pieces, rtol=1e-13, atol=0)


@pytest.mark.slow
def test_1e8_elements_accuracy():
    """torch 2.13's CPU vector_norm is ~1% off here; fastgrad must be within 1e-6."""
    import fastgrad

    x = torch.randn(10**8, generator=torch.Generator().manual_seed(0))
    exact = x.double().square().sum().sqrt()  # float64 pairwise sum: ~1e-15 relative
    got = fastgrad.grad_stats([x], backend="cpu", histogram=False).total_norm
    assert abs(got.item() / exact.item() - 1) < 1e-6
    big = x * 1e30  # sum of squares ~1e68: beyond float32's range, fine in fastgrad's
    got_big = fastgrad.grad_stats([big], backend="cpu", histogram=False).total_norm
    assert abs(got_big.item() / (exact.item() * 1e30) - 1) < 1e-6
    # bfloat16: squares summed in float runs, then in double (the float64 row, not the bf16 total)
    xb = x.bfloat16()
    exact_b = xb.double().square().sum().sqrt().item()
    got_b = fastgrad.grad_stats([xb], backend="cpu").tensor_norms[0].item()
    assert abs(got_b / exact_b - 1) < 1e-6


def test_float64_maxima_at_the_ends_of_the_range():
    """The rescaling by 2^-k near max|x| stays finite for subnormal maxima and maxima >= 2^1023."""
    ts = [torch.tensor([1e-310, 0.0, 3e-311], dtype=torch.float64),  # all subnormal
          torch.tensor([1.5e308, 1.0, -1e308], dtype=torch.float64),  # max >= 2^1023
          torch.full((70_000,), 5e-324, dtype=torch.float64)]  # the smallest subnormal, across chunks
    check(ts, make_spec((2.0, 1.0, 3.0, 0.5, "inf"), True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", list(SPECS))
def test_nan_does_not_hide_its_neighbours_max(dtype, spec):
    """max|x| is over the non-NaN values, also when a NaN and the largest value share a vector."""
    x = torch.full((4096,), 0.5, dtype=torch.float64)
    x[100], x[101], x[3000] = float("nan"), -7.0, float("nan")
    check([x.to(dtype)], SPECS[spec], what="nan next to max")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_squares_summed_in_float(dtype):
    """16-bit squares are summed in float before double: within 1e-6 also where they leave float's range."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300_000, generator=g, dtype=torch.float64)
    ts = [x.to(dtype)]
    if dtype == torch.bfloat16:
        ts += [(x * 1e30).to(dtype),  # squares overflow float: those blocks are summed again in double
               (x * 2.0**-70).to(dtype),  # squares underflow float
               # a block whose largest value is just above the re-sum threshold, the rest subnormal when squared
               torch.cat([torch.full((1,), 2.0**-39), x[:5000] * 2.0**-70]).to(dtype)]
    spec = make_spec((2.0,), False)  # no p = 1: the float-squares path
    got, want = CPU.stats(ts, spec).raw, stats_reference(ts, spec)
    assert_raw_close(got, want, rel=1e-6)
    # the bound is 14 float roundings per run of 15 squares; random rounding errors stay far below it
    err = ((got.floats[:, 0] - want.floats[:, 0]).abs() / want.floats[:, 0]).max().item()
    assert err < 1e-7, err


# -- in-place ops ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("coef", [0.3, 1e-3, 0.0])
def test_scale_matches_torch_bitwise(dtype, coef):
    ts = [make_tensor(70_001, dtype, "wide"), nasty_values(dtype), layouts(dtype)["column_slice"].clone()]
    ts.append(layouts(dtype)["transposed"].clone().t())  # a non-contiguous tensor written in place
    want = [t.clone() for t in ts]
    c = torch.tensor(coef, dtype=torch.float64)
    for w in want:
        w.mul_(c.to(torch.float32) if dtype != torch.float64 else c)
    CPU.scale_(ts, c)
    for g, w in zip(ts, want):
        assert torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)), (dtype, coef)


def test_scale_by_one_writes_nothing():
    # a signalling NaN is quieted by any float multiply: surviving bit-for-bit proves no write
    x = torch.tensor([1.0, 2.0, 0.0, 0.0])
    x.view(torch.int32)[2] = 0x7F800001
    before = x.view(torch.int32).clone()
    CPU.scale_([x], torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(x.view(torch.int32), before)
    CPU.scale_([x], torch.tensor(0.5, dtype=torch.float64))
    assert x[0].item() == 0.5 and x.view(torch.int32)[2].item() != 0x7F800001


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamp_matches_torch(dtype):
    ts = [make_tensor(70_001, dtype, "wide"), nasty_values(dtype), layouts(dtype)["column_slice"].clone()]
    want = [t.clone().clamp_(-0.1, 0.1) for t in ts]
    CPU.clamp_(ts, 0.1)
    for g, w in zip(ts, want):
        assert torch.equal(g.isnan(), w.isnan())
        assert torch.equal(g.nan_to_num(), w.nan_to_num())
