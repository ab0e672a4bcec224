"""The C++ CPU kernels' instruction-set paths (csrc/cpu/isa.h, cpu_dispatch.cpp; fastgrad.cpu_isa).

Every path this CPU runs (baseline, avx2, avx512 in a portable build) must give bitwise the same
statistics, scaled and clamped gradients on the dtype / size / layout / nasty-value matrix; asking
for a path that does not exist or that the CPU lacks is refused with a clear error; and no code
outside the AVX2 / AVX-512 paths uses their instructions (a linker-merged inline function compiled
for AVX2 would crash the baseline path on an older CPU).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import DTYPES, NORM_TYPES, SIZES, assert_bits_equal, layouts, make_tensor, nasty_values
from fastgrad import cpu_isa
from fastgrad.backends.cpu import _C, CpuBackend
from fastgrad.spec import HistogramSpec, StatsSpec

pytestmark = pytest.mark.skipif(_C is None, reason="fastgrad._C (the C++ CPU backend) is not built")

PATHS = cpu_isa.supported() if _C is not None else []
MULTI = pytest.mark.skipif(len(PATHS) < 2, reason=f"this build/CPU runs one CPU path only: {PATHS}")
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _sprinkled(n: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """make_tensor with the dtype's nasty values at scattered positions (also inside vector runs)."""
    x = make_tensor(n, dtype, kind, seed)
    bad = nasty_values(dtype)
    if n >= 4 * bad.numel():
        pos = torch.linspace(0, n - 1, bad.numel()).long()
        x[pos] = bad
    return x


def _matrix(dtype: torch.dtype, kind: str) -> list[torch.Tensor]:
    """One list per (dtype, kind): every size (chunk-crossing ones too), the nasty values alone,
    sprinkled into a large tensor, and the non-contiguous / misaligned views."""
    out = [make_tensor(n, dtype, kind, seed=1) for n in SIZES]
    out += [nasty_values(dtype), _sprinkled(70_001, dtype, kind, seed=2)]
    out += list(layouts(dtype).values())
    return out


def _per_path(fn) -> dict[str, object]:
    results = {}
    for path in PATHS:
        with cpu_isa.forced(path):
            assert cpu_isa.current() == path
            results[path] = fn()
    return results


def _assert_same(results: dict, what: str) -> None:
    first, want = next(iter(results.items()))
    for path, got in results.items():
        for g, w, name in zip(got, want, ("floats", "counts", "total floats", "total counts")):
            assert_bits_equal(g, w, f"{what}: {name} of path {path} vs {first}")


SPECS = [StatsSpec(norm_types=NORM_TYPES, histogram=HistogramSpec()), StatsSpec(norm_types=(2.0,), histogram=None),
         StatsSpec(norm_types=(1.0, 2.0), histogram=HistogramSpec(-30, 10))]


