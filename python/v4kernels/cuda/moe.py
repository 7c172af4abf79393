"""Launchers of the MXFP4 grouped-GEMM decode kernels (csrc/moe/mxfp4_decode.cu).

Same signatures as the op implementations in ``v4kernels.ops.moe``; the inputs have been checked
there. These normalise dtypes (uint8 views of packed weights and e8m0 scales, int32 offsets and
row ids, FP8 activations: bf16 inputs in mode "w4a8" go through ``act_quant_fp8`` first), allocate
the output and call ``torch.ops.v4kernels_C.moe_mxfp4_decode_*``. No host synchronisation.

Numerics: as the reference, except for the order of the fp32 additions (inside each 32-K chunk on
the tensor cores, per 128-K block, and across the K-slices of a tile, added at the end in a fixed
order); outputs are deterministic and agree with the reference to a few fp32 ulps before the bf16
rounding (typically bit-equal, sometimes one bf16 ulp apart).

``decode_supported`` / ``swiglu_decode_supported`` decide from shapes, dtypes, devices and
alignment only (no values): the kernel streams each active expert's weights once per 16 rows,
so it is meant for the decode regime (few rows per expert). It needs K % 512 == 0 (the TMA row
stride of the e8m0 scales, K/32 bytes, must be a multiple of 16), at most 1024 experts and
E * N < 2^31; other shapes go to the Triton kernels.
"""
from __future__ import annotations

import torch

MODE_IDS = {"w4a8": 0, "w4a16": 1}
ROWS_PER_PASS = 16  # rows of one expert computed per pass over its weights
MAX_DECODE_ROWS = 256
K_MULTIPLE = 512  # one pipeline stage of the kernel; TMA needs the scale rows (K/32 B) 16-byte aligned
MAX_EXPERTS = 1024  # the kernel keeps a prefix over the experts in shared memory


def _u8(t: torch.Tensor) -> torch.Tensor:
    t = t if t.dtype == torch.uint8 else t.view(torch.uint8)
    return t.contiguous()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned data pointer (the kernel loads 16-byte pieces)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _i32(t):
    return None if t is None else t.to(torch.int32).contiguous()


def _prep_act(a, a_scale, mode):
    if mode == "w4a16":
        return _aligned(a), None
    if a.dtype != torch.float8_e4m3fn:
        from ..ops.quant import act_quant_fp8

        a, a_scale = act_quant_fp8(a, 128)
    return _aligned(_u8(a)), _aligned(_u8(a_scale))


def _rows(a, row_ids):
    return a.shape[0] if row_ids is None else row_ids.shape[0]


def moe_grouped_gemm_mxfp4_out(a, a_scale, w, w_scale, expert_offsets, row_ids, mode, out):
    """Writes ``out`` (bf16 [M, N], contiguous) in place; inputs as ``moe_grouped_gemm_mxfp4``."""
    a, a_scale = _prep_act(a, a_scale, mode)
    torch.ops.v4kernels_C.moe_mxfp4_decode_gemm(
        a, a_scale, _aligned(_u8(w)), _aligned(_u8(w_scale)), _i32(expert_offsets), _i32(row_ids),
        MODE_IDS[mode], out,
    )
    return out


def moe_grouped_swiglu_mxfp4_out(a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids, row_weights,
                                 mode, swiglu_limit, out):
    """Writes ``out`` (bf16 [M, I], contiguous) in place; inputs as ``moe_grouped_swiglu_mxfp4``."""
    a, a_scale = _prep_act(a, a_scale, mode)
    rw = None if row_weights is None else row_weights.to(torch.float32).contiguous()
    torch.ops.v4kernels_C.moe_mxfp4_decode_swiglu(
        a, a_scale, _aligned(_u8(w1)), _aligned(_u8(w1_scale)), _aligned(_u8(w3)), _aligned(_u8(w3_scale)),
        _i32(expert_offsets), _i32(row_ids), rw, MODE_IDS[mode], float(swiglu_limit), out,
    )
    return out


def moe_grouped_gemm_mxfp4(a, a_scale, w, w_scale, expert_offsets, row_ids=None, mode="w4a8"):
    """CUDA decode kernel of ``v4kernels.moe_grouped_gemm_mxfp4``: bf16 [M, N]."""
    out = torch.empty((_rows(a, row_ids), w.shape[1]), dtype=torch.bfloat16, device=a.device)
    return moe_grouped_gemm_mxfp4_out(a, a_scale, w, w_scale, expert_offsets, row_ids, mode, out)


def moe_grouped_swiglu_mxfp4(a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids=None, row_weights=None,
                             mode="w4a8", swiglu_limit=10.0):
    """CUDA decode kernel of ``v4kernels.moe_grouped_swiglu_mxfp4``: bf16 [M, I]."""
    out = torch.empty((_rows(a, row_ids), w1.shape[1]), dtype=torch.bfloat16, device=a.device)
    return moe_grouped_swiglu_mxfp4_out(
        a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids, row_weights, mode, swiglu_limit, out
    )


def _weights_ok(*ts) -> bool:
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in ts)


def _common_supported(a, a_scale, weights, expert_offsets, row_ids, mode) -> bool:
    if mode not in MODE_IDS or not isinstance(a, torch.Tensor) or a.device.type != "cuda":
        return False
    w = weights[0]
    if w.dim() != 3:
        return False
    E, N, K = w.shape[0], w.shape[1], 2 * w.shape[2]
    if K == 0 or K % K_MULTIPLE or not 1 <= E <= MAX_EXPERTS or E * N >= 2**31:
        return False
    if mode == "w4a16" and a.dtype != torch.bfloat16:
        return False
    if mode == "w4a8" and a.dtype not in (torch.bfloat16, torch.float8_e4m3fn):
        return False
    if expert_offsets.dtype not in (torch.int32, torch.int64):
        return False
    if row_ids is not None and row_ids.dtype not in (torch.int32, torch.int64):
        return False
    M = _rows(a, row_ids)
    # Decode regime: the weights are streamed once per 16 rows of an expert.
    if not (M <= MAX_DECODE_ROWS or M <= ROWS_PER_PASS * E):
        return False
    return _weights_ok(*weights)


def decode_supported(a, a_scale, w, w_scale, expert_offsets, row_ids=None, *rest, **kwargs) -> bool:
    """Shapes/dtypes the decode kernels take (no host synchronisation), for ``cuda_supported=``.

    Called with the arguments of ``moe_grouped_gemm_mxfp4``; also accepts those of
    ``moe_grouped_swiglu_mxfp4`` (recognised by the 3-d w3 in the fifth place) and then defers to
    ``swiglu_decode_supported``, so one predicate serves both ops."""
    if isinstance(expert_offsets, torch.Tensor) and expert_offsets.dim() == 3:
        return swiglu_decode_supported(a, a_scale, w, w_scale, expert_offsets, row_ids, *rest, **kwargs)
    mode = rest[0] if rest else kwargs.get("mode", "w4a8")
    return _common_supported(a, a_scale, (w, w_scale), expert_offsets, row_ids, mode)


def swiglu_decode_supported(a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids=None, row_weights=None,
                            mode="w4a8", swiglu_limit=10.0) -> bool:
    """Shapes/dtypes the decode kernel of ``moe_grouped_swiglu_mxfp4`` takes (no host synchronisation)."""
    if w3.shape != w1.shape or w3_scale.shape != w1_scale.shape:
        return False
    return _common_supported(a, a_scale, (w1, w1_scale, w3, w3_scale), expert_offsets, row_ids, mode)
