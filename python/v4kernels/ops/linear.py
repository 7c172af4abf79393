"""FP8 block-scaled linear (spec §2.3): x act-quantized 1x128 (ue8m0), e4m3 weight with 128x128 e8m0 scales."""
from __future__ import annotations

import torch

from .._checks import check_multiple, check_same_device, check_tensor
from .._dispatch import define_op
from ..reference import linear as ref
from ..triton import linear as tri

quantize_weight_fp8_block = ref.quantize_weight_fp8_block  # (w [N, K] float) -> (e4m3 [N, K], e8m0 [N/128, K/128])
quantize_weight_mxfp4 = ref.quantize_weight_mxfp4
dequant_weight_fp8_block = ref.dequant_weight_fp8_block


def _check_fp8_linear(x, w, w_scale):
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float16, torch.float32))
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dim, got a 0-d tensor")
    check_tensor("w", w, dtype=torch.float8_e4m3fn, dim=2)
    K = x.shape[-1]
    check_multiple("x.shape[-1]", K, 128, "(K)")
    if w.shape[1] != K:
        raise ValueError(f"w: expected shape (N, {K}) to match x.shape[-1], got {tuple(w.shape)}")
    check_tensor("w_scale", w_scale, dtype=(torch.float8_e8m0fnu, torch.uint8),
                 shape=(-(-w.shape[0] // 128), K // 128))
    check_same_device(x=x, w=w, w_scale=w_scale)


def _fake(x, w, w_scale):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.bfloat16)


fp8_linear_op = define_op(
    "fp8_linear(Tensor x, Tensor w, Tensor w_scale, *, str? backend=None) -> Tensor",
    check=_check_fp8_linear,
    reference=ref.fp8_linear,
    fake=_fake,
    triton=tri.fp8_linear,
)


def fp8_linear(x, w, w_scale, *, backend: str | None = None) -> torch.Tensor:
    """FP8 block-scaled linear (spec §2.3).

    Parameters
    ----------
    x : Tensor [..., K], bf16 (fp16/fp32 accepted), K a multiple of 128.
    w : float8_e4m3fn [N, K].
    w_scale : e8m0 (float8_e8m0fnu or uint8 exponents) [ceil(N/128), K/128].

    Returns
    -------
    bf16 [..., N]: ``xq, sx = act_quant_fp8(x, 128)``;
    ``C[m,n] = sum_kb (sum_{k in kb} xq[m,k] W[n,k])_fp32 * sx[m,kb] * sW[n//128,kb]`` (fp32 accumulator).

    Tolerance vs the reference: the activation quantization is bitwise equal; the 128-long fp32 dot
    order (tensor core) and the split-K order (small M) differ, so outputs agree to fp32 rounding
    before the bf16 cast (calc_diff < 1e-6, most elements bitwise).
    """
    return fp8_linear_op(x, w, w_scale, backend=backend)
