"""Triton kernels of the lightning indexer (reference: v4kernels/reference/indexer.py, spec §4).

Kernels:

* ``_prepare_q_kernel``: RoPE (last 64 dims) -> Hadamard 128 (radix-2 butterflies in the
  reference's order) -> FP4 fake-quant; bitwise equal to the reference. One thread owns one row of
  128, so the butterflies (an xor-exchange on a [2]*7 hypercube view), pairs and block maxima are
  thread-local: no shuffles, no shared memory; the kernel is bound by its 4 bytes per element.
* ``_score_kernel``: scores ``I[t] = sum_h relu(q_h . k_t) * w_h`` over the paged key cache. Keys
  lie on the MMA's M side (64 keys per tile; q of the block's heads on N, in shared memory once),
  so the head sum of the accumulator is thread-local but for two shuffles. Each loop trip loads two
  tiles before scoring the first (the second is in flight meanwhile), with the block-table reads
  issued one trip ahead; a tile inside one page is read unmasked from that page (page 0 stands in
  for a missing one: in bounds, and its rows are invisible).
  On the GPU the top-k path multiplies in FP8 (Hopper has no FP4 MMA): an FP4 key is
  ``e2m1 * 2^(e_b - 127)`` per block of 32; with ``m = max_b e_b`` each block becomes the exact
  e4m3 value ``e2m1 * 2^(6 - (m - e_b))`` (exact while ``m - e_b <= 11``; a block further below the
  key's largest block is flushed to zero), decoded from the nibbles with two ``prmt`` byte lookups
  per 4 bytes. The query is scaled per head by a power of two ``2^(7 - E_h)`` and rounded to e4m3
  (exact for FP4-exact queries, which ``indexer_prepare_q`` produces). The powers of two come back
  as ``2^(m - 133)`` per key and ``w_h * 2^(E_h - 7)`` per head, outside the relu. The logits op
  (and the interpreter) multiplies exact bf16 (fp32) values instead.
  Modes: LOGITS writes fp32 scores (-inf where invisible). TOP-K compares each tile's scores with
  the selector's threshold (one CTA-wide test for two tiles), packs and appends keys only where
  some pass (rare once a chunk's first tiles are in), and writes the sorted top-M of its chunk (or,
  when one program covers all keys of its queries, the final indices). Scores never reach HBM,
  except that with M < top-k the 4-byte score keys are also kept in a workspace (small decode
  batches, where it stays in L2) for the merge to re-read the rare chunk holding more than M winners.
* ``_merge_kernel``: one program per query: streams the per-chunk lists column by column through a
  selector, stopping once a column block lies below its threshold, re-reads saturated chunks from
  the workspace, writes indices, lengths and physical KV rows.

Ordering key: ``(monotone_int32(score) << 32) | (2^32 - 1 - t)`` as int64, largest first, so a higher
score wins and, on equal scores, the lower entry index wins (the reference's stable sort). Invisible
entries carry ``SENT`` (below every real key). NaN scores count as -inf, -0.0 as +0.0.

Selector (``_push``/``_compact``/``_finalize``): keys >= a threshold ``tau`` are appended to a
per-query scratch row of CAP slots (global memory, L1/L2 resident); when it would overflow, a
radix pass over the row (256-bin histogram of ``(key - tau) >> shift``, the shift adapted to the
live key range, repeated inside the winning bin) raises ``tau`` to keep between K and 2K keys, and
the row is compacted. The final K keys are found the same way (exactly) and sorted once. No
sort runs while streaming, and every key is compared once against ``tau``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import exp2_int, round_bf16, ue8m0_exponent

SENT = tl.constexpr(-9223372036854775807)  # INT64_MIN + 1: below the key of any visible entry (even score -inf)
TAU0 = tl.constexpr(-9223372036854775806)  # SENT + 1: a threshold every visible key passes and SENT fails
I32_MIN = tl.constexpr(-2147483648)        # workspace value of an invisible entry
HEAD_DIM = 128
MIN_LIST = 16


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ----------------------------------------------------------------------------- query preparation
@triton.jit
def _mul_rn(a, b, RN: tl.constexpr):
    # a * b rounded once, never contracted into an FMA with a following add (the reference rounds
    # every product); the interpreter never contracts.
    if RN:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _rbf16(x, RN: tl.constexpr):
    """fp32 -> nearest bf16 value (RNE), as fp32: the hardware conversion on the GPU, integer ops under the
    interpreter (whose fp32 -> bf16 conversion truncates)."""
    if RN:
        return x.to(tl.bfloat16).to(tl.float32)
    else:
        return round_bf16(x)


@triton.jit
def _butterfly(h, ax: tl.constexpr, AXES: tl.constexpr):
    """(u, v) -> (u + v, u - v) along hypercube axis ``ax`` (size 2) of ``h``: the partner of every element
    by an xor-exchange (``x ^ xor_sum(pair)``, the trick ``tl.sort`` uses); u + v and u - v are each one
    IEEE add/sub, as in the reference."""
    ix = h.to(tl.int32, bitcast=True)
    y = (ix ^ tl.xor_sum(ix, ax, True)).to(tl.float32, bitcast=True)
    hi = tl.reshape(tl.arange(0, 2), [1] * ax + [2] + [1] * (AXES - 1 - ax)) == 1
    return tl.where(hi, y - h, h + y)


@triton.jit
def _prepare_q_kernel(q_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, H, max_pos,
                      R: tl.constexpr, RN: tl.constexpr):
    """out[row] = FP4(Hadamard128(RoPE(q[row], pos[row // H]))) for R rows of 128 (one head each).

    RoPE: pair j of the last 64 dims (a, b) -> (a*c - b*s, a*s + b*c) in fp32, rounded to bf16.
    Hadamard: stages h = 1..64: (u, v) -> (u + v, u - v) on elements i, i + h of each 2h-block,
    then * 128^-0.5, rounded to bf16. FP4: per 32 values s = 2^ceil(log2(max(amax, 6*2^-126) / 6)),
    e2m1 RNE of clamp(x / s, -6, 6), result E2M1 * s (exact in bf16).

    Layout: the tile is [R, 16, 8] (element 8c + e of row r at [r, c, e]); the rows are the first
    non-contiguous dimension, so they go to lanes and the 16-byte vectors of a row stay in one
    thread's registers: every butterfly, pair and block reduction is thread-local (no shuffles, no
    shared memory)."""
    pid = tl.program_id(0)
    r1 = pid * R + tl.arange(0, R)
    rows = r1[:, None, None]
    rmask = rows < n_rows
    c = tl.arange(0, 16)[None, :, None]
    e = tl.arange(0, 8)[None, None, :]
    offs = rows.to(tl.int64) * 128 + c * 8 + e  # [R, 16, 8]
    x = tl.load(q_ptr + offs, mask=rmask, other=0.0).to(tl.float32)
    tok = r1 // H
    pos = tl.load(pos_ptr + tok, mask=r1 < n_rows, other=0).to(tl.int64)
    pok = (r1 < n_rows) & (pos >= 0) & (pos < max_pos)  # an out-of-table position is not rotated (never read)
    # RoPE on pairs (x[2i], x[2i+1]), i >= 32 (chunks c >= 8): pair i = 4c + e // 2
    a, b = tl.split(tl.reshape(x, [R, 16, 4, 2]))
    i = (tl.arange(0, 16)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]) - 32  # [1, 16, 4]
    is_rope = i >= 0
    tab = pos[:, None, None] * 32 + i
    tmask = pok[:, None, None] & is_rope
    cs = tl.load(cos_ptr + tab, mask=tmask, other=1.0)
    sn = tl.load(sin_ptr + tab, mask=tmask, other=0.0)
    ar = _rbf16(_mul_rn(a, cs, RN) - _mul_rn(b, sn, RN), RN)
    br = _rbf16(_mul_rn(a, sn, RN) + _mul_rn(b, cs, RN), RN)
    a = tl.where(is_rope, ar, a)
    b = tl.where(is_rope, br, b)
    x = tl.reshape(tl.join(a, b), [R, 16, 8])
    # Hadamard: index bit k is hypercube axis 7 - k (axis 0 = row); stage st pairs bit st
    h = tl.reshape(x, [R, 2, 2, 2, 2, 2, 2, 2])
    for st in tl.static_range(7):
        h = _butterfly(h, 7 - st, 8)
    x = _rbf16(tl.reshape(h, [R, 16, 8]) * 0.08838834764831845, RN)
    # FP4 fake-quant, blocks of 32 = 4 chunks: [R, 4 (block), 32]
    xb = tl.reshape(x, [R, 4, 32])
    ax = tl.abs(xb)
    amax = tl.max(ax, axis=2)  # [R, 4]
    bad = (tl.max((ax != ax).to(tl.int32), axis=2) > 0) | (amax > 3.0e38)
    amax = tl.maximum(amax, 6.0 * 2.0 ** -126)
    es = ue8m0_exponent(tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)))
    es = tl.minimum(tl.maximum(es, 1), 253)
    inv_s = ((254 - es) << 23).to(tl.float32, bitcast=True)  # 2^(127 - e)
    y = tl.minimum(ax * inv_s[:, :, None], 6.0)  # |x| / s, exact (power of two), clamped
    # round to the e2m1 grid (step 0.5 below 2, then 1, then 2), ties to even, by adding and
    # subtracting 1.5 * 2^(E + 22) (E = max(exponent(y), 0)): its ulp is the grid step 2^(E - 1)
    ey = tl.maximum((y.to(tl.uint32, bitcast=True) >> 23) & 0xFF, 127)
    magic = (((ey + 22) << 23) | 0x400000).to(tl.float32, bitcast=True)
    rr = (y + magic) - magic
    val = rr * exp2_int(es)[:, :, None]
    sign = xb.to(tl.uint32, bitcast=True) & 0x80000000
    val = (val.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    val = tl.where(bad[:, :, None], float("nan"), val)
    tl.store(out_ptr + offs, tl.reshape(val, [R, 16, 8]).to(tl.bfloat16), mask=rmask)


def indexer_prepare_q(q: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    T, H, D = q.shape
    qc = q.contiguous()
    out = torch.empty_like(qc)
    n_rows = T * H
    if n_rows:
        R = 16 if _interpret() else 32
        _prepare_q_kernel[(triton.cdiv(n_rows, R),)](
            qc, positions.contiguous(), cos.contiguous(), sin.contiguous(), out, n_rows, H, cos.shape[0],
            R=R, RN=not _interpret(), num_warps=1,
        )
    return out


# ----------------------------------------------------------------------------- key decoding
# FP4 -> e4m3, 4 packed bytes (8 nibbles) per instance, position-consistent: output byte i of $0
# (resp. $1) is the e4m3 value of the low (resp. high) nibble of input byte i. The magnitude is
# looked up by prmt in the 8-byte table (lut_lo: magnitudes 0..3, lut_hi: 4..7) of the block's
# shift; the sign bit is OR-ed in. The four bytes of one instance lie in one 16-byte block (the
# LUT operands are the same in the 4 registers; the first is used).
_FP4_E4M3_ASM = tl.constexpr("""{
.reg .b32 m, s4, s8, ylo, yhi, sl, sx, ml, mh, sg;
and.b32 m, $2, 0x77777777;
shr.u32 s4, m, 4;
shr.u32 s8, m, 8;
lop3.b32 ylo, m, s4, 0x0F0F0F0F, 0xE4;
lop3.b32 yhi, s4, s8, 0x0F0F0F0F, 0xE4;
prmt.b32 sl, ylo, ylo, 0x3320;
prmt.b32 sx, yhi, yhi, 0x3320;
prmt.b32 ml, $3, $7, sl;
prmt.b32 mh, $3, $7, sx;
shl.b32 sg, $2, 4;
lop3.b32 $0, ml, sg, 0x80808080, 0xF8;
lop3.b32 $1, mh, $2, 0x80808080, 0xF8;
}""")


@triton.jit
def _e4m3_lut(s):
    """Byte tables (lo: magnitudes 0..3, hi: 4..7) of e2m1 * 2^s as e4m3, s int32 <= 6. For s >= -5 every
    nonzero value is a normal e4m3 number and only the exponent field moves; below, the block is
    flushed (it lies more than 2^11 below the key's largest block)."""
    lo = 0x3C383000 + s * 0x08080800
    hi = 0x4C484440 + s * 0x08080808
    keep = s >= -5
    return tl.where(keep, lo, 0), tl.where(keep, hi, 0)


@triton.jit
def _e2m1_scaled(c, s):
    """E2M1 code c (int32 0..15) times 2^s (int32, <= 6), exact fp32 (0 below the fp32 normal range)."""
    mag = c & 7
    e = mag >> 1
    mant = tl.where(e > 0, 2 + (mag & 1), mag & 1)  # value = mant * 2^(max(e, 1) - 2)
    ex = tl.maximum(e, 1) - 2 + s + 127
    p2 = (tl.maximum(ex, 0).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    v = mant.to(tl.float32) * p2
    sign = ((c >> 3) & 1).to(tl.uint32) << 31
    return (v.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_vals(bt):
    """e4m3fn byte (int32 0..255) -> fp32 value (0x7F, 0xFF -> NaN), by integer ops (the interpreter's fp8 casts
    are wrong)."""
    e = (bt >> 3) & 15
    m = bt & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.uint32).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * (1.0 / 512.0)
    v = tl.where(e > 0, normal, sub)
    v = tl.where((bt & 0x7F) == 0x7F, float("nan"), v)  # e4m3fn NaN (S.1111.111), as torch decodes it
    sign = ((bt >> 7) & 1).to(tl.uint32) << 31
    return (v.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _skey(score):
    """Monotone int32 of an fp32 score (NaN -> -inf, -0.0 -> +0.0)."""
    s = tl.where(score != score, float("-inf"), score)
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _pack(skey, t):
    """Ordering key: score first, then the lower entry index."""
    return (skey.to(tl.int64) << 32) | ((~t).to(tl.int64) & 0xFFFFFFFF)


# ----------------------------------------------------------------------------- selector
@triton.jit
def _radix_cut(x, lo, up, above, n, KEEP, TARGET):
    """One pass of ``_compact``'s radix select on keys ``x`` held in registers (module doc)."""
    width = (up - lo).to(tl.uint64, bitcast=True)  # > 0; the int64 difference may wrap: unsigned
    ex = ((width - 1).to(tl.float64).to(tl.uint64, bitcast=True) >> 52).to(tl.int32) - 1022  # >= bit length
    sh = tl.maximum(ex - 8, 0)
    inwin = (x >= lo) & (x < up)
    dig = ((x - lo).to(tl.uint64, bitcast=True) >> sh.to(tl.uint64)).to(tl.int32)
    hist = tl.histogram(tl.where(inwin, dig, 0), 256, mask=inwin)
    return hist, sh


@triton.jit
def _radix_pick(hist, sh, lo, up, above, KEEP):
    """Keep the bins from the top down to the one where the count reaches KEEP; that bin is the next window."""
    b_idx = tl.arange(0, 256)
    cum = tl.cumsum(hist, axis=0, reverse=True)
    b = tl.max(tl.where(cum >= KEEP - above, b_idx, 0), axis=0)
    c_b = tl.sum(tl.where(b_idx == b, cum, 0), axis=0)
    h_b = tl.sum(tl.where(b_idx == b, hist, 0), axis=0)
    above = above + c_b - h_b
    new_lo = lo + (b.to(tl.int64) << sh.to(tl.int64))
    up = tl.where(b < 255, lo + ((b + 1).to(tl.int64) << sh.to(tl.int64)), up)
    return new_lo, up, above, above + h_b


@triton.jit
def _compact(row_ptr, cnt, tau, KEEP, TARGET, CAP: tl.constexpr):
    """Raise ``tau`` until at most max(TARGET, KEEP) keys of row[:cnt] are >= tau (never fewer than
    min(KEEP, cnt)), move those to row[:n]; returns (tau, n). With TARGET == KEEP, n == min(KEEP, cnt).

    Radix select on the int64 keys: a window [lo, up) holds the undecided keys, those >= up are kept;
    each pass splits the window into 256 bins of width 2^sh (sh from the window width) and keeps
    the bins from the top down to the one where the count reaches KEEP, whose range becomes the
    next window. At most 8 passes (64 bits); usually 1 for a compaction, 2-4 for an exact cut.
    Rows longer than 1024 keys are processed in blocks of 1024 (bounded registers)."""
    RB: tl.constexpr = CAP if CAP <= 1024 else 1024
    i = tl.arange(0, RB)
    tl.debug_barrier()  # the appends of other threads
    if CAP <= RB:
        x = tl.load(row_ptr + i, mask=i < cnt, other=SENT)
        n = tl.sum((x >= tau).to(tl.int32), axis=0)
        lo = tau
        up = tl.max(x, axis=0) + 1  # exclusive: keys >= up are kept outright (none yet)
        above = n * 0
        it = 0
        while (n > TARGET) & (it < 9):
            hist, sh = _radix_cut(x, lo, up, above, n, KEEP, TARGET)
            lo, up, above, n = _radix_pick(hist, sh, lo, up, above, KEEP)
            it += 1
        keep = x >= lo
        p = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.debug_barrier()  # every thread has read the row
        tl.store(row_ptr + p, x, mask=keep)
    else:
        n = cnt * 0
        mx = tl.full([], SENT, tl.int64)
        for b0 in range(0, cnt, RB):
            x = tl.load(row_ptr + b0 + i, mask=b0 + i < cnt, other=SENT)
            n += tl.sum((x >= tau).to(tl.int32), axis=0)
            mx = tl.maximum(mx, tl.max(x, axis=0))
        lo = tau
        up = mx + 1
        above = n * 0
        it = 0
        while (n > TARGET) & (it < 9):
            hist = tl.zeros([256], tl.int32)
            sh = it * 0
            for b0 in range(0, cnt, RB):
                x = tl.load(row_ptr + b0 + i, mask=b0 + i < cnt, other=SENT)
                h, sh = _radix_cut(x, lo, up, above, n, KEEP, TARGET)
                hist += h
            lo, up, above, n = _radix_pick(hist, sh, lo, up, above, KEEP)
            it += 1
        base = cnt * 0
        for b0 in range(0, cnt, RB):
            x = tl.load(row_ptr + b0 + i, mask=b0 + i < cnt, other=SENT)
            keep = x >= lo
            p = base + tl.cumsum(keep.to(tl.int32), axis=0) - 1  # <= b0 + i: never past what was read
            tl.debug_barrier()  # every thread has read this block
            tl.store(row_ptr + p, x, mask=keep)
            base += tl.sum(keep.to(tl.int32), axis=0)
    tl.debug_barrier()
    return lo, n


@triton.jit
def _push(row_ptr, x, tau, cnt, KP: tl.constexpr, CAP: tl.constexpr):
    """Append the keys of block ``x`` (1-D, SENT = none, at most CAP - 2*KP) that pass ``tau``."""
    surv = x >= tau
    ns = tl.sum(surv.to(tl.int32), axis=0)
    if cnt + ns > CAP:
        tau, cnt = _compact(row_ptr, cnt, tau, KP, 2 * KP, CAP)
        surv = x >= tau
        ns = tl.sum(surv.to(tl.int32), axis=0)
    p = cnt + tl.cumsum(surv.to(tl.int32), axis=0) - 1
    tl.store(row_ptr + p, x, mask=surv)
    return tau, cnt + ns


@triton.jit
def _finalize(row_ptr, cnt, tau, KP: tl.constexpr, CAP: tl.constexpr):
    """The KP largest keys of the row (SENT padded), sorted descending."""
    tau, n = _compact(row_ptr, cnt, tau, KP, KP, CAP)
    k = tl.arange(0, KP)
    x = tl.load(row_ptr + k, mask=k < n, other=SENT)
    return tl.sort(x, descending=True)


@triton.jit
def _write_final(top, r, seq, idx_ptr, len_ptr, rows_ptr, kvbt_ptr, T, topk, kv_B, kv_max_pages, kv_page_size,
                 KP: tl.constexpr, HAS_KV: tl.constexpr):
    """idx[r, :topk] = entry ids of ``top`` (sorted keys, SENT = none; -1 past the valid ones), len[r],
    rows[r] = physical rows of the main KV cache."""
    kk = tl.arange(0, KP)
    valid = (top != SENT) & (kk < topk)
    idx = tl.where(valid, 0xFFFFFFFF - (top & 0xFFFFFFFF), -1).to(tl.int32)
    ok_r = r < T
    omask = (kk < topk) & ok_r
    r64 = r.to(tl.int64)
    tl.store(idx_ptr + r64 * topk + kk, idx, mask=omask)
    tl.store(len_ptr + r, tl.sum(valid.to(tl.int32), axis=0), mask=ok_r)
    if HAS_KV:
        pidx = tl.where(valid, idx // kv_page_size, 0)
        ok = valid & (pidx < kv_max_pages) & (seq >= 0) & (seq < kv_B)
        page = tl.load(kvbt_ptr + seq.to(tl.int64) * kv_max_pages + pidx, mask=ok, other=-1)
        ok = ok & (page >= 0)
        row = tl.where(ok, page * kv_page_size + (idx - pidx * kv_page_size), -1)
        tl.store(rows_ptr + r64 * topk + kk, row.to(tl.int32), mask=omask)


# ----------------------------------------------------------------------------- scoring (+ local top-k)
@triton.jit
def _tile_page(bt_row, t0, t_hi, seq_ok, max_pages, PS: tl.constexpr):
    """Physical page of the tile at t0 (PAGE_TILE: one page per tile), -1 when there is none to read."""
    pidx = t0 // PS
    return tl.load(bt_row + pidx, mask=seq_ok & (pidx < max_pages) & (t0 < t_hi), other=-1)


@triton.jit
def _load_keys(cache_ptr, cache32_ptr, bt_row, page, t0, t_hi, seq_ok, max_pages, num_pages, page_bytes, page_words,
               page_size, BN: tl.constexpr, FP8KEYS: tl.constexpr, PAGE_TILE: tl.constexpr, PS: tl.constexpr):
    """Raw bytes [BN, 64 or 128] and scale words [BN] of entries [t0, t0 + BN), and which are present
    (t < t_hi, page allocated). PAGE_TILE: the tile lies inside one page (page_size % BN == 0,
    t0 % BN == 0), ``page`` (from ``_tile_page``), read whole; else one lookup per entry and masked loads
    (nothing but present entries is read)."""
    RB: tl.constexpr = 128 if FP8KEYS else 64  # data bytes per key
    t = t0 + tl.arange(0, BN)
    if PAGE_TILE:
        # the whole tile lies in one page: read it unmasked from that page (page 0 when there is none:
        # in bounds either way; rows past t_hi or of a missing page are just not visible)
        ok = (page >= 0) & (page < num_pages)
        present = (t < t_hi) & ok
        pc = tl.where(ok, page, 0).to(tl.int64)
        off0 = t0 % PS
        dbase = pc * page_bytes + off0 * RB  # scalar
        sbase = pc * page_words + PS * (RB // 4) + off0
        d = tl.arange(0, RB)
        kb = tl.load(cache_ptr + dbase + (tl.arange(0, BN) * RB)[:, None] + d[None, :])
        sw = tl.load(cache32_ptr + sbase + tl.arange(0, BN))
    else:
        pidx = t // page_size
        off = t - pidx * page_size
        tm = (t < t_hi) & seq_ok & (pidx < max_pages)
        pg = tl.load(bt_row + pidx, mask=tm, other=-1)
        present = tm & (pg >= 0) & (pg < num_pages)
        d = tl.arange(0, RB)
        kb = tl.load(cache_ptr + (pg.to(tl.int64) * page_bytes + off * RB)[:, None] + d[None, :],
                     mask=present[:, None], other=0)
        sw = tl.load(cache32_ptr + pg.to(tl.int64) * page_words + page_size * (RB // 4) + off, mask=present,
                     other=0 if FP8KEYS else 0x7F7F7F7F)  # absent FP4 keys decode to finite zeros
    return kb, sw, present


@triton.jit
def _tau_score(tau):
    """The smallest fp32 score whose ordering keys can reach ``tau`` (-inf below every score)."""
    hi = (tau >> 32).to(tl.int32)
    bits = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    return tl.where(hi < -2139095041, float("-inf"), bits.to(tl.float32, bitcast=True))  # skey(-inf)


@triton.jit
def _tile_scores(kb, sw, qa, qe, qo, weff, BN: tl.constexpr, BQ: tl.constexpr, H: tl.constexpr,
                 FP8KEYS: tl.constexpr, MMA: tl.constexpr):
    """Scores [BN, BQ] of one key tile (module doc for the factorisation)."""
    if FP8KEYS:
        if MMA == 2:
            acc = tl.dot(kb.to(tl.float8e4nv, bitcast=True), tl.trans(qa))
        elif MMA == 1:
            acc = tl.dot(_e4m3_vals(kb.to(tl.int32)).to(tl.bfloat16), tl.trans(qa))
        else:
            acc = tl.dot(_e4m3_vals(kb.to(tl.int32)), tl.trans(qa), input_precision="ieee")
        kscale = sw.to(tl.float32, bitcast=True)
        nan_key = kscale != kscale
    else:
        b0 = sw & 0xFF
        b1 = (sw >> 8) & 0xFF
        b2 = (sw >> 16) & 0xFF
        b3 = (sw >> 24) & 0xFF
        mx = tl.maximum(tl.maximum(b0, b1), tl.maximum(b2, b3))  # the key's largest block exponent
        nan_key = mx == 255  # an e8m0 NaN scale makes the key's score NaN, as in the reference
        # byte k of the key lies in block k // 16: its e8m0 exponent, per element (the same for the 16
        # consecutive bytes a thread holds, so the compiler computes it once per block)
        eb = (sw[:, None] >> ((tl.arange(0, 64) // 16) * 8)[None, :]) & 0xFF
        s = 6 - (mx[:, None] - eb)  # block b as e2m1 * 2^s: the largest block at 2^6
        if MMA == 2:
            lut_lo, lut_hi = _e4m3_lut(s)
            klo, khi = tl.inline_asm_elementwise(
                _FP4_E4M3_ASM, "=r,=r,r,r,r,r,r,r,r,r,r", [kb, lut_lo, lut_hi],
                dtype=(tl.float8e4nv, tl.float8e4nv), is_pure=True, pack=4)
            acc = tl.dot(klo, tl.trans(qe))
            acc = tl.dot(khi, tl.trans(qo), acc)
        else:
            c = kb.to(tl.int32)
            lo = _e2m1_scaled(c & 15, s)
            hi = _e2m1_scaled(c >> 4, s)
            if MMA == 1:
                acc = tl.dot(lo.to(tl.bfloat16), tl.trans(qe))
                acc = tl.dot(hi.to(tl.bfloat16), tl.trans(qo), acc)
            else:
                acc = tl.dot(lo, tl.trans(qe), input_precision="ieee")
                acc = tl.dot(hi, tl.trans(qo), acc, input_precision="ieee")
        # 2^(mx - 133): the key's powers of two (largest block scale, e2m1 offset 2^6)
        kscale = tl.where(mx >= 7, exp2_int(tl.minimum(tl.maximum(mx - 6, 1), 254)),
                          exp2_int(tl.maximum(mx + 20, 1)) * (2.0 ** -26))
    # relu that keeps NaN (the reference's torch.relu): the default maximum lowers to max.f32 on the
    # GPU, which returns 0 for a NaN input (the interpreter keeps NaN)
    p = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL) * weff[None, :]
    if BQ == 1:
        sc = tl.sum(p, axis=1) * kscale  # [BN]
        return tl.where(nan_key, float("nan"), sc)
    else:
        sc = tl.sum(tl.reshape(p, [BN, BQ, H]), axis=2) * kscale[:, None]
        return tl.where(nan_key[:, None], float("nan"), sc)


@triton.jit
def _tile(kb, sw, present, t0, t_hi, qa, qe, qo, weff, lim, in_run, rq, tau_f, out_ptr, ws_ptr, n_entries,
          BN: tl.constexpr, BQ: tl.constexpr, H: tl.constexpr, FP8KEYS: tl.constexpr, LOGITS: tl.constexpr,
          WS: tl.constexpr, MMA: tl.constexpr):
    """Score one tile ([BN] for one query, else [BN, BQ]) and store it (LOGITS, WS). Returns the scores
    (NaN -> -inf), visibility, and which reach the threshold ``tau_f`` of the selector (a superset of
    the exact test on the ordering keys, done only where this is not empty)."""
    sc = _tile_scores(kb, sw, qa, qe, qo, weff, BN, BQ, H, FP8KEYS, MMA)
    t = t0 + tl.arange(0, BN)
    if BQ == 1:
        vis = present & (t < lim) & in_run
        omask = in_run & (t < t_hi)
        optr = rq * n_entries + t
        thr = tau_f
    else:
        vis = in_run[None, :] & present[:, None] & (t[:, None] < lim[None, :])
        omask = in_run[None, :] & (t < t_hi)[:, None]
        optr = rq[None, :] * n_entries + t[:, None]
        thr = tau_f[None, :]
    if LOGITS:
        tl.store(out_ptr + optr, tl.where(vis, sc, float("-inf")), mask=omask)
    elif WS:
        tl.store(ws_ptr + optr, tl.where(vis, _skey(sc), I32_MIN), mask=omask)
    sc = tl.where(sc != sc, float("-inf"), sc)
    return sc, vis, vis & (sc >= thr)


@triton.jit
def _tile_push(sc, vis, t0, tau, tau_f, cnt, row0, BN: tl.constexpr, BQ: tl.constexpr, M: tl.constexpr,
               CAP: tl.constexpr):
    """Append the tile's keys that pass the exact threshold to the query rows (compacting a row first
    when it would overflow)."""
    t = t0 + tl.arange(0, BN)
    if BQ == 1:
        key = tl.where(vis, _pack(_skey(sc), t), SENT)
        surv = key >= tau
        ns = tl.sum(surv.to(tl.int32), axis=0)
        if cnt + ns > CAP:
            tau, cnt = _compact(row0, cnt, tau, M, 2 * M, CAP)
            tau_f = _tau_score(tau)
            surv = key >= tau
            ns = tl.sum(surv.to(tl.int32), axis=0)
        p = cnt + tl.cumsum(surv.to(tl.int32), axis=0) - 1
        tl.store(row0 + p, key, mask=surv)
        cnt += ns
    else:
        ar = tl.arange(0, BQ)
        key = tl.where(vis, _pack(_skey(sc), t[:, None]), SENT)
        surv = key >= tau[None, :]
        ns = tl.sum(surv.to(tl.int32), axis=0)
        if tl.max(cnt + ns, axis=0) > CAP:
            for j in tl.static_range(BQ):
                cj = tl.sum(tl.where(ar == j, cnt, 0), axis=0)
                tj = tl.max(tl.where(ar == j, tau, SENT), axis=0)
                nj = tl.sum(tl.where(ar == j, ns, 0), axis=0)
                if cj + nj > CAP:
                    tj, cj = _compact(row0 + j * CAP, cj, tj, M, 2 * M, CAP)
                tau = tl.where(ar == j, tj, tau)
                cnt = tl.where(ar == j, cj, cnt)
            tau_f = _tau_score(tau)
            surv = key >= tau[None, :]
            ns = tl.sum(surv.to(tl.int32), axis=0)
        p = cnt[None, :] + tl.cumsum(surv.to(tl.int32), axis=0) - 1
        tl.store(row0 + (ar * CAP)[None, :] + p, key, mask=surv)
        cnt += ns
    return tau, tau_f, cnt


@triton.jit
def _score_kernel(q_ptr, w_ptr, cache_ptr, cache32_ptr, bt_ptr, seq_ptr, pos_ptr,
                  out_ptr, ws_ptr, buf_ptr, idx_ptr, len_ptr, rows_ptr, kvbt_ptr,
                  T, B, max_pages, num_pages, page_bytes, page_words, page_size, n_entries, n_splits, chunk,
                  topk, kv_B, kv_max_pages, kv_page_size,
                  H: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, M: tl.constexpr, CAP: tl.constexpr,
                  FP8KEYS: tl.constexpr, LOGITS: tl.constexpr, WS: tl.constexpr, FINAL: tl.constexpr,
                  HAS_KV: tl.constexpr, MMA: tl.constexpr, PAGE_TILE: tl.constexpr, PS: tl.constexpr):
    """I[tok, t] = sum_h relu(q[tok, h] . K[seq[tok], t]) * w[tok, h] for t in this program's chunk.

    visible(tok, t) = t < clamp((pos[tok] + 1) // 4, 0, n_entries), 0 <= seq < B, and the page
    bt[seq, t // page_size] in [0, num_pages) (no other page is read). Program (pid_q, pid_s) owns
    query tokens [pid_q*BQ, +BQ) and entries [pid_s*chunk, +chunk).
    LOGITS: out[tok, t] = I or -inf. Else: out[tok, pid_s, :M] = the M largest ordering keys of the
    chunk, sorted (SENT padded); FINAL (one chunk, M = KP): indices, lengths, rows instead;
    WS: ws[tok, t] = monotone int32 of I (I32_MIN where invisible) as well."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    q0 = pid_q * BQ
    ar = tl.arange(0, BQ)
    rq = q0 + ar
    rmask = rq < T
    seq = tl.load(seq_ptr + rq, mask=rmask, other=-1).to(tl.int64)
    pos = tl.load(pos_ptr + rq, mask=rmask, other=-1).to(tl.int64)
    lim = tl.minimum(tl.maximum((pos + 1) // 4, 0), n_entries).to(tl.int32)
    lim = tl.where(rmask & (seq >= 0) & (seq < B), lim, 0)
    c_lo = pid_s * chunk
    c_hi = tl.minimum(c_lo + chunk, n_entries)
    if LOGITS or FINAL:
        active = c_lo >= 0  # logits: every column is written; final: the outputs always are
    else:
        active = tl.max(lim, axis=0) > c_lo
    if active:
        # q operand: [BQ*H, 128] scaled per head by 2^(7 - E_h) (E_h = exponent of the head's max |q|)
        m = tl.arange(0, BQ * H)
        tok = q0 + m // H
        head = m % H
        mmask = tok < T
        d = tl.arange(0, 128)
        qf = tl.load(q_ptr + (tok.to(tl.int64) * H + head)[:, None] * 128 + d[None, :], mask=mmask[:, None],
                     other=0.0).to(tl.float32)
        qmax = tl.max(tl.abs(qf), axis=1)
        qexp = ((qmax.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
        qexp = tl.minimum(tl.maximum(qexp, -100), 100)
        qf = qf * exp2_int(134 - qexp)[:, None]  # |q| < 2^8: fits e4m3
        w = tl.load(w_ptr + tok.to(tl.int64) * H + head, mask=mmask, other=0.0).to(tl.float32)
        weff = w * exp2_int(qexp + 120)  # w * 2^(E_h - 7)
        if MMA == 2:
            qa = qf.to(tl.float8e4nv)
        elif MMA == 1:
            qa = qf.to(tl.bfloat16)
        else:
            qa = qf
        if FP8KEYS:
            qe = qa
            qo = qa
        else:
            qe, qo = tl.split(tl.reshape(qa, [BQ * H, 64, 2]))  # element 2k pairs with the low nibble of byte k

        if BQ == 1:
            tau = tl.full([], TAU0, tl.int64)
            cnt = tl.full([], 0, tl.int32)
            lim_v = tl.sum(lim, axis=0)
            rq_v = tl.sum(rq, axis=0).to(tl.int64)
        else:
            tau = tl.full([BQ], TAU0, tl.int64)
            cnt = tl.zeros([BQ], tl.int32)
            lim_v = lim
            rq_v = rq.to(tl.int64)
        tau_f = _tau_score(tau)
        row0 = buf_ptr + ((pid_q * n_splits + pid_s) * BQ).to(tl.int64) * CAP
        # the rows of a query block may belong to several sequences: one pass per run of equal ids
        for r in range(0, BQ):
            qi = q0 + r
            seq_r = tl.load(seq_ptr + qi, mask=qi < T, other=-1).to(tl.int64)
            prev = tl.load(seq_ptr + qi - 1, mask=(r > 0) & (qi < T), other=-1).to(tl.int64)
            start = (qi < T) & ((r == 0) | (seq_r != prev))
            in_run = rmask & (seq == seq_r)
            if LOGITS:
                t_hi = c_hi
            else:
                t_hi = tl.minimum(c_hi, tl.max(tl.where(in_run, lim, 0), axis=0))
            t_hi = tl.where(start, t_hi, c_lo)
            seq_ok = (seq_r >= 0) & (seq_r < B)
            bt_row = bt_ptr + tl.where(seq_ok, seq_r, 0) * max_pages
            if BQ == 1:
                in_run_v = tl.max(in_run.to(tl.int32), axis=0) > 0
            else:
                in_run_v = in_run
            # two tiles per trip, both loaded first: the second is in flight while the first is scored;
            # PAGE_TILE: the block-table reads of the next trip are issued one trip ahead
            pg0 = tl.full([], -1, tl.int32)
            pg1 = tl.full([], -1, tl.int32)
            if PAGE_TILE:
                pg0 = _tile_page(bt_row, c_lo, t_hi, seq_ok, max_pages, PS)
                pg1 = _tile_page(bt_row, c_lo + BN, t_hi, seq_ok, max_pages, PS)
            for t0 in range(c_lo, t_hi, 2 * BN):
                kb0, sw0, pr0 = _load_keys(cache_ptr, cache32_ptr, bt_row, pg0, t0, t_hi, seq_ok, max_pages,
                                           num_pages, page_bytes, page_words, page_size, BN, FP8KEYS, PAGE_TILE, PS)
                kb1, sw1, pr1 = _load_keys(cache_ptr, cache32_ptr, bt_row, pg1, t0 + BN, t_hi, seq_ok, max_pages,
                                           num_pages, page_bytes, page_words, page_size, BN, FP8KEYS, PAGE_TILE, PS)
                if PAGE_TILE:
                    pg0 = _tile_page(bt_row, t0 + 2 * BN, t_hi, seq_ok, max_pages, PS)
                    pg1 = _tile_page(bt_row, t0 + 3 * BN, t_hi, seq_ok, max_pages, PS)
                sc0, vis0, hit0 = _tile(kb0, sw0, pr0, t0, t_hi, qa, qe, qo, weff, lim_v, in_run_v, rq_v, tau_f,
                                        out_ptr, ws_ptr, n_entries, BN, BQ, H, FP8KEYS, LOGITS, WS, MMA)
                sc1, vis1, hit1 = _tile(kb1, sw1, pr1, t0 + BN, t_hi, qa, qe, qo, weff, lim_v, in_run_v, rq_v, tau_f,
                                        out_ptr, ws_ptr, n_entries, BN, BQ, H, FP8KEYS, LOGITS, WS, MMA)
                if not LOGITS:
                    # one CTA-wide test for both tiles; keys are packed and appended only past it
                    hit = (hit0 | hit1).to(tl.int32)
                    if BQ > 1:
                        hit = tl.max(hit, axis=1)
                    if tl.max(hit, axis=0) > 0:
                        tau, tau_f, cnt = _tile_push(sc0, vis0, t0, tau, tau_f, cnt, row0, BN, BQ, M, CAP)
                        tau, tau_f, cnt = _tile_push(sc1, vis1, t0 + BN, tau, tau_f, cnt, row0, BN, BQ, M, CAP)
        if not LOGITS:
            kk = tl.arange(0, M)
            for j in tl.static_range(BQ):
                if BQ == 1:
                    cj = cnt
                    tj = tau
                else:
                    cj = tl.sum(tl.where(ar == j, cnt, 0), axis=0)
                    tj = tl.max(tl.where(ar == j, tau, SENT), axis=0)
                top = _finalize(row0 + j * CAP, cj, tj, M, CAP)
                rj = q0 + j
                if FINAL:
                    sj = tl.sum(tl.where(ar == j, seq, 0), axis=0)
                    _write_final(top, rj, sj, idx_ptr, len_ptr, rows_ptr, kvbt_ptr, T, topk, kv_B, kv_max_pages,
                                 kv_page_size, M, HAS_KV)
                else:
                    tl.store(out_ptr + (rj.to(tl.int64) * n_splits + pid_s) * M + kk, top, mask=(kk >= 0) & (rj < T))


# ----------------------------------------------------------------------------- merge of the chunk lists
@triton.jit
def _merge_kernel(lists_ptr, ws_ptr, buf_ptr, idx_ptr, len_ptr, rows_ptr, seq_ptr, pos_ptr, kvbt_ptr,
                  T, B, n_entries, n_splits, chunk, topk, kv_B, kv_max_pages, kv_page_size,
                  M: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, CB: tl.constexpr, SP: tl.constexpr,
                  RESCAN: tl.constexpr, HAS_KV: tl.constexpr):
    """Top-KP of query r from its chunk lists (list s exists iff s * chunk < limit).

    The lists are read column by column (the j-th key of every list, then the (j+1)-th, ...): they are
    sorted, so once a whole column block lies below the selector's threshold every later one does too,
    and the scan stops (usually after a few columns). RESCAN (M < KP): a full list whose last key beats
    the union's KP-th key may hide more winners: the rest of that chunk (keys below its last listed
    one) is read back from the score workspace."""
    SB: tl.constexpr = SP if SP < CB else CB  # lists per block
    CJ: tl.constexpr = CB // SB  # columns per block
    r = tl.program_id(0)
    seq = tl.load(seq_ptr + r).to(tl.int64)
    pos = tl.load(pos_ptr + r).to(tl.int64)
    lim = tl.minimum(tl.maximum((pos + 1) // 4, 0), n_entries).to(tl.int32)
    lim = tl.where((seq >= 0) & (seq < B), lim, 0)
    n_lists = (lim + chunk - 1) // chunk
    row = buf_ptr + r.to(tl.int64) * CAP
    base = lists_ptr + r.to(tl.int64) * n_splits * M
    tau = tl.full([], TAU0, tl.int64)
    cnt = tl.full([], 0, tl.int32)
    cj = tl.arange(0, CJ)
    sb = tl.arange(0, SB)
    c0 = 0
    go = n_lists > 0
    while go & (c0 < M):
        c = c0 + cj
        top_of_block = tl.full([], SENT, tl.int64)
        for s0 in range(0, n_lists, SB):
            s = s0 + sb
            x = tl.load(base + (s * M)[None, :] + c[:, None], mask=(s < n_lists)[None, :] & (c < M)[:, None],
                        other=SENT)
            x = tl.reshape(x, [CJ * SB])
            tau, cnt = _push(row, x, tau, cnt, KP, CAP)
            top_of_block = tl.maximum(top_of_block, tl.max(x, axis=0))
        go = top_of_block >= tau  # else every later column is below the threshold as well
        c0 += CJ
    if RESCAN:
        tau, cnt = _compact(row, cnt, tau, KP, KP, CAP)  # tau = the union's KP-th key (or TAU0 if fewer)
        s = tl.arange(0, SP)
        last = tl.load(base + s * M + (M - 1), mask=s < n_lists, other=SENT)
        sat = (last != SENT) & (last > tau)
        nxt = tl.min(tl.where(sat, s, SP), axis=0)
        i = tl.arange(0, CB)
        while nxt < SP:
            lo = nxt * chunk
            hi = tl.minimum(lo + chunk, lim)
            bound = tl.max(tl.where(s == nxt, last, SENT), axis=0)
            for t0 in range(lo, hi, CB):
                t = t0 + i
                sk = tl.load(ws_ptr + r.to(tl.int64) * n_entries + t, mask=t < hi, other=I32_MIN)
                x = tl.where(sk != I32_MIN, _pack(sk, t), SENT)
                x = tl.where(x < bound, x, SENT)  # the listed keys are in already
                tau, cnt = _push(row, x, tau, cnt, KP, CAP)
            nxt = tl.min(tl.where(sat & (s > nxt), s, SP), axis=0)
    top = _finalize(row, cnt, tau, KP, CAP)
    _write_final(top, r, seq, idx_ptr, len_ptr, rows_ptr, kvbt_ptr, T, topk, kv_B, kv_max_pages, kv_page_size,
                 KP, HAS_KV)


# ----------------------------------------------------------------------------- launchers
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _mma_kind(logits: bool, mma=None) -> int:
    """0: fp32 (interpreter), 1: bf16 (exact; the logits op, ``mma="bf16"`` or V4K_INDEXER_MMA=bf16),
    2: fp8 (top-k on the GPU)."""
    if _interpret():
        return 0
    want = mma or os.environ.get("V4K_INDEXER_MMA", "fp8")
    if want not in ("fp8", "bf16"):
        raise ValueError(f"mma: expected 'fp8' or 'bf16', got {want!r}")
    return 1 if (logits or want == "bf16") else 2


def _common(q, key_cache, block_table, page_size, n_entries, fmt):
    T, H, _ = q.shape
    max_pages = block_table.shape[1]
    n = max_pages * page_size if n_entries < 0 else n_entries
    cache = key_cache.contiguous()
    # int32/fp32 view for the scale words (pages are 576-byte multiples, so 4-byte aligned)
    cache32 = cache.view(torch.float32 if fmt == "idx_fp8" else torch.int32)
    return T, H, n, cache, cache32


def _page_tile(cache, page_size, bn):
    """A key tile lies inside one page (and page 0 exists to read in place of a missing one)."""
    return page_size % bn == 0 and cache.shape[0] > 0


def _num_warps(bn, n_cols):
    return 8 if bn * n_cols >= 128 * 128 else 4


def indexer_logits(q, weights, key_cache, block_table, seq_ids, positions, page_size, n_entries=-1, fmt="idx_fp4",
                   *, block_q=None, block_n=None, chunk=None):
    T, H, n, cache, cache32 = _common(q, key_cache, block_table, page_size, n_entries, fmt)
    out = torch.empty((T, n), dtype=torch.float32, device=q.device)
    if T == 0 or n == 0:
        return out
    interp = _interpret()
    bn = block_n or (16 if interp else 64)
    bq = block_q or (4 if interp else (1 if H > 64 or T < 512 else 2))
    ch = chunk or (bn * 4 if interp else 1024)
    ch = triton.cdiv(ch, bn) * bn
    splits = triton.cdiv(n, ch)
    dummy = torch.empty(1, dtype=torch.int64, device=q.device)
    _score_kernel[(triton.cdiv(T, bq), splits)](
        q.contiguous(), weights.contiguous(), cache, cache32, block_table.contiguous(), seq_ids.contiguous(),
        positions.contiguous(), out, dummy, dummy, dummy, dummy, dummy, dummy,
        T, block_table.shape[0], block_table.shape[1], cache.shape[0], cache.shape[1], cache.shape[1] // 4,
        page_size, n, splits, ch, 1, 1, 1, 1,
        H=H, BQ=bq, BN=bn, M=32, CAP=128, FP8KEYS=fmt == "idx_fp8", LOGITS=True, WS=False, FINAL=False,
        HAS_KV=False, MMA=_mma_kind(True), PAGE_TILE=_page_tile(cache, page_size, bn),
        PS=page_size if _page_tile(cache, page_size, bn) else 1, num_warps=_num_warps(bn, bq * H),
    )
    return out


def plan_topk(T, H, n, topk, device, *, fmt="idx_fp4", block_q=None, block_n=None, chunk=None, list_len=None):
    """Launch plan of :func:`indexer_topk` (dict): tile sizes, chunking, list length, buffer sizes.

    Programs: one per (query block, chunk of entries). Decode batches get as many chunks per query as
    fill the resident slots once (3 programs per SM for the FP4 decode kernel, which is capped at 168
    registers, else 2), so there is no partial second wave; prefill has enough query blocks and one
    chunk. A chunk keeps its top-M candidates: M = the full top-k (rounded up to a power of two) when
    chunks are long, else ~4x the expected winners per chunk (at least 16) plus the score workspace."""
    interp = _interpret()
    kp = max(_next_pow2(topk), MIN_LIST)
    bn = block_n or (16 if interp else 64)
    bq = block_q or (1 if (interp or H > 64 or T < 512) else 2)
    n_qb = triton.cdiv(T, bq)
    capped = not interp and bq == 1 and H <= 64 and fmt == "idx_fp4"
    if chunk is None:
        slots = (3 if capped else 2) * _num_sms(device) if not interp else 8
        splits = max(1, min(triton.cdiv(max(n, 1), 2 * bn), slots // n_qb))
        chunk = triton.cdiv(max(n, 1), splits)
    chunk = triton.cdiv(max(chunk, 1), 2 * bn) * 2 * bn  # the kernel loads two tiles per trip
    splits = max(1, triton.cdiv(n, chunk))
    if splits == 1:
        m = kp
    elif list_len is not None:
        m = min(_next_pow2(list_len), kp)
    else:
        # ~4x the expected number of winners per chunk; a chunk holding more is re-read (rare)
        m = min(kp, max(MIN_LIST, _next_pow2(triton.cdiv(4 * kp * chunk, max(n, 1)))))
    cap = max(4 * m, _next_pow2(2 * m + bn))
    return dict(KP=kp, BN=bn, BQ=bq, n_qb=n_qb, chunk=chunk, splits=splits, M=m, CAP=cap,
                final=splits == 1 and m == kp, ws=m < kp, CAPF=4 * kp, CB=min(2 * kp, 1024), SP=_next_pow2(splits),
                maxnreg=168 if capped else None)


def indexer_topk(q, weights, key_cache, block_table, seq_ids, positions, topk, page_size, n_entries=-1,
                 fmt="idx_fp4", kv_block_table=None, kv_page_size=0,
                 *, block_q=None, block_n=None, chunk=None, list_len=None, mma=None):
    """Fused scoring + top-k. ``chunk`` (entries per program), ``list_len`` (candidates kept per chunk),
    ``block_q`` and ``block_n`` override the plan (tests use them to force merges and re-reads);
    ``mma`` ("fp8" | "bf16") the multiply of the scores (default: fp8, or V4K_INDEXER_MMA)."""
    T, H, n, cache, cache32 = _common(q, key_cache, block_table, page_size, n_entries, fmt)
    dev = q.device
    idx = torch.empty((T, topk), dtype=torch.int32, device=dev)
    lengths = torch.empty((T,), dtype=torch.int32, device=dev)
    rows = torch.empty((T, topk if kv_block_table is not None else 0), dtype=torch.int32, device=dev)
    if T == 0:
        return idx, lengths, rows
    pl = plan_topk(T, H, n, topk, dev, fmt=fmt, block_q=block_q, block_n=block_n, chunk=chunk, list_len=list_len)
    has_kv = kv_block_table is not None
    kvbt = kv_block_table.contiguous() if has_kv else block_table
    bt = block_table.contiguous()
    seq_c, pos_c = seq_ids.contiguous(), positions.contiguous()
    dummy = torch.empty(1, dtype=torch.int64, device=dev)
    splits, m = pl["splits"], pl["M"]
    lists = dummy if pl["final"] else torch.empty((T, splits, m), dtype=torch.int64, device=dev)
    ws = torch.empty((T, n), dtype=torch.int32, device=dev) if pl["ws"] else dummy
    buf = torch.empty((pl["n_qb"] * splits * pl["BQ"], pl["CAP"]), dtype=torch.int64, device=dev)
    kv_args = (kvbt.shape[0], kvbt.shape[1], max(kv_page_size, 1))
    _score_kernel[(pl["n_qb"], splits)](
        q.contiguous(), weights.contiguous(), cache, cache32, bt, seq_c, pos_c,
        lists, ws, buf, idx, lengths, rows, kvbt,
        T, bt.shape[0], bt.shape[1], cache.shape[0], cache.shape[1], cache.shape[1] // 4, page_size, n, splits,
        pl["chunk"], topk, *kv_args,
        H=H, BQ=pl["BQ"], BN=pl["BN"], M=m, CAP=pl["CAP"], FP8KEYS=fmt == "idx_fp8", LOGITS=False, WS=pl["ws"],
        FINAL=pl["final"], HAS_KV=has_kv, MMA=_mma_kind(False, mma), PAGE_TILE=_page_tile(cache, page_size, pl["BN"]),
        PS=page_size if _page_tile(cache, page_size, pl["BN"]) else 1, num_warps=_num_warps(pl["BN"], pl["BQ"] * H),
        **({"maxnreg": pl["maxnreg"]} if pl["maxnreg"] else {}),
    )
    if not pl["final"]:
        mbuf = torch.empty((T, pl["CAPF"]), dtype=torch.int64, device=dev)
        _merge_kernel[(T,)](
            lists, ws, mbuf, idx, lengths, rows, seq_c, pos_c, kvbt,
            T, bt.shape[0], n, splits, pl["chunk"], topk, *kv_args,
            M=m, KP=pl["KP"], CAP=pl["CAPF"], CB=pl["CB"], SP=pl["SP"], RESCAN=pl["ws"], HAS_KV=has_kv,
            num_warps=4,
        )
    return idx, lengths, rows
