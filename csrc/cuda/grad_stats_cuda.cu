// Fused multi-tensor gradient statistics, scale and clamp on CUDA.
//
// Math (fastgrad/reference.py) and output layout (fastgrad/spec.py) are the
// same as the CPU kernel's (csrc/cpu/grad_stats_cpu.cpp). No torch header:
// kernels take raw device pointers and a stream, so nvcc alone builds them.
//
// Grid: one block per work item. A work item is a chunk of kChunk elements
// of one tensor (chunks never cross tensors); the item table (tensor id,
// first element) is built once per parameter set by the Python side and
// cached on the device, so a call launches a fixed number of kernels
// whatever the number of tensors:
//   1. cudaMemsetAsync of the int64 counts table,
//   2. stats_kernel: each block reads its chunk once and writes its own
//      partial slot — per requested p a pair (s, m) with norm^p = m^p * s,
//      then max|x| — and adds its NaN/Inf/zero counts and histogram to the
//      tensor's row with integer atomics (exact and order-free),
//   3. combine_kernel: one warp per tensor folds that tensor's partials in a
//      fixed order (lane-strided, then a shuffle tree).
// No floating-point atomics anywhere: results are bitwise reproducible.
//
// Accumulation is in double, so float32 values up to 3.4e38 cannot
// overflow a sum of squares; only float64 input, and p other than 1 and 2,
// take a second (L2-resident) pass over the chunk scaled by 2^-k near the
// chunk's max|x|.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastgrad_cuda {

enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };  // fastgrad/backends/cpu.py codes

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int kNumCounts = 4;
constexpr int kMaxNorms = 8;
constexpr int kMaxSlots = 256 + 4;  // bins (<= 256 for exponents -126..128) + zero, NaN, +Inf, -Inf

struct StatsArgs {
  const int64_t* ptrs;         // [T] data pointers
  const int32_t* dtypes;       // [T]
  const int64_t* numels;       // [T]
  const int32_t* item_tensor;  // [W]
  const int64_t* item_begin;   // [W]
  double* partials;            // [W, 2 * np + 1]
  unsigned long long* counts;  // [T, ncounts], zeroed
  double ps[kMaxNorms];
  int np, min_exp, num_bins, ncounts;
  bool hist;
};

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int32_t dt) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

template <typename C>
__device__ __forceinline__ C load(const void* p, int64_t i, int32_t dt);
template <>
__device__ __forceinline__ float load<float>(const void* p, int64_t i, int32_t dt) {
  return load_as_float(p, i, dt);
}
template <>
__device__ __forceinline__ double load<double>(const void* p, int64_t i, int32_t) {
  return static_cast<const double*>(p)[i];
}

// Histogram slot of one value from its exponent bits (see HistogramSpec):
// bins 0..num_bins-1, then zero, NaN, +Inf, -Inf.
__device__ __forceinline__ int slot_of(float v, int min_exp, int num_bins) {
  const uint32_t u = __float_as_uint(v);
  const int e = int((u >> 23) & 0xffu);
  const bool mant = (u & 0x7fffffu) != 0u;
  if (e == 0) return mant ? 0 : num_bins;  // subnormal -> underflow bin (min_exp >= -126)
  if (e == 0xff) return mant ? num_bins + 1 : ((u >> 31) ? num_bins + 3 : num_bins + 2);
  return min(max(e - 127 - min_exp + 1, 0), num_bins - 1);
}
__device__ __forceinline__ int slot_of(double v, int min_exp, int num_bins) {
  const uint64_t u = uint64_t(__double_as_longlong(v));
  const int e = int((u >> 52) & 0x7ffu);
  const bool mant = (u & ((uint64_t(1) << 52) - 1)) != 0u;
  if (e == 0) return mant ? 0 : num_bins;
  if (e == 0x7ff) return mant ? num_bins + 1 : ((u >> 63) ? num_bins + 3 : num_bins + 2);
  return min(max(e - 1023 - min_exp + 1, 0), num_bins - 1);
}

