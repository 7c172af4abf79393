"""Quantization ops (spec §2.2): FP8 e4m3 activation quantization with ue8m0 block scales.

The pure functions for FP4/MXFP4 packing and dequantization live in
``v4kernels.reference.quant`` and are re-exported by ``v4kernels.quant``.
"""
from __future__ import annotations

import torch

from .._checks import check_choice, check_multiple, check_tensor
from .._dispatch import define_op
from ..reference import quant as ref
from ..triton import quant as tri

_FLOAT_IN = (torch.bfloat16, torch.float16, torch.float32)


def _check_act_quant(x, block=128):
    check_tensor("x", x, dtype=_FLOAT_IN)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim, got a 0-d tensor")
    check_choice("block", block, (32, 64, 128))
    check_multiple("x.shape[-1]", x.shape[-1], block)


def _fake_act_quant(x, block=128):
    q = x.new_empty(x.shape, dtype=torch.float8_e4m3fn)
    s = x.new_empty((*x.shape[:-1], x.shape[-1] // block), dtype=torch.float8_e8m0fnu)
    return q, s


def _cuda_act_quant(x, block=128):
    xc = x.contiguous()
    if xc.data_ptr() % 16:  # the kernel loads 16 bytes per lane
        xc = xc.clone()
    q, s = _fake_act_quant(x, block)
    torch.ops.v4kernels_C.act_quant_fp8_out(xc, block, q, s.view(torch.uint8))
    return q, s


act_quant_fp8_op = define_op(
    "act_quant_fp8(Tensor x, int block=128, *, str? backend=None) -> (Tensor, Tensor)",
    check=_check_act_quant,
    reference=ref.act_quant_fp8,
    fake=_fake_act_quant,
    triton=tri.act_quant_fp8,
    cuda=_cuda_act_quant,
    cuda_supported=lambda x, block=128: x.dtype == torch.bfloat16,
)


def act_quant_fp8(x: torch.Tensor, block: int = 128, *, backend: str | None = None):
    """Quantize activations to FP8 e4m3 with one power-of-two scale per ``block`` values.

    Parameters
    ----------
    x : Tensor [..., K], bf16 (fp16/fp32 accepted), K a multiple of ``block``.
    block : 128 (linear inputs, 1x128) or 64 (KV nope dims); 32 also accepted.
    backend : "reference" | "triton" | "cuda" | "auto" (default: ``V4K_BACKEND`` or auto).

    Returns
    -------
    q : float8_e4m3fn [..., K] = e4m3_rne(clamp(x / s, -448, 448))
    s : float8_e8m0fnu [..., K / block], s = 2^ceil(log2(max(amax, 1e-4) / 448))

    A block holding NaN or inf gets scale 0xFF (e8m0 NaN) on every backend; its values are unspecified.
    """
    return act_quant_fp8_op(x, block, backend=backend)
