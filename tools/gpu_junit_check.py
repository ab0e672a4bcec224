"""Summarise pytest JUnit XML from a GPU session, and fail loudly when an expected group ran nothing.

    python tools/gpu_junit_check.py junit.xml [more.xml] --require tests/test_gpu.py \
        --require tests/test_backends.py::cuda_cuda --require tests/test_backends.py::triton_cuda

A ``--require FILE[::SUBSTRING]`` is met when at least one test of FILE whose
name contains SUBSTRING ran (passed or failed): a file whose tests were all
skipped (no GPU seen, a build that silently did not happen, Triton in the
wrong mode) then fails the session instead of leaving it green.
Prints one line per file (passed / failed / errors / skipped), every failure
with its first message line, and the skip reasons with their counts.
Exit status: 0 all good; 1 failures or errors; 2 an unmet requirement (or no XML).
"""

from __future__ import annotations

import argparse
import collections
import sys
import xml.etree.ElementTree as ET


def _file_of(case: ET.Element) -> str:
    f = case.get("file")
    if f:
        return f
    return case.get("classname", "").replace(".", "/") + ".py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("xml", nargs="+")
    ap.add_argument("--require", action="append", default=[], metavar="FILE[::SUBSTRING]")
    args = ap.parse_args(argv)

    cases = []
    for path in args.xml:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as e:
            print(f"FAIL: cannot read {path}: {e}")
            return 2
        cases += list(root.iter("testcase"))

    per_file: dict = collections.defaultdict(collections.Counter)
    failures, skips, ran = [], collections.Counter(), []
    for c in cases:
        f, name = _file_of(c), c.get("name", "")
        kind = "passed"
        for child in c:
            if child.tag in ("failure", "error", "skipped"):
                kind = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                msg = (child.get("message") or child.text or "").strip().splitlines()
                if kind == "skipped":
                    skips[(f, msg[0][:160] if msg else "")] += 1
                else:
                    failures.append(f"{kind.upper()}: {f}::{name}: {msg[0][:300] if msg else ''}")
                break
        per_file[f][kind] += 1
        if kind != "skipped":
            ran.append((f, name))

    print(f"{'file':44} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8}")
    for f in sorted(per_file):
        n = per_file[f]
        print(f"{f:44} {n['passed']:7} {n['failed']:7} {n['errors']:7} {n['skipped']:8}")
    if skips:
        print("\nskip reasons:")
        for (f, why), k in skips.most_common():
            print(f"  {k:4} x {f}: {why}")
    if failures:
        print("\n" + "\n".join(failures))

    unmet = []
    for req in args.require:
        f, _, sub = req.partition("::")
        if not any(rf.endswith(f) and sub in name for rf, name in ran):
            unmet.append(req)
    for req in unmet:
        print(f"FAIL: expected tests of {req} to run, but none did (all skipped or not collected)")
    if unmet:
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
