// pykernels._C: one thin pybind11 module. Each binding turns its Python arguments into TensorViews and
// calls the op's launcher; validation lives in the launchers so that it runs before any launch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <string>

#include "common/check.h"
#include "common/py_tensor.h"
#include "fp8_quant/fp8_quant.h"
#include "mla_decode/mla_decode.h"

namespace py = pybind11;
using pykernels::as_stream;
using pykernels::as_tensor;

namespace {

// What the runtime says about the machine, without ever failing: no driver and no GPU are answers.
py::dict device_info() {
  py::dict info;
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  info["runtime_version"] = runtime;
  cudaError_t status = cudaDriverGetVersion(&driver);
  info["driver_version"] = status == cudaSuccess ? py::object(py::int_(driver)) : py::none();
  status = cudaGetDeviceCount(&count);
  py::list devices;
  if (status != cudaSuccess) {
    info["error"] = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
    (void)cudaGetLastError();
    count = 0;
  } else {
    info["error"] = py::none();
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      (void)cudaGetLastError();
      continue;
    }
    py::dict d;
    d["index"] = i;
    d["name"] = std::string(prop.name);
    d["capability"] = py::make_tuple(prop.major, prop.minor);
    d["sm_count"] = prop.multiProcessorCount;
    d["total_memory"] = prop.totalGlobalMem;
    d["shared_memory_per_block_optin"] = prop.sharedMemPerBlockOptin;
    d["l2_cache_size"] = prop.l2CacheSize;
    devices.append(d);
  }
  info["devices"] = devices;
  return info;
}

// What the boundary read from a tensor-like object: used by tests to check DLPack and
// __cuda_array_interface__ parsing for every dtype, on any machine.
py::dict describe_tensor(py::handle obj) {
  auto t = as_tensor(obj, "tensor");
  py::dict d;
  d["dtype"] = pykernels::dtype_name(t.dtype);
  py::list shape, strides;
  for (int i = 0; i < t.ndim; ++i) {
    shape.append(t.shape[i]);
    strides.append(t.strides[i]);
  }
  d["shape"] = py::tuple(shape);
  d["strides"] = py::tuple(strides);
  d["device"] = t.device_str();
  d["data_ptr"] = reinterpret_cast<uintptr_t>(t.data);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels CUDA kernels for sm_90a (Hopper)";

  static py::exception<pykernels::CudaError> cuda_error(m, "CudaError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pykernels::ArgError& e) {
      PyErr_SetString(e.kind() == pykernels::ArgError::Kind::Type ? PyExc_TypeError : PyExc_ValueError, e.what());
    } catch (const pykernels::CudaError& e) {
      py::set_error(cuda_error, e.what());
    }
  });

  m.attr("compiled_archs") = py::make_tuple(PYKERNELS_CUDA_ARCHS);
  m.def("device_info", &device_info, "CUDA runtime/driver versions and the visible devices");
  m.def("describe_tensor", &describe_tensor, py::arg("tensor"), "How the boundary reads a tensor-like object");

  // ---- fp8_quant -------------------------------------------------------------------------------
  m.def(
      "per_token_group_quant_fp8",
      [](py::handle x, py::handle q, py::handle scales, int group_size, bool ue8m0, py::handle stream) {
        pykernels::per_token_group_quant_fp8(as_tensor(x, "x"), as_tensor(q, "out"), as_tensor(scales, "scales"),
                                             group_size, ue8m0, as_stream(stream));
      },
      py::arg("x"), py::arg("out"), py::arg("scales"), py::arg("group_size"), py::arg("ue8m0"), py::arg("stream"));
  m.def(
      "per_block_quant_fp8",
      [](py::handle w, py::handle q, py::handle scales, int block_size, bool ue8m0, py::handle stream) {
        pykernels::per_block_quant_fp8(as_tensor(w, "w"), as_tensor(q, "out"), as_tensor(scales, "scales"),
                                       block_size, ue8m0, as_stream(stream));
      },
      py::arg("w"), py::arg("out"), py::arg("scales"), py::arg("block_size"), py::arg("ue8m0"), py::arg("stream"));

  // ---- mla_decode ------------------------------------------------------------------------------
  m.def("mla_layouts_consistent", &pykernels::mla_layouts_consistent,
        "Host check that the MLA kernel's shared-memory views and accumulator row map agree with CuTe's layouts");
  m.def(
      "mla_plan_splits",
      [](const std::vector<int>& seqlens, int num_parts) {
        std::vector<int> part_splits, splits, split_offsets;
        pykernels::mla_plan_splits_host(seqlens, num_parts, part_splits, splits, split_offsets);
        py::list split_list;
        for (int g = 0; g < split_offsets.back(); ++g) {
          split_list.append(py::make_tuple(splits[4 * g], splits[4 * g + 1], splits[4 * g + 2], splits[4 * g + 3]));
        }
        return py::make_tuple(part_splits, split_list, split_offsets);
      },
      py::arg("seqlens"), py::arg("num_parts"),
      "The split-KV plan the CUDA kernels run, computed on the host: (part_splits, splits, split_offsets)");
  m.def(
      "mla_plan_splits_device",
      [](py::handle seqlens, py::handle part_splits, py::handle splits, py::handle split_offsets, py::handle stream) {
        pykernels::mla_plan_splits_device(as_tensor(seqlens, "cache_seqlens"), as_tensor(part_splits, "part_splits"),
                                          as_tensor(splits, "splits"), as_tensor(split_offsets, "split_offsets"),
                                          as_stream(stream));
      },
      py::arg("cache_seqlens"), py::arg("part_splits"), py::arg("splits"), py::arg("split_offsets"), py::arg("stream"));
  m.def(
      "mla_decode",
      [](py::handle q, py::handle kv_cache, py::handle block_table, py::handle seqlens, py::handle kv_scale,
         py::handle part_splits, py::handle splits, py::handle split_offsets, py::handle out, py::handle lse,
         py::handle out_partial, py::handle lse_partial, float softmax_scale, bool causal, py::handle stream) {
        pykernels::TensorView scale_view;
        if (!kv_scale.is_none()) scale_view = as_tensor(kv_scale, "kv_scale");
        pykernels::mla_decode(as_tensor(q, "q"), as_tensor(kv_cache, "kv_cache"), as_tensor(block_table, "block_table"),
                              as_tensor(seqlens, "cache_seqlens"), kv_scale.is_none() ? nullptr : &scale_view,
                              as_tensor(part_splits, "part_splits"), as_tensor(splits, "splits"),
                              as_tensor(split_offsets, "split_offsets"), as_tensor(out, "out"), as_tensor(lse, "lse"),
                              as_tensor(out_partial, "out_partial"), as_tensor(lse_partial, "lse_partial"),
                              softmax_scale, causal, as_stream(stream));
      },
      py::arg("q"), py::arg("kv_cache"), py::arg("block_table"), py::arg("cache_seqlens"), py::arg("kv_scale"),
      py::arg("part_splits"), py::arg("splits"), py::arg("split_offsets"), py::arg("out"), py::arg("lse"),
      py::arg("out_partial"), py::arg("lse_partial"), py::arg("softmax_scale"), py::arg("causal"), py::arg("stream"));
}
