// Fused multi-tensor gradient statistics, scale and clamp on CUDA.
//
// Math (fastgrad/reference.py) and output layout (fastgrad/spec.py) are the
// same as the CPU kernel's (csrc/cpu/grad_stats_cpu.cpp). No torch header:
// kernels take raw device pointers and a stream, so nvcc alone builds them.
//
// Grid: one block per work item. A work item is a chunk of kChunk elements
// of one tensor (chunks never cross tensors); the item table (tensor id,
// first element) is built once per parameter set by the Python side and
// cached on the device (fastgrad/backends/chunk_plan.py; item_range[t] holds
// tensor t's first and past-the-end item), so a call launches a fixed number of kernels
// whatever the number of tensors:
//   1. cudaMemsetAsync of the int64 counts table,
//   2. stats_kernel: each block reads its chunk once (16-byte vector loads,
//      after a scalar prologue up to the first 16-byte boundary when the
//      chunk's base is misaligned) and writes its own partial slot — per
//      requested p a pair (s, m) with norm^p = m^p * s, then max|x| — and
//      adds its NaN/Inf/zero counts and histogram to the tensor's row with
//      integer atomics (exact and order-free). Inside the block every thread
//      counts into its own byte counters in shared memory (no atomics, no
//      bank conflicts), summed once at the end of the chunk,
//   3. combine_kernel: one warp per tensor folds that tensor's partials in a
//      fixed order (lane-strided, then a shuffle tree); the block that
//      finishes last (a ticket counter zeroed by the memset) then combines
//      the per-tensor rows into the total row T, in row order. The total's
//      counts are added by stats_kernel alongside the tensor's own.
// No floating-point atomics anywhere: results are bitwise reproducible.
//
// Accumulation is in double, so float32 values up to 3.4e38 cannot
// overflow a sum of squares. 16-bit inputs first sum the 8 values of a
// vector in float (their squares are exact in float: 7 roundings, < 5e-7),
// as the CPU kernel does. Float64 input, p other than 1 and 2, and bfloat16
// chunks whose squares could leave float's range take a second (L2-resident)
// pass over the chunk scaled by 2^-k near the chunk's max|x|.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <mutex>
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
// Byte-counter rows: zero, NaN, +Inf, -Inf, then one per histogram bin (<= 256
// for exponents -126..128) or a single row for all other values.
constexpr int kRowZero = 0, kRowNan = 1, kRowPosInf = 2, kRowNegInf = 3, kFirstBinRow = 4;
static_assert(kChunk / kThreads + 16 <= 255, "a thread's byte counters could overflow");

struct StatsArgs {
  const int64_t* ptrs;         // [T] data pointers
  const int32_t* dtypes;       // [T]
  const int64_t* numels;       // [T]
  const int32_t* item_tensor;  // [W]
  const int64_t* item_begin;   // [W]
  double* partials;            // [W, 2 * np + 1]
  unsigned long long* counts;  // [T + 1, ncounts] (row T: the total), zeroed
  int64_t num_tensors;
  double ps[kMaxNorms];
  int np, min_exp, num_bins, ncounts;
  bool hist;
};

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }

// The byte-counter row of one value (see kRowZero): nb = number of histogram
// bins, 0 without a histogram.
__device__ __forceinline__ int row_of(float v, int min_exp, int nb) {
  const uint32_t u = __float_as_uint(v);
  const int e = int((u >> 23) & 0xffu);
  const bool mant = (u & 0x7fffffu) != 0u;
  if (e == 0xff) return mant ? kRowNan : ((u >> 31) ? kRowNegInf : kRowPosInf);
  if (e == 0 && !mant) return kRowZero;
  if (nb == 0) return kFirstBinRow;
  return kFirstBinRow + (e == 0 ? 0 : min(max(e - 127 - min_exp + 1, 0), nb - 1));  // subnormal: underflow bin
}
__device__ __forceinline__ int row_of(double v, int min_exp, int nb) {
  const uint64_t u = uint64_t(__double_as_longlong(v));
  const int e = int((u >> 52) & 0x7ffu);
  const bool mant = (u & ((uint64_t(1) << 52) - 1)) != 0u;
  if (e == 0x7ff) return mant ? kRowNan : ((u >> 63) ? kRowNegInf : kRowPosInf);
  if (e == 0 && !mant) return kRowZero;
  if (nb == 0) return kFirstBinRow;
  return kFirstBinRow + (e == 0 ? 0 : min(max(e - 1023 - min_exp + 1, 0), nb - 1));
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
template <bool kMax, int kNumWarps = kWarps>
__device__ double block_reduce(double v, double* scratch) {  // scratch: kNumWarps + 1 doubles
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kNumWarps ? scratch[lane] : 0.0;
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) scratch[kNumWarps] = v;
  }
  __syncthreads();
  return scratch[kNumWarps];
}

