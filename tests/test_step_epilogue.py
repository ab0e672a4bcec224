"""The fused step epilogue (C++ on the CPU, Triton under its interpreter) against its float64 torch-op
definition (fastgrad.optim.epilogue.reference_epilogue: the clippers' and SpikeSkip's own methods).

Each configuration runs the same 40-step sequence through two guards, one per implementation:
norms around 1 with two 50x spikes, two NaN steps, GradScaler scales on every third step and a
GradScaler found_inf on one. Every output of every step and the final state are compared:
bitwise where the reference sums nothing, else within 4 ulps-ish (1e-15 relative) where it
sums a window (SpikeSkip's mean/variance, ZClip's warm-up mean/variance: torch's summation
order differs from the kernels').
"""

from __future__ import annotations

import copy
import math
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from fastgrad import clip
from fastgrad.optim import Guard, GuardOptions, SpikeSkip
from fastgrad.optim import epilogue as ep

HERE = os.path.dirname(os.path.abspath(__file__))
SUM_RTOL = 1e-15  # sums of <= 8 float64 terms in another order: |error| <= 8 * 2^-53 * |terms|
T = 5

CONFIGS = {
    "none": lambda: {},
    "global": lambda: {"max_norm": 1.0},
    "global_inf_norm": lambda: {"max_norm": 0.5, "norm_type": "inf"},
    "autoclip": lambda: {"clipper": clip.AutoClip(percentile=30, history=8)},
    "autoclip_spike_keep_nonfinite": lambda: {"clipper": clip.AutoClip(percentile=50, history=5),
                                              "spike_skip": SpikeSkip(sigma=1.5, window=4), "skip_nonfinite": False},
    "zclip": lambda: {"clipper": clip.ZClip(warmup=5, z_thresh=1.5)},
    "zclip_mean_capped": lambda: {"clipper": clip.ZClip(warmup=3, z_thresh=1.0, mode="mean", max_norm=2.0)},
    "global_spike": lambda: {"max_norm": 1.0, "spike_skip": SpikeSkip(sigma=2.0, window=6)},
    "spike_only": lambda: {"spike_skip": SpikeSkip(sigma=2.5, window=5)},
}
EXACT = {"none", "global", "global_inf_norm", "autoclip"}  # no sums in the reference


def sequence(n: int = 40):
    """``(norm factor, index of a NaN tensor or None, GradScaler scale or None, found_inf or None)`` per step."""
    rnd = random.Random(0)
    steps = []
    for k in range(n):
        f = math.exp(rnd.gauss(0.0, 0.3)) * (50.0 if k in (15, 30) else 1.0)
        steps.append((f, 2 if k in (7, 22) else None, 1024.0 if k % 3 == 0 else None,
                      (1.0 if k == 12 else 0.0) if k % 4 == 0 else None))
    return steps


def make_params(step: int, factor: float, nan_at: int | None, scale: float | None):
    g = torch.Generator().manual_seed(step)
    ps = [torch.nn.Parameter(torch.zeros(7)) for _ in range(T)]
    for i, p in enumerate(ps):
        p.grad = torch.randn(7, generator=g) * factor * (scale or 1.0)
        if i == nan_at:
            p.grad[2] = float("nan")
    return ps


def new_guard(config: str, impl: str) -> Guard:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    guard = Guard(GuardOptions.build(opt, "wrap", **CONFIGS[config]()))
    guard.epilogue_impl = impl
    return guard


def outputs(plan) -> dict:
    r = plan.result
    return {k: (None if v is None else v.clone()) for k, v in r.as_dict().items()}


def run(config: str, impl: str, reload_at: int | None = None):
    """Per-step outputs and the final ``state_dict()`` of a guard over :func:`sequence`; with
    ``reload_at``, the guard is replaced there by a fresh one loaded from its state_dict."""
    guard = new_guard(config, impl)
    outs = []
    for k, (factor, nan_at, scale, found) in enumerate(sequence()):
        if k == reload_at:
            sd = copy.deepcopy(guard.state_dict())
            guard = new_guard(config, impl)
            guard.load_state_dict(sd)
        ps = make_params(k, factor, nan_at, scale)
        plan = guard.prepare([{"params": ps}], None if scale is None else torch.tensor(scale),
                             None if found is None else torch.tensor(found))
        outs.append(outputs(plan))
        guard.finish(plan)
    return outs, guard.state_dict()


def _close(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if exact or not a.is_floating_point():
        return torch.equal(a, b) or bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()]))
    return torch.allclose(a, b, rtol=SUM_RTOL, atol=0.0, equal_nan=True)


