#include "common/py_tensor.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace py = pybind11;

namespace pykernels {
namespace {

// The DLPack ABI (dlpack.h, v0.8 "dltensor" capsules), restated: these layouts are a stable public ABI.
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

enum : int32_t { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13 };
enum : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6,
                 kDLFloat8_e4m3fn = 10, kDLFloat8_e5m2 = 12 };

DType dtype_from_dlpack(const DLDataType& t, const std::string& name) {
  if (t.lanes == 1) {
    switch (t.code) {
      case kDLFloat:
        if (t.bits == 32) return DType::Float32;
        if (t.bits == 16) return DType::Float16;
        if (t.bits == 64) return DType::Float64;
        break;
      case kDLBfloat:
        if (t.bits == 16) return DType::BFloat16;
        break;
      case kDLInt:
        if (t.bits == 8) return DType::Int8;
        if (t.bits == 32) return DType::Int32;
        if (t.bits == 64) return DType::Int64;
        break;
      case kDLUInt:
        if (t.bits == 8) return DType::UInt8;
        if (t.bits == 1) return DType::Bool;
        break;
      case kDLBool:
        if (t.bits == 8) return DType::Bool;
        break;
      case kDLFloat8_e4m3fn:
        if (t.bits == 8) return DType::Float8E4M3;
        break;
      case kDLFloat8_e5m2:
        if (t.bits == 8) return DType::Float8E5M2;
        break;
    }
  }
  throw_type_error(name, "a supported dtype", "DLPack dtype code " + std::to_string(t.code) + " with " +
                                                  std::to_string(t.bits) + " bits x " + std::to_string(t.lanes) +
                                                  " lanes");
}

DType dtype_from_typestr(const std::string& typestr, const std::string& name) {
  // numpy array-interface type strings: byte order, kind, item size.
  std::string s = typestr.size() == 3 ? typestr.substr(1) : typestr;
  if (s == "f4") return DType::Float32;
  if (s == "f2") return DType::Float16;
  if (s == "f8") return DType::Float64;
  if (s == "i1") return DType::Int8;
  if (s == "u1") return DType::UInt8;
  if (s == "i4") return DType::Int32;
  if (s == "i8") return DType::Int64;
  if (s == "b1") return DType::Bool;
  throw_type_error(name, "a supported __cuda_array_interface__ typestr", "'" + typestr + "'");
}

const char* dlpack_device_name(int32_t type) {
  switch (type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLCUDAHost: return "cuda_host";
    case 4: return "opencl";
    case 7: return "vulkan";
    case 8: return "metal";
    case 9: return "vpi";
    case 10: return "rocm";
    case 11: return "rocm_host";
    case 12: return "ext_dev";
    case kDLCUDAManaged: return "cuda_managed";
    case 14: return "oneapi";
    case 15: return "webgpu";
    case 16: return "hexagon";
    case 17: return "maia";
  }
  return nullptr;
}

// Sets v's shape and strides (in elements) from `shape` and optional `strides`, rejecting negative sizes
// and element counts or extents an int64 cannot hold.
void set_extents(TensorView& v, const int64_t* shape, const int64_t* strides) {
  int64_t running = 1;
  bool empty = false;
  for (int i = 0; i < v.ndim; ++i) empty = empty || shape[i] == 0;
  for (int i = v.ndim - 1; i >= 0; --i) {
    if (shape[i] < 0) {
      throw_value_error(v.name, "non-negative sizes", "size " + std::to_string(shape[i]) + " in dim " + std::to_string(i));
    }
    v.shape[i] = shape[i];
    v.strides[i] = strides ? strides[i] : running;
    if (!empty && __builtin_mul_overflow(running, shape[i], &running)) {
      throw_value_error(v.name, "at most 2^63 - 1 elements", "a larger shape");
    }
  }
  if (empty) return;
  // The farthest element from the start must be addressable: sum of (size - 1) * |stride|.
  int64_t extent = 0;
  for (int i = 0; i < v.ndim; ++i) {
    int64_t step = 0;
    const int64_t stride = v.strides[i] < 0 ? -v.strides[i] : v.strides[i];
    if (v.strides[i] == INT64_MIN || __builtin_mul_overflow(shape[i] - 1, stride, &step) ||
        __builtin_add_overflow(extent, step, &extent)) {
      throw_value_error(v.name, "strides whose extent fits in 64 bits", "stride " + std::to_string(v.strides[i]) +
                                                                             " in dim " + std::to_string(i));
    }
  }
}

TensorView from_dlpack(py::handle obj, const std::string& name) {
  py::object capsule;
  try {
    // stream=-1: the producer must not synchronize; the op itself runs on the stream it is given.
    capsule = obj.attr("__dlpack__")(py::arg("stream") = -1);
  } catch (py::error_already_set& e) {
    throw_value_error(name, "a tensor that __dlpack__() can export", std::string(e.type().attr("__name__").cast<std::string>()) +
                                                                          ": " + py::str(e.value()).cast<std::string>());
  }
  if (!PyCapsule_IsValid(capsule.ptr(), "dltensor")) {
    throw_type_error(name, "a DLPack 'dltensor' capsule from __dlpack__()", "another object");
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  TensorView v;
  v.name = name;
  // The capsule stays unconsumed, so its destructor (the producer's) releases the memory: keep it, and the
  // producer, until the last copy of the view is gone, which is after the launcher returns.
  auto* keep = new py::object(py::make_tuple(capsule, obj));
  v.owner = std::shared_ptr<void>(keep, [](void* p) {
    py::gil_scoped_acquire gil;
    delete static_cast<py::object*>(p);
  });
  const DLTensor& t = managed->dl_tensor;
  if (t.ndim < 0 || t.ndim > TensorView::kMaxDims) {
    throw_value_error(name, "0 to " + std::to_string(TensorView::kMaxDims) + " dimensions", std::to_string(t.ndim));
  }
  if (t.ndim > 0 && t.shape == nullptr) {
    throw_value_error(name, "a DLPack tensor with a shape array", "a null shape for " + std::to_string(t.ndim) +
                                                                      " dimensions");
  }
  const int32_t type = t.device.device_type;
  if (type != kDLCPU && type != kDLCUDA && type != kDLCUDAHost && type != kDLCUDAManaged) {
    const char* device = dlpack_device_name(type);
    throw_value_error(name, "a tensor on cpu or cuda",
                      "a tensor on " + (device ? std::string(device) : "DLPack device type " + std::to_string(type)) +
                          ":" + std::to_string(t.device.device_id));
  }
  v.dtype = dtype_from_dlpack(t.dtype, name);
  v.ndim = t.ndim;
  v.is_cuda = type == kDLCUDA || type == kDLCUDAManaged;
  v.device_id = v.is_cuda ? t.device.device_id : -1;
  v.host_device = dlpack_device_name(type);
  set_extents(v, t.shape, t.strides);
  if (t.data == nullptr && v.numel() > 0) {
    throw_value_error(name, "a data pointer for " + std::to_string(v.numel()) + " elements", "a null pointer");
  }
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  return v;
}

// One entry of a __cuda_array_interface__ dict, which must be present and of type T.
template <typename T>
T cai_entry(const py::dict& cai, const char* key, const std::string& name, const char* expected) {
  if (!cai.contains(key)) {
    throw_value_error(name, std::string("a __cuda_array_interface__ with '") + key + "'", "none");
  }
  py::object value = cai[key];
  if (!py::isinstance<T>(value)) {
    throw_type_error(name, std::string("__cuda_array_interface__['") + key + "'] " + expected,
                     py::type::handle_of(value).attr("__name__").cast<std::string>());
  }
  return value.cast<T>();
}

// A Python int that fits int64 (bool excluded: it is an int to Python but never a size).
int64_t cai_int(py::handle value, const std::string& name, const std::string& what) {
  if (!PyLong_Check(value.ptr()) || PyBool_Check(value.ptr())) {
    throw_type_error(name, what + " as an int", py::type::handle_of(value).attr("__name__").cast<std::string>());
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (overflow != 0) throw_value_error(name, what + " within 64 bits", py::str(value).cast<std::string>());
  return v;
}

TensorView from_cuda_array_interface(py::handle obj, const std::string& name) {
  py::object raw;
  try {
    raw = obj.attr("__cuda_array_interface__");
  } catch (py::error_already_set& e) {
    throw_value_error(name, "a readable __cuda_array_interface__", e.type().attr("__name__").cast<std::string>() +
                                                                       ": " + py::str(e.value()).cast<std::string>());
  }
  if (!py::isinstance<py::dict>(raw)) {
    throw_type_error(name, "a __cuda_array_interface__ dict", py::type::handle_of(raw).attr("__name__").cast<std::string>());
  }
  const py::dict cai = raw;
  TensorView v;
  v.name = name;
  v.owner = std::shared_ptr<void>(new py::object(py::reinterpret_borrow<py::object>(obj)), [](void* p) {
    py::gil_scoped_acquire gil;
    delete static_cast<py::object*>(p);
  });
  v.dtype = dtype_from_typestr(cai_entry<py::str>(cai, "typestr", name, "a str").cast<std::string>(), name);
  const py::tuple shape = cai_entry<py::tuple>(cai, "shape", name, "a tuple");
  if (shape.size() > TensorView::kMaxDims) {
    throw_value_error(name, "at most " + std::to_string(TensorView::kMaxDims) + " dimensions",
                      std::to_string(shape.size()));
  }
  v.ndim = static_cast<int>(shape.size());
  const py::tuple data = cai_entry<py::tuple>(cai, "data", name, "a tuple (pointer, read_only)");
  if (data.size() != 2) {
    throw_value_error(name, "__cuda_array_interface__['data'] as (pointer, read_only)",
                      "a tuple of " + std::to_string(data.size()));
  }
  const int64_t address = cai_int(data[0], name, "__cuda_array_interface__['data'][0]");
  if (cai.contains("mask") && !py::object(cai["mask"]).is_none()) {
    throw_value_error(name, "a __cuda_array_interface__ without a mask", "a mask");
  }
  int64_t sizes[TensorView::kMaxDims], element_strides[TensorView::kMaxDims];
  for (int i = 0; i < v.ndim; ++i) {
    sizes[i] = cai_int(shape[i], name, "__cuda_array_interface__['shape'][" + std::to_string(i) + "]");
  }
  const int item = dtype_size(v.dtype);
  py::object strides = cai.contains("strides") ? py::object(cai["strides"]) : py::none();
  if (!strides.is_none()) {
    if (!py::isinstance<py::tuple>(strides) || py::len(strides) != static_cast<size_t>(v.ndim)) {
      throw_value_error(name, "__cuda_array_interface__['strides'] as None or a tuple of " + std::to_string(v.ndim),
                        py::repr(strides).cast<std::string>());
    }
    const py::tuple byte_strides = strides;
    for (int i = 0; i < v.ndim; ++i) {
      const int64_t bytes = cai_int(byte_strides[i], name, "__cuda_array_interface__['strides'][" + std::to_string(i) + "]");
      if (bytes % item != 0) throw_value_error(name, "strides that are whole elements", std::to_string(bytes) + " bytes");
      element_strides[i] = bytes / item;
    }
  }
  set_extents(v, sizes, strides.is_none() ? nullptr : element_strides);
  v.data = reinterpret_cast<void*>(static_cast<uintptr_t>(address));
  if (v.data == nullptr && v.numel() > 0) {
    throw_value_error(name, "a data pointer for " + std::to_string(v.numel()) + " elements", "a null pointer");
  }
  v.is_cuda = true;
  // The interface does not carry the device; ask the driver when there is one, else leave it unknown.
  cudaPointerAttributes attrs;
  if (v.data != nullptr && cudaPointerGetAttributes(&attrs, v.data) == cudaSuccess) {
    v.device_id = attrs.device;
  } else {
    (void)cudaGetLastError();
    v.device_id = -1;
  }
  return v;
}

}  // namespace

TensorView as_tensor(py::handle obj, const std::string& name) {
  if (obj.is_none()) throw_type_error(name, "a tensor", "None");
  if (py::hasattr(obj, "__dlpack__")) return from_dlpack(obj, name);
  if (py::hasattr(obj, "__cuda_array_interface__")) return from_cuda_array_interface(obj, name);
  throw_type_error(name, "a tensor supporting __dlpack__ or __cuda_array_interface__",
                   std::string("an object of type ") + py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
}

}  // namespace pykernels