// Values before the first 16-byte boundary at or after p (at most n; fewer than
// 16 / sizeof(T)), or -1 when p is not even aligned to its element size.
template <typename T>
__host__ __device__ __forceinline__ int64_t head_to_boundary(const T* p, int64_t n) {
  const unsigned mis = unsigned(reinterpret_cast<uintptr_t>(p) & 15u);
  if (mis % sizeof(T) != 0) return -1;
  const int64_t head = int64_t(((16u - mis) & 15u) / sizeof(T));
  return head < n ? head : n;
}

// One thread's share of a chunk: sums, max and byte counts. T: the stored
// type; C: float, or double for float64.
template <typename T>
struct ChunkPass {
  using C = decltype(to_compute(T()));
  static constexpr bool kExactSquares = sizeof(T) == 2;  // 16-bit: squares exact in float
  double s1 = 0.0, s2 = 0.0;
  C mx = 0;
  float q1 = 0.f, q2 = 0.f;  // float sums of one vector's 16-bit values
  unsigned char* counts;     // this thread's byte counters: counts[row << 9]
  int min_exp, nb;

  __device__ __forceinline__ void value(T stored) {
    const C x = to_compute(stored);
    const C a = x < C(0) ? -x : x;  // NaN stays NaN
    if constexpr (kExactSquares) {
      q1 += a;
      q2 = fmaf(a, a, q2);
    } else {
      const double d = double(a);
      s1 += d;
      s2 = fma(d, d, s2);
    }
    mx = a > mx ? a : mx;  // NaN compares false: max over non-NaN values
    counts[row_of(x, min_exp, nb) << 9] += 1;
  }
  __device__ __forceinline__ void end_vector() {
    if constexpr (kExactSquares) {
      s1 += q1;
      s2 += q2;
      q1 = q2 = 0.f;
    }
  }

  // A chunk's base may sit anywhere (a gradient view into a DDP bucket or an
  // FSDP flat buffer at an odd offset): the first `head` values up to the
  // 16-byte boundary are read one per thread, then 16-byte vectors, then the
  // tail. The split is block-uniform (one chunk, one pointer).
  __device__ void run(const T* p, int64_t n) {
    constexpr int V = 16 / int(sizeof(T));
    const int64_t head = head_to_boundary(p, n);
    if (head < 0) {  // not even element-aligned: values one by one
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        value(p[i]);
        end_vector();
      }
      return;
    }
    if (threadIdx.x < head) {
      value(p[threadIdx.x]);
      end_vector();
    }
    const T* body = p + head;
    const int64_t nvec = (n - head) / V;
    const uint4* pv = reinterpret_cast<const uint4*>(body);
    // Two 16-byte loads in flight per thread before either is processed.
    for (int64_t k = threadIdx.x; k < nvec; k += 2 * kThreads) {
      const bool second = k + kThreads < nvec;
      uint4 raw[2];
      raw[0] = __ldg(pv + k);
      if (second) raw[1] = __ldg(pv + k + kThreads);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && !second) break;
        const T* vals = reinterpret_cast<const T*>(&raw[h]);
#pragma unroll
        for (int j = 0; j < V; ++j) value(vals[j]);
        end_vector();
      }
    }
    for (int64_t i = head + nvec * V + threadIdx.x; i < n; i += kThreads) {
      value(p[i]);
      end_vector();
    }
  }
};

