// Fused gradient statistics on the CPU: one read of every element yields
// p-norms, max|x|, NaN/+Inf/-Inf/zero counts and the power-of-two magnitude
// histogram (definitions: fastgrad/reference.py; table layout: fastgrad/spec.py).
//
// Work split: every tensor is cut into chunks of kChunk elements that never
// cross tensor boundaries; the (tensor, chunk) work items are spread over
// OpenMP threads. Each item writes its partials to its own slot; a second
// stage combines each tensor's slots in chunk order. No floating-point value
// is ever combined in a thread-dependent order, so the results are bitwise
// identical run to run and for any thread count.
//
// Inside a chunk, blocks of contiguous values (up to kInPlaceBlock) are read
// in place (bfloat16 and float16 are widened to float as they are loaded);
// other views are first gathered and converted to float (or double for
// float64 input) in an L1-resident buffer of kBlock values. One vectorised
// loop accumulates sum x^2 in double (for 16-bit input: runs of exact float
// squares, then double), sum |x| when p = 1 is asked, max|x|, the zero count
// and, for the histogram, the exponents that fall in a window of kWin
// adjacent exponents, as packed counters in registers (see block_pass). The
// rare values outside the window, NaN and Inf are counted by scalar code
// afterwards.
//
// Norm partials are pairs (s, m) meaning norm^p = m^p * s. The fast path
// has m = 1 and s = sum |x|^p in double, which cannot overflow or underflow
// for float32/16 inputs. Float64 chunks whose sum over/underflowed, and every
// p other than 1 and 2, are re-read (the chunk is still in cache) as
// s = sum (|x| / m)^p with m a power of two near the chunk's max|x|.

//
// Instruction sets: this file is compiled once per path of csrc/cpu/isa.h
// (portable baseline, AVX2, AVX-512; cpu_dispatch.cpp picks one at run
// time). All paths give bitwise identical results: the vector code keeps 16
// lanes whatever the ISA (as 1, 2 or 4 register-wide pieces: kP), reductions
// run in a fixed order (no `omp simd reduction`, whose lane count would
// follow the vector width), and the build disables FMA contraction
// (-ffp-contract=off) except where a fused multiply-add provably rounds the
// same way (add_square).

#include "isa.h"
#if FASTGRAD_ISA_BUILD

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "tensor_view.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // before the target pragma: the intrinsics carry their own target attributes
#endif

