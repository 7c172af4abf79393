"""Triton FP8 block-scaled GEMM (reference: v4kernels/reference/linear.py, spec §2.3).

``fp8_linear`` = act_quant_fp8(x, 128) (the registered op: CUDA or Triton kernel) + ``_fp8_gemm_kernel``:
for each 128-K block kb, ``part = dot(xq[:, kb], W[:, kb]^T)`` with a fresh fp32 accumulator (FP8
wgmma on sm_90; under the interpreter both operands are decoded from their bytes and the dot runs in
fp32, IEEE), then ``acc += part * sx[m, kb] * sW[n // 128, kb]`` (powers of two: exact). Output bf16.

Small M (decode) has too few output tiles to fill the GPU: the K blocks are split over SPLIT programs
that write fp32 partials to a workspace, summed in a fixed order by ``_splitk_reduce_kernel``
(deterministic; the order of the kb sums differs from the reference's, within fp32 rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import round_bf16
from .numerics import e4m3_to_fp32, e8m0_to_fp32


def _interp() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _fp8_gemm_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, out_ptr, M, N, KB, KB_PER_SPLIT,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8_DOT: tl.constexpr, SPLIT: tl.constexpr):
    """out[m, n] = sum_kb dot(xq[m, kb], W[n, kb])_fp32 * 2^(sx[m,kb]-127) * 2^(sW[n//128,kb]-127).

    x_ptr: e4m3 [M, K] (uint8 bytes when not FP8_DOT); w_ptr: e4m3 [N, K]; sx: uint8 [M, KB]; sw: uint8 [ceil(N/128), KB].
    SPLIT: out_ptr is an fp32 workspace [SPLIT, M, N] (this program's K range only), else bf16 [M, N]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    mm = offs_m < M
    mn = offs_n < N
    K = KB * 128
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb0 = pid_k * KB_PER_SPLIT
    kb1 = tl.minimum(kb0 + KB_PER_SPLIT, KB)
    for kb in range(kb0, kb1):
        a = tl.load(x_rows + kb * 128, mask=mm[:, None], other=0.0 if FP8_DOT else 0)
        b = tl.load(w_rows + kb * 128, mask=mn[:, None], other=0.0 if FP8_DOT else 0)
        if FP8_DOT:
            part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        else:
            part = tl.dot(e4m3_to_fp32(a), tl.trans(e4m3_to_fp32(b)), input_precision="ieee", out_dtype=tl.float32)
        sx = e8m0_to_fp32(tl.load(sx_ptr + offs_m.to(tl.int64) * KB + kb, mask=mm, other=127))
        sw = e8m0_to_fp32(tl.load(sw_ptr + (offs_n // 128).to(tl.int64) * KB + kb, mask=mn, other=127))
        acc += part * sx[:, None] * sw[None, :]
    if SPLIT:
        o = out_ptr + (pid_k.to(tl.int64) * M + offs_m.to(tl.int64)[:, None]) * N + offs_n[None, :]
        tl.store(o, acc, mask=mm[:, None] & mn[None, :])
    else:
        o = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(o, round_bf16(acc).to(tl.bfloat16), mask=mm[:, None] & mn[None, :])


@triton.jit
def _splitk_reduce_kernel(ws_ptr, out_ptr, MN, S, BLOCK: tl.constexpr):
    """out = bf16(sum_s ws[s]) in increasing s (fixed order: deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(ws_ptr + s * MN + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, round_bf16(acc).to(tl.bfloat16), mask=m)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def fp8_gemm(xq, sx, w, w_scale):
    """xq e4m3 [M, K], sx e8m0 [M, K/128], w e4m3 [N, K], w_scale e8m0 [ceil(N/128), K/128] -> bf16 [M, N]."""
    M, K = xq.shape
    N = w.shape[0]
    KB = K // 128
    out = torch.empty(M, N, dtype=torch.bfloat16, device=xq.device)
    if M == 0 or N == 0:
        return out
    interp = _interp()
    if K == 0:
        return out.zero_()
    if interp:
        bm, bn, warps, stages = 16, 32, 4, 1
    else:
        bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
        bn = 128
        warps, stages = (4, 4) if bm <= 64 else (8, 3)
    gm, gn = triton.cdiv(M, bm), triton.cdiv(N, bn)
    split = 1
    if gm * gn < _num_sms(xq.device) and KB > 1:
        split = min(KB, triton.cdiv(2 * _num_sms(xq.device), gm * gn))
    kb_per = triton.cdiv(KB, split)
    split = triton.cdiv(KB, kb_per)
    fp8 = not interp
    xa = xq if fp8 else xq.view(torch.uint8)
    wa = w if fp8 else w.view(torch.uint8)
    sxa, swa = sx.contiguous().view(torch.uint8), w_scale.contiguous().view(torch.uint8)
    if split == 1:
        _fp8_gemm_kernel[(gm, gn, 1)](xa, sxa, wa, swa, out, M, N, KB, kb_per, BLOCK_M=bm, BLOCK_N=bn, FP8_DOT=fp8,
                                      SPLIT=False, num_warps=warps, num_stages=stages)
        return out
    ws = torch.empty(split, M, N, dtype=torch.float32, device=xq.device)
    _fp8_gemm_kernel[(gm, gn, split)](xa, sxa, wa, swa, ws, M, N, KB, kb_per, BLOCK_M=bm, BLOCK_N=bn, FP8_DOT=fp8,
                                      SPLIT=True, num_warps=warps, num_stages=stages)
    blk = 1024
    _splitk_reduce_kernel[(triton.cdiv(M * N, blk),)](ws, out, M * N, split, BLOCK=blk, num_warps=4)
    return out


def fp8_linear(x, w, w_scale):
    from ..ops.quant import act_quant_fp8

    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    backend = "triton" if x.device.type != "cuda" else None  # CPU tensors: interpreter kernels
    xq, sx = act_quant_fp8(x2, 128, backend=backend)
    return fp8_gemm(xq, sx, w.contiguous(), w_scale).reshape(*x.shape[:-1], w.shape[0])
