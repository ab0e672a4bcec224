"""The Triton backend's plans on CPU tensors under the Triton interpreter: aligned and misaligned
tensors in separate groups, plans per stream, the CUDA-graph capture guard, aliasing in-place ops.

Runs in a fresh process with ``TRITON_INTERPRET=1`` set before Triton is imported, so that it does
not depend on which mode another test module imported ``fastgrad.triton_kernels`` in.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not installed")

SCRIPT = textwrap.dedent(
    r"""
    import os, sys, warnings
    os.environ["TRITON_INTERPRET"] = "1"
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    import torch
    from fastgrad import triton_kernels as K
    from fastgrad.backends import chunk_plan, get_backend
    from fastgrad.reference import stats_reference
    from fastgrad.spec import make_spec
    assert K.INTERPRETED, "TRITON_INTERPRET=1 did not take"
    B = get_backend("triton")
    DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    spec = make_spec((2, 1, "inf"), True)

    def close(got, want, what):
        same = (got == want) | (got.isnan() & want.isnan())
        ok = same | ((got - want).abs() <= 1e-6 * want.abs())
        assert ok.all(), f"{what}: {got} vs {want}"

    def bits(t):
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])

    check = sys.argv[1]

    if check == "groups":
        # Every dtype at offsets 0 (aligned) and 1, 2, 3, 5 elements, in one call.
        g = torch.Generator().manual_seed(0)
        ts = []
        for dt in DTYPES:
            base = (torch.randn(5000, generator=g, dtype=torch.float64) * 3).to(dt)
            ts += [base[:4000]] + [base[o:o + 997 + o] for o in (1, 2, 3, 5)]
        srcs = ts
        addrs = [t.data_ptr() for t in ts]
        plan = K._plan(srcs, addrs, torch.device("cpu"), K.CHUNK, False)
        keys = {g.key for g in plan.groups}
        want_keys = {(K.DTYPE_CODES[t.dtype], t.data_ptr() % 16 == 0) for t in ts}
        assert keys == want_keys and len(plan.groups) == len(want_keys), (keys, want_keys)
        assert any(not k[1] for k in keys) and any(k[1] for k in keys)
        res = B.stats(ts, spec)
        want = stats_reference(ts, spec)
        close(res.raw.floats, want.floats, "mixed aligned/misaligned floats")
        assert torch.equal(res.raw.counts, want.counts)
        # A tensor's row does not depend on its group or its neighbours: bitwise equal to a call of its own.
        for i, t in list(enumerate(ts))[::3]:  # aligned and misaligned ones of every dtype
            alone = B.stats([t], spec).raw
            assert torch.equal(bits(alone.floats[0]), bits(res.raw.floats[i])), (i, alone.floats, res.raw.floats[i])
        # scale_/clamp_ on misaligned views leave the bytes around the view as they were.
        for dt in DTYPES:
            base = (torch.randn(3000, generator=g, dtype=torch.float64) * 3).to(dt)
            before = base.clone()
            views = [base[1:1001], base[1003:2003], base[2005:2999]]
            B.scale_(views, torch.tensor(0.5, dtype=torch.float64))
            B.clamp_(views, 0.75)
            for lo, hi in ((1, 1001), (1003, 2003), (2005, 2999)):
                exp = before[lo:hi]
                exp = (exp.double() * 0.5).to(dt) if dt == torch.float64 else (exp.float() * 0.5).to(dt)
                exp = exp.clamp(-0.75, 0.75)
                assert torch.equal(base[lo:hi], exp), dt
            for i in (0, 1001, 1002, 2003, 2004, 2999):
                assert torch.equal(bits(base[i:i + 1]), bits(before[i:i + 1])), (dt, i)

    elif check == "streams":
        K.PLANS.clear()
        ts = [torch.randn(100), torch.randn(2000, dtype=torch.float64)]
        K._stream = lambda device: 11
        first = B.stats(ts, spec)
        n = K.PLANS.builds
        B.stats(ts, spec)
        assert K.PLANS.builds == n, "the same stream rebuilt its plan"
        K._stream = lambda device: 12
        second = B.stats(ts, spec)
        assert K.PLANS.builds == n + 1, "another stream shared the first stream's plan"
        assert torch.equal(first.raw.counts, second.raw.counts)
        assert torch.equal(bits(first.raw.floats), bits(second.raw.floats))

    elif check == "capture":
        K.PLANS.clear()
        ts = [torch.randn(100), torch.randn(300, dtype=torch.bfloat16)[1:]]
        eager = B.stats(ts, spec)
        y = [t.clone() for t in ts]
        coef = torch.tensor(0.5, dtype=torch.float64)
        B.scale_(y, coef)
        B.clamp_(y, 0.25)
        K._capturing = lambda device: True  # as under torch.cuda.graph
        n = K.PLANS.builds
        again = B.stats(ts, spec)  # warm: plan, pointer table and norm table all cached
        assert K.PLANS.builds == n
        assert torch.equal(bits(again.raw.floats), bits(eager.raw.floats))
        z = [t.clone() for t in ts]
        try:
            B.scale_(z, coef)  # other pointers: the pointer table would need an upload
        except chunk_plan.CaptureMiss as e:
            assert "warm-up" in str(e) or "pointer table" in str(e), e
        else:
            raise AssertionError("a pointer-table miss during capture did not raise")
        B.scale_(y, coef)  # the warmed-up tensors: fine
        for bad in ([torch.randn(7)], ):
            try:
                B.stats(bad, spec)
            except RuntimeError as e:
                assert "warm-up" in str(e) and "Triton" in str(e), e
            else:
                raise AssertionError("a plan miss during capture did not raise")
        try:
            B.stats(ts, make_spec((3,), False))
        except RuntimeError as e:
            assert "warm-up" in str(e), e
        else:
            raise AssertionError("a norm-table miss during capture did not raise")
        assert chunk_plan._PINNED, "nothing pinned for the graph"

    elif check == "aliasing":
        x = torch.randn(5000, dtype=torch.float64)
        for make in (lambda b: [b, b[3:]], lambda b: [b[:3000], b[2000:], b[100:200]], lambda b: [b, b]):
            got, want = x.clone(), x.clone()
            B.scale_(make(got), torch.tensor(0.5, dtype=torch.float64))
            for t in make(want):
                t.mul_(0.5)
            assert torch.equal(got, want)
            got, want = x.clone(), x.clone()
            B.clamp_(make(got), 0.5)
            for t in make(want):
                t.clamp_(-0.5, 0.5)
            assert torch.equal(got, want)
    print("ok")
    """
)


@pytest.mark.parametrize("check", ["groups", "streams", "capture", "aliasing"])
def test_triton_plans_under_the_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, check], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
