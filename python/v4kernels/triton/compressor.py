"""Triton kernels of the KV compressor (reference: v4kernels/reference/compressor.py, spec §3).

The op is memory-bound: each kv/score element is read once, each entry's cache row written once,
plus the compressor state a sequence carries to its next call. The kernels are built so that enough
bytes are in flight on every SM, whatever the batch:

Ratio 4 (overlap; main hd 512 and indexer hd 128) -- ``_r4_kernel``
    one program per compressed entry: its 8 slots (block i-1 first half, block i second half) are
    read as 8 row vectors of hd channels (16-byte loads), pooled, normalised, rotated, quantized and
    written in the same program. An entry is 32 KB (main) / 8 KB (indexer) of input.
Ratio 128 (main) -- ``_r128_kernel``
    an entry is 128 x 512 x 2 fp32 = 512 KB of input: one program per (entry, 32-channel chunk),
    16 programs per entry, neighbours in launch order (together they read whole 2 KB rows). The
    per-channel softmax needs no other channel, so each program pools its chunk on its own (online
    softmax over 16-slot tiles, the next tile's loads in flight while the current one is reduced).
    The RMSNorm needs the whole row: each program stores its pooled chunk in a small fp32 workspace
    and bumps a per-entry counter (acq_rel atomic); the program that arrives last finishes the row
    (norm, RoPE, quant, cache write) and sets the counter back to 0, so the counters are zero between
    launches with no extra launch to clear them.

State. Only the first entries of a sequence read the state (the pending tokens of a block started
by an earlier call, and for overlap the previous block), and the state must be rewritten after
they read it. So program ``b < B`` of every launch is the "head" of sequence b: it computes those
entries (entry blk0 and, for overlap, blk0+1), then after a barrier writes the new state rows
(ratio 128: only the rows the head entry read; "state programs" write the other rows in parallel).
The other programs handle the remaining entries, which read new tokens only. The decode path is
the head with one token per sequence, one launch for the batch (ratio 4: ``_r4_decode_one``, every
load issued before the state is rewritten, one memory round trip; ``_r4_decode_pair_kernel`` runs the
main and the indexer compressor of a CSA layer in one launch; ratio 128: the chunked head).

Numerics. The result does not depend on how a kernel spreads a row over threads, so prefill, chunked
prefill and decode give the same bytes whatever their launch shapes: ratio 4 pools its 8 slots in
a written-out order (max, exp, sum left to right, as the reference); ratio 128 uses the same
tile shape and warps in prefill and decode; the RMSNorm sum of squares (squares of bf16 values,
exact in fp32) is accumulated in fp64, which makes its fp32 result independent of the summation
order. Rounding steps (bf16, e4m3, e2m1, ue8m0) use exact integer helpers and the Hadamard follows
the reference's butterfly order; what remains different from the reference is the fp32 exp and
summation order inside the pooling (a few fp32 ulp), which flips a bf16/e4m3 rounding only rarely.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import formats
from ..reference.compressor import dims
from ._common import e4m3_bits, exp2_int, round_bf16, round_e4m3, ue8m0_exponent

# ----------------------------------------------------------------------------- launch table
# Picked from an H100 sweep of the bench shapes (one config per shape family, no autotune).
# num_warps of the ratio-4 prefill programs (one entry each: [hd] row vectors, 16-byte loads)
R4_WARPS = {"main": 4, "indexer": 1}
# ratio-4 decode (one sequence per program; main and indexer share one launch in the pair kernel)
R4_DECODE_WARPS = 8
# ratio 128: channels per program (16 programs per entry), slots per tile, rows per state program
R128_CH = 32
R128_SLOTS = 16
R128_STATE_ROWS = 32
R128_WARPS = 2
EPS = 1e-6


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, blk, j, col, start, row0, st_row, ch,
              CW: tl.constexpr, R: tl.constexpr):
    """kv and score [len(ch)] of slot j of block blk, channels col + ch. Position q = blk*R + j is a new
    token (q >= start: token row row0 + q - start, score + ape[j]) or an older one (state row st_row,
    whose score already holds ape); blk < 0 is absent (kv 0, score -inf)."""
    q = blk * R + j
    present = blk >= 0
    tok = q >= start
    t_off = (row0 + q - start).to(tl.int64) * CW + col
    s_off = st_row.to(tl.int64) * CW + col
    kp = tl.where(tok, kv_ptr + t_off, skv_ptr + s_off)
    sp = tl.where(tok, sc_ptr + t_off, ssc_ptr + s_off)
    kv = tl.load(kp + ch, mask=present, other=0.0)
    sc = tl.load(sp + ch, mask=present, other=float("-inf"))
    ap = tl.load(ape_ptr + j * CW + col + ch, mask=present & tok, other=0.0)
    return kv, sc + ap


@triton.jit
def _pool8(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, start, row0, srow, HD: tl.constexpr, R: tl.constexpr):
    """Pooled fp32 e [HD] of overlapped entry i: softmax over 8 slots per channel (block i-1 channels
    [0, HD), block i channels [HD, 2HD)), each slot a row vector, in the reference's order.

    State rows (slot ``srow``): block start//R (pending) in rows R + j, the block before it in rows j."""
    tl.static_assert(R == 4)
    CW: tl.constexpr = 2 * HD
    ch = tl.arange(0, HD)
    blk0 = start // R
    pb = i - 1
    prow = srow + tl.where(pb == blk0, R, 0)
    crow = srow + R
    k0, s0 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, pb, 0, 0, start, row0, prow, ch, CW, R)
    k1, s1 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, pb, 1, 0, start, row0, prow + 1, ch, CW, R)
    k2, s2 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, pb, 2, 0, start, row0, prow + 2, ch, CW, R)
    k3, s3 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, pb, 3, 0, start, row0, prow + 3, ch, CW, R)
    k4, s4 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, 0, HD, start, row0, crow, ch, CW, R)
    k5, s5 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, 1, HD, start, row0, crow + 1, ch, CW, R)
    k6, s6 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, 2, HD, start, row0, crow + 2, ch, CW, R)
    k7, s7 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, 3, HD, start, row0, crow + 3, ch, CW, R)
    return _softmax8(k0, s0, k1, s1, k2, s2, k3, s3, k4, s4, k5, s5, k6, s6, k7, s7)