// scratch: kWarps + 1 doubles, special: kNumCounts counts, both shared.
template <typename T>
__device__ void stats_chunk(const StatsArgs& a, int64_t w, int t, const T* p, int64_t n, double* scratch,
                            unsigned long long* special) {
  extern __shared__ uint32_t counter_words[];  // [rows][kThreads / 4] words of byte counters
  const int nb = a.hist ? a.num_bins : 0;
  const int rows = kFirstBinRow + (a.hist ? a.num_bins : 1);
  for (int i = threadIdx.x; i < rows * (kThreads / 4); i += kThreads) counter_words[i] = 0u;
  __syncthreads();

  // Thread tid owns byte tid / 128 of word tid % 128 of each row: a warp's 32
  // threads touch 32 different banks whatever rows their values fall in.
  ChunkPass<T> cp;
  cp.counts = reinterpret_cast<unsigned char*>(counter_words) + (((threadIdx.x & 127) << 2) | (threadIdx.x >> 7));
  cp.min_exp = a.min_exp;
  cp.nb = nb;
  cp.run(p, n);
  const double s1 = block_reduce<false>(cp.s1, scratch);
  const double s2 = block_reduce<false>(cp.s2, scratch);
  const double mx = block_reduce<true>(double(cp.mx), scratch);  // (block_reduce syncs: counters complete)

  // Each warp sums whole rows (4 counter bytes per word, dp4a), one global atomic per non-zero row.
  unsigned long long* crow = a.counts + int64_t(t) * a.ncounts;
  unsigned long long* total_row = a.counts + a.num_tensors * a.ncounts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < rows; r += kWarps) {
    unsigned int c = 0;  // unsigned dp4a: counter bytes reach 130 (head + 128 vector values + tail)
    for (int k = lane; k < kThreads / 4; k += 32) c = __dp4a(counter_words[r * (kThreads / 4) + k], 0x01010101u, c);
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
    if (lane == 0) {
      // columns (fastgrad/spec.py): NaN 0, +Inf 1, -Inf 2, zero 3, bins from 4
      const int col = r == kRowZero ? 3 : r == kRowNan ? 0 : r == kRowPosInf ? 1 : r == kRowNegInf ? 2
                                                                                  : (a.hist ? kNumCounts + r - kFirstBinRow : -1);
      if (r < kFirstBinRow) special[col] = (unsigned long long)c;
      if (col >= 0 && c) {
        atomicAdd(crow + col, (unsigned long long)c);
        atomicAdd(total_row + col, (unsigned long long)c);
      }
    }
  }
  __syncthreads();
  const bool has_nan = special[0] > 0, has_inf = special[1] + special[2] > 0;

  double* out = a.partials + w * (2 * a.np + 1);
  // bfloat16 squares summed in float overflow from |x| >= 2^62 and lose bits below 2^-63.
  const bool float_range = sizeof(T) != 2 || (mx < 0x1p62 && (mx >= 0x1p-40 || mx == 0.0));
  for (int j = 0; j < a.np; ++j) {
    const double pj = a.ps[j];
    double s = pj == 1.0 ? s1 : s2, m = 1.0;
    const bool special_chunk = has_nan || has_inf || mx == 0.0;
    const bool fast = (pj == 1.0 || pj == 2.0) && float_range &&
                      (sizeof(T) < 8 || (isfinite(s) && !(pj == 2.0 && mx < 0x1p-500)));
    if (!special_chunk && !fast) {  // block-uniform branch: every value here came from a reduction
      int k;
      frexp(mx, &k);
      k = min(max(k, -1021), 1023);  // 2^-k and 2^k finite also for subnormal or >= 2^1023 maxima
      const double inv = ldexp(1.0, -k);
      double acc = 0.0;
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const double x = fabs(double(to_compute(p[i]))) * inv;
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
  const int64_t n = min(begin + kChunk, a.numels[t]) - begin;
  const char* base = reinterpret_cast<const char*>(a.ptrs[t]);
  // Declared here, not in the four stats_chunk instances, so that the static
  // shared memory is counted once.
  __shared__ double scratch[kWarps + 1];
  __shared__ unsigned long long special[kNumCounts];
  switch (a.dtypes[t]) {  // block-uniform
    case kF32: stats_chunk(a, w, t, reinterpret_cast<const float*>(base) + begin, n, scratch, special); break;
    case kF64: stats_chunk(a, w, t, reinterpret_cast<const double*>(base) + begin, n, scratch, special); break;
    case kBF16:
      stats_chunk(a, w, t, reinterpret_cast<const __nv_bfloat16*>(base) + begin, n, scratch, special);
      break;
    default: stats_chunk(a, w, t, reinterpret_cast<const __half*>(base) + begin, n, scratch, special);
  }
}

// One warp per tensor: norm = M * (sum_c s_c (m_c/M)^p)^(1/p), M = max m_c over
// chunks with s_c > 0; NaN if any chunk is NaN, Inf if any is Inf.
struct NormList {
  double ps[kMaxNorms];
  int np;
};

constexpr int kCombineWarps = 8;  // warps (= tensors) per combine block

// Row T = the total over rows [0, T) of `out`, with fastgrad/aggregate.py's
// math (norm = M * (sum_t (n_t / M)^p)^(1/p), M = max n_t, NaN if any row is
// NaN, else Inf if any is; max of max|x|) in a fixed order of its own (the
// last bits may differ from torch.sum's). Whole block.
__device__ void total_row(const double* out, int T, const NormList& norms, double* scratch) {
  const int np = norms.np;
  const int64_t nf = np + 1;
  double* o = const_cast<double*>(out) + int64_t(T) * nf;
  double mx = 0.0;
  for (int t = threadIdx.x; t < T; t += blockDim.x) mx = fmax(mx, __ldcg(out + t * nf + np));
  mx = block_reduce<true, kCombineWarps>(mx, scratch);
  if (threadIdx.x == 0) o[np] = mx;
  for (int j = 0; j < np; ++j) {
    const double p = norms.ps[j];
    double M = 0.0, n_nan = 0.0, n_inf = 0.0;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
      const double n = __ldcg(out + t * nf + j);
      n_nan += isnan(n) ? 1.0 : 0.0;
      n_inf += isinf(n) ? 1.0 : 0.0;
      M = n > M ? n : M;
    }
    M = block_reduce<true, kCombineWarps>(M, scratch);
    n_nan = block_reduce<false, kCombineWarps>(n_nan, scratch);
    n_inf = block_reduce<false, kCombineWarps>(n_inf, scratch);
    const bool finite = n_nan == 0.0 && n_inf == 0.0 && M > 0.0;  // block-uniform
    double S = 0.0;
    if (finite)
      for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const double r = __ldcg(out + t * nf + j) / M;
        S += p == 2.0 ? r * r : (p == 1.0 ? r : pow(r, p));
      }
    S = block_reduce<false, kCombineWarps>(S, scratch);
    if (threadIdx.x == 0)
      o[j] = n_nan > 0 ? nan("") : (n_inf > 0 ? HUGE_VAL : (!finite ? 0.0
             : M * (p == 2.0 ? sqrt(S) : (p == 1.0 ? S : pow(S, 1.0 / p)))));
  }
}

