// Current-CUDA-stream lookup resolved at run time.
//
// aoti_torch_get_current_cuda_stream lives in libtorch_cuda.so, which the CPU wheel of
// PyTorch does not ship. Linking it would make v4kernels._C fail to load on CPU-only
// torch, so we look the symbol up in the already loaded library (RTLD_NOLOAD) on first
// use. On a CPU-only torch no CUDA tensor can reach a kernel, so the lookup never runs.
#pragma once
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace v4k {

using GetStreamFn = int32_t (*)(int32_t device_index, void** ret_stream);

inline GetStreamFn resolve_get_current_stream() {
  static GetStreamFn fn = []() -> GetStreamFn {
    void* handle = dlopen("libtorch_cuda.so", RTLD_NOLOAD | RTLD_LAZY);
    if (handle == nullptr) return nullptr;
    return reinterpret_cast<GetStreamFn>(dlsym(handle, "aoti_torch_get_current_cuda_stream"));
  }();
  return fn;
}

inline cudaStream_t current_stream(int32_t device_index) {
  GetStreamFn fn = resolve_get_current_stream();
  if (fn == nullptr) {
    throw std::runtime_error(
        "v4kernels._C: aoti_torch_get_current_cuda_stream not found; is this a CUDA build of torch?");
  }
  void* stream = nullptr;
  if (fn(device_index, &stream) != 0) {
    throw std::runtime_error("v4kernels._C: aoti_torch_get_current_cuda_stream failed");
  }
  return reinterpret_cast<cudaStream_t>(stream);
}

inline void check_launch(const char* kernel_name) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("v4kernels._C: launch of ") + kernel_name +
                             " failed: " + cudaGetErrorString(err));
  }
}

// Sets the device of a tensor for the duration of a scope (kernels launch on it).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev_);
    if (prev_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

}  // namespace v4k
