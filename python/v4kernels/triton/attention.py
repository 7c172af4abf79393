"""Triton kernels of V4 attention over the paged FP8 (KV584) caches (reference: reference/attention.py).

Three launches per call:

* ``_attn_rows_kernel``: grid (token, key block). Translates each token's key list (window keys first, then the
  compressed entries: CSA index row, HCA all visible entries) into cache-row byte offsets (-1 = ignored key)
  and copies each row's 8 scale bytes into one int64, plus the token's key count. All index, block-table and
  ring arithmetic happens here, once per key, so that the attention loop only loads ``rows[t, k]`` /
  ``scw[t, k]`` (addresses that depend on k alone: the software pipeliner prefetches them two tiles ahead and
  the row data one tile ahead with cp.async). Both caches are addressed from the lower base address.
* ``_attn_kernel``: grid (token t, KV split, block of BH = 64 heads). V4 attention is MQA (every head shares
  the one 512-d K=V row), so a program owns the 64 heads of its block as the MMA M dimension and each KV tile
  is read and dequantized once for them. Per tile of BN = 64 keys:

  - K = V tile [BN, 512] bf16, built as [BN, 8, 64]: chunks 0..6 = e4m3 bytes * 2^(e8m0 - 127) (exact; native
    e4m3 -> f16 conversion, fp32 scale multiply, bf16 pack), chunk 7 = the bf16 rope dims; stored once to
    shared memory and used by both MMAs;
  - ``S = Q K^T`` (one dot, K = 512; Q [64, 512] bf16 is loop invariant in shared memory), base-2 online
    softmax ``p = 2^(s*scale*log2e - m)`` (fp32, summed into l), ``O = O * 2^(m_old - m) + bf16(p) K``.

  Registers: the fp32 accumulator [64, 512] is split by the compiler over the 2 warpgroups (256 output dims
  each: 128 registers per thread, FlashMLA's layout); S [64, 64] is computed by both warpgroups (Triton's
  layout for a dot chained into another: the price of M = 64 with 8 warps). 255 registers, no spills;
  ~170 KB shared memory (Q 64 KB, K tile 64 KB, the prefetched raw tile). Pro (128 heads) runs 2 head blocks
  per token; they read the same KV rows (the second from L2).
  Epilogue, one split (``DIRECT``): ``o = O / (l + 2^(sink*log2e - m))``, ``lse = (m + log2 l) * ln2``, bf16
  rounding, optional inverse RoPE of dims 448.. at the token's position, bf16 store. Several splits: fp32
  partials ``O / l`` and ``m + log2 l`` per split.
* ``_attn_combine_kernel`` (split-KV only): grid (t, head block, dim block): ``M = max_s lse_s``,
  ``w_s = 2^(lse_s - M)``, ``o = sum_s w_s o_s / (sum_s w_s + 2^(sink*log2e - M))``,
  ``lse = (M + log2 sum_s w_s) * ln2``, then the same epilogue. A query with no valid key gets ``o = 0`` and
  ``lse = +inf``.

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
HEAD_BLOCK = 64  # heads per program on the GPU: the MMA M of one warpgroup (wgmma m64)
MAX_SPLITS = 256


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- key rows
@triton.jit
def _attn_rows_kernel(
    tok_seq_ptr, tok_pos_ptr, w_delta, c_delta,
    w_bt, w_bt_stride, w_bt_cols, w_pages, w_page_bytes, W_PS, ring,
    c_bt, c_bt_stride, c_bt_cols, c_pages, c_page_bytes, C_PS,
    idx_ptr, idx_stride, topk, tklen_ptr,
    cache64, rows_ptr, scw_ptr, nkeys_ptr, NK,
    KIND: tl.constexpr, RATIO: tl.constexpr, HAS_TKLEN: tl.constexpr, TKLEN_PER_SEQ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (token t, key block). Key k of token t -> byte offset of its cache row from the lower of the two
    caches' base addresses (``rows``, int64 >= 0; -1 = ignored key; ``w_delta``/``c_delta`` = each cache's
    offset) and its 8 scale bytes as one int64 (``scw``: 7 e8m0 bytes, the pad byte cleared; -1 = ignored key),
    so that the attention loop's index loads depend on the key number only (pipelined ahead of the tile), and the
    token's key count (``nkeys``). ``topk_lens`` is per token, or per sequence (``TKLEN_PER_SEQ``: decode).
    Keys 0..nw-1 are the window (position p - nw + 1 + k; ring: modulo R), then the compressed entries (CSA:
    the index row, HCA: entry k - nw). Every block-table and index load is masked: no value is dereferenced
    unless it addresses a real page."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seq = tl.load(tok_seq_ptr + t).to(tl.int64)
    pos = tl.load(tok_pos_ptr + t)
    nw = tl.minimum(tl.maximum(pos + 1, 0), 128)
    nvis = tl.maximum(pos + 1, 0) // RATIO  # visible compressed entries (causality)
    if KIND == 0:
        nc = nw * 0
    elif KIND == 1:
        nc = nw * 0 + topk
        if HAS_TKLEN:
            if TKLEN_PER_SEQ:
                nc = tl.minimum(tl.maximum(tl.load(tklen_ptr + seq), 0), topk)
            else:
                nc = tl.minimum(tl.maximum(tl.load(tklen_ptr + t), 0), topk)
    else:
        nc = tl.minimum(nvis, c_bt_cols * C_PS)
    tl.store(nkeys_ptr + t, nw + nc, mask=tl.program_id(1) == 0)
    live = offs < nw + nc
    is_w = offs < nw
    # window key
    wpos = pos - nw + 1 + offs
    slot = tl.where(ring > 0, wpos % tl.maximum(ring, 1), wpos)
    slot = tl.where(live & is_w, slot, 0)
    wcol = slot // W_PS
    wvalid = live & is_w & (wcol < w_bt_cols)
    wpage = tl.load(w_bt + seq * w_bt_stride + wcol, mask=wvalid, other=-1).to(tl.int64)
    wvalid = wvalid & (wpage >= 0) & (wpage < w_pages)
    woff = (slot % W_PS).to(tl.int64)
    row = w_delta + tl.where(wvalid, wpage, 0) * w_page_bytes + woff * 576
    sdel = (W_PS - woff) * 576 + woff * 8
    valid = wvalid
    if KIND != 0:
        # compressed key: logical entry id
        cmask = live & (~is_w)
        if KIND == 1:
            ent = tl.load(idx_ptr + t.to(tl.int64) * idx_stride + (offs - nw), mask=cmask, other=-1)
        else:
            ent = offs - nw
        cvalid = cmask & (ent >= 0) & (ent < nvis)
        ent = tl.where(cvalid, ent, 0)
        ccol = ent // C_PS
        cvalid = cvalid & (ccol < c_bt_cols)
        cpage = tl.load(c_bt + seq * c_bt_stride + ccol, mask=cvalid, other=-1).to(tl.int64)
        cvalid = cvalid & (cpage >= 0) & (cpage < c_pages)
        coff = (ent % C_PS).to(tl.int64)
        row = tl.where(is_w, row, c_delta + tl.where(cvalid, cpage, 0) * c_page_bytes + coff * 576)
        sdel = tl.where(is_w, sdel, (C_PS - coff) * 576 + coff * 8)
        valid = wvalid | cvalid
    m = offs < NK
    srow = tl.where(valid, row + sdel, 0)
    scw = tl.load(cache64 + srow // 8, mask=valid, other=0)
    scw = (scw & 0xFFFFFFFF) | (((scw >> 32) & 0xFFFFFF) << 32)  # clear the pad byte (valid words are >= 0)
    tl.store(rows_ptr + t.to(tl.int64) * NK + offs, tl.where(valid, row, -1), mask=m)
    tl.store(scw_ptr + t.to(tl.int64) * NK + offs, tl.where(valid, scw, -1), mask=m)


# ----------------------------------------------------------------------------- main kernel
@triton.jit
def _kv_tile(cache, cache16, rows_ptr, scw_ptr, offs, live, NATIVE_FP8: tl.constexpr, DOT_BF16: tl.constexpr,
             BN: tl.constexpr):
    """K = V tile of BN keys -> ([BN, 512] bf16 on the GPU / fp32 in the interpreter, valid [BN]).
    Dims c*64 .. c*64+63 (c < 7) = e4m3 byte * 2^(e8m0_c - 127) (exact), dims 448.. = the bf16 rope; the tile is
    built as [BN, 8, 64] so that each 64-dim chunk's scale broadcasts along its chunk. Ignored keys read nothing
    and give 0 (their scores are masked to -inf)."""
    # rows are 16-byte aligned (pages are multiples of 576 bytes, the caches 16-byte aligned: checked by the
    # launcher): 16-byte loads of the row data
    row = tl.load(rows_ptr + offs, mask=live, other=-1)
    scw = tl.load(scw_ptr + offs, mask=live, other=-1)
    valid = scw >= 0  # the rows kernel cleared the pad byte of valid keys' scale words
    rvalid = row >= 0
    row = tl.multiple_of(tl.where(rvalid, row, 0), 16)
    c = tl.arange(0, 8)
    d = tl.arange(0, 64)
    nope = (c < 7)[None, :]
    b = tl.load(cache + (row[:, None, None] + (c * 64)[None, :, None] + d[None, None, :]),
                mask=(rvalid[:, None] & nope)[:, :, None], other=0)
    rope = tl.load(cache16 + (row // 2 + 224)[:, None] + d[None, :], mask=rvalid[:, None], other=0.0)
    sc = (tl.where(valid, scw, 0)[:, None] >> (8 * c)[None, :].to(tl.int64)) & 0xFF  # [BN, 8] e8m0 exponents
    if NATIVE_FP8:
        v = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        # interpreter: e4m3 byte -> fp16 bits (bias 7 vs 15: value * 2^-8, subnormals included), * 256
        bu = b.to(tl.uint16)
        h = ((bu & 0x7F) << 7) | ((bu & 0x80) << 8)
        v = h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        v = tl.where((bu & 0x7F) == 0x7F, float("nan"), v)
    scale = (sc.to(tl.uint32) << 23).to(tl.float32, bitcast=True)  # 2^(e - 127)
    scale = tl.where(sc == 255, float("nan"), scale)
    v = v * scale[:, :, None]
    is_rope = (c == 7)[None, :, None]
    if DOT_BF16:
        k = tl.where(is_rope, rope[:, None, :], v.to(tl.bfloat16))
    else:
        k = tl.where(is_rope, rope[:, None, :].to(tl.float32), v)
    return tl.reshape(k, [BN, 512]), valid


@triton.jit
def _attn_kernel(
    q_ptr, stride_qt, stride_qh, tok_pos_ptr,
    cache, cache16, rows_ptr, scw_ptr, nkeys_ptr, NK,
    sink_ptr, cos_ptr, sin_ptr, max_pos,
    out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt,
    po_ptr, pl_ptr,
    H, num_splits, qk_scale,
    HAS_SINK: tl.constexpr, HAS_ROPE: tl.constexpr, DIRECT: tl.constexpr, NATIVE_FP8: tl.constexpr,
    DOT_BF16: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
):
    t = tl.program_id(0)
    split = tl.program_id(1)
    heads = tl.program_id(2) * BH + tl.arange(0, BH)
    hmask = heads < H
    pos = tl.load(tok_pos_ptr + t)
    d = tl.arange(0, 512)

    n = tl.load(nkeys_ptr + t)  # this token's key count (the rows kernel wrote -1 past it)
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BN) * BN
    start = split * chunk
    end = tl.minimum(start + chunk, n)

    q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + heads[:, None].to(tl.int64) * stride_qh + d[None, :],
                mask=hmask[:, None], other=0.0)  # loop invariant: shared memory
    if not DOT_BF16:
        q = q.to(tl.float32)
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, 512], tl.float32)
    rows_t = rows_ptr + t.to(tl.int64) * NK
    scw_t = scw_ptr + t.to(tl.int64) * NK
    for kb in range(start, end, BN):
        offs = kb + tl.arange(0, BN)
        k, valid = _kv_tile(cache, cache16, rows_t, scw_t, offs, offs < end, NATIVE_FP8, DOT_BF16, BN)
        s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if DOT_BF16:
            pd = p.to(tl.bfloat16)
        else:
            pd = round_bf16(p)  # the spec kernel's bf16 cast of P, exact under the interpreter
        acc = tl.dot(pd, k, acc * alpha[:, None])

    has = l_i > 0
    m_safe = tl.where(has, m_i, 0.0)
    lse2 = m_safe + tl.log2(tl.where(has, l_i, 1.0))
    if DIRECT:
        denom = l_i
        if HAS_SINK:
            sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
            denom = denom + tl.exp2(sink * 1.4426950408889634 - m_safe)
        o = tl.where(has[:, None], acc / tl.where(has, denom, 1.0)[:, None], 0.0)
        tl.store(lse_ptr + t.to(tl.int64) * stride_lt + heads, tl.where(has, lse2 * 0.6931471805599453, float("inf")),
                 mask=hmask)
        _epilogue_store(o, pos, heads, hmask, out_ptr + t.to(tl.int64) * stride_ot, stride_oh, cos_ptr, sin_ptr,
                        max_pos, 0, HAS_ROPE, BH, 512)
    else:
        o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        prow = (t.to(tl.int64) * num_splits + split) * H + heads
        tl.store(po_ptr + prow[:, None] * 512 + d[None, :], o, mask=hmask[:, None])
        tl.store(pl_ptr + prow, tl.where(has, lse2, float("-inf")), mask=hmask)


@triton.jit
def _epilogue_store(o, pos, heads, hmask, out_row, stride_oh, cos_ptr, sin_ptr, max_pos, d0,
                    HAS_ROPE: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """Dims d0 .. d0+BD-1 of the output: round to bf16, optionally rotate the pairs (2i, 2i+1) of dims 448.. by
    conj(freqs_cis[pos]) in fp32 (spec §5.4: after the bf16 cast), store bf16."""
    o = round_bf16(o)
    if HAS_ROPE:
        x, y = tl.split(tl.reshape(o, [BH, BD // 2, 2]))
        jj = d0 // 2 + tl.arange(0, BD // 2)
        ok = (pos >= 0) & (pos < max_pos)
        is_r = (jj >= 224) & ok
        j = tl.where(jj >= 224, jj - 224, 0)
        pos_c = tl.where(ok, pos, 0).to(tl.int64)
        cs = tl.load(cos_ptr + pos_c * 32 + j, mask=is_r, other=1.0)
        sn = tl.load(sin_ptr + pos_c * 32 + j, mask=is_r, other=0.0)
        x2 = x * cs[None, :] + y * sn[None, :]
        y2 = y * cs[None, :] - x * sn[None, :]
        o = round_bf16(tl.reshape(tl.join(x2, y2), [BH, BD]))
    d = d0 + tl.arange(0, BD)
    tl.store(out_row + heads[:, None].to(tl.int64) * stride_oh + d[None, :], o.to(tl.bfloat16), mask=hmask[:, None])


# ----------------------------------------------------------------------------- split-KV combine
@triton.jit
def _attn_combine_kernel(
    po_ptr, pl_ptr, tok_pos_ptr, sink_ptr, cos_ptr, sin_ptr, max_pos,
    out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, H, num_splits,
    HAS_SINK: tl.constexpr, HAS_ROPE: tl.constexpr, SP: tl.constexpr, SB: tl.constexpr, BH: tl.constexpr,
    BD: tl.constexpr,
):
    """Grid (t, head block, dim block of BD). Partials are read once, SB splits per step (loads in flight)."""
    t = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    dblk = tl.program_id(2)
    hmask = heads < H
    pos = tl.load(tok_pos_ptr + t)
    d = dblk * BD + tl.arange(0, BD)
    sp = tl.arange(0, SP)
    base = t.to(tl.int64) * num_splits
    lse_s = tl.load(pl_ptr + (base + sp[:, None]) * H + heads[None, :],
                    mask=(sp < num_splits)[:, None] & hmask[None, :], other=float("-inf"))
    M = tl.max(lse_s, 0)
    has = M > float("-inf")
    M = tl.where(has, M, 0.0)
    L = tl.sum(tl.exp2(lse_s - M[None, :]), 0)
    acc = tl.zeros([BH, BD], tl.float32)
    for s0 in range(0, num_splits, SB):
        sb = s0 + tl.arange(0, SB)
        row = (base + sb[:, None]) * H + heads[None, :]  # [SB, BH]
        w = tl.exp2(tl.load(pl_ptr + row, mask=(sb < num_splits)[:, None] & hmask[None, :], other=float("-inf"))
                    - M[None, :])
        o_s = tl.load(po_ptr + row[:, :, None] * 512 + d[None, None, :], mask=(w > 0)[:, :, None], other=0.0)
        acc += tl.sum(w[:, :, None] * o_s, 0)
    denom = L
    if HAS_SINK:
        sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
        denom = denom + tl.exp2(sink * 1.4426950408889634 - M)
    o = tl.where(has[:, None], acc / tl.where(has, denom, 1.0)[:, None], 0.0)
    lse = tl.where(has, (M + tl.log2(tl.where(has, L, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(lse_ptr + t.to(tl.int64) * stride_lt + heads, lse, mask=hmask & (dblk == 0))
    _epilogue_store(o, pos, heads, hmask, out_ptr + t.to(tl.int64) * stride_ot, stride_oh, cos_ptr, sin_ptr,
                    max_pos, dblk * BD, HAS_ROPE, BH, BD)


# ----------------------------------------------------------------------------- launch configuration
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def attn_config(num_heads: int, device: torch.device):
    """(BH, BN, num_warps, num_stages). GPU: BH = 64 heads per program (Pro: 2 head blocks), BN = 64 keys per
    tile, 8 warps (the fp32 [64, 512] accumulator is 128 registers per thread over 2 warpgroups), 3 stages (the
    row/scale index loads two tiles ahead, the row data one tile ahead). Interpreter: BH = 16 (heads padded to
    the tl.dot minimum), BN = 32. Env overrides (tuning): V4K_ATTN_BN, V4K_ATTN_WARPS, V4K_ATTN_STAGES."""
    if _interpret() or device.type != "cuda":
        bh = max(16, min(HEAD_BLOCK, triton.next_power_of_2(max(num_heads, 1))))
        return bh, int(os.environ.get("V4K_ATTN_BN", "32")), 4, 1
    bn = int(os.environ.get("V4K_ATTN_BN", "64"))
    warps = int(os.environ.get("V4K_ATTN_WARPS", "8"))
    stages = int(os.environ.get("V4K_ATTN_STAGES", "3"))
    return HEAD_BLOCK, bn, warps, stages


def max_keys(kind: str, topk: int, compressed_capacity: int) -> int:
    """Host-side upper bound of the keys one query attends (no device sync)."""
    if kind == "swa":
        return WINDOW
    if kind == "csa":
        return WINDOW + topk
    return WINDOW + compressed_capacity  # HCA: every entry the compressed block table can address


def choose_num_splits(num_tokens: int, num_heads: int, kind: str, topk: int, compressed_capacity: int,
                      device: torch.device) -> int:
    """Split-KV factor from host ints only. Programs = tokens x head blocks x splits; one program holds an SM
    (the accumulator takes the register file). No split once the token x head-block programs fill half of the
    SMs; else split up to one wave, keeping at least ``min_tiles`` tiles of BN keys per split. Each split
    writes a 128 KB fp32 partial per head block that the combine reads back, a cost that grows with the
    program count, so ``min_tiles`` grows with it:
      * programs <= SMs / 4: 1 tile for short key lists (<= 16 tiles: CSA/SWA; latency), 2 for long ones;
      * SMs / 4 < programs <= SMs / 2: 16 tiles (only long HCA lists split).
    Measured on the H100 (Flash, 64 decode tokens = 64 programs): SWA (2 tiles) 68 us split in 2 vs 23 us
    whole; CSA (10 tiles) 100 vs 71 us; HCA 1M (130 tiles) 431 us split in 2 vs 735 us whole. At 1 token,
    CSA 19 us in 10 one-tile splits vs 24 us in 5 two-tile splits. Env override: V4K_ATTN_MIN_TILES."""
    keys = max_keys(kind, topk, compressed_capacity)
    bh, bn = attn_config(num_heads, device)[:2]
    programs = max(1, num_tokens * triton.cdiv(max(num_heads, 1), bh))
    sms = _num_sms(device)
    if 2 * programs > sms:
        return 1
    want = max(1, sms // programs)
    if 4 * programs > sms:
        default_min = 16
    else:
        default_min = 1 if keys <= 16 * bn else 2
    min_tiles = int(os.environ.get("V4K_ATTN_MIN_TILES", str(default_min)))
    cap = max(1, triton.cdiv(keys, min_tiles * bn))
    return int(max(1, min(want, cap, MAX_SPLITS)))


ROWS_WORKSPACE_BYTES = 64 << 20  # per-launch bound of the key-row workspace (16 B per token and key)


def sparse_attention(
    q, tok_seq, tok_pos, window_cache, window_block_table, compressed_cache, compressed_block_table, indices,
    topk_lens, attn_sink, kind, window_page_size, compressed_page_size, window_ring, rope_cos, rope_sin,
    num_splits, out, lse, topk_lens_per_seq=False, main="triton",
):
    """Token-major launcher. q [T, H, 512] bf16 (last dim contiguous); tok_seq/tok_pos int32 [T];
    indices [T, topk] int32 (CSA); topk_lens int32 [T] (or [B] with ``topk_lens_per_seq``) or None; writes
    out [T, H, 512] bf16 (last dim contiguous) and lse fp32 [T, H]. Three launches per chunk of tokens: key
    rows, attention, and (split-KV) the combine; no host sync (CUDA-graph safe: workspaces come from the
    caching allocator). ``main="cuda"``: the attention loop is the sm_90a kernel of v4kernels._C
    (``v4kernels.cuda.attention``); the key-row and combine kernels are the same."""
    T, H, _ = q.shape
    if T == 0 or H == 0:
        return
    dev = q.device
    BH, BN, warps, stages = attn_config(H, dev)
    if BN < 16 or BN & (BN - 1):
        raise ValueError(f"V4K_ATTN_BN: expected a power of two >= 16, got {BN}")
    csa, hca = kind == "csa", kind == "hca"
    c_cache = compressed_cache if (csa or hca) else window_cache
    c_bt = compressed_block_table if (csa or hca) else window_block_table
    cps = compressed_page_size if (csa or hca) else window_page_size
    topk = indices.shape[1] if csa else 0
    if window_cache.data_ptr() % 16 or c_cache.data_ptr() % 16:
        raise ValueError("window_cache/compressed_cache: expected 16-byte aligned caches (the kernel reads rows with "
                         f"16-byte loads), got addresses {window_cache.data_ptr():#x}, {c_cache.data_ptr():#x}")
    NK = max(max_keys(kind, topk, c_bt.shape[1] * cps if hca else 0), 1)
    if num_splits <= 0:
        num_splits = choose_num_splits(T, H, kind, topk, NK - WINDOW if hca else 0, dev)
    # both caches are addressed from the lower of their base addresses: every row offset is >= 0, -1 = ignored
    base = c_cache if c_cache.data_ptr() < window_cache.data_ptr() else window_cache
    step = max(1, ROWS_WORKSPACE_BYTES // (NK * 16))  # tokens per launch: bounds the key-row workspace
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        tkl = topk_lens if (topk_lens_per_seq or topk_lens is None) else topk_lens[t0:t1]
        _launch(q[t0:t1], tok_seq[t0:t1], tok_pos[t0:t1], window_cache, window_block_table, c_cache, c_bt, base,
                indices[t0:t1] if csa else None, tkl, topk_lens_per_seq, attn_sink, kind, window_page_size, cps,
                window_ring, rope_cos, rope_sin, num_splits, out[t0:t1], lse[t0:t1], NK, BH, BN, warps, stages, main)


def _launch(q, tok_seq, tok_pos, window_cache, window_block_table, c_cache, c_bt, base, indices, topk_lens,
            tkl_per_seq, attn_sink, kind, wps, cps, ring, rope_cos, rope_sin, num_splits, out, lse, NK, BH, BN, warps,
            stages, main="triton"):
    T, H, _ = q.shape
    dev = q.device
    csa = kind == "csa"
    topk = indices.shape[1] if csa else 0
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
    # key -> cache row translation, off the attention loop
    rows = torch.empty((T, NK), dtype=torch.int64, device=dev)
    scw = torch.empty((T, NK), dtype=torch.int64, device=dev)
    nkeys = torch.empty((T,), dtype=torch.int32, device=dev)
    RB = min(1024, triton.next_power_of_2(NK))
    _attn_rows_kernel[(T, triton.cdiv(NK, RB))](
        tok_seq, tok_pos, window_cache.data_ptr() - base.data_ptr(), c_cache.data_ptr() - base.data_ptr(),
        window_block_table, window_block_table.stride(0), window_block_table.shape[1], window_cache.shape[0],
        window_cache.shape[1], wps, ring,
        c_bt, c_bt.stride(0), c_bt.shape[1], c_cache.shape[0], c_cache.shape[1], cps,
        idx, idx.stride(0) if csa else 0, topk, tkl,
        base.view(torch.int64), rows, scw, nkeys, NK,
        KIND=KIND_ID[kind], RATIO=RATIO[kind], HAS_TKLEN=csa and topk_lens is not None, TKLEN_PER_SEQ=tkl_per_seq,
        BLOCK=RB, num_warps=4,
    )
    if main == "cuda":
        from ..cuda.attention import attention_loop

        attention_loop(q, tok_pos, base, rows, scw, nkeys, attn_sink, rope_cos if has_rope else None,
                       rope_sin if has_rope else None, out, lse, po, pl, num_splits)
    else:
        _attn_kernel[(T, num_splits, triton.cdiv(H, BH))](
            q, q.stride(0), q.stride(1), tok_pos,
            base, base.view(torch.bfloat16), rows, scw, nkeys, NK,
            sink, cos, sin, max_pos,
            out, out.stride(0), out.stride(1), lse, lse.stride(0),
            po, pl,
            H, num_splits, (512 ** -0.5) * LOG2E,
            HAS_SINK=attn_sink is not None, HAS_ROPE=has_rope, DIRECT=direct, NATIVE_FP8=on_gpu, DOT_BF16=on_gpu,
            BH=BH, BN=BN, num_warps=warps, num_stages=stages,
        )
    if not direct:
        # tokens x head blocks x dim blocks programs; few tokens (batch-1 decode): 8 heads x 32 dims per program,
        # so that >= 128 programs share the partial reads, 16 splits per step in flight
        if T * triton.cdiv(H, 16) * 4 >= _num_sms(dev):
            BHC, BD, SB = 16, 128, 4
        else:
            BHC, BD, SB = 8, 32, 16
        _attn_combine_kernel[(T, triton.cdiv(H, BHC), 512 // BD)](
            po, pl, tok_pos, sink, cos, sin, max_pos,
            out, out.stride(0), out.stride(1), lse, lse.stride(0), H, num_splits,
            HAS_SINK=attn_sink is not None, HAS_ROPE=has_rope, SP=triton.next_power_of_2(num_splits), SB=SB,
            BH=BHC, BD=BD, num_warps=4,
        )
