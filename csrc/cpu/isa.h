// Which instruction-set path of the CPU kernels a translation unit builds.
//
// The kernels (grad_stats_cpu.cpp, scale_cpu.cpp) are compiled once per path:
// plainly for the portable baseline (any x86-64, or any aarch64), and, on
// x86-64 with GCC, again by the wrappers in csrc/cpu/isa/ with
// FASTGRAD_ISA_AVX2 or FASTGRAD_ISA_AVX512 defined. cpu_dispatch.cpp picks one
// path per process (the widest the CPU has, or FASTGRAD_CPU_ISA).
//
// Each path lives in its own namespace (FASTGRAD_ISA_NS) and gets its
// instruction set from `#pragma GCC target` placed AFTER every #include
// (FASTGRAD_ISA_TARGET_BEGIN): inline functions of the headers (std::vector,
// tensor_view.h, ...) are then compiled for the baseline in every unit, so
// the copy the linker keeps of such a shared (COMDAT) function is safe on
// any CPU. Compiling a wrapper with -mavx2 instead would let the linker keep
// an AVX2 copy of, say, std::vector's growth code for every caller.
// tests/test_cpu_dispatch.py checks the built module for that (objdump).
//
// Every path computes the same sums in the same order (16-lane GCC vector
// types, fixed loop structure) and setup.py passes -ffp-contract=off (no
// fused multiply-add on the paths that have it), so results are bitwise
// identical whichever path runs.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(FASTGRAD_CPU_SINGLE_PATH)
#define FASTGRAD_ISA_VARIANTS 1  // the AVX2 and AVX-512 paths exist in this build
#else
#define FASTGRAD_ISA_VARIANTS 0
#endif

// x86-64-v3 and -v4 (the psABI levels) as feature lists: GCC accepts these from
// version 5 on ("arch=x86-64-v3" needs GCC 11). cpu_dispatch.cpp checks the same.
#if defined(FASTGRAD_ISA_AVX512) && FASTGRAD_ISA_VARIANTS
#define FASTGRAD_ISA_NS isa_avx512
#define FASTGRAD_ISA_TARGET_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,bmi,bmi2,f16c,lzcnt,movbe,popcnt,sse4.2,ssse3,avx512f,avx512bw,avx512cd,avx512dq,avx512vl\")")
#define FASTGRAD_ISA_TARGET_END _Pragma("GCC pop_options")
#define FASTGRAD_ISA_BUILD 1
#elif defined(FASTGRAD_ISA_AVX2) && FASTGRAD_ISA_VARIANTS
#define FASTGRAD_ISA_NS isa_avx2
#define FASTGRAD_ISA_TARGET_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,bmi,bmi2,f16c,lzcnt,movbe,popcnt,sse4.2,ssse3\")")
#define FASTGRAD_ISA_TARGET_END _Pragma("GCC pop_options")
#define FASTGRAD_ISA_BUILD 1
#elif defined(FASTGRAD_ISA_AVX2) || defined(FASTGRAD_ISA_AVX512)
#define FASTGRAD_ISA_BUILD 0  // a wrapper on a build without variants: compiles to nothing
#else
#define FASTGRAD_ISA_NS isa_baseline  // the portable path, or the one -march path (FASTGRAD_CPU_SINGLE_PATH)
#define FASTGRAD_ISA_TARGET_BEGIN
#define FASTGRAD_ISA_TARGET_END
#define FASTGRAD_ISA_BUILD 1
#endif

// What the kernels' `#if`s test to pick the code shaped for an instruction set:
//   FASTGRAD_HAS_AVX2    AVX2 (x86-64-v3): variable per-lane shifts, 256-bit integer ops
//   FASTGRAD_HAS_FMA     fused multiply-add (x86-64-v3), used where it rounds as mul + add does
//   FASTGRAD_HAS_AVX512  AVX-512 F/BW/CD/DQ/VL (x86-64-v4): mask registers, 16/32-bit permutes
// NOT the compiler's __AVX2__ / __AVX512F__: GCC's C++ front end (12 at least;
// C does update them) leaves those macros as the command line set them under
// `#pragma GCC target`, so the AVX-512 path used to compile the SSE2-shaped
// fallbacks (measured: 0.58-0.69x of a -march=native build with histograms).
#if FASTGRAD_ISA_BUILD
#if defined(FASTGRAD_ISA_AVX512) && FASTGRAD_ISA_VARIANTS
#define FASTGRAD_HAS_AVX2 1
#define FASTGRAD_HAS_FMA 1
#define FASTGRAD_HAS_AVX512 1
#elif defined(FASTGRAD_ISA_AVX2) && FASTGRAD_ISA_VARIANTS
#define FASTGRAD_HAS_AVX2 1
#define FASTGRAD_HAS_FMA 1
#define FASTGRAD_HAS_AVX512 0
#else  // the baseline: whatever the command line's -march gives (x86-64: SSE2 only, unless FASTGRAD_CPU_ARCH)
#if defined(__AVX2__)
#define FASTGRAD_HAS_AVX2 1
#else
#define FASTGRAD_HAS_AVX2 0
#endif
#if defined(__FMA__)
#define FASTGRAD_HAS_FMA 1
#else
#define FASTGRAD_HAS_FMA 0
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512CD__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define FASTGRAD_HAS_AVX512 1
#else
#define FASTGRAD_HAS_AVX512 0
#endif
#endif
#endif
