"""v4kernels: GPU kernels for DeepSeek-V4-style models.

Public ops are plain functions re-exported here; each is a ``torch.ops.v4kernels.*`` op with a
float32 reference (the CPU implementation), Triton kernels and, where they pay, sm_90 CUDA kernels.
See ``v4kernels._dispatch`` for how a backend is chosen.
"""
from ._dispatch import BACKENDS, OPS  # noqa: F401
from ._ext import cuda_extension_loaded  # noqa: F401
from .ops.quant import act_quant_fp8  # noqa: F401
from .reference import quant  # noqa: F401  (FP4/MXFP4/e8m0 format functions)

__version__ = "0.1.0"
