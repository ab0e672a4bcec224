// Driver of bench/cpu_isa_variants.sh: times the statistics kernel
// (grad_stats_cpu: L2 norm, max|x|, counts, 82-bin histogram) of several
// compiled variants of csrc/cpu/grad_stats_cpu.cpp, each in its own
// namespace v_<name>, round-robin in one process on the same data, and checks
// their tables are bitwise equal. Time is the calling thread's CPU time (one
// kernel thread by default), so that load from other processes inflates it
// less than wall time. VARIANT_DECLS / VARIANT_LIST are filled in by the script.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "tensor_view.h"

namespace fastgrad {
#define DECL(NS)                                                                                              \
  namespace NS {                                                                                              \
  void grad_stats_cpu(const std::vector<TensorDesc>& descs, const std::vector<double>& ps, bool hist,       \
                      int min_exp, int max_exp, double* out_floats, int64_t* out_counts, int num_threads);   \
  }
VARIANT_DECLS
}  // namespace fastgrad
using namespace fastgrad;
typedef void (*Fn)(const std::vector<TensorDesc>&, const std::vector<double>&, bool, int, int, double*, int64_t*,
                   int);
struct Variant {
  const char* name;
  Fn fn;
};
const Variant kVariants[] = {VARIANT_LIST};
const int kNum = int(sizeof(kVariants) / sizeof(kVariants[0]));

double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 9;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  struct Set {
    std::string name;
    std::vector<int64_t> sizes;
  };
  std::vector<Set> sets;
  {  // bench/param_sets.py's sets
    const int64_t d = 768;
    Set g{"gpt2-124M (148 tensors)", {50257 * d, 1024 * d}};
    for (int i = 0; i < 12; ++i)
      for (int64_t n : {d, d, d * 3 * d, 3 * d, d * d, d, d, d, d * 4 * d, 4 * d, 4 * d * d, d}) g.sizes.push_back(n);
    g.sizes.push_back(d);
    g.sizes.push_back(d);
    sets.push_back(g);
    Set s{"10,000 small (97..1000 elts)", {}};
    for (int i = 0; i < 10000; ++i) s.sizes.push_back(97 + (i * 37) % 904);
    sets.push_back(s);
    sets.push_back({"one 1e8 tensor", {100000000}});
  }
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1e-3f);  // N(0, 1e-3) as bench/param_sets.py
  std::vector<float> pool(1 << 20);
  for (float& v : pool) v = normal(rng);
  std::printf("| set | dtype |");
  for (const Variant& v : kVariants) std::printf(" %s ms |", v.name);
  for (int k = 1; k < kNum; ++k) std::printf(" %s: speed vs %s |", kVariants[k].name, kVariants[0].name);
  std::printf("\n|---|---|");
  for (int k = 0; k < 2 * kNum - 1; ++k) std::printf("---|");
  std::printf("\n");
  for (const Set& set : sets) {
    for (const DType dt : {kF32, kBF16}) {
      int64_t total = 0;
      for (int64_t n : set.sizes) total += n;
      const size_t isz = dt == kF32 ? 4 : 2;
      std::vector<char> buf(size_t(total) * isz);
      for (int64_t i = 0; i < total; ++i) {
        const float v = pool[size_t(i * 7919) & (pool.size() - 1)];
        if (dt == kF32) {
          std::memcpy(buf.data() + 4 * i, &v, 4);
        } else {
          const uint16_t h = float_to_bf16(v);
          std::memcpy(buf.data() + 2 * i, &h, 2);
        }
      }
      std::vector<TensorDesc> descs;
      int64_t off = 0;
      for (int64_t n : set.sizes) {
        TensorDesc t;
        t.data = buf.data() + off * int64_t(isz);
        t.dtype = dt;
        t.numel = n;
        t.sizes[0] = n;
        t.strides[0] = 1;
        descs.push_back(t);
        off += n;
      }
      const std::vector<double> ps{2.0};
      const int min_exp = -64, max_exp = 16, ncounts = 4 + (max_exp - min_exp + 2);
      const size_t T = descs.size();
      std::vector<std::vector<double>> floats(kNum, std::vector<double>(T * 2));
      std::vector<std::vector<int64_t>> counts(kNum, std::vector<int64_t>(T * ncounts));
      std::vector<double> best(kNum, 1e30);
      for (int r = 0; r < reps; ++r) {
        for (int k = 0; k < kNum; ++k) {
          const double t0 = cpu_seconds();
          kVariants[k].fn(descs, ps, true, min_exp, max_exp, floats[k].data(), counts[k].data(), threads);
          best[k] = std::min(best[k], cpu_seconds() - t0);
        }
      }
      for (int k = 1; k < kNum; ++k) {
        if (std::memcmp(floats[k].data(), floats[0].data(), floats[0].size() * 8) || counts[k] != counts[0]) {
          std::printf("tables of %s differ from %s's\n", kVariants[k].name, kVariants[0].name);
          return 1;
        }
      }
      std::printf("| %s | %s |", set.name.c_str(), dt == kF32 ? "float32" : "bfloat16");
      for (int k = 0; k < kNum; ++k) std::printf(" %.2f |", best[k] * 1e3);
      for (int k = 1; k < kNum; ++k) std::printf(" %.2f |", best[0] / best[k]);
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  return 0;
}