__global__ void __launch_bounds__(32 * kCombineWarps) combine_kernel(const double* partials,
                                                                     const int64_t* item_range, int T,
                                                                     NormList norms, double* out,
                                                                     unsigned int* done) {
  const int np = norms.np;
  const int t = blockIdx.x * kCombineWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (t < T) {
    const int64_t w0 = item_range[2 * t], w1 = item_range[2 * t + 1];
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
  // The last block to finish sees every row: it writes the total.
  __shared__ double scratch[kCombineWarps + 1];
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // this block's rows before its ticket
    last = atomicAdd(done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  total_row(out, T, norms, scratch);
}

// ---- in-place elementwise ops over the same item table ----

template <typename Op>
__device__ __forceinline__ float apply(const Op& op, float v) { return op(v); }
template <typename Op>
__device__ __forceinline__ double apply(const Op& op, double v) { return op(v); }
// 16-bit values go through float; a NaN is returned as it was stored (sign
// and payload kept, as torch's clamp does; float -> 16-bit rounding would
// make it the canonical NaN).
template <typename Op>
__device__ __forceinline__ __nv_bfloat16 apply(const Op& op, __nv_bfloat16 v) {
  const float f = __bfloat162float(v);
  return f != f ? v : __float2bfloat16_rn(op(f));
}
template <typename Op>
__device__ __forceinline__ __half apply(const Op& op, __half v) {
  const float f = __half2float(v);
  return f != f ? v : __float2half_rn(op(f));
}

// x = op(x) over one chunk: the values before the first 16-byte boundary one
// per thread, then 16 bytes at a time, then the tail (see ChunkPass::run).
template <typename T, typename Op>
__device__ void apply_chunk(T* p, int64_t n, const Op& op) {
  constexpr int V = 16 / int(sizeof(T));
  const int64_t head = head_to_boundary(p, n);
  if (head < 0) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) p[i] = apply(op, p[i]);
    return;
  }
  if (threadIdx.x < head) p[threadIdx.x] = apply(op, p[threadIdx.x]);
  const int64_t nvec = (n - head) / V;
  uint4* pv = reinterpret_cast<uint4*>(p + head);
  for (int64_t k = threadIdx.x; k < nvec; k += kThreads) {
    uint4 raw = pv[k];
    T* vals = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) vals[j] = apply(op, vals[j]);
    pv[k] = raw;
  }
  for (int64_t i = head + nvec * V + threadIdx.x; i < n; i += kThreads) p[i] = apply(op, p[i]);
}

