// The one binding file of v4kernels._C: op schemas (namespace v4kernels_C) and their CUDA
// implementations, through PyTorch's stable C ABI so that one .so serves several torch versions.
// The public ops live in the `v4kernels` namespace (python/v4kernels/_dispatch.py); these are
// the CUDA backends they dispatch to. Shapes, dtypes and devices are checked in Python before
// any call lands here; the checks below only guard the C++ boundary.
#include <Python.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>

#include "common/stream.h"

namespace v4k {
void act_quant_fp8_launch(const void* x, void* q, void* s, int64_t rows, int64_t cols, int64_t block,
                          int device, cudaStream_t stream);
}

namespace {

using torch::stable::Tensor;

void act_quant_fp8_out(Tensor x, int64_t block, Tensor q, Tensor s) {
  STD_TORCH_CHECK(x.is_cuda() && q.is_cuda() && s.is_cuda(), "act_quant_fp8_out: CUDA tensors expected");
  STD_TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && s.is_contiguous(),
                  "act_quant_fp8_out: contiguous tensors expected");
  const int64_t cols = x.dim() == 0 ? 1 : x.size(x.dim() - 1);
  STD_TORCH_CHECK(cols % block == 0, "act_quant_fp8_out: last dim must be a multiple of block");
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  const int device = x.get_device_index();
  v4k::DeviceGuard guard(device);
  v4k::act_quant_fp8_launch(x.data_ptr(), q.data_ptr(), s.data_ptr(), rows, cols, block, device,
                            v4k::current_stream(device));
}

}  // namespace

STABLE_TORCH_LIBRARY(v4kernels_C, m) {
  m.def("act_quant_fp8_out(Tensor x, int block, Tensor(a!) q, Tensor(b!) s) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(v4kernels_C, CUDA, m) {
  m.impl("act_quant_fp8_out", TORCH_BOX(&act_quant_fp8_out));
}

// Importing v4kernels._C runs the static registrations above; the module itself is empty.
static struct PyModuleDef v4k_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&v4k_module); }
