"""One conformance matrix: every backend that can run here, against the protocol and the float64 reference.

Targets are (backend, device) pairs: ``reference`` and ``cpu`` on CPU tensors;
``triton`` on CPU tensors under the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` for the session when no GPU is present); ``cuda``,
``triton`` and ``reference`` on CUDA tensors when a GPU is present (marked
``cuda``: ``pytest -m cuda`` runs just those). A target that cannot run here
is skipped with its backend's own reason (``why_not``), except that Triton,
when installed, must run on one device or the other
(:func:`test_triton_runs_in_this_session` fails instead of skipping).

Every statistics check (:func:`check`) compares

* the rows with the float64 reference of each tensor,
* the total row with the float64 reference of all elements concatenated
  (independent of how a backend combines rows) and with the aggregation of the
  backend's own rows (:func:`fastgrad.aggregate.aggregate`),
* the element counts ``[T + 1]``,

counts and histograms exactly, norms and max|x| within ``REL_TOL`` (1e-6).
In-place ops are compared bit for bit with the float64-math expectation
computed on CPU copies (float64 multiplies for float64, the dtype's float32
op-math otherwise, as torch does), with the bytes around every written view
(signalling NaNs, which any float operation would quiet) unchanged.

Inputs are made on the CPU from seeds and moved to the target's device;
views are taken there, so offsets and strides reach the kernels.

The Triton interpreter pays tens of milliseconds per program (per chunk and
per tensor), so its target runs a thinned grid (Target.sizes, .few, .big:
five sizes up to CHUNK + 1, two value kinds, three of the coefficients, clip
values and views) and 40 tensors where the others take thousands (more
than Apex's 110 per launch); the GPU targets run it all, plus 1,000,003
elements.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass

import pytest
import torch

import fastgrad
from fastgrad import aggregate, dispatch
from fastgrad.backends import BACKEND_NAMES, get_backend
from fastgrad.backends.base import FAST_FORMS, REQUIRED, Backend, has_fast_forms
from fastgrad.spec import DTYPE_CODES, HistogramSpec, StatsResult, StatsSpec, make_spec

from conftest import (CHUNK, DTYPES, HAS_CUDA, NORM_TYPES, ODD_OFFSETS, REL_TOL, TRITON_INSTALLED,
                      WRITABLE_VIEWS, assert_bits_equal, assert_raw_close, expected_scale, layout_base, layouts, make_tensor,
                      nasty_values, reference_stats)

pytestmark = [
    # The interpreter evaluates with numpy, which warns on IEEE results such as inf * 0.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

SPEC = make_spec(NORM_TYPES, True)
# Without p = 1 (and with only p = 2) kernels take other loops: the C++ one sums 16-bit squares in
# 16-bit lanes, Triton leaves its generic-p path; p = 7 > 4 puts Triton on its scaled path.
SPECS = {"all_norms": SPEC, "l2_inf": make_spec((2.0, "inf"), True), "big_p": make_spec((2, 1, 3, "inf", 0.5, 7), True)}
KINDS = ("normal", "wide", "relu", "tiny")
SIZES = (0, 1, 2, 127, 4097, CHUNK, CHUNK + 1, 3 * CHUNK + 3395)
GPU_SIZES = SIZES + (1_000_003,)
SNAN_BITS = {torch.float32: 0x7F800001, torch.float64: 0x7FF0000000000001, torch.float16: 0x7C01,
             torch.bfloat16: 0x7F81}
INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
          torch.bfloat16: torch.int16}


# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    device: str
    many: int  # tensors in test_many_tensors_one_call

    @property
    def backend(self):
        return get_backend(self.name)

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device == "cpu"

    @property
    def sizes(self) -> tuple[int, ...]:
        if self.interpreted:  # CHUNK + 1 crosses a chunk; 3 chunks: test_chunks_of_very_different_scales
            return (0, 1, 127, 4097, CHUNK + 1)
        if self.name == "reference":  # its rows are the reference itself: big sizes would only cost time
            return SIZES[:-1]
        return GPU_SIZES if self.device == "cuda" else SIZES

    def few(self, values: tuple) -> tuple:
        """``values`` (coefficients, clip values, views), thinned for the interpreter: first, second, last."""
        return values[:2] + values[-1:] if self.interpreted and len(values) > 3 else values

    def big(self) -> int:
        """A size that crosses a chunk boundary (but for the interpreter), cheap enough for every target."""
        # The interpreter crosses chunks in test_sizes_dtypes_and_values (CHUNK + 1),
        # test_chunks_of_very_different_scales and test_triton.py's chunk=128 test; elsewhere it stays in one
        # chunk: its block is as wide as the largest tensor of a dtype, and every program pays for the width.
        return 4097 if self.interpreted else CHUNK + 4097

    def __str__(self) -> str:  # also the test id: `pytest -k triton_cpu` selects one target
        return f"{self.name}_{self.device}"


TARGETS = (
    Target("reference", "cpu", many=600),
    Target("cpu", "cpu", many=3000),
    Target("triton", "cpu", many=40),
    Target("cuda", "cuda", many=10_000),
    Target("triton", "cuda", many=10_000),
    Target("reference", "cuda", many=300),
)


def kinds_for(n: int, dtype: torch.dtype, spec: str) -> tuple[str, ...]:
    """Value kinds per call: all four up to 4097 elements; two beyond (rotating, so every dtype meets three
    kinds at chunk-crossing sizes), which halves the float64 reference's time. The same for every target,
    so the cached reference serves them all."""
    if n <= 4097:
        return KINDS
    i = 2 * DTYPES.index(dtype) + list(SPECS).index(spec)
    return KINDS[i % 4], KINDS[(i + 1) % 4]


def _param(t: Target, *values, id_suffix: str = ""):
    marks = [pytest.mark.cuda] if t.device == "cuda" else []
    return pytest.param(t, *values, id=f"{t}{id_suffix}", marks=marks)


@pytest.fixture(params=[_param(t) for t in TARGETS])
def target(request) -> Target:
    t: Target = request.param
    if t.device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    reason = t.backend.why_not(t.dev, torch.float32)
    if reason is not None:
        pytest.skip(f"{t}: {reason}")
    return t


def on(t: Target, tensors):
    """``tensors`` on ``t``'s device (the same objects on the CPU)."""
    return [x.to(t.dev) for x in tensors]


