// A non-owning view of a tensor that crossed the Python boundary (DLPack or __cuda_array_interface__).
//
// Launchers (.cu) see only this struct, never pybind11 or torch: the owner of the memory is the Python
// caller, who keeps the tensor alive for the duration of the call and of the work queued on the stream.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "common/check.h"

namespace pykernels {

enum class DType : int {
  Float32,
  Float16,
  BFloat16,
  Float8E4M3,  // float8_e4m3fn: no infinities, max 448
  Float8E5M2,
  Int8,
  UInt8,
  Int32,
  Int64,
  Bool,
  Float64,
};

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float8E4M3: return "float8_e4m3fn";
    case DType::Float8E5M2: return "float8_e5m2";
    case DType::Int8: return "int8";
    case DType::UInt8: return "uint8";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::Bool: return "bool";
    case DType::Float64: return "float64";
  }
  return "unknown";
}

inline int dtype_size(DType d) {
  switch (d) {
    case DType::Float64:
    case DType::Int64: return 8;
    case DType::Float32:
    case DType::Int32: return 4;
    case DType::Float16:
    case DType::BFloat16: return 2;
    default: return 1;
  }
}

struct TensorView {
  static constexpr int kMaxDims = 8;

  void* data = nullptr;
  DType dtype = DType::Float32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};  // in elements, not bytes
  bool is_cuda = false;
  int device_id = -1;
  // Where the memory is when it is not CUDA device memory ("cpu", "cuda_host", ...), for messages.
  std::string host_device = "cpu";
  std::string name;  // the argument's name, for error messages
  // Holds whatever keeps `data` valid (the DLPack capsule and its producer) for as long as any copy of the
  // view lives: a producer may export a buffer made for this one export and free it with the capsule.
  std::shared_ptr<void> owner;

  int64_t size(int dim) const { return shape[dim < 0 ? dim + ndim : dim]; }
  int64_t stride(int dim) const { return strides[dim < 0 ? dim + ndim : dim]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
  std::string device_str() const { return is_cuda ? "cuda:" + std::to_string(device_id) : host_device; }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Argument checks used by every launcher. Each throws ArgError naming the argument.
inline void require_dtype(const TensorView& t, DType expected) {
  if (t.dtype != expected) throw_type_error(t.name, std::string("dtype ") + dtype_name(expected),
                                            dtype_name(t.dtype));
}

inline void require_ndim(const TensorView& t, int ndim) {
  if (t.ndim != ndim) throw_value_error(t.name, std::to_string(ndim) + " dimensions",
                                        std::to_string(t.ndim) + " (shape " + t.shape_str() + ")");
}

inline void require_size(const TensorView& t, int dim, int64_t expected, const std::string& what = "") {
  if (t.size(dim) != expected) {
    throw_value_error(t.name, "size " + std::to_string(expected) + " in dim " + std::to_string(dim < 0 ? dim + t.ndim : dim) +
                                  (what.empty() ? "" : " (" + what + ")"),
                      "shape " + t.shape_str());
  }
}

inline void require_contiguous(const TensorView& t) {
  if (!t.is_contiguous()) throw_value_error(t.name, "a contiguous tensor", "shape " + t.shape_str() + " with other strides");
}

inline void require_cuda(const TensorView& t) {
  if (!t.is_cuda) throw_value_error(t.name, "a CUDA tensor", "a tensor on " + t.device_str());
}

// A device id of -1 (a __cuda_array_interface__ pointer the driver could not place) matches any device.
inline void require_same_device(const TensorView& a, const TensorView& b) {
  const bool ids_differ = a.device_id != b.device_id && a.device_id != -1 && b.device_id != -1;
  if (a.is_cuda != b.is_cuda || ids_differ) {
    throw_value_error(b.name, "a tensor on " + a.device_str() + " (where " + a.name + " is)", b.device_str());
  }
}

inline void require_aligned(const TensorView& t, int bytes) {
  if (reinterpret_cast<uintptr_t>(t.data) % bytes != 0) {
    throw_value_error(t.name, "a data pointer aligned to " + std::to_string(bytes) + " bytes", "a misaligned pointer");
  }
}

}  // namespace pykernels