FASTGRAD_ISA_TARGET_BEGIN
namespace fastgrad {
namespace FASTGRAD_ISA_NS {

namespace {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int64_t kBlock = 2048;         // gathered / converted into a buffer of this size
constexpr int64_t kInPlaceBlock = 3840;  // read in place: 16 runs of the histogram's nibble counters
constexpr int kNumCounts = 4;                       // columns of the counts table before the bins:
enum Count { kNan = 0, kPosInf, kNegInf, kZero };  // NAN, POSINF, NEGINF, ZERO in fastgrad/spec.py

// What the kernel counts are keys, not bins. A finite non-zero value with
// e = floor(log2|v|) has key clamp(e + 127, 0, 255): for float that is just
// the biased exponent field (0 for subnormals); float64 values beyond
// float's exponent range land in key 0 or 255. Keys from kExpKeys on are the
// special classes. A chunk's key counts become bins only at its end
// (bin_of_key); that is exact because min_exp >= -126 and max_exp <= 128
// (HistogramSpec) put every exponent that shares a key into one bin.
constexpr int kExpKeys = 256;
constexpr int kNumKeys = kExpKeys + kNumCounts;
// An item's key table ends in a scratch counter, the target of branch-free
// increments that must count nothing. Long scalar counting runs rotate their
// increments over kKeyTables private tables (count_keys), so that runs of
// equal keys do not serialise on store->load forwarding.
constexpr int kKeyTables = 8;
constexpr int kScratchKey = kNumKeys;
constexpr int kKeyStride = kNumKeys + 1;

inline int bin_of_key(int k, int min_exp, int num_bins) {
  return std::min(std::max(k - 127 - min_exp + 1, 0), num_bins - 1);
}

template <typename T> struct FloatBits;
template <> struct FloatBits<float> {
  using U = uint32_t;
  static constexpr int kMantBits = 23, kExpMask = 0xff, kBias = 127;
};
template <> struct FloatBits<double> {
  using U = uint64_t;
  static constexpr int kMantBits = 52, kExpMask = 0x7ff, kBias = 1023;
};

// The key of one value. Branch-free.
template <typename T>
inline int key_of(T v) {
  using FB = FloatBits<T>;
  typename FB::U u;
  std::memcpy(&u, &v, sizeof(T));
  const int e = int((u >> FB::kMantBits) & FB::kExpMask);
  const bool mant = (u & ((typename FB::U(1) << FB::kMantBits) - 1)) != 0;
  const bool neg = (u >> (sizeof(T) * 8 - 1)) != 0;
  const int k = std::min(std::max(e - FB::kBias + 127, 0), 255);
  const int special = kExpKeys + (mant ? kNan : (neg ? kNegInf : kPosInf));
  return e == FB::kExpMask ? special : (e == 0 && !mant ? kExpKeys + kZero : k);
}

struct BlockAcc {
  double s1 = 0, s2 = 0, maxabs = 0;
};

// Contiguous 16-bit input is passed to the block passes as these types, so
// that every read of a value converts it the same way (value() here, and
// load_bits() for 16 lanes at once) and no separate conversion pass over a
// buffer is needed. Their float values are exact, so the results equal those
// of converting first.
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
inline float value(float v) { return v; }
inline double value(double v) { return v; }
inline float value(BF16 h) { return bf16_to_float(h.bits); }
inline float value(F16 h) { return f16_to_float(h.bits); }

// keys[key16[i]] += 1 for i < n (kKeyStride entries; the scratch key counts nothing).
inline void count_keys(const uint16_t* __restrict key16, int64_t n, uint32_t* __restrict keys) {
  if (n < 256) {  // not worth setting up the rotating tables
    for (int64_t i = 0; i < n; ++i) ++keys[key16[i]];
    return;
  }
  alignas(64) uint32_t tab[kKeyTables * kKeyStride] = {};
  int64_t i = 0;
  for (; i + kKeyTables <= n; i += kKeyTables) {
#pragma GCC unroll 8
    for (int t = 0; t < kKeyTables; ++t) ++tab[t * kKeyStride + key16[i + t]];
  }
  for (; i < n; ++i) ++tab[key16[i]];
  for (int t = 0; t < kKeyTables; ++t)
    for (int k = 0; k < kKeyStride; ++k) keys[k] += tab[t * kKeyStride + k];
}

// One pass over n <= kInPlaceBlock contiguous values, generic form: used for
// float64 input and for the tails of the vectorised blocks.
template <typename In>
inline void block_pass_scalar(const In* __restrict x, int64_t n, BlockAcc& acc, uint32_t* __restrict keys) {
  double s1 = 0, s2 = 0, mx = acc.maxabs;
  alignas(64) uint16_t key16[kInPlaceBlock];
  for (int64_t i = 0; i < n; ++i) {
    const auto v = value(x[i]);
    const double a = std::fabs(double(v));
    s1 += a;
    s2 += a * a;
    mx = a > mx ? a : mx;  // NaN compares false: max over non-NaN values
    key16[i] = uint16_t(key_of(v));
  }
  count_keys(key16, n, keys);
  acc.s1 += s1;
  acc.s2 += s2;
  acc.maxabs = mx;
}

// The float hot path, written with GCC/clang vector extensions: 16 lanes
// whatever the ISA (one AVX-512 register, two AVX2, four SSE), so the
// summation order (hence the exact result) does not depend on the -march a
// build used.
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// The hot loops hold their 16 lanes as kQ "pieces" of kP lanes, one
// register each: 16 with AVX-512, 8 with AVX2 (two pieces), 4 otherwise
// (SSE2, NEON: four). GCC keeps a vector type wider than the ISA's registers
// in memory and lowers its comparisons and ?: lane by lane, as scalar code:
// written with 16-lane types, the AVX2 and baseline paths ran the
// histogram pass 12-50x slower than AVX-512. Lane l of the 16 is lane l % kP
// of piece l / kP, and every lane computes what it did as one 16-lane vector,
// in the same order: the paths stay bitwise equal.
constexpr int kP = FASTGRAD_HAS_AVX512 ? 16 : (FASTGRAD_HAS_AVX2 ? 8 : 4);
constexpr int kQ = 16 / kP;  // pieces per 16 lanes
constexpr int kD = kP / 2;   // double lanes per register
typedef float fP __attribute__((vector_size(4 * kP)));
typedef uint32_t uP __attribute__((vector_size(4 * kP)));
typedef int32_t iP __attribute__((vector_size(4 * kP)));
typedef double dP __attribute__((vector_size(4 * kP)));
typedef uint16_t hP __attribute__((vector_size(4 * kP)));  // 2 kP uint16 lanes (bfloat16 bits)
typedef uint16_t hHalfP __attribute__((vector_size(2 * kP)));  // kP uint16 lanes

// acc + a * a for doubles a that are floats: the square is exact (48 bits), so
// a fused multiply-add rounds the same sum the same way, and the paths that
// have FMA use it (-ffp-contract=off keeps the compiler from fusing anywhere
// else, where rounding would differ: ~10% of the float32 pass).
inline dP add_square(dP acc, dP a) {
#if FASTGRAD_HAS_FMA && FASTGRAD_HAS_AVX512
  return (dP)_mm512_fmadd_pd((__m512d)a, (__m512d)a, (__m512d)acc);
#elif FASTGRAD_HAS_FMA && FASTGRAD_HAS_AVX2
  return (dP)_mm256_fmadd_pd((__m256d)a, (__m256d)a, (__m256d)acc);
#else
  return acc + a * a;
#endif
}
// The 16 double lanes of a sum, as 2 kQ registers: lane l is acc[l / kD][l % kD].
// Adds the kP floats of piece q (lanes q kP ...) to their lanes.
inline void add_doubles(dP* acc, int q, fP v, bool square) {
  dP lo, hi;
#if FASTGRAD_HAS_AVX512
  // Converted as one 16-lane vector: GCC splits an 8-lane half's conversion into 128-bit pieces.
  typedef double dP2 __attribute__((vector_size(8 * kP)));
  const dP2 d = __builtin_convertvector(v, dP2);
  lo = __builtin_shufflevector(d, d, 0, 1, 2, 3, 4, 5, 6, 7);
  hi = __builtin_shufflevector(d, d, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  typedef float fHalf __attribute__((vector_size(2 * kP)));
  fHalf vl, vh;
  std::memcpy(&vl, &v, sizeof(vl));
  std::memcpy(&vh, reinterpret_cast<const char*>(&v) + sizeof(vl), sizeof(vh));
  lo = __builtin_convertvector(vl, dP);
  hi = __builtin_convertvector(vh, dP);
#endif
  if (square) {
    acc[2 * q] = add_square(acc[2 * q], lo);
    acc[2 * q + 1] = add_square(acc[2 * q + 1], hi);
  } else {
    acc[2 * q] += lo;
    acc[2 * q + 1] += hi;
  }
}
// Lane l of 16 held as pieces.
template <typename E, typename V>
inline E lane(const V* pieces, int l) {
  return pieces[l / (sizeof(V) / sizeof(E))][l % (sizeof(V) / sizeof(E))];
}
template <typename V>
inline bool any_lane(V v) {
  uint64_t w[sizeof(V) / 8], o = 0;
  std::memcpy(w, &v, sizeof(V));
  for (uint64_t u : w) o |= u;
  return o != 0;
}

// The float bits of kP consecutive values.
inline uP load_bits(const float* p) {
  uP u;
  std::memcpy(&u, p, sizeof(u));
  return u;
}
// kP uint16 in the upper halves of 32-bit lanes, lanes in memory order.
inline uP load_high_halves(const uint16_t* p) {
  uP u;
#if FASTGRAD_HAS_AVX512
  // A zero-extending load and a shift: cheaper than the general permute below.
  const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
  std::memcpy(&u, &w, sizeof(u));
#elif FASTGRAD_HAS_AVX2
  const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
  std::memcpy(&u, &w, sizeof(u));
#else
  // Interleaving with zeros is one permute; __builtin_convertvector to uP
  // would be split into pieces by GCC.
  hHalfP h;
  std::memcpy(&h, p, sizeof(h));
  constexpr bool kLittle = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;  // which uint16 of a lane is its upper half
  const hHalfP lo = kLittle ? hHalfP{} : h, hi = kLittle ? h : hHalfP{};
  static_assert(kP == 4, "the baseline's piece");
  const hP w = __builtin_shufflevector(lo, hi, 0, 4, 1, 5, 2, 6, 3, 7);
  std::memcpy(&u, &w, sizeof(u));
#endif
  return u;
}
inline uP load_bits(const BF16* p) { return load_high_halves(&p->bits); }
// f16_to_float on kP lanes.
inline uP load_bits(const F16* p) {
  const uP hh = load_high_halves(&p->bits);
  const uP sign = hh & 0x80000000u;
  const uP em = (hh & 0x7fff0000u) >> 16;
  const uP normal = (em << 13) + ((127u - 15u) << 23);
  const uP special = 0x7f800000u | ((em & 0x3ffu) << 13);
  const fP sub = __builtin_convertvector((iP)em, fP) * 5.9604644775390625e-08f;  // em * 2^-24
  uP sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof(sub_bits));
  const uP mag = em >= 0x7c00u ? special : (em < 0x400u ? sub_bits : normal);
  return sign | mag;
}

// The histogram's vector counters: kWin adjacent exponents [base, base + kWin)
// as 4-bit fields, eight per 32-bit lane (exponent base + 8j + f in field f
// of counter j). A field gains at most 1 per 16 elements, so the counters
// are emptied into 8-bit fields every kNibbleRun vectors (two byte counters
// per nibble counter, even and odd fields), and those (at most
// kInPlaceBlock / 16 = 240 per lane) go to the item's WideCounts once per block.
constexpr int kWin = 32;
constexpr int kNibbleCounters = kWin / 8;
constexpr int kNibbleRun = 15;
// The bit that counts exponent e in its counter's field: 1 << 4 (e % 8), by e % 16.
constexpr u32x16 kFieldBit = {1u << 0, 1u << 4, 1u << 8, 1u << 12, 1u << 16, 1u << 20, 1u << 24, 1u << 28,
                              1u << 0, 1u << 4, 1u << 8, 1u << 12, 1u << 16, 1u << 20, 1u << 24, 1u << 28};
static_assert(kWin % 8 == 0 && kInPlaceBlock >= kBlock && kInPlaceBlock / 16 <= 255,
              "counter fields would overflow");

// Where the window sits only affects speed: values outside it are found by
// a second look at the block. It starts where the thread's previous chunk
// left it and, once enough values have been missed, moves to the kWin keys
// with the most counts so far in the chunk. The base is a multiple of 8, so
// that a value's counter is simply its exponent's upper bits (block_pass),
// and lies in [8, 216]: the window never holds key 0 (zeros, subnormals) or
// 255 (Inf, NaN).
constexpr int kMinBase = 8, kMaxBase = 254 - kWin - (254 - kWin) % 8;
static_assert(kMaxBase + kWin <= 255 && kMaxBase % 8 == 0, "window would reach Inf/NaN");
struct Window {
  int base = 128 - kWin / 2;  // around 1.0 until some data has been seen
  int64_t missed = 0;          // since the last move
  void refit(const uint32_t* keys) {
    missed = 0;
    const uint32_t* count = keys;
    uint64_t best = 0;
    for (int k = base; k < base + kWin; ++k) best += count[k];
    for (int b = kMinBase; b <= kMaxBase; b += 8) {
      uint64_t cur = 0;
      for (int k = b; k < b + kWin; ++k) cur += count[k];
      if (cur > best) {
        best = cur;
        base = b;
      }
    }
  }
};

// Horizontal reductions of the 16 lanes.
// The sum of a piece's 16-bit halves (counts of at most 65535 in all).
inline uint32_t lane_total(uP v) {
  v = (v & 0xffffu) + (v >> 16);
  uint32_t t = 0;
  for (int l = 0; l < kP; ++l) t += v[l];
  return t;
}

inline uint32_t lane_sum(u32x16 v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return v[0] + v[1];
}

// Lane sums of 16 vectors at once. One step halves the lanes each input
// vector's partial sums occupy (groups of S lanes become groups of S / 2) and
// pairs up the vectors: lanes of x's and y's first halves plus those of their
// second halves. After four steps lane L holds the sum of v[bit_reverse(L)].
constexpr int lo_lane(int S, int L) { return L % S < S / 2 ? L : 16 + L - S / 2; }
constexpr int hi_lane(int S, int L) { return L % S < S / 2 ? L + S / 2 : 16 + L; }
template <int S, size_t... L>
inline u32x16 pair_step(u32x16 x, u32x16 y, std::index_sequence<L...>) {
  return __builtin_shufflevector(x, y, lo_lane(S, L)...) + __builtin_shufflevector(x, y, hi_lane(S, L)...);
}
inline u32x16 lane_sums16(const u32x16 (&v)[16]) {
  constexpr auto I = std::make_index_sequence<16>{};
  u32x16 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k) a[k] = pair_step<16>(v[2 * k], v[2 * k + 1], I);
  for (int k = 0; k < 4; ++k) b[k] = pair_step<8>(a[2 * k], a[2 * k + 1], I);
  for (int k = 0; k < 2; ++k) c[k] = pair_step<4>(b[2 * k], b[2 * k + 1], I);
  return pair_step<2>(c[0], c[1], I);
}
constexpr int bit_reverse4(int L) { return ((L & 1) << 3) | ((L & 2) << 1) | ((L & 4) >> 1) | ((L & 8) >> 3); }

// An item's window counts between blocks: 16-bit fields, two per lane, so
// that the horizontal sums happen once per item (or window move), not per
// block. v[4 c + 2 h + k] holds, in its low / high 16 bits, exponent
// base + 8 c + 2 k + h / that + 4 (from byte vector 2 c + h, its even (k = 0)
// or odd (k = 1) bytes). A field gains at most one per 16 elements, so an
// item of at most kChunk elements cannot overflow it.
struct WideCounts {
  u32x16 v[4 * kNibbleCounters] = {};
  // v[j] += piece q (lanes q kP ...).
  void add(int j, int q, uP piece) {
    char* at = reinterpret_cast<char*>(&v[j]) + q * sizeof(uP);
    uP w;
    std::memcpy(&w, at, sizeof(w));
    w += piece;
    std::memcpy(at, &w, sizeof(w));
  }
  void flush(uint32_t* keys, int base) {
    u32x16 lo[16], hi[16];
    for (int j = 0; j < 16; ++j) {
      lo[j] = v[j] & 0xffffu;
      hi[j] = v[j] >> 16;
      v[j] = u32x16{};
    }
    const u32x16 slo = lane_sums16(lo), shi = lane_sums16(hi);
    for (int L = 0; L < 16; ++L) {
      const int j = bit_reverse4(L), c = j / 4, h = (j / 2) % 2, k = j % 2;
      uint32_t* key = keys + base + 8 * c + 2 * k + h;
      key[0] += slo[L];
      key[4] += shi[L];
    }
  }
};
static_assert(kChunk / 16 < 65536 && 4 * kNibbleCounters == 16, "WideCounts layout");

// Whether float sums of a block's squares (15 a lane) may be wrong: for
// bfloat16 (float16's cannot be, the check is just cheap) a run's sum can overflow once |x| >= 2^62,
// and values below 2^-63 square to subnormals, which only matters if nothing
// much larger is in the block. Such blocks are summed again in double.
inline bool float_squares_unsafe(double block_max) {
  return block_max >= 0x1p62 || (block_max > 0 && block_max < 0x1p-40);
}
template <typename In>
inline double double_square_sum(const In* __restrict x, int64_t nv) {
  double s2 = 0;
  for (int64_t i = 0; i < nv; ++i) {
    const double v = double(value(x[i]));
    s2 += v * v;
  }
  return s2;
}

// Counts the NaN and +-Inf among x[0, nv) into keys; returns how many.
template <typename In>
inline int64_t count_nonfinite(const In* __restrict x, int64_t nv, uint32_t* __restrict keys) {
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < nv; ++i) {
    const int k = key_of(value(x[i]));
    if (k >= kExpKeys && k != kExpKeys + kZero) {
      ++keys[k];
      ++nonfinite;
    }
  }
  return nonfinite;
}

// Counts the `missed` values of x[0, nv) (nv a multiple of 16) that the
// window did not: finite, non-zero, with an exponent outside it.
template <typename In>
inline void count_missed(const In* __restrict x, int64_t nv, int64_t missed, uint32_t* __restrict keys,
                         Window& win, WideCounts& wide) {
  if (missed <= 0) return;
  const uint32_t base = uint32_t(win.base);
  if (missed * 32 < nv) {
    // A few: found kP at a time, up to the last one.
    int64_t left = missed;
    for (int64_t i = 0; left > 0 && i < nv; i += kP) {
      const uP au = load_bits(x + i) & 0x7fffffffu, e = au >> 23;
      const iP out = (e - base >= uint32_t(kWin)) & (au != 0u) & (au < 0x7f800000u);
      if (!any_lane(out)) continue;
      for (int l = 0; l < kP; ++l) {
        if (out[l]) {
          ++keys[e[l]];
          --left;
        }
      }
    }
  } else {
    // Many (data spread over more than kWin exponents): each value's key
    // (the scratch key if it is not missed) is written out, then counted
    // without branches.
    alignas(64) uint16_t key16[kInPlaceBlock];
    for (int64_t i = 0; i < nv; i += kP) {
      const uP au = load_bits(x + i) & 0x7fffffffu, e = au >> 23;
      const uP scratch = uP{} + uint32_t(kScratchKey);
      const uP key = (e - base >= uint32_t(kWin)) & (au != 0u) & (au < 0x7f800000u) ? e : scratch;
      const hHalfP k = __builtin_convertvector(key, hHalfP);
      std::memcpy(key16 + i, &k, sizeof(k));
    }
    count_keys(key16, nv, keys);
  }
  win.missed += missed;
  if (win.missed * 32 >= kBlock) {
    wide.flush(keys, win.base);
    win.refit(keys);
  }
}

// The bit that counts exponent e = au >> 23 in its counter's field: 1 << 4 (e % 8).
// Per instruction set, since a variable per-lane permute or shift that the ISA
// lacks is compiled element by element (20x slower for the whole pass):
inline uP field_bit(uP au) {
#if defined(__clang__)  // no variable-index __builtin_shuffle: mask and shift
  return (uP{} + 1u) << ((au >> 21) & 28u);
#elif FASTGRAD_HAS_AVX512
  return __builtin_shuffle(kFieldBit, au >> 23);  // a 16-entry table: one permute
#elif FASTGRAD_HAS_AVX2
  return (uP{} + 1u) << ((au >> 21) & 28u);  // variable shifts
#else
  // SSE2 has neither: the float 2^(4 (e % 8)) made from its bits, converted (exactly) to an integer.
  const uP fbits = (((au >> 21) & 28u) + 127u) << 23;
  fP f;
  std::memcpy(&f, &fbits, sizeof(f));
  return (uP)__builtin_convertvector(f, iP);
#endif
}

// In: float, BF16 or F16. kS1: also sum |x| (only p = 1 needs it).
template <bool kHist, bool kS1, typename In>
inline void block_pass(const In* __restrict x, int64_t n, BlockAcc& acc, uint32_t* __restrict keys,
                       Window& win, WideCounts& wide) {
  const int64_t nv = n & ~int64_t(15);
  // The square of a 16-bit float is exact in float, so for 16-bit input (and
  // no sum |x|) the squares of each run are summed in float lanes, 15 terms
  // each, then added in double: at most 14 roundings of 2^-24 each
  // (< 1e-6 relative, < 5e-7 on the norm), and a third of the vector work.
  // Blocks whose squares could leave float's range are summed again in
  // double (see below).
  constexpr bool kFloatSquares = !std::is_same_v<In, float> && !kS1;
  dP s1[2 * kQ] = {}, s2[2 * kQ] = {};  // 16 double lanes each (add_doubles)
  fP mx[kQ] = {};
  iP c_zero[kQ] = {};  // n <= kInPlaceBlock: int32 is enough
  uP bytes[2 * kNibbleCounters][kQ] = {};
  const uint32_t first = uint32_t(win.base) / 8;  // exponent / 8 of counter 0's exponents
  for (int64_t i = 0; i < nv;) {
    uP nib[kNibbleCounters][kQ] = {};
    fP sq[kQ] = {};
    const int64_t run_end = std::min(nv, i + 16 * kNibbleRun);
    for (; i < run_end; i += 16) {
#pragma GCC unroll 4
      for (int q = 0; q < kQ; ++q) {
        const uP au = load_bits(x + i + q * kP) & 0x7fffffffu;
        fP a;
        std::memcpy(&a, &au, sizeof(a));
        if constexpr (kFloatSquares) {
          sq[q] += a * a;
        } else {
          if constexpr (kS1) add_doubles(s1, q, a, false);
          add_doubles(s2, q, a, true);
        }
        mx[q] = a > mx[q] ? a : mx[q];  // NaN compares false: max over non-NaN values
        c_zero[q] = au == 0u ? c_zero[q] + 1 : c_zero[q];
        if constexpr (kHist) {
          // Exponent e = au >> 23 goes to field e % 8 (bits 4 (e % 8) and up) of
          // counter e / 8 - base / 8, which is none of them outside the window
          // (also for zeros, subnormals, NaN and Inf, see Window).
          const uP bit = field_bit(au);
          const uP e8 = au >> 26;
          for (int c = 0; c < kNibbleCounters; ++c) nib[c][q] = e8 == first + c ? nib[c][q] + bit : nib[c][q];
        }
      }
    }
    if constexpr (kFloatSquares)
      for (int q = 0; q < kQ; ++q) add_doubles(s2, q, sq[q], false);
    if constexpr (kHist) {
      for (int c = 0; c < kNibbleCounters; ++c) {
        for (int q = 0; q < kQ; ++q) {
          bytes[2 * c][q] += nib[c][q] & 0x0f0f0f0fu;
          bytes[2 * c + 1][q] += (nib[c][q] >> 4) & 0x0f0f0f0fu;
        }
      }
    }
  }
  double s1t = 0, s2t = 0, block_max = 0;
  for (int l = 0; l < 8; ++l) {
    s1t += lane<double>(s1, l) + lane<double>(s1, l + 8);
    s2t += lane<double>(s2, l) + lane<double>(s2, l + 8);
  }
  int64_t zeros = 0;
  for (int l = 0; l < 16; ++l) {
    block_max = std::max(block_max, double(lane<float>(mx, l)));
    zeros += lane<int32_t>(c_zero, l);
  }
  const double m = std::max(acc.maxabs, block_max);
  if (kFloatSquares && float_squares_unsafe(block_max)) s2t = double_square_sum(x, nv);
  keys[kExpKeys + kZero] += uint32_t(zeros);
  // Finite floats cannot overflow a double sum: a NaN or Inf shows in s2.
  const int64_t nonfinite = std::isfinite(s2t) ? 0 : count_nonfinite(x, nv, keys);
  if constexpr (kHist) {
    // Into the item's wide counters (WideCounts); the block's total in the
    // window needs just one horizontal sum.
    uP in_win = {};
    for (int b = 0; b < 2 * kNibbleCounters; ++b) {
      for (int q = 0; q < kQ; ++q) {
        const uP even = bytes[b][q] & 0x00ff00ffu, odd = (bytes[b][q] >> 8) & 0x00ff00ffu;
        wide.add(2 * b, q, even);
        wide.add(2 * b + 1, q, odd);
        in_win += even + odd;
      }
    }
    count_missed(x, nv, nv - zeros - nonfinite - lane_total(in_win), keys, win, wide);
  }
  acc.s1 += s1t;
  acc.s2 += s2t;
  acc.maxabs = m;
  block_pass_scalar(x + nv, n - nv, acc, keys);
}

// bfloat16 in 16-bit lanes, 32 values a step: the histogram's index work, the
// max (as integers: |x| bits order like the values, NaN above all) and the
// zero count cost half as much as in float lanes, and the widening to float
// for the squares is two interleaves with zeros (which permute the values;
// sums do not care). Counters: 8 of 4 exponents (4-bit fields, four per
// lane), counter c holding exponents base + 4 c + f in field f. Same results
// as block_pass, without sum |x| (p = 1 takes block_pass).
typedef uint16_t u16x32 __attribute__((vector_size(64)));
constexpr int kNibbleCounters16 = kWin / 4;
// The bit that counts exponent e in its counter's field: 1 << 4 (e % 4), by e % 32.
constexpr u16x32 kFieldBit16 = {1, 16, 256, 4096, 1, 16, 256, 4096, 1, 16, 256, 4096, 1, 16, 256, 4096,
                                1, 16, 256, 4096, 1, 16, 256, 4096, 1, 16, 256, 4096, 1, 16, 256, 4096};

// The bit that counts the exponent of the bfloat16 bits a (sign cleared): 1 << 4 (e % 4), e = a >> 7.
inline hP field_bit16(hP a) {
#if defined(__clang__)
  return hP{} + 1 << ((a >> 5) & 12);
#elif FASTGRAD_HAS_AVX512
  return __builtin_shuffle(kFieldBit16, hP(a >> 7));  // one 16-bit permute
#else
  // No 16-bit variable shift or permute below AVX-512BW: (e % 4 odd ? 16 : 1) * (e % 4 >= 2 ? 256 : 1).
  const hP k = (a >> 7) & 3;
  return ((k & 1) * 15 + 1) * (((k >> 1) & 1) * 255 + 1);
#endif
}

// In every 128-bit lane of a, its first (kHi: last) four uint16 each with a
// zero below it (punpcklwd / punpckhwd with zeros): as 32-bit lanes, the
// bfloat16 values widened to float. Piece q of the 32 lanes' result is the
// result for piece q: the same lanes whatever the piece width.
constexpr int unpack_index(int n, int j, bool hi) { return (j % 2 ? n : 0) + j / 8 * 8 + j % 8 / 2 + (hi ? 4 : 0); }
template <bool kHi, size_t... J>
inline hP unpack_with_zeros(hP a, std::index_sequence<J...>) {
  const hP z = {};
  return __builtin_shufflevector(z, a, unpack_index(int(sizeof...(J)), int(J), kHi)...);
}
template <bool kHi>
inline fP widen_bf16(hP a) {
  const hP w = unpack_with_zeros<kHi>(a, std::make_index_sequence<2 * kP>{});
  fP f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

template <bool kHist>
inline void block_pass_bf16(const BF16* __restrict x, int64_t n, BlockAcc& acc, uint32_t* __restrict keys,
                            Window& win, WideCounts& wide) {
  const int64_t nv = n & ~int64_t(31);
  dP s2[2 * kQ] = {};  // 16 double lanes (add_doubles)
  hP mx[kQ] = {}, c_zero[kQ] = {};  // at most kInPlaceBlock / 32 per lane
  hP bytes[2 * kNibbleCounters16][kQ] = {};
  const uint16_t first = uint16_t(win.base / 4);  // exponent / 4 of counter 0's exponents
  for (int64_t i = 0; i < nv;) {
    hP nib[kNibbleCounters16][kQ] = {};
    fP sq_lo[kQ] = {}, sq_hi[kQ] = {};  // exact squares, 15 a lane a run, as in block_pass
    const int64_t run_end = std::min(nv, i + 32 * kNibbleRun);
    for (; i < run_end; i += 32) {
#pragma GCC unroll 4
      for (int q = 0; q < kQ; ++q) {
        hP h;
        std::memcpy(&h, x + i + q * 2 * kP, sizeof(h));
        const hP a = h & 0x7fff;
        mx[q] = a > mx[q] ? a : mx[q];
        c_zero[q] = a == 0 ? c_zero[q] + 1 : c_zero[q];
        const fP flo = widen_bf16<false>(a), fhi = widen_bf16<true>(a);
        sq_lo[q] += flo * flo;
        sq_hi[q] += fhi * fhi;
        if constexpr (kHist) {
          const hP bit = field_bit16(a);
          const hP e4 = a >> 9;  // NaN/Inf: 63, beyond every counter; zeros: 0, below
          for (int c = 0; c < kNibbleCounters16; ++c)
            nib[c][q] = e4 == uint16_t(first + c) ? nib[c][q] + bit : nib[c][q];
        }
      }
    }
    for (int q = 0; q < kQ; ++q) add_doubles(s2, q, sq_lo[q], false);
    for (int q = 0; q < kQ; ++q) add_doubles(s2, q, sq_hi[q], false);
    if constexpr (kHist) {
      for (int c = 0; c < kNibbleCounters16; ++c) {
        for (int q = 0; q < kQ; ++q) {
          bytes[2 * c][q] += nib[c][q] & 0x0f0f;  // fields 0, 2 -> bytes 0, 1 of the lane
          bytes[2 * c + 1][q] += (nib[c][q] >> 4) & 0x0f0f;  // fields 1, 3
        }
      }
    }
  }
  double s2t = 0;
  for (int l = 0; l < 8; ++l) s2t += lane<double>(s2, l) + lane<double>(s2, l + 8);
  uint16_t mbits = 0;
  int64_t zeros = 0;
  for (int l = 0; l < 32; ++l) {
    mbits = std::max(mbits, lane<uint16_t>(mx, l));
    zeros += lane<uint16_t>(c_zero, l);
  }
  double block_max = bf16_to_float(mbits);
  if (mbits > 0x7f80) {  // a NaN: the max over the other values, the slow way
    block_max = 0;
    for (int64_t i = 0; i < nv; ++i) {
      const double v = std::fabs(double(value(x[i])));
      block_max = v > block_max ? v : block_max;
    }
  }
  if (float_squares_unsafe(block_max)) s2t = double_square_sum(x, nv);
  keys[kExpKeys + kZero] += uint32_t(zeros);
  const int64_t nonfinite = std::isfinite(s2t) ? 0 : count_nonfinite(x, nv, keys);
  if constexpr (kHist) {
    // Into the item's WideCounts layout: counters 2 c and 2 c + 1 here hold
    // the exponents of WideCounts' counter c's low and high 16 bits. As
    // 32-bit lanes, a byte vector's even (odd) bytes are one exponent in both
    // halves: summed, then packed in pairs of counters.
    uP in_win = {};
    for (int c = 0; c < kNibbleCounters; ++c) {
      for (int h = 0; h < 2; ++h) {
        for (int q = 0; q < kQ; ++q) {
          uP lo_b, hi_b;  // the byte vectors of counters 2 c and 2 c + 1
          std::memcpy(&lo_b, &bytes[2 * (2 * c) + h][q], sizeof(lo_b));
          std::memcpy(&hi_b, &bytes[2 * (2 * c + 1) + h][q], sizeof(hi_b));
          for (int k = 0; k < 2; ++k) {
            const uP l = (lo_b >> (8 * k)) & 0x00ff00ffu, u = (hi_b >> (8 * k)) & 0x00ff00ffu;
            const uP packed = ((l & 0xffffu) + (l >> 16)) | (((u & 0xffffu) + (u >> 16)) << 16);
            wide.add(4 * c + 2 * h + k, q, packed);
            in_win += packed;
          }
        }
      }
    }
    count_missed(x, nv, nv - zeros - nonfinite - lane_total(in_win), keys, win, wide);
  }
  acc.s2 += s2t;
  acc.maxabs = std::max(acc.maxabs, block_max);
  block_pass_scalar(x + nv, n - nv, acc, keys);
}

template <bool kHist, bool kS1>
inline void block_pass(const double* __restrict x, int64_t n, BlockAcc& acc, uint32_t* __restrict keys,
                       Window&, WideCounts&) {
  block_pass_scalar<double>(x, n, acc, keys);
}

// Loads n logical elements starting at element offset `off` (element stride
// `st`) as the compute type C. Returns a pointer either into the tensor
// itself (contiguous, no conversion) or into buf.
template <typename C>
inline const C* load(const TensorDesc& d, int64_t off, int64_t n, int64_t st, C* __restrict buf) {
  if (d.dtype == kF32 || d.dtype == kF64) {
    using In = C;  // F32 -> float, F64 -> double
    const In* p = reinterpret_cast<const In*>(d.data) + off;
    if (st == 1) return p;
    for (int64_t i = 0; i < n; ++i) buf[i] = p[i * st];
    return buf;
  }
  const uint16_t* p = reinterpret_cast<const uint16_t*>(d.data) + off;
  if (d.dtype == kBF16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(p[i * st]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = f16_to_float(p[i * st]);
  }
  return buf;
}

// Calls f(ptr, n) over the chunk [begin, end) in blocks of at most kBlock
// contiguous compute-type values.
template <typename C, typename F>
inline void for_each_block(const TensorDesc& d, int64_t begin, int64_t end, C* buf, F&& f) {
  for_each_row(d, begin, end, [&](int64_t off, int64_t n, int64_t st) {
    for (int64_t i = 0; i < n; i += kBlock) {
      const int64_t m = std::min(kBlock, n - i);
      f(load<C>(d, off + i * st, m, st, buf), m);
    }
  });
}

struct NormPair {  // norm^p = m^p * s; m == 0 means "nothing non-zero seen"
  double s = 0, m = 0;
};

// sum (|x| / m)^p over the chunk, m = 2^k with k the exponent of maxabs.
template <typename C>
NormPair scaled_pass(const TensorDesc& d, int64_t begin, int64_t end, double p, double maxabs, C* buf) {
  int k;
  std::frexp(maxabs, &k);
  // 2^-k and 2^k must both be finite: subnormal maxima (k < -1021) and maxima
  // of 2^1023 and up (k = 1024) would make one of them 0 or Inf.
  k = std::min(std::max(k, -1021), 1023);
  const double inv = std::ldexp(1.0, -k);
  double s = 0;
  // p = 1, 2: eight running sums in a fixed order (lane l takes the elements
  // i = l mod 8), summed at the block's end: the same on every ISA path, and
  // still vectorised (an `omp simd reduction` would take as many lanes as the
  // path's vector width, and so different roundings).
  auto lanes8 = [](const C* x, int64_t n, auto term) {
    double lane[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int l = 0; l < 8; ++l) lane[l] += term(x[i + l]);
    double acc = 0;
    for (int l = 0; l < 8; ++l) acc += lane[l];
    for (; i < n; ++i) acc += term(x[i]);
    return acc;
  };
  for_each_block<C>(d, begin, end, buf, [&](const C* x, int64_t n) {
    double acc = 0;
    if (p == 2.0) {
      acc = lanes8(x, n, [inv](C v) {
        const double a = std::fabs(double(v)) * inv;
        return a * a;
      });
    } else if (p == 1.0) {
      acc = lanes8(x, n, [inv](C v) { return std::fabs(double(v)) * inv; });
    } else {
      for (int64_t i = 0; i < n; ++i) acc += std::pow(std::fabs(double(x[i])) * inv, p);
    }
    s += acc;
  });
  return {s, std::ldexp(1.0, k)};
}

struct Job {
  const std::vector<TensorDesc>* descs;
  const std::vector<double>* ps;
  int min_exp, num_bins;
  bool hist;
  bool s1;      // some p is 1: block passes also sum |x|
  int ncounts;  // columns of the counts table
  int nnorm;    // partial doubles per item: 2 per p, then maxabs
  int16_t key_col[kNumKeys];  // counts-table column of each key (-1: not counted)
};

struct Item {
  int64_t tensor, begin, end;
};

// Partials of one (tensor, chunk) item: norm pairs + maxabs into fpart,
// counts (+ histogram) into cpart.
template <typename C>
void process_item(const Job& job, const Item& it, double* fpart, int64_t* cpart) {
  const TensorDesc& d = (*job.descs)[it.tensor];
  alignas(64) C buf[kBlock];
  alignas(64) uint32_t keys[kKeyStride] = {};
  BlockAcc acc;
  static thread_local Window win;
  WideCounts wide;

  auto pass = [&](const auto* x, int64_t n) {
    if (job.hist) {
      if (job.s1) block_pass<true, true>(x, n, acc, keys, win, wide);
      else block_pass<true, false>(x, n, acc, keys, win, wide);
    } else {
      if (job.s1) block_pass<false, true>(x, n, acc, keys, win, wide);
      else block_pass<false, false>(x, n, acc, keys, win, wide);
    }
  };
  for_each_row(d, it.begin, it.end, [&](int64_t off, int64_t n, int64_t st) {
    for (int64_t i = 0, m; i < n; i += m) {
      m = std::min(st == 1 ? kInPlaceBlock : kBlock, n - i);
      const int64_t o = off + i * st;
      // Contiguous 16-bit values are widened inside block_pass, saving a pass over buf.
      if constexpr (std::is_same_v<C, float>) {
        if (st == 1 && d.dtype == kBF16) {
          const BF16* x = reinterpret_cast<const BF16*>(d.data) + o;
          if (job.s1) pass(x, m);
          else if (job.hist) block_pass_bf16<true>(x, m, acc, keys, win, wide);
          else block_pass_bf16<false>(x, m, acc, keys, win, wide);
          continue;
        }
        if (st == 1 && d.dtype == kF16) {
          pass(reinterpret_cast<const F16*>(d.data) + o, m);
          continue;
        }
      }
      pass(load<C>(d, o, m, st, buf), m);
    }
  });
  if (job.hist) wide.flush(keys, win.base);

  // Map the few non-zero keys to their columns through the job's table,
  // finding them 16 at a time (small tensors pay this per item).
  for (int c = 0; c < job.ncounts; ++c) cpart[c] = 0;
  static_assert(kExpKeys % 16 == 0, "key scan");
  for (int k0 = 0; k0 < kExpKeys; k0 += 16) {
    u32x16 v;
    std::memcpy(&v, keys + k0, sizeof(v));
    if (!any_lane(v)) continue;
    for (int k = k0; k < k0 + 16; ++k)
      if (keys[k] && job.key_col[k] >= 0) cpart[job.key_col[k]] += keys[k];
  }
  for (int k = kExpKeys; k < kNumKeys; ++k) cpart[job.key_col[k]] += keys[k];

  const bool has_nan = cpart[kNan] > 0;
  const bool has_inf = cpart[kPosInf] + cpart[kNegInf] > 0;
  const bool special = has_nan || has_inf || acc.maxabs == 0;
  const std::vector<double>& ps = *job.ps;
  for (size_t j = 0; j < ps.size(); ++j) {
    const double p = ps[j];
    NormPair np;
    if (special) {
      // NaN / Inf / all-zero chunks: the pair only has to carry that fact.
      np = {has_nan ? std::nan("") : (has_inf ? HUGE_VAL : 0.0), has_nan || has_inf ? 1.0 : 0.0};
    } else if (p == 1.0 || p == 2.0) {
      const double s = p == 1.0 ? acc.s1 : acc.s2;
      // Only float64 input can leave double's range here (|x| > 1e154 squared,
      // or every |x| < 1e-154 losing bits when squared).
      const bool bad = !std::isfinite(s) || (p == 2.0 && acc.maxabs < 0x1p-500);
      np = bad ? scaled_pass<C>(d, it.begin, it.end, p, acc.maxabs, buf) : NormPair{s, 1.0};
    } else {
      np = scaled_pass<C>(d, it.begin, it.end, p, acc.maxabs, buf);
    }
    fpart[2 * j] = np.s;
    fpart[2 * j + 1] = np.m;
  }
  fpart[2 * ps.size()] = acc.maxabs;
}

// norm = M * (sum_c s_c (m_c / M)^p)^(1/p), M = max m_c over chunks with s_c > 0.
double combine_pairs(const double* f, int64_t count, int64_t step, double p) {
  double M = 0;
  bool nan = false, inf = false;
  for (int64_t c = 0; c < count; ++c) {
    const double s = f[c * step], m = f[c * step + 1];
    nan |= std::isnan(s);
    inf |= std::isinf(s);
    if (s > 0 && m > M) M = m;
  }
  if (nan) return std::nan("");
  if (inf) return HUGE_VAL;
  if (M == 0) return 0.0;
  double S = 0;
  for (int64_t c = 0; c < count; ++c) {
    const double s = f[c * step], m = f[c * step + 1];
    if (s > 0) S += s * (m == M ? 1.0 : std::pow(m / M, p));
  }
  return M * std::pow(S, 1.0 / p);
}

}  // namespace

std::vector<TensorDesc> make_descs(const std::vector<int64_t>& ptrs, const std::vector<int64_t>& dtypes,
                                   const std::vector<int64_t>& numels, const std::vector<int64_t>& layout,
                                   const std::vector<int64_t>& dims) {
  const size_t T = ptrs.size();
  if (dtypes.size() != T || numels.size() != T || layout.size() != T)
    throw std::invalid_argument("fastgrad._C: tensor description arrays differ in length");
  std::vector<TensorDesc> descs(T);
  for (size_t t = 0; t < T; ++t) {
    TensorDesc& d = descs[t];
    d.data = reinterpret_cast<char*>(ptrs[t]);
    if (dtypes[t] < 0 || dtypes[t] > 3) throw std::invalid_argument("fastgrad._C: unknown dtype code");
    d.dtype = DType(dtypes[t]);
    d.numel = numels[t];
    if (layout[t] < 0) {
      d.ndim = 1;
      d.sizes[0] = d.numel;
      d.strides[0] = 1;
      continue;
    }
    const int64_t o = layout[t];
    const int64_t nd = dims.at(o);
    if (nd < 1 || nd > kMaxDims) throw std::invalid_argument("fastgrad._C: too many dimensions");
    d.ndim = int(nd);
    for (int k = 0; k < d.ndim; ++k) {
      d.sizes[k] = dims.at(o + 1 + k);
      d.strides[k] = dims.at(o + 1 + nd + k);
    }
  }
  return descs;
}

void grad_stats_cpu(const std::vector<TensorDesc>& descs, const std::vector<double>& ps, bool hist,
                    int min_exp, int max_exp, double* out_floats, int64_t* out_counts, int num_threads) {
  const int64_t T = int64_t(descs.size());
  Job job{&descs, &ps, min_exp, max_exp - min_exp + 2, hist, false, 0, 0};
  job.s1 = std::find(ps.begin(), ps.end(), 1.0) != ps.end();
  job.ncounts = kNumCounts + (hist ? job.num_bins : 0);
  job.nnorm = int(2 * ps.size() + 1);
  for (int k = 0; k < kNumKeys; ++k)
    job.key_col[k] = int16_t(k >= kExpKeys ? k - kExpKeys
                                           : (hist ? kNumCounts + bin_of_key(k, min_exp, job.num_bins) : -1));

  std::vector<Item> items;
  std::vector<int64_t> first_item(T + 1);
  for (int64_t t = 0; t < T; ++t) {
    first_item[t] = int64_t(items.size());
    const int64_t n = descs[t].numel;
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({t, b, std::min(n, b + kChunk)});
  }
  first_item[T] = int64_t(items.size());
  const int64_t W = int64_t(items.size());

  std::vector<double> fpart(size_t(W) * job.nnorm);
  // Single-chunk tensors write their counts straight into the output row.
  std::vector<int64_t> cpart;
  std::vector<int64_t*> crow(W);
  {
    int64_t extra = 0;
    for (int64_t t = 0; t < T; ++t)
      if (first_item[t + 1] - first_item[t] > 1) extra += first_item[t + 1] - first_item[t];
    cpart.resize(size_t(extra) * job.ncounts);
    int64_t k = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = first_item[t + 1] - first_item[t];
      for (int64_t w = first_item[t]; w < first_item[t + 1]; ++w)
        crow[w] = n == 1 ? out_counts + t * job.ncounts : cpart.data() + (k++) * job.ncounts;
    }
  }

  const int nt = std::max(1, std::min<int>(num_threads, int(std::max<int64_t>(W, 1))));
  // if(nt > 1): one thread runs the loops without entering an OpenMP region (a few
  // microseconds per region, most of a call on a handful of small gradients).
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt) if (nt > 1)
  for (int64_t w = 0; w < W; ++w) {
    const Item& it = items[w];
    double* f = fpart.data() + w * job.nnorm;
    if (descs[it.tensor].dtype == kF64) process_item<double>(job, it, f, crow[w]);
    else process_item<float>(job, it, f, crow[w]);
  }

