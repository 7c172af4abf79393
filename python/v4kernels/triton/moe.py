"""Triton kernels of the MoE family (reference: v4kernels/reference/moe.py, spec §8, §2.3).

* ``_router_logits_kernel`` + ``_router_select_kernel``: gate GEMV/GEMM in fp32 (split-K partials
  for small batches, summed in a fixed order), then sqrtsoftplus, biased top-k (ties to the lower
  expert index) or hash lookup, normalisation and route scale.
* ``_grouped_mxfp4_kernel`` (W4A16): ragged per-expert grouped GEMM on MXFP4 weights with an
  optional fused W1/W3 + clamped SwiGLU + routing-weight epilogue. No ``tl.dot_scaled`` (it crashes
  under the interpreter and Hopper has no FP4 MMA): the packed bytes and scales are loaded
  contiguously along K (16-byte loads), each nibble becomes a float by placing its 3 magnitude bits
  at the exponent/mantissa boundary and the two nibbles of a byte are interleaved with ``tl.join``
  into the natural K order; bf16 dot on the exactly dequantized tile.
* ``_w4a8_fold_kernel`` (W4A8, prefill): FP8 tensor-core GEMM with the per-32 weight scales folded
  into the e4m3 weights (a byte-permute LUT in inline PTX) and one fp32 promotion per 128-K block
  (see the block comment above it). W4A8 decode (<= 16 rows per expert) runs the W4A16 kernel on
  the exactly dequantized FP8 activations: the same products, summed in fp32.
* ``_combine_kernel``: per token, the sum of its grouped rows in increasing row (= expert) order
  in fp32, plus the shared expert, then bf16. No atomics: deterministic.

Under ``TRITON_INTERPRET=1`` every dot runs in fp32 on exactly decoded values (the same math).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import exp2_int, round_bf16

ACT_BLOCK = 128


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _e8m0_to_f32(sb):
    """e8m0 byte -> fp32 2^(sb-127), exact: 0 -> 2^-127 (subnormal), 255 -> NaN."""
    s = sb.to(tl.uint32)
    bits = tl.where(s == 0, 0x00400000, s << 23)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _softplus(x):
    """torch softplus (beta 1, threshold 20): x for x > 20, else max(x,0) + log1p(exp(-|x|))."""
    z = tl.exp(-tl.abs(x))
    lp = tl.where(z < 1e-4, z * (1.0 - 0.5 * z), tl.log(1.0 + z))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


# ---------------------------------------------------------------------------------------------
# router
# ---------------------------------------------------------------------------------------------
@triton.jit
def _router_logits_kernel(
    x_ptr, w_ptr, part_ptr, T, E, K, KS,
    BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BF16_DOT: tl.constexpr,
):
    """part[s, t, e] = sum_{k in split s} x[t, k] * W[e, k]  (fp32 accumulation)."""
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_t * BT + tl.arange(0, BT)
    cols = pid_e * BE + tl.arange(0, BE)
    rmask = rows < T
    cmask = cols < E
    kk = tl.arange(0, BK)
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    k_lo = pid_s * KS
    for k0 in range(k_lo, tl.minimum(k_lo + KS, K), BK):
        kmask = (k0 + kk) < K
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + (k0 + kk)[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None].to(tl.int64) * K + (k0 + kk)[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if BF16_DOT:  # bf16 x bf16 products are exact in fp32: the same sum as an fp32 GEMM
            acc += tl.dot(a, tl.trans(b))
        else:
            acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    offs = pid_s.to(tl.int64) * T * E + rows[:, None].to(tl.int64) * E + cols[None, :]
    tl.store(part_ptr + offs, acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _router_select_kernel(
    part_ptr, bias_ptr, tid_ptr, tok_ptr, ids_ptr, w_ptr, T, E, V, SPLIT, TE, route_scale,
    TOPK: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HASH: tl.constexpr,
):
    """s = sqrt(softplus(sum_s part[s])); ids = top-k(s + bias) (ties: lower id) or tid2eid[tok];
    w = s[ids] / sum(s[ids]) * route_scale."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    cols = tl.arange(0, EP)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    base = rows[:, None].to(tl.int64) * E + cols[None, :]
    logits = tl.zeros((BT, EP), dtype=tl.float32)
    for s in range(0, SPLIT):  # fixed order: deterministic
        logits += tl.load(part_ptr + base + s * TE, mask=m2, other=0.0)
    score = tl.sqrt(_softplus(logits))
    kcols = tl.arange(0, KP)
    ids = tl.full((BT, KP), -1, tl.int32)
    wts = tl.zeros((BT, KP), dtype=tl.float32)
    if HASH:
        tok = tl.load(tok_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        tok_ok = (tok >= 0) & (tok < V)
        hid = tl.load(tid_ptr + tok[:, None] * TOPK + kcols[None, :],
                      mask=(rmask & tok_ok)[:, None] & (kcols < TOPK)[None, :], other=-1).to(tl.int32)
        hid = tl.where((hid >= 0) & (hid < E), hid, -1)
        for j in tl.static_range(TOPK):
            idj = tl.sum(tl.where(kcols[None, :] == j, hid, 0), axis=1)  # -1 (invalid) matches no column
            wj = tl.sum(tl.where(cols[None, :] == idj[:, None], score, 0.0), axis=1)
            ids = tl.where(kcols[None, :] == j, idj[:, None], ids)
            wts = tl.where(kcols[None, :] == j, wj[:, None], wts)
    else:
        biased = score
        if HAS_BIAS:
            biased = biased + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
        biased = tl.where(cmask[None, :], biased, float("-inf"))
        for j in tl.static_range(TOPK):
            mx = tl.max(biased, axis=1)
            idj = tl.min(tl.where(biased == mx[:, None], cols[None, :], EP), axis=1)
            idj = tl.where(idj < E, idj, -1)  # NaN rows: no match, id -1 (never out of bounds)
            hit = cols[None, :] == idj[:, None]
            wj = tl.sum(tl.where(hit, score, 0.0), axis=1)
            biased = tl.where(hit, float("-inf"), biased)
            ids = tl.where(kcols[None, :] == j, idj[:, None], ids)
            wts = tl.where(kcols[None, :] == j, wj[:, None], wts)
    wts = wts / tl.sum(wts, axis=1)[:, None]
    wts = wts * route_scale
    omask = rmask[:, None] & (kcols < TOPK)[None, :]
    ooffs = rows[:, None].to(tl.int64) * TOPK + kcols[None, :]
    tl.store(ids_ptr + ooffs, ids, mask=omask)
    tl.store(w_ptr + ooffs, wts, mask=omask)


def moe_route(x, gate_weight, gate_bias=None, tid2eid=None, token_ids=None, topk=6, route_scale=1.0, split=None,
              out=None):
    T, K = x.shape
    E = gate_weight.shape[0]
    dev = x.device
    if out is None:  # tests pass poisoned buffers through ``out``
        out = (torch.empty(T, topk, dtype=torch.int32, device=dev), torch.empty(T, topk, dtype=torch.float32, device=dev))
    ids, wts = out
    if T == 0:
        return ids, wts
    interp = _interp()
    xc, wc = x.contiguous(), gate_weight.contiguous()
    bf16_dot = (not interp) and xc.dtype == torch.bfloat16 and wc.dtype == torch.bfloat16
    if not bf16_dot and not interp:
        xc, wc = xc.float(), wc.float()
    BT, BE = 16, (32 if interp else 64)
    BK = 64 if interp else 128
    n_prog = triton.cdiv(T, BT) * triton.cdiv(E, BE)
    if split is None:  # small batches: split K so the GEMV fills the GPU; partials summed in order
        split = 1 if interp else max(1, min(16, 264 // n_prog, triton.cdiv(K, 4 * BK)))
    KS = triton.cdiv(triton.cdiv(K, split), BK) * BK
    split = triton.cdiv(K, KS)
    part = torch.empty(split, T, E, dtype=torch.float32, device=dev)
    _router_logits_kernel[(triton.cdiv(T, BT), triton.cdiv(E, BE), split)](
        xc, wc, part, T, E, K, KS, BT=BT, BE=BE, BK=BK, BF16_DOT=bf16_dot, num_warps=4
    )
    EP = triton.next_power_of_2(E)
    KP = triton.next_power_of_2(topk)
    BT2 = 4 if EP >= 512 else 8
    hashed = tid2eid is not None
    dummy_i = ids
    _router_select_kernel[(triton.cdiv(T, BT2),)](
        part,
        gate_bias.float().contiguous() if gate_bias is not None else part,
        tid2eid.contiguous() if hashed else dummy_i,
        token_ids.contiguous() if hashed else dummy_i,
        ids, wts, T, E, tid2eid.shape[0] if hashed else 0, split, T * E, float(route_scale),
        TOPK=topk, KP=KP, BT=BT2, EP=EP, HAS_BIAS=gate_bias is not None and not hashed, HASH=hashed, num_warps=4,
    )
    return ids, wts


# ---------------------------------------------------------------------------------------------
# grouped GEMM
# ---------------------------------------------------------------------------------------------
@triton.jit
def _e2m1_f32_bits(c, HI: tl.constexpr):
    """fp32 bits of E2M1 * 2^-126 for the low (HI=False) or high nibble of each byte of c (uint32).

    The nibble's 3 magnitude bits land on the top of the fp32 exponent/mantissa boundary (bits
    22-24), so exponent field 0 (codes 0, 1 = 0 and 0.5) is an fp32 subnormal and fields 1-3 are
    normals: multiplying by 2^126 gives the exact E2M1 value (3 integer ops, no select; the GPU's
    mul.f32 keeps subnormals)."""
    if HI:
        return ((c & 0x70) << 18) | ((c & 0x80) << 24)
    return ((c & 0x7) << 22) | ((c & 0x8) << 28)


@triton.jit
def _w16_tile(w_ptr, s_ptr, wrow, srow, nmask, k0, BN: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    """Dequantized weight tile [BN, BK] (natural K order) = E2M1 * 2^(e8m0-127), exact in bf16.

    Loads: the packed bytes [BN, BK/2] and the scales [BN, BK/32], both contiguous along K (16-byte
    vector loads); the two nibbles of a byte are decoded side by side and interleaved with join."""
    HB: tl.constexpr = BK // 2
    G: tl.constexpr = BK // 32
    jb = tl.arange(0, HB)
    p = tl.load(w_ptr + wrow[:, None] + (k0 // 2 + jb)[None, :], mask=nmask[:, None], other=0).to(tl.uint32)
    jg = tl.arange(0, G)
    sb = tl.load(s_ptr + srow[:, None] + (k0 // 32 + jg)[None, :], mask=nmask[:, None], other=127)
    sc = _e8m0_to_f32(sb)
    lo = _e2m1_f32_bits(p, False).to(tl.float32, bitcast=True)
    hi = _e2m1_f32_bits(p, True).to(tl.float32, bitcast=True)
    v = tl.reshape(tl.join(lo, hi), (BN, G, 32))  # k = 2j (low nibble), 2j + 1 (high nibble)
    v = (v * 8.507059173023462e37) * sc[:, :, None]  # * 2^126 -> E2M1 (exact), then * scale (exact)
    v = tl.reshape(v, (BN, BK))
    if not DOT_F32:  # one return: the compiler rejects differently typed returns even under a constexpr if
        v = v.to(tl.bfloat16)
    return v


@triton.jit
def _swiglu_bf16(g, u, limit, rw_ptr, rows, amask, HAS_RW: tl.constexpr):
    """The SwiGLU epilogue of both GEMM kernels (spec: bf16 gate/up, clamp, silu(g) * u, optional
    routing weight per row), rounded to the bf16 grid."""
    g = tl.minimum(round_bf16(g), limit)
    u = tl.minimum(tl.maximum(round_bf16(u), -limit), limit)
    h = g / (1.0 + tl.exp(-g)) * u
    if HAS_RW:
        h = h * tl.load(rw_ptr + rows, mask=amask, other=0.0)[:, None]
    return round_bf16(h)


@triton.jit
def _grouped_mxfp4_kernel(
    a_ptr, rid_ptr, rw_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, off_ptr, out_ptr,
    M, N, K, Ma, E, num_n, limit,
    HAS_RID: tl.constexpr, HAS_RW: tl.constexpr, SWIGLU: tl.constexpr,
    DOT_F32: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """W4A16. Grouped rows r of expert e (expert_offsets[e] <= r < expert_offsets[e+1]):
        acc = A[row_ids[r]] @ W1_e^T     (bf16 x dequantized bf16, fp32 accumulation)
        out = bf16(acc)                                                     (plain)
        out = bf16(silu(min(bf16(acc1), L)) * clamp(bf16(acc3), -L, L) * w_r)   (SWIGLU)
    Rows outside the expert groups, and rows whose row id is -1 or out of range, get 0.

    Schedule: segments [0, off[0]), [off[e], off[e+1]) for each expert, [off[E], M) are cut into
    BM-row tiles; program (tile, n-block) finds its segment by a prefix sum over the offsets (EP
    int32 loads, cached), so an expert with no rows costs nothing and no host synchronisation is
    needed. Each program loops over K only."""
    pid = tl.program_id(0)
    pid_n = pid % num_n
    pid_t = pid // num_n
    rows, rmask, is_expert, e64 = _segment_rows(off_ptr, pid_t, M, E, EP, BM)
    if HAS_RID:
        src = tl.load(rid_ptr + rows, mask=rmask, other=-1)
    else:
        src = rows
    amask = rmask & (src >= 0) & (src < Ma) & is_expert
    arow = tl.where(amask, src, 0).to(tl.int64) * K

    cols = pid_n * BN + tl.arange(0, BN)
    nmask = cols < N
    KH = K // 2
    KS = K // 32
    wrow = e64 * N * KH + cols.to(tl.int64) * KH
    srow = e64 * N * KS + cols.to(tl.int64) * KS

    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    n_k = tl.where(is_expert, K // BK, 0)
    jk = tl.arange(0, BK)
    for kk in range(0, n_k):
        k0 = kk * BK
        a = tl.load(a_ptr + arow[:, None] + (k0 + jk)[None, :], mask=amask[:, None], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
        wt = _w16_tile(w1_ptr, s1_ptr, wrow, srow, nmask, k0, BN, BK, DOT_F32)
        acc1 += tl.dot(a, tl.trans(wt))
        if SWIGLU:
            wt3 = _w16_tile(w3_ptr, s3_ptr, wrow, srow, nmask, k0, BN, BK, DOT_F32)
            acc3 += tl.dot(a, tl.trans(wt3))

    if SWIGLU:
        res = _swiglu_bf16(acc1, acc3, limit, rw_ptr, rows, amask, HAS_RW)
    else:
        res = round_bf16(acc1)
    res = tl.where(amask[:, None], res, 0.0)
    optr = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(optr, res.to(tl.bfloat16), mask=rmask[:, None] & nmask[None, :])


# ---------------------------------------------------------------------------------------------
# W4A8 on the FP8 tensor cores: E2M1 -> e4m3 with the per-32 weight scales folded in
# ---------------------------------------------------------------------------------------------
# Why: a dot per 32-K chunk followed by an fp32 scale-and-add (the reference's loop, literally,
# as the previous kernel did) puts as much FMA work on the CUDA cores as the tensor cores do MMA
# work and serialises the two: 70-84 TFLOP/s measured on H100. Instead, each weight row n gets one
# reference exponent R[n] (the largest of its e8m0 scales) and every E2M1 value of chunk c is
# written as the e4m3 number  E2M1 * 2^(s[n,c] - R[n] + 6),  so a whole 128-K block is one FP8
# dot. kk = s - R + 12 <= 12 indexes the table: kk >= 1 (s >= R - 11) gives e4m3 normals, exact;
# kk < 1 is flushed to zero (those products are < 2^-11 of the row's largest chunk; real
# checkpoints' per-32 scales span a few binades per row). The block is promoted into the fp32
# accumulator with the activation scale (acc += blk * sx[m, kb]: one FFMA per element per 128 K;
# the 1x128 activation scale fixes the promotion interval, as in DeepGEMM) and the row factor
# 2^(R[n]-133) is applied once at the end.
#
# The conversion is a byte-permute LUT (inline PTX, 4 packed bytes = 8 codes per instance): the
# 3 magnitude bits of 4 codes are directly the selector nibbles of one PRMT over an 8-byte table
# built per chunk from kk; the sign bits are OR-ed in. 13 integer instructions per 8 weights.
# tests/moe/test_moe_fp4_lut.py runs the PTX text through an emulator for every byte and kk.
#
# Measured on H100 (32 experts, 256-2048 rows each): 320-410 TFLOP/s, vs 70-84 before and
# 180-220 for the W4A16 kernel. What bounds it (SASS: ~335 instructions per 128-K step and
# warp, conversion ~100, promotion 64, QGMMA 64x128x32 x4): one instruction stream per warp
# alternates conversion -> shared store -> fence/barrier -> MMA -> wait -> promotion, so the
# tensor cores idle during the CUDA-core phases. Closing the gap to >1000 TFLOP/s needs warp
# specialisation (producer/converter warps feeding two ping-ponging MMA warpgroups, weights as
# the register A operand of wgmma), which Triton 3.6 does not express on Hopper.
@triton.jit
def _fold_tables(kk):
    """LUT words of e4m3(E2M1 magnitude c * 2^(kk-6)): lo = bytes for c = 0..3, hi = c = 4..7.

    kk <= 12. kk in [1, 12]: the kk = 1 table plus 8 (kk-1) (one exponent step per binade) on
    every nonzero entry, all e4m3 normals; kk < 1: zeros (flushed)."""
    km = kk - 1
    lo = tl.where(km >= 0, 0x14100800 + km * 0x08080800, 0)
    hi = tl.where(km >= 0, 0x24201C18 + km * 0x08080808, 0)
    return lo, hi


@triton.jit
def _e2m1x8_to_e4m3_lut(p, lo, hi):
    """4 packed E2M1 bytes (8 codes, K order) -> two words of 4 e4m3 bytes (codes 0-3, codes 4-7).

    The 16 bits of 4 codes, masked to their magnitude bits, are directly the 4 selector nibbles of
    a byte permute over the 8-byte table (lo, hi): one PRMT gives 4 magnitudes in K order. The
    sign bits (bits 3, 7, 11, 15 of the half) move to bits 7, 15, 23, 31 through a byte-doubling
    permute and a 4-bit shift. 13 integer instructions per 8 weights. One table per instance: the
    4 bytes of an instance must be consecutive K bytes of one row inside one 16-byte chunk, which
    the blocked layout of the tile gives (>= 4 consecutive bytes per thread along K)."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 m, q, t;
        and.b32 m, $2, 0x7777;
        prmt.b32 $0, $3, $7, m;
        prmt.b32 q, $2, $2, 0x1100;
        and.b32 t, q, 0x80008000;
        or.b32 $0, $0, t;
        shl.b32 t, q, 4;
        and.b32 t, t, 0x00800080;
        or.b32 $0, $0, t;
        shr.u32 m, $2, 16;
        and.b32 m, m, 0x7777;
        prmt.b32 $1, $3, $7, m;
        prmt.b32 q, $2, $2, 0x3322;
        and.b32 t, q, 0x80008000;
        or.b32 $1, $1, t;
        shl.b32 t, q, 4;
        and.b32 t, t, 0x00800080;
        or.b32 $1, $1, t;
        }
        """,
        constraints="=r,=r,r,r,r,r,r,r,r,r,r",
        args=[p, lo, hi],
        dtype=(tl.uint8, tl.uint8),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _fold_words(p, kk, BW: tl.constexpr, DOT_F32: tl.constexpr):
    """Converted weights of one 128-K block as two [BW, 64] halves (see _fold_assemble): e4m3 bytes
    of E2M1 * 2^(kk-6) on the GPU, the same values in fp32 under the interpreter (no inline PTX).

    p: uint8 [BW, 64] packed codes; kk: int32 [BW, 4] per-chunk exponents (see _fold_tables)."""
    if DOT_F32:
        c = tl.reshape(p, (BW, 4, 16)).to(tl.uint32)
        k3 = tl.reshape(kk, (BW, 4, 1))
        f = exp2_int(tl.minimum(tl.maximum(k3, 1), 12) + 121)  # 2^(kk-6); kk < 1 flushed below
        lo = (_e2m1_f32_bits(c, False).to(tl.float32, bitcast=True) * 8.507059173023462e37) * f
        hi = (_e2m1_f32_bits(c, True).to(tl.float32, bitcast=True) * 8.507059173023462e37) * f
        w0 = tl.reshape(tl.where(k3 >= 1, lo, 0.0), (BW, 64))  # K = 2j
        w1 = tl.reshape(tl.where(k3 >= 1, hi, 0.0), (BW, 64))  # K = 2j + 1
    else:
        tlo, thi = _fold_tables(kk)
        tlo = tl.reshape(tl.broadcast_to(tl.reshape(tlo, (BW, 4, 1)), (BW, 4, 16)), (BW, 64))
        thi = tl.reshape(tl.broadcast_to(tl.reshape(thi, (BW, 4, 1)), (BW, 4, 16)), (BW, 64))
        w0, w1 = _e2m1x8_to_e4m3_lut(p, tlo, thi)  # instance q: w0 = K 8q..8q+3, w1 = K 8q+4..8q+7
    return w0, w1


@triton.jit
def _fold_assemble(w0, w1, BW: tl.constexpr, DOT_F32: tl.constexpr):
    """[BW, 128] in natural K order from the two halves of _fold_words (register relabelling)."""
    if DOT_F32:
        w = tl.reshape(tl.join(w0, w1), (BW, 128))
    else:
        w = tl.join(tl.reshape(w0, (BW, 16, 4)), tl.reshape(w1, (BW, 16, 4)))  # [BW, 16, 4, 2]
        w = tl.reshape(tl.permute(w, (0, 1, 3, 2)), (BW, 128)).to(tl.float8e4nv, bitcast=True)
    return w


@triton.jit
def _segment_rows(off_ptr, pid_t, M, E, EP: tl.constexpr, BM: tl.constexpr):
    """Rows of row-tile pid_t: segments [0, off[0]), [off[e], off[e+1]) per expert, [off[E], M) are
    cut into BM-row tiles (prefix sum over the clamped offsets; no host sync). Returns
    (rows [BM], rmask [BM], is_expert, e64)."""
    j = tl.arange(0, EP)
    seg_lo = tl.load(off_ptr + (j - 1), mask=(j >= 1) & (j <= E + 1), other=0)
    seg_hi = tl.load(off_ptr + j, mask=j <= E, other=0)
    seg_hi = tl.where(j == E + 1, M, seg_hi)
    seg_lo = tl.minimum(tl.maximum(seg_lo, 0), M)
    seg_hi = tl.minimum(tl.maximum(seg_hi, 0), M)
    cnt = tl.where(j < E + 2, tl.maximum(seg_hi - seg_lo, 0), 0)
    tiles = (cnt + BM - 1) // BM
    cum = tl.cumsum(tiles, 0)
    seg = tl.sum((cum <= pid_t).to(tl.int32), axis=0)
    first = tl.sum(tl.where(j == seg, cum - tiles, 0), axis=0)
    lo = tl.sum(tl.where(j == seg, seg_lo, 0), axis=0)
    hi = tl.sum(tl.where(j == seg, seg_hi, 0), axis=0)
    is_expert = (seg >= 1) & (seg <= E)
    e64 = tl.maximum(seg - 1, 0).to(tl.int64)
    rows = lo + (pid_t - first) * BM + tl.arange(0, BM)
    rmask = (rows < hi) & (seg < E + 2)
    return rows, rmask, is_expert, e64


@triton.jit
def _w4a8_fold_kernel(
    a_ptr, as_ptr, rid_ptr, rw_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, off_ptr, out_ptr,
    M, N, K, Ma, E, num_n, limit,
    HAS_RID: tl.constexpr, HAS_RW: tl.constexpr, SWIGLU: tl.constexpr, DOT_F32: tl.constexpr,
    EP: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
):
    """W4A8 grouped GEMM on FP8 MMAs (see the block comment above); rows and zero-filling as
    ``_grouped_mxfp4_kernel``. Program = (tile of BT grouped rows, BW weight rows):
        acc[r, n] = sum_kb sx[r, kb] * dot128(xq[r, kb], W8[n, kb])          (W8: folded e4m3)
        out[r, n] = bf16(acc * 2^(R[n] - 133))                                (plain)
    SWIGLU: weight rows [0, BW/2) are W1 columns and [BW/2, BW) the same W3 columns, so one dot
    per block serves both and the epilogue pairs them (SwiGLU, clamp, routing weight).

    Layout: acc[BT, BW] = X @ W8^T; the activation tile is the shared A operand (cp.async
    pipelined) and the converted weights are stored to shared memory as the K-major B operand
    FP8 MMAs need. (Measured on H100 and dropped: weights as the register A operand with the
    output transposed, 2x slower here: the per-token scales then spread over 32 columns per
    thread; converting block kb+1 during the MMA of block kb: the loop-carried tile costs more
    layout shuffles than the overlap gains.)"""
    pid = tl.program_id(0)
    pid_n = pid % num_n
    pid_t = pid // num_n
    rows, rmask, is_expert, e64 = _segment_rows(off_ptr, pid_t, M, E, EP, BT)
    if HAS_RID:
        src = tl.load(rid_ptr + rows, mask=rmask, other=-1)
    else:
        src = rows
    amask = rmask & (src >= 0) & (src < Ma) & is_expert
    src0 = tl.where(amask, src, 0).to(tl.int64)
    arow = src0 * K

    BH: tl.constexpr = BW // 2 if SWIGLU else BW
    r = tl.arange(0, BW)
    cols = pid_n * BH + (r % BH)
    nmask = cols < N
    KH = K // 2
    KS = K // 32
    wrow = e64 * N * KH + cols.to(tl.int64) * KH
    srow = e64 * N * KS + cols.to(tl.int64) * KS
    if SWIGLU:
        use3 = r >= BH
        wp = tl.where(use3, w3_ptr + wrow, w1_ptr + wrow)
        sp = tl.where(use3, s3_ptr + srow, s1_ptr + srow)
    else:
        wp = w1_ptr + wrow
        sp = s1_ptr + srow

    # R[n]: the largest e8m0 scale of each weight row (one pass over the scale rows: 1/16 of the
    # weight bytes, and L2-resident for the other row tiles of the expert)
    ref = tl.zeros((BW,), dtype=tl.int32)
    jr = tl.arange(0, 64)
    n_sc = tl.where(is_expert, KS, 0)
    for c0 in range(0, n_sc, 64):
        sc = tl.load(sp[:, None] + (c0 + jr)[None, :], mask=nmask[:, None] & ((c0 + jr) < KS)[None, :], other=0)
        ref = tl.maximum(ref, tl.max(sc.to(tl.int32), axis=1))

    jk = tl.arange(0, 128)
    jb = tl.arange(0, 64)
    jg = tl.arange(0, 4)
    KB = K // 128
    n_kb = tl.where(is_expert, KB, 0)
    acc = tl.zeros((BT, BW), dtype=tl.float32)
    for kb in range(0, n_kb):
        x = tl.load(a_ptr + arow[:, None] + (kb * 128 + jk)[None, :], mask=amask[:, None], other=0.0)
        sx = _e8m0_to_f32(tl.load(as_ptr + src0 * KB + kb, mask=amask, other=127))
        p = tl.load(wp[:, None] + (kb * 64 + jb)[None, :], mask=nmask[:, None], other=0)
        s = tl.load(sp[:, None] + (kb * 4 + jg)[None, :], mask=nmask[:, None], other=0)
        w0, w1 = _fold_words(p, s.to(tl.int32) - ref[:, None] + 12, BW, DOT_F32)
        w8 = _fold_assemble(w0, w1, BW, DOT_F32)
        # promotion: the block's sum (FP8 MMA, fp32 accumulation inside the block) times sx
        acc += tl.dot(x, tl.trans(w8)) * sx[:, None]

    # row factor 2^(R - 127) * 2^-6 (the e4m3 values were E2M1 * 2^(s - R + 6)); R = 255: NaN
    v = acc * (_e8m0_to_f32(ref) * 0.015625)[None, :]
    if SWIGLU:
        g, u = tl.split(tl.permute(tl.reshape(v, (BT, 2, BH)), (0, 2, 1)))
        res = _swiglu_bf16(g, u, limit, rw_ptr, rows, amask, HAS_RW)
    else:
        res = round_bf16(v)
    ocols = pid_n * BH + tl.arange(0, BH)
    res = tl.where(amask[:, None], res, 0.0)
    optr = out_ptr + rows[:, None].to(tl.int64) * N + ocols[None, :]
    tl.store(optr, res.to(tl.bfloat16), mask=rmask[:, None] & (ocols < N)[None, :])


DECODE_ROWS = 16  # rows per expert up to which a launch is weight-bandwidth bound (decode tiles)
A8_PATH = None  # tests: force "fold" (FP8 MMA kernel) or "bf16" (dequantized activations, W4A16 kernel)


def _config(M, E, N, K, swiglu):
    """(BM, BN, BK, num_warps, num_stages) of the W4A16 kernel for M grouped rows over E experts.

    Decode (<= 16 rows per expert): BM=16 row tiles and narrow BN=64 so ~N/64 programs per active
    expert stream the weights (one pass per expert). Prefill: 128-row tiles, BN=128 (64 per weight
    with the fused W1/W3 pair: same MMA work per loaded A tile, half the accumulator registers),
    8 warps, 3 stages. (ptxas -v on the sm_90 compile: no spills at these tiles; BK=128 or BN=128
    with SwiGLU spill.)"""
    if _interp():
        return 16, min(256, max(16, triton.next_power_of_2(N))), 128, 4, 1  # big tiles: the interpreter pays per op
    rows_per_expert = M / max(1, min(E, M))
    if rows_per_expert <= DECODE_ROWS:
        return 16, 64, 128, 4, 4
    if rows_per_expert <= 64:
        return 64, (64 if swiglu else 128), 64, 4, 3
    return 128, (64 if swiglu else 128), 64, 8, 3


def _fold_config(M, E, N, K, swiglu):
    """(BT, BW, num_warps, num_stages) of the W4A8 FP8-MMA kernel: BT grouped rows x BW weight rows.

    Measured on H100 (32 experts, V4-Flash/Pro shapes, 256 and 2048 rows per expert; 6 tilings):
    128x128 with 8 warps is best for the plain GEMM, 128x64 (one warpgroup) by a few % for the
    fused W1/W3 pair; 64-row tiles cost ~10% at large groups but waste less on groups of ~64."""
    if _interp():
        return 16, 32, 4, 1
    rows_per_expert = M / max(1, min(E, M))
    if rows_per_expert <= 96:
        return 64, 128, 4, 3
    if swiglu:
        return 128, 64, 4, 3
    return 128, 128, 8, 3


def _a8_path(M, E):
    if A8_PATH is not None:
        return A8_PATH
    return "bf16" if M / max(1, min(E, M)) <= DECODE_ROWS else "fold"


def _prep_act(a, a_scale, mode):
    """Kernel operands for the activation: (values, scales or None)."""
    if mode == "w4a16":
        return a.contiguous(), None
    if a.dtype != torch.float8_e4m3fn:
        from .quant import act_quant_fp8

        a, a_scale = act_quant_fp8(a.contiguous(), ACT_BLOCK)
    sv = a_scale.contiguous().view(torch.uint8)
    if _interp():  # the interpreter's fp8 loads are wrong: hand it the exact fp32 values
        return a.float().contiguous(), sv
    return a.contiguous(), sv


def _dequant_act(av, sv):
    """bf16(xq * 2^(sx-127)) per 1x128 block: exact (3 mantissa bits times a power of two), so the
    W4A16 kernel on it forms the same products as the W4A8 reference and sums them in fp32."""
    Ma, K = av.shape
    from ..reference.quant import e8m0_to_float

    sc = e8m0_to_float(sv).view(Ma, K // ACT_BLOCK, 1)
    return (av.float().view(Ma, K // ACT_BLOCK, ACT_BLOCK) * sc).view(Ma, K).to(torch.bfloat16)


def _launch(a, a_scale, w1, s1, w3, s3, expert_offsets, row_ids, row_weights, mode, limit, swiglu, out=None):
    E, N, KH = w1.shape
    K = 2 * KH
    Ma = a.shape[0]
    M = Ma if row_ids is None else row_ids.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    if M == 0 or N == 0:
        return out
    av, sv = _prep_act(a, a_scale, mode)
    EP = triton.next_power_of_2(E + 2)
    w1u = w1.contiguous().view(torch.uint8)
    s1u = s1.contiguous().view(torch.uint8)
    w3u = w3.contiguous().view(torch.uint8) if swiglu else w1u
    s3u = s3.contiguous().view(torch.uint8) if swiglu else s1u
    off = expert_offsets.to(torch.int32).contiguous()
    rid = row_ids.to(torch.int32).contiguous() if row_ids is not None else off
    rw = row_weights.float().contiguous() if row_weights is not None else out
    if mode == "w4a8":
        if _a8_path(M, E) == "fold":
            BT, BW, warps, stages = _fold_config(M, E, N, K, swiglu)
            num_n = triton.cdiv(N, BW // 2 if swiglu else BW)
            tiles = min(M, triton.cdiv(M, BT) + min(E + 2, M))
            _w4a8_fold_kernel[(tiles * num_n,)](
                av, sv, rid, rw, w1u, s1u, w3u, s3u, off, out,
                M, N, K, Ma, E, num_n, float(limit),
                HAS_RID=row_ids is not None, HAS_RW=row_weights is not None, SWIGLU=swiglu, DOT_F32=_interp(),
                EP=EP, BT=BT, BW=BW, num_warps=warps, num_stages=stages,
            )
            return out
        av = _dequant_act(av, sv)
        if _interp():
            av = av.float()
    BM, BN, BK, warps, stages = _config(M, E, N, K, swiglu)
    num_n = triton.cdiv(N, BN)
    tiles = min(M, triton.cdiv(M, BM) + min(E + 2, M))
    _grouped_mxfp4_kernel[(tiles * num_n,)](
        av, rid, rw, w1u, s1u, w3u, s3u, off, out,
        M, N, K, Ma, E, num_n, float(limit),
        HAS_RID=row_ids is not None, HAS_RW=row_weights is not None, SWIGLU=swiglu,
        DOT_F32=_interp(), EP=EP, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages,
    )
    return out


def moe_grouped_gemm_mxfp4(a, a_scale, w, w_scale, expert_offsets, row_ids=None, mode="w4a8", out=None):
    return _launch(a, a_scale, w, w_scale, None, None, expert_offsets, row_ids, None, mode, 0.0, False, out)


def moe_grouped_swiglu_mxfp4(
    a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids=None, row_weights=None, mode="w4a8", swiglu_limit=10.0,
    out=None,
):
    return _launch(a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids, row_weights, mode, swiglu_limit, True,
                   out)


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------
@triton.jit
def _combine_kernel(
    y_ptr, pr_ptr, rw_ptr, sh_ptr, out_ptr, M, N, TOPK,
    KP: tl.constexpr, BN: tl.constexpr, HAS_RW: tl.constexpr, HAS_SH: tl.constexpr, OUT_F32: tl.constexpr,
):
    """out[t] = (sum over the token's rows r, in increasing r, of fp32(y[r]) * w[r]) + fp32(shared[t])."""
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    kk = tl.arange(0, KP)
    r = tl.load(pr_ptr + t * TOPK + kk, mask=kk < TOPK, other=-1)
    r = tl.where((r >= 0) & (r < M), r, M)
    cols = pid_n * BN + tl.arange(0, BN)
    nmask = cols < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    for _ in tl.static_range(KP):
        m = tl.min(r, axis=0)
        ok = m < M
        v = tl.load(y_ptr + m.to(tl.int64) * N + cols, mask=nmask & ok, other=0.0).to(tl.float32)
        if HAS_RW:
            v = v * tl.load(rw_ptr + m, mask=ok, other=0.0)
        acc += v
        r = tl.where(r == m, M, r)
    if HAS_SH:
        acc += tl.load(sh_ptr + t * N + cols, mask=nmask, other=0.0).to(tl.float32)
    if OUT_F32:
        tl.store(out_ptr + t * N + cols, acc, mask=nmask)
    else:
        tl.store(out_ptr + t * N + cols, round_bf16(acc).to(tl.bfloat16), mask=nmask)


def moe_combine(y, pair_rows, row_weights=None, shared=None, fp32_out=False, out=None):
    T, k = pair_rows.shape
    M, N = y.shape
    if out is None:
        out = torch.empty(T, N, dtype=torch.float32 if fp32_out else torch.bfloat16, device=y.device)
    if T == 0 or N == 0:
        return out
    BN = min(1024, triton.next_power_of_2(N)) if not _interp() else min(256, triton.next_power_of_2(N))
    yc = y.contiguous()
    _combine_kernel[(T, triton.cdiv(N, BN))](
        yc, pair_rows.to(torch.int32).contiguous(),
        row_weights.float().contiguous() if row_weights is not None else yc,
        shared.contiguous() if shared is not None else yc, out, M, N, k,
        KP=triton.next_power_of_2(k), BN=BN, HAS_RW=row_weights is not None, HAS_SH=shared is not None,
        OUT_F32=fp32_out, num_warps=4,
    )
    return out