@triton.jit
def _softmax8(k0, s0, k1, s1, k2, s2, k3, s3, k4, s4, k5, s5, k6, s6, k7, s7):
    """sum_s softmax_s(score)[ch] * kv[ch] over 8 slots, element-wise in a fixed order (max, exp, sum and
    the weighted sum left to right, as the reference), so the result does not depend on the layout."""
    m = tl.maximum(tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)),
                   tl.maximum(tl.maximum(s4, s5), tl.maximum(s6, s7)))
    p0 = tl.exp(s0 - m)
    p1 = tl.exp(s1 - m)
    p2 = tl.exp(s2 - m)
    p3 = tl.exp(s3 - m)
    p4 = tl.exp(s4 - m)
    p5 = tl.exp(s5 - m)
    p6 = tl.exp(s6 - m)
    p7 = tl.exp(s7 - m)
    l = p0 + p1 + p2 + p3 + p4 + p5 + p6 + p7
    return (p0 / l * k0 + p1 / l * k1 + p2 / l * k2 + p3 / l * k3 + p4 / l * k4 + p5 / l * k5 + p6 / l * k6
            + p7 / l * k7)


@triton.jit
def _r128_tile(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, j, start, row0, srow, ch, live,
               CW: tl.constexpr, R: tl.constexpr):
    """kv and score [len(j), len(ch)] of slots j of block i (non-overlap): token rows (score + ape[j]) or
    state rows srow + j; nothing is read when ``live`` is False."""
    q = i * R + j
    tok = q >= start
    t_off = (row0 + q - start).to(tl.int64) * CW
    s_off = (srow + j).to(tl.int64) * CW
    kp = tl.where(tok, kv_ptr + t_off, skv_ptr + s_off)
    sp = tl.where(tok, sc_ptr + t_off, ssc_ptr + s_off)
    kv = tl.load(kp[:, None] + ch[None, :], mask=live, other=0.0)
    sc = tl.load(sp[:, None] + ch[None, :], mask=live, other=float("-inf"))
    ap = tl.load(ape_ptr + j[:, None] * CW + ch[None, :], mask=(tok & live)[:, None], other=0.0)
    return kv, sc + ap


@triton.jit
def _pool128(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, start, row0, srow, ch,
             CH: tl.constexpr, CW: tl.constexpr, R: tl.constexpr, U: tl.constexpr):
    """Pooled fp32 e [CH] (channels ch) of non-overlapped entry i: online softmax over R slots in tiles
    of U slots; the next tile is loaded before the current one is reduced (two tiles in flight)."""
    NG: tl.constexpr = R // U
    u = tl.arange(0, U)
    m = tl.full([CH], float("-inf"), tl.float32)
    l = tl.zeros([CH], tl.float32)
    acc = tl.zeros([CH], tl.float32)
    kv_n, sc_n = _r128_tile(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, u, start, row0, srow, ch, 0 < NG, CW, R)
    for g in range(NG):
        kv = kv_n
        sc = sc_n
        kv_n, sc_n = _r128_tile(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, (g + 1) * U + u, start, row0, srow,
                                ch, g + 1 < NG, CW, R)
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a tile of absent slots adds nothing
        alpha = tl.exp(m - m_use)
        p = tl.exp(sc - m_use[None, :])
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p * kv, axis=0)
        m = m_new
    return acc / l


