"""CPU statistics pass: the portable build's instruction-set paths against a -march=native build.

    # a second copy of the kernels built for this machine only, in another folder:
    git archive HEAD | tar -x -C /tmp/fg_native
    (cd /tmp/fg_native && FASTGRAD_FORCE_CUDA=0 FASTGRAD_CPU_ARCH=native python setup.py build_ext --inplace)
    python bench/cpu_isa_paths.py --native /tmp/fg_native/fastgrad/_C*.so [--quick] [--dtypes float32,bfloat16] [--paths avx512]
        [--compare before=/tmp/fg_before/fastgrad/_C*.so]

Times fastgrad's full statistics pass (norm, max|x|, counts, 82-bin histogram, per tensor and
total; the plain-list form fastgrad.grad_stats takes for contiguous gradients) over bench/
param_sets.py's gradient sets with the installed (portable) module on each path this CPU runs
(fastgrad.cpu_isa), and with the native module loaded beside it in the same process (under
another package name), all round-robin (harness.timeit_interleaved), so that load from other
processes hits every variant alike. Prints ms, GB/s and each variant's speed relative to the
native build (>= 1: as fast), and checks the variants' tables are bitwise equal.
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import os
import platform
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))
import fastgrad  # noqa: E402
from fastgrad import cpu_isa  # noqa: E402
from fastgrad.backends.cpu import _C  # noqa: E402
from fastgrad.spec import DTYPES_BY_CODE, StatsSpec  # noqa: E402
from harness import nbytes, table, timeit_interleaved  # noqa: E402
from param_sets import make, sets  # noqa: E402

SPEC = StatsSpec(norm_types=(2.0,), histogram=fastgrad.HistogramSpec())


def load_module(path: str, package: str = "fastgrad_native") -> types.ModuleType:
    """An extension module file as ``<package>._C`` (its init function is PyInit__C)."""
    sys.modules.setdefault(package, types.ModuleType(package))
    loader = importlib.machinery.ExtensionFileLoader(f"{package}._C", path)
    spec = importlib.util.spec_from_file_location(f"{package}._C", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def stats_call(mod, grads):
    """The statistics pass through module ``mod`` (CpuBackend.stats_plain's call), tables returned."""
    T = len(grads)
    floats = torch.empty(T + 1, SPEC.num_float_cols, dtype=torch.float64)
    counts = torch.empty(T + 1, SPEC.num_count_cols, dtype=torch.int64)
    numel = torch.empty(T + 1, dtype=torch.int64)
    h = SPEC.histogram
    threads = torch.get_num_threads()
    args = (grads, torch.Tensor, DTYPES_BY_CODE, torch.strided, list(SPEC.finite_norms), h is not None,
            h.min_exp if h else 0, h.max_exp if h else 1, floats.data_ptr(), counts.data_ptr(), numel.data_ptr(),
            threads)

    def run():
        assert mod.grad_stats_list(*args)
        return floats, counts, numel  # numel too: the call writes through its pointer, it must stay alive

    return run


def on_path(path: str, fn):
    def run():
        cpu_isa.select(path)
        return fn()
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--native", help="a fastgrad/_C*.so built with FASTGRAD_CPU_ARCH=native (glob allowed)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL=SO",
                    help="another fastgrad/_C*.so (e.g. an earlier portable build, on its own auto path) timed "
                         "alongside as row LABEL; repeatable")
    ap.add_argument("--paths", help="comma-separated portable paths to time (default: every one this CPU runs)")
    args = ap.parse_args(argv)
    assert _C is not None, "fastgrad._C is not built"
    native = None
    if args.native:
        found = glob.glob(args.native)
        assert len(found) == 1, f"--native {args.native}: {found}"
        native = load_module(found[0])
    others = {}
    for k, item in enumerate(args.compare):
        label, _, pattern = item.partition("=")
        found = glob.glob(pattern)
        assert label and len(found) == 1, f"--compare {item}: want LABEL=one .so file, found {found}"
        others[label] = load_module(found[0], f"fastgrad_compare{k}")
    paths = cpu_isa.supported()
    if args.paths:
        unknown = set(args.paths.split(",")) - set(paths)
        assert not unknown, f"--paths: this build/CPU does not run {sorted(unknown)} (it runs {paths})"
        paths = [p for p in paths if p in args.paths.split(",")]
    print(f"# fastgrad CPU statistics: portable paths {paths} (auto: {cpu_isa.current()}) vs "
          f"{'the -march=native build ' + args.native if native else 'no native build'} — "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    auto = cpu_isa.current()
    rows = []
    try:
        for set_name, shapes in sets(args.quick).items():
            for dt_name in args.dtypes.split(","):
                grads = make(shapes, getattr(torch, dt_name))
                fns = {f"portable, {p}": on_path(p, stats_call(_C, grads)) for p in paths}
                for label, mod in others.items():
                    fns[label] = stats_call(mod, grads)
                if native is not None:
                    fns["native"] = stats_call(native, grads)
                # bitwise equal tables, whichever path or build
                want = [t.clone() for t in next(iter(fns.values()))()]
                for name, fn in fns.items():
                    got = fn()
                    assert all(torch.equal(g.view(torch.int64), w.view(torch.int64)) for g, w in zip(got, want)), \
                        f"{name}: tables differ from {next(iter(fns))}"
                t = timeit_interleaved(fns, reps=args.reps)
                ref = t.get("native", t[f"portable, {auto}"])
                gb = nbytes(grads) / 1e9
                for impl, ti in t.items():
                    rows.append({"set": set_name, "dtype": dt_name, "impl": impl, "ms": ti * 1e3, "GB/s": gb / ti,
                                 "speed vs native" if native else f"speed vs {auto}": ref / ti})
    finally:
        cpu_isa.select(auto)
    print(table(rows, list(rows[0])))
    print("\nspeed column: the variant's speed relative to the reference variant (>= 1: as fast or faster).")


if __name__ == "__main__":
    main()
