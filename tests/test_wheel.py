"""The release wheel: built by tools/build_wheel.sh, installed into a fresh venv with no compiler.

Builds the CPU-only wheel once per session (tools/build_wheel.sh --cpu-only: sdist, wheel built
from the sdist in an isolated environment, auditwheel repair; about 2 minutes), or takes the wheel
named by FASTGRAD_WHEEL (e.g. a release wheel from tools/build_wheel.sh with CUDA). Then:
  * the wheel is manylinux-tagged and holds every subpackage and the compiled CPU module;
  * in a new venv (no system site-packages: torch from the package index, the wheel installed with
    --only-binary, PATH holding no C/C++ compiler or nvcc, CC/CXX=false), tests/wheel_smoke.py
    imports it, runs statistics / clipping / a wrapped step, and checks every CPU path this
    machine runs gives bitwise the same results;
  * a wheel holding the CUDA module has cubins for sm_80 and sm_90 and sm_90 PTX.
Marked `wheel` (deselect with -m 'not wheel'); CI runs it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.wheel,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="manylinux wheels: Linux only")]
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++", "nvcc", "x86_64-linux-gnu-gcc", "x86_64-linux-gnu-g++",
             "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> str:
    given = os.environ.get("FASTGRAD_WHEEL")
    if given:
        assert os.path.isfile(given), f"FASTGRAD_WHEEL={given}: no such file"
        return given
    # a copy of the tree, so that dist/ and build/ of the checkout are left alone
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(src, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(src, f))
    env = {k: v for k, v in os.environ.items() if k not in ("FASTGRAD_CPU_ARCH", "FASTGRAD_PLAT")}
    r = subprocess.run(["bash", "tools/build_wheel.sh", "--cpu-only"], cwd=src, env={**env, "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"tools/build_wheel.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    found = glob.glob(os.path.join(src, "dist", "fastgrad-*.whl"))
    assert len(found) == 1, (found, r.stdout[-2000:])
    assert glob.glob(os.path.join(src, "dist", "fastgrad-*.tar.gz")), "no sdist in dist/"
    return found[0]


def test_wheel_is_manylinux_and_complete(wheel):
    name = os.path.basename(wheel)
    assert "manylinux_" in name and "linux_x86_64.whl" not in name.replace("manylinux", ""), name
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("fastgrad/__init__.py", "fastgrad/optim/__init__.py", "fastgrad/backends/__init__.py",
                "fastgrad/loggers/__init__.py", "fastgrad/integrations/__init__.py", "fastgrad/cpu_isa.py"):
        assert pkg in names, f"{pkg} missing from {name}"
    assert any(n.startswith("fastgrad/_C.") and n.endswith(".so") for n in names), names
    assert not any(n.startswith(("csrc/", "tests/")) for n in names)
    r = subprocess.run([sys.executable, "-m", "auditwheel", "show", wheel], capture_output=True, text=True)
    if r.returncode == 0:  # auditwheel is installed by build_wheel.sh; absent for a FASTGRAD_WHEEL run
        tag = name.rsplit("-", 1)[1].removesuffix(".whl")
        said = " ".join(r.stdout.split())  # auditwheel wraps its lines
        assert f'is consistent with the following platform tag: "{tag}"' in said, r.stdout


def test_wheel_cuda_module_architectures(wheel, tmp_path):
    from test_cuda_build import fatbin_architectures

    cuda = [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fastgrad/_cuda.") and n.endswith(".so")]
    if not cuda:
        pytest.skip("this wheel holds no CUDA module (the test builds --cpu-only; FASTGRAD_WHEEL=<release wheel> "
                    "checks a CUDA one)")
    path = zipfile.ZipFile(wheel).extract(cuda[0], tmp_path)
    archs = fatbin_architectures(path)
    assert {("elf", 80), ("elf", 90), ("ptx", 90)} <= archs, sorted(archs)


def _no_compiler_path(tmp_path) -> str:
    """PATH: the venv's bin, then shims that fail for every compiler name, then the system dirs."""
    shims = tmp_path / "no-compilers"
    shims.mkdir()
    for c in COMPILERS:
        (shims / c).write_text("#!/bin/sh\necho \"$0: no compiler in this test\" >&2\nexit 1\n")
        (shims / c).chmod(0o755)
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and "cuda" not in d.lower()]
    return os.pathsep.join([str(shims), *keep])


def test_wheel_installs_and_runs_without_a_compiler(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # no system site-packages
    py = str(venv / "bin" / "python")
    path = _no_compiler_path(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTGRAD_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), path]), CC="false", CXX="false", CUDA_HOME="/nonexistent",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    # torch as CI installs it (the CPU build); --only-binary: pip may not build anything from source
    import torch

    r = subprocess.run([py, "-m", "pip", "install", "-q", "--only-binary=:all:",
                        f"torch=={torch.__version__.split('+')[0]}", wheel],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert subprocess.run(["sh", "-c", "gcc --version"], env=env, capture_output=True).returncode != 0
    r = subprocess.run([py, os.path.join(ROOT, "tests", "wheel_smoke.py"), str(venv)], env=env,
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "wheel smoke test passed" in r.stdout