template <typename Op>
__device__ void apply_item(const int64_t* ptrs, const int32_t* dtypes, const int64_t* numels,
                           const int32_t* item_tensor, const int64_t* item_begin, const Op& op) {
  const int t = item_tensor[blockIdx.x];
  const int64_t b = item_begin[blockIdx.x];
  const int64_t n = min(b + kChunk, numels[t]) - b;
  char* base = reinterpret_cast<char*>(ptrs[t]);
  switch (dtypes[t]) {  // block-uniform
    case kF32: apply_chunk(reinterpret_cast<float*>(base) + b, n, op); break;
    case kF64: apply_chunk(reinterpret_cast<double*>(base) + b, n, op); break;
    case kBF16: apply_chunk(reinterpret_cast<__nv_bfloat16*>(base) + b, n, op); break;
    default: apply_chunk(reinterpret_cast<__half*>(base) + b, n, op);
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
  apply_item(ptrs, dtypes, numels, item_tensor, item_begin, ScaleOp{c});
}

// Three blocks per SM: at the default (four) ptxas spills on sm_80 (tests/test_cuda_build.py checks).
__global__ void __launch_bounds__(kThreads, 3) clamp_kernel(const int64_t* ptrs, const int32_t* dtypes,
                                                         const int64_t* numels, const int32_t* item_tensor,
                                                         const int64_t* item_begin, double lo, double hi) {
  apply_item(ptrs, dtypes, numels, item_tensor, item_begin, ClampOp{lo, hi});
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fastgrad CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// Lets stats_kernel take `dynamic` bytes of dynamic shared memory on the
// current device: the default limit is 48 KiB including the kernel's static
// shared memory; beyond it the kernel must opt in (a per-device function
// attribute, only ever raised here, under a lock), up to the device's cap.
void reserve_stats_smem(size_t dynamic) {
  static std::mutex lock;
  static size_t allowed[64] = {};  // per device: the attribute's value set so far
  cudaFuncAttributes attr{};
  check(cudaFuncGetAttributes(&attr, stats_kernel), "cudaFuncGetAttributes");
  if (dynamic + attr.sharedSizeBytes <= 48 * 1024) return;
  int dev = 0, cap = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&cap, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  if (dynamic + attr.sharedSizeBytes > size_t(cap))
    throw std::runtime_error("fastgrad CUDA: a histogram this wide needs " + std::to_string(dynamic) +
                             " bytes of shared memory per block, more than this GPU allows (" +
                             std::to_string(cap) + "); narrow the HistogramSpec (fewer bins)");
  std::lock_guard<std::mutex> guard(lock);
  if (dev < 64 && dynamic <= allowed[dev]) return;
  check(cudaFuncSetAttribute(stats_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dynamic)),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  if (dev < 64) allowed[dev] = dynamic;
}

// out_floats: float64 [T + 1, np + 1]; out_counts: int64 [(T + 1) * ncounts + 1]
// (rows, the total row, then the combine kernel's ticket counter).
// Grid dimension x holds up to 2^31-1 blocks: 2^31 chunks of 2^16 elements is far beyond any tensor.
void launch_stats(int64_t ptrs, int64_t dtypes, int64_t numels, int64_t item_tensor, int64_t item_begin,
                  int64_t item_range, int64_t num_items, int64_t num_tensors, const std::vector<double>& ps,
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
  a.num_tensors = num_tensors;
  // counts: T + 1 rows, then the combine kernel's ticket counter
  const size_t count_words = size_t(num_tensors + 1) * a.ncounts;
  check(cudaMemsetAsync(a.counts, 0, sizeof(unsigned long long) * (count_words + 1), stream), "memset");
  if (num_items > 0) {
    const int rows = kFirstBinRow + (hist ? a.num_bins : 1);
    const size_t smem = size_t(rows) * kThreads;  // one byte counter per thread and row
    reserve_stats_smem(smem);
    stats_kernel<<<unsigned(num_items), kThreads, smem, stream>>>(a);
    check(cudaGetLastError(), "stats_kernel");
  }
  // Also for T == 0: one block writes the (zero) total row.
  const unsigned blocks = unsigned(std::max<int64_t>((num_tensors + kCombineWarps - 1) / kCombineWarps, 1));
  combine_kernel<<<blocks, 32 * kCombineWarps, 0, stream>>>(
      a.partials, reinterpret_cast<const int64_t*>(item_range), int(num_tensors), norms,
      reinterpret_cast<double*>(out_floats), reinterpret_cast<unsigned int*>(a.counts + count_words));
  check(cudaGetLastError(), "combine_kernel");
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
