"""Triton kernels of the mHC family (reference: v4kernels/reference/mhc.py, spec §7).

Kernels
-------
``_mhc_mix_partial_kernel`` (small T only): program (token block, K split) ->
    part_acc[s, t, n] = Σ_{k in split s} x[t, k] * fn[n, k],  part_ssq[s, t] = Σ_{k in split s} x[t, k]^2
``_mhc_pre_kernel``: program (token block, d range) ->
    FUSED: acc, ssq over the whole K = 4d (first pass over X), else the split partials summed in
    split order s = 0, 1, ...; then mix = acc * rsqrt(ssq / K + norm_eps), the sigmoids, the
    Sinkhorn projection of the 4x4 logits in registers, and y = bf16(Σ_i pre_i X_i) over its d
    range (second pass over X, in reverse chunk order so its most recently read part is still in L2).
``_mhc_post_kernel``: program (token, d block) -> X_new[j] = post[j] * out + Σ_i C[i][j] X[i].

Numerics
--------
* The 24 x 4d GEMV runs on tensor cores without losing fp32 accuracy: for bf16 streams every fn
  tile is split in registers into three bf16 parts, fn = b0 + b1 + b2 exactly (8 + 8 + 8
  significand bits), so every product x * b_k is exact in fp32 and the MMAs accumulate in fp32
  (error: fp32 accumulation order only). fp32 streams use an IEEE fp32 dot.
* Every launch passes ``enable_fp_fusion=False``: the few-term sums (y, X_new) must round after
  each multiply and each add, like the PyTorch reference, to be bitwise equal to it.
* fp32 -> bf16 goes through ``round_bf16`` (RNE) so the interpreter, which truncates on store,
  gives the GPU's bits.
* No atomics; the block sizes and splits are a fixed function of (T, d, device), so a call
  repeated gives the same bytes.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import round_bf16

HC = 4


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: small, so small test shapes reach every path (split, fused BT 32 / 64)


@triton.jit
def _mix_accumulate(x_ptr, fn_ptr, offs_t, tmask, K, k_lo, k_hi,
                    NMIX: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    SPLIT3: tl.constexpr, DOT_BF16: tl.constexpr):
    """acc[t, n] = Σ_{k_lo <= k < k_hi} x[t, k] fn[n, k] (n < NMIX, padded to NP), ssq[t] = Σ x^2."""
    cols = tl.arange(0, NP)
    acc = tl.zeros([BT, NP], dtype=tl.float32)
    ssq = tl.zeros([BT], dtype=tl.float32)
    row = offs_t.to(tl.int64)[:, None] * K
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < k_hi
        x = tl.load(x_ptr + row + kk[None, :], mask=tmask[:, None] & km[None, :], other=0.0).to(tl.float32)
        ssq += tl.sum(x * x, axis=1)
        # fn is [NMIX, K] row-major; the tile is its transpose [BK, NP] (padding rows are 0)
        f = tl.load(fn_ptr + cols[None, :] * K + kk[:, None], mask=(cols[None, :] < NMIX) & km[:, None], other=0.0)
        if SPLIT3:
            # x is on the bf16 grid; fn = b0 + b1 + b2 exactly, so x * b_k is exact in fp32
            b0 = round_bf16(f)
            r1 = f - b0
            b1 = round_bf16(r1)
            b2 = r1 - b1
            if DOT_BF16:
                xb = x.to(tl.bfloat16)
                acc = tl.dot(xb, b0.to(tl.bfloat16), acc)
                acc = tl.dot(xb, b1.to(tl.bfloat16), acc)
                acc = tl.dot(xb, b2.to(tl.bfloat16), acc)
            else:  # interpreter: bf16 dots are wrong there; the same exact products in fp32
                acc = tl.dot(x, b0, acc, input_precision="ieee")
                acc = tl.dot(x, b1, acc, input_precision="ieee")
                acc = tl.dot(x, b2, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, f, acc, input_precision="ieee")
    return acc, ssq


@triton.jit
def _mhc_mix_partial_kernel(x_ptr, fn_ptr, pacc_ptr, pssq_ptr, T, K, K_PER_SPLIT,
                            NMIX: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                            SPLIT3: tl.constexpr, DOT_BF16: tl.constexpr):
    """Split-K first stage: part_acc[s, t, :] and part_ssq[s, t] over K range s (fixed order)."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc, ssq = _mix_accumulate(x_ptr, fn_ptr, offs_t, tmask, K, k_lo, k_hi, NMIX, NP, BT, BK, SPLIT3, DOT_BF16)
    cols = tl.arange(0, NP)
    base = pid_s.to(tl.int64) * T + offs_t
    tl.store(pacc_ptr + base[:, None] * NP + cols[None, :], acc, mask=tmask[:, None])
    tl.store(pssq_ptr + base, ssq, mask=tmask)


