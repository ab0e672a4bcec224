"""Plant each of issue 16's six bugs in a scratch copy of HEAD, one at a time, and run the tests
that exist to catch them (docs/testing.md). Never touches the working tree. Not run in CI.

    python tools/plant_bugs.py            # prints CAUGHT / NOT CAUGHT per bug

A pattern that no longer matches the code (after a refactor) is reported, not planted: update it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_pinned_rules.py", "tests/test_detector_rules.py"]
BUGS = [  # (what, file, original text, planted text)
    ("GradStats.neginf_count returns the +Inf counts", "fastgrad/stats.py",
     "return self.raw.counts[:, NEGINF]", "return self.raw.counts[:, POSINF]"),
    ("nonfinite_count ignores -Inf", "fastgrad/stats.py",
     "return self.raw.counts[:, :ZERO].sum(dim=1)", "return self.raw.counts[:, :NEGINF].sum(dim=1)"),
    ("SpikeSkip's std with n, not n - 1 (torch-op reference)", "fastgrad/optim/spike.py",
     "0.0).sum() / (n - 1).clamp(min=1)", "0.0).sum() / n.clamp(min=1)"),
    ("PerTensorNorm ignores a GradScaler's scale", "fastgrad/clip.py",
     "scaled = coefs if ctx.inv_scale is None else coefs * ctx.inv_scale", "scaled = coefs"),
    ("vanishing threshold relative to the largest layer", "fastgrad/detectors.py",
     "median = float(np.median(rms[live]))", "median = float(np.max(rms[live]))"),
    ("exploding EMA fed the raw spike", "fastgrad/detectors.py",
     "x = mean + self.z_threshold * std", "x = x"),
]


def main() -> int:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        clean.mkdir()
        subprocess.run(["tar", "-x", "-C", str(clean)], input=archive, check=True)
        for so in glob.glob(str(ROOT / "fastgrad" / "_C*.so")):
            shutil.copy2(so, clean / "fastgrad")
        for what, path, old, new in BUGS:
            dst = Path(tmp) / "planted"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(clean, dst)
            text = (dst / path).read_text()
            if text.count(old) != 1:
                print(f"{what}: pattern not found once in {path}; update tools/plant_bugs.py")
                missed += 1
                continue
            (dst / path).write_text(text.replace(old, new))
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=dst,
                               env={**os.environ, "PYTHONPATH": str(dst), "OMP_NUM_THREADS": "1"},
                               capture_output=True, text=True)
            fails = [line.split(" - ")[0][7:] for line in r.stdout.splitlines() if line.startswith("FAILED")]
            caught = r.returncode == 1 and fails
            missed += not caught
            print(f"{what}: {'CAUGHT by ' + str(len(fails)) + ' tests, e.g. ' + fails[0] if caught else 'NOT CAUGHT'}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