// Fixed-order block reductions (butterfly within warps, then warp 0 over the
// per-warp values in index order).
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <bool kMax>
__device__ double block_reduce(double v, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : 0.0;
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) scratch[kWarps] = v;
  }
  __syncthreads();
  return scratch[kWarps];
}

template <typename C>
__device__ void stats_chunk(const StatsArgs& a, int64_t w, int t, const void* p, int32_t dt, int64_t begin,
                            int64_t end) {
  __shared__ unsigned int hist[kWarps][kMaxSlots];  // one private histogram per warp
  __shared__ double scratch[kWarps + 1];
  const int nslots = a.num_bins + 4;
  const int warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < kWarps * kMaxSlots; i += kThreads) (&hist[0][0])[i] = 0u;
  __syncthreads();

  double s1 = 0.0, s2 = 0.0, mx = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const C v = load<C>(p, i, dt);
    const double x = fabs(double(v));
    s1 += x;
    s2 += x * x;
    mx = x > mx ? x : mx;  // NaN compares false: max over non-NaN values
    atomicAdd(&hist[warp][slot_of(v, a.min_exp, a.num_bins)], 1u);
  }
  s1 = block_reduce<false>(s1, scratch);
  s2 = block_reduce<false>(s2, scratch);
  mx = block_reduce<true>(mx, scratch);

  // Integer counts: sum the warp histograms, one global atomic per non-zero slot.
  unsigned long long* crow = a.counts + int64_t(t) * a.ncounts;
  __shared__ unsigned long long special[kNumCounts];
  for (int s = threadIdx.x; s < nslots; s += kThreads) {
    unsigned long long c = 0;
    for (int k = 0; k < kWarps; ++k) c += hist[k][s];
    int col;
    if (s < a.num_bins) col = a.hist ? kNumCounts + s : -1;
    else col = s == a.num_bins ? 3 : s - a.num_bins - 1;  // zero -> 3, NaN -> 0, +Inf -> 1, -Inf -> 2
    if (s >= a.num_bins) special[col] = c;
    if (col >= 0 && c) atomicAdd(crow + col, c);
  }
  __syncthreads();
  const bool has_nan = special[0] > 0, has_inf = special[1] + special[2] > 0;

  double* out = a.partials + w * (2 * a.np + 1);
  for (int j = 0; j < a.np; ++j) {
    const double pj = a.ps[j];
    double s = pj == 1.0 ? s1 : s2, m = 1.0;
    const bool special_chunk = has_nan || has_inf || mx == 0.0;
    const bool fast = (pj == 1.0 || pj == 2.0) &&
                      (sizeof(C) == 4 || (isfinite(s) && !(pj == 2.0 && mx < 0x1p-500)));
    if (!special_chunk && !fast) {  // block-uniform branch: every value here came from a reduction
      int k;
      frexp(mx, &k);
      const double inv = ldexp(1.0, -k);
      double acc = 0.0;
      for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
        const double x = fabs(double(load<C>(p, i, dt))) * inv;
        acc += pj == 2.0 ? x * x : (pj == 1.0 ? x : pow(x, pj));
      }
      s = block_reduce<false>(acc, scratch);
      m = ldexp(1.0, k);
    }
    if (threadIdx.x == 0) {
      if (special_chunk) {
        s = has_nan ? nan("") : (has_inf ? HUGE_VAL : 0.0);
        m = (has_nan || has_inf) ? 1.0 : 0.0;
      }
      out[2 * j] = s;
      out[2 * j + 1] = m;
    }
  }
  if (threadIdx.x == 0) out[2 * a.np] = mx;
}

__global__ void __launch_bounds__(kThreads) stats_kernel(StatsArgs a) {
  const int64_t w = blockIdx.x;
  const int t = a.item_tensor[w];
  const int64_t begin = a.item_begin[w];
  const int64_t end = min(begin + kChunk, a.numels[t]);
  const void* p = reinterpret_cast<const void*>(a.ptrs[t]);
  const int32_t dt = a.dtypes[t];
  if (dt == kF64) stats_chunk<double>(a, w, t, p, dt, begin, end);
  else stats_chunk<float>(a, w, t, p, dt, begin, end);
}

