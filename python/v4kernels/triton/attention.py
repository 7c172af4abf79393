"""Triton kernels of V4 attention over the paged FP8 (KV584) caches (reference: reference/attention.py).

Three kernels:

* ``_attn_mqa_kernel`` (default for H <= 128): grid (query token t, KV split, output-dim group g). One
  program owns ALL heads of its token (the MMA M dim; V4 attention is MQA: every head shares the KV
  rows), so each KV tile is read and dequantized once per (token, split) instead of once per head
  block. S = sum over 8 chunks of 64 dims of q_c . k_c^T (e4m3 nope chunk c * its e8m0 row scale,
  native fp8 conversion on the GPU; bf16 rope chunk), same online softmax as below; the fp32 output
  is split over 8 // NCH groups of NCH 64-dim chunks (acc [H, 64] each) so it stays in registers;
  each group recomputes S (its K tile comes from L2). Epilogue per chunk (inverse RoPE on chunk 7).
* ``_attn_fwd_kernel`` (legacy, H > 128 or ``V4K_ATTN_IMPL=legacy``): grid (query token t, head block, KV split). Each program loads its query
  heads ``q [BH, 512]`` once, walks its share of the token's key list (window keys, then compressed
  keys) in tiles of BN keys, dequantizes each tile in registers straight from the cache bytes
  (e4m3 nope * 2^(e8m0-127), bf16 rope), and runs an online softmax in base 2:
  ``s = q . k^T * 512^-0.5 * log2(e)``; ``m' = max(m, max s)``; ``p = 2^(s - m')`` (fp32, summed into
  ``l``); ``acc = acc * 2^(m - m') + bf16(p) . k``. All heads of a token share one KV tile (MQA).
  With one split (``DIRECT``) it finishes in place: ``o = acc / (l + 2^(sink*log2e - m))``,
  ``lse = (m + log2 l) * ln2``, optional inverse RoPE of dims 448.. at the token's position, bf16
  store. With several splits it writes ``acc / l`` and ``m + log2 l`` per split.
* ``_attn_combine_kernel``: grid (t, head block): ``M = max_s lse_s``, ``w_s = 2^(lse_s - M)``,
  ``o = sum_s w_s o_s / (sum_s w_s + 2^(sink*log2e - M))``, ``lse = (M + log2 sum_s w_s) * ln2``, then the
  same epilogue. A query with no valid key gets ``o = 0`` and ``lse = +inf``.

Every cache, block-table and index load is masked, so no index value (-1, the row count, INT_MIN,
INT_MAX, out-of-range pages) is ever dereferenced.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import round_bf16

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
WINDOW = 128
KIND_ID = {"swa": 0, "csa": 1, "hca": 2}
RATIO = {"swa": 1, "csa": 4, "hca": 128}
MIN_SPLIT_KEYS = 256  # below this many keys per split the fp32 partials cost more than they save
MQA_MIN_SPLIT_KEYS = 64  # all-heads kernel: one BN=64 tile per split at least


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _kv_tile(cache, cache16, data_off, scale_off, valid, NATIVE_FP8: tl.constexpr):
    """Dequantize BN rows of a KV584 cache -> fp32 [BN, 512] (invalid rows -> 0, never read)."""
    d = tl.arange(0, 512)
    is_nope = d < 448
    m_n = valid[:, None] & is_nope[None, :]
    m_r = valid[:, None] & (~is_nope)[None, :]
    b = tl.load(cache + data_off[:, None] + d[None, :], mask=m_n, other=0)
    sc = tl.load(cache + scale_off[:, None] + (d // 64)[None, :], mask=m_n, other=0)
    rd = tl.where(is_nope, 0, d - 448)
    rope = tl.load(cache16 + (data_off[:, None] + 448) // 2 + rd[None, :], mask=m_r, other=0.0)
    if NATIVE_FP8:
        v = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        # e4m3 byte -> fp16 bits (exponent bias 7 vs 15: value * 2^-8, subnormals included), then *256.
        bu = b.to(tl.uint16)
        h = ((bu & 0x7F) << 7) | ((bu & 0x80) << 8)
        v = h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        v = tl.where((bu & 0x7F) == 0x7F, float("nan"), v)
    scale = (sc.to(tl.uint32) << 23).to(tl.float32, bitcast=True)  # 2^(e-127), e8m0
    scale = tl.where(sc == 255, float("nan"), scale)
    return tl.where(is_nope[None, :], v * scale, rope.to(tl.float32))


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k, valid, qk_scale, DOT_BF16: tl.constexpr):
    if DOT_BF16:
        kd = k.to(tl.bfloat16)
    else:
        kd = k
    s = tl.dot(q, tl.trans(kd)) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_BF16:
        pd = p.to(tl.bfloat16)
    else:
        pd = round_bf16(p)  # the spec kernel's bf16 cast of P, exact under the interpreter
    acc = acc * alpha[:, None] + tl.dot(pd, kd)
    return acc, m_new, l_i


@triton.jit
def _epilogue_store(o, pos, heads, hmask, out_ptr, stride_oh, cos_ptr, sin_ptr, max_pos,
                    HAS_ROPE: tl.constexpr, BH: tl.constexpr):
    """Round to bf16, optionally rotate dims 448.. by conj(freqs_cis[pos]) in fp32, store bf16."""
    d = tl.arange(0, 512)
    o = round_bf16(o)
    if HAS_ROPE:
        a, b = tl.split(tl.reshape(o, [BH, 256, 2]))
        jj = tl.arange(0, 256)
        is_r = (jj >= 224) & (pos >= 0) & (pos < max_pos)
        j = tl.where(jj >= 224, jj - 224, 0)
        pos_c = tl.where((pos >= 0) & (pos < max_pos), pos, 0).to(tl.int64)
        c = tl.load(cos_ptr + pos_c * 32 + j, mask=is_r, other=1.0)
        s = tl.load(sin_ptr + pos_c * 32 + j, mask=is_r, other=0.0)
        a2 = a * c[None, :] + b * s[None, :]
        b2 = b * c[None, :] - a * s[None, :]
        o = round_bf16(tl.reshape(tl.join(a2, b2), [BH, 512]))
    tl.store(out_ptr + heads[:, None].to(tl.int64) * stride_oh + d[None, :], o.to(tl.bfloat16),
             mask=hmask[:, None])


@triton.jit
def _attn_fwd_kernel(
    q_ptr, stride_qt, stride_qh,
    tok_seq_ptr, tok_pos_ptr,
    w_cache, w_cache16, w_bt, w_bt_stride, w_bt_cols, w_pages, w_page_bytes, W_PS, ring,
    c_cache, c_cache16, c_bt, c_bt_stride, c_bt_cols, c_pages, c_page_bytes, C_PS,
    idx_ptr, idx_stride, topk, tklen_ptr,
    sink_ptr, cos_ptr, sin_ptr, max_pos,
    out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt,
    po_ptr, pl_ptr,
    H, num_splits, qk_scale,
    KIND: tl.constexpr, RATIO: tl.constexpr, HAS_TKLEN: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_ROPE: tl.constexpr, DIRECT: tl.constexpr, NATIVE_FP8: tl.constexpr, DOT_BF16: tl.constexpr,
    BH: tl.constexpr, BN: tl.constexpr,
):
    t = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tok_seq_ptr + t).to(tl.int64)
    pos = tl.load(tok_pos_ptr + t)
    heads = pid_h * BH + tl.arange(0, BH)
    hmask = heads < H
    d = tl.arange(0, 512)
    q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + heads[:, None].to(tl.int64) * stride_qh + d[None, :],
                mask=hmask[:, None], other=0.0)
    if DOT_BF16:
        q = q.to(tl.bfloat16)
    else:
        q = q.to(tl.float32)

    # this token's key list: nw window keys (oldest first), then nc compressed slots
    nw = tl.minimum(tl.maximum(pos + 1, 0), 128)
    nvis = tl.maximum(pos + 1, 0) // RATIO  # visible compressed entries (causality)
    if KIND == 0:
        nc = nw * 0
    elif KIND == 1:
        nc = nw * 0 + topk
        if HAS_TKLEN:
            nc = tl.minimum(tl.maximum(tl.load(tklen_ptr + t), 0), topk)
    else:
        nc = tl.minimum(nvis, c_bt_cols * C_PS)
    n = nw + nc
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BN) * BN
    start = split * chunk
    end = tl.minimum(start + chunk, n)

    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, 512], tl.float32)

    # --- window keys: slot of position p - nw + 1 + k (ring: modulo the ring size)
    w_end = tl.minimum(end, nw)
    for kb in range(start, w_end, BN):
        offs = kb + tl.arange(0, BN)
        valid = offs < w_end
        wpos = pos - nw + 1 + offs
        slot = tl.where(ring > 0, wpos % tl.maximum(ring, 1), wpos)
        slot = tl.where(valid, slot, 0)
        col = slot // W_PS
        valid = valid & (col < w_bt_cols)
        page = tl.load(w_bt + seq * w_bt_stride + col, mask=valid, other=-1).to(tl.int64)
        valid = valid & (page >= 0) & (page < w_pages)
        page = tl.where(valid, page, 0)
        off = (slot % W_PS).to(tl.int64)
        data_off = page * w_page_bytes + off * 576
        scale_off = page * w_page_bytes + W_PS * 576 + off * 8
        k = _kv_tile(w_cache, w_cache16, data_off, scale_off, valid, NATIVE_FP8)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, valid, qk_scale, DOT_BF16)

    # --- compressed keys
    if KIND != 0:
        for kb in range(tl.maximum(start, nw), end, BN):
            j = kb - nw + tl.arange(0, BN)
            valid = j < end - nw
            if KIND == 1:
                ent = tl.load(idx_ptr + t.to(tl.int64) * idx_stride + j, mask=valid, other=-1)
            else:
                ent = j
            valid = valid & (ent >= 0) & (ent < nvis)
            ent = tl.where(valid, ent, 0)
            col = ent // C_PS
            valid = valid & (col < c_bt_cols)
            page = tl.load(c_bt + seq * c_bt_stride + col, mask=valid, other=-1).to(tl.int64)
            valid = valid & (page >= 0) & (page < c_pages)
            page = tl.where(valid, page, 0)
            off = (ent % C_PS).to(tl.int64)
            data_off = page * c_page_bytes + off * 576
            scale_off = page * c_page_bytes + C_PS * 576 + off * 8
            k = _kv_tile(c_cache, c_cache16, data_off, scale_off, valid, NATIVE_FP8)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, valid, qk_scale, DOT_BF16)

    has = l_i > 0
    m_safe = tl.where(has, m_i, 0.0)
    lse2 = m_safe + tl.log2(tl.where(has, l_i, 1.0))
    if DIRECT:
        denom = l_i
        if HAS_SINK:
            sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
            denom = denom + tl.exp2(sink * 1.4426950408889634 - m_safe)
        o = tl.where(has[:, None], acc / tl.where(has, denom, 1.0)[:, None], 0.0)
        lse = tl.where(has, lse2 * 0.6931471805599453, float("inf"))
        tl.store(lse_ptr + t.to(tl.int64) * stride_lt + heads, lse, mask=hmask)
        _epilogue_store(o, pos, heads, hmask, out_ptr + t.to(tl.int64) * stride_ot, stride_oh,
                        cos_ptr, sin_ptr, max_pos, HAS_ROPE, BH)
    else:
        o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        row = (t.to(tl.int64) * num_splits + split) * H + heads
        tl.store(po_ptr + row[:, None] * 512 + d[None, :], o, mask=hmask[:, None])
        tl.store(pl_ptr + row, tl.where(has, lse2, float("-inf")), mask=hmask)


@triton.jit
def _attn_combine_kernel(
    po_ptr, pl_ptr, tok_pos_ptr, sink_ptr, cos_ptr, sin_ptr, max_pos,
    out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, H, num_splits,
    HAS_SINK: tl.constexpr, HAS_ROPE: tl.constexpr, SP: tl.constexpr, BH: tl.constexpr,
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = heads < H
    pos = tl.load(tok_pos_ptr + t)
    d = tl.arange(0, 512)
    sp = tl.arange(0, SP)
    base = t.to(tl.int64) * num_splits
    lse_s = tl.load(pl_ptr + (base + sp[:, None]) * H + heads[None, :],
                    mask=(sp < num_splits)[:, None] & hmask[None, :], other=float("-inf"))
    M = tl.max(lse_s, 0)
    has = M > float("-inf")
    M = tl.where(has, M, 0.0)
    L = tl.sum(tl.exp2(lse_s - M[None, :]), 0)
    acc = tl.zeros([BH, 512], tl.float32)
    for s in range(num_splits):
        row = (base + s) * H + heads
        w = tl.exp2(tl.load(pl_ptr + row, mask=hmask, other=float("-inf")) - M)
        o_s = tl.load(po_ptr + row[:, None] * 512 + d[None, :], mask=hmask[:, None], other=0.0)
        acc += w[:, None] * o_s
    denom = L
    if HAS_SINK:
        sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
        denom = denom + tl.exp2(sink * 1.4426950408889634 - M)
    o = tl.where(has[:, None], acc / tl.where(has, denom, 1.0)[:, None], 0.0)
    lse = tl.where(has, (M + tl.log2(tl.where(has, L, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(lse_ptr + t.to(tl.int64) * stride_lt + heads, lse, mask=hmask)
    _epilogue_store(o, pos, heads, hmask, out_ptr + t.to(tl.int64) * stride_ot, stride_oh,
                    cos_ptr, sin_ptr, max_pos, HAS_ROPE, BH)


# ----------------------------------------------------------------------------- all-heads (MQA) kernel
@triton.jit
def _nope_chunk(cache, data_off, scale_off, valid, c, NATIVE_FP8: tl.constexpr, DOT_BF16: tl.constexpr):
    """Dims c*64 .. c*64+63 (c < 7) of BN rows: e4m3 bytes * 2^(e8m0 - 127) -> [BN, 64] (one scale per row)."""
    d = tl.arange(0, 64)
    b = tl.load(cache + data_off[:, None] + (c * 64 + d)[None, :], mask=valid[:, None], other=0)
    sc = tl.load(cache + scale_off + c, mask=valid, other=0)
    if NATIVE_FP8:
        v = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        bu = b.to(tl.uint16)
        h = ((bu & 0x7F) << 7) | ((bu & 0x80) << 8)
        v = h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        v = tl.where((bu & 0x7F) == 0x7F, float("nan"), v)
    scale = (sc.to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    scale = tl.where(sc == 255, float("nan"), scale)
    k = v * scale[:, None]  # exact: 4 significant bits times a power of two (fp32 range)
    if DOT_BF16:
        k = k.to(tl.bfloat16)
    return k


@triton.jit
def _rope_chunk(cache16, data_off, valid, DOT_BF16: tl.constexpr):
    """Dims 448..511 (bf16 rope) of BN rows -> [BN, 64]."""
    d = tl.arange(0, 64)
    r = tl.load(cache16 + (data_off[:, None] + 448) // 2 + d[None, :], mask=valid[:, None], other=0.0)
    if DOT_BF16:
        return r
    else:
        return r.to(tl.float32)


@triton.jit
def _any_chunk(cache, cache16, data_off, scale_off, valid, c, NATIVE_FP8: tl.constexpr, DOT_BF16: tl.constexpr):
    if c < 7:
        k = _nope_chunk(cache, data_off, scale_off, valid, c, NATIVE_FP8, DOT_BF16)
    else:
        k = _rope_chunk(cache16, data_off, valid, DOT_BF16)
    return k


@triton.jit
def _q_chunk(q_row, stride_qh, heads, hmask, c, DOT_BF16: tl.constexpr):
    d = tl.arange(0, 64)
    q = tl.load(q_row + heads[:, None].to(tl.int64) * stride_qh + (c * 64 + d)[None, :], mask=hmask[:, None],
                other=0.0)
    if DOT_BF16:
        return q
    else:
        return q.to(tl.float32)


@triton.jit
def _mqa_tile(a0, a1, a2, a3, a4, a5, a6, a7, m_i, l_i, q_row, stride_qh, heads, hmask, cache, cache16,
              data_off, scale_off, valid, c0, qk_scale,
              NATIVE_FP8: tl.constexpr, DOT_BF16: tl.constexpr, NCH: tl.constexpr, BH: tl.constexpr,
              BN: tl.constexpr):
    """One tile of BN keys for all heads: S over the 8 64-dim chunks, online softmax, acc_j += P V_j for
    this program's output chunks c0 .. c0+NCH-1 (V_j is re-read, L1/L2 hit, and re-dequantized)."""
    s = tl.zeros([BH, BN], tl.float32)
    for c in tl.static_range(7):
        k = _nope_chunk(cache, data_off, scale_off, valid, c, NATIVE_FP8, DOT_BF16)
        s += tl.dot(_q_chunk(q_row, stride_qh, heads, hmask, c, DOT_BF16), tl.trans(k))
    k = _rope_chunk(cache16, data_off, valid, DOT_BF16)
    s += tl.dot(_q_chunk(q_row, stride_qh, heads, hmask, 7, DOT_BF16), tl.trans(k))
    s = s * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_BF16:
        pd = p.to(tl.bfloat16)
    else:
        pd = round_bf16(p)  # the spec kernel's bf16 cast of P, exact under the interpreter
    a0 = a0 * alpha[:, None] + tl.dot(pd, _any_chunk(cache, cache16, data_off, scale_off, valid, c0, NATIVE_FP8,
                                                     DOT_BF16))
    if NCH > 1:
        a1 = a1 * alpha[:, None] + tl.dot(pd, _any_chunk(cache, cache16, data_off, scale_off, valid, c0 + 1,
                                                         NATIVE_FP8, DOT_BF16))
    if NCH > 2:
        a2 = a2 * alpha[:, None] + tl.dot(pd, _any_chunk(cache, cache16, data_off, scale_off, valid, c0 + 2,
                                                         NATIVE_FP8, DOT_BF16))
        a3 = a3 * alpha[:, None] + tl.dot(pd, _any_chunk(cache, cache16, data_off, scale_off, valid, c0 + 3,
                                                         NATIVE_FP8, DOT_BF16))
    if NCH > 4:
        a4 = a4 * alpha[:, None] + tl.dot(pd, _any_chunk(cache, cache16, data_off, scale_off, valid, c0 + 4,
                                                         NATIVE_FP8, DOT_BF16))
        a5 = a5 * alpha[:, None] + tl.dot(pd, _any_chunk(cache, cache16, data_off, scale_off, valid, c0 + 5,
                                                         NATIVE_FP8, DOT_BF16))
        a6 = a6 * alpha[:, None] + tl.dot(pd, _any_chunk(cache, cache16, data_off, scale_off, valid, c0 + 6,
                                                         NATIVE_FP8, DOT_BF16))
        a7 = a7 * alpha[:, None] + tl.dot(pd, _any_chunk(cache, cache16, data_off, scale_off, valid, c0 + 7,
                                                         NATIVE_FP8, DOT_BF16))
    return a0, a1, a2, a3, a4, a5, a6, a7, m_new, l_i


