// Error handling shared by every kernel launcher and the bindings.
//
// Launchers throw; the bindings turn each exception into the matching Python one:
//   pykernels::ArgError(kind=Type)  -> TypeError    (wrong dtype or kind of object)
//   pykernels::ArgError(kind=Value) -> ValueError   (wrong shape, stride, alignment, device or value)
//   pykernels::CudaError            -> pykernels._C.CudaError (a RuntimeError naming the CUDA call and code)
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace pykernels {

class CudaError : public std::runtime_error {
 public:
  CudaError(const char* call, cudaError_t code, const char* file, int line)
      : std::runtime_error(format(call, code, file, line)), code_(code) {}
  cudaError_t code() const { return code_; }

 private:
  static std::string format(const char* call, cudaError_t code, const char* file, int line) {
    std::ostringstream os;
    os << call << " failed: " << cudaGetErrorName(code) << " (" << static_cast<int>(code)
       << "): " << cudaGetErrorString(code) << " [" << file << ":" << line << "]";
    return os.str();
  }
  cudaError_t code_;
};

class ArgError : public std::invalid_argument {
 public:
  enum class Kind { Type, Value };
  ArgError(Kind kind, const std::string& message) : std::invalid_argument(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

// Builds "<arg>: expected <expected>, got <got>", the one shape every argument error takes.
inline std::string arg_message(const std::string& arg, const std::string& expected, const std::string& got) {
  return arg + ": expected " + expected + ", got " + got;
}

[[noreturn]] inline void throw_type_error(const std::string& arg, const std::string& expected,
                                          const std::string& got) {
  throw ArgError(ArgError::Kind::Type, arg_message(arg, expected, got));
}

[[noreturn]] inline void throw_value_error(const std::string& arg, const std::string& expected,
                                           const std::string& got) {
  throw ArgError(ArgError::Kind::Value, arg_message(arg, expected, got));
}

}  // namespace pykernels

// Checks a CUDA runtime call; on failure throws CudaError naming the call text.
#define PK_CUDA_CHECK(call)                                                        \
  do {                                                                             \
    cudaError_t pk_status_ = (call);                                               \
    if (pk_status_ != cudaSuccess) {                                               \
      (void)cudaGetLastError(); /* clear the sticky-free error state */            \
      throw ::pykernels::CudaError(#call, pk_status_, __FILE__, __LINE__);         \
    }                                                                              \
  } while (0)

// Checks that the kernel launch just issued was accepted (bad config, too much shared memory, ...).
// Asynchronous faults surface at the next synchronizing call, as with any CUDA library.
#define PK_CHECK_LAUNCH(kernel_name)                                               \
  do {                                                                             \
    cudaError_t pk_status_ = cudaGetLastError();                                   \
    if (pk_status_ != cudaSuccess) {                                               \
      throw ::pykernels::CudaError("launch of " kernel_name, pk_status_, __FILE__, __LINE__); \
    }                                                                              \
  } while (0)

// Host-side invariant that must hold before a launch (internal errors, not user input).
#define PK_ASSERT(cond, message)                                                   \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      throw std::logic_error(std::string("pykernels internal check failed: ") + #cond + ": " + (message)); \
    }                                                                              \
  } while (0)
