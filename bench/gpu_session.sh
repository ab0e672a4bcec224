#!/usr/bin/env bash
# One device-machine call: build, GPU tests, GPU benchmarks; logs under $OUT (or ./gpu_logs).
# The device image has torch, triton, pybind11 and nvcc but no network, hence --no-build-isolation.
#   device run:  bash bench/gpu_session.sh      (about 10 minutes; pass QUICK=1 for a short run)
set -uo pipefail
out="${OUT:-gpu_logs}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
nvidia-smi -L | tee "$out/device.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$out/build.log" | tail -3
python3 -m fastgrad.cli backends | tee -a "$out/device.txt"
python3 -m pytest -q -m cuda tests/test_gpu.py tests/test_triton.py -x 2>&1 | tee "$out/gpu_tests.log" | tail -15
quick=${QUICK:+--quick}
python3 bench/gpu_stats.py $quick 2>&1 | tee "$out/gpu_stats.md"
python3 bench/optim_overhead.py --device cuda 2>&1 | tee "$out/optim_overhead_cuda.md"
python3 bench/monitor_overhead.py --device cuda 2>&1 | tee "$out/monitor_overhead_cuda.md"
