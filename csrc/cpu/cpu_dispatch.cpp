// Runtime choice of the CPU kernels' instruction-set path (see isa.h).
//
// The paths compiled into this module (baseline; on x86-64 with GCC also
// AVX2 = x86-64-v3 and AVX-512 = x86-64-v4) are listed in kPaths, narrowest
// first. Once, when the module loads, the widest one the CPU (and the OS:
// __builtin_cpu_supports checks the saved register state) runs is chosen, or
// the one FASTGRAD_CPU_ISA names (baseline | avx2 | avx512 | auto). Naming a
// path this CPU lacks, or one this build does not have, is refused: every
// kernel call then raises RuntimeError saying so, rather than dying on an
// illegal instruction or silently running another path.
//
// The public entry points of the CPU kernels (declared in bindings.cpp and
// tensor_view.h) forward to the chosen path. A small C interface
// (fastgrad_cpu_isa_*) lets Python read and switch the path
// (fastgrad/cpu_isa.py, through ctypes); the paths give bitwise identical
// results, so switching changes speed only.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "isa.h"
#include "tensor_view.h"

namespace fastgrad {

#define FASTGRAD_DECLARE_KERNELS(NS)                                                                               \
  namespace NS {                                                                                                   \
  std::vector<TensorDesc> make_descs(const std::vector<int64_t>& ptrs, const std::vector<int64_t>& dtypes,       \
                                     const std::vector<int64_t>& numels, const std::vector<int64_t>& layout,     \
                                     const std::vector<int64_t>& dims);                                           \
  void grad_stats_cpu(const std::vector<TensorDesc>& descs, const std::vector<double>& ps, bool hist,            \
                      int min_exp, int max_exp, double* out_floats, int64_t* out_counts, int num_threads);        \
  void total_row_cpu(const std::vector<double>& ps, int64_t T, int ncounts, double* floats, int64_t* counts);     \
  void scale_cpu(const std::vector<TensorDesc>& descs, double coef, int num_threads);                            \
  void clamp_cpu(const std::vector<TensorDesc>& descs, double lo, double hi, int num_threads);                   \
  }
FASTGRAD_DECLARE_KERNELS(isa_baseline)
#if FASTGRAD_ISA_VARIANTS
FASTGRAD_DECLARE_KERNELS(isa_avx2)
FASTGRAD_DECLARE_KERNELS(isa_avx512)
#endif

namespace {

#define FASTGRAD_STR2(x) #x
#define FASTGRAD_STR(x) FASTGRAD_STR2(x)

struct Path {
  const char* name;
  bool (*runs_here)();
  decltype(&isa_baseline::grad_stats_cpu) grad_stats;
  decltype(&isa_baseline::scale_cpu) scale;
  decltype(&isa_baseline::clamp_cpu) clamp;
};

bool always() { return true; }
#if FASTGRAD_ISA_VARIANTS
// The feature lists of isa.h's target pragmas.
bool has_avx2() {
  __builtin_cpu_init();  // needed when called before libgcc's own constructor (static init)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("lzcnt") &&
         __builtin_cpu_supports("movbe") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("sse4.2") &&
         __builtin_cpu_supports("ssse3");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#endif

#define FASTGRAD_PATH(NAME, TEST, NS) {NAME, TEST, &NS::grad_stats_cpu, &NS::scale_cpu, &NS::clamp_cpu}
const Path kPaths[] = {
#if defined(FASTGRAD_CPU_SINGLE_PATH)
    // One path compiled with -march=<FASTGRAD_CPU_SINGLE_PATH> (setup.py, FASTGRAD_CPU_ARCH).
    FASTGRAD_PATH("march=" FASTGRAD_STR(FASTGRAD_CPU_SINGLE_PATH), always, isa_baseline),
#else
    FASTGRAD_PATH("baseline", always, isa_baseline),
#endif
#if FASTGRAD_ISA_VARIANTS
    FASTGRAD_PATH("avx2", has_avx2, isa_avx2),
    FASTGRAD_PATH("avx512", has_avx512, isa_avx512),
#endif
};
constexpr int kNumPaths = int(sizeof(kPaths) / sizeof(kPaths[0]));

std::atomic<const Path*> g_path{nullptr};
std::mutex g_mutex;
std::string g_error;  // why g_path is null, or why the last select failed
std::string g_compiled, g_supported;

std::string join(bool only_supported) {
  std::string s;
  for (const Path& p : kPaths)
    if (!only_supported || p.runs_here()) s += (s.empty() ? "" : ",") + std::string(p.name);
  return s;
}

// The path `name` asks for ("" or "auto": the widest that runs here); null and
// `why` set if there is none.
const Path* find(const char* name, std::string& why) {
  if (!name || !*name || std::strcmp(name, "auto") == 0) {
    for (int i = kNumPaths - 1; i >= 0; --i)
      if (kPaths[i].runs_here()) return &kPaths[i];
    why = "no CPU path runs here";  // unreachable: the first path always does
    return nullptr;
  }
  for (const Path& p : kPaths) {
    if (std::strcmp(p.name, name) != 0) continue;
    if (p.runs_here()) return &p;
    why = "this CPU lacks the instructions of the '" + std::string(name) + "' path (it runs: " + join(true) +
          "); choose one of those, or 'auto'";
    return nullptr;
  }
  why = "no CPU path '" + std::string(name) + "' in this build (it has: " + join(false) +
        "; 'auto' picks the widest this CPU runs)";
  return nullptr;
}

// Chosen once, as the module loads.
const bool g_init = [] {
  g_compiled = join(false);
  g_supported = join(true);
  std::string why;
  const char* env = std::getenv("FASTGRAD_CPU_ISA");
  g_path.store(find(env, why));
  if (!why.empty()) g_error = "FASTGRAD_CPU_ISA=" + std::string(env) + ": " + why + " (or unset FASTGRAD_CPU_ISA)";
  return true;
}();

const Path& path() {
  const Path* p = g_path.load(std::memory_order_acquire);
  if (!p) {
    std::lock_guard<std::mutex> lock(g_mutex);
    throw std::runtime_error("fastgrad C++ CPU kernels: " + g_error);
  }
  return *p;
}

}  // namespace

// make_descs and total_row_cpu are scalar bookkeeping: the baseline's serve all paths.
std::vector<TensorDesc> make_descs(const std::vector<int64_t>& ptrs, const std::vector<int64_t>& dtypes,
                                   const std::vector<int64_t>& numels, const std::vector<int64_t>& layout,
                                   const std::vector<int64_t>& dims) {
  return isa_baseline::make_descs(ptrs, dtypes, numels, layout, dims);
}
void total_row_cpu(const std::vector<double>& ps, int64_t T, int ncounts, double* floats, int64_t* counts) {
  isa_baseline::total_row_cpu(ps, T, ncounts, floats, counts);
}
void grad_stats_cpu(const std::vector<TensorDesc>& descs, const std::vector<double>& ps, bool hist, int min_exp,
                    int max_exp, double* out_floats, int64_t* out_counts, int num_threads) {
  path().grad_stats(descs, ps, hist, min_exp, max_exp, out_floats, out_counts, num_threads);
}
void scale_cpu(const std::vector<TensorDesc>& descs, double coef, int num_threads) {
  path().scale(descs, coef, num_threads);
}
void clamp_cpu(const std::vector<TensorDesc>& descs, double lo, double hi, int num_threads) {
  path().clamp(descs, lo, hi, num_threads);
}

}  // namespace fastgrad

// The C interface read by fastgrad/cpu_isa.py (ctypes on this module's file).
#define FASTGRAD_EXPORT extern "C" __attribute__((visibility("default")))

// The running path's name, or "" when FASTGRAD_CPU_ISA was refused.
FASTGRAD_EXPORT const char* fastgrad_cpu_isa() {
  const fastgrad::Path* p = fastgrad::g_path.load();
  return p ? p->name : "";
}
// Why no path runs, or why the last fastgrad_cpu_isa_select failed ("" if neither).
FASTGRAD_EXPORT const char* fastgrad_cpu_isa_error() {
  std::lock_guard<std::mutex> lock(fastgrad::g_mutex);
  static thread_local std::string copy;
  copy = fastgrad::g_error;
  return copy.c_str();
}
// Comma-separated paths this build holds / this CPU runs, narrowest first.
FASTGRAD_EXPORT const char* fastgrad_cpu_isa_compiled() { return fastgrad::g_compiled.c_str(); }
FASTGRAD_EXPORT const char* fastgrad_cpu_isa_supported() { return fastgrad::g_supported.c_str(); }
// Switches to the named path ("auto": the widest that runs here). Returns 0,
// or -1 leaving the running path as it was (fastgrad_cpu_isa_error says why).
// Kernel calls already running finish on the path they started with.
FASTGRAD_EXPORT int fastgrad_cpu_isa_select(const char* name) {
  std::string why;
  const fastgrad::Path* p = fastgrad::find(name, why);
  std::lock_guard<std::mutex> lock(fastgrad::g_mutex);
  fastgrad::g_error = why;
  if (!p) return -1;
  fastgrad::g_path.store(p, std::memory_order_release);
  return 0;
}
