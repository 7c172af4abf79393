"""Triton kernels of the cache formats (reference: v4kernels/formats.py, spec §6).

Paged layout (per page of ``page_size`` rows, ``page_bytes`` = padded to 576): data rows first, then
scale rows. Row ``r`` (physical) lives in page ``r // page_size`` at offset ``r % page_size``.
Every kernel masks rows outside [0, num_rows) (the host already raised for them; -1 means skip on
write and zeros on read), so no index can reach memory outside the cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import e4m3_bits, round_bf16
from .numerics import bf16_bits, bf16_bits_to_fp32, e2m1_quant_rows, e2m1_to_fp32, e4m3_quant_rows, e4m3_to_fp32, e8m0_to_fp32


def _interp() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- KV584
@triton.jit
def _kv584_write_kernel(cache_ptr, cache16_ptr, rows_ptr, kv_ptr, kv16_ptr, N, num_rows, page_size, page_bytes,
                        ROWS: tl.constexpr):
    """Per row: nope = kv[:448] -> 7 blocks of 64 e4m3 + ue8m0 (act_quant block 64); rope = kv[448:] bf16 bytes.
    Data row (576 B) at page*page_bytes + off*576; scales (7 + pad 0) at page*page_bytes + page_size*576 + off*8."""
    pid = tl.program_id(0)
    # groups g = (row, block): [ROWS * 8, 64]; block 7 is the rope part
    g = tl.arange(0, ROWS * 8)
    gi = g // 8
    blk = g % 8
    j = tl.arange(0, 64)
    row_i = pid * ROWS + gi
    mi = row_i < N
    r = tl.load(rows_ptr + row_i, mask=mi, other=-1).to(tl.int64)
    ok_g = mi & (r >= 0) & (r < num_rows)
    r = tl.where(ok_g, r, 0)
    base_g = (r // page_size) * page_bytes
    off_g = r % page_size
    is_nope = blk < 7
    src = row_i.to(tl.int64)[:, None] * 512 + blk[:, None] * 64 + j[None, :]
    x = tl.load(kv_ptr + src, mask=(ok_g & is_nope)[:, None], other=0.0).to(tl.float32)
    y, e, bad = e4m3_quant_rows(x)
    y = tl.where(bad[:, None], float("nan"), y)
    dst = base_g[:, None] + off_g[:, None] * 576 + blk[:, None] * 64 + j[None, :]
    tl.store(cache_ptr + dst, e4m3_bits(y), mask=(ok_g & is_nope)[:, None])
    # rope: 64 bf16 copied bit for bit (as int16), at byte 448 of the data row
    rope = tl.load(kv16_ptr + row_i.to(tl.int64)[:, None] * 512 + 448 + j[None, :], mask=(ok_g & ~is_nope)[:, None])
    dst16 = (base_g[:, None] + off_g[:, None] * 576 + 448) // 2 + j[None, :]
    tl.store(cache16_ptr + dst16, rope, mask=(ok_g & ~is_nope)[:, None])
    # scales: 7 exponents and a zero pad byte
    sdst = base_g + page_size * 576 + off_g * 8 + blk
    tl.store(cache_ptr + sdst, tl.where(is_nope, e, 0).to(tl.uint8), mask=ok_g)


@triton.jit
def _kv584_read_kernel(cache_ptr, cache16_ptr, rows_ptr, out_ptr, out16_ptr, N, num_rows, page_size, page_bytes,
                       ROWS: tl.constexpr):
    """out[i] = decode(row rows[i]) (bf16 [512]): nope = e4m3 * 2^(e-127), rope copied; invalid rows -> zeros."""
    pid = tl.program_id(0)
    g = tl.arange(0, ROWS * 8)
    gi = g // 8
    blk = g % 8
    j = tl.arange(0, 64)
    row_i = pid * ROWS + gi
    mi = row_i < N
    r = tl.load(rows_ptr + row_i, mask=mi, other=-1).to(tl.int64)
    ok = mi & (r >= 0) & (r < num_rows)
    r = tl.where(ok, r, 0)
    base = (r // page_size) * page_bytes
    off = r % page_size
    is_nope = blk < 7
    src = base[:, None] + off[:, None] * 576 + blk[:, None] * 64 + j[None, :]
    b = tl.load(cache_ptr + src, mask=(ok & is_nope)[:, None], other=0)
    e = tl.load(cache_ptr + base + page_size * 576 + off * 8 + blk, mask=ok & is_nope, other=127)
    v = round_bf16(e4m3_to_fp32(b) * e8m0_to_fp32(e)[:, None])
    v = tl.where(ok[:, None], v, 0.0)
    dst = row_i.to(tl.int64)[:, None] * 512 + blk[:, None] * 64 + j[None, :]
    tl.store(out_ptr + dst, v.to(tl.bfloat16), mask=(mi & is_nope)[:, None])
    rope = tl.load(cache16_ptr + (base[:, None] + off[:, None] * 576 + 448) // 2 + j[None, :],
                   mask=(ok & ~is_nope)[:, None], other=0)
    tl.store(out16_ptr + row_i.to(tl.int64)[:, None] * 512 + 448 + j[None, :], rope, mask=(mi & ~is_nope)[:, None])


def kv584_write(cache, rows, kv, page_size):
    N = rows.shape[0]
    if N == 0:
        return
    kvc = kv.contiguous()
    rows_per = 2 if _interp() else 4
    grid = (triton.cdiv(N, rows_per),)
    _kv584_write_kernel[grid](cache, cache.view(torch.int16), rows.contiguous(), kvc, kvc.view(torch.int16), N,
                              cache.shape[0] * page_size, page_size, cache.shape[1], ROWS=rows_per, num_warps=4)


def kv584_read(cache, rows, page_size):
    N = rows.shape[0]
    out = torch.empty(N, 512, dtype=torch.bfloat16, device=cache.device)
    if N == 0:
        return out
    rows_per = 2 if _interp() else 4
    grid = (triton.cdiv(N, rows_per),)
    _kv584_read_kernel[grid](cache, cache.view(torch.int16), rows.contiguous(), out, out.view(torch.int16), N,
                             cache.shape[0] * page_size, page_size, cache.shape[1], ROWS=rows_per, num_warps=4)
    return out


# ----------------------------------------------------------------------------- IDX_FP4 (68 B)
@triton.jit
def _idx_fp4_write_kernel(cache_ptr, rows_ptr, k_ptr, N, num_rows, page_size, page_bytes, ROWS: tl.constexpr,
                          K_BF16_BITS: tl.constexpr):
    """Per row: 4 blocks of 32 -> E2M1 codes (packed, low nibble = even element) + 4 ue8m0 scales.
    Data (64 B) at page*page_bytes + off*64; scales at page*page_bytes + page_size*64 + off*4."""
    pid = tl.program_id(0)
    g = tl.arange(0, ROWS * 4)
    gi = g // 4
    blk = g % 4
    row_i = pid * ROWS + gi
    mi = row_i < N
    r = tl.load(rows_ptr + row_i, mask=mi, other=-1).to(tl.int64)
    ok = mi & (r >= 0) & (r < num_rows)
    r = tl.where(ok, r, 0)
    base = (r // page_size) * page_bytes
    off = r % page_size
    j = tl.arange(0, 32)
    koffs = row_i.to(tl.int64)[:, None] * 128 + blk[:, None] * 32 + j[None, :]
    if K_BF16_BITS:  # k_ptr: int16 view of bf16 keys (exact for subnormals, also under the interpreter)
        x = bf16_bits_to_fp32(tl.load(k_ptr + koffs, mask=ok[:, None], other=0))
    else:
        x = tl.load(k_ptr + koffs, mask=ok[:, None], other=0.0).to(tl.float32)
    code, e, v = e2m1_quant_rows(x)
    lo, hi = tl.split(tl.reshape(code, (ROWS * 4, 16, 2)))
    byte = (lo & 0xF) | ((hi & 0xF) << 4)
    jj = tl.arange(0, 16)
    tl.store(cache_ptr + base[:, None] + off[:, None] * 64 + blk[:, None] * 16 + jj[None, :], byte.to(tl.uint8),
             mask=ok[:, None])
    tl.store(cache_ptr + base + page_size * 64 + off * 4 + blk, e.to(tl.uint8), mask=ok)


@triton.jit
def _idx_fp4_read_kernel(cache_ptr, rows_ptr, out_ptr, N, num_rows, page_size, page_bytes, ROWS: tl.constexpr):
    """out[i] = E2M1(codes) * 2^(e-127) of row rows[i] (bf16 [128]); invalid rows -> zeros."""
    pid = tl.program_id(0)
    g = tl.arange(0, ROWS * 4)
    gi = g // 4
    blk = g % 4
    row_i = pid * ROWS + gi
    mi = row_i < N
    r = tl.load(rows_ptr + row_i, mask=mi, other=-1).to(tl.int64)
    ok = mi & (r >= 0) & (r < num_rows)
    r = tl.where(ok, r, 0)
    base = (r // page_size) * page_bytes
    off = r % page_size
    jj = tl.arange(0, 16)
    b = tl.load(cache_ptr + base[:, None] + off[:, None] * 64 + blk[:, None] * 16 + jj[None, :], mask=ok[:, None],
                other=0).to(tl.int32)
    e = tl.load(cache_ptr + base + page_size * 64 + off * 4 + blk, mask=ok, other=127)
    s = e8m0_to_fp32(e)[:, None]
    lo = e2m1_to_fp32(b & 0xF) * s
    hi = e2m1_to_fp32(b >> 4) * s
    v = tl.reshape(tl.join(lo, hi), (ROWS * 4, 32))
    v = tl.where(ok[:, None], v, 0.0)
    j = tl.arange(0, 32)
    # out_ptr: int16 view of the bf16 output (2^-127 values are subnormal: store bits)
    tl.store(out_ptr + row_i.to(tl.int64)[:, None] * 128 + blk[:, None] * 32 + j[None, :], bf16_bits(v),
             mask=mi[:, None])


def idx_fp4_write(cache, rows, k, page_size):
    N = rows.shape[0]
    if N == 0:
        return
    rows_per = 2 if _interp() else 16
    kc = k.contiguous()
    bits = kc.dtype == torch.bfloat16
    _idx_fp4_write_kernel[(triton.cdiv(N, rows_per),)](cache, rows.contiguous(), kc.view(torch.int16) if bits else kc,
                                                       N, cache.shape[0] * page_size, page_size, cache.shape[1],
                                                       ROWS=rows_per, K_BF16_BITS=bits, num_warps=4)


def idx_fp4_read(cache, rows, page_size):
    N = rows.shape[0]
    out = torch.empty(N, 128, dtype=torch.bfloat16, device=cache.device)
    if N == 0:
        return out
    rows_per = 2 if _interp() else 16
    _idx_fp4_read_kernel[(triton.cdiv(N, rows_per),)](cache, rows.contiguous(), out.view(torch.int16), N, cache.shape[0] * page_size,
                                                      page_size, cache.shape[1], ROWS=rows_per, num_warps=4)
    return out
