"""Triton kernels of the mHC family (reference: v4kernels/reference/mhc.py, spec §7).

Kernels
-------
``_mhc_stream_kernel`` (hc_pre at T >= ``_STREAM_MIN_T``; hc_head only when asked, see mhc_head): one pass over X from HBM.
    Persistent programs of two roles, with token blocks of BT = 64 and K = 4d cut into S slices:
    * producers (pids < n_a): tile (block b, slice s) -> part[b, s, t, :] = Σ_{k in s} x[t, k] fn[:, k]
      and Σ x^2 (column NMIX), fp32, from X in HBM through tensor cores; then cnt[b] += 1 (release).
      A producer keeps one slice s = pid % S (its fn slice, read through L2, stays hot).
    * consumers (the other pids; producers join when their tiles are done): take 2-token tiles from
      an atomic queue in token order, wait for cnt[b] == S (acquire), sum the S partials (fixed
      order), compute pre/post/comb, and y = bf16(Σ_i pre_i X_i), reading X a second time while
      the producers' recent reads of it should still be in L2 (consumers trail producers by about
      one producer round, ~16 MB of X, inside the 50 MB L2).
    Consumers only wait on producers and producers never wait, so the queue cannot deadlock as long
    as producers are scheduled (lower pids launch first; the grid fits on the GPU at once: 2
    programs per SM). Sinkhorn of a tile runs while the next tile's loads are in flight.
    Measured on an H100 (scripts/profile_mhc.py, do_bench, L2 flushed): 40-46% of the copy
    bandwidth at T = 8192 / 65536 (the split-K path: 20-34%). Not at the 85% target. ncu (d = 4096,
    T = 8192): issue-latency bound, not bandwidth bound: 8 warps per SM (255 registers), 0.4
    eligible warps per scheduler, IPC 1.3, DRAM 50-57%. The producers' GEMV pass alone (the split-K
    path's first kernel at one split) reaches only 37-45% of HBM, so the producers set the pace.
    Tried on the H100 without gain (within +-5%): fn pre-split into bf16 parts outside the kernel
    (no register split), Σx^2 by an MMA (x x^T diagonal) so that x feeds only MMAs, and a single
    software pipeline across producer tiles (the per-tile pipeline drain is not the cost). A
    variant whose last producer of a block also reduced it (finisher) was slower (13-17%). The
    warp-specialized CUDA kernel (csrc/mhc/mhc_pre.cu: fn slice resident in shared memory, mma.sync
    producers) is 9-22% faster at T >= 1024 and is what backend "auto" runs there for bf16 streams.
``_mhc_mix_partial_kernel`` + ``_mhc_pre_kernel`` (small T: decode, tests): split-K partials, then
    a program per (token block, d range) sums them in split order, computes the weights and y
    (second read of X; X is small here).
``_mhc_post_kernel``: program (token, d block) -> X_new[j] = post[j] * out + Σ_i C[i][j] X[i].

Numerics
--------
* The 24 x 4d GEMV runs on tensor cores without losing fp32 accuracy: for bf16 streams every fn
  tile is split in registers into three bf16 parts, fn = b0 + b1 + b2 exactly (b0: the top 8
  significand bits, b1: the next 8, b2: the remaining <= 8), so every product x * b_k is exact in
  fp32. The MMAs accumulate one K block (BK) at a time into a zeroed accumulator, added to the running
  sum with an IEEE add: chained across all of K, the tensor cores' truncating fp32 accumulation put
  post/comb 2.4e-4 off the reference at d = 7168 (H100), 100x the reference's own error vs float64.
  fp32 streams use an IEEE fp32 dot.
* Every launch passes ``enable_fp_fusion=False``: the few-term sums (y, X_new) must round after
  each multiply and each add, like the PyTorch reference, to be bitwise equal to it.
* fp32 -> bf16 goes through ``round_bf16`` (RNE) so the interpreter, which truncates on store,
  gives the GPU's bits.
* No atomics on data (the counters only order work); the block sizes and splits are a fixed
  function of (T, d, device), so a call repeated gives the same bytes. On the streaming path the
  tiling depends on d only, so a token's outputs do not depend on T or on its batch neighbours.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import round_bf16

HC = 4
_STREAM_MIN_T = 512  # below this, the split-K path (X is small; latency matters more than bytes)


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
        xr = tl.load(x_ptr + row + kk[None, :], mask=tmask[:, None] & km[None, :], other=0.0)
        x = xr.to(tl.float32)
        ssq += tl.sum(x * x, axis=1)
        # fn is [NMIX, K] row-major; the tile is its transpose [BK, NP] (padding columns are 0)
        f = tl.load(fn_ptr + cols[None, :] * K + kk[:, None], mask=(cols[None, :] < NMIX) & km[:, None], other=0.0)
        if SPLIT3:
            # x is on the bf16 grid; fn = b0 + b1 + b2 exactly (truncations: b0 = the top 8 significand
            # bits of f, b1 = the top 8 of the exact remainder, b2 = the rest, <= 8 bits), so x * b_k is
            # exact in fp32. Each subtraction is exact (it clears leading bits).
            b0 = (f.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
            r1 = f - b0
            b1 = (r1.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
            b2 = r1 - b1
            if DOT_BF16:
                # A fresh accumulator per K block, added to acc by an IEEE fp32 add: Hopper's MMA
                # aligns and truncates its fp32 sums, and chained over all of K (up to 1792 x 3 MMA
                # steps at d = 7168) that biased error reached 4e-4 in the logits (H100, T = 4096).
                blk = tl.dot(xr, b0.to(tl.bfloat16))
                blk = tl.dot(xr, b1.to(tl.bfloat16), blk)
                blk = tl.dot(xr, b2.to(tl.bfloat16), blk)
                acc += blk
            else:  # interpreter: bf16 dots are wrong there; the same exact products in fp32
                acc = tl.dot(x, b0, acc, input_precision="ieee")
                acc = tl.dot(x, b1, acc, input_precision="ieee")
                acc = tl.dot(x, b2, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, f, acc, input_precision="ieee")
    return acc, ssq


@triton.jit
def _pick(t, cols, c):
    """Column c of a [BT, NP] tile as [BT] (exact: one value plus zeros)."""
    return tl.sum(tl.where(cols[None, :] == c, t, 0.0), axis=1)


@triton.jit
def _logits(acc, ssq, K, cols, base_ptr, scale_ptr, norm_eps, NMIX: tl.constexpr, HEAD: tl.constexpr):
    """z = (acc * rsqrt(ssq / K + norm_eps)) * scale[site] + base, [BT, NP]."""
    r = 1.0 / tl.sqrt_rn(ssq / K.to(tl.float32) + norm_eps)
    mix = acc * r[:, None]
    s0 = tl.load(scale_ptr)
    if HEAD:
        sc = tl.zeros(cols.shape, dtype=tl.float32) + s0
    else:
        s1 = tl.load(scale_ptr + 1)
        s2 = tl.load(scale_ptr + 2)
        sc = tl.where(cols < 4, s0, tl.where(cols < 8, s1, s2))
    bs = tl.load(base_ptr + cols, mask=cols < NMIX, other=0.0)
    return mix * sc[None, :] + bs[None, :]


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(0.0 - z))


@triton.jit
def _store_post_comb(z, offs_t, tmask, post_ptr, comb_ptr, hc_eps, iters, NP: tl.constexpr, BT: tl.constexpr):
    """post = 2 sigmoid(z[4:8]); comb = Sinkhorn(z[8:24] as [4, 4]) (C[i][j] = z[8 + 4i + j])."""
    cols = tl.arange(0, NP)
    pm = tmask[:, None] & (cols[None, :] >= 4) & (cols[None, :] < 8)
    tl.store(post_ptr + offs_t[:, None] * 4 + (cols[None, :] - 4), 2.0 * _sigmoid(z), mask=pm)
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


@triton.jit
def _y_chunk(x_ptr, y_ptr, xrow, yrow, dd, msk, D, p0, p1, p2, p3):
    """y[t, dd] = bf16(((p0 X0 + p1 X1) + p2 X2) + p3 X3) (fp32, one rounding per operation)."""
    xp = x_ptr + xrow + dd[None, :]
    a = p0[:, None] * tl.load(xp, mask=msk, other=0.0).to(tl.float32)
    a = a + p1[:, None] * tl.load(xp + D, mask=msk, other=0.0).to(tl.float32)
    a = a + p2[:, None] * tl.load(xp + 2 * D, mask=msk, other=0.0).to(tl.float32)
    a = a + p3[:, None] * tl.load(xp + 3 * D, mask=msk, other=0.0).to(tl.float32)
    tl.store(y_ptr + yrow + dd[None, :], round_bf16(a).to(tl.bfloat16), mask=msk)


# ---------------------------------------------------------------------------------------------
# Streaming path (one HBM pass over X)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _stream_consumer(x_ptr, base_ptr, scale_ptr, part_ptr, cnt_ptr, y_ptr, post_ptr, comb_ptr, pre_ptr,
                     T, D, n_blocks, norm_eps, hc_eps, iters,
                     NMIX: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, S: tl.constexpr, S_P2: tl.constexpr,
                     BTB: tl.constexpr, BDB: tl.constexpr, HEAD: tl.constexpr, WRITE_PRE: tl.constexpr):
    """Consumer loop: BTB-token tiles from the queue cnt[n_blocks], in token order (module docstring)."""
    K = 4 * D
    cols = tl.arange(0, NP)
    sp = tl.arange(0, S_P2)
    dd0 = tl.arange(0, BDB)
    n_tiles = tl.cdiv(T, BTB)
    # the previous tile's logits and tokens: its post/comb (Sinkhorn: a long dependent chain) are
    # computed while this tile's first loads are in flight
    z_prev = tl.zeros([BTB, NP], dtype=tl.float32)
    t_prev = tl.zeros([BTB], dtype=tl.int32) - 1
    j = tl.atomic_add(cnt_ptr + n_blocks, 1, sem="relaxed", scope="gpu")
    while j < n_tiles:
        offs_t = j * BTB + tl.arange(0, BTB)
        tmask = offs_t < T
        xrow = offs_t.to(tl.int64)[:, None] * K
        yrow = offs_t.to(tl.int64)[:, None] * D
        # first chunk of X: issued before the wait (X is an input, always valid); L2 hits, last use
        m0 = tmask[:, None] & (dd0 < D)[None, :]
        xp = x_ptr + xrow + dd0[None, :]
        x0 = tl.load(xp, mask=m0, other=0.0, cache_modifier=".cg")
        x1 = tl.load(xp + D, mask=m0, other=0.0, cache_modifier=".cg")
        x2 = tl.load(xp + 2 * D, mask=m0, other=0.0, cache_modifier=".cg")
        x3 = tl.load(xp + 3 * D, mask=m0, other=0.0, cache_modifier=".cg")
        # wait for the S partials of token block b (acquire: the producers' stores are visible after it)
        b = (j * BTB) // BT
        c = tl.atomic_add(cnt_ptr + b, 0, sem="acquire", scope="gpu")
        while c < S:
            c = tl.atomic_add(cnt_ptr + b, 0, sem="acquire", scope="gpu")
        prow = (b * S + sp).to(tl.int64)[:, None] * BT + (offs_t - b * BT)[None, :]
        pm = (sp < S)[:, None, None] & tmask[None, :, None] & (cols <= NMIX)[None, None, :]
        part = tl.load(part_ptr + prow[:, :, None] * NP + cols[None, None, :], mask=pm, other=0.0,
                       cache_modifier=".cg")
        if not HEAD:
            _store_post_comb(z_prev, t_prev, t_prev >= 0, post_ptr, comb_ptr, hc_eps, iters, NP, BTB)
        acc = tl.sum(part, axis=0)  # fixed reduction order over the S slices
        z = _logits(acc, _pick(acc, cols, NMIX), K, cols, base_ptr, scale_ptr, norm_eps, NMIX, HEAD)
        pre_t = _sigmoid(z) + hc_eps
        if WRITE_PRE:
            tl.store(pre_ptr + offs_t[:, None] * 4 + cols[None, :], pre_t, mask=tmask[:, None] & (cols[None, :] < 4))
        p0 = _pick(pre_t, cols, 0)
        p1 = _pick(pre_t, cols, 1)
        p2 = _pick(pre_t, cols, 2)
        p3 = _pick(pre_t, cols, 3)
        a = p0[:, None] * x0.to(tl.float32)
        a = a + p1[:, None] * x1.to(tl.float32)
        a = a + p2[:, None] * x2.to(tl.float32)
        a = a + p3[:, None] * x3.to(tl.float32)
        tl.store(y_ptr + yrow + dd0[None, :], round_bf16(a).to(tl.bfloat16), mask=m0)
        for d0 in range(BDB, D, BDB):
            dd = d0 + dd0
            _y_chunk(x_ptr, y_ptr, xrow, yrow, dd, tmask[:, None] & (dd < D)[None, :], D, p0, p1, p2, p3)
        z_prev = z
        t_prev = tl.where(tmask, offs_t, -1)
        j = tl.atomic_add(cnt_ptr + n_blocks, 1, sem="relaxed", scope="gpu")
    if not HEAD:
        _store_post_comb(z_prev, t_prev, t_prev >= 0, post_ptr, comb_ptr, hc_eps, iters, NP, BTB)


@triton.jit
def _mhc_stream_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, part_ptr, cnt_ptr,
                       y_ptr, post_ptr, comb_ptr, pre_ptr,
                       T, D, n_blocks, n_a, norm_eps, hc_eps, iters,
                       NMIX: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr,
                       S: tl.constexpr, S_P2: tl.constexpr, BTB: tl.constexpr, BDB: tl.constexpr,
                       JOIN: tl.constexpr, HEAD: tl.constexpr, WRITE_PRE: tl.constexpr,
                       SPLIT3: tl.constexpr, DOT_BF16: tl.constexpr):
    """hc_pre / hc_head in one HBM pass over X (module docstring).

    cnt_ptr: int32 [n_blocks + 1] zeros: per block the number of slices stored, then the queue."""
    pid = tl.program_id(0)
    K = 4 * D
    if pid < n_a:
        # producer: tiles i = pid, pid + n_a, ...: block b = i // S, slice s = i % S (s fixed when S | n_a)
        cols = tl.arange(0, NP)
        for i in range(pid, n_blocks * S, n_a):
            b = i // S
            k_lo = (i - b * S) * KS
            offs_t = b * BT + tl.arange(0, BT)
            acc, ssq = _mix_accumulate(x_ptr, fn_ptr, offs_t, offs_t < T, K, k_lo, tl.minimum(k_lo + KS, K),
                                       NMIX, NP, BT, BK, SPLIT3, DOT_BF16)
            acc = tl.where(cols[None, :] == NMIX, ssq[:, None], acc)  # column NMIX (a zero pad of fn) carries Σx^2
            rows = (i * BT + tl.arange(0, BT)).to(tl.int64)
            tl.store(part_ptr + rows[:, None] * NP + cols[None, :], acc, mask=cols[None, :] <= NMIX)
            tl.debug_barrier()  # every thread's partial stores happen before the release below
            tl.atomic_add(cnt_ptr + b, 1, sem="release", scope="gpu")
        if JOIN:  # then help the consumers (the tail of the queue runs on every SM)
            _stream_consumer(x_ptr, base_ptr, scale_ptr, part_ptr, cnt_ptr, y_ptr, post_ptr, comb_ptr, pre_ptr,
                             T, D, n_blocks, norm_eps, hc_eps, iters, NMIX, NP, BT, S, S_P2, BTB, BDB, HEAD,
                             WRITE_PRE)
    else:
        _stream_consumer(x_ptr, base_ptr, scale_ptr, part_ptr, cnt_ptr, y_ptr, post_ptr, comb_ptr, pre_ptr,
                         T, D, n_blocks, norm_eps, hc_eps, iters, NMIX, NP, BT, S, S_P2, BTB, BDB, HEAD, WRITE_PRE)


# ---------------------------------------------------------------------------------------------
# Split-K path (small T)
# ---------------------------------------------------------------------------------------------
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
    # z = mix * scale[site] + base; pre = sigmoid(z[0:4]) + hc_eps; post = 2 sigmoid(z[4:8])
    z = _logits(acc, ssq, K, cols, base_ptr, scale_ptr, norm_eps, NMIX, HEAD)
    pre_t = _sigmoid(z) + hc_eps
    p0 = _pick(pre_t, cols, 0)
    p1 = _pick(pre_t, cols, 1)
    p2 = _pick(pre_t, cols, 2)
    p3 = _pick(pre_t, cols, 3)

    if pid_d == 0:
        if WRITE_PRE:
            tl.store(pre_ptr + offs_t[:, None] * 4 + cols[None, :], pre_t, mask=tmask[:, None] & (cols[None, :] < 4))
        if not HEAD:
            _store_post_comb(z, offs_t, tmask, post_ptr, comb_ptr, hc_eps, iters, NP, BT)

    # y over this program's d range, last chunk first (its most recently read part is still in L2)
    d_lo = pid_d * D_PER_PROG
    d_hi = tl.minimum(d_lo + D_PER_PROG, D)
    n_chunks = tl.cdiv(d_hi - d_lo, BD)
    xrow = offs_t.to(tl.int64)[:, None] * K
    yrow = offs_t.to(tl.int64)[:, None] * D
    for ci in range(0, n_chunks):
        dd = d_lo + (n_chunks - 1 - ci) * BD + tl.arange(0, BD)
        _y_chunk(x_ptr, y_ptr, xrow, yrow, dd, tmask[:, None] & (dd < d_hi)[None, :], D, p0, p1, p2, p3)


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


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _stream_config(T: int, D: int, device: torch.device, ks=None):
    """(BT, BK, KS, S, BTB, BDB, n_a, n_b): a function of (d, device) except the program counts.

    Producer tiles are BT = 64 tokens x KS = 1024 of K (128 KB of X): wgmma-sized (M = 64), fn
    (1.5 / 2.6 MB, split in registers) reused over 64 tokens, few partials (S = 16 / 28 per token,
    100 B each: 4% of X's bytes). n_a = the largest multiple of S that fits the SMs (each producer
    keeps one fn slice); one consumer per SM besides (the kernel fits 2 programs per SM: 254
    registers x 128 threads, 72 KB of shared memory). Consumer tiles of BTB = 4 tokens (y in chunks
    of BDB = 1024): per-tile costs (queue, wait, Sinkhorn on a few lanes) spread over 4 tokens; on
    the H100 (scripts/profile_mhc.py, T >= 8192) 40-46% of the copy bandwidth against 37-40% with
    2-token tiles. KS = 512 was slower, KS = 2048 +2-3% at large T but slower at T = 1024."""
    K = HC * D
    sms = _num_sms(device)
    if _interpret():
        BT, BK, BTB, BDB = 16, 32, 2, 32
        KS = ks or 64
    else:
        BT, BK, BTB, BDB = 64, 128, 4, 1024
        KS = ks or 1024
    S = triton.cdiv(K, KS)
    n_blocks = triton.cdiv(T, BT)
    n_a = (sms // S) * S if S <= sms else sms
    n_a = max(1, min(n_a, n_blocks * S))
    n_b = sms
    return BT, BK, KS, S, BTB, BDB, n_a, n_b


def _pre_config(T: int, D: int, device: torch.device, split=None, d_split=None):
    """(BT, BK, BD, n_split, K_PER_SPLIT, n_d, D_PER_PROG, num_warps): a fixed function of (T, D, device).

    Fewer 16-token blocks than SMs (decode): split K over programs (stage 1) and d over the
    finishing programs, so ~2 programs per SM run. Otherwise one fused program per 16/32/64
    tokens, the largest block that still gives every SM a program."""
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


def _launch_stream(x, fn, base, scale, norm_eps, hc_eps, iters, head, y, post, comb, pre, return_pre, ks=None):
    T, _, D = x.shape
    dev = x.device
    nmix = fn.shape[0]
    NP = 16 if head else 32
    BT, BK, KS, S, BTB, BDB, n_a, n_b = _stream_config(T, D, dev, ks)
    n_blocks = triton.cdiv(T, BT)
    # partials [block, slice, token, NP] fp32 (columns 0..NMIX written); counters: one per block + the queue
    part = torch.empty((n_blocks * S * BT, NP), dtype=torch.float32, device=dev)
    cnt = torch.zeros((n_blocks + 1,), dtype=torch.int32, device=dev)
    split3 = x.dtype == torch.bfloat16
    interp = _interpret()
    _mhc_stream_kernel[(n_a + n_b,)](
        x, fn, base, scale, part, cnt, y, post, comb, pre,
        T, D, n_blocks, n_a, float(norm_eps), float(hc_eps), int(iters),
        NMIX=nmix, NP=NP, BT=BT, BK=BK, KS=KS, S=S, S_P2=triton.next_power_of_2(S), BTB=BTB, BDB=BDB,
        # the interpreter runs programs one after another: producers must not wait (no JOIN there)
        JOIN=not interp, HEAD=head, WRITE_PRE=return_pre, SPLIT3=split3, DOT_BF16=split3 and not interp,
        num_warps=4, enable_fp_fusion=False)


def _launch_pre(x, fn, base, scale, norm_eps, hc_eps, iters, head, split=None, d_split=None, return_pre=False,
                stream=None, ks=None):
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
    if T == 0:
        return y, post, comb, pre
    if stream is None:
        stream = split is None and d_split is None and T >= _STREAM_MIN_T
    if stream:
        _launch_stream(x, fn, base, scale, norm_eps, hc_eps, iters, head, y, post, comb, pre, return_pre, ks)
        return y, post, comb, pre
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
            stream=None, ks=None, return_pre=False):
    """Triton hc_pre: (y bf16 [T, d], post fp32 [T, 4], comb fp32 [T, 4, 4]) (+ pre [T, 4] for tests).

    ``stream`` forces (True) or avoids (False) the one-pass streaming kernel, ``ks`` its K slice;
    ``split`` / ``d_split`` force the number of K splits / d ranges of the split-K path (tests).
    Default: streaming for T >= 512, else split-K by T."""
    y, post, comb, pre = _launch_pre(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters, False, split, d_split,
                                     return_pre, stream, ks)
    return (y, post, comb, pre) if return_pre else (y, post, comb)


def mhc_head(x, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6, *, split=None, d_split=None, stream=None, ks=None,
             return_pre=False):
    """Triton hc_head: y bf16 [T, d] (+ pre [T, 4] for tests).

    Default: the split-K path at every T. The streaming kernel's head epilogue is tested under the
    interpreter and compiled for sm_90 but has not yet run on a GPU; ``stream=True`` selects it."""
    if stream is None:
        stream = False
    y, _, _, pre = _launch_pre(x, fn, base, scale, norm_eps, hc_eps, 1, True, split, d_split, return_pre, stream,
                               ks)
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
