#!/usr/bin/env bash
# The GPU session: build, GPU tests, compute-sanitizer, quick benchmarks. Logs under $OUT (or ./gpu_logs).
#
# BUDGET (/work/.library/device/README.md): 15 minutes of device time per issue, machine start (1-2 min)
# and idle time included; one command at most 10 minutes; a machine idle 30 s goes back and the next
# call starts bare (build again); at most 8 files come back from $OUT per call. Hence two calls:
#
#   (a) tests  ~5-6 min: run(command="bash bench/gpu_session.sh tests", timeout_s=450)
#       build (FASTGRAD_FORCE_CUDA=1, full log kept), fail unless fastgrad._cuda imports; then every
#       GPU test: the conformance matrix's @cuda targets, test_gpu.py, test_triton.py (compiled),
#       test_cuda_build.py; pytest-timeout per test, no -x, -rs; FAILS if an expected file or backend
#       ran no test at all (tools/gpu_junit_check.py).
#   (b) bench  ~4 min:  run(command="bash bench/gpu_session.sh bench", timeout_s=360)
#       builds again only on a fresh machine; compute-sanitizer memcheck/racecheck/synccheck over
#       tools/gpu_sanitize.py when compute-sanitizer exists; quick benchmarks, each under its own timeout.
#   (a) + (b) + two starts ~ 12 min: one fix-and-rerun of (a) fits only if (b) is dropped.
#
# Every step has its own `timeout`, derived from DEADLINE (seconds for this call, default 400 for tests,
# 330 for bench) so the script ends, with its logs, before the tool's limit kills it.
set -uo pipefail
mode="${1:-tests}"
out="${OUT:-gpu_logs}"; mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export FASTGRAD_FORCE_CUDA=1 FASTGRAD_EXPECT_CUDA_BUILD=1 FASTGRAD_REQUIRE_TRITON=1
unset TRITON_INTERPRET  # compiled Triton on the GPU (tests/conftest.py sets it only without a GPU)
case "$mode" in tests) deadline="${DEADLINE:-400}" ;; bench) deadline="${DEADLINE:-330}" ;;
  *) echo "usage: $0 tests|bench"; exit 64 ;; esac
status=0
left() { echo $(( deadline - SECONDS )); }
# step LIMIT LOG CMD...: run CMD under min(LIMIT, time left - 10 s), output to LOG (appended) and stdout.
step() {
  local limit=$1 log=$2; shift 2
  local t; t=$(left); t=$(( t - 10 < limit ? t - 10 : limit ))
  if (( t < 15 )); then echo "SKIPPED (no time left): $*" | tee -a "$out/summary.txt"; status=1; return 1; fi
  echo "== $* (limit ${t}s)" | tee -a "$log"
  timeout --kill-after=5 "$t" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  (( rc == 124 || rc == 137 )) && echo "TIMED OUT after ${t}s: $*" | tee -a "$out/summary.txt"
  return "$rc"
}

{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total,memory.used --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1; command -v compute-sanitizer || echo "compute-sanitizer: not found"
  python3 -c "import pytest_timeout, xdist" 2>&1 | tail -1; } > "$out/device.txt" 2>&1
cat "$out/device.txt"

# -- build (kept verbose: a CUDA build that silently did not happen must show why) -----------------
if ! python3 -c "import fastgrad._cuda, fastgrad._C" 2>/dev/null; then
  step 240 "$out/build.log" python3 -m pip install --no-build-isolation --no-deps -v -e . > /dev/null
fi
if ! python3 -c "import fastgrad._cuda" >> "$out/build.log" 2>&1; then
  echo "FAIL: fastgrad._cuda does not import after the build (FASTGRAD_FORCE_CUDA=1); see build.log" | tee -a "$out/summary.txt"
  tail -40 "$out/build.log"
  exit 3
fi
python3 -m fastgrad.cli backends 2>&1 | tee -a "$out/device.txt"

if [ "$mode" = tests ]; then
  # -- all GPU tests, one process per group so a crash in one cannot hide the others -------------
  xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 6"  # Triton compiles many kernel variants: spread them
  common=(-q -rfEs -p no:cacheprovider --timeout=240 --durations=15)
  step 120 "$out/tests.log" python3 -m pytest "${common[@]}" --junitxml="$out/junit_other.xml" \
    tests/test_triton.py tests/test_cuda_build.py || status=1
  step 330 "$out/tests.log" python3 -m pytest "${common[@]}" $xdist --junitxml="$out/junit_gpu.xml" -m cuda \
    tests/test_backends.py tests/test_gpu.py || status=1
  python3 tools/gpu_junit_check.py "$out"/junit_*.xml \
    --require tests/test_backends.py::cuda_cuda --require tests/test_backends.py::triton_cuda \
    --require tests/test_gpu.py::test_200_back_to_back --require tests/test_gpu.py::test_bf16_tensor_beyond \
    --require tests/test_triton.py::test_planned_once --require tests/test_cuda_build.py \
    2>&1 | tee -a "$out/summary.txt"
  (( PIPESTATUS[0] == 0 )) || status=1
else
  # -- compute-sanitizer over a small workload (memcheck with the caching allocator off) -----------
  if command -v compute-sanitizer >/dev/null; then
    step 120 "$out/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
      --leak-check no --error-exitcode 3 python3 tools/gpu_sanitize.py || status=1
    step 120 "$out/sanitizer.log" compute-sanitizer --tool racecheck --racecheck-report hazard \
      --error-exitcode 3 python3 tools/gpu_sanitize.py || status=1
    step 90 "$out/sanitizer.log" compute-sanitizer --tool synccheck --error-exitcode 3 \
      python3 tools/gpu_sanitize.py || status=1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|WRONG|Timed out|TIMED OUT" "$out/sanitizer.log" | tee -a "$out/summary.txt"
  else
    echo "compute-sanitizer not found: sanitizer checks not run" | tee -a "$out/summary.txt"
  fi
  # -- quick benchmarks, each under its own limit, each with its own log -------------------------
  step 90 "$out/gpu_stats.md" python3 bench/gpu_stats.py --quick || status=1
  step 60 "$out/optim_overhead_cuda.md" python3 bench/optim_overhead.py --device cuda || status=1
  step 60 "$out/monitor_overhead_cuda.md" python3 bench/monitor_overhead.py --device cuda || status=1
fi
echo "gpu_session.sh $mode: $( ((status)) && echo FAILED || echo ok ) after ${SECONDS}s" | tee -a "$out/summary.txt"
exit $status