// One warp per tensor: norm = M * (sum_c s_c (m_c/M)^p)^(1/p), M = max m_c over
// chunks with s_c > 0; NaN if any chunk is NaN, Inf if any is Inf.
struct NormList {
  double ps[kMaxNorms];
  int np;
};

__global__ void combine_kernel(const double* partials, const int64_t* first_item, int T, NormList norms,
                               double* out) {
  const int np = norms.np;
  const int t = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (t >= T) return;
  const int64_t w0 = first_item[t], w1 = first_item[t + 1];
  const int stride = 2 * np + 1;
  double* o = out + int64_t(t) * (np + 1);
  double mx = 0.0;
  for (int64_t w = w0 + lane; w < w1; w += 32) mx = fmax(mx, partials[w * stride + 2 * np]);
  mx = warp_max(mx);
  if (lane == 0) o[np] = mx;
  for (int j = 0; j < np; ++j) {
    const double p = norms.ps[j];
    double M = 0.0, bad_nan = 0.0, bad_inf = 0.0;
    for (int64_t w = w0 + lane; w < w1; w += 32) {
      const double s = partials[w * stride + 2 * j], m = partials[w * stride + 2 * j + 1];
      bad_nan += isnan(s) ? 1.0 : 0.0;
      bad_inf += isinf(s) ? 1.0 : 0.0;
      if (s > 0.0 && m > M) M = m;
    }
    M = warp_max(M);
    bad_nan = warp_sum(bad_nan);
    bad_inf = warp_sum(bad_inf);
    double S = 0.0;
    if (M > 0.0)
      for (int64_t w = w0 + lane; w < w1; w += 32) {
        const double s = partials[w * stride + 2 * j], m = partials[w * stride + 2 * j + 1];
        if (s > 0.0) S += s * (m == M ? 1.0 : pow(m / M, p));
      }
    S = warp_sum(S);
    if (lane == 0)
      o[j] = bad_nan > 0 ? nan("") : (bad_inf > 0 ? HUGE_VAL : (M == 0.0 ? 0.0 : M * pow(S, 1.0 / p)));
  }
}

// ---- in-place elementwise ops over the same item table ----

template <typename Op>
__device__ void apply_chunk(void* p, int32_t dt, int64_t begin, int64_t end, Op op) {
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    switch (dt) {
      case kF32: { float* q = static_cast<float*>(p); q[i] = op(q[i]); break; }
      case kF64: { double* q = static_cast<double*>(p); q[i] = op(q[i]); break; }
      case kBF16: {
        __nv_bfloat16* q = static_cast<__nv_bfloat16*>(p);
        q[i] = __float2bfloat16_rn(op(__bfloat162float(q[i])));
        break;
      }
      default: { __half* q = static_cast<__half*>(p); q[i] = __float2half_rn(op(__half2float(q[i]))); }
    }
  }
}

struct ScaleOp {
  double c;
  __device__ float operator()(float v) const { return v * float(c); }
  __device__ double operator()(double v) const { return v * c; }
};
struct ClampOp {
  double lo, hi;
  // NaN compares false and passes through, as torch.clamp.
  __device__ float operator()(float v) const { return v < float(lo) ? float(lo) : (v > float(hi) ? float(hi) : v); }
  __device__ double operator()(double v) const { return v < lo ? lo : (v > hi ? hi : v); }
};

__global__ void __launch_bounds__(kThreads) scale_kernel(const int64_t* ptrs, const int32_t* dtypes,
                                                         const int64_t* numels, const int32_t* item_tensor,
                                                         const int64_t* item_begin, const double* coef) {
  const double c = *coef;
  if (c == 1.0) return;  // min(max_norm / norm, 1) == 1: nothing to write, decided on the device
  const int t = item_tensor[blockIdx.x];
  const int64_t b = item_begin[blockIdx.x];
  apply_chunk(reinterpret_cast<void*>(ptrs[t]), dtypes[t], b, min(b + kChunk, numels[t]), ScaleOp{c});
}

