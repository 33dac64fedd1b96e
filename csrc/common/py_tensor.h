// Turning Python objects into TensorViews (bindings side only; launchers never include pybind11).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "common/tensor_view.h"

namespace pykernels {

// Reads a tensor from any object that speaks DLPack (`__dlpack__`: torch, CuPy, JAX, ...) or, failing
// that, `__cuda_array_interface__` (CuPy, Numba, and test doubles). `name` is the argument's name and is
// carried into every error message about this tensor. The view borrows the memory: the caller keeps
// `obj` alive while the work runs.
TensorView as_tensor(pybind11::handle obj, const std::string& name);

// The stream argument every op binding takes: an integer cudaStream_t handle (0 = legacy default stream),
// as torch.cuda.current_stream().cuda_stream gives it.
inline cudaStream_t as_stream(pybind11::handle obj) {
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(pybind11::cast<uint64_t>(obj)));
}

}  // namespace pykernels
