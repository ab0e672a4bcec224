// pybind11 module fastgrad._C: the CPU kernels, called with raw pointers.
// The Python side (fastgrad/backends/cpu.py) checks dtypes, devices and
// layouts and allocates the outputs; nothing here includes torch. The
// exceptions are the *_list functions and describe_plain, which read the few
// attributes they need from the tensors' Python objects themselves
// (csrc/common/plain_reader.h, shared with fastgrad._cuda).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/plain_reader.h"
#include "cpu/tensor_view.h"

namespace fastgrad {
void grad_stats_cpu(const std::vector<TensorDesc>& descs, const std::vector<double>& ps, bool hist,
                    int min_exp, int max_exp, double* out_floats, int64_t* out_counts, int num_threads);
void total_row_cpu(const std::vector<double>& ps, int64_t T, int ncounts, double* floats, int64_t* counts);
void scale_cpu(const std::vector<TensorDesc>& descs, double coef, int num_threads);
void clamp_cpu(const std::vector<TensorDesc>& descs, double lo, double hi, int num_threads);
}  // namespace fastgrad

namespace py = pybind11;
using Ints = std::vector<int64_t>;

namespace {

using fastgrad_reader::PlainMeta;
using fastgrad_reader::read_plain_tensors;

void descs_from_meta(const std::vector<PlainMeta>& meta, std::vector<fastgrad::TensorDesc>& descs) {
  descs.resize(meta.size());
  for (size_t i = 0; i < meta.size(); ++i) {
    fastgrad::TensorDesc& d = descs[i];
    d.data = reinterpret_cast<char*>(meta[i].ptr);
    d.dtype = fastgrad::DType(meta[i].code);
    d.numel = meta[i].numel;
    d.ndim = 1;
    d.sizes[0] = d.numel;
    d.strides[0] = 1;
  }
}

// The CPU kernels' descriptors of plain CPU tensors (see read_plain_tensors, which
// also says what `signed_values` allows). With `disjoint` (in-place ops), false
// also when two tensors share memory: the general path then applies them in list
// order (see in_list_order). `meta`: where the metadata is read to (or scratch).
bool read_plain_cpu_tensors(const py::list& tensors, py::handle tensor_type, const py::tuple& dtype_objs,
                            py::handle strided, std::vector<fastgrad::TensorDesc>& descs, int& dtype_mask,
                            bool disjoint = false, bool signed_values = true,
                            std::vector<PlainMeta>* meta_out = nullptr) {
  std::vector<PlainMeta> local;
  std::vector<PlainMeta>& meta = meta_out ? *meta_out : local;
  if (!read_plain_tensors(tensors, tensor_type, dtype_objs, strided, false, meta, dtype_mask, nullptr, signed_values))
    return false;
  if (disjoint && !fastgrad_reader::overlap_layers(fastgrad_reader::plain_spans(meta)).empty()) return false;
  descs_from_meta(meta, descs);
  return true;
}

// Runs an in-place op over `descs` so that tensors sharing memory are applied in
// list order (csrc/common/plain_reader.h, overlap_layers): the kernels split
// their work over threads, which would otherwise read and write a shared
// element concurrently. One call when no two tensors overlap.
template <typename Op>
void in_list_order(const std::vector<fastgrad::TensorDesc>& descs, Op&& op) {
  std::vector<std::pair<int64_t, int64_t>> spans(descs.size());
  for (size_t i = 0; i < descs.size(); ++i) {
    const fastgrad::TensorDesc& d = descs[i];
    int64_t lo = 0, hi = 0;
    for (int k = 0; k < d.ndim; ++k) (d.strides[k] < 0 ? lo : hi) += (d.sizes[k] - 1) * d.strides[k];
    const int64_t base = reinterpret_cast<int64_t>(d.data);
    spans[i] = d.numel == 0 ? std::make_pair(base, base)
                            : std::make_pair(base + lo * d.itemsize(), base + (hi + 1) * d.itemsize());
  }
  const std::vector<int> layer = fastgrad_reader::overlap_layers(spans);
  if (layer.empty()) return op(descs);
  const int layers = *std::max_element(layer.begin(), layer.end()) + 1;
  for (int k = 0; k < layers; ++k) {
    std::vector<fastgrad::TensorDesc> part;
    for (size_t i = 0; i < descs.size(); ++i)
      if (layer[i] == k) part.push_back(descs[i]);
    op(part);
  }
}

}  // namespace

