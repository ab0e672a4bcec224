#!/usr/bin/env bash
# Which compile options make the CPU statistics kernel fast: compiles csrc/cpu/grad_stats_cpu.cpp
# several times (the way csrc/cpu/isa.h builds a path: instruction sets from `#pragma GCC target`
# after the includes, code shapes from FASTGRAD_HAS_*), links the variants into one program
# (bench/cpu_isa_variants.cpp) and times them round-robin on bench/param_sets.py's gradient sets,
# one kernel thread, thread CPU time, best of REPS; the tables must be bitwise equal.
#
#   bash bench/cpu_isa_variants.sh [REPS=9] [THREADS=1]
#
# Variants (the first is the reference of the speed columns):
#   native        -march=native, one path (FASTGRAD_CPU_ARCH=native)
#   avx512        the portable AVX-512 path: x86-64-v4 feature list (isa.h)
#   avx512+icl    the same plus the Ice Lake-server extensions (VBMI, VBMI2, VNNI, BITALG,
#                 VPOPCNTDQ, IFMA, GFNI, VPCLMULQDQ, VAES): would a fourth path pay?
#   v4-sse2code   the x86-64-v4 target compiling the baseline's code shapes (FASTGRAD_HAS_*=0):
#                 the shapes, not the target, make the speed. (Before isa.h defined
#                 FASTGRAD_HAS_*, the AVX-512 path compiled SSE2 shapes of 16-lane code: GCC's C++
#                 front end leaves __AVX512F__ unset under the target pragma; 0.58-0.69x native.)
#   avx2          the portable AVX2 path (x86-64-v3)
#   baseline      the portable baseline (x86-64: SSE2)
# The generated isa.h mirrors csrc/cpu/isa.h's; keep them in step.
set -euo pipefail
REPS=${1:-9}
THREADS=${2:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
CXX=${CXX:-g++}
FLAGS="-O3 -std=c++17 -fno-math-errno -fno-trapping-math -ffp-contract=off -Wno-psabi -fopenmp -fPIC"
V3="avx2,fma,bmi,bmi2,f16c,lzcnt,movbe,popcnt,sse4.2,ssse3"
V4="$V3,avx512f,avx512bw,avx512cd,avx512dq,avx512vl"
ICL="$V4,avx512vbmi,avx512vbmi2,avx512vnni,avx512bitalg,avx512vpopcntdq,avx512ifma,gfni,vpclmulqdq,vaes"

# variant NAME "TARGET LIST or empty" HAS_AVX2 HAS_FMA HAS_AVX512 "EXTRA FLAGS"
variant() {
  local name=$1 target=$2 d="$OUT/$1"
  mkdir -p "$d"
  cp "$ROOT/csrc/cpu/grad_stats_cpu.cpp" "$ROOT/csrc/cpu/tensor_view.h" "$d/"
  {
    echo "#pragma once"
    echo "#define FASTGRAD_ISA_NS v_${name//[^a-zA-Z0-9]/_}"
    if [ -n "$target" ]; then
      echo "#define FASTGRAD_ISA_TARGET_BEGIN _Pragma(\"GCC push_options\") _Pragma(\"GCC target(\\\"$target\\\")\")"
      echo "#define FASTGRAD_ISA_TARGET_END _Pragma(\"GCC pop_options\")"
    else
      echo "#define FASTGRAD_ISA_TARGET_BEGIN"
      echo "#define FASTGRAD_ISA_TARGET_END"
    fi
    echo "#define FASTGRAD_ISA_BUILD 1"
    echo "#define FASTGRAD_HAS_AVX2 $3"
    echo "#define FASTGRAD_HAS_FMA $4"
    echo "#define FASTGRAD_HAS_AVX512 $5"
  } > "$d/isa.h"
  # shellcheck disable=SC2086
  $CXX $FLAGS $6 -c "$d/grad_stats_cpu.cpp" -o "$d/kernel.o" 2> "$d/log" || { cat "$d/log"; exit 1; }
}
variant native "" 1 1 1 "-march=native" &
variant avx512 "$V4" 1 1 1 "" &
variant avx512+icl "$ICL" 1 1 1 "" &
wait
variant v4-sse2code "$V4" 0 0 0 "" &
variant avx2 "$V3" 1 1 0 "" &
variant baseline "" 0 0 0 "" &
wait
NAMES=(native avx512 avx512+icl v4-sse2code avx2 baseline)
decls="" list="" objs=()
for n in "${NAMES[@]}"; do
  ns="v_${n//[^a-zA-Z0-9]/_}"
  decls="$decls DECL($ns)"
  list="$list {\"$n\", \&$ns::grad_stats_cpu},"
  objs+=("$OUT/$n/kernel.o")
done
sed -e "s|^VARIANT_DECLS$|$decls|" -e "s|VARIANT_LIST|$list|" "$ROOT/bench/cpu_isa_variants.cpp" > "$OUT/driver.cpp"
$CXX -O2 -std=c++17 -fopenmp -I"$ROOT/csrc/cpu" "$OUT/driver.cpp" "${objs[@]}" -o "$OUT/driver"
echo "# grad_stats_cpu variants, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $THREADS thread(s), best of $REPS"
"$OUT/driver" "$REPS" "$THREADS"