def check(t: Target, tensors, spec: StatsSpec = SPEC, what: str = "", names=None) -> StatsResult:
    """``t``'s statistics of ``tensors``: rows, total row and counts against the float64 reference."""
    for x in tensors:
        reason = t.backend.why_not(x.device, x.dtype)
        assert reason is None, f"{t} refuses {x.dtype} on {x.device}: {reason}"
    res = t.backend.stats(tensors, spec)
    assert isinstance(res, StatsResult), type(res)
    T = len(tensors)
    if T:
        for part in (res.raw.floats, res.raw.counts, res.numel, res.total.floats, res.total.counts):
            assert part.device.type == t.device, (what, part.device)
    want_rows, want_total = reference_stats(tensors, spec)
    assert_raw_close(res.raw, want_rows, what=f"{t} {what}: rows", names=names)
    assert_raw_close(res.total, want_total, what=f"{t} {what}: total row vs the reference of all elements")
    assert res.numel.dtype == torch.int64
    n = [x.numel() for x in tensors]
    assert res.numel.tolist() == n + [sum(n)], f"{what}: numel"
    if T:
        agg = aggregate.aggregate(res.raw, spec, aggregate.TOTAL)
        assert torch.equal(res.total.counts.cpu(), agg.counts.cpu()), f"{what}: total counts vs aggregation"
        torch.testing.assert_close(res.total.floats.cpu(), agg.floats.cpu(), rtol=1e-12, atol=0, equal_nan=True,
                                   msg=lambda m: f"{t} {what}: total row vs the aggregation of its rows\n{m}")
    return res