#include "cpu/step_epilogue_cpu.h"  // fastgrad.optim.epilogue

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastgrad CPU kernels (raw-pointer interface; use fastgrad.grad_stats instead)";

  m.def(
      "grad_stats",
      [](const Ints& ptrs, const Ints& dtypes, const Ints& numels, const Ints& layout, const Ints& dims,
         const std::vector<double>& ps, bool hist, int min_exp, int max_exp, int64_t out_floats,
         int64_t out_counts, int num_threads, bool with_total) {
        auto descs = fastgrad::make_descs(ptrs, dtypes, numels, layout, dims);
        py::gil_scoped_release nogil;
        double* floats = reinterpret_cast<double*>(out_floats);
        int64_t* counts = reinterpret_cast<int64_t*>(out_counts);
        fastgrad::grad_stats_cpu(descs, ps, hist, min_exp, max_exp, floats, counts, num_threads);
        if (with_total)
          fastgrad::total_row_cpu(ps, int64_t(descs.size()), 4 + (hist ? max_exp - min_exp + 2 : 0), floats, counts);
      },
      py::arg("ptrs"), py::arg("dtypes"), py::arg("numels"), py::arg("layout"), py::arg("dims"), py::arg("ps"),
      py::arg("hist"), py::arg("min_exp"), py::arg("max_exp"), py::arg("out_floats"), py::arg("out_counts"),
      py::arg("num_threads"), py::arg("with_total") = false,
      "Fill the float64 [T, P+1] and int64 [T, 4+B] statistics tables (see fastgrad/spec.py); with_total: "
      "tables of T + 1 rows, row T the total.");

  m.def(
      "grad_stats_list",
      [](py::list tensors, py::handle tensor_type, py::tuple dtypes, py::handle strided,
         const std::vector<double>& ps, bool hist, int min_exp, int max_exp, int64_t out_floats,
         int64_t out_counts, int64_t out_numel, int num_threads, bool signed_values, int64_t out_meta) {
        std::vector<fastgrad::TensorDesc> descs;
        std::vector<PlainMeta> meta;
        int mask = 0;
        if (!read_plain_cpu_tensors(tensors, tensor_type, dtypes, strided, descs, mask, false, signed_values, &meta))
          return 0;
        const int64_t T = int64_t(descs.size());
        int64_t* numel = reinterpret_cast<int64_t*>(out_numel);
        numel[T] = 0;
        for (int64_t t = 0; t < T; ++t) numel[T] += numel[t] = descs[size_t(t)].numel;
        if (out_meta != 0) {  // kept for a later scale_meta (the clipping path: one read of the list)
          int64_t* o = reinterpret_cast<int64_t*>(out_meta);
          for (int64_t t = 0; t < T; ++t) {
            o[t] = meta[size_t(t)].ptr;
            o[T + t] = meta[size_t(t)].numel;
            o[2 * T + t] = meta[size_t(t)].code;
          }
        }
        py::gil_scoped_release nogil;
        double* floats = reinterpret_cast<double*>(out_floats);
        int64_t* counts = reinterpret_cast<int64_t*>(out_counts);
        fastgrad::grad_stats_cpu(descs, ps, hist, min_exp, max_exp, floats, counts, num_threads);
        const int ncounts = 4 + (hist ? max_exp - min_exp + 2 : 0);
        fastgrad::total_row_cpu(ps, T, ncounts, floats, counts);
        return mask;
      },
      py::arg("tensors"), py::arg("tensor_type"), py::arg("dtypes"), py::arg("strided"), py::arg("ps"),
      py::arg("hist"), py::arg("min_exp"), py::arg("max_exp"), py::arg("out_floats"), py::arg("out_counts"),
      py::arg("out_numel"), py::arg("num_threads"), py::arg("signed_values") = true, py::arg("out_meta") = 0,
      "grad_stats for a list of plain contiguous CPU tensors (dtypes: the torch dtypes of codes 0..3; "
      "tensor_type: a type or a tuple of two) into tables of T + 1 rows (row T: the total) and the int64 "
      "[T + 1] element counts. Returns the bit mask of the dtype codes seen, or 0 (and computes nothing) when "
      "some tensor is not of that kind. signed_values=False: negated views are read as their memory holds "
      "them (only the +Inf / -Inf counts then differ: for callers that read norms, maxima, NaN or zero "
      "counts). out_meta (an int64 [3 T] buffer, 0 = none): also the pointers, element counts and dtype codes "
      "read, for scale_meta.");

  m.def("describe_plain", &fastgrad_reader::describe_plain, py::arg("tensors"), py::arg("tensor_type"),
        py::arg("dtypes"), py::arg("strided"), py::arg("cuda"), py::arg("out_meta"), py::arg("disjoint") = false,
        py::arg("signed_values") = true, fastgrad_reader::kDescribePlainDoc);

  m.def(
      "scale_list",
      [](py::list tensors, py::handle tensor_type, py::tuple dtypes, py::handle strided, int64_t coef_ptr,
         int num_threads) {
        // Coefficient 1 (clipping that does not clip): nothing to write, so no
        // tensor needs reading either.
        const double coef = *reinterpret_cast<const double*>(coef_ptr);
        if (coef == 1.0) return true;
        std::vector<fastgrad::TensorDesc> descs;
        int mask = 0;
        // signed_values false: scaling commutes with negation (plain_reader.h)
        if (!read_plain_cpu_tensors(tensors, tensor_type, dtypes, strided, descs, mask, true, false)) return false;
        py::gil_scoped_release nogil;
        fastgrad::scale_cpu(descs, coef, num_threads);
        return true;
      },
      "scale_ for a list of plain contiguous CPU tensors (see grad_stats_list); false, touching "
      "nothing, when some tensor is not of that kind or two tensors share memory.");

  m.def(
      "scale_meta",
      [](py::list tensors, py::tuple kept, int64_t meta_ptr, int64_t coef_ptr, int num_threads) {
        // The tensors a grad_stats_list call read (`kept`: the items it read, in order; its
        // out_meta at meta_ptr), scaled without reading them again. Taken only when `tensors`
        // holds exactly those objects: the caller's reference to them keeps their memory, and
        // nothing in between (fastgrad's own coefficient arithmetic) changes their storage.
        const Py_ssize_t T = PyList_GET_SIZE(tensors.ptr());
        if (PyTuple_GET_SIZE(kept.ptr()) != T) return false;
        for (Py_ssize_t i = 0; i < T; ++i)
          if (PyList_GET_ITEM(tensors.ptr(), i) != PyTuple_GET_ITEM(kept.ptr(), i)) return false;
        const double coef = *reinterpret_cast<const double*>(coef_ptr);
        if (coef == 1.0) return true;
        const int64_t* m = reinterpret_cast<const int64_t*>(meta_ptr);
        std::vector<PlainMeta> meta(static_cast<size_t>(T));
        for (Py_ssize_t i = 0; i < T; ++i) meta[size_t(i)] = {m[i], m[T + i], int(m[2 * T + i])};
        std::vector<fastgrad::TensorDesc> descs;
        descs_from_meta(meta, descs);
        py::gil_scoped_release nogil;
        // tensors sharing memory ([x, x]) scaled in list order, as a per-tensor loop would
        in_list_order(descs, [&](const std::vector<fastgrad::TensorDesc>& d) { fastgrad::scale_cpu(d, coef, num_threads); });
        return true;
      },
      py::arg("tensors"), py::arg("kept"), py::arg("meta"), py::arg("coef_ptr"), py::arg("num_threads"),
      "x *= *coef_ptr for the tensors a grad_stats_list call with out_meta read (kept: the tuple of the "
      "tensors it was given; meta: its out_meta), without reading them again, in list order where they "
      "share memory. False, touching nothing, unless tensors holds exactly the kept objects.");

  m.def(
      "clamp_list",
      [](py::list tensors, py::handle tensor_type, py::tuple dtypes, py::handle strided, double lo, double hi,
         int num_threads) {
        std::vector<fastgrad::TensorDesc> descs;
        int mask = 0;
        // signed_values false: a clamp with lo = -hi commutes with negation (plain_reader.h); any other
        // bounds read negated views as the general path does
        if (!read_plain_cpu_tensors(tensors, tensor_type, dtypes, strided, descs, mask, true, lo != -hi)) return false;
        py::gil_scoped_release nogil;
        fastgrad::clamp_cpu(descs, lo, hi, num_threads);
        return true;
      },
      "clamp_ for a list of plain contiguous CPU tensors (see grad_stats_list); false, touching "
      "nothing, when some tensor is not of that kind or two tensors share memory.");

  m.def(
      "scale_",
      [](const Ints& ptrs, const Ints& dtypes, const Ints& numels, const Ints& layout, const Ints& dims,
         int64_t coef_ptr, int num_threads) {
        auto descs = fastgrad::make_descs(ptrs, dtypes, numels, layout, dims);
        const double coef = *reinterpret_cast<const double*>(coef_ptr);
        py::gil_scoped_release nogil;
        in_list_order(descs, [&](const std::vector<fastgrad::TensorDesc>& d) { fastgrad::scale_cpu(d, coef, num_threads); });
      },
      "x *= *coef_ptr (a float64) for every tensor, in list order where tensors share memory; returns at once "
      "when the coefficient is 1.");

  m.def(
      "clamp_",
      [](const Ints& ptrs, const Ints& dtypes, const Ints& numels, const Ints& layout, const Ints& dims,
         double lo, double hi, int num_threads) {
        auto descs = fastgrad::make_descs(ptrs, dtypes, numels, layout, dims);
        py::gil_scoped_release nogil;
        in_list_order(descs, [&](const std::vector<fastgrad::TensorDesc>& d) { fastgrad::clamp_cpu(d, lo, hi, num_threads); });
      },
      "x = clamp(x, lo, hi) for every tensor, NaN kept, in list order where tensors share memory.");

  // The optimizer step's epilogue (csrc/cpu/step_epilogue_cpu.cpp; order of the three lists:
  // fastgrad/optim/epilogue.py, _cpu_epilogue).
  m.def(
      "step_epilogue",
      [](const std::vector<int64_t>& p, const std::vector<int64_t>& i, const std::vector<double>& r) {
        if (p.size() != 18 || i.size() != 10 || r.size() != 6)
          throw std::invalid_argument("step_epilogue: expected 18 pointers, 10 ints and 6 reals");
        fastgrad::EpilogueArgs a;
        auto f64 = [&](int k) { return reinterpret_cast<double*>(p[size_t(k)]); };
        auto i64 = [&](int k) { return reinterpret_cast<int64_t*>(p[size_t(k)]); };
        a.total_row = f64(0);
        a.total_counts = i64(1);
        a.tensor_counts = i64(2);
        a.bad = i64(3);
        a.amp_scale = reinterpret_cast<const float*>(p[4]);
        a.amp_found = reinterpret_cast<const float*>(p[5]);
        a.counters = i64(6);
        a.spike_buf = f64(7);
        a.spike_count = i64(8);
        a.spike_pos = i64(9);
        a.clip_buf = f64(10);
        a.clip_count = i64(11);
        a.clip_pos = i64(12);
        a.clip_mean = f64(13);
        a.clip_var = f64(14);
        a.out_f64 = f64(15);
        a.out_bool = reinterpret_cast<uint8_t*>(p[16]);
        a.out_f32 = reinterpret_cast<float*>(p[17]);
        a.norm_col = int(i[0]);
        a.max_col = int(i[1]);
        a.num_tensors = i[2];
        a.counts_stride = i[3];
        a.nonfinite_cols = int(i[4]);
        a.skip_nonfinite = i[5] != 0;
        a.spike_window = i[6];
        a.clip_kind = int(i[7]);
        a.clip_len = i[8];
        a.z_adaptive = i[9] != 0;
        a.spike_sigma = r[0];
        a.max_norm = r[1];
        a.quantile = r[2];
        a.alpha = r[3];
        a.z_thresh = r[4];
        a.z_eps = r[5];
        fastgrad::step_epilogue_cpu(a);
        return a.out_bool[0] != 0;  // skipped, for the host (CPU tensors: no device to wait for)
      },
      "The optimizer step epilogue on small CPU state arrays (pointers; 0 = absent); returns the skip flag.");

#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
