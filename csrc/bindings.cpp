// pybind11 module fastgrad._C: the CPU kernels, called with raw pointers.
// The Python side (fastgrad/backends/cpu.py) checks dtypes, devices and
// layouts and allocates the outputs; nothing here knows about torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cpu/tensor_view.h"

namespace fastgrad {
void grad_stats_cpu(const std::vector<TensorDesc>& descs, const std::vector<double>& ps, bool hist,
                    int min_exp, int max_exp, double* out_floats, int64_t* out_counts, int num_threads);
void scale_cpu(const std::vector<TensorDesc>& descs, double coef, int num_threads);
void clamp_cpu(const std::vector<TensorDesc>& descs, double lo, double hi, int num_threads);
}  // namespace fastgrad

namespace py = pybind11;
using Ints = std::vector<int64_t>;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastgrad CPU kernels (raw-pointer interface; use fastgrad.grad_stats instead)";

  m.def(
      "grad_stats",
      [](const Ints& ptrs, const Ints& dtypes, const Ints& numels, const Ints& layout, const Ints& dims,
         const std::vector<double>& ps, bool hist, int min_exp, int max_exp, int64_t out_floats,
         int64_t out_counts, int num_threads) {
        auto descs = fastgrad::make_descs(ptrs, dtypes, numels, layout, dims);
        py::gil_scoped_release nogil;
        fastgrad::grad_stats_cpu(descs, ps, hist, min_exp, max_exp, reinterpret_cast<double*>(out_floats),
                                 reinterpret_cast<int64_t*>(out_counts), num_threads);
      },
      "Fill the float64 [T, P+1] and int64 [T, 4+B] statistics tables (see fastgrad/spec.py).");

  m.def(
      "scale_",
      [](const Ints& ptrs, const Ints& dtypes, const Ints& numels, const Ints& layout, const Ints& dims,
         int64_t coef_ptr, int num_threads) {
        auto descs = fastgrad::make_descs(ptrs, dtypes, numels, layout, dims);
        const double coef = *reinterpret_cast<const double*>(coef_ptr);
        py::gil_scoped_release nogil;
        fastgrad::scale_cpu(descs, coef, num_threads);
      },
      "x *= *coef_ptr (a float64) for every tensor; returns at once when the coefficient is 1.");

  m.def(
      "clamp_",
      [](const Ints& ptrs, const Ints& dtypes, const Ints& numels, const Ints& layout, const Ints& dims,
         double lo, double hi, int num_threads) {
        auto descs = fastgrad::make_descs(ptrs, dtypes, numels, layout, dims);
        py::gil_scoped_release nogil;
        fastgrad::clamp_cpu(descs, lo, hi, num_threads);
      },
      "x = clamp(x, lo, hi) for every tensor, NaN kept.");

#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
