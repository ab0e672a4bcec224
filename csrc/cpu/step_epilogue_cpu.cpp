// The optimizer step's epilogue on the CPU: what fastgrad.wrap()/attach() compute between the
// statistics pass and the optimizer kernel, in one call over a few small float64/int64 arrays
// (the GPU twin is fastgrad/step_epilogue_triton.py; the float64 torch-op definition, which both
// are tested against, is fastgrad/optim/epilogue.py reference_epilogue). No loop touches a gradient.
//
// With n_raw the statistics pass's global norm of the gradients as received, S the GradScaler's
// scale (1 when it has unscaled or is absent), eps = 1e-6 (torch's clip_grad_norm_):
//
//   n         = n_raw * (1 / S)                          the true global norm
//   nonfinite = !isfinite(n)
//   spike     = SpikeSkip's z-test of n against its window, & !nonfinite; the window takes n if finite
//   skipped   = (skip_nonfinite & nonfinite) | (found_inf > 0) | spike
//   update    = !skipped & !nonfinite                   stateful clippers advance only then
//   c         = GlobalNorm: min(max_norm / (n + eps), 1)
//               AutoClip:   min(t / (n + eps), 1), t = the percentile of the history (n appended)
//               ZClip:      see fastgrad/clip.py
//   grad_scale = float32(S / c), found_inf = float32(skipped)     (the fused optimizer's inputs)
//   factor     = c / S, 1 if skipped                               (the scaling pass otherwise)
//   counters  += (1, skipped, nonfinite, spike);  bad[i] = non-finite elements of tensor i if nonfinite
//
// Every operation is the reference's, in its order, so results are bitwise equal except where the
// reference sums a vector (SpikeSkip's and ZClip's means and variances: torch's summation order
// differs from this sequential one by a few ulps).
#include "cpu/step_epilogue_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// Bitwise equality with the reference needs every multiply-add rounded twice, as torch does.
#pragma GCC optimize("fp-contract=off")