# -- the protocol -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_protocol(name):
    """Required members present and callable, fast forms all or none, why_not answers in words."""
    b = get_backend(name)
    assert b.name == name
    for m in REQUIRED[1:]:
        assert callable(getattr(b, m, None)), f"{name} lacks {m}"
    assert isinstance(b, Backend)
    assert len(inspect.signature(b.stats).parameters) == 2  # (tensors, spec)
    assert len(inspect.signature(b.scale_).parameters) == 2  # (tensors, coef)
    assert len(inspect.signature(b.clamp_).parameters) == 2  # (tensors, clip_value)
    present = [callable(getattr(b, m, None)) for m in FAST_FORMS]
    assert all(present) or not any(present), f"{name}: fast forms must come all or none, got {present}"
    for device in ("cpu", "cuda", "meta"):
        for dtype in (*DTYPES, torch.int32, torch.complex64):
            reason = b.why_not(torch.device(device), dtype)
            assert reason is None or (isinstance(reason, str) and reason.strip()), (name, device, dtype, reason)
            if dtype not in DTYPE_CODES and name != "reference":  # the reference upcasts whatever it is given
                assert reason is not None, f"{name} claims to serve {dtype}"


def test_triton_runs_in_this_session():
    """Triton installed (as on CI) but runnable nowhere would skip every Triton test: a failure, not a skip."""
    if not TRITON_INSTALLED:
        if os.environ.get("FASTGRAD_REQUIRE_TRITON") == "1":
            pytest.fail("FASTGRAD_REQUIRE_TRITON=1 but Triton is not installed (pip install triton)")
        pytest.skip("Triton is not installed")
    b = get_backend("triton")
    reasons = {dev: b.why_not(torch.device(dev), torch.float32) for dev in (["cpu", "cuda"] if HAS_CUDA else ["cpu"])}
    assert any(r is None for r in reasons.values()), (
        f"Triton is installed but its backend can run on no device in this session: {reasons}. "
        "tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is present, before anything imports "
        "fastgrad.triton_kernels; something imported the kernels first, or TRITON_INTERPRET=0 was set."
    )


# -- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["all_norms", "l2_inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target,n", [_param(t, n, id_suffix=f"-{n}") for t in TARGETS for n in t.sizes],
                         indirect=["target"])