@triton.jit
def _mqa_store_chunk(a, c, denom, has, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos,
                     po_ptr, prow, DIRECT: tl.constexpr, HAS_ROPE: tl.constexpr, BH: tl.constexpr):
    """Output chunk c: direct (acc / denom, bf16 rounding, inverse RoPE if c == 7) or fp32 partial."""
    d = tl.arange(0, 64)
    o = tl.where(has[:, None], a / tl.where(has, denom, 1.0)[:, None], 0.0)
    if DIRECT:
        o = round_bf16(o)
        if HAS_ROPE:
            x, y = tl.split(tl.reshape(o, [BH, 32, 2]))
            j = tl.arange(0, 32)
            ok = (pos >= 0) & (pos < max_pos) & (c == 7)
            pos_c = tl.where(ok, pos, 0).to(tl.int64)
            cs = tl.load(cos_ptr + pos_c * 32 + j, mask=ok & (j < 32), other=1.0)
            sn = tl.load(sin_ptr + pos_c * 32 + j, mask=ok & (j < 32), other=0.0)
            x2 = x * cs[None, :] + y * sn[None, :]
            y2 = y * cs[None, :] - x * sn[None, :]
            o = round_bf16(tl.reshape(tl.join(x2, y2), [BH, 64]))
        tl.store(out_row + heads[:, None].to(tl.int64) * stride_oh + (c * 64 + d)[None, :], o.to(tl.bfloat16),
                 mask=hmask[:, None])
    else:
        tl.store(po_ptr + prow[:, None] * 512 + (c * 64 + d)[None, :], o, mask=hmask[:, None])


