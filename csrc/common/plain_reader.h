// The plain-tensor reader shared by fastgrad._C (csrc/bindings.cpp) and
// fastgrad._cuda (csrc/cuda/bindings_cuda.cpp): each module compiles its own
// copy (header-only), so the CUDA backend works even where _C failed to build.
//
// It reads the metadata of a Python list of tensors straight from their Python
// objects, in one pass: for thousands of small gradients, reading each
// tensor's metadata once here (instead of one Python pass per property) is most
// of what a call costs. Like the rest of csrc/ it includes no torch header:
// only pybind11 and the Python C API, with torch's Tensor type, dtype objects
// and `torch.strided` passed in by the caller.
//
// Also here: the hash that keys the backends' plan caches
// (fastgrad/backends/chunk_plan.py), and the memory-overlap layering that
// in-place multi-tensor ops use (fastgrad/backends/_layout.py, overlap_layers).
#pragma once

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastgrad_reader {

namespace py = pybind11;

// Calls a no-argument method of a Python object; null on error.
inline PyObject* call0(PyObject* obj, PyObject* name) {
  PyObject* args[] = {obj};
  return PyObject_VectorcallMethod(name, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
}

// One plain tensor as read from its Python object.
struct PlainMeta {
  int64_t ptr, numel;
  int code;  // dtype code 0..3 (fastgrad/spec.py DTYPE_CODES)
};

inline int64_t itemsize_of_code(int code) { return code == 1 ? 8 : code == 0 ? 4 : 2; }

// Reads a list of tensors. Only the plain case is taken: every item exactly a
// `tensor_type`, strided, contiguous, of one of the four `dtypes`, with its
// values in its memory (not a negated view, not a forward-mode AD zero tensor,
// which has no memory), and all on the CPU (cuda false) or all on one CUDA
// device (cuda true; its index goes to *device). Returns false, with no Python
// error set, for anything else: the caller then takes its general path, which
// also says what is wrong with the input.
inline bool read_plain_tensors(const py::list& tensors, py::handle tensor_type, const py::tuple& dtype_objs,
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

// 64-bit FNV-1a over (numel, code) of every tensor, shifted to fit an int64:
// the key of the plan caches (fastgrad/backends/chunk_plan.py, PlanCache.get_by_hash).
inline int64_t plan_hash(const std::vector<PlainMeta>& meta) {
  uint64_t h = 1469598103934665603ull;
  for (const PlainMeta& m : meta) {
    h = (h ^ uint64_t(m.numel)) * 1099511628211ull;
    h = (h ^ uint64_t(m.code)) * 1099511628211ull;
  }
  return int64_t(h >> 1);
}

// Byte span [first, past-the-end) of each tensor: `spans` as (lo, hi) pairs.
// Layers for in-place ops over tensors that may share memory: tensor i goes in
// layer 1 + max(layer of every earlier tensor whose span overlaps its own), so
// no two tensors of a layer share memory and running the layers one after
// another applies the op in list order, as a per-tensor loop would ([x, x]
// scales x twice). Returns an empty vector when no two spans overlap (the
// common case: one sort, one sweep). Same rule as fastgrad/backends/_layout.py.
inline std::vector<int> overlap_layers(const std::vector<std::pair<int64_t, int64_t>>& spans) {
  const size_t T = spans.size();
  std::vector<size_t> order;
  order.reserve(T);
  for (size_t i = 0; i < T; ++i)
    if (spans[i].second > spans[i].first) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return spans[a].first < spans[b].first; });
  std::vector<std::pair<size_t, size_t>> pairs;  // (earlier, later) positions that overlap
  std::vector<size_t> open;
  for (size_t i : order) {
    const int64_t lo = spans[i].first;
    open.erase(std::remove_if(open.begin(), open.end(), [&](size_t j) { return spans[j].second <= lo; }),
               open.end());
    for (size_t j : open) pairs.emplace_back(std::min(i, j), std::max(i, j));
    open.push_back(i);
  }
  if (pairs.empty()) return {};
  std::sort(pairs.begin(), pairs.end(),
            [](const auto& a, const auto& b) { return a.second < b.second; });  // by the later position
  std::vector<int> layer(T, 0);
  for (const auto& p : pairs) layer[p.second] = std::max(layer[p.second], layer[p.first] + 1);
  return layer;
}

inline std::vector<std::pair<int64_t, int64_t>> plain_spans(const std::vector<PlainMeta>& meta) {
  std::vector<std::pair<int64_t, int64_t>> s(meta.size());
  for (size_t i = 0; i < meta.size(); ++i)
    s[i] = {meta[i].ptr, meta[i].ptr + meta[i].numel * itemsize_of_code(meta[i].code)};
  return s;
}

// The body of describe_plain (bound by both modules): reads plain tensors into
// the int64 [3 T] buffer at out_meta (pointers, element counts, dtype codes)
// and returns (dtype mask, CUDA device index, plan hash), or (0, -1, 0) when
// some tensor is not plain or, with `disjoint`, when two tensors share memory
// (the caller's general path then applies them in list order).
inline py::tuple describe_plain(py::list tensors, py::handle tensor_type, py::tuple dtypes, py::handle strided,
                                bool cuda, int64_t out_meta, bool disjoint) {
  std::vector<PlainMeta> meta;
  int mask = 0, device = -1;
  if (!read_plain_tensors(tensors, tensor_type, dtypes, strided, cuda, meta, mask, &device) ||
      (disjoint && !overlap_layers(plain_spans(meta)).empty()))
    return py::make_tuple(0, -1, int64_t(0));
  int64_t* o = reinterpret_cast<int64_t*>(out_meta);
  const size_t T = meta.size();
  for (size_t i = 0; i < T; ++i) {
    o[i] = meta[i].ptr;
    o[T + i] = meta[i].numel;
    o[2 * T + i] = meta[i].code;
  }
  return py::make_tuple(mask, device, plan_hash(meta));
}

constexpr const char* kDescribePlainDoc =
    "Read plain contiguous tensors' metadata (all on the CPU, or all on one CUDA device with cuda) into the "
    "int64 [3 T] buffer at out_meta: pointers, element counts, dtype codes. Returns (dtype mask, CUDA device "
    "index, hash of counts and codes), or (0, -1, 0) when some tensor is not plain or, with disjoint, when two "
    "tensors share memory.";

}  // namespace fastgrad_reader