  // Second stage: each tensor's chunks in chunk order (fixed, thread-independent).
  const int nf = int(ps.size()) + 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t w0 = first_item[t], nw = first_item[t + 1] - w0;
    double* out = out_floats + t * nf;
    int64_t* cout = out_counts + t * job.ncounts;
    if (nw == 0) {
      for (int j = 0; j < nf; ++j) out[j] = 0.0;
      for (int c = 0; c < job.ncounts; ++c) cout[c] = 0;
      continue;
    }
    const double* f = fpart.data() + w0 * job.nnorm;
    for (size_t j = 0; j < ps.size(); ++j) out[j] = combine_pairs(f + 2 * j, nw, job.nnorm, ps[j]);
    double mx = 0;
    for (int64_t c = 0; c < nw; ++c) mx = std::max(mx, f[c * job.nnorm + job.nnorm - 1]);
    out[nf - 1] = mx;
    if (nw > 1) {
      for (int c = 0; c < job.ncounts; ++c) cout[c] = 0;
      for (int64_t w = w0; w < w0 + nw; ++w)
        for (int c = 0; c < job.ncounts; ++c) cout[c] += crow[w][c];
    }
  }
}

// Row T of the tables: the total over rows [0, T), with fastgrad/aggregate.py's
// math — norm = M * (sum_t (n_t / M)^p)^(1/p), M = max n_t (NaN if any row is
// NaN, else Inf if any is Inf); max of max|x|; summed counts — summed in row
// order (torch.sum's order differs: the last bits may too).
void total_row_cpu(const std::vector<double>& ps, int64_t T, int ncounts, double* floats, int64_t* counts) {
  const int64_t nf = int64_t(ps.size()) + 1;
  double* out = floats + T * nf;
  for (size_t j = 0; j < ps.size(); ++j) {
    const double p = ps[j];
    double M = 0;
    bool nan = false, inf = false;
    for (int64_t t = 0; t < T; ++t) {
      const double n = floats[t * nf + int64_t(j)];
      nan |= std::isnan(n);
      inf |= std::isinf(n);
      M = n > M ? n : M;
    }
    double v = 0;
    if (nan) {
      v = std::nan("");
    } else if (inf) {
      v = HUGE_VAL;
    } else if (M > 0) {
      double S = 0;
      for (int64_t t = 0; t < T; ++t) {
        const double r = floats[t * nf + int64_t(j)] / M;
        S += p == 2.0 ? r * r : (p == 1.0 ? r : std::pow(r, p));
      }
      v = M * (p == 2.0 ? std::sqrt(S) : (p == 1.0 ? S : std::pow(S, 1.0 / p)));
    }
    out[j] = v;
  }
  double mx = 0;
  for (int64_t t = 0; t < T; ++t) mx = std::max(mx, floats[t * nf + nf - 1]);
  out[nf - 1] = mx;
  int64_t* cout = counts + T * ncounts;
  for (int c = 0; c < ncounts; ++c) cout[c] = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int c = 0; c < ncounts; ++c) cout[c] += counts[t * ncounts + c];
}

}  // namespace FASTGRAD_ISA_NS
}  // namespace fastgrad
FASTGRAD_ISA_TARGET_END

#endif  // FASTGRAD_ISA_BUILD