def mismatches(config: str, impl: str, reload_at: int | None = None) -> list[str]:
    exact = config in EXACT
    want, want_sd = run(config, "reference")
    got, got_sd = run(config, impl, reload_at)
    bad = []
    for k, (w, g) in enumerate(zip(want, got)):
        for field, wv in w.items():
            if field == "bad" and reload_at is not None and k >= reload_at:
                continue  # the names of the last bad step are not part of a checkpoint
            gv = g[field]
            if (wv is None) != (gv is None) or (wv is not None and not _close(wv, gv, exact)):
                bad.append(f"step {k} {field}: reference {wv}, {impl} {gv}")

    def walk(a, b, path):
        if isinstance(a, dict):
            for key in a:
                walk(a[key], b[key], f"{path}.{key}")
        elif isinstance(a, torch.Tensor):
            if not _close(a, b, exact):
                bad.append(f"state {path}: reference {a}, {impl} {b}")
        elif a != b:
            bad.append(f"state {path}: reference {a}, {impl} {b}")

    walk(want_sd, got_sd, "")
    return bad


needs_cpp = pytest.mark.skipif(ep.fused_why_not(torch.device("cpu"), "cpu") is not None,
                               reason=str(ep.fused_why_not(torch.device("cpu"), "cpu")))


@needs_cpp
@pytest.mark.parametrize("impl", ["cpu", None])  # None: the automatic choice, with its cached fast call
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cpu_epilogue_matches_reference(config, impl):
    bad = mismatches(config, impl)
    assert not bad, "\n".join(bad[:10])


@needs_cpp
@pytest.mark.parametrize("config", ["autoclip_spike_keep_nonfinite", "zclip", "global_spike"])
def test_cpu_epilogue_state_dict_round_trip(config):
    """A fused guard saved and reloaded mid-run continues as the uninterrupted reference."""
    bad = mismatches(config, "cpu", reload_at=21)
    assert not bad, "\n".join(bad[:10])


def test_sequence_exercises_every_branch():
    """The comparison above only means something if the sequence clips, skips, spikes and warms up."""
    outs, _ = run("global_spike", "reference")
    assert sum(bool(o["coef"] < 1) for o in outs) >= 5
    assert sum(bool(o["nonfinite"]) for o in outs) == 2
    assert sum(bool(o["spike"]) for o in outs) >= 1
    assert any(o["found_inf"].item() == 1.0 and not o["nonfinite"] and not o["spike"] for o in outs)  # found_inf
    assert all(o["grad_scale"] is not None for o in outs)
    outs, sd = run("zclip", "reference")
    assert sd["clipper"]["seen"].item() == 5 and any(bool(o["coef"] < 1) for o in outs[8:])
    outs, sd = run("autoclip", "reference")
    assert sd["clipper"]["count"].item() == 8 and len({round(o["coef"].item(), 12) for o in outs}) > 10


@needs_cpp
def test_fused_epilogue_is_one_call():
    """The fused form issues its outputs' allocations and views only; the reference a dozen ops and more."""
    from torch.profiler import ProfilerActivity, profile

    def top_level_ops(impl):
        guard = new_guard("global_spike", impl)
        ps = make_params(0, 1.0, None, 1024.0)
        stats = guard.stats_kwargs()
        import fastgrad

        s = fastgrad.grad_stats(ps, **stats)
        guard.state.ensure(s.raw.floats.device)
        bad = guard._bad_counts(list(s.names), s.names, s.raw.floats.device)
        args = (s, torch.tensor(1024.0), torch.tensor(0.0), bad, (ps, ["a"] * T), s.raw.floats.device)
        guard._epilogue(*args)  # lazy state created outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            guard._epilogue(*args)
        tops = []
        for e in prof.events():
            par = e.cpu_parent
            while par is not None and not par.name.startswith("aten::"):
                par = par.cpu_parent
            if e.name.startswith("aten::") and par is None:
                tops.append(e.name)
        return tops

    fused, reference = top_level_ops("cpu"), top_level_ops("reference")
    assert len(fused) <= 4, fused  # empty x2, unbind x2
    assert len(reference) >= 15, reference


@needs_cpp
def test_opcheck():
    guard = new_guard("zclip", "cpu")
    ps = make_params(0, 1.0, None, None)
    import fastgrad

    s = fastgrad.grad_stats(ps, norm_types=(2.0,), histogram=False)
    guard.state.ensure(torch.device("cpu"))
    spike, cl = ep._state_lists(guard.epilogue_config, guard.clipper, None, torch.device("cpu"))
    fold = guard.state.fold_out(torch.device("cpu"))[0]
    cfg = guard.epilogue_config
    ints = [0, 1, T, s.raw.counts.stride(0), 3, 1, 0, cfg.kind, cfg.clip_len, 1]
    args = (s.total.raw.floats, s.total.raw.counts, s.raw.counts, torch.zeros(T, dtype=torch.int64),
            torch.tensor(2.0), torch.tensor(0.0), guard.state.buffer, spike, cl, fold, ints,
            guard.state.reals(cfg, torch.device("cpu")))
    torch.library.opcheck(torch.ops.fastgrad.step_epilogue.default, args)


