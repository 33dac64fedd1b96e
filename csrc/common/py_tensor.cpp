#include "common/py_tensor.h"

#include <cuda_runtime.h>

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

TensorView from_dlpack(py::handle obj, const std::string& name) {
  // stream=-1: the producer must not synchronize; the op itself runs on the stream it is given.
  py::object capsule = obj.attr("__dlpack__")(py::arg("stream") = -1);
  if (!PyCapsule_IsValid(capsule.ptr(), "dltensor")) {
    throw_type_error(name, "a DLPack 'dltensor' capsule from __dlpack__()", "another object");
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  const DLTensor& t = managed->dl_tensor;
  if (t.ndim > TensorView::kMaxDims) {
    throw_value_error(name, "at most " + std::to_string(TensorView::kMaxDims) + " dimensions", std::to_string(t.ndim));
  }
  TensorView v;
  v.name = name;
  v.dtype = dtype_from_dlpack(t.dtype, name);
  v.ndim = t.ndim;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.is_cuda = t.device.device_type == kDLCUDA || t.device.device_type == kDLCUDAManaged;
  v.device_id = v.is_cuda ? t.device.device_id : -1;
  int64_t running = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    v.strides[i] = t.strides ? t.strides[i] : running;
    running *= t.shape[i];
  }
  // The capsule is left unconsumed: its destructor releases the producer's reference. The memory itself
  // stays alive through `obj`, which the caller holds.
  return v;
}

TensorView from_cuda_array_interface(py::handle obj, const std::string& name) {
  py::dict cai = obj.attr("__cuda_array_interface__");
  TensorView v;
  v.name = name;
  v.dtype = dtype_from_typestr(py::cast<std::string>(cai["typestr"]), name);
  py::tuple shape = cai["shape"];
  if (shape.size() > TensorView::kMaxDims) {
    throw_value_error(name, "at most " + std::to_string(TensorView::kMaxDims) + " dimensions",
                      std::to_string(shape.size()));
  }
  v.ndim = static_cast<int>(shape.size());
  py::tuple data = cai["data"];
  v.data = reinterpret_cast<void*>(static_cast<uintptr_t>(py::cast<uint64_t>(data[0])));
  v.is_cuda = true;
  // The interface does not carry the device; ask the driver when there is one, else leave it unknown.
  cudaPointerAttributes attrs;
  if (v.data != nullptr && cudaPointerGetAttributes(&attrs, v.data) == cudaSuccess) {
    v.device_id = attrs.device;
  } else {
    (void)cudaGetLastError();
    v.device_id = -1;
  }
  const int item = dtype_size(v.dtype);
  py::object strides = cai.contains("strides") ? py::object(cai["strides"]) : py::none();
  int64_t running = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.shape[i] = py::cast<int64_t>(shape[i]);
    if (strides.is_none()) {
      v.strides[i] = running;
    } else {
      int64_t bytes = py::cast<int64_t>(py::tuple(strides)[i]);
      if (bytes % item != 0) throw_value_error(name, "strides that are whole elements", std::to_string(bytes) + " bytes");
      v.strides[i] = bytes / item;
    }
    running *= v.shape[i];
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