@triton.jit
def _hadamard(y, N: tl.constexpr):
    """Sylvester Hadamard over a [N] fp32 vector in the reference's butterfly order, * N^-0.5."""
    # stage st pairs elements h = 2^st apart; h is written out as (1 << st) rather than bound to a
    # name: a ``tl.constexpr`` local assigned in an unrolled loop is a reassignment, which the
    # compiler rejects (the interpreter does not)
    for st in tl.static_range(7):
        if (1 << st) < N:
            y3 = tl.permute(tl.reshape(y, [N // (2 << st), 2, 1 << st]), (0, 2, 1))
            a, b = tl.split(y3)
            y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), [N])
    return y * (1.0 / 11.313708498984761)


@triton.jit
def _finish(e, seq, i, valid, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr, cache_bf_ptr, bt_ptr, bt_stride,
            bt_width, num_pages, page_size, page_bytes, out_ptr, out_row,
            HD: tl.constexpr, R: tl.constexpr, MAIN: tl.constexpr, WRITE_CACHE: tl.constexpr,
            EPS: tl.constexpr):
    """bf16 -> RMSNorm -> RoPE(i*R) -> quant -> paged-cache row (or dense stored values)."""
    ch = tl.arange(0, HD)
    x = round_bf16(e)
    # squares of bf16 values are exact in fp32; their fp64 sum rounded to fp32 does not depend on the
    # summation order, so the row is the same whatever layout a kernel gives it (prefill == decode)
    ms = (tl.sum((x * x).to(tl.float64), axis=0) * (1.0 / HD)).to(tl.float32)
    rs = tl.div_rn(1.0, tl.sqrt_rn(ms + EPS))
    w = tl.load(w_ptr + ch)
    y = round_bf16(w * (x * rs))
    # RoPE on the last 64 dims, interleaved pairs (a, b) -> (a c - b s, a s + b c)
    pos = i * R
    valid = valid & (pos < max_pos)
    HALF: tl.constexpr = HD // 2
    k = tl.arange(0, HALF)
    is_rope = k >= HALF - 32
    kr = tl.where(is_rope, k - (HALF - 32), 0)
    c = tl.load(cos_ptr + pos.to(tl.int64) * 32 + kr, mask=is_rope & valid, other=1.0)
    s = tl.load(sin_ptr + pos.to(tl.int64) * 32 + kr, mask=is_rope & valid, other=0.0)
    a, b = tl.split(tl.reshape(y, [HALF, 2]))
    ra = round_bf16(a * c - b * s)
    rb = round_bf16(a * s + b * c)
    a = tl.where(is_rope, ra, a)
    b = tl.where(is_rope, rb, b)
    y = tl.reshape(tl.join(a, b), [HD])
    # destination row
    pidx = i // page_size
    page = tl.load(bt_ptr + seq.to(tl.int64) * bt_stride + pidx, mask=valid & (pidx < bt_width), other=-1)
    ok = valid & (pidx < bt_width) & (page >= 0) & (page < num_pages)
    off = i % page_size
    base = page.to(tl.int64) * page_bytes
    if MAIN:
        NB: tl.constexpr = HD // 64                     # 7 FP8 blocks of 64 + 1 rope block
        y2 = tl.reshape(y, [NB, 64])
        blk = tl.arange(0, NB)
        col = tl.arange(0, 64)
        amax = tl.maximum(tl.max(tl.abs(y2), axis=1), 1e-4)
        ex = ue8m0_exponent(amax * (1.0 / 448.0))
        inv_s = ((254 - ex) << 23).to(tl.float32, bitcast=True)   # 2^(127 - ex), exact
        qv = round_e4m3(tl.minimum(tl.maximum(y2 * inv_s[:, None], -448.0), 448.0))
        nope = blk < NB - 1
        if WRITE_CACHE:
            dbase = base + off * 576
            tl.store(cache_ptr + dbase + blk[:, None] * 64 + col[None, :], e4m3_bits(qv),
                     mask=ok & nope[:, None])
            # rope dims: bf16 values (exact in fp32, so the bf16 store is exact)
            tl.store(cache_bf_ptr + (dbase + 448) // 2 + blk[:, None] * 0 + col[None, :], y2,
                     mask=ok & (blk == NB - 1)[:, None])
            sbase = base + page_size * 576 + off * 8
            tl.store(cache_ptr + sbase + blk, tl.where(nope, ex, 0).to(tl.uint8), mask=ok)
        else:
            vals = tl.where(nope[:, None], qv * exp2_int(ex)[:, None], y2)
            tl.store(out_ptr + out_row.to(tl.int64) * HD + blk[:, None] * 64 + col[None, :], vals)
    else:
        h = round_bf16(_hadamard(y, HD))
        h2 = tl.reshape(h, [HD // 32, 32])
        amax = tl.maximum(tl.max(tl.abs(h2), axis=1), 6.0 * 1.1754943508222875e-38)
        ex = ue8m0_exponent(tl.div_rn(amax, 6.0))   # in [1, 253] for finite rows
        sc = exp2_int(ex)
        inv_s = ((254 - ex) << 23).to(tl.float32, bitcast=True)   # 2^(127 - ex) exactly: h2 * inv_s == h2 / sc
        v = tl.minimum(tl.maximum(h2 * inv_s[:, None], -6.0), 6.0)
        av = tl.abs(v)
        code = ((av > 0.25).to(tl.uint32) + (av >= 0.75).to(tl.uint32) + (av > 1.25).to(tl.uint32)
                + (av >= 1.75).to(tl.uint32) + (av > 2.5).to(tl.uint32) + (av >= 3.5).to(tl.uint32)
                + (av > 5.0).to(tl.uint32))
        sign = v.to(tl.uint32, bitcast=True) >> 31
        if WRITE_CACHE:
            codes = tl.reshape(code | (sign << 3), [HD // 2, 2])
            lo, hi = tl.split(codes)
            tl.store(cache_ptr + base + off * 64 + tl.arange(0, HD // 2), (lo | (hi << 4)).to(tl.uint8), mask=ok)
            sb = tl.arange(0, HD // 32)
            tl.store(cache_ptr + base + page_size * 64 + off * 4 + sb, ex.to(tl.uint8), mask=ok)
        else:
            mag = tl.where(code < 4, code.to(tl.float32) * 0.5,
                           tl.where(code == 4, 2.0, tl.where(code == 5, 3.0, tl.where(code == 6, 4.0, 6.0))))
            mag = (mag.to(tl.uint32, bitcast=True) | (sign << 31)).to(tl.float32, bitcast=True)
            r2 = tl.arange(0, HD // 32)
            c2 = tl.arange(0, 32)
            tl.store(out_ptr + out_row.to(tl.int64) * HD + r2[:, None] * 32 + c2[None, :], mag * sc[:, None])


@triton.jit
def _seq_table(cu_ptr, start_ptr, slot_ptr, B, n_tok, num_slots, R: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per-sequence vectors [BLOCK_B]: token offsets, start, state slot, entry count (0 for a sequence
    with invalid indices, unchecked on CUDA tensors: it is skipped, as in the reference) and its
    inclusive cumsum (entries are numbered sequence-major)."""
    bidx = tl.arange(0, BLOCK_B)
    bm = bidx < B
    lo = tl.load(cu_ptr + bidx, mask=bm, other=0)
    hi = tl.load(cu_ptr + bidx + 1, mask=bm, other=0)
    st = tl.load(start_ptr + bidx, mask=bm, other=0)
    sl = tl.load(slot_ptr + bidx, mask=bm, other=-1)
    ok = bm & (st >= 0) & (lo >= 0) & (hi >= lo) & (hi <= n_tok) & (sl >= 0) & (sl < num_slots)
    cnt = tl.where(ok, (st % R + hi - lo) // R, 0)
    incl = tl.cumsum(cnt, axis=0)
    return bidx, ok, lo, hi, st, sl, cnt, incl


@triton.jit
def _pick(v, sel):
    return tl.sum(tl.where(sel, v, 0), axis=0)


# ----------------------------------------------------------------------------- ratio 4 (overlap)
@triton.jit
def _r4_entry(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, cache_bf_ptr, bt_ptr,
              out_ptr, oseq_ptr, opos_ptr, seq, i, p, start, row0, srow, max_pos, bt_stride, bt_width, num_pages,
              page_size, page_bytes, HD: tl.constexpr, R: tl.constexpr, MAIN: tl.constexpr,
              WRITE_CACHE: tl.constexpr, EPS: tl.constexpr):
    """Entry i of sequence seq (output row p of the functional form): pool, finish, write."""
    e = _pool8(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, start, row0, srow, HD, R)
    _finish(e, seq, i, True, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr, cache_bf_ptr, bt_ptr, bt_stride, bt_width,
            num_pages, page_size, page_bytes, out_ptr, p, HD, R, MAIN, WRITE_CACHE, EPS)
    if not WRITE_CACHE:
        tl.store(oseq_ptr + p, seq)
        tl.store(opos_ptr + p, i)


@triton.jit
def _tok_row(kv_ptr, sc_ptr, ape_ptr, lo, start, last, j, cc, CW: tl.constexpr, R: tl.constexpr):
    """The latest new token at a position = j (mod R), if any: (kv, score + ape[j], present)."""
    d = last - j
    qn = last - d % R
    has = (d >= 0) & (qn >= start)
    off = (lo + qn - start).to(tl.int64) * CW
    kv = tl.load(kv_ptr + off + cc, mask=has, other=0.0)
    sc = tl.load(sc_ptr + off + cc, mask=has, other=0.0) + tl.load(ape_ptr + j * CW + cc, mask=has, other=0.0)
    return kv, sc, has


@triton.jit
def _r4_state(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, lo, n, start, srow, HD: tl.constexpr, R: tl.constexpr):
    """Overlap state after new tokens [start, start+n): rows [0, R) <- the last complete block if one
    completed (new tokens or the old pending rows R + j); rows R + j <- the latest new token = j (mod R).
    Loads of a phase are issued before its stores (several rows in flight)."""
    CW: tl.constexpr = 2 * HD
    cc = tl.arange(0, CW)
    end = start + n
    blk_e = end // R
    if blk_e > start // R:
        lb = blk_e - 1
        a0, b0 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, lb, 0, 0, start, lo, srow + R, cc, CW, R)
        a1, b1 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, lb, 1, 0, start, lo, srow + R + 1, cc, CW, R)
        a2, b2 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, lb, 2, 0, start, lo, srow + R + 2, cc, CW, R)
        a3, b3 = _slot_row(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, lb, 3, 0, start, lo, srow + R + 3, cc, CW, R)
        tl.store(skv_ptr + srow * CW + cc, a0)
        tl.store(ssc_ptr + srow * CW + cc, b0)
        tl.store(skv_ptr + (srow + 1) * CW + cc, a1)
        tl.store(ssc_ptr + (srow + 1) * CW + cc, b1)
        tl.store(skv_ptr + (srow + 2) * CW + cc, a2)
        tl.store(ssc_ptr + (srow + 2) * CW + cc, b2)
        tl.store(skv_ptr + (srow + 3) * CW + cc, a3)
        tl.store(ssc_ptr + (srow + 3) * CW + cc, b3)
        tl.debug_barrier()   # the old rows R + j are read (above) before they are overwritten (below)
    last = end - 1
    a0, b0, h0 = _tok_row(kv_ptr, sc_ptr, ape_ptr, lo, start, last, 0, cc, CW, R)
    a1, b1, h1 = _tok_row(kv_ptr, sc_ptr, ape_ptr, lo, start, last, 1, cc, CW, R)
    a2, b2, h2 = _tok_row(kv_ptr, sc_ptr, ape_ptr, lo, start, last, 2, cc, CW, R)
    a3, b3, h3 = _tok_row(kv_ptr, sc_ptr, ape_ptr, lo, start, last, 3, cc, CW, R)
    tl.store(skv_ptr + (srow + R) * CW + cc, a0, mask=h0)
    tl.store(ssc_ptr + (srow + R) * CW + cc, b0, mask=h0)
    tl.store(skv_ptr + (srow + R + 1) * CW + cc, a1, mask=h1)
    tl.store(ssc_ptr + (srow + R + 1) * CW + cc, b1, mask=h1)
    tl.store(skv_ptr + (srow + R + 2) * CW + cc, a2, mask=h2)
    tl.store(ssc_ptr + (srow + R + 2) * CW + cc, b2, mask=h2)
    tl.store(skv_ptr + (srow + R + 3) * CW + cc, a3, mask=h3)
    tl.store(ssc_ptr + (srow + R + 3) * CW + cc, b3, mask=h3)


@triton.jit
def _r4_head(b, lo, hi, start, slot, first, kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr, cos_ptr, sin_ptr,
             cache_ptr, cache_bf_ptr, bt_ptr, out_ptr, oseq_ptr, opos_ptr, max_pos, bt_stride, bt_width, num_pages,
             page_size, page_bytes, HD: tl.constexpr, R: tl.constexpr, MAIN: tl.constexpr,
             WRITE_CACHE: tl.constexpr, EPS: tl.constexpr):
    """Sequence b (valid indices): the entries that may read its state (blk0 and blk0 + 1), then the
    new state. (``_r4_decode_one`` is this with one token, written out for latency.)"""
    srow = slot.to(tl.int64) * (2 * R)
    n = hi - lo
    blk0 = start // R
    cnt = (start % R + n) // R
    for h in range(0, tl.minimum(cnt, 2)):
        _r4_entry(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, cache_bf_ptr, bt_ptr,
                  out_ptr, oseq_ptr, opos_ptr, b, blk0 + h, first + h, start, lo, srow, max_pos, bt_stride, bt_width,
                  num_pages, page_size, page_bytes, HD, R, MAIN, WRITE_CACHE, EPS)
    tl.debug_barrier()   # every state row those entries read is read before _r4_state writes
    _r4_state(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, lo, n, start, srow, HD, R)


@triton.jit
def _r4_decode_one(b, p, slot, kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr,
                   cache_bf_ptr, bt_ptr, max_pos, bt_stride, bt_width, num_pages, page_size, page_bytes,
                   HD: tl.constexpr, R: tl.constexpr, MAIN: tl.constexpr, EPS: tl.constexpr):
    """Decode of token b at position p (>= 0, valid slot): ``_r4_head`` with one token, written out so
    that every load (token, this block's rows R..2R-2, the previous block) is issued before any state
    store (one memory round trip), then the state (row R + p%R <- token; on a completed block rows
    [0, R) <- rows [R, 2R)), then the entry. Same pooling arithmetic as the prefill (``_softmax8``)."""
    tl.static_assert(R == 4)
    CW: tl.constexpr = 2 * HD
    ch = tl.arange(0, HD)
    j = p % R
    tok = b.to(tl.int64) * CW
    ap = ape_ptr + j * CW
    tk0 = tl.load(kv_ptr + tok + ch)
    tk1 = tl.load(kv_ptr + tok + HD + ch)
    ts0 = tl.load(sc_ptr + tok + ch) + tl.load(ap + ch)
    ts1 = tl.load(sc_ptr + tok + HD + ch) + tl.load(ap + HD + ch)
    srow = slot.to(tl.int64) * (2 * R)
    if j == R - 1:
        i = p // R
        # this block's first three tokens (rows R..R+2, both halves: pooled and shifted)
        cur = (srow + R) * CW
        ak0 = tl.load(skv_ptr + cur + ch)
        ak1 = tl.load(skv_ptr + cur + HD + ch)
        as0 = tl.load(ssc_ptr + cur + ch)
        as1 = tl.load(ssc_ptr + cur + HD + ch)
        bk0 = tl.load(skv_ptr + cur + CW + ch)
        bk1 = tl.load(skv_ptr + cur + CW + HD + ch)
        bs0 = tl.load(ssc_ptr + cur + CW + ch)
        bs1 = tl.load(ssc_ptr + cur + CW + HD + ch)
        ck0 = tl.load(skv_ptr + cur + 2 * CW + ch)
        ck1 = tl.load(skv_ptr + cur + 2 * CW + HD + ch)
        cs0 = tl.load(ssc_ptr + cur + 2 * CW + ch)
        cs1 = tl.load(ssc_ptr + cur + 2 * CW + HD + ch)
        # the previous block (rows 0..R-1, first halves); block 0 has none (kv 0, score -inf)
        has = i >= 1
        prv = srow * CW
        pk0 = tl.load(skv_ptr + prv + ch, mask=has, other=0.0)
        ps0 = tl.load(ssc_ptr + prv + ch, mask=has, other=float("-inf"))
        pk1 = tl.load(skv_ptr + prv + CW + ch, mask=has, other=0.0)
        ps1 = tl.load(ssc_ptr + prv + CW + ch, mask=has, other=float("-inf"))
        pk2 = tl.load(skv_ptr + prv + 2 * CW + ch, mask=has, other=0.0)
        ps2 = tl.load(ssc_ptr + prv + 2 * CW + ch, mask=has, other=float("-inf"))
        pk3 = tl.load(skv_ptr + prv + 3 * CW + ch, mask=has, other=0.0)
        ps3 = tl.load(ssc_ptr + prv + 3 * CW + ch, mask=has, other=float("-inf"))
        e = _softmax8(pk0, ps0, pk1, ps1, pk2, ps2, pk3, ps3, ak1, as1, bk1, bs1, ck1, cs1, tk1, ts1)
        tl.debug_barrier()   # every thread has read rows 0..R-1 before they are overwritten
        tl.store(skv_ptr + prv + ch, ak0)
        tl.store(skv_ptr + prv + HD + ch, ak1)
        tl.store(ssc_ptr + prv + ch, as0)
        tl.store(ssc_ptr + prv + HD + ch, as1)
        tl.store(skv_ptr + prv + CW + ch, bk0)
        tl.store(skv_ptr + prv + CW + HD + ch, bk1)
        tl.store(ssc_ptr + prv + CW + ch, bs0)
        tl.store(ssc_ptr + prv + CW + HD + ch, bs1)
        tl.store(skv_ptr + prv + 2 * CW + ch, ck0)
        tl.store(skv_ptr + prv + 2 * CW + HD + ch, ck1)
        tl.store(ssc_ptr + prv + 2 * CW + ch, cs0)
        tl.store(ssc_ptr + prv + 2 * CW + HD + ch, cs1)
        tl.store(skv_ptr + prv + 3 * CW + ch, tk0)
        tl.store(skv_ptr + prv + 3 * CW + HD + ch, tk1)
        tl.store(ssc_ptr + prv + 3 * CW + ch, ts0)
        tl.store(ssc_ptr + prv + 3 * CW + HD + ch, ts1)
        _finish(e, b, i, True, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr, cache_bf_ptr, bt_ptr, bt_stride,
                bt_width, num_pages, page_size, page_bytes, cache_bf_ptr, 0, HD, R, MAIN, True, EPS)
    dst = (srow + R + j) * CW
    tl.store(skv_ptr + dst + ch, tk0)
    tl.store(skv_ptr + dst + HD + ch, tk1)
    tl.store(ssc_ptr + dst + ch, ts0)
    tl.store(ssc_ptr + dst + HD + ch, ts1)


@triton.jit
def _r4_kernel(kv_ptr, sc_ptr, cu_ptr, start_ptr, slot_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr, cos_ptr, sin_ptr,
               cache_ptr, cache_bf_ptr, bt_ptr, out_ptr, oseq_ptr, opos_ptr,
               B, n_tok, num_slots, max_pos, bt_stride, bt_width, num_pages, page_size, page_bytes,
               HD: tl.constexpr, R: tl.constexpr, BLOCK_B: tl.constexpr, MAIN: tl.constexpr,
               WRITE_CACHE: tl.constexpr, DECODE: tl.constexpr, EPS: tl.constexpr):
    """Prefill: programs [0, B) are the sequence heads, program B + p the p-th entry of the ragged batch
    (sequence-major; padding rows of the functional form past the last entry). Decode (DECODE): program
    b is the head of sequence b, whose one token (row b) sits at position start_ptr[b] (< 0: padding)."""
    pid = tl.program_id(0)
    if DECODE:
        st = tl.load(start_ptr + pid)
        sl = tl.load(slot_ptr + pid)
        if (st >= 0) & (sl >= 0) & (sl < num_slots):
            _r4_decode_one(pid, st, sl, kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr,
                           cache_bf_ptr, bt_ptr, max_pos, bt_stride, bt_width, num_pages, page_size, page_bytes, HD, R,
                           MAIN, EPS)
    else:
        bidx, ok, lo, hi, st, sl, cnt, incl = _seq_table(cu_ptr, start_ptr, slot_ptr, B, n_tok, num_slots, R,
                                                         BLOCK_B)
        if pid < B:
            sel = bidx == pid
            if _pick(ok.to(tl.int32), sel) > 0:
                _r4_head(pid, _pick(lo, sel), _pick(hi, sel), _pick(st, sel), _pick(sl, sel),
                         tl.sum(tl.where(bidx < pid, cnt, 0), axis=0), kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr,
                         w_ptr, cos_ptr, sin_ptr, cache_ptr, cache_bf_ptr, bt_ptr, out_ptr, oseq_ptr, opos_ptr,
                         max_pos, bt_stride, bt_width, num_pages, page_size, page_bytes, HD, R, MAIN, WRITE_CACHE,
                         EPS)
        else:
            p = pid - B
            if p < tl.sum(cnt, axis=0):
                seq = tl.sum((incl <= p).to(tl.int32), axis=0)
                sel = bidx == seq
                local = p - _pick(incl - cnt, sel)
                if local >= 2:   # entries blk0 and blk0 + 1 belong to the head
                    start = _pick(st, sel)
                    srow = _pick(sl, sel).to(tl.int64) * (2 * R)
                    _r4_entry(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr,
                              cache_bf_ptr, bt_ptr, out_ptr, oseq_ptr, opos_ptr, seq, start // R + local, p, start,
                              _pick(lo, sel), srow, max_pos, bt_stride, bt_width, num_pages, page_size, page_bytes,
                              HD, R, MAIN, WRITE_CACHE, EPS)
            else:
                if not WRITE_CACHE:
                    tl.store(out_ptr + p.to(tl.int64) * HD + tl.arange(0, HD), tl.zeros([HD], tl.float32))
                    tl.store(oseq_ptr + p, -1)
                    tl.store(opos_ptr + p, -1)


@triton.jit
def _r4_decode_pair_kernel(pos_ptr, slot_ptr, cos_ptr, sin_ptr, max_pos,
                           kv_a, sc_a, skv_a, ssc_a, ape_a, w_a, cache_a, cache_bf_a, bt_a, slots_a, bt_stride_a,
                           bt_width_a, pages_a, page_size_a, page_bytes_a,
                           kv_b, sc_b, skv_b, ssc_b, ape_b, w_b, cache_b, cache_bf_b, bt_b, slots_b, bt_stride_b,
                           bt_width_b, pages_b, page_size_b, page_bytes_b,
                           HD_A: tl.constexpr, MAIN_A: tl.constexpr, HD_B: tl.constexpr, MAIN_B: tl.constexpr,
                           R: tl.constexpr, EPS: tl.constexpr):
    """Decode of the two ratio-4 compressors of a CSA layer (main and indexer) in one launch: program
    (b, 0) runs compressor A for sequence b, (b, 1) compressor B (same code as ``_r4_kernel``)."""
    b = tl.program_id(0)
    st = tl.load(pos_ptr + b)
    sl = tl.load(slot_ptr + b)
    if tl.program_id(1) == 0:
        if (st >= 0) & (sl >= 0) & (sl < slots_a):
            _r4_decode_one(b, st, sl, kv_a, sc_a, skv_a, ssc_a, ape_a, w_a, cos_ptr, sin_ptr, cache_a, cache_bf_a, bt_a,
                           max_pos, bt_stride_a, bt_width_a, pages_a, page_size_a, page_bytes_a, HD_A, R, MAIN_A, EPS)
    else:
        if (st >= 0) & (sl >= 0) & (sl < slots_b):
            _r4_decode_one(b, st, sl, kv_b, sc_b, skv_b, ssc_b, ape_b, w_b, cos_ptr, sin_ptr, cache_b, cache_bf_b, bt_b,
                           max_pos, bt_stride_b, bt_width_b, pages_b, page_size_b, page_bytes_b, HD_B, R, MAIN_B, EPS)


# ----------------------------------------------------------------------------- ratio 128 (no overlap)
@triton.jit
def _r128_emit(e, p, seq, i, ch, ws_ptr, cnt_ptr, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr, cache_bf_ptr, bt_ptr,
               out_ptr, oseq_ptr, opos_ptr, bt_stride, bt_width, num_pages, page_size, page_bytes,
               NC: tl.constexpr, HD: tl.constexpr, R: tl.constexpr, MAIN: tl.constexpr,
               WRITE_CACHE: tl.constexpr, EPS: tl.constexpr):
    """Store this program's chunk of entry p's pooled row; the last of the NC chunk programs to arrive
    finishes the row and resets the entry's counter to 0."""
    row = p.to(tl.int64) * HD
    tl.store(ws_ptr + row + ch, e)
    tl.debug_barrier()   # every thread's part is stored before the count is raised (release below)
    arrived = tl.atomic_add(cnt_ptr + p, 1, sem="acq_rel", scope="gpu")
    if arrived == NC - 1:
        ef = tl.load(ws_ptr + row + tl.arange(0, HD), cache_modifier=".cg")
        _finish(ef, seq, i, True, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr, cache_bf_ptr, bt_ptr, bt_stride,
                bt_width, num_pages, page_size, page_bytes, out_ptr, p, HD, R, MAIN, WRITE_CACHE, EPS)
        tl.store(cnt_ptr + p, 0)
        if not WRITE_CACHE:
            tl.store(oseq_ptr + p, seq)
            tl.store(opos_ptr + p, i)


@triton.jit
def _r128_state_rows(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, j, lo, n, start, srow, j_lo, j_hi, ch,
                     CW: tl.constexpr, R: tl.constexpr):
    """State rows j (vector) in [j_lo, j_hi), channels ch <- the latest new token = j (mod R), if any."""
    last = start + n - 1
    d = last - j
    qn = last - d % R
    has = (d >= 0) & (qn >= start) & (j >= j_lo) & (j < j_hi)
    off = (lo + qn - start).to(tl.int64) * CW
    kv = tl.load(kv_ptr + off[:, None] + ch[None, :], mask=has[:, None], other=0.0)
    sc = tl.load(sc_ptr + off[:, None] + ch[None, :], mask=has[:, None], other=0.0)
    sc = sc + tl.load(ape_ptr + j[:, None] * CW + ch[None, :], mask=has[:, None], other=0.0)
    dst = (srow + j).to(tl.int64) * CW
    tl.store(skv_ptr + dst[:, None] + ch[None, :], kv, mask=has[:, None])
    tl.store(ssc_ptr + dst[:, None] + ch[None, :], sc, mask=has[:, None])


@triton.jit
def _r128_kernel(kv_ptr, sc_ptr, cu_ptr, start_ptr, slot_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr, cos_ptr, sin_ptr,
                 cache_ptr, cache_bf_ptr, bt_ptr, out_ptr, oseq_ptr, opos_ptr, ws_ptr, cnt_ptr,
                 B, n_tok, num_slots, max_pos, bt_stride, bt_width, num_pages, page_size, page_bytes,
                 HD: tl.constexpr, R: tl.constexpr, CH: tl.constexpr, U: tl.constexpr, SR: tl.constexpr,
                 BLOCK_B: tl.constexpr, MAIN: tl.constexpr, WRITE_CACHE: tl.constexpr, DECODE: tl.constexpr,
                 EPS: tl.constexpr):
    """Grid (programs * NC,), NC = HD // CH: program id = q * NC + k, k the channel chunk (the NC chunks of
    one entry are neighbours in launch order, so together they read whole rows: DRAM locality). Prefill q:
    [0, B) sequence heads, [B, B + B*R/SR) state programs (sequence, SR state rows), then one per entry of
    the ragged batch. Decode (DECODE): q = b is the head of sequence b (one token, row b, position
    start_ptr[b])."""
    NC: tl.constexpr = HD // CH
    pid = tl.program_id(0) // NC
    kk = tl.program_id(0) % NC
    ch = kk * CH + tl.arange(0, CH)
    if DECODE:
        st = tl.load(start_ptr + pid)
        sl = tl.load(slot_ptr + pid)
        if (st >= 0) & (sl >= 0) & (sl < num_slots):
            srow = sl.to(tl.int64) * R
            j = st % R
            if j == R - 1:   # the token completes block st // R: pool state rows 0..R-2 and the token
                e = _pool128(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, st // R, st, pid, srow, ch, CH, HD, R, U)
                _r128_emit(e, pid, pid, st // R, ch, ws_ptr, cnt_ptr, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr,
                           cache_bf_ptr, bt_ptr, out_ptr, oseq_ptr, opos_ptr, bt_stride, bt_width, num_pages,
                           page_size, page_bytes, NC, HD, R, MAIN, WRITE_CACHE, EPS)
            tl.debug_barrier()
            tok = pid.to(tl.int64) * HD
            tl.store(skv_ptr + (srow + j) * HD + ch, tl.load(kv_ptr + tok + ch))
            tl.store(ssc_ptr + (srow + j) * HD + ch, tl.load(sc_ptr + tok + ch) + tl.load(ape_ptr + j * HD + ch))
    else:
        NSG: tl.constexpr = R // SR
        bidx, ok, lo, hi, st, sl, cnt, incl = _seq_table(cu_ptr, start_ptr, slot_ptr, B, n_tok, num_slots, R,
                                                         BLOCK_B)
        if pid < B + B * NSG:
            # head (b = pid) or state program (b, group g) of a sequence
            is_head = pid < B
            b = tl.where(is_head, pid, (pid - B) // NSG)
            sel = bidx == b
            if _pick(ok.to(tl.int32), sel) > 0:
                start = _pick(st, sel)
                row0 = _pick(lo, sel)
                n = _pick(hi, sel) - row0
                c = _pick(cnt, sel)
                srow = _pick(sl, sel).to(tl.int64) * R
                # rows below `split` are read by the head entry (pending tokens): the head writes them
                split = tl.where(c > 0, start % R, 0)
                if is_head:
                    if c > 0:
                        blk0 = start // R
                        e = _pool128(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, blk0, start, row0, srow, ch, CH, HD,
                                     R, U)
                        p = tl.sum(tl.where(bidx < b, cnt, 0), axis=0)
                        _r128_emit(e, p, b, blk0, ch, ws_ptr, cnt_ptr, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr,
                                   cache_bf_ptr, bt_ptr, out_ptr, oseq_ptr, opos_ptr, bt_stride, bt_width, num_pages,
                                   page_size, page_bytes, NC, HD, R, MAIN, WRITE_CACHE, EPS)
                        tl.debug_barrier()   # the pending rows are read before they are overwritten
                        for g in range(0, tl.cdiv(split, SR)):
                            _r128_state_rows(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, g * SR + tl.arange(0, SR),
                                             row0, n, start, srow, 0, split, ch, HD, R)
                else:
                    g = (pid - B) % NSG
                    _r128_state_rows(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, g * SR + tl.arange(0, SR), row0, n,
                                     start, srow, split, R, ch, HD, R)
        else:
            p = pid - B - B * NSG
            if p < tl.sum(cnt, axis=0):
                seq = tl.sum((incl <= p).to(tl.int32), axis=0)
                sel = bidx == seq
                local = p - _pick(incl - cnt, sel)
                if local >= 1:   # entry blk0 belongs to the head
                    start = _pick(st, sel)
                    i = start // R + local
                    srow = _pick(sl, sel).to(tl.int64) * R
                    e = _pool128(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, i, start, _pick(lo, sel), srow, ch, CH,
                                 HD, R, U)
                    _r128_emit(e, p, seq, i, ch, ws_ptr, cnt_ptr, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr,
                               cache_bf_ptr, bt_ptr, out_ptr, oseq_ptr, opos_ptr, bt_stride, bt_width, num_pages,
                               page_size, page_bytes, NC, HD, R, MAIN, WRITE_CACHE, EPS)
            else:
                if not WRITE_CACHE:
                    tl.store(out_ptr + p.to(tl.int64) * HD + ch, tl.zeros([CH], tl.float32))
                    if kk == 0:
                        tl.store(oseq_ptr + p, -1)
                        tl.store(opos_ptr + p, -1)


# ----------------------------------------------------------------------------- workspace
_COUNTERS = {}
_RETIRED = []   # counter buffers replaced by larger ones: a captured CUDA graph may still point at them


def _counters(n, device):
    """Per-entry arrival counters of the ratio-128 kernel: int32 zeros, kept zero by the kernel itself
    (the last arriving program resets its entry), so one buffer per (device, stream) serves every call
    with no memset launch. A buffer too small during CUDA-graph capture is replaced by a fresh zeroed
    one for that call only (its memset is part of the graph)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    if buf is not None:
        _RETIRED.append(buf)
    buf = torch.zeros(max(1024, triton.next_power_of_2(n)), dtype=torch.int32, device=device)
    _COUNTERS[key] = buf
    return buf


# ----------------------------------------------------------------------------- launchers
def _fmt(kind):
    return formats.FORMATS["kv584" if kind == "main" else "idx_fp4"]


def _cache_args(cache, block_table, page_size, kind):
    """(cache, cache viewed as bf16 (main: rope dims), block table, its row stride, width, pages, page size,
    page bytes)."""
    bt = block_table.contiguous()
    cache_bf = cache.view(torch.bfloat16) if kind == "main" else cache
    return (cache, cache_bf, bt), (bt.stride(0), bt.shape[1], cache.shape[0], page_size,
                                   _fmt(kind).page_bytes(page_size))


def _launch_prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight,
                    cos, sin, ratio, kind, cache, block_table, page_size, out, oseq, opos):
    hd, c, overlap = dims(ratio, kind)
    B = start_pos.shape[0]
    if B == 0:
        return
    n_tok = kv.shape[0]
    write_cache = cache is not None
    if write_cache:
        ptrs, ints = _cache_args(cache, block_table, page_size, kind)
        outs = (ptrs[1], cu_seqlens, cu_seqlens)
    else:
        ptrs, ints = (out, out, cu_seqlens), (0, 0, 0, 1, 0)
        outs = (out, oseq, opos)
    common = (kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight, cos, sin,
              *ptrs, *outs)
    rows = n_tok // ratio + B          # entries of the batch, at most
    block_b = max(16, triton.next_power_of_2(B + 1))
    if overlap:
        _r4_kernel[(B + rows,)](
            *common, B, n_tok, state_kv.shape[0], cos.shape[0], *ints,
            HD=hd, R=ratio, BLOCK_B=block_b, MAIN=kind == "main", WRITE_CACHE=write_cache, DECODE=False, EPS=EPS,
            num_warps=R4_WARPS[kind])
    else:
        ws = torch.empty(rows, hd, dtype=torch.float32, device=kv.device)
        cnt = _counters(rows, kv.device)
        _r128_kernel[((B + B * (ratio // R128_STATE_ROWS) + rows) * (hd // R128_CH),)](
            *common, ws, cnt, B, n_tok, state_kv.shape[0], cos.shape[0], *ints,
            HD=hd, R=ratio, CH=R128_CH, U=R128_SLOTS, SR=R128_STATE_ROWS, BLOCK_B=block_b, MAIN=kind == "main",
            WRITE_CACHE=write_cache, DECODE=False, EPS=EPS, num_warps=R128_WARPS)


def compress_kv(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight, cos, sin,
                cache, block_table, page_size, ratio, kind):
    _launch_prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight, cos,
                    sin, ratio, kind, cache, block_table, page_size, None, None, None)


def compress_kv_entries(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight,
                        cos, sin, ratio, kind):
    hd = dims(ratio, kind)[0]
    B = start_pos.shape[0]
    rows = kv.shape[0] // ratio + B
    out = torch.empty(rows, hd, dtype=torch.bfloat16, device=kv.device)
    oseq = torch.empty(rows, dtype=torch.int32, device=kv.device)
    opos = torch.empty(rows, dtype=torch.int32, device=kv.device)
    _launch_prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight, cos,
                    sin, ratio, kind, None, None, 1, out, oseq, opos)
    return out, oseq, opos


def compress_kv_decode(kv, score, positions, state_slots, state_kv, state_score, ape, norm_weight, cos, sin,
                       cache, block_table, page_size, ratio, kind):
    hd, c, overlap = dims(ratio, kind)
    B = positions.shape[0]
    if B == 0:
        return
    ptrs, ints = _cache_args(cache, block_table, page_size, kind)
    common = (kv, score, positions, positions, state_slots, state_kv, state_score, ape, norm_weight, cos, sin,
              *ptrs, ptrs[1], positions, positions)
    if overlap:
        _r4_kernel[(B,)](
            *common, B, B, state_kv.shape[0], cos.shape[0], *ints,
            HD=hd, R=ratio, BLOCK_B=16, MAIN=kind == "main", WRITE_CACHE=True, DECODE=True, EPS=EPS,
            num_warps=R4_DECODE_WARPS)
    else:
        ws = torch.empty(B, hd, dtype=torch.float32, device=kv.device)
        cnt = _counters(B, kv.device)
        _r128_kernel[(B * (hd // R128_CH),)](
            *common, ws, cnt, B, B, state_kv.shape[0], cos.shape[0], *ints,
            HD=hd, R=ratio, CH=R128_CH, U=R128_SLOTS, SR=R128_STATE_ROWS, BLOCK_B=16, MAIN=kind == "main",
            WRITE_CACHE=True, DECODE=True, EPS=EPS, num_warps=R128_WARPS)


def compress_kv_decode_pair(positions, state_slots, cos, sin, a, b):
    """Decode of two compressors at the same positions (a CSA layer: main and indexer, both ratio 4) in one
    launch. ``a``/``b``: (kv, score, state_kv, state_score, ape, norm_weight, cache, block_table, page_size,
    ratio, kind). Other combinations run one launch per compressor."""
    B = positions.shape[0]
    if B == 0:
        return
    if a[9] != 4 or b[9] != 4:
        for comp in (a, b):
            kv, score, skv, ssc, ape, w, cache, bt, ps, ratio, kind = comp
            compress_kv_decode(kv, score, positions, state_slots, skv, ssc, ape, w, cos, sin, cache, bt, ps, ratio,
                               kind)
        return
    args = []
    for kv, score, skv, ssc, ape, w, cache, bt, ps, ratio, kind in (a, b):
        ptrs, ints = _cache_args(cache, bt, ps, kind)
        args += [kv, score, skv, ssc, ape, w, ptrs[0], ptrs[1], ptrs[2], skv.shape[0], *ints]
    _r4_decode_pair_kernel[(B, 2)](
        positions, state_slots, cos, sin, cos.shape[0], *args,
        HD_A=dims(4, a[10])[0], MAIN_A=a[10] == "main", HD_B=dims(4, b[10])[0], MAIN_B=b[10] == "main", R=4,
        EPS=EPS, num_warps=R4_DECODE_WARPS)