def test_sizes_dtypes_and_values(target, n, dtype, spec):
    kinds = kinds_for(n, dtype, spec)
    if target.interpreted:
        kinds = kinds[:2]
    ts = on(target, [make_tensor(n, dtype, k, seed=i) for i, k in enumerate(kinds)])
    check(target, ts, SPECS[spec], what=f"{dtype} n={n}", names=kinds)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nasty_values(target, dtype, spec):
    x = nasty_values(dtype)
    big = make_tensor(target.big(), dtype)
    big[:: target.big() // len(x)][: len(x)] = x  # the same values spread over chunks and vector lanes
    check(target, on(target, [x, big]), SPECS[spec], what="nasty", names=["nasty", "nasty spread"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts_made_on_the_device(target, dtype):
    views = layouts(dtype, target.device)
    base_ptr = views["offset_1"].data_ptr() - views["offset_1"].element_size()
    for k in ODD_OFFSETS:  # the offsets reached the device (a CPU view moved with .to() would not keep them)
        v = views[f"offset_{k}"]
        assert v.device.type == target.device and v.storage_offset() == k
        assert v.data_ptr() == base_ptr + k * v.element_size()
    for name in ("column_slice", "permuted_strided", "offset_3_column_slice", "expanded"):
        assert not views[name].is_contiguous(), name
    assert views["channels_last"].is_contiguous(memory_format=torch.channels_last)
    check(target, list(views.values()), what=f"{dtype} layouts", names=list(views))


def test_mixed_dtypes_and_alignments_in_one_call(target):
    ts, names = [], []
    for i, dt in enumerate(DTYPES):
        base = make_tensor(target.big() + 40, dt, "wide", seed=i).to(target.dev)
        for k in (0, 1, 3):
            ts.append(base[k:] if k else base[:4097])
            names.append(f"{dt} offset {k}")
        ts += [torch.empty(0, dtype=dt, device=target.dev), nasty_values(dt).to(target.dev)]
        names += [f"{dt} empty", f"{dt} nasty"]
    ts.append(layouts(torch.bfloat16, target.device)["transposed"])
    names.append("bf16 transposed")
    order = torch.randperm(len(ts), generator=torch.Generator().manual_seed(0)).tolist()  # dtypes interleaved
    check(target, [ts[i] for i in order], what="mixed", names=[names[i] for i in order])


def test_many_tensors_one_call(target):
    T = target.many
    ts = [make_tensor(1 + i % 50, torch.float32 if i % 3 else torch.bfloat16, seed=i) for i in range(T)]
    ts[T // 2] = make_tensor(target.big(), torch.float32, "wide")  # one crosses a chunk in the middle
    ts[-1] = torch.empty(0)
    check(target, on(target, ts), StatsSpec((2.0,), HistogramSpec()), what=f"{T} tensors")


def test_empty_list(target):
    for spec in (SPEC, StatsSpec((2.0,), None)):
        res = target.backend.stats([], spec)
        assert res.raw.floats.shape == (0, spec.num_float_cols) and res.raw.counts.shape == (0, spec.num_count_cols)
        assert res.numel.tolist() == [0]
        assert res.total.floats.shape == (1, spec.num_float_cols) and res.total.counts.shape == (1, spec.num_count_cols)
        assert not res.total.floats.any() and not res.total.counts.any()
        out, dtypes = dispatch.compute([], spec, target.name)
        assert out.numel.tolist() == [0] and dtypes == [] and out.raw.floats.shape[0] == 0
    assert target.backend.scale_([], torch.tensor(0.5, dtype=torch.float64, device=target.dev)) is None
    assert target.backend.clamp_([], 1.0) is None


@pytest.mark.parametrize("bins", [(-64, 16), (-74, 16), (-126, 128), (0, 1), (-8, 8), (-3, 4), (-126, -125),
                                  (127, 128)], ids=str)
def test_histogram_ranges(target, bins):
    """Bin counts around the CUDA kernel's 48 KiB shared-memory opt-in (91 bins), the widest and narrowest specs."""
    spec = StatsSpec((2.0, 1.0), HistogramSpec(*bins))
    x = torch.cat([make_tensor(4000 if target.interpreted else 20_000, torch.float32, "wide"), nasty_values(torch.float32)])
    check(target, on(target, [x, x.double(), x.bfloat16(), x.half()]), spec, what=str(bins))


def test_without_histogram(target):
    spec = StatsSpec((2.0, 1.0), None)
    check(target, on(target, [nasty_values(torch.float32), make_tensor(target.big(), torch.bfloat16)]), spec)


def test_exponent_edges(target):
    """Powers of two and their neighbours land in the right bin for every dtype."""
    e = torch.arange(-140, 130, dtype=torch.float64)
    p = torch.exp2(e)
    vals = torch.cat([p, -p, p * (1 - 2**-9), p * (1 + 2**-7)])
    ts = [vals.to(dt) for dt in DTYPES] + [torch.exp2(torch.arange(-1074, 1024, 7, dtype=torch.float64))]
    check(target, on(target, ts), make_spec((2, 1, "inf"), HistogramSpec(-126, 128)), what="exponent edges")


def test_float_extremes(target):
    """Sums of squares beyond float32's range; float64 maxima at the ends of the range (rescaling stays finite)."""
    x = torch.full((target.big(),), 1e30)
    ts = [x, x * 1e-70, x.double() * 1e170, torch.full((target.big(),), 1e200, dtype=torch.float64),
          torch.full((4097,), 1e-200, dtype=torch.float64),
          torch.tensor([1e-310, 0.0, 3e-311], dtype=torch.float64),  # all subnormal
          torch.tensor([1.5e308, 1.0, -1e308], dtype=torch.float64),  # max >= 2^1023
          torch.full((target.big(),), 5e-324, dtype=torch.float64)]  # the smallest subnormal, across chunks
    ts.append(torch.cat([ts[3][:10], ts[4]]))
    check(target, on(target, ts), make_spec((2.0, 1.0, 3.0, 0.5, "inf"), True), what="extremes")


def test_chunks_of_very_different_scales(target):
    """Chunks 1e-300 and 1e300 apart in one tensor, a zero in a later chunk: combined exactly."""
    x = torch.randn(CHUNK + 77, generator=torch.Generator().manual_seed(1)) * 1e30
    x[CHUNK + 5] = 0.0
    y = torch.randn(2 * CHUNK + 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y[:100] *= 1e-300
    y[CHUNK : 2 * CHUNK] *= 1e300
    check(target, on(target, [x, y]), make_spec((2, 1, 3, 7, "inf"), True), what="chunk scales")


@pytest.mark.parametrize("spec", ["all_norms", "l2_inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_does_not_hide_its_neighbours_max(target, dtype, spec):
    """max|x| is over the non-NaN values, also when a NaN and the largest value share a vector."""
    x = torch.full((4096,), 0.5, dtype=torch.float64)
    x[100], x[101], x[3000] = float("nan"), -7.0, float("nan")
    check(target, on(target, [x.to(dtype)]), SPECS[spec], what="nan next to max")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_squares_leaving_float_range(target, dtype):
    """16-bit values whose squares overflow or underflow float (kernels sum 16-bit squares in float runs)."""
    x = make_tensor(target.big(), torch.float64, seed=5)
    scales = [1.0, 2.0**-70, 2.0**-45] + ([1e30, 2.0**70] if dtype == torch.bfloat16 else [])
    ts = [(x * s).to(dtype) for s in scales]
    if dtype == torch.bfloat16:  # one block just above the re-sum threshold, the rest subnormal when squared
        ts.append(torch.cat([torch.full((1,), 2.0**-39), x[:5000] * 2.0**-70]).to(dtype))
    for spec in (make_spec((2.0, 1.0, "inf"), True), make_spec((2.0,), False)):
        check(target, on(target, ts), spec, what=f"{dtype} squares out of float range")


def test_total_does_not_depend_on_how_a_tensor_is_split(target):
    n, piece = (20_001, 4_321) if target.interpreted else (300_007, 12_345)
    x = make_tensor(n, torch.float32, "wide").to(target.dev)
    spec = make_spec((2.0, 1.0, "inf"), True)
    whole = target.backend.stats([x], spec).total
    pieces = target.backend.stats(list(x.split(piece)), spec).total
    assert torch.equal(whole.counts, pieces.counts)
    torch.testing.assert_close(whole.floats, pieces.floats, rtol=1e-12, atol=0)


def test_bitwise_deterministic(target):
    big = target.big()
    ts = on(target, [make_tensor(3 * big + 11, torch.float32, "wide"), make_tensor(big + 7, torch.bfloat16),
                     nasty_values(torch.float16), make_tensor(5000, torch.float64, "wide")])
    a, b = target.backend.stats(ts, SPEC), target.backend.stats(ts, SPEC)
    for x, y, what in ((a.raw, b.raw, "rows"), (a.total, b.total, "total")):
        assert_bits_equal(x.floats, y.floats, f"{what} floats of two identical calls")
        assert torch.equal(x.counts, y.counts), what


def test_dispatch_and_public_api_agree_with_the_backend(target):
    """dispatch.compute (fast form where the backend has one, else general) and grad_stats give the backend's bits."""
    plain = on(target, [make_tensor(n, dt, "wide", seed=n) for n, dt in
                        [(4097, torch.float32), (CHUNK + 1, torch.bfloat16), (0, torch.float16), (31, torch.float64)]])
    viewed = plain + [layouts(torch.float32, target.device)["column_slice"]]
    for ts in (plain, viewed):
        want = target.backend.stats(ts, SPEC)
        got, dtypes = dispatch.compute(ts, SPEC, target.name)
        assert dtypes == sorted({x.dtype for x in ts}, key=DTYPE_CODES.get)
        for g, w, what in ((got.raw, want.raw, "rows"), (got.total, want.total, "total")):
            assert_bits_equal(g.floats, w.floats, f"dispatch.compute {what}")
            assert torch.equal(g.counts, w.counts)
        assert torch.equal(got.numel.cpu(), want.numel.cpu())
        api = fastgrad.grad_stats(ts, norm_types=NORM_TYPES, histogram=True, backend=target.name)
        assert_bits_equal(api.raw.floats, want.raw.floats, "grad_stats rows")
        assert torch.equal(api.raw.counts, want.raw.counts)


def test_fast_forms(target):
    """The plain fast forms equal the general ones on plain tensors, and decline (writing nothing) otherwise."""
    b = target.backend
    if not has_fast_forms(b):
        pytest.skip(f"{target.name} has no fast forms")
    plain = on(target, [make_tensor(n, dt, "wide", seed=n) for n, dt in
                        [(4097, torch.float32), (CHUNK + 1, torch.bfloat16), (0, torch.float16), (31, torch.float64)]])
    out = b.stats_plain(plain, SPEC)
    assert out is not None, "stats_plain declined plain contiguous tensors"
    res, mask = out
    assert mask == sum(1 << DTYPE_CODES[dt] for dt in {x.dtype for x in plain})
    want = b.stats(plain, SPEC)
    for g, w in ((res.raw, want.raw), (res.total, want.total)):
        assert_bits_equal(g.floats, w.floats, "stats_plain vs stats")
        assert torch.equal(g.counts, w.counts)
    assert torch.equal(res.numel.cpu(), want.numel.cpu())

    x = make_tensor(24 * 35, torch.float32, "wide").to(target.dev).reshape(24, 35)
    declined = [plain[0], x.t()]
    before = [t.clone() for t in declined]
    assert b.stats_plain(declined, SPEC) is None
    assert b.scale_plain_(declined, torch.tensor(0.5, dtype=torch.float64, device=target.dev)) is False
    assert b.clamp_plain_(declined, 1e-3) is False
    for t, t0 in zip(declined, before):
        assert_bits_equal(t, t0, "a declined fast form wrote")

    ys = [t.clone() for t in plain]
    assert b.scale_plain_(ys, torch.tensor(0.3, dtype=torch.float64, device=target.dev)) is True
    for y, t in zip(ys, plain):
        assert_bits_equal(y, expected_scale(t.cpu(), 0.3), "scale_plain_", nan_payload=False)
    assert b.clamp_plain_(ys, 0.01) is True
    for y, t in zip(ys, plain):
        assert_bits_equal(y, expected_scale(t.cpu(), 0.3).clamp_(-0.01, 0.01), "clamp_plain_", nan_payload=False)


# -- scale_ and clamp_ --------------------------------------------------------------------------


# Every writable view, ordered so that target.few() keeps a strided one, a misaligned one and both at once.
INTERP_VIEWS = ("column_slice", "offset_1", *[v for v in WRITABLE_VIEWS if v not in
                ("column_slice", "offset_1", "offset_3_column_slice")], "offset_3_column_slice")


class InPlaceCase:
    """Tensors to write in place on ``device``, each a view of its own 1-D base whose other elements
    hold signalling NaNs; ``expect(op)`` applies ``op`` to CPU copies, ``check(what)`` compares every
    base bit for bit (any NaN matches any NaN only inside the written views)."""

    def __init__(self, dtype: torch.dtype, device: str, big: int, seed: int = 0, views=tuple(WRITABLE_VIEWS)):
        whole = lambda b: b  # noqa: E731
        items = [("big", make_tensor(big, dtype, "wide", seed=seed), whole),
                 ("nasty", nasty_values(dtype), whole),
                 ("empty", torch.empty(0, dtype=dtype), whole)]
        items += [(name, layout_base(dtype, seed=seed + 10 + i), WRITABLE_VIEWS[name]) for i, name in enumerate(views)]
        self.names, self.fns, self.masks, self.bases, self.cpu = [], [], [], [], []
        for name, base, f in items:
            mask = torch.zeros(base.shape, dtype=torch.bool)
            f(mask).fill_(True)
            base.view(INT_OF[dtype])[~mask] = SNAN_BITS[dtype]
            self.names.append(name)
            self.fns.append(f)
            self.masks.append(mask)
            self.cpu.append(base.clone())
            self.bases.append(base.to(device))
        self.views = [f(b) for f, b in zip(self.fns, self.bases)]

    def expect(self, op) -> None:
        op([f(b) for f, b in zip(self.fns, self.cpu)])

    def check(self, what: str) -> None:
        for name, got, want, mask in zip(self.names, self.bases, self.cpu, self.masks):
            assert_bits_equal(got, want, f"{what}, {name}", any_nan_where=mask)


def _ref_scale(coef):
    def op(views):
        for v in views:
            v.copy_(expected_scale(v, coef))
    return op


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale(target, dtype):
    for i, coef in enumerate(target.few((0.3, 2.0**-20, 1e-3, 0.0))):
        case = InPlaceCase(dtype, target.device, target.big(), seed=i, views=target.few(INTERP_VIEWS))
        # coef: a float64 0-d tensor on any device (the protocol); on the CPU for every other GPU call
        cdev = "cpu" if (target.device == "cpu" or i % 2) else target.device
        assert target.backend.scale_(case.views, torch.tensor(coef, dtype=torch.float64, device=cdev)) is None
        case.expect(_ref_scale(coef))
        case.check(f"{target} {dtype} scale_ by {coef} (coef on {cdev})")


def test_scale_mixed_dtypes_in_one_call(target):
    cases = [InPlaceCase(dt, target.device, 4097, seed=7, views=target.few(INTERP_VIEWS)) for dt in DTYPES]
    views = [v for c in cases for v in c.views]
    order = torch.randperm(len(views), generator=torch.Generator().manual_seed(1)).tolist()
    target.backend.scale_([views[i] for i in order], torch.tensor(0.7, dtype=torch.float64, device=target.dev))
    for c in cases:
        c.expect(_ref_scale(0.7))
        c.check(f"{target} mixed-dtype scale_")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_by_one_writes_nothing(target, dtype):
    """A signalling NaN turns quiet under any float multiply: unchanged bits mean nothing was rewritten."""
    if target.name == "reference" and target.device != "cpu":
        pytest.skip("the reference decides coef == 1 only where that costs no sync (CPU)")
    case = InPlaceCase(dtype, target.device, target.big(), views=target.few(INTERP_VIEWS))
    for b, m in zip(case.bases, case.masks):  # signalling NaNs inside the written views too
        b.view(INT_OF[dtype])[(m & (torch.arange(m.numel()) % 7 == 0)).to(b.device)] = SNAN_BITS[dtype]
    before = [b.clone() for b in case.bases]
    views = case.views + [case.views[0][3:]]  # an alias too: nothing is written, so nothing races
    target.backend.scale_(views, torch.tensor(1.0, dtype=torch.float64, device=target.dev))
    for name, b, b0 in zip(case.names, case.bases, before):
        assert_bits_equal(b, b0, f"{target} {dtype} after scale_ by 1: {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamp(target, dtype):
    for i, clip in enumerate(target.few((1.3, 0.0, 1e-3, math.inf))):
        case = InPlaceCase(dtype, target.device, target.big(), seed=i, views=target.few(INTERP_VIEWS))
        assert target.backend.clamp_(case.views, clip) is None
        case.expect(lambda views: [v.clamp_(-clip, clip) for v in views])
        case.check(f"{target} {dtype} clamp_ to {clip}")


def test_empty_tensors_in_place(target):
    """Zero-element tensors among others: the others are written correctly, the empty ones stay empty."""
    e1, e2 = torch.empty(0, device=target.dev), torch.empty(0, 3, dtype=torch.bfloat16, device=target.dev)
    x0 = make_tensor(4097, torch.float32, "wide")
    x = x0.clone().to(target.dev)
    target.backend.scale_([e1, x, e2], torch.tensor(0.3, dtype=torch.float64, device=target.dev))
    assert_bits_equal(x, expected_scale(x0, 0.3), "scale_ beside empty tensors")
    target.backend.clamp_([e2, x, e1], 0.01)
    assert_bits_equal(x, expected_scale(x0, 0.3).clamp_(-0.01, 0.01), "clamp_ beside empty tensors")
    assert e1.shape == (0,) and e2.shape == (0, 3)
    res = check(target, [e1, e2], what="only empty tensors")
    assert res.numel.tolist() == [0, 0, 0]


@pytest.mark.parametrize("alias", ["same_tensor_twice", "overlapping_views"])
@pytest.mark.parametrize("op", ["scale_", "clamp_"])
def test_aliasing_inputs_raise_or_are_correct(target, op, alias):
    """``[x, x]`` or overlapping views: either a clear error with nothing written, or the result of
    applying the op once per list entry, in order (what torch's foreach ops give on the CPU)."""
    n = target.big() if target.interpreted else 3 * CHUNK + 5
    x0 = make_tensor(n, torch.float32, "wide")

    def entries(x):
        return [x, x] if alias == "same_tensor_twice" else [x[: n - 1000], x[1000:]]

    want = x0.clone()
    for v in entries(want):
        if op == "scale_":
            v.mul_(0.5)  # a power of two: scaling once or twice differs in every non-zero element
        else:
            v.clamp_(-0.25, 0.25)
    for route in ("backend", "dispatch"):
        x = x0.clone().to(target.dev)
        arg = torch.tensor(0.5, dtype=torch.float64, device=target.dev) if op == "scale_" else 0.25
        try:
            if route == "backend":
                getattr(target.backend, op)(entries(x), arg)
            else:
                getattr(dispatch, op)(entries(x), arg, backend=target.name)
        except (RuntimeError, ValueError) as e:
            assert len(str(e)) > 30, f"unclear error: {e!r}"
            assert_bits_equal(x, x0, f"{route} {op} raised but wrote")
        else:
            if target.device == "cuda":
                torch.cuda.synchronize()
            assert_bits_equal(x, want, f"{target} {route} {op} on {alias}")


def test_no_host_sync(target):
    """Statistics, scale_ and clamp_ never synchronise with the host (warm caches, as in a training loop)."""
    if target.device == "cpu":
        pytest.skip("host and device are one")
    if target.name == "reference":
        pytest.skip("the reference backend may synchronise (boolean-mask indexing, bincount)")
    ts = on(target, [make_tensor(n, dt, "wide", seed=n) for n, dt in
                     [(4097, torch.float32), (CHUNK + 1, torch.bfloat16), (31, torch.float64)]])
    ts.append(layouts(torch.float16, "cuda")["offset_3"])
    coef = torch.tensor(0.9, dtype=torch.float64, device="cuda")
    for _ in range(2):
        target.backend.stats(ts, SPEC)
        target.backend.scale_(ts, coef)
        target.backend.clamp_(ts, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = target.backend.stats(ts, SPEC)
        target.backend.scale_(ts, coef)
        target.backend.clamp_(ts, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert res.total.floats.device.type == "cuda"