@triton.jit
def _attn_mqa_kernel(
    q_ptr, stride_qt, stride_qh,
    tok_seq_ptr, tok_pos_ptr,
    w_cache, w_cache16, w_bt, w_bt_stride, w_bt_cols, w_pages, w_page_bytes, W_PS, ring,
    c_cache, c_cache16, c_bt, c_bt_stride, c_bt_cols, c_pages, c_page_bytes, C_PS,
    idx_ptr, idx_stride, topk, tklen_ptr,
    sink_ptr, cos_ptr, sin_ptr, max_pos,
    out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt,
    po_ptr, pl_ptr,
    H, num_splits, qk_scale,
    KIND: tl.constexpr, RATIO: tl.constexpr, HAS_TKLEN: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_ROPE: tl.constexpr, DIRECT: tl.constexpr, NATIVE_FP8: tl.constexpr, DOT_BF16: tl.constexpr,
    BH: tl.constexpr, BN: tl.constexpr, NCH: tl.constexpr,
):
    """Grid (query token t, KV split, output-dim group g). Same formula as ``_attn_fwd_kernel`` but one
    program owns ALL heads of the token (the MMA M dim, MQA), so each KV tile is read and dequantized
    once per (token, split) for S = Q K^T (8 chunks of 64 dims, one e8m0 scale per row and chunk);
    output dims are split over 8 // NCH groups that each recompute S (K from L2) and keep NCH fp32
    accumulators [BH, 64] for chunks g*NCH .. g*NCH+NCH-1."""
    t = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    c0 = g * NCH
    seq = tl.load(tok_seq_ptr + t).to(tl.int64)
    pos = tl.load(tok_pos_ptr + t)
    heads = tl.arange(0, BH)
    hmask = heads < H
    q_row = q_ptr + t.to(tl.int64) * stride_qt

    nw = tl.minimum(tl.maximum(pos + 1, 0), 128)
    nvis = tl.maximum(pos + 1, 0) // RATIO
    if KIND == 0:
        nc = nw * 0
    elif KIND == 1:
        nc = nw * 0 + topk
        if HAS_TKLEN:
            nc = tl.minimum(tl.maximum(tl.load(tklen_ptr + t), 0), topk)
    else:
        nc = tl.minimum(nvis, c_bt_cols * C_PS)
    n = nw + nc
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BN) * BN
    start = split * chunk
    end = tl.minimum(start + chunk, n)

    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    a0 = tl.zeros([BH, 64], tl.float32)
    a1 = tl.zeros([BH, 64], tl.float32)
    a2 = tl.zeros([BH, 64], tl.float32)
    a3 = tl.zeros([BH, 64], tl.float32)
    a4 = tl.zeros([BH, 64], tl.float32)
    a5 = tl.zeros([BH, 64], tl.float32)
    a6 = tl.zeros([BH, 64], tl.float32)
    a7 = tl.zeros([BH, 64], tl.float32)

    w_end = tl.minimum(end, nw)
    for kb in range(start, w_end, BN):
        offs = kb + tl.arange(0, BN)
        valid = offs < w_end
        wpos = pos - nw + 1 + offs
        slot = tl.where(ring > 0, wpos % tl.maximum(ring, 1), wpos)
        slot = tl.where(valid, slot, 0)
        col = slot // W_PS
        valid = valid & (col < w_bt_cols)
        page = tl.load(w_bt + seq * w_bt_stride + col, mask=valid, other=-1).to(tl.int64)
        valid = valid & (page >= 0) & (page < w_pages)
        page = tl.where(valid, page, 0)
        off = (slot % W_PS).to(tl.int64)
        data_off = page * w_page_bytes + off * 576
        scale_off = page * w_page_bytes + W_PS * 576 + off * 8
        a0, a1, a2, a3, a4, a5, a6, a7, m_i, l_i = _mqa_tile(
            a0, a1, a2, a3, a4, a5, a6, a7, m_i, l_i, q_row, stride_qh, heads, hmask, w_cache, w_cache16,
            data_off, scale_off, valid, c0, qk_scale, NATIVE_FP8, DOT_BF16, NCH, BH, BN)

    if KIND != 0:
        for kb in range(tl.maximum(start, nw), end, BN):
            j = kb - nw + tl.arange(0, BN)
            valid = j < end - nw
            if KIND == 1:
                ent = tl.load(idx_ptr + t.to(tl.int64) * idx_stride + j, mask=valid, other=-1)
            else:
                ent = j
            valid = valid & (ent >= 0) & (ent < nvis)
            ent = tl.where(valid, ent, 0)
            col = ent // C_PS
            valid = valid & (col < c_bt_cols)
            page = tl.load(c_bt + seq * c_bt_stride + col, mask=valid, other=-1).to(tl.int64)
            valid = valid & (page >= 0) & (page < c_pages)
            page = tl.where(valid, page, 0)
            off = (ent % C_PS).to(tl.int64)
            data_off = page * c_page_bytes + off * 576
            scale_off = page * c_page_bytes + C_PS * 576 + off * 8
            a0, a1, a2, a3, a4, a5, a6, a7, m_i, l_i = _mqa_tile(
                a0, a1, a2, a3, a4, a5, a6, a7, m_i, l_i, q_row, stride_qh, heads, hmask, c_cache, c_cache16,
                data_off, scale_off, valid, c0, qk_scale, NATIVE_FP8, DOT_BF16, NCH, BH, BN)

    has = l_i > 0
    m_safe = tl.where(has, m_i, 0.0)
    lse2 = m_safe + tl.log2(tl.where(has, l_i, 1.0))
    out_row = out_ptr + t.to(tl.int64) * stride_ot
    prow = (t.to(tl.int64) * num_splits + split) * H + heads
    if DIRECT:
        denom = l_i
        if HAS_SINK:
            sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
            denom = denom + tl.exp2(sink * 1.4426950408889634 - m_safe)
        lse = tl.where(has, lse2 * 0.6931471805599453, float("inf"))
        tl.store(lse_ptr + t.to(tl.int64) * stride_lt + heads, lse, mask=hmask & (g == 0))
    else:
        denom = l_i
        tl.store(pl_ptr + prow, tl.where(has, lse2, float("-inf")), mask=hmask & (g == 0))
    _mqa_store_chunk(a0, c0, denom, has, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos,
                     po_ptr, prow, DIRECT, HAS_ROPE, BH)
    if NCH > 1:
        _mqa_store_chunk(a1, c0 + 1, denom, has, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos,
                         po_ptr, prow, DIRECT, HAS_ROPE, BH)
    if NCH > 2:
        _mqa_store_chunk(a2, c0 + 2, denom, has, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos,
                         po_ptr, prow, DIRECT, HAS_ROPE, BH)
        _mqa_store_chunk(a3, c0 + 3, denom, has, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos,
                         po_ptr, prow, DIRECT, HAS_ROPE, BH)
    if NCH > 4:
        _mqa_store_chunk(a4, c0 + 4, denom, has, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos,
                         po_ptr, prow, DIRECT, HAS_ROPE, BH)
        _mqa_store_chunk(a5, c0 + 5, denom, has, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos,
                         po_ptr, prow, DIRECT, HAS_ROPE, BH)
        _mqa_store_chunk(a6, c0 + 6, denom, has, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos,
                         po_ptr, prow, DIRECT, HAS_ROPE, BH)
        _mqa_store_chunk(a7, c0 + 7, denom, has, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos,
                         po_ptr, prow, DIRECT, HAS_ROPE, BH)


