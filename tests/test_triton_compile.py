"""Register use of the compiled Triton statistics kernel (sm_90), checked without a GPU.

Triton's front end, LLVM and its bundled ptxas build the kernel for sm_90 on
any machine; the cubin's resource usage (``cuobjdump -res-usage``: registers
per thread, stack bytes) is then read, and, where nvcc's ptxas accepts the
PTX version, ``ptxas -v`` from the CUDA toolkit is run on the PTX as well.

Thresholds (issue #14.7), for every configuration the launcher uses
(:func:`fastgrad.triton_kernels.stats_launch`):

* no spill inside a loop (no STL/LDL between a backward branch and its
  target in the SASS) and a stack frame of at most 16 bytes: spilled values go
  to local memory, i.e. through L1/L2 next to the gradient bytes this kernel
  streams; ptxas sometimes parks one 8-byte value (a row pointer) once before
  the loop and reloads it once after, which costs nothing;
* at most 128 registers per thread: with 256 threads per program that is half
  of an SM's 64K registers, so at least two programs (16 warps) share an SM
  and one's loads overlap the other's block reductions. Before the per-block
  reduction the kernel used 100-128 registers at one or two norms and 255
  with spills at four norms or float64 (triton 3.6).

Runs in a subprocess without ``TRITON_INTERPRET`` (this process may hold the
interpreted kernels, see tests/test_triton.py).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not installed")

MAX_REGISTERS = 128
MAX_STACK = 16  # bytes; and none of it touched inside a loop (checked on the SASS)

SCRIPT = textwrap.dedent(
    r"""
    import json, os, re, shutil, subprocess, sys, tempfile
    import triton, triton.language as tl
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:
        print("skip:", e); sys.exit(0)
    from fastgrad import triton_kernels as K
    from fastgrad.spec import HistogramSpec, make_spec
    assert not K.INTERPRETED

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = shutil.which("cuobjdump", path=bindir) or shutil.which("cuobjdump")
    if cuobjdump is None:
        print("skip: no cuobjdump (Triton's bundled tools) to read the cubin's resource usage"); sys.exit(0)
    nvcc_ptxas = shutil.which("ptxas")
    target = GPUTarget("cuda", 90, 32)
    ptr = {"ptr_table": "*i64", "numels": "*i64", "chunk_row": "*i32", "chunk_start": "*i64",
           "ps": "*fp64", "fpart": "*fp64", "cpart": "*i32"}
    dts = {"float32": tl.float32, "bfloat16": tl.bfloat16, "float16": tl.float16, "float64": tl.float64}

    def next_pow2(n):
        return 1 << max(0, n - 1).bit_length()

    for dtype, norms, hist, aligned in json.loads(sys.argv[1]):
        spec = make_spec(tuple(norms), hist)
        ps = spec.finite_norms
        generic = any(p not in (1.0, 2.0) for p in ps)
        block, warps = K.stats_launch(1 << 30, generic)
        h = spec.histogram
        consts = dict(DTYPE=dts[dtype], IS_F64=dtype == "float64", ALIGNED=aligned, CHUNK=K.CHUNK, BLOCK=block,
                      NPP=next_pow2(max(1, len(ps))), SCALED=dtype == "float64" or any(p > K.FAST_MAX_P for p in ps),
                      GENERIC_P=generic, HIST=h is not None, MIN_EXP=h.min_exp if h else 0,
                      NBINS=h.num_bins if h else 1, NSLOTS=next_pow2(spec.num_count_cols + 1))
        sig = dict(ptr, **{k: "constexpr" for k in consts})
        try:
            k = triton.compile(ASTSource(fn=K._stats_chunk_kernel, signature=sig, constexprs=consts),
                               target=target, options={"num_warps": warps})
        except Exception as e:
            if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                print("skip:", e); sys.exit(0)
            raise
        row = {"dtype": dtype, "norms": norms, "hist": hist, "aligned": aligned, "block": block, "warps": warps,
               "v4": "ld.global.v4" in k.asm["ptx"] or "ld.global.nc.v4" in k.asm["ptx"]}
        with tempfile.TemporaryDirectory() as d:
            cubin = os.path.join(d, "k.cubin")
            open(cubin, "wb").write(k.asm["cubin"])
            out = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", out)
            row["regs"], row["stack"] = int(m.group(1)), int(m.group(2))
            # Local-memory accesses (spills) inside a loop: between a backward branch and its target.
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
            code = [(int(a, 16), ins) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
            loops = [(int(t, 16), a) for a, ins in code for t in re.findall(r"BRA (?:`\()?0x([0-9a-f]+)", ins)
                     if int(t, 16) <= a]
            row["loops"] = len(loops)
            row["spills_in_loops"] = sum(1 for a, ins in code if re.search(r"\b(STL|LDL)\b", ins)
                                         and any(lo <= a <= hi for lo, hi in loops))
            if nvcc_ptxas:  # the toolkit's ptxas, where it takes this PTX version
                ptx = os.path.join(d, "k.ptx")
                open(ptx, "w").write(k.asm["ptx"])
                r = subprocess.run([nvcc_ptxas, "-v", "-arch=sm_90a", ptx, "-o", os.path.join(d, "n.cubin")],
                                   capture_output=True, text=True)
                m = re.search(r"Used (\d+) registers", r.stderr)
                s = re.search(r"(\d+) bytes spill stores", r.stderr)
                if r.returncode == 0 and m and s:
                    row["ptxas_regs"], row["ptxas_spill"] = int(m.group(1)), int(s.group(1))
        print(json.dumps(row), flush=True)
    print("ok")
    """
)

# (dtype, norm types, histogram, every pointer 16-byte aligned): the launcher's common
# configurations (p = 2; p = 1 and 2; with and without the histogram), generic p (one
# exp2/log2 per p), float64 (the scaled path) and a misaligned group.
CONFIGS = [
    (dt, norms, hist, True)
    for dt in ("float32", "bfloat16", "float16", "float64")
    for norms, hist in (([2], True), ([1, 2], False), ([2, 1, 3, "inf"], True))
] + [("float32", [2], True, False), ("bfloat16", [1, 2], True, False)]


def test_stats_kernel_fits_in_registers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CONFIGS)], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=900)
    if r.returncode == 0 and r.stdout.startswith("skip:"):
        pytest.skip(f"cannot compile for the GPU here: {r.stdout.strip()}")
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(CONFIGS)
    table = "\n".join(str(row) for row in rows)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
    for row in rows:
        assert row["loops"] >= 1, f"no loop found in the SASS: the spill check below would be vacuous ({row})"
        assert row["spills_in_loops"] == 0, f"local-memory accesses inside the streaming loop: {row}\n{table}"
        assert row["stack"] <= MAX_STACK, f"stack frame {row['stack']} bytes in {row}\n{table}"
        assert row["regs"] <= MAX_REGISTERS, f"{row['regs']} registers > {MAX_REGISTERS} in {row}\n{table}"
        if "ptxas_regs" in row:
            assert row["ptxas_spill"] <= MAX_STACK and row["ptxas_regs"] <= MAX_REGISTERS, f"nvcc ptxas: {row}\n{table}"
        per_thread_bytes = row["block"] // (32 * row["warps"]) * itemsize[row["dtype"]]
        if row["aligned"] and row["dtype"] != "float64" and per_thread_bytes >= 16:
            assert row["v4"], f"an aligned group's loads did not vectorise: {row}"
