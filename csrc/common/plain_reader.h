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

// One plain tensor as read from its Python object.
struct PlainMeta {
  int64_t ptr, numel;
  int code;  // dtype code 0..3 (fastgrad/spec.py DTYPE_CODES)
};

inline int64_t itemsize_of_code(int code) { return code == 1 ? 8 : code == 0 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------
// Reading one attribute without the generic attribute machinery.
//
// `t.dtype` through PyObject_GetAttr walks GenericGetAttr -> _PyType_Lookup -> the getset
// descriptor -> its C getter; `t.data_ptr()` through PyObject_VectorcallMethod walks
// _PyObject_GetMethod -> the method descriptor -> its vectorcall trampoline -> the C function.
// For thousands of small tensors that walk was about a quarter of the reader's time (seven reads:
// 371 -> 286 ns a tensor measured here; perf: _PyType_Lookup, _PyObject_GetMethod,
// VectorcallMethod, GenericGetAttr). What is left is torch's own work per call
// (HANDLE_TH_ERRORS' warning-handler TLS, the torch-function-mode check): about 30 ns a read,
// hence also fewer reads (nbytes for numel(), no is_neg() where signs do not matter). An Attr looks the descriptor up once per call on the tensor's
// exact type, exactly as the generic path would, and when it is the kind torch defines (a
// getset_descriptor with a getter, or a method_descriptor taking no arguments) calls its C
// function directly: the same function the generic path ends in, with the same arguments, so
// the result, the errors and torch's own handling (__torch_function__ modes, warnings) are the
// same. Anything else — someone replaced torch.Tensor.dtype or .data_ptr with a Python property
// or function, a type that is not torch's — takes the generic path.
//
// A method (unlike a getset, a data descriptor) can be shadowed by an attribute of the instance
// (`t.data_ptr = f`): methods are called directly only when the instance has no attribute of
// that name (see instance_has), else generically; on Python >= 3.13 (object layout not relied
// on) methods always take the generic path.
// ---------------------------------------------------------------------------------------------

// Whether `obj`'s instance dictionary holds `name` (a method shadowed on the instance). True
// where that cannot be told cheaply (then the caller takes the generic path, which is exact).
inline bool instance_has(PyObject* obj, PyObject* name) {
#if PY_VERSION_HEX < 0x030D0000
  // (3.11/3.12: a managed dict that still holds inline values is turned into a dict here, once,
  // with the same contents; tensors without instance attributes have none and are untouched.)
  PyObject** dict_ptr = _PyObject_GetDictPtr(obj);
  if (dict_ptr == nullptr || *dict_ptr == nullptr || PyDict_GET_SIZE(*dict_ptr) == 0) return false;
  PyObject* v = PyDict_GetItemWithError(*dict_ptr, name);  // borrowed
  if (v == nullptr && PyErr_Occurred()) {
    PyErr_Clear();
    return true;
  }
  return v != nullptr;
#else
  (void)obj;
  (void)name;
  return true;  // object layout not relied on: always the generic path
#endif
}

class Attr {
 public:
  // `method`: called with no arguments (`t.name()`), else read (`t.name`).
  void init(PyTypeObject* type, PyObject* name, bool method) {
    name_ = name;
    method_ = method;
    get_ = nullptr;
    fn_ = nullptr;
    kind_ = kGeneric;
    PyObject* d = _PyType_Lookup(type, name);  // borrowed; what the generic lookup finds first
    if (d == nullptr) return;
    if (!method && Py_IS_TYPE(d, &PyGetSetDescr_Type)) {
      PyGetSetDef* def = reinterpret_cast<PyGetSetDescrObject*>(d)->d_getset;
      if (def->get != nullptr) {
        get_ = def->get;
        closure_ = def->closure;
        kind_ = kGetter;
      }
    } else if (method && Py_IS_TYPE(d, &PyMethodDescr_Type)) {
      PyMethodDef* def = reinterpret_cast<PyMethodDescrObject*>(d)->d_method;
      const int flags = def->ml_flags & ~METH_COEXIST;
      fn_ = def->ml_meth;
      if (flags == METH_NOARGS)
        kind_ = kNoArgs;
      else if (flags == (METH_VARARGS | METH_KEYWORDS))
        kind_ = kVarargsKw;
      else if (flags == METH_VARARGS)
        kind_ = kVarargs;
      else if (flags == METH_FASTCALL)
        kind_ = kFast;
      else if (flags == (METH_FASTCALL | METH_KEYWORDS))
        kind_ = kFastKw;
    }
  }

  // New reference, or null with a Python error set. `shadow_free`: the instance has no
  // attributes at all (instance_has would be false for every name).
  PyObject* read(PyObject* t, bool shadow_free) const {
    if (kind_ == kGetter) return get_(t, closure_);
    if (kind_ != kGeneric && (shadow_free || !instance_has(t, name_))) {
      PyObject* empty = empty_tuple();
      switch (kind_) {
        case kNoArgs: return fn_(t, nullptr);
        case kVarargsKw: return reinterpret_cast<PyCFunctionWithKeywords>(reinterpret_cast<void (*)(void)>(fn_))(t, empty, nullptr);
        case kVarargs: return fn_(t, empty);
        case kFast: return reinterpret_cast<_PyCFunctionFast>(reinterpret_cast<void (*)(void)>(fn_))(t, nullptr, 0);
        case kFastKw:
          return reinterpret_cast<_PyCFunctionFastWithKeywords>(reinterpret_cast<void (*)(void)>(fn_))(t, nullptr, 0, nullptr);
        default: break;
      }
    }
    if (!method_) return PyObject_GetAttr(t, name_);
    PyObject* args[] = {t};
    return PyObject_VectorcallMethod(name_, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
  }

 private:
  enum Kind { kGeneric, kGetter, kNoArgs, kVarargsKw, kVarargs, kFast, kFastKw };
  static PyObject* empty_tuple() {
    static PyObject* e = PyTuple_New(0);  // immortal for our purposes: never released
    return e;
  }
  PyObject* name_ = nullptr;
  bool method_ = false;
  Kind kind_ = kGeneric;
  getter get_ = nullptr;
  void* closure_ = nullptr;
  PyCFunction fn_ = nullptr;
};

inline PyObject* interned(const char* s) { return PyUnicode_InternFromString(s); }

// The attributes the reader needs, resolved for one exact tensor type.
struct TypeReader {
  PyTypeObject* type = nullptr;
  Attr on_device, get_device, layout, dtype, is_contiguous, is_neg, nbytes, data_ptr;

  void init(PyTypeObject* tp, bool cuda) {
    static PyObject* s_is_cpu = interned("is_cpu");
    static PyObject* s_is_cuda = interned("is_cuda");
    static PyObject* s_get_device = interned("get_device");
    static PyObject* s_layout = interned("layout");
    static PyObject* s_dtype = interned("dtype");
    static PyObject* s_is_contiguous = interned("is_contiguous");
    static PyObject* s_is_neg = interned("is_neg");
    static PyObject* s_nbytes = interned("nbytes");
    static PyObject* s_data_ptr = interned("data_ptr");
    type = tp;
    on_device.init(tp, cuda ? s_is_cuda : s_is_cpu, false);
    get_device.init(tp, s_get_device, true);
    layout.init(tp, s_layout, false);
    dtype.init(tp, s_dtype, false);
    is_contiguous.init(tp, s_is_contiguous, true);
    is_neg.init(tp, s_is_neg, true);
    nbytes.init(tp, s_nbytes, false);
    data_ptr.init(tp, s_data_ptr, true);
  }
};

// Reads a list of tensors. Only the plain case is taken: every item exactly of one of
// `tensor_types` (a type, or a tuple of at most two types: torch.Tensor, and torch.nn.Parameter
// where the caller only reads), strided, contiguous, of one of the four `dtypes`, with its values
// in its memory (not a forward-mode AD zero tensor, which has none; not a negated view when
// `signed_values`, see below), and all on the CPU (cuda false) or all on one CUDA device (cuda
// true; its index goes to *device). Returns false, with no Python error set, for anything else:
// the caller then takes its general path, which also says what is wrong with the input.
//
// Negated views (torch._neg_view, t.is_neg(): memory holds -x) and `signed_values`: a caller that
// only needs results invariant under x -> -x of whole tensors, or in-place ops that commute with
// it, passes false and the view is read as it lies in memory:
//   * norms, max |x|, NaN and zero counts (+0 and -0 both zero), the power-of-two magnitude
//     histogram: functions of |x| only;
//   * scale by c: memory m = -x becomes c m = -(c x), the view then reads c x;
//   * clamp to [lo, hi] with lo = -hi (the only clamp fastgrad runs): clamp(-x, -h, h) =
//     -clamp(x, -h, h), NaN kept either way.
// The +Inf and -Inf counts are not invariant (a negated +Inf is -Inf in memory): the full
// statistics tables (grad_stats_list by default, the CUDA statistics pass) pass true and leave
// negated views to the general path, which resolves them.
inline bool read_plain_tensors(const py::list& tensors, py::handle tensor_types, const py::tuple& dtype_objs,
                               py::handle strided, bool cuda, std::vector<PlainMeta>& out, int& dtype_mask,
                               int* device = nullptr, bool signed_values = true, py::tuple* snapshot = nullptr) {
  // A snapshot holding its own references: the attribute reads below may run
  // Python code (a TorchFunctionMode, say) that changes the caller's list.
  py::tuple items = py::reinterpret_steal<py::tuple>(PySequence_Tuple(tensors.ptr()));
  if (!items) {
    PyErr_Clear();
    return false;
  }
  PyObject* accepted[2] = {nullptr, nullptr};
  if (PyTuple_Check(tensor_types.ptr())) {
    const Py_ssize_t n = PyTuple_GET_SIZE(tensor_types.ptr());
    if (n < 1 || n > 2) return false;
    for (Py_ssize_t k = 0; k < n; ++k) accepted[k] = PyTuple_GET_ITEM(tensor_types.ptr(), k);
  } else {
    accepted[0] = tensor_types.ptr();
  }
  PyObject* dtypes[4];
  for (int c = 0; c < 4; ++c) dtypes[c] = dtype_objs[c].ptr();
  // Resolved on first use in this call (never cached across calls: a patched torch.Tensor is
  // seen at once). At most two types, so a tensor's reader is found by one or two compares.
  TypeReader readers[2];
  const Py_ssize_t T = PyTuple_GET_SIZE(items.ptr());
  out.resize(size_t(T));
  dtype_mask = 0;
  long long first_device = -1;
  for (Py_ssize_t i = 0; i < T; ++i) {
    PyObject* t = PyTuple_GET_ITEM(items.ptr(), i);
    PyTypeObject* tp = Py_TYPE(t);
    int k = tp == reinterpret_cast<PyTypeObject*>(accepted[0]) ? 0
            : (accepted[1] != nullptr && tp == reinterpret_cast<PyTypeObject*>(accepted[1])) ? 1
                                                                                             : -1;
    if (k < 0) return false;
    TypeReader& rd = readers[k];
    if (rd.type == nullptr) rd.init(tp, cuda);
    // No instance attributes at all (the usual tensor): no method can be shadowed.
    bool shadow_free = false;
#if PY_VERSION_HEX < 0x030D0000
    {
      PyObject** dict_ptr = _PyObject_GetDictPtr(t);
      shadow_free = dict_ptr == nullptr || *dict_ptr == nullptr || PyDict_GET_SIZE(*dict_ptr) == 0;
      PyErr_Clear();  // (materialising a dict may fail: then shadow_free is false, the slow path is exact)
    }
#endif
    PyObject* r = rd.on_device.read(t, shadow_free);
    bool ok = r == Py_True;
    Py_XDECREF(r);
    if (ok && cuda) {
      r = rd.get_device.read(t, shadow_free);
      const long long dev = r ? PyLong_AsSsize_t(r) : -1;
      Py_XDECREF(r);
      if (i == 0) first_device = dev;
      ok = dev >= 0 && dev == first_device;
    }
    if (ok) {
      r = rd.layout.read(t, shadow_free);
      ok = r == strided.ptr();
      Py_XDECREF(r);
    }
    int code = -1;
    if (ok) {
      r = rd.dtype.read(t, shadow_free);
      for (int c = 0; c < 4; ++c)
        if (r == dtypes[c]) code = c;
      Py_XDECREF(r);
      ok = code >= 0;
    }
    if (ok) {
      r = rd.is_contiguous.read(t, shadow_free);
      ok = r == Py_True;
      Py_XDECREF(r);
    }
    if (ok && signed_values) {
      r = rd.is_neg.read(t, shadow_free);
      ok = r == Py_False;
      Py_XDECREF(r);
    }
    long long nbytes = -1, ptr = 0;
    if (ok) {
      // nbytes (a getset) rather than numel() (a method): the same count, times the itemsize
      r = rd.nbytes.read(t, shadow_free);
      nbytes = r ? PyLong_AsSsize_t(r) : -1;  // (AsSsize_t: a digit loop, no byte-array detour)
      Py_XDECREF(r);
      r = rd.data_ptr.read(t, shadow_free);
      ptr = r ? PyLong_AsSsize_t(r) : 0;
      Py_XDECREF(r);
      // a forward-mode AD zero tensor has no memory: data_ptr 0 with elements
      ok = nbytes >= 0 && (ptr != 0 || nbytes == 0) && !PyErr_Occurred();
    }
    if (!ok) {
      PyErr_Clear();
      return false;
    }
    const int64_t isz = itemsize_of_code(code);
    if (nbytes % isz != 0) return false;
    out[size_t(i)] = {ptr, nbytes / isz, code};
    dtype_mask |= 1 << code;
  }
  if (device) *device = int(first_device);
  if (snapshot) *snapshot = std::move(items);
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
// (the caller's general path then applies them in list order). `signed_values`:
// see read_plain_tensors (false for in-place scale / clamp, which commute with
// negation).
inline py::tuple describe_plain(py::list tensors, py::handle tensor_type, py::tuple dtypes, py::handle strided,
                                bool cuda, int64_t out_meta, bool disjoint, bool signed_values) {
  std::vector<PlainMeta> meta;
  int mask = 0, device = -1;
  if (!read_plain_tensors(tensors, tensor_type, dtypes, strided, cuda, meta, mask, &device, signed_values) ||
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
    "tensors share memory. tensor_type: a type or a tuple of two (torch.Tensor, torch.nn.Parameter); "
    "signed_values=False: negated views (is_neg) are taken as their memory holds them, for ops that commute "
    "with negation.";

}  // namespace fastgrad_reader
