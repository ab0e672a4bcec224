"""Mutation testing of fastgrad's core Python modules with mutmut, one module at a time.

Not run in CI (minutes to tens of minutes per module on a 2-core machine). Usage::

    pip install -e '.[test]'            # pins mutmut
    python tools/mutation.py                       # every core module
    python tools/mutation.py clip optim            # some of them
    python tools/mutation.py detectors --sample 80 --max-children 2 --timeout 1200

For each module it builds a scratch copy of the committed tree (``git archive HEAD``
plus the compiled ``fastgrad/_C*.so`` of the working tree, which mutmut copies along
with the package), writes a ``[tool.mutmut]`` section that mutates only that module
and selects only the test files that exercise it, runs ``nice -n 10 mutmut run`` in
that copy under a time bound, and prints the verdicts (killed / survived / no tests /
timeout ...). ``--sample K`` tests a reproducible random sample of K mutants
(``--seed``) instead of all of them. Results go to ``<workdir>/<module>/summary.json``;
survivors are listed with ``mutmut show NAME`` run in ``<workdir>/<module>``.

The kill rate printed is ``killed / (mutants with a verdict)``, before judging which
survivors are equivalent; docs/testing.md records that judgement and the figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module name -> (files mutated, test files that exercise them)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "stats": (["fastgrad/stats.py"], ["tests/test_grad_stats.py", "tests/test_pinned_rules.py",
                                       "tests/test_report.py"]),
    "aggregate": (["fastgrad/aggregate.py"], ["tests/test_grad_stats.py", "tests/test_pinned_rules.py",
                                               "tests/test_cpu_backend.py"]),
    "reference": (["fastgrad/reference.py"], ["tests/test_reference.py", "tests/test_pinned_rules.py",
                                           "tests/test_clip.py"]),
    "collect": (["fastgrad/collect.py"], ["tests/test_grad_stats.py", "tests/test_clip.py",
                                           "tests/test_dispatch.py"]),
    "clip_grad": (["fastgrad/clip_grad.py"], ["tests/test_clip.py", "tests/test_pinned_rules.py"]),
    "clip": (["fastgrad/clip.py"], ["tests/test_clippers.py", "tests/test_pinned_rules.py",
                                     "tests/test_optim.py"]),
    # the optimizer guard: a module until 9dd6ec4, a package (fastgrad/optim/) since
    "optim": (["fastgrad/optim.py", "fastgrad/optim/*.py"], ["tests/test_optim.py", "tests/test_pinned_rules.py",
                                                            "tests/test_clippers.py"]),
    "distributed": (["fastgrad/distributed.py"], ["tests/test_distributed.py", "tests/test_pinned_rules.py"]),
    "detectors": (["fastgrad/detectors.py"], ["tests/test_detector_rules.py", "tests/test_monitor.py"]),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          35: "suspicious", 36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout",
          152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}


def _toml_list(xs: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in xs) + "]"


def prepare(name: str, workdir: Path) -> Path:
    """A scratch copy of HEAD (plus the built extension) configured to mutate one module."""
    files, tests = MODULES[name]
    dest = workdir / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for so in glob.glob(str(ROOT / "fastgrad" / "_C*.so")):
        shutil.copy2(so, dest / "fastgrad")
    tests = [t for t in tests if (dest / t).exists()]  # as committed
    pyproject = (dest / "pyproject.toml").read_text()
    pyproject = re.sub(r"\n\[tool\.mutmut\][^\[]*", "\n", pyproject)
    pyproject += (
        "\n[tool.mutmut]\n"
        'source_paths = ["fastgrad"]\n'
        f"only_mutate = {_toml_list(files)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q", "-m", "not slow"]\n'
        "use_git_change_detection = false\n"
        # fresh processes: a worker forked after the clean run would inherit its caches
        # (stats._segments_cache, plan caches) and never run the mutated constructors
        'process_isolation = "forkserver"\n'
        'forkserver_warmup = "collect"\n'
        "timeout_multiplier = 5.0\n"
        "timeout_constant = 10.0\n"
    )
    (dest / "pyproject.toml").write_text(pyproject)
    (dest / "COMMIT").write_text(commit + "\n")
    return dest


_GENERATE = """
import os
import mutmut.__main__ as m
from mutmut.utils.file_utils import setup_source_paths
m.set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
m.copy_src_dir(); m.copy_also_copy_files(); setup_source_paths(); m.create_mutants(1)
"""


def mutant_names(dest: Path, env: dict) -> list[str]:
    """Generate the mutants without testing any (mutmut's own first step of ``run``, which then
    reuses them): the names from the .meta files."""
    subprocess.run([sys.executable, "-c", _GENERATE], cwd=dest, env=env, check=True, capture_output=True)
    names: list[str] = []
    for meta in sorted(dest.glob("mutants/**/*.meta")):
        names += list(json.loads(meta.read_text())["exit_code_by_key"])
    return names


def run_whole_files(dest: Path, env: dict, names: list[str], tests: list[str], per_mutant: float) -> dict[str, str]:
    """Each mutant against the whole selected test files, bypassing mutmut's map of which tests
    reach which function: that map is recorded in the pytest process only, so code run in
    subprocesses (test_distributed.py spawns its ranks) shows as "no tests" there."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    clean = subprocess.run(["nice", "-n", "10", *cmd], cwd=dest / "mutants", capture_output=True, text=True,
                           env={**env, "MUTANT_UNDER_TEST": ""}, timeout=per_mutant * 4)
    if clean.returncode != 0:
        raise RuntimeError(f"the clean tests fail in {dest / 'mutants'}:\n{clean.stdout[-2000:]}")
    out: dict[str, str] = {}
    for name in names:
        try:
            r = subprocess.run(["nice", "-n", "10", *cmd], cwd=dest / "mutants", capture_output=True, text=True,
                               env={**env, "MUTANT_UNDER_TEST": name}, timeout=per_mutant)
            out[name] = "survived" if r.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            out[name] = "timeout"
    return out


