// Tensor descriptions, dtype conversions and row iteration shared by the CPU kernels.
//
// csrc/ includes no torch header: Python passes raw pointers, sizes and
// strides (see fastgrad/backends/cpu.py), so the extension builds without
// torch and one build serves every torch version.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastgrad {

// Codes shared with fastgrad/backends/cpu.py (DTYPE_CODES).
enum DType : int64_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

constexpr int kMaxDims = 12;

// One gradient. A tensor whose elements fill a dense block of memory in any
// order (contiguous, channels-last, transposed) is described as flat
// (ndim == 1, stride 1): statistics do not depend on element order, so it is
// read in memory order with no copy. Other views keep their coalesced
// sizes/strides and are walked row by row.
struct TensorDesc {
  char* data = nullptr;
  DType dtype = kF32;
  int64_t numel = 0;
  int ndim = 1;
  int64_t sizes[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {1};  // in elements

  bool flat() const { return ndim == 1 && strides[0] == 1; }
  int64_t itemsize() const { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }
};

// Builds descriptors from the parallel arrays the Python side passes.
// dims holds, for each non-flat tensor (layout[t] >= 0 is its offset):
// ndim, sizes[ndim], strides[ndim].
std::vector<TensorDesc> make_descs(const std::vector<int64_t>& ptrs, const std::vector<int64_t>& dtypes,
                                   const std::vector<int64_t>& numels, const std::vector<int64_t>& layout,
                                   const std::vector<int64_t>& dims);

// Calls f(first_element_offset, count, element_stride) for each run of the
// logical elements [begin, end) that lies on one innermost row.
template <typename F>
inline void for_each_row(const TensorDesc& d, int64_t begin, int64_t end, F&& f) {
  if (d.ndim == 1) {
    f(begin * d.strides[0], end - begin, d.strides[0]);
    return;
  }
  const int last = d.ndim - 1;
  int64_t idx[kMaxDims];
  int64_t rem = begin, offset = 0;
  for (int k = last; k >= 0; --k) {
    idx[k] = rem % d.sizes[k];
    rem /= d.sizes[k];
    offset += idx[k] * d.strides[k];
  }
  int64_t i = begin;
  while (i < end) {
    const int64_t n = std::min(end - i, d.sizes[last] - idx[last]);
    f(offset, n, d.strides[last]);
    i += n;
    offset += n * d.strides[last];
    idx[last] += n;
    for (int k = last; k > 0 && idx[k] == d.sizes[k]; --k) {  // carry into outer dims
      offset -= idx[k] * d.strides[k];
      idx[k] = 0;
      ++idx[k - 1];
      offset += d.strides[k - 1];
    }
  }
}

// ---- scalar conversions (branch-free so that loops over them vectorise) ----

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// IEEE half -> float, exact, subnormals included. The subnormal branch uses an
// int->float conversion rather than a float multiply of a float denormal, so
// it stays right when the thread flushes denormals (torch.set_flush_denormal).
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  const uint32_t special = 0x7f800000u | ((em & 0x3ffu) << 13);  // Inf / NaN
  const float sub = float(int32_t(em)) * 5.9604644775390625e-08f;  // em * 2^-24
  const uint32_t mag = em >= 0x7c00u ? special : (em < 0x400u ? float_to_bits(sub) : normal);
  return bits_to_float(sign | mag);
}

// float -> bfloat16, round to nearest even; NaN becomes torch's canonical 0x7fc0.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// float -> IEEE half, round to nearest even, overflow to Inf, NaN kept (as
// torch: sign | 0x7e00). Branch-free (all three cases computed, one kept), so
// that loops over it vectorise.
inline uint16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  // |f| >= 65536, Inf or NaN
  const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // a half subnormal or zero: adding 0.5 puts the half mantissa in the low
  // float bits, rounded by the FPU (RNE); the sum is a normal float, so this
  // holds also when the thread flushes denormals
  const float magic = bits_to_float(126u << 23);
  const uint32_t sub = float_to_bits(bits_to_float(u) + magic) - float_to_bits(magic);
  // a normal half: rebias, round to nearest even on the dropped 13 bits
  const uint32_t normal = std::min((u + (uint32_t(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13, 0x7c00u);
  const uint32_t o = u >= (143u << 23) ? big : (u < (113u << 23) ? sub : normal);
  return uint16_t(o | sign);
}

}  // namespace fastgrad