# ----------------------------------------------------------------------------- launch configuration
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def block_config(num_heads: int, device: torch.device):
    """(BH, BN, num_warps) of the legacy head-block kernel. Env overrides: V4K_ATTN_BH, V4K_ATTN_BN, V4K_ATTN_WARPS."""
    if _interpret() or device.type != "cuda":
        return 16, 16, 4
    bh = int(os.environ.get("V4K_ATTN_BH", "32" if num_heads > 16 else "16"))
    bn = int(os.environ.get("V4K_ATTN_BN", "32"))
    warps = int(os.environ.get("V4K_ATTN_WARPS", "8"))
    return bh, bn, warps


MQA_MAX_HEADS = 128


def use_mqa(num_heads: int) -> bool:
    """The all-heads kernel covers H <= 128; V4K_ATTN_IMPL=legacy selects the head-block kernel."""
    return num_heads <= MQA_MAX_HEADS and os.environ.get("V4K_ATTN_IMPL", "mqa") != "legacy"


def mqa_config(num_heads: int, device: torch.device):
    """(BH, BN, NCH, num_warps, num_stages) of the all-heads kernel: BH = all heads (>= 16 for tl.dot),
    NCH = 64-dim output chunks per program (8 // NCH programs per token share the output dims so the
    fp32 accumulator [BH, 64 * NCH] stays in registers). Env overrides: V4K_ATTN_BN, V4K_ATTN_NCH,
    V4K_ATTN_WARPS, V4K_ATTN_STAGES."""
    bh = max(16, triton.next_power_of_2(max(num_heads, 1)))
    if _interpret() or device.type != "cuda":
        # interpreter: one output group and BN=32 (fewest programs x loop trips); the tests set
        # V4K_ATTN_NCH / V4K_ATTN_BN to cover the GPU's output-group split
        nch = int(os.environ.get("V4K_ATTN_NCH", "8"))
        bn = int(os.environ.get("V4K_ATTN_BN", "32"))
        return bh, bn, nch, 4, 1
    return _gpu_mqa_config(bh)


