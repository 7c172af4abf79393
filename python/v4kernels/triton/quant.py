"""Triton kernels of the quantization family (reference: v4kernels/reference/quant.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import e4m3_bits, round_e4m3, ue8m0_exponent


@triton.jit
def _act_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, num_groups, BLOCK: tl.constexpr, GROUPS: tl.constexpr):
    # One program quantizes GROUPS consecutive (row, block) groups of BLOCK values each.
    pid = tl.program_id(0)
    g = pid * GROUPS + tl.arange(0, GROUPS)
    mask_g = g < num_groups
    offs = g[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + offs, mask=mask_g[:, None], other=0.0).to(tl.float32)
    # amax = max(max|x|, 1e-4), NaN-propagating (a NaN block gets the NaN scale 0xFF)
    ax = tl.abs(x)
    amax = tl.max(ax, axis=1)
    bad = tl.max((ax != ax).to(tl.int32), axis=1) > 0
    bad = bad | (amax > 3.0e38)
    amax = tl.maximum(amax, 1e-4)
    # s = 2^ceil(log2(amax * (1/448))): biased exponent + (mantissa != 0)
    e = ue8m0_exponent(amax * (1.0 / 448.0))
    inv_s = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 2^(127 - e), exact
    y = tl.minimum(tl.maximum(x * inv_s[:, None], -448.0), 448.0)
    y = tl.where(bad[:, None], float("nan"), round_e4m3(y))
    tl.store(q_ptr + offs, e4m3_bits(y), mask=mask_g[:, None])  # q_ptr: uint8 view of e4m3
    e = tl.where(bad, 0xFF, e)
    tl.store(s_ptr + g, e.to(tl.uint8), mask=mask_g)


def act_quant_fp8(x: torch.Tensor, block: int = 128):
    xc = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((*x.shape[:-1], x.shape[-1] // block), dtype=torch.uint8, device=x.device)
    num_groups = s.numel()
    if num_groups:
        groups = max(1, min(32, 4096 // block))
        grid = (triton.cdiv(num_groups, groups),)
        _act_quant_fp8_kernel[grid](xc, q.view(torch.uint8), s, num_groups, BLOCK=block, GROUPS=groups, num_warps=4)
    return q, s.view(torch.float8_e8m0fnu)
