// The optimizer step's epilogue on the CPU (see step_epilogue_cpu.cpp): plain pointers to a few
// small float64 / int64 state arrays, no torch header.
#pragma once

#include <cstdint>

namespace fastgrad {

// Clippers the epilogue computes itself (fastgrad/optim/epilogue.py CLIP_KINDS).
enum ClipKind : int { CLIP_NONE = 0, CLIP_GLOBAL = 1, CLIP_AUTO = 2, CLIP_Z = 3 };

struct EpilogueArgs {
  // -- this step's statistics -----------------------------------------------------------------
  const double* total_row = nullptr;     // the total row of the floats table (spec.py layout)
  int norm_col = 0;                      // column of the norm; -1: inf-norm (max column, NaN-aware)
  int max_col = 0;                       // column of max|x| (the last one)
  const int64_t* total_counts = nullptr; // the total row of the counts table (NaN count at column 0)
  const int64_t* tensor_counts = nullptr;  // per-tensor counts table, row stride `counts_stride`
  int64_t num_tensors = 0, counts_stride = 0;
  int nonfinite_cols = 3;                // NaN, +Inf, -Inf: summed into bad[] on a non-finite step
  int64_t* bad = nullptr;                // int64 [T]: per-tensor non-finite counts of the last bad step
  const float* amp_scale = nullptr;      // GradScaler's scale S (float32 0-d) or null
  const float* amp_found = nullptr;      // GradScaler's found_inf (float32 0-d) or null
  bool skip_nonfinite = true;
  // -- state ----------------------------------------------------------------------------------
  int64_t* counters = nullptr;           // int64 [4]: steps, skipped, nonfinite, spike
  double* spike_buf = nullptr;           // SpikeSkip ring buffer [spike_window], or null (off)
  int64_t* spike_count = nullptr;
  int64_t* spike_pos = nullptr;
  int64_t spike_window = 0;
  double spike_sigma = 0;
  int clip_kind = CLIP_NONE;
  double* clip_buf = nullptr;            // AutoClip history / ZClip warm-up norms [clip_len]
  int64_t clip_len = 0;
  int64_t* clip_count = nullptr;         // AutoClip count / ZClip seen
  int64_t* clip_pos = nullptr;           // AutoClip pos
  double* clip_mean = nullptr;           // ZClip EMA
  double* clip_var = nullptr;
  double max_norm = 0;                   // GlobalNorm max_norm; ZClip cap (inf: none)
  double quantile = 0;                   // AutoClip percentile / 100
  double alpha = 0, z_thresh = 0, z_eps = 0;
  bool z_adaptive = true;
  // -- outputs --------------------------------------------------------------------------------
  double* out_f64 = nullptr;             // [3]: true total norm, clip coefficient, scaling factor c/S (1 if skipped)
  uint8_t* out_bool = nullptr;           // [3]: skipped, nonfinite, spike (torch.bool bytes)
  float* out_f32 = nullptr;              // [2]: grad_scale = S / c, found_inf = skipped; or null
};

void step_epilogue_cpu(const EpilogueArgs& a);

}  // namespace fastgrad