def _gpu_mqa_config(bh: int):
    # From the sm_90 offline compile (tests/attention/test_attention_sm90_compile.py, cuobjdump -res-usage):
    # H=64: BN=16, 4 chunks (2 output groups), 8 warps, 2 stages -> 0 B stack (BN=32: 80 B; BN=64: 1.1-3.8 KB
    # of spills). H=128: BN=16, 2 chunks (4 groups), 8 warps -> 0-16 B stack (BN=32: 40 B).
    nch = 4 if bh <= 64 else 2
    bn = int(os.environ.get("V4K_ATTN_BN", "16"))
    nch = int(os.environ.get("V4K_ATTN_NCH", str(nch)))
    warps = int(os.environ.get("V4K_ATTN_WARPS", "8"))
    stages = int(os.environ.get("V4K_ATTN_STAGES", "2"))
    return bh, bn, nch, warps, stages


def _check_mqa_config(bn: int, nch: int):
    if nch not in (1, 2, 4, 8) or bn < 16 or bn & (bn - 1):
        raise ValueError(f"V4K_ATTN_NCH must be 1, 2, 4 or 8 and V4K_ATTN_BN a power of two >= 16, got {nch}, {bn}")


def max_keys(kind: str, topk: int, compressed_capacity: int) -> int:
    """Host-side upper bound of the keys one query attends (no device sync)."""
    if kind == "swa":
        return WINDOW
    if kind == "csa":
        return WINDOW + topk
    return WINDOW + compressed_capacity  # HCA: every entry the compressed block table can address


