"""Triton kernels of the numerics family: Hadamard, RoPE, RMSNorm, FP8/FP4 fake-quant, MXFP4 dequant.

References: v4kernels/reference/{hadamard,rope,norm,quant}.py. Every kernel computes in fp32 and
rounds with explicit integer ops (``_common.round_bf16`` / ``round_e4m3``) before a store, so it is
bit-exact under ``TRITON_INTERPRET=1`` as on the GPU. Kernels whose reference has a ``a*b + c``
(RoPE, norms) are launched with ``enable_fp_fusion=False``: an FMA would round once where PyTorch
rounds twice. Divisions and square roots use ``div_rn`` / ``sqrt_rn`` (IEEE-rounded, as PyTorch's
CPU kernels) instead of Triton's approximate defaults.

Device functions for other kernels (``from v4kernels.triton.numerics import ...`` inside @triton.jit code):

* ``hadamard_rows(x, BLOCK_M, N)``: orthonormal Hadamard of each row of an fp32 tile ``[BLOCK_M, N]``
  (N a power of two), butterfly stages h = 1, 2, 4, ... then ``* N^-1/2``: bitwise equal to
  ``reference.hadamard.hadamard_transform``. Returns fp32 (round with ``round_bf16`` before a bf16 store).
* ``e4m3_fakequant_rows(x)``: fp32 tile ``[G, B]`` -> fp32 ``fp32(e4m3(x/s))*s`` per row (one ue8m0
  scale per row of B values, amax floor 1e-4): the values of ``fake_quant_fp8``; NaN rows for
  non-finite input. ``e4m3_quant_rows(x)`` returns ``(y on the e4m3 grid, scale exponent)``.
* ``e2m1_quant_rows(x)``: fp32 tile ``[G, 32]`` -> (E2M1 codes int32 incl. sign bit, biased e8m0
  exponent per row, fp32 dequantized values ``E2M1*s``): ``quant_fp4`` / ``fake_quant_fp4``.
* ``e4m3_to_fp32(bits)``, ``e8m0_to_fp32(e)``, ``e2m1_to_fp32(code)``: exact decoders from integer bits.
* ``rope_pairs(a, b, c, s)``: ``(a*c - b*s, a*s + b*c)`` (launch the kernel with ``enable_fp_fusion=False``
  to match the reference's two roundings).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import round_bf16, round_e4m3, ue8m0_exponent


def _interp() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ============================================================================ device helpers
@triton.jit
def e8m0_to_fp32(e):
    """Biased e8m0 exponent (any int type) -> fp32 2^(e-127); 0xFF -> NaN; 0 -> 2^-127 (subnormal)."""
    e = e.to(tl.int32)
    # e = 0: 2^-127 is the subnormal with bits 0x400000 (built from bits: a float literal may be flushed)
    v = tl.where(e == 0, 0x400000, e << 23).to(tl.float32, bitcast=True)
    return tl.where(e == 255, float("nan"), v)


@triton.jit
def e4m3_to_fp32(b):
    """e4m3fn byte (int) -> exact fp32 value (0x7F/0xFF -> NaN, sign of zero kept)."""
    b = b.to(tl.int32) & 0xFF
    sign = (b >> 7) << 31
    ex = (b >> 3) & 0xF
    man = b & 7
    normal = ((ex + 120) << 23) | (man << 20)
    sub = ((man.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True))  # man * 2^-9, exact
    mag = tl.where(ex == 0, sub, normal)
    v = (mag | sign).to(tl.float32, bitcast=True)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def e2m1_to_fp32(code):
    """E2M1 code (0..15, sign in bit 3) -> fp32 value (exact, -0 kept)."""
    c = code.to(tl.int32)
    m = c & 7
    # magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 = (2 + (m & 1)) * 2^((m >> 1) - 2) for m >= 2; m/2 below
    mag = tl.where(m < 2, m.to(tl.float32) * 0.5, (2 + (m & 1)).to(tl.float32) * (((m >> 1) + 125) << 23).to(tl.float32, bitcast=True))
    bits = mag.to(tl.int32, bitcast=True) | ((c >> 3) << 31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def bf16_bits(x):
    """fp32 -> int16 bit pattern of the nearest bf16 (RNE). Store it through an int16 view of a bf16 tensor:
    the interpreter's fp32->bf16 store flushes subnormals (2^-127 appears in FP4 data), bits do not."""
    b = round_bf16(x).to(tl.uint32, bitcast=True) >> 16
    return b.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def bf16_bits_to_fp32(b):
    """int16 bit pattern of a bf16 -> its exact fp32 value (the interpreter's bf16 load flushes subnormals)."""
    return ((b.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _neg(x):
    """-x by flipping the sign bit (Triton's unary minus drops the sign of zero in the interpreter)."""
    return (x.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)


@triton.jit
def hadamard_rows(x, BLOCK_M: tl.constexpr, N: tl.constexpr):
    """Orthonormal Sylvester Hadamard of each row of fp32 ``x [BLOCK_M, N]``, fixed butterfly order.

    Stage h (1, 2, 4, ... N/2): elements i and i + h of each 2h-block become (x_i + x_{i+h}, x_i - x_{i+h}).
    Then one multiply by fp32(N^-1/2)."""
    for st in tl.static_range(12):  # N <= 4096
        if (1 << st) < N:
            y = tl.reshape(x, (BLOCK_M, N // (2 << st), 2, 1 << st))
            y = tl.permute(y, (0, 1, 3, 2))  # the pair dim last, for split/join
            a, b = tl.split(y)
            y = tl.join(a + b, a - b)
            x = tl.reshape(tl.permute(y, (0, 1, 3, 2)), (BLOCK_M, N))
    return x * (1.0 / math.sqrt(N))


@triton.jit
def e4m3_quant_rows(x):
    """One ue8m0 FP8 scale per row of fp32 ``x [G, B]``: returns (y on the e4m3 grid as fp32, exponent int32,
    bad-row flag). y = e4m3_rne(clamp(x * 2^(127-e), -448, 448)); e = ue8m0(max(amax, 1e-4) / 448)."""
    ax = tl.abs(x)
    amax = tl.max(ax, axis=1)
    bad = (tl.max((ax != ax).to(tl.int32), axis=1) > 0) | (amax > 3.0e38)
    amax = tl.maximum(amax, 1e-4)
    e = ue8m0_exponent(amax * (1.0 / 448.0)).to(tl.int32)
    inv_s = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 2^(127 - e), exact
    y = tl.minimum(tl.maximum(x * inv_s[:, None], -448.0), 448.0)
    y = round_e4m3(y)
    e = tl.where(bad, 255, e)
    return y, e, bad


@triton.jit
def e4m3_fakequant_rows(x):
    """fp32 ``[G, B]`` -> ``fp32(e4m3(x/s)) * s`` per row (exact in bf16); NaN rows where x is not finite."""
    y, e, bad = e4m3_quant_rows(x)
    v = y * ((e << 23).to(tl.float32, bitcast=True))[:, None]
    return tl.where(bad[:, None], float("nan"), v)


@triton.jit
def e2m1_quant_rows(x):
    """MXFP4 per row of fp32 ``x [G, B]``: amax floor 6*2^-126, s = 2^ceil(log2(amax/6)) (IEEE division).

    Returns (codes int32 0..15 with sign bit 3, e int32 (255 for non-finite rows), values fp32 = E2M1*s,
    NaN for non-finite rows). Ties per spec: round-half-even on codes."""
    ax = tl.abs(x)
    amax = tl.max(ax, axis=1)
    bad = (tl.max((ax != ax).to(tl.int32), axis=1) > 0) | (amax > 3.0e38)
    amax = tl.maximum(amax, 6.0 * 1.1754943508222875e-38)
    e = ue8m0_exponent(tl.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32))).to(tl.int32)
    e = tl.minimum(e, 254)
    inv_s = ((254 - e) << 23).to(tl.float32, bitcast=True)
    y = tl.minimum(tl.maximum(x * inv_s[:, None], -6.0), 6.0)
    a = tl.abs(y)
    code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    code = code | ((y.to(tl.uint32, bitcast=True) >> 31).to(tl.int32) << 3)
    s = tl.where(e == 0, 0x400000, e << 23).to(tl.float32, bitcast=True)
    v = e2m1_to_fp32(code) * s[:, None]
    v = tl.where(bad[:, None], float("nan"), v)
    e = tl.where(bad, 255, e)
    return code, e, v


@triton.jit
def rope_pairs(a, b, c, s):
    """One complex multiply (a + ib)(c + is) in fp32, two roundings per output."""
    return a * c - b * s, a * s + b * c


# ============================================================================ Hadamard
@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, M, N: tl.constexpr, BLOCK_M: tl.constexpr, OUT_BF16: tl.constexpr):
    """y[m] = (x[m] @ H_N) * N^-1/2 with the butterfly order of the reference (fp32), rounded to y's dtype."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None]
    offs = rows[:, None].to(tl.int64) * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = hadamard_rows(x, BLOCK_M, N)
    if OUT_BF16:
        y = round_bf16(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty_like(xc)
    M = xc.numel() // n if n else 0
    if M:
        block_m = max(1, min(16 if _interp() else 64, 8192 // n))
        grid = (triton.cdiv(M, block_m),)
        _hadamard_kernel[grid](xc, y, M, N=n, BLOCK_M=block_m, OUT_BF16=x.dtype == torch.bfloat16, num_warps=4)
    return y


# ============================================================================ RoPE
@triton.jit
def _rope_kernel(x_ptr, y_ptr, pos_ptr, cos_ptr, sin_ptr, R, H, D: tl.constexpr, ROT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_NOPE: tl.constexpr, INVERSE: tl.constexpr, COPY_NOPE: tl.constexpr,
                 OUT_BF16: tl.constexpr, MAX_POS):
    """Row r = (t, h) of x [T*H, D]: pairs j of the last ROT dims -> (a*c - b*s, a*s + b*c), c/s = table[pos[t], j]
    (s negated for the inverse); the first D - ROT dims are copied (out of place) or left alone (in place)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    tok = rows // H
    pos = tl.load(pos_ptr + tok, mask=rmask, other=0).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), MAX_POS - 1)  # host checks the range; never read out of bounds
    HALF: tl.constexpr = ROT // 2
    j = tl.arange(0, HALF)
    base = rows.to(tl.int64)[:, None] * D + (D - ROT)
    a = tl.load(x_ptr + base + 2 * j[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    b = tl.load(x_ptr + base + 2 * j[None, :] + 1, mask=rmask[:, None], other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + pos[:, None] * HALF + j[None, :], mask=rmask[:, None], other=0.0)
    s = tl.load(sin_ptr + pos[:, None] * HALF + j[None, :], mask=rmask[:, None], other=0.0)
    if INVERSE:
        s = _neg(s)
    re, im = rope_pairs(a, b, c, s)
    if OUT_BF16:
        re = round_bf16(re)
        im = round_bf16(im)
    tl.store(y_ptr + base + 2 * j[None, :], re.to(y_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(y_ptr + base + 2 * j[None, :] + 1, im.to(y_ptr.dtype.element_ty), mask=rmask[:, None])
    if COPY_NOPE:
        k = tl.arange(0, BLOCK_NOPE)
        nm = rmask[:, None] & (k < D - ROT)[None, :]
        offs = rows.to(tl.int64)[:, None] * D + k[None, :]
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=nm), mask=nm)


def _rope_launch(x, y, positions, cos, sin, inverse, copy_nope):
    D = x.shape[-1]
    T = x.shape[0]
    R = x.numel() // D if D else 0
    if R == 0:
        return
    H = R // T
    rot = 2 * cos.shape[1]
    nope = D - rot
    block_r = 4 if _interp() else max(1, min(64, 4096 // max(D, 1)))
    grid = (triton.cdiv(R, block_r),)
    _rope_kernel[grid](x, y, positions, cos, sin, R, H, D=D, ROT=rot, BLOCK_R=block_r,
                       BLOCK_NOPE=triton.next_power_of_2(max(nope, 1)), INVERSE=bool(inverse),
                       COPY_NOPE=bool(copy_nope and nope > 0), OUT_BF16=x.dtype == torch.bfloat16,
                       MAX_POS=cos.shape[0], num_warps=4, enable_fp_fusion=False)


def apply_rope(x, positions, cos, sin, inverse=False):
    xc = x.contiguous()
    y = torch.empty_like(xc)
    _rope_launch(xc, y, positions.contiguous(), cos.contiguous(), sin.contiguous(), inverse, True)
    return y


def apply_rope_(x, positions, cos, sin, inverse=False):
    """In place (x must be contiguous): only the rope dims are read and written."""
    _rope_launch(x, x, positions.contiguous(), cos.contiguous(), sin.contiguous(), inverse, False)


# ============================================================================ RMSNorm
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, M, D, D_f, eps, BLOCK_D: tl.constexpr, OUT_BF16: tl.constexpr):
    """y = w * (x * (1 / sqrt(sum(x^2) / D + eps))) in fp32 (each op IEEE-rounded), then y's dtype."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    x = tl.load(x_ptr + row * D + d, mask=m, other=0.0).to(tl.float32)
    ms = tl.div_rn(tl.sum(x * x, axis=0), D_f + tl.zeros((), tl.float32))  # D_f: float(D), never specialized
    r = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))
    w = tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
    y = w * (x * r)
    if OUT_BF16:
        y = round_bf16(y)
    tl.store(y_ptr + row * D + d, y.to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(x, weight, eps=1e-6):
    D = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty_like(xc)
    M = xc.numel() // D if D else 0
    if M:
        bd = triton.next_power_of_2(D)
        _rms_norm_kernel[(M,)](xc, weight.contiguous(), y, M, D, float(D), float(eps), BLOCK_D=bd,
                               OUT_BF16=x.dtype == torch.bfloat16, num_warps=min(16, max(1, bd // 512)),
                               enable_fp_fusion=False)
    return y


@triton.jit
def _head_rms_norm_kernel(q_ptr, y_ptr, M, D, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """bf16 op order of ``q * rsqrt(mean(q^2) + eps)``: every intermediate rounded to bf16 where torch rounds."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m = (rows < M)[:, None] & (d < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sq = round_bf16(q * q)                                    # q.square() -> bf16
    mean = round_bf16(tl.div_rn(tl.sum(sq, axis=1), tl.full((BLOCK_M,), D, tl.float32)))  # fp32 sum, bf16 mean
    v = round_bf16(mean + eps)                                # + bf16(eps), rounded to bf16
    r = round_bf16(tl.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.sqrt_rn(v)))  # rsqrt -> bf16
    y = round_bf16(q * r[:, None])                            # bf16 multiply
    tl.store(y_ptr + offs, y.to(tl.bfloat16), mask=m)


def head_rms_norm(q, eps=1e-6):
    D = q.shape[-1]
    qc = q.contiguous()
    y = torch.empty_like(qc)
    M = qc.numel() // D if D else 0
    if M:
        bd = triton.next_power_of_2(D)
        bm = max(1, min(4 if _interp() else 16, 8192 // bd))
        eps_bf16 = float(torch.tensor(eps, dtype=torch.float32).bfloat16())  # torch casts the scalar to bf16
        _head_rms_norm_kernel[(triton.cdiv(M, bm),)](qc, y, M, D, eps_bf16, BLOCK_M=bm, BLOCK_D=bd, num_warps=4,
                                                     enable_fp_fusion=False)
    return y


# ============================================================================ fake quant
@triton.jit
def _fake_quant_kernel(x_ptr, y_ptr, num_groups, BLOCK: tl.constexpr, GROUPS: tl.constexpr, FP4: tl.constexpr,
                       X_BF16_BITS: tl.constexpr):
    """y = bf16(fp32(q) * s) per group of BLOCK values: FP8 e4m3 (ue8m0, amax >= 1e-4) or FP4 e2m1 (block 32)."""
    pid = tl.program_id(0)
    g = pid * GROUPS + tl.arange(0, GROUPS)
    mg = (g < num_groups)[:, None]
    offs = g[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]
    if X_BF16_BITS:  # x_ptr: int16 view of bf16 input
        x = bf16_bits_to_fp32(tl.load(x_ptr + offs, mask=mg, other=0))
    else:
        x = tl.load(x_ptr + offs, mask=mg, other=0.0).to(tl.float32)
    if FP4:
        code, e, v = e2m1_quant_rows(x)
    else:
        v = e4m3_fakequant_rows(x)
    tl.store(y_ptr + offs, bf16_bits(v), mask=mg)  # y_ptr: int16 view of the bf16 output


def _fake_quant(x, block, fp4):
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    ng = xc.numel() // block
    if ng:
        groups = max(1, min(8 if _interp() else 64, 4096 // block))
        bits = xc.dtype == torch.bfloat16
        _fake_quant_kernel[(triton.cdiv(ng, groups),)](xc.view(torch.int16) if bits else xc, y.view(torch.int16), ng,
                                                       BLOCK=block, GROUPS=groups, FP4=fp4, X_BF16_BITS=bits,
                                                       num_warps=4)
    return y


def fake_quant_fp8(x, block=64):
    return _fake_quant(x, block, False)


def fake_quant_fp4(x, block=32):
    return _fake_quant(x, block, True)


# ============================================================================ MXFP4 dequant
@triton.jit
def _dequant_mxfp4_kernel(p_ptr, s_ptr, y_ptr, N, K2, BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr,
                          OUT_BF16: tl.constexpr):
    """y[n, 2k] = E2M1(lo nibble of p[n,k]) * 2^(s[n, 2k//32] - 127), y[n, 2k+1] from the high nibble."""
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    k = pk * BLOCK_K2 + tl.arange(0, BLOCK_K2)
    m = (n < N)[:, None] & (k < K2)[None, :]
    p = tl.load(p_ptr + n.to(tl.int64)[:, None] * K2 + k[None, :], mask=m, other=0).to(tl.int32)
    e = tl.load(s_ptr + n.to(tl.int64)[:, None] * (K2 // 16) + (k // 16)[None, :], mask=m, other=127)
    s = e8m0_to_fp32(e)
    lo = e2m1_to_fp32(p & 0xF) * s
    hi = e2m1_to_fp32(p >> 4) * s
    y = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_K2))
    if OUT_BF16:
        y = bf16_bits(y)  # y_ptr: int16 view of the bf16 output
    kk = pk * 2 * BLOCK_K2 + tl.arange(0, 2 * BLOCK_K2)
    mo = (n < N)[:, None] & (kk < 2 * K2)[None, :]
    tl.store(y_ptr + n.to(tl.int64)[:, None] * (2 * K2) + kk[None, :], y.to(y_ptr.dtype.element_ty), mask=mo)


def dequant_mxfp4(packed, scale, dtype=torch.bfloat16):
    N, K2 = packed.shape
    y = torch.empty(N, 2 * K2, dtype=dtype, device=packed.device)
    if N and K2:
        bn, bk = (8, 32) if _interp() else (16, 128)
        grid = (triton.cdiv(N, bn), triton.cdiv(K2, bk))
        yv = y.view(torch.int16) if dtype == torch.bfloat16 else y
        _dequant_mxfp4_kernel[grid](packed.contiguous().view(torch.uint8), scale.contiguous().view(torch.uint8), yv,
                                    N, K2, BLOCK_N=bn, BLOCK_K2=bk, OUT_BF16=dtype == torch.bfloat16, num_warps=4)
    return y
