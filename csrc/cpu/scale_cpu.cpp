// In-place elementwise ops on gradients: x *= coef (clip by norm) and
// x = clamp(x, lo, hi) (clip by value), one read+write pass each, over the
// same chunked (tensor, chunk) work items as the statistics kernel.
//
// Arithmetic follows torch's CPU kernels: half and bfloat16 values are
// computed in float and rounded to nearest even once; the scale factor is
// applied as float for all but float64 tensors.
//
// Compiled once per instruction-set path (csrc/cpu/isa.h); elementwise, so
// every path writes the same bits.
#include "isa.h"
#if FASTGRAD_ISA_BUILD

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tensor_view.h"

FASTGRAD_ISA_TARGET_BEGIN
namespace fastgrad {
namespace FASTGRAD_ISA_NS {

namespace {

constexpr int64_t kChunk = int64_t(1) << 16;

// p[i * st] = f(p[i * st]) for i < n; the unit-stride case is its own loop,
// so that it vectorises with plain loads and stores instead of gathers.
template <typename T, typename F>
inline void update(T* __restrict p, int64_t n, int64_t st, F f) {
  if (st == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = f(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i * st] = f(p[i * st]);
  }
}

template <typename Op>
void apply_inplace(const std::vector<TensorDesc>& descs, int num_threads, Op op) {
  struct Item {
    size_t t;
    int64_t begin, end;
  };
  std::vector<Item> items;
  for (size_t t = 0; t < descs.size(); ++t)
    for (int64_t b = 0; b < descs[t].numel; b += kChunk)
      items.push_back({t, b, std::min(descs[t].numel, b + kChunk)});
  const int64_t W = int64_t(items.size());
  const int nt = std::max(1, std::min<int>(num_threads, int(std::max<int64_t>(W, 1))));
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt)
  for (int64_t w = 0; w < W; ++w) {
    const TensorDesc& d = descs[items[w].t];
    for_each_row(d, items[w].begin, items[w].end, [&](int64_t off, int64_t n, int64_t st) {
      switch (d.dtype) {
        case kF32:
          update(reinterpret_cast<float*>(d.data) + off, n, st, [op](float v) { return op(v); });
          break;
        case kF64:
          update(reinterpret_cast<double*>(d.data) + off, n, st, [op](double v) { return op(v); });
          break;
        case kBF16:
          update(reinterpret_cast<uint16_t*>(d.data) + off, n, st,
                 [op](uint16_t h) { return float_to_bf16(op(bf16_to_float(h))); });
          break;
        case kF16:
          update(reinterpret_cast<uint16_t*>(d.data) + off, n, st,
                 [op](uint16_t h) { return float_to_f16(op(f16_to_float(h))); });
          break;
      }
    });
  }
}

struct Scale {
  double c;
  float cf;
  float operator()(float v) const { return v * cf; }
  double operator()(double v) const { return v * c; }
};

struct Clamp {
  double lo, hi;
  float lof, hif;
  // Comparisons with NaN are false, so NaN passes through (as torch.clamp).
  float operator()(float v) const { return v < lof ? lof : (v > hif ? hif : v); }
  double operator()(double v) const { return v < lo ? lo : (v > hi ? hi : v); }
};

}  // namespace

void scale_cpu(const std::vector<TensorDesc>& descs, double coef, int num_threads) {
  if (coef == 1.0) return;  // min(max_norm / norm, 1) == 1: nothing to write
  apply_inplace(descs, num_threads, Scale{coef, float(coef)});
}

void clamp_cpu(const std::vector<TensorDesc>& descs, double lo, double hi, int num_threads) {
  apply_inplace(descs, num_threads, Clamp{lo, hi, float(lo), float(hi)});
}

}  // namespace FASTGRAD_ISA_NS
}  // namespace fastgrad
FASTGRAD_ISA_TARGET_END

#endif  // FASTGRAD_ISA_BUILD