@triton.jit
def _pick(t, cols, c):
    """Column c of a [BT, NP] tile as [BT] (exact: one value plus zeros)."""
    return tl.sum(tl.where(cols[None, :] == c, t, 0.0), axis=1)


@triton.jit
def _mhc_pre_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, pacc_ptr, pssq_ptr,
                    y_ptr, post_ptr, comb_ptr, pre_ptr,
                    T, D, n_split, D_PER_PROG, norm_eps, hc_eps, iters,
                    NMIX: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                    FUSED: tl.constexpr, HEAD: tl.constexpr, WRITE_PRE: tl.constexpr,
                    SPLIT3: tl.constexpr, DOT_BF16: tl.constexpr):
    """hc_pre / hc_head for BT tokens and one d range (module docstring)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    K = 4 * D
    cols = tl.arange(0, NP)

    # mix = (fn @ xf) * rsqrt(mean(xf^2) + norm_eps)
    if FUSED:
        acc, ssq = _mix_accumulate(x_ptr, fn_ptr, offs_t, tmask, K, 0, K, NMIX, NP, BT, BK, SPLIT3, DOT_BF16)
    else:
        acc = tl.load(pacc_ptr + offs_t[:, None] * NP + cols[None, :], mask=tmask[:, None], other=0.0)
        ssq = tl.load(pssq_ptr + offs_t, mask=tmask, other=0.0)
        for s in range(1, n_split):
            base = s * T + offs_t
            acc += tl.load(pacc_ptr + base[:, None] * NP + cols[None, :], mask=tmask[:, None], other=0.0)
            ssq += tl.load(pssq_ptr + base, mask=tmask, other=0.0)
    r = 1.0 / tl.sqrt_rn(ssq / K.to(tl.float32) + norm_eps)
    mix = acc * r[:, None]

    # z = mix * scale[site] + base; pre = sigmoid(z[0:4]) + hc_eps; post = 2 sigmoid(z[4:8])
    s0 = tl.load(scale_ptr)
    if HEAD:
        sc = tl.zeros([NP], dtype=tl.float32) + s0
    else:
        s1 = tl.load(scale_ptr + 1)
        s2 = tl.load(scale_ptr + 2)
        sc = tl.where(cols < 4, s0, tl.where(cols < 8, s1, s2))
    bs = tl.load(base_ptr + cols, mask=cols < NMIX, other=0.0)
    z = mix * sc[None, :] + bs[None, :]
    sig = 1.0 / (1.0 + tl.exp(0.0 - z))
    pre_t = sig + hc_eps
    p0 = _pick(pre_t, cols, 0)
    p1 = _pick(pre_t, cols, 1)
    p2 = _pick(pre_t, cols, 2)
    p3 = _pick(pre_t, cols, 3)

    if pid_d == 0:
        if WRITE_PRE:
            tl.store(pre_ptr + offs_t[:, None] * 4 + cols[None, :], pre_t, mask=tmask[:, None] & (cols[None, :] < 4))
        if not HEAD:
            pm = tmask[:, None] & (cols[None, :] >= 4) & (cols[None, :] < 8)
            tl.store(post_ptr + offs_t[:, None] * 4 + (cols[None, :] - 4), 2.0 * sig, mask=pm)
            # comb logits C[i][j] = z[8 + 4i + j] as [BT, 4, 4]
            k16 = tl.arange(0, 16)
            sel = cols[None, None, :] == (8 + k16)[None, :, None]
            lg = tl.sum(tl.where(sel, z[:, None, :], 0.0), axis=2)
            c = tl.reshape(lg, (BT, 4, 4))
            # Sinkhorn: row softmax + eps, column normalisation, (iters - 1) x (row, column)
            m = tl.max(c, axis=2)
            e = tl.exp(c - m[:, :, None])
            c = e / tl.sum(e, axis=2)[:, :, None] + hc_eps
            c = c / (tl.sum(c, axis=1)[:, None, :] + hc_eps)
            for _ in range(1, iters):
                c = c / (tl.sum(c, axis=2)[:, :, None] + hc_eps)
                c = c / (tl.sum(c, axis=1)[:, None, :] + hc_eps)
            i4 = tl.arange(0, 4)
            co = offs_t[:, None, None] * 16 + i4[None, :, None] * 4 + i4[None, None, :]
            tl.store(comb_ptr + co, c, mask=tmask[:, None, None])

    # y = bf16(((p0 X0 + p1 X1) + p2 X2) + p3 X3) over this program's d range, last chunk first
    d_lo = pid_d * D_PER_PROG
    d_hi = tl.minimum(d_lo + D_PER_PROG, D)
    n_chunks = tl.cdiv(d_hi - d_lo, BD)
    xrow = offs_t.to(tl.int64)[:, None] * K
    yrow = offs_t.to(tl.int64)[:, None] * D
    for ci in range(0, n_chunks):
        dd = d_lo + (n_chunks - 1 - ci) * BD + tl.arange(0, BD)
        msk = tmask[:, None] & (dd < d_hi)[None, :]
        xp = x_ptr + xrow + dd[None, :]
        a = p0[:, None] * tl.load(xp, mask=msk, other=0.0).to(tl.float32)
        a = a + p1[:, None] * tl.load(xp + D, mask=msk, other=0.0).to(tl.float32)
        a = a + p2[:, None] * tl.load(xp + 2 * D, mask=msk, other=0.0).to(tl.float32)
        a = a + p3[:, None] * tl.load(xp + 3 * D, mask=msk, other=0.0).to(tl.float32)
        tl.store(y_ptr + yrow + dd[None, :], round_bf16(a).to(tl.bfloat16), mask=msk)


@triton.jit
def _mhc_post_kernel(o_ptr, x_ptr, post_ptr, comb_ptr, xn_ptr, D, BD: tl.constexpr, OUT_BF16: tl.constexpr):
    """X_new[t, j, :] = post[t, j] * out[t, :] + Σ_{i=0..3 in order} comb[t, i, j] * X[t, i, :]."""
    t = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = dd < D
    j4 = tl.arange(0, 4)
    o = tl.load(o_ptr + t * D + dd, mask=dm, other=0.0).to(tl.float32)
    pj = tl.load(post_ptr + t * 4 + j4)
    xp = x_ptr + t * 4 * D + dd
    cp = comb_ptr + t * 16 + j4  # column j of row i: comb[t, i, j]
    s = tl.load(cp)[:, None] * tl.load(xp, mask=dm, other=0.0).to(tl.float32)[None, :]
    s = s + tl.load(cp + 4)[:, None] * tl.load(xp + D, mask=dm, other=0.0).to(tl.float32)[None, :]
    s = s + tl.load(cp + 8)[:, None] * tl.load(xp + 2 * D, mask=dm, other=0.0).to(tl.float32)[None, :]
    s = s + tl.load(cp + 12)[:, None] * tl.load(xp + 3 * D, mask=dm, other=0.0).to(tl.float32)[None, :]
    res = pj[:, None] * o[None, :] + s
    if OUT_BF16:
        res = round_bf16(res)
    offs = t * 4 * D + j4[:, None] * D + dd[None, :]
    tl.store(xn_ptr + offs, res.to(xn_ptr.dtype.element_ty), mask=(j4[:, None] < 4) & dm[None, :])


def _pre_config(T: int, D: int, device: torch.device, split=None, d_split=None):
    """(BT, BK, BD, n_split, K_PER_SPLIT, n_d, D_PER_PROG, num_warps): a fixed function of (T, D, device).

    Fewer 16-token blocks than SMs (decode): split K over programs (stage 1) and d over the
    finishing programs, so ~2 programs per SM run. Otherwise one fused program per 16/32/64
    tokens, the largest block that still gives every SM a program (a larger block reads fn,
    1.5 MB at d = 4096, from L2 fewer times)."""
    K = HC * D
    interp = _interpret()
    BK = 64 if interp else 128
    sms = _num_sms(device)
    if split is None and d_split is None and triton.cdiv(T, 16) >= sms:
        BT = 64 if triton.cdiv(T, 64) >= sms else (32 if triton.cdiv(T, 32) >= sms else 16)
        split = d_split = 1
    else:
        BT = 16
    BD = 64 if interp else 4096 // BT  # y pass: 4 stream tiles of BT x BD in registers
    n_tb = triton.cdiv(T, BT)
    target = 2 * sms
    if split is None:
        split = max(1, min(triton.cdiv(target, n_tb), K // (2 * BK)))
    k_per = triton.cdiv(triton.cdiv(K, split), BK) * BK
    split = triton.cdiv(K, k_per)
    if d_split is None:
        d_split = max(1, min(triton.cdiv(target, n_tb), triton.cdiv(D, BD)))
    d_per = triton.cdiv(triton.cdiv(D, d_split), BD) * BD
    d_split = triton.cdiv(D, d_per)
    return BT, BK, BD, split, k_per, d_split, d_per, (8 if BT == 64 else 4)


def _launch_pre(x, fn, base, scale, norm_eps, hc_eps, iters, head, split=None, d_split=None, return_pre=False):
    T, _, D = x.shape
    dev = x.device
    x = x.contiguous()
    fn = fn.contiguous()
    nmix = fn.shape[0]
    NP = 16 if head else 32
    y = torch.empty((T, D), dtype=torch.bfloat16, device=dev)
    post = torch.empty((T, HC), dtype=torch.float32, device=dev)
    comb = torch.empty((T, HC, HC), dtype=torch.float32, device=dev)
    pre = torch.empty((T, HC), dtype=torch.float32, device=dev) if return_pre else post
    if T > 0:
        BT, BK, BD, n_split, k_per, n_d, d_per, nw = _pre_config(T, D, dev, split, d_split)
        split3 = x.dtype == torch.bfloat16
        dot_bf16 = split3 and not _interpret()
        fused = n_split == 1 and n_d == 1
        n_tb = triton.cdiv(T, BT)
        if fused:
            pacc = pssq = y  # unused
        else:
            pacc = torch.empty((n_split, T, NP), dtype=torch.float32, device=dev)
            pssq = torch.empty((n_split, T), dtype=torch.float32, device=dev)
            _mhc_mix_partial_kernel[(n_tb, n_split)](
                x, fn, pacc, pssq, T, HC * D, k_per, NMIX=nmix, NP=NP, BT=BT, BK=BK,
                SPLIT3=split3, DOT_BF16=dot_bf16, num_warps=nw, enable_fp_fusion=False)
        _mhc_pre_kernel[(n_tb, n_d)](
            x, fn, base, scale, pacc, pssq, y, post, comb, pre,
            T, D, n_split, d_per, float(norm_eps), float(hc_eps), int(iters),
            NMIX=nmix, NP=NP, BT=BT, BK=BK, BD=BD, FUSED=fused, HEAD=head, WRITE_PRE=return_pre,
            SPLIT3=split3, DOT_BF16=dot_bf16, num_warps=nw, enable_fp_fusion=False)
    return y, post, comb, pre


def mhc_pre(x, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20, *, split=None, d_split=None,
            return_pre=False):
    """Triton hc_pre: (y bf16 [T, d], post fp32 [T, 4], comb fp32 [T, 4, 4]) (+ pre [T, 4] for tests).

    ``split`` / ``d_split`` force the number of K splits / d ranges (tests); default: by T."""
    y, post, comb, pre = _launch_pre(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters, False, split, d_split,
                                     return_pre)
    return (y, post, comb, pre) if return_pre else (y, post, comb)


def mhc_head(x, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6, *, split=None, d_split=None, return_pre=False):
    """Triton hc_head: y bf16 [T, d] (+ pre [T, 4] for tests)."""
    y, _, _, pre = _launch_pre(x, fn, base, scale, norm_eps, hc_eps, 1, True, split, d_split, return_pre)
    return (y, pre) if return_pre else y


def mhc_post(out, x, post, comb):
    """Triton hc_post: X_new [T, 4, d] in x's dtype."""
    T, _, D = x.shape
    xn = torch.empty_like(x, memory_format=torch.contiguous_format)
    if T > 0:
        BD = 64 if _interpret() else 1024
        _mhc_post_kernel[(T, triton.cdiv(D, BD))](
            out.contiguous(), x.contiguous(), post.contiguous(), comb.contiguous(), xn, D,
            BD=BD, OUT_BF16=x.dtype == torch.bfloat16, num_warps=4, enable_fp_fusion=False)
    return xn
