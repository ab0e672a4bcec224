// pybind11 module fastgrad._cuda: launchers of csrc/cuda/grad_stats_cuda.cu.
// Every argument is a raw device pointer (as int), a size, or a stream handle
// (torch.cuda.current_stream().cuda_stream); fastgrad/backends/cuda.py
// builds the tables and checks devices and dtypes. describe_plain is the
// plain-tensor reader shared with fastgrad._C (csrc/common/plain_reader.h),
// compiled in here too so that this module needs nothing from _C.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/plain_reader.h"

#include <cstdint>
#include <vector>

namespace fastgrad_cuda {
void launch_stats(int64_t ptrs, int64_t dtypes, int64_t numels, int64_t item_tensor, int64_t item_begin,
                  int64_t item_range, int64_t num_items, int64_t num_tensors, const std::vector<double>& ps,
                  bool hist, int min_exp, int max_exp, int64_t partials, int64_t out_floats, int64_t out_counts,
                  int64_t stream_handle);
void launch_scale(int64_t ptrs, int64_t dtypes, int64_t numels, int64_t item_tensor, int64_t item_begin,
                  int64_t num_items, int64_t coef, int64_t stream_handle);
void launch_clamp(int64_t ptrs, int64_t dtypes, int64_t numels, int64_t item_tensor, int64_t item_begin,
                  int64_t num_items, double lo, double hi, int64_t stream_handle);
int64_t chunk_size();
}  // namespace fastgrad_cuda

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastgrad CUDA kernels (raw-pointer interface; use fastgrad.grad_stats instead)";
  m.def("stats", &fastgrad_cuda::launch_stats, "statistics pass: memset + stats_kernel + combine_kernel");
  m.def("scale_", &fastgrad_cuda::launch_scale, "x *= *coef in place; blocks exit at once when *coef == 1");
  m.def("clamp_", &fastgrad_cuda::launch_clamp, "x = clamp(x, lo, hi) in place, NaN kept");
  m.def("chunk_size", &fastgrad_cuda::chunk_size, "elements per work item");
  m.def("describe_plain", &fastgrad_reader::describe_plain, pybind11::arg("tensors"), pybind11::arg("tensor_type"),
        pybind11::arg("dtypes"), pybind11::arg("strided"), pybind11::arg("cuda"), pybind11::arg("out_meta"),
        pybind11::arg("disjoint") = false, pybind11::arg("signed_values") = true,
        fastgrad_reader::kDescribePlainDoc);
}
