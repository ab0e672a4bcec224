// pybind11 module fastgrad._C: the CPU kernels, called with raw pointers.
// The Python side (fastgrad/backends/cpu.py) checks dtypes, devices and
// layouts and allocates the outputs; nothing here includes torch. The one
// exception is grad_stats_list, which reads the few attributes it needs from
// the tensors' Python objects itself (see there).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

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

// Calls a no-argument method (or reads an attribute) of a Python object; null on error.
PyObject* call0(PyObject* obj, PyObject* name) {
  PyObject* args[] = {obj};
  return PyObject_VectorcallMethod(name, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
}

// One plain tensor as read from its Python object.
struct PlainMeta {
  int64_t ptr, numel;
  int code;  // dtype code 0..3 (fastgrad/backends/cpu.py DTYPE_CODES)
};

// The metadata of a list of tensors read straight from their Python objects,
// in one pass: for thousands of small gradients, reading each tensor's
// metadata once here (instead of one Python pass per property) is most of
// what a statistics call costs. Only the plain case is taken: every item
// exactly a `tensor_type`, strided, contiguous, of one of the four `dtypes`,
// with its values in its memory (not a negated view, not a forward-mode AD
// zero tensor, which has no memory), and all on the CPU (cuda false) or all
// on one CUDA device (cuda true; its index goes to *device). Returns false, with no Python error set, for
// anything else: the caller then takes its general path, which also says
// what is wrong with the input.
bool read_plain_tensors(const py::list& tensors, py::handle tensor_type, const py::tuple& dtype_objs,
                        py::handle strided, bool cuda, std::vector<PlainMeta>& out, int& dtype_mask,
                        int* device = nullptr) {
  // A snapshot holding its own references: the attribute reads below may run
  // Python code (a TorchFunctionMode, say) that changes the caller's list.
  const py::tuple items = py::reinterpret_steal<py::tuple>(PySequence_Tuple(tensors.ptr()));
  if (!items) {
    PyErr_Clear();
    return false;
  }
  PyObject* dtypes[4];
  for (int c = 0; c < 4; ++c) dtypes[c] = dtype_objs[c].ptr();
  static PyObject* s_is_cpu = PyUnicode_InternFromString("is_cpu");
  static PyObject* s_is_cuda = PyUnicode_InternFromString("is_cuda");
  static PyObject* s_get_device = PyUnicode_InternFromString("get_device");
  static PyObject* s_layout = PyUnicode_InternFromString("layout");
  static PyObject* s_dtype = PyUnicode_InternFromString("dtype");
  static PyObject* s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
  static PyObject* s_numel = PyUnicode_InternFromString("numel");
  static PyObject* s_data_ptr = PyUnicode_InternFromString("data_ptr");
  static PyObject* s_is_neg = PyUnicode_InternFromString("is_neg");
  const Py_ssize_t T = PyTuple_GET_SIZE(items.ptr());
  out.resize(size_t(T));
  dtype_mask = 0;
  long long first_device = -1;
  for (Py_ssize_t i = 0; i < T; ++i) {
    PyObject* t = PyTuple_GET_ITEM(items.ptr(), i);
    if (Py_TYPE(t) != (PyTypeObject*)tensor_type.ptr()) return false;
    PyObject* r = PyObject_GetAttr(t, cuda ? s_is_cuda : s_is_cpu);
    bool ok = r == Py_True;
    Py_XDECREF(r);
    if (ok && cuda) {
      r = call0(t, s_get_device);
      const long long dev = r ? PyLong_AsLongLong(r) : -1;
      Py_XDECREF(r);
      if (i == 0) first_device = dev;
      ok = dev >= 0 && dev == first_device;
    }
    if (ok) {
      r = PyObject_GetAttr(t, s_layout);
      ok = r == strided.ptr();
      Py_XDECREF(r);
    }
    int code = -1;
    if (ok) {
      r = PyObject_GetAttr(t, s_dtype);
      for (int c = 0; c < 4; ++c)
        if (r == dtypes[c]) code = c;
      Py_XDECREF(r);
      ok = code >= 0;
    }
    if (ok) {
      r = call0(t, s_is_contiguous);
      ok = r == Py_True;
      Py_XDECREF(r);
    }
    if (ok) {
      r = call0(t, s_is_neg);
      ok = r == Py_False;
      Py_XDECREF(r);
    }
    long long numel = -1, ptr = 0;
    if (ok) {
      r = call0(t, s_numel);
      numel = r ? PyLong_AsLongLong(r) : -1;
      Py_XDECREF(r);
      r = call0(t, s_data_ptr);
      ptr = r ? PyLong_AsLongLong(r) : 0;
      Py_XDECREF(r);
      ok = numel >= 0 && (ptr != 0 || numel == 0) && !PyErr_Occurred();
    }
    if (!ok) {
      PyErr_Clear();
      return false;
    }
    out[size_t(i)] = {ptr, numel, code};
    dtype_mask |= 1 << code;
  }
  if (device) *device = int(first_device);
  return true;
}

// The CPU kernels' descriptors of plain CPU tensors (see read_plain_tensors).
bool read_plain_cpu_tensors(const py::list& tensors, py::handle tensor_type, const py::tuple& dtype_objs,
                            py::handle strided, std::vector<fastgrad::TensorDesc>& descs, int& dtype_mask) {
  std::vector<PlainMeta> meta;
  if (!read_plain_tensors(tensors, tensor_type, dtype_objs, strided, false, meta, dtype_mask)) return false;
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
  return true;
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
         int64_t out_counts, int64_t out_numel, int num_threads) {
        std::vector<fastgrad::TensorDesc> descs;
        int mask = 0;
        if (!read_plain_cpu_tensors(tensors, tensor_type, dtypes, strided, descs, mask)) return 0;
        const int64_t T = int64_t(descs.size());
        int64_t* numel = reinterpret_cast<int64_t*>(out_numel);
        numel[T] = 0;
        for (int64_t t = 0; t < T; ++t) numel[T] += numel[t] = descs[size_t(t)].numel;
        py::gil_scoped_release nogil;
        double* floats = reinterpret_cast<double*>(out_floats);
        int64_t* counts = reinterpret_cast<int64_t*>(out_counts);
        fastgrad::grad_stats_cpu(descs, ps, hist, min_exp, max_exp, floats, counts, num_threads);
        const int ncounts = 4 + (hist ? max_exp - min_exp + 2 : 0);
        fastgrad::total_row_cpu(ps, T, ncounts, floats, counts);
        return mask;
      },
      "grad_stats for a list of plain contiguous CPU tensors (dtypes: the torch dtypes of codes 0..3) "
      "into tables of T + 1 rows (row T: the total) and the int64 [T + 1] element counts. Returns the "
      "bit mask of the dtype codes seen, or 0 (and computes nothing) when some tensor is not of that kind.");

  m.def(
      "describe_plain",
      [](py::list tensors, py::handle tensor_type, py::tuple dtypes, py::handle strided, bool cuda,
         int64_t out_meta) {
        std::vector<PlainMeta> meta;
        int mask = 0, device = -1;
        if (!read_plain_tensors(tensors, tensor_type, dtypes, strided, cuda, meta, mask, &device))
          return py::tuple(py::make_tuple(0, -1, int64_t(0)));
        // out_meta: int64 [3 T] = pointers, element counts, dtype codes. The
        // hash (FNV-1a over counts and codes) keys the caller's plan cache.
        int64_t* o = reinterpret_cast<int64_t*>(out_meta);
        const size_t T = meta.size();
        uint64_t h = 1469598103934665603ull;
        for (size_t i = 0; i < T; ++i) {
          o[i] = meta[i].ptr;
          o[T + i] = meta[i].numel;
          o[2 * T + i] = meta[i].code;
          h = (h ^ uint64_t(meta[i].numel)) * 1099511628211ull;
          h = (h ^ uint64_t(meta[i].code)) * 1099511628211ull;
        }
        return py::tuple(py::make_tuple(mask, device, int64_t(h >> 1)));
      },
      "Read plain contiguous tensors' metadata (all on the CPU, or all on one CUDA device with cuda) "
      "into the int64 [3 T] buffer at out_meta: pointers, element counts, dtype codes. Returns (dtype "
      "mask, CUDA device index, hash of counts and codes), or (0, -1, 0) when some tensor is not plain.");

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
        if (!read_plain_cpu_tensors(tensors, tensor_type, dtypes, strided, descs, mask)) return false;
        py::gil_scoped_release nogil;
        fastgrad::scale_cpu(descs, coef, num_threads);
        return true;
      },
      "scale_ for a list of plain contiguous CPU tensors (see grad_stats_list); false, touching "
      "nothing, when some tensor is not of that kind.");

  m.def(
      "clamp_list",
      [](py::list tensors, py::handle tensor_type, py::tuple dtypes, py::handle strided, double lo, double hi,
         int num_threads) {
        std::vector<fastgrad::TensorDesc> descs;
        int mask = 0;
        if (!read_plain_cpu_tensors(tensors, tensor_type, dtypes, strided, descs, mask)) return false;
        py::gil_scoped_release nogil;
        fastgrad::clamp_cpu(descs, lo, hi, num_threads);
        return true;
      },
      "clamp_ for a list of plain contiguous CPU tensors (see grad_stats_list); false, touching "
      "nothing, when some tensor is not of that kind.");

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
