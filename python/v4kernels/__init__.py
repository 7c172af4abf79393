"""v4kernels: GPU kernels for DeepSeek-V4-style models.

Public ops are plain functions re-exported here; each is a ``torch.ops.v4kernels.*`` op with a
float32 reference (the CPU implementation), Triton kernels and, where they pay, sm_90 CUDA kernels.
See ``v4kernels._dispatch`` for how a backend is chosen. Families:

* quantization / numerics / formats: ``act_quant_fp8``, ``fake_quant_fp8``, ``fake_quant_fp4``,
  ``dequant_mxfp4``, ``hadamard_transform``, ``apply_rope``, ``rms_norm``, ``head_rms_norm``,
  ``fp8_linear``, ``kv584_write`` / ``kv584_read``, ``idx_fp4_write`` / ``idx_fp4_read``
  (row layouts and ``PagedCache`` in ``v4kernels.formats``; FP4/e8m0 helpers in ``v4kernels.quant``)
* compressor: ``compress_kv``, ``compress_kv_decode``, ``compress_kv_entries``
* indexer: ``indexer_prepare_q``, ``indexer_logits``, ``indexer_topk``
* attention: ``attention_plan``, ``sparse_attn_decode``, ``sparse_attn_prefill``
* MoE: ``moe_route``, ``moe_group``, ``moe_grouped_gemm_mxfp4``, ``moe_grouped_swiglu_mxfp4``,
  ``moe_combine``, ``moe_forward``
* mHC: ``mhc_pre``, ``mhc_post``, ``mhc_head``
"""
from ._dispatch import BACKENDS, OPS  # noqa: F401
from ._ext import cuda_extension_loaded  # noqa: F401
from .ops.compressor import (  # noqa: F401
    compress_kv,
    compress_kv_decode,
    compress_kv_entries,
    new_compressor_state,
    reset_compressor_state,
)
from .ops.formats import idx_fp4_read, idx_fp4_write, kv584_read, kv584_write  # noqa: F401
from .ops.indexer import indexer_logits, indexer_prepare_q, indexer_topk, seq_ids_from_cu_seqlens  # noqa: F401
from .ops.linear import fp8_linear, quantize_weight_fp8_block  # noqa: F401
from .ops.numerics import (  # noqa: F401
    apply_rope,
    apply_rope_,
    dequant_mxfp4,
    fake_quant_fp4,
    fake_quant_fp8,
    hadamard_transform,
    head_rms_norm,
    rms_norm,
)
from .ops.attention import AttentionPlan, attention_plan, sparse_attn_decode, sparse_attn_prefill  # noqa: F401
from .ops.mhc import mhc_head, mhc_post, mhc_pre  # noqa: F401
from .ops.moe import (  # noqa: F401
    moe_combine,
    moe_forward,
    moe_group,
    moe_grouped_gemm_mxfp4,
    moe_grouped_swiglu_mxfp4,
    moe_route,
)
from .ops.quant import act_quant_fp8  # noqa: F401
from .reference import quant  # noqa: F401  (FP4/MXFP4/e8m0 format functions)

__version__ = "0.1.0"