def choose_num_splits(num_tokens: int, num_heads: int, kind: str, topk: int, compressed_capacity: int,
                      device: torch.device) -> int:
    """Split-KV factor from host ints only. All-heads kernel: fill one wave of SMs with
    tokens x splits x output groups, >= MQA_MIN_SPLIT_KEYS keys per split (none at large batch).
    Legacy kernel: ~2 waves, >= MIN_SPLIT_KEYS keys per split."""
    keys = max_keys(kind, topk, compressed_capacity)
    if use_mqa(num_heads):
        nch = mqa_config(num_heads, device)[2]
        programs = max(1, num_tokens * (8 // nch))
        want = max(1, _num_sms(device) // programs)
        cap = max(1, triton.cdiv(keys, MQA_MIN_SPLIT_KEYS))
        return int(max(1, min(want, cap, 256)))
    bh = block_config(num_heads, device)[0]
    programs = max(1, num_tokens * triton.cdiv(num_heads, bh))
    want = triton.cdiv(2 * _num_sms(device), programs)
    cap = max(1, triton.cdiv(keys, MIN_SPLIT_KEYS))
    return int(max(1, min(want, cap, 256)))


def sparse_attention(
    q, tok_seq, tok_pos, window_cache, window_block_table, compressed_cache, compressed_block_table, indices,
    topk_lens, attn_sink, kind, window_page_size, compressed_page_size, window_ring, rope_cos, rope_sin,
    num_splits, out, lse,
):
    """Token-major launcher. q [T, H, 512] bf16 (last dim contiguous); tok_seq/tok_pos int32 [T];
    indices [T, topk] int32 (CSA); topk_lens int32 [T] or None; writes out [T, H, 512] bf16 (last dim
    contiguous) and lse fp32 [T, H]."""
    T, H, _ = q.shape
    if T == 0 or H == 0:
        return
    dev = q.device
    BH, BN, warps = block_config(H, dev)
    csa, hca = kind == "csa", kind == "hca"
    c_cache = compressed_cache if (csa or hca) else window_cache
    c_bt = compressed_block_table if (csa or hca) else window_block_table
    cps = compressed_page_size if (csa or hca) else window_page_size
    topk = indices.shape[1] if csa else 0
    if num_splits <= 0:
        num_splits = choose_num_splits(T, H, kind, topk, c_bt.shape[1] * cps if hca else 0, dev)
    direct = num_splits == 1
    if direct:
        po = pl = out  # unused
    else:
        po = torch.empty((T, num_splits, H, 512), dtype=torch.float32, device=dev)
        pl = torch.empty((T, num_splits, H), dtype=torch.float32, device=dev)
    idx = indices if csa else tok_seq
    tkl = topk_lens if (csa and topk_lens is not None) else tok_seq
    sink = attn_sink if attn_sink is not None else q
    has_rope = rope_cos is not None
    cos = rope_cos if has_rope else q
    sin = rope_sin if has_rope else q
    max_pos = rope_cos.shape[0] if has_rope else 0
    on_gpu = dev.type == "cuda" and not _interpret()
    args = (
        q, q.stride(0), q.stride(1),
        tok_seq, tok_pos,
        window_cache, window_cache.view(torch.bfloat16), window_block_table, window_block_table.stride(0),
        window_block_table.shape[1], window_cache.shape[0], window_cache.shape[1], window_page_size, window_ring,
        c_cache, c_cache.view(torch.bfloat16), c_bt, c_bt.stride(0), c_bt.shape[1], c_cache.shape[0],
        c_cache.shape[1], cps,
        idx, idx.stride(0) if csa else 0, topk, tkl,
        sink, cos, sin, max_pos,
        out, out.stride(0), out.stride(1), lse, lse.stride(0),
        po, pl,
        H, num_splits, (512 ** -0.5) * LOG2E,
    )
    flags = dict(KIND=KIND_ID[kind], RATIO=RATIO[kind], HAS_TKLEN=csa and topk_lens is not None,
                 HAS_SINK=attn_sink is not None, HAS_ROPE=has_rope, DIRECT=direct, NATIVE_FP8=on_gpu,
                 DOT_BF16=on_gpu)
    if use_mqa(H):
        MBH, MBN, NCH, mwarps, mstages = mqa_config(H, dev)
        _check_mqa_config(MBN, NCH)
        _attn_mqa_kernel[(T, num_splits, 8 // NCH)](*args, **flags, BH=MBH, BN=MBN, NCH=NCH, num_warps=mwarps,
                                                    num_stages=mstages)
    else:
        _attn_fwd_kernel[(T, triton.cdiv(H, BH), num_splits)](*args, **flags, BH=BH, BN=BN, num_warps=warps)
    if not direct:
        # few tokens (batch-1 decode: T * H / 16 programs would leave most SMs idle): 4 heads per program
        BHC = 16 if T * triton.cdiv(H, 16) >= _num_sms(dev) else 4
        _attn_combine_kernel[(T, triton.cdiv(H, BHC))](
            po, pl, tok_pos, sink, cos, sin, max_pos,
            out, out.stride(0), out.stride(1), lse, lse.stride(0), H, num_splits,
            HAS_SINK=attn_sink is not None, HAS_ROPE=has_rope, SP=triton.next_power_of_2(num_splits), BH=BHC,
            num_warps=4,
        )