def verdicts(dest: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for meta in sorted(dest.glob("mutants/**/*.meta")):
        for k, v in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[k] = STATUS.get(v, "suspicious")
    return out


def run(name: str, args: argparse.Namespace) -> dict:
    dest = prepare(name, Path(args.workdir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    selected: list[str] = []
    if args.sample:
        names = mutant_names(dest, env)
        random.Random(args.seed).shuffle(names)
        selected = sorted(names[: args.sample])
    cmd = ["nice", "-n", "10", "mutmut", "run", "--max-children", str(args.max_children), *selected]
    t0 = time.monotonic()
    whole = None
    if args.whole_files:
        if not selected:
            selected = mutant_names(dest, env)
        tests = [t for t in MODULES[name][1] if (dest / t).exists()]
        whole = run_whole_files(dest, env, selected, tests, args.per_mutant)
        cmd = ["true"]
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=args.timeout)
        tail, timed_out = (proc.stdout + proc.stderr)[-3000:], False
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-3000:]
        timed_out = True
    seconds = time.monotonic() - t0
    v = whole if whole is not None else verdicts(dest)
    if args.sample and not selected:
        raise RuntimeError(f"{name}: no mutants generated to sample from")
    if selected:
        v = {k: s for k, s in v.items() if k in set(selected)}
    counts: dict[str, int] = {}
    for s in v.values():
        counts[s] = counts.get(s, 0) + 1
    checked = sum(c for s, c in counts.items() if s not in ("not checked", "no tests", "skipped"))
    killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
    commit = (dest / "COMMIT").read_text().strip()[:12]  # the tree measured
    summary = {"module": name, "commit": commit, "files": MODULES[name][0], "tests": MODULES[name][1],
               "sampled": len(selected) or None, "mutants": len(v), "counts": counts,
               "kill_rate": killed / checked if checked else None, "seconds": round(seconds),
               "timed_out": timed_out,
               "survived": sorted(k for k, s in v.items() if s == "survived"),
               "no_tests": sorted(k for k, s in v.items() if s == "no tests")}
    (dest / "summary.json").write_text(json.dumps(summary, indent=1))
    if not v:
        print(tail, file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", metavar="MODULE", help=f"any of {', '.join(MODULES)} (default: all)")
    ap.add_argument("--workdir", default="/tmp/fastgrad-mutation")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per module")
    ap.add_argument("--sample", type=int, default=0, help="test a random sample of this many mutants")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--whole-files", action="store_true",
                    help="run every mutant against the whole selected test files (for code run in subprocesses)")
    ap.add_argument("--per-mutant", type=float, default=300, help="seconds per mutant with --whole-files")
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; choose from {', '.join(MODULES)}")
    if shutil.which("mutmut") is None:
        print("mutmut is not installed: pip install 'mutmut==3.8.1'", file=sys.stderr)
        return 2
    rows = []
    for name in args.modules or list(MODULES):
        s = run(name, args)
        rows.append(s)
        rate = "n/a" if s["kill_rate"] is None else f"{100 * s['kill_rate']:.1f}%"
        print(f"{name:<12} mutants {s['mutants']:>4}  {json.dumps(s['counts'])}  kill rate {rate}  "
              f"{s['seconds']} s{'  (TIMED OUT)' if s['timed_out'] else ''}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