def test_custom_folding_clipper_takes_the_reference_path():
    class Half(clip.Clipper):
        def coefficient(self, ctx):
            return torch.full_like(ctx.total_norm, 0.5)

    guard = Guard(GuardOptions.build(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), "wrap",
                                     clipper=Half()))
    assert guard.epilogue_config is None
    plan = guard.prepare([{"params": make_params(0, 1.0, None, None)}], None, None)
    assert plan.result.coef.item() == 0.5 and plan.result.grad_scale.item() == 2.0


def test_clipper_state_of_the_wrong_shape_is_refused():
    """The fused kernels write through pointers sized by the configuration: loaded state must fit it."""
    a = clip.AutoClip(history=8)
    sd = a.state_dict()
    sd["buffer"] = torch.zeros(9, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        clip.AutoClip(history=8).load_state_dict(sd)
    s = SpikeSkip(window=4)
    sd = s.state_dict()
    sd["buffer"] = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        SpikeSkip(window=4).load_state_dict(sd)
    sd = clip.ZClip(warmup=3).state_dict()
    sd["seen"] = sd["seen"].to(torch.int32)  # dtypes are converted to what the kernels write
    z = clip.ZClip(warmup=3)
    z.load_state_dict(sd)
    assert z.seen.dtype == torch.int64


# -- the Triton kernel, interpreted on CPU tensors (in a subprocess: Triton decides at definition) ---


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_installed(), reason="Triton is not installed")
@pytest.mark.filterwarnings("ignore")
def test_triton_epilogue_matches_reference_interpreted():
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, {HERE!r})
        import warnings
        warnings.simplefilter("ignore")
        import test_step_epilogue as t
        from fastgrad import step_epilogue_triton as K
        assert K.INTERPRETED, "the Triton epilogue was not interpreted"
        bad = []
        for config in t.CONFIGS:
            bad += [config + ": " + m for m in t.mismatches(config, "triton")]
        bad += ["reload: " + m for m in t.mismatches("zclip", "triton", reload_at=21)]
        print("\\n".join(bad[:20]) if bad else "OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "FASTGRAD_BACKEND"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "OK", out.stdout[-3000:]


@pytest.mark.skipif(not _triton_installed(), reason="Triton is not installed")
@pytest.mark.filterwarnings("ignore")
def test_triton_epilogue_compiles_for_sm90_without_fma():
    """The compiled kernel (no GPU needed to build it): every clipper kind with SpikeSkip, a GradScaler
    and the inf-norm, for sm_90; with FP fusion off, no float64 multiply-add is contracted (the
    reference rounds a * b + c twice)."""
    script = textwrap.dedent("""
        import sys
        try:
            import triton
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
            from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        except Exception as e:
            print("skip:", e); sys.exit(0)
        from fastgrad import step_epilogue_triton as K
        assert not K.INTERPRETED
        sig = {"total_row": "*fp64", "total_counts": "*i64", "tensor_counts": "*i64", "bad": "*i64",
               "amp_scale": "*fp32", "amp_found": "*fp32", "counters": "*i64", "spike_buf": "*fp64",
               "spike_count": "*i64", "spike_pos": "*i64", "clip_buf": "*fp64", "clip_count": "*i64",
               "clip_pos": "*i64", "clip_mean": "*fp64", "clip_var": "*fp64", "out_f64": "*fp64", "out_bool": "*i1",
               "fold_out": "*fp32", "T": "i32", "counts_stride": "i32", "spike_window": "i32", "clip_len": "i32",
               "reals": "*fp64"}
        for kind, norm_col in ((0, 0), (1, -1), (2, 0), (3, 0)):
            consts = dict(NORM_COL=norm_col, MAX_COL=1, NONFINITE_COLS=3, HAS_AMP=True, HAS_FOUND=True,
                          SKIP_NONFINITE=True, HAS_SPIKE=True, SPIKE_BLOCK=128, KIND=kind,
                          CLIP_BLOCK=1024 if kind == 2 else 32, Z_ADAPTIVE=True, HAS_BAD=True, T_BLOCK=16)
            try:
                k = triton.compile(ASTSource(fn=K._step_epilogue_kernel,
                                             signature=dict(sig, **{c: "constexpr" for c in consts}), constexprs=consts),
                                   target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": 4 if kind == 2 else 1, "enable_fp_fusion": False})
            except Exception as e:
                if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                    print("skip:", e); sys.exit(0)
                raise
            assert k.asm["cubin"], kind
            assert "fma.rn.f64" not in k.asm["ptx"], f"kind {kind}: a float64 multiply-add was contracted"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    if last.startswith("skip:"):
        pytest.skip(last)
    assert last == "ok", out.stdout[-2000:]