@MULTI
@pytest.mark.parametrize("kind", ["normal", "wide", "tiny", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_bitwise_equal_on_every_path(dtype, kind):
    tensors = _matrix(dtype, kind)
    be = CpuBackend()
    for k, spec in enumerate(SPECS):
        def run():
            r = be.stats(tensors, spec)
            return r.raw.floats.clone(), r.raw.counts.clone(), r.total.floats.clone(), r.total.counts.clone()

        results = _per_path(run)
        _assert_same(results, f"{dtype} {kind} spec {k}")
        # what was compared is real: finite rows, positive norms (fp16 flushes 'tiny' to 0), the NaNs counted
        floats, counts = next(iter(results.values()))[:2]
        assert torch.isfinite(floats[: len(SIZES)]).all()
        assert (floats[3 : len(SIZES), 0] > 0).all() or (dtype, kind) == (torch.float16, "tiny")
        assert counts[len(SIZES), 0] == 1 and counts[len(SIZES) + 1, 0] == 1  # NAN column (spec.py)


@MULTI
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_list_path_bitwise_equal(dtype):
    """The *_list fast form (contiguous tensors, C++ reads the metadata) on every path."""
    tensors = [make_tensor(n, dtype, "wide", seed=4) for n in SIZES] + [_sprinkled(131_075, dtype, "normal", 5)]
    spec = SPECS[0]

    def run():
        r, _ = CpuBackend().stats_plain(tensors, spec)
        return r.raw.floats.clone(), r.raw.counts.clone(), r.total.floats.clone(), r.total.counts.clone()

    _assert_same(_per_path(run), f"{dtype} stats_plain")


@MULTI
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_and_clamp_bitwise_equal(dtype):
    base = [_sprinkled(200_003, dtype, "wide", 6), make_tensor(4097, dtype, "normal", 7)]
    base += list(layouts(dtype).values())[:-1]  # not the expanded view: in-place ops refuse it

    def run(op):
        ts = [t.clone() if t.is_contiguous() else t.clone().t().contiguous().t() if t.dim() == 2 else t.clone()
              for t in base]
        if op == "scale":
            CpuBackend().scale_(ts, torch.tensor(0.3712, dtype=torch.float64))
        else:
            CpuBackend().clamp_(ts, 0.61)
        return ts

    for op in ("scale", "clamp"):
        results = _per_path(lambda: run(op))
        first = next(iter(results.values()))
        for path, got in results.items():
            for i, (g, w) in enumerate(zip(got, first)):
                assert_bits_equal(g, w, f"{op} {dtype} tensor {i} on {path}")
        changed = first[0].view(-1)[:1000] != base[0].view(-1)[:1000]
        assert changed.any(), f"{op} wrote nothing"


def test_paths_listed_and_running():
    assert cpu_isa.current() in PATHS
    assert set(PATHS) <= set(cpu_isa.compiled())
    if "FASTGRAD_CPU_ISA" not in os.environ:
        assert cpu_isa.current() == PATHS[-1], "auto picks the widest path this CPU runs"
    if X86 and cpu_isa.compiled()[0] == "baseline":
        assert cpu_isa.compiled() == ["baseline", "avx2", "avx512"] or not _gcc_build()


def _gcc_build() -> bool:
    import sysconfig

    return "clang" not in (sysconfig.get_config_var("CC") or "")


def test_select_refuses_unknown_path_and_keeps_running_one():
    before = cpu_isa.current()
    with pytest.raises(ValueError, match="no CPU path 'sse9' in this build"):
        cpu_isa.select("sse9")
    assert cpu_isa.current() == before
    lacking = [p for p in cpu_isa.compiled() if p not in PATHS]
    for p in lacking:  # only on CPUs without AVX2 / AVX-512
        with pytest.raises(ValueError, match="this CPU lacks"):
            cpu_isa.select(p)
        assert cpu_isa.current() == before


def _run_env(value: str) -> subprocess.CompletedProcess:
    code = ("import torch, fastgrad; from fastgrad import cpu_isa; print('PATH', cpu_isa.current()); "
            "print(float(fastgrad.grad_stats([torch.ones(100)], backend='cpu').total_norm))")
    env = {**os.environ, "FASTGRAD_CPU_ISA": value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_forces_each_path():
    for path in PATHS:
        r = _run_env(path)
        assert r.returncode == 0, r.stderr
        assert f"PATH {path}" in r.stdout and "10.0" in r.stdout, r.stdout


def test_env_refusal_is_a_clear_error():
    r = _run_env("avx9")
    assert r.returncode != 0
    # backend='cpu' asked explicitly: the dispatcher refuses it with the kernels' reason
    assert "RuntimeError: fastgrad backend 'cpu' cannot handle" in r.stderr
    assert "FASTGRAD_CPU_ISA=avx9: no CPU path 'avx9' in this build" in r.stderr
    assert "unset FASTGRAD_CPU_ISA" in r.stderr
    # automatic choice: the C++ backend reports itself unavailable, with the reason
    code = "import fastgrad; print(fastgrad.available_backends()['cpu'])"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTGRAD_CPU_ISA": "avx9"},
                       capture_output=True, text=True, timeout=120)
    assert "no CPU path 'avx9'" in r.stdout, r.stdout + r.stderr


# Instructions of x86-64-v3 and up: VEX/EVEX-encoded ones (mnemonics starting with v) and BMI/LZCNT/MOVBE.
_WIDE = re.compile(r"^\s+[0-9a-f]+:\s+(v\w+|andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|rorx|sarx|shlx|shrx"
                   r"|lzcnt|tzcnt|movbe)\s")
_AVX512 = re.compile(r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[1-7]\b")


def _functions(so: str) -> dict[str, list[str]]:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True,
                         check=True).stdout
    fns: dict[str, list[str]] = {}
    cur = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            cur = fns.setdefault(m.group(1), [])
        elif cur is not None:
            cur.append(line)
    return fns


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 with objdump only")
def test_wide_instructions_only_inside_their_paths():
    """No function outside fastgrad::isa_avx2 / isa_avx512 uses AVX or newer instructions, and none in
    isa_avx2 uses AVX-512: the baseline path, the bindings and every shared inline function run on any
    x86-64. (Fails e.g. if the wrappers were compiled with -mavx2 instead of the target pragma.)"""
    if "avx512" not in cpu_isa.compiled():
        pytest.skip(f"no AVX2/AVX-512 paths in this build: {cpu_isa.compiled()}")
    fns = _functions(_C.__file__)
    wide = {f: sum(bool(_WIDE.match(i)) for i in body) for f, body in fns.items()}
    outside = sorted(f for f, n in wide.items() if n and "isa_avx2" not in f and "isa_avx512" not in f)
    assert not outside, f"AVX/BMI instructions outside the AVX2/AVX-512 paths: {outside[:10]}"
    in512 = [f for f in fns if "isa_avx2::" in f and any(_AVX512.search(i) for i in fns[f])]
    assert not in512, f"AVX-512 registers in the AVX2 path: {in512[:10]}"
    # and the paths are really there: the AVX-512 one uses zmm registers, the AVX2 one ymm
    assert any("isa_avx512::" in f and any("%zmm" in i for i in b) for f, b in fns.items())
    assert any("isa_avx2::" in f and any("%ymm" in i for i in b) for f, b in fns.items())


_SCALAR_CMP = re.compile(r"^\s+[0-9a-f]+:\s+set(n?e|n?[abgl]e?)\s")  # a compare result as a byte: lane by lane


def _hist_passes(fns: dict[str, list[str]], ns: str) -> dict[str, list[str]]:
    """The histogram block passes (float, bfloat16, float16 input) of path namespace ``ns``."""
    return {f: b for f, b in fns.items() if f"{ns}::" in f and re.search(r"block_pass(_bf16)?<true", f)}


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 with objdump only")
def test_each_path_compiles_its_own_code_shape():
    """Each path compiles the histogram code shaped for its instruction set. AVX-512: one 16- or
    32-entry permute per vector for the counter bit (vperm*), not the SSE2 float trick (cvttps2dq);
    AVX2: variable shifts (vpsllvd). No path compares lane by lane (set*), which GCC does for
    vectors wider than the ISA's registers. Both once failed: GCC's C++ front end does not update
    __AVX512F__ under `#pragma GCC target` (the AVX-512 path ran at 0.6x of a -march=native build),
    and 16-lane vector types on AVX2 / SSE2 ran 12-50x slower than on AVX-512."""
    if "avx512" not in cpu_isa.compiled():
        pytest.skip(f"no AVX2/AVX-512 paths in this build: {cpu_isa.compiled()}")
    fns = _functions(_C.__file__)
    for ns in ("isa_baseline", "isa_avx2", "isa_avx512"):
        passes = _hist_passes(fns, ns)
        assert len(passes) >= 3, (ns, sorted(passes))
        for f, body in passes.items():
            text = "\n".join(body)
            bad = [i for i in body if _SCALAR_CMP.match(i)]
            assert not bad, f"{len(bad)} lane-by-lane compares in {f}: {bad[:3]}"
            if ns == "isa_avx512":
                assert re.search(r"\svperm(i2|t2)?[dw]\s", text), f"no permute in {f}"
                assert "cvttps2dq" not in text, f"SSE2 fallback (float trick) in {f}"
            if ns == "isa_avx2" and "_bf16" not in f:
                assert "vpsllvd" in text, f"no variable shift in {f}"
