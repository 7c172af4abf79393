"""Quantized linear layers of V4 (spec §2.3, §8.2), float32 references.

``fp8_linear``: FP8 block-scaled GEMM (non-expert Linears and the shared expert)::

    xq, sx = act_quant_fp8(x, 128)                   # 1x128 e4m3 + ue8m0 per (row, 128-K block)
    C[m, n] = sum_kb ( sum_{k in kb} xq[m,k] * W[n,k] )_fp32 * sx[m,kb] * sW[n//128, kb]
    out = bf16(C)

The inner 128-long dot runs in fp32 (its summation order inside the block is unspecified: the
tensor core and ``torch.matmul`` differ in the last ulp); the per-block partial is scaled and added
to a separate fp32 accumulator in increasing ``kb`` order. ``sx * sW`` is a product of powers of two,
so the scaling is exact (barring over/underflow).

``fp4_linear``: W4A8 (routed experts), FP4 E2M1 weight with one e8m0 scale per 1x32 along K::

    acc[m, n] += ( sum_{k in k32} xq[m,k] * Wq[n,k] )_fp32 * sx[m, k32 // 4] * sW[n, k32]

Weight helpers (for random-weight models and tests): ``quantize_weight_fp8_block`` (128x128 e8m0
blocks) and ``quantize_weight_mxfp4`` (packed E2M1 + e8m0 per 32), both with the act-quant rounding
(ue8m0 scale = 2^ceil(log2(amax / qmax)), RNE values).
"""
from __future__ import annotations

import torch

from . import quant as q

BLOCK = 128
FP4_BLOCK = 32


def _check_k(x: torch.Tensor, k: int, block: int, what: str):
    if k % block != 0:
        raise ValueError(f"{what}: expected K to be a multiple of {block}, got {k}")


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype=torch.bfloat16) -> torch.Tensor:
    """FP8 block-scaled linear (spec §2.3).

    x: [..., K] bf16 (any float accepted; it is quantized 1x128 first), K a multiple of 128.
    w: float8_e4m3fn [N, K]. w_scale: e8m0 (float8_e8m0fnu or uint8 exponents) [ceil(N/128), K/128].
    Returns ``out_dtype`` (bf16) [..., N].
    """
    K = x.shape[-1]
    N = w.shape[0]
    _check_k(x, K, BLOCK, "x.shape[-1]")
    lead = x.shape[:-1]
    xq, sx = q.act_quant_fp8(x.reshape(-1, K), BLOCK)  # [M, K], [M, K/128]
    return fp8_linear_prequant(xq, sx, w, w_scale, out_dtype).reshape(*lead, N)


def fp8_linear_prequant(xq, sx, w, w_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """The GEMM part of ``fp8_linear`` on an already quantized activation (xq e4m3 [M, K], sx e8m0 [M, K/128])."""
    M, K = xq.shape
    N = w.shape[0]
    kb_n = K // BLOCK
    xf = xq.float().view(M, kb_n, BLOCK)
    wf = w.float().view(N, kb_n, BLOCK)
    sxf = q.e8m0_to_float(sx)  # [M, KB]
    swf = q.e8m0_to_float(w_scale)  # [ceil(N/128), KB]
    sw_rows = swf.repeat_interleave(BLOCK, dim=0)[:N]  # [N, KB]
    acc = torch.zeros(M, N, dtype=torch.float32, device=xq.device)
    for kb in range(kb_n):
        part = xf[:, kb, :] @ wf[:, kb, :].T  # fp32 partial dot over one 128-K block
        acc = acc + part * sxf[:, kb : kb + 1] * sw_rows[:, kb][None, :]
    return acc.to(out_dtype)


def fp4_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, out_dtype=torch.bfloat16) -> torch.Tensor:
    """W4A8 linear (spec §2.3, §8.2): x act-quantized 1x128 FP8, FP4 weight with 1x32 e8m0 scales.

    x: [..., K] bf16, K a multiple of 128. w_packed: uint8/int8 [N, K/2] (low nibble = even k).
    w_scale: e8m0 [N, K/32]. Returns ``out_dtype`` [..., N]; per 32-K chunk
    ``acc += (sum_32 xq*Wq)_fp32 * sx[m, k32//4] * sW[n, k32]``.
    """
    K = x.shape[-1]
    N = w_packed.shape[0]
    _check_k(x, K, BLOCK, "x.shape[-1]")
    lead = x.shape[:-1]
    xq, sx = q.act_quant_fp8(x.reshape(-1, K), BLOCK)
    M = xq.shape[0]
    nch = K // FP4_BLOCK
    wv = q.e2m1_decode(q.unpack_fp4(w_packed.view(torch.uint8))).view(N, nch, FP4_BLOCK)  # exact E2M1 values
    xf = xq.float().view(M, nch, FP4_BLOCK)
    sxf = q.e8m0_to_float(sx).repeat_interleave(BLOCK // FP4_BLOCK, dim=1)  # [M, K/32]
    swf = q.e8m0_to_float(w_scale)  # [N, K/32]
    acc = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    for c in range(nch):
        part = xf[:, c, :] @ wv[:, c, :].T
        acc = acc + part * sxf[:, c : c + 1] * swf[:, c][None, :]
    return acc.to(out_dtype).reshape(*lead, N)


def quantize_weight_fp8_block(w: torch.Tensor, block: int = BLOCK):
    """Quantize a float weight [N, K] to e4m3 with one e8m0 scale per ``block x block`` tile.

    Returns (w_fp8 float8_e4m3fn [N, K], w_scale float8_e8m0fnu [ceil(N/block), ceil(K/block)]).
    ``amax = max(max|W_tile|, 1e-4)``; ``s = 2^ceil(log2(amax / 448))``; ``q = e4m3_rne(clamp(W/s, +-448))``
    (the act-quant rule applied per tile; partial edge tiles use their own amax)."""
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-d tensor [N, K], got shape {tuple(w.shape)}")
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    wp = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    wp[:N, :K] = w.float()
    tiles = wp.view(nb, block, kb, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(q.FP8_AMAX_FLOOR)  # [nb, kb]
    e = q.ue8m0_ceil(amax / q.FP8_MAX)
    s = q.e8m0_to_float(e)
    y = torch.clamp(tiles / s[:, None, :, None], -q.FP8_MAX, q.FP8_MAX)
    wq = y.view(nb * block, kb * block)[:N, :K].to(torch.float8_e4m3fn).contiguous()
    return wq, e.to(torch.uint8).view(torch.float8_e8m0fnu)


def dequant_weight_fp8_block(w: torch.Tensor, w_scale: torch.Tensor, dtype=torch.float32, block: int = BLOCK):
    """``fp8(W)[n,k] * scale[n//block, k//block]`` (spec §2.3 dequant formula), in ``dtype``."""
    N, K = w.shape
    s = q.e8m0_to_float(w_scale).repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :K]
    return (w.float() * s).to(dtype)


def quantize_weight_mxfp4(w: torch.Tensor):
    """Quantize a float weight [N, K] (K a multiple of 32) to packed E2M1 [N, K/2] + e8m0 [N, K/32]."""
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-d tensor [N, K], got shape {tuple(w.shape)}")
    _check_k(w, w.shape[1], FP4_BLOCK, "w.shape[1]")
    codes, s = q.quant_fp4(w.float(), FP4_BLOCK)
    return q.pack_fp4(codes), s