__global__ void __launch_bounds__(kThreads) clamp_kernel(const int64_t* ptrs, const int32_t* dtypes,
                                                         const int64_t* numels, const int32_t* item_tensor,
                                                         const int64_t* item_begin, double lo, double hi) {
  const int t = item_tensor[blockIdx.x];
  const int64_t b = item_begin[blockIdx.x];
  apply_chunk(reinterpret_cast<void*>(ptrs[t]), dtypes[t], b, min(b + kChunk, numels[t]), ClampOp{lo, hi});
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fastgrad CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// Grid dimension x holds up to 2^31-1 blocks: 2^31 chunks of 2^16 elements is far beyond any tensor.
void launch_stats(int64_t ptrs, int64_t dtypes, int64_t numels, int64_t item_tensor, int64_t item_begin,
                  int64_t first_item, int64_t num_items, int64_t num_tensors, const std::vector<double>& ps,
                  bool hist, int min_exp, int max_exp, int64_t partials, int64_t out_floats,
                  int64_t out_counts, int64_t stream_handle) {
  if (ps.size() > size_t(kMaxNorms)) throw std::invalid_argument("fastgrad CUDA: at most 8 norm types");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  StatsArgs a{};
  a.ptrs = reinterpret_cast<const int64_t*>(ptrs);
  a.dtypes = reinterpret_cast<const int32_t*>(dtypes);
  a.numels = reinterpret_cast<const int64_t*>(numels);
  a.item_tensor = reinterpret_cast<const int32_t*>(item_tensor);
  a.item_begin = reinterpret_cast<const int64_t*>(item_begin);
  a.partials = reinterpret_cast<double*>(partials);
  a.counts = reinterpret_cast<unsigned long long*>(out_counts);
  NormList norms{};
  for (size_t j = 0; j < ps.size(); ++j) a.ps[j] = norms.ps[j] = ps[j];
  a.np = norms.np = int(ps.size());
  a.min_exp = min_exp;
  a.num_bins = max_exp - min_exp + 2;
  a.ncounts = kNumCounts + (hist ? a.num_bins : 0);
  a.hist = hist;
  check(cudaMemsetAsync(a.counts, 0, sizeof(unsigned long long) * num_tensors * a.ncounts, stream), "memset");
  if (num_items > 0) {
    stats_kernel<<<unsigned(num_items), kThreads, 0, stream>>>(a);
    check(cudaGetLastError(), "stats_kernel");
  }
  if (num_tensors > 0) {
    const int per_block = 8;  // warps (= tensors) per block
    combine_kernel<<<unsigned((num_tensors + per_block - 1) / per_block), 32 * per_block, 0, stream>>>(
        a.partials, reinterpret_cast<const int64_t*>(first_item), int(num_tensors), norms,
        reinterpret_cast<double*>(out_floats));
    check(cudaGetLastError(), "combine_kernel");
  }
}

void launch_scale(int64_t ptrs, int64_t dtypes, int64_t numels, int64_t item_tensor, int64_t item_begin,
                  int64_t num_items, int64_t coef, int64_t stream_handle) {
  if (num_items == 0) return;
  scale_kernel<<<unsigned(num_items), kThreads, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      reinterpret_cast<const int64_t*>(ptrs), reinterpret_cast<const int32_t*>(dtypes),
      reinterpret_cast<const int64_t*>(numels), reinterpret_cast<const int32_t*>(item_tensor),
      reinterpret_cast<const int64_t*>(item_begin), reinterpret_cast<const double*>(coef));
  check(cudaGetLastError(), "scale_kernel");
}

void launch_clamp(int64_t ptrs, int64_t dtypes, int64_t numels, int64_t item_tensor, int64_t item_begin,
                  int64_t num_items, double lo, double hi, int64_t stream_handle) {
  if (num_items == 0) return;
  clamp_kernel<<<unsigned(num_items), kThreads, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      reinterpret_cast<const int64_t*>(ptrs), reinterpret_cast<const int32_t*>(dtypes),
      reinterpret_cast<const int64_t*>(numels), reinterpret_cast<const int32_t*>(item_tensor),
      reinterpret_cast<const int64_t*>(item_begin), lo, hi);
  check(cudaGetLastError(), "clamp_kernel");
}

int64_t chunk_size() { return kChunk; }

}  // namespace fastgrad_cuda