namespace fastgrad {
namespace {

constexpr double kEps = 1e-6;  // torch's clip_grad_norm_ constant (fastgrad/clip.py EPS)
constexpr double kInf = std::numeric_limits<double>::infinity();

// torch.clamp(x, max=hi): NaN stays NaN.
inline double clamp_max(double x, double hi) { return x > hi ? hi : x; }

// SpikeSkip.check: is n a z-score outlier against the valid part of the window?
bool spike_check(const EpilogueArgs& a, double n) {
  const int64_t count = *a.spike_count;
  const double cnt = double(count);
  double sum = 0;
  for (int64_t i = 0; i < count; ++i) sum += a.spike_buf[i];
  const double mean = sum / std::max(cnt, 1.0);
  double ss = 0;
  for (int64_t i = 0; i < count; ++i) {
    const double d = a.spike_buf[i] - mean;
    ss += d * d;
  }
  const double var = ss / std::max(cnt - 1.0, 1.0);
  const bool active = count + 1 >= std::max<int64_t>(2, a.spike_window / 2) && count >= 2;
  return active && (n - mean) > a.spike_sigma * std::sqrt(var);
}

// SpikeSkip.update: append n where ok.
void spike_update(const EpilogueArgs& a, double n, bool ok) {
  if (!ok) return;
  a.spike_buf[*a.spike_pos] = n;
  *a.spike_count = std::min(*a.spike_count + 1, a.spike_window);
  *a.spike_pos = (*a.spike_pos + 1) % a.spike_window;
}

// AutoClip.coefficient: append n (if update), then clip to the percentile of the history.
double autoclip(const EpilogueArgs& a, double n, bool update) {
  if (update) {
    a.clip_buf[*a.clip_pos] = n;
    *a.clip_count = std::min(*a.clip_count + 1, a.clip_len);
    *a.clip_pos = (*a.clip_pos + 1) % a.clip_len;
  }
  const int64_t count = *a.clip_count;
  double t = kInf;
  if (count > 0) {
    // numpy's 'linear' percentile; the two order statistics are exact (selection, not a sort)
    std::vector<double> v(a.clip_buf, a.clip_buf + count);
    const double rank = double(count - 1) * a.quantile;
    const int64_t lo = int64_t(std::floor(rank));
    const int64_t hi = std::min(lo + 1, count - 1);
    std::nth_element(v.begin(), v.begin() + lo, v.end());
    const double v_lo = v[size_t(lo)];
    const double v_hi = hi == lo ? v_lo : *std::min_element(v.begin() + lo + 1, v.end());
    t = v_hi == v_lo ? v_lo : v_lo + (v_hi - v_lo) * (rank - double(lo));
  }
  return clamp_max(t / (n + kEps), 1.0);
}

// ZClip.coefficient: warm-up collection, then z-score clipping against the EMA.
double zclip(const EpilogueArgs& a, double n, bool update) {
  const int64_t warmup = a.clip_len;
  const int64_t seen = *a.clip_count;
  const bool live = seen >= warmup;
  const double cap = a.max_norm;
  const bool collect = update && !live;
  if (collect) a.clip_buf[seen] = n;
  const int64_t seen_new = seen + (collect ? 1 : 0);
  const bool start = collect && seen_new == warmup;
  const double warm_coef = clamp_max(cap / (n + kEps), 1.0);

  const double mean = *a.clip_mean, var = *a.clip_var;
  const double std_ = std::sqrt(var);
  const double z = (n - mean) / (std_ + a.z_eps);
  const bool spike = z > a.z_thresh;
  const double adaptive = a.z_adaptive ? mean + a.z_thresh * std_ / (z / a.z_thresh) : mean;
  const double x = spike ? adaptive : n;  // the EMA is fed the clipped norm
  const double t = clamp_max(x, cap);
  const double live_coef = n > t ? t / (n + kEps) : 1.0;
  if (start) {
    double sum = 0;
    for (int64_t i = 0; i < warmup; ++i) sum += a.clip_buf[i];
    const double w_mean = sum / double(warmup);
    double ss = 0;
    for (int64_t i = 0; i < warmup; ++i) {
      const double d = a.clip_buf[i] - w_mean;
      ss += d * d;
    }
    *a.clip_mean = w_mean;
    *a.clip_var = ss / double(warmup);
  } else if (update && live) {
    const double new_mean = a.alpha * mean + (1 - a.alpha) * x;
    const double d = x - new_mean;
    *a.clip_mean = new_mean;
    *a.clip_var = a.alpha * var + (1 - a.alpha) * (d * d);
  }
  *a.clip_count = seen_new;
  return live ? live_coef : warm_coef;
}

}  // namespace

void step_epilogue_cpu(const EpilogueArgs& a) {
  const double raw = a.norm_col >= 0 ? a.total_row[a.norm_col]
                                     : (a.total_counts[0] > 0 ? std::nan("") : a.total_row[a.max_col]);
  const double s = a.amp_scale ? double(*a.amp_scale) : 1.0;
  const double inv = 1.0 / s;
  const double n = a.amp_scale ? raw * inv : raw;
  const bool nonfinite = !std::isfinite(n);

  bool skip = a.skip_nonfinite && nonfinite;
  if (a.amp_found && *a.amp_found > 0) skip = true;
  bool spike = false;
  if (a.spike_buf) {
    spike = spike_check(a, n) && !nonfinite;
    spike_update(a, n, !nonfinite);
    skip = skip || spike;
  }
  const bool update = !skip && !nonfinite;

  double coef = 1.0;
  switch (a.clip_kind) {
    case CLIP_GLOBAL: coef = clamp_max(a.max_norm / (n + kEps), 1.0); break;
    case CLIP_AUTO: coef = autoclip(a, n, update); break;
    case CLIP_Z: coef = zclip(a, n, update); break;
    default: break;
  }
  const bool has_coef = a.clip_kind != CLIP_NONE;

  a.counters[0] += 1;
  a.counters[1] += skip;
  a.counters[2] += nonfinite;
  a.counters[3] += spike;
  if (nonfinite && a.bad) {
    for (int64_t i = 0; i < a.num_tensors; ++i) {
      const int64_t* row = a.tensor_counts + i * a.counts_stride;
      int64_t k = 0;
      for (int c = 0; c < a.nonfinite_cols; ++c) k += row[c];
      a.bad[i] = k;
    }
  }

  a.out_f64[0] = n;
  a.out_f64[1] = coef;
  // 1 on a skipped step: the scaling pass runs before the host reads the flag and must leave .grad as it was
  a.out_f64[2] = skip ? 1.0 : has_coef ? (a.amp_scale ? coef * inv : coef) : (a.amp_scale ? inv : 1.0);
  a.out_bool[0] = skip;
  a.out_bool[1] = nonfinite;
  a.out_bool[2] = spike;
  if (a.out_f32) {
    a.out_f32[0] = has_coef ? float(s / coef) : float(s);
    a.out_f32[1] = skip ? 1.0f : 0.0f;
  }
}

}  // namespace fastgrad
