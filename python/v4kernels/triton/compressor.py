"""Triton kernels of the KV compressor (reference: v4kernels/reference/compressor.py, spec §3).

One pass per compressed entry: gather the block's slots (new token rows or compressor state),
per-channel softmax pooling, bf16 cast, RMSNorm, RoPE at position i*r, then either FP8 (KV584) or
Hadamard + FP4 (IDX_FP4) quantization, written straight into the paged cache (or, for the
functional form, the bf16 stored values into a dense output).

Kernels
-------
``_prefill_entries_kernel``  grid (N//r + B,): program p finishes the p-th entry of the ragged batch
                             (sequence-major); it finds its sequence with a cumsum of the per-sequence
                             entry counts ``(start % r + n) // r`` (no host sync).
``_prefill_state_kernel``    grid (B, r): after the entries, program (b, j) updates residue j of
                             sequence b's state (a second launch: the entries read the old state).
``_decode_kernel``           grid (B,): one token per sequence: state write, the entry when the
                             token completes a block (same pooling code as the prefill, so decode and
                             prefill agree bit for bit), and the overlap shift; one launch per batch.

Exactness: every rounding step (bf16, e4m3, e2m1, ue8m0) uses exact integer helpers, the Hadamard
follows the reference's butterfly order, RoPE and the norm use the reference's operation order, so
the only source of difference from the reference is fp32 exp/summation order inside the pooling and
the norm (a few fp32 ulp), which flips a bf16/e4m3 rounding only rarely.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import formats
from ..reference.compressor import dims
from ._common import e4m3_bits, exp2_int, round_bf16, round_e4m3, ue8m0_exponent


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _load_slots(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, tok_row, n_tok, st_row, j, ch_off, from_tok,
                ok, ch, CW: tl.constexpr):
    """kv/score of a tile of slots [S, HD]: token rows (score + ape[j]) or state rows (score already
    holds ape); slots with ``ok`` False are absent (kv 0, score -inf)."""
    tok_ok = ok & from_tok & (tok_row >= 0) & (tok_row < n_tok)
    st_ok = ok & (from_tok == 0)
    col = (ch_off[:, None] + ch[None, :])
    t_off = tok_row.to(tl.int64)[:, None] * CW + col
    s_off = st_row.to(tl.int64)[:, None] * CW + col
    kv_t = tl.load(kv_ptr + t_off, mask=tok_ok[:, None], other=0.0)
    sc_t = tl.load(sc_ptr + t_off, mask=tok_ok[:, None], other=0.0)
    ap = tl.load(ape_ptr + j[:, None] * CW + col, mask=tok_ok[:, None], other=0.0)
    kv_s = tl.load(skv_ptr + s_off, mask=st_ok[:, None], other=0.0)
    sc_s = tl.load(ssc_ptr + s_off, mask=st_ok[:, None], other=float("-inf"))
    kv = tl.where(tok_ok[:, None], kv_t, kv_s)
    sc = tl.where(tok_ok[:, None], sc_t + ap, sc_s)
    sc = tl.where((tok_ok | st_ok)[:, None], sc, float("-inf"))
    return kv, sc


@triton.jit
def _pool(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, row0, n_tok, start, i, slot,
          HD: tl.constexpr, R: tl.constexpr, OVERLAP: tl.constexpr, CHUNK: tl.constexpr):
    """Pooled fp32 e [HD] of entry i (block [i*R, (i+1)*R)) of a sequence whose new tokens start at
    position ``start`` in token row ``row0``; older slots come from state slot ``slot``."""
    ch = tl.arange(0, HD)
    blk0 = start // R
    if OVERLAP:
        C: tl.constexpr = 2
        CW: tl.constexpr = 2 * HD
        s = tl.arange(0, 2 * R)
        cur = s >= R                       # slots R..2R-1: block i, channels [HD, 2HD)
        j = tl.where(cur, s - R, s)
        blk = tl.where(cur, i, i - 1)      # slots 0..R-1: block i-1, channels [0, HD)
        q = blk * R + j
        from_tok = q >= start
        # older slots: block blk0 (pending part) lives in rows R + j, block blk0-1 in rows j
        st_row = slot * (C * R) + tl.where(blk == blk0, R + j, j)
        ok = blk >= 0                      # block 0 has no predecessor
        kv, sc = _load_slots(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, row0 + q - start, n_tok, st_row, j,
                             tl.where(cur, HD, 0), from_tok, ok, ch, CW)
        m = tl.max(sc, axis=0)
        p = tl.exp(sc - m[None, :])
        l = tl.sum(p, axis=0)
        e = tl.sum(p / l[None, :] * kv, axis=0)
    else:
        m = tl.full([HD], float("-inf"), tl.float32)
        l = tl.zeros([HD], tl.float32)
        acc = tl.zeros([HD], tl.float32)
        for c0 in tl.range(0, R, CHUNK):
            j = c0 + tl.arange(0, CHUNK)
            q = i * R + j
            from_tok = q >= start
            ok = j < R
            kv, sc = _load_slots(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, row0 + q - start, n_tok,
                                 slot * R + j, j, j * 0, from_tok, ok, ch, HD)
            m_new = tl.maximum(m, tl.max(sc, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a chunk of absent slots adds nothing
            alpha = tl.exp(m - m_use)
            p = tl.exp(sc - m_use[None, :])
            l = l * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p * kv, axis=0)
            m = m_new
        e = acc / l
    return e


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
    ms = tl.sum(x * x, axis=0) / HD
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
        ex = ue8m0_exponent(tl.div_rn(amax, 6.0))
        sc = exp2_int(ex)
        v = tl.minimum(tl.maximum(tl.div_rn(h2, sc[:, None]), -6.0), 6.0)
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


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _prefill_entries_kernel(kv_ptr, sc_ptr, cu_ptr, start_ptr, slot_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr,
                            cos_ptr, sin_ptr, cache_ptr, cache_bf_ptr, bt_ptr, out_ptr, oseq_ptr, opos_ptr,
                            B, n_tok, num_slots, max_pos, bt_stride, bt_width, num_pages, page_size, page_bytes,
                            HD: tl.constexpr, R: tl.constexpr, OVERLAP: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK_B: tl.constexpr, MAIN: tl.constexpr, WRITE_CACHE: tl.constexpr,
                            EPS: tl.constexpr):
    """Entry p of the ragged batch (sequence-major): e = sum softmax(score + ape) * kv over the block's
    slots, then ``_finish``. Entries of sequence b: blocks start//R ... (start+n)//R - 1."""
    pid = tl.program_id(0)
    bidx = tl.arange(0, BLOCK_B)
    bm = bidx < B
    lo = tl.load(cu_ptr + bidx, mask=bm, other=0)
    hi = tl.load(cu_ptr + bidx + 1, mask=bm, other=0)
    st = tl.load(start_ptr + bidx, mask=bm, other=0)
    sl = tl.load(slot_ptr + bidx, mask=bm, other=-1)
    # a sequence with invalid indices (unchecked on CUDA tensors) emits nothing, as in the reference
    seq_ok = bm & (st >= 0) & (lo >= 0) & (hi >= lo) & (hi <= n_tok) & (sl >= 0) & (sl < num_slots)
    cnt = tl.where(seq_ok, (st % R + hi - lo) // R, 0)
    incl = tl.cumsum(cnt, axis=0)
    total = tl.sum(cnt, axis=0)
    seq = tl.sum((incl <= pid).to(tl.int32), axis=0)
    sel = bidx == seq
    start = tl.sum(tl.where(sel, st, 0), axis=0)
    row0 = tl.sum(tl.where(sel, lo, 0), axis=0)
    first = tl.sum(tl.where(sel, incl - cnt, 0), axis=0)
    i = start // R + (pid - first)
    valid = pid < total
    slot = tl.load(slot_ptr + seq, mask=valid, other=0)
    valid = valid & (slot >= 0) & (slot < num_slots)
    ch = tl.arange(0, HD)
    if valid:
        e = _pool(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, row0, n_tok, start, i, slot, HD, R, OVERLAP, CHUNK)
        _finish(e, seq, i, valid, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr, cache_bf_ptr, bt_ptr, bt_stride,
                bt_width, num_pages, page_size, page_bytes, out_ptr, pid, HD, R, MAIN, WRITE_CACHE, EPS)
        if not WRITE_CACHE:
            tl.store(oseq_ptr + pid, seq)
            tl.store(opos_ptr + pid, i)
    else:
        if not WRITE_CACHE:
            tl.store(out_ptr + pid.to(tl.int64) * HD + ch, tl.zeros([HD], tl.float32))
            tl.store(oseq_ptr + pid, -1)
            tl.store(opos_ptr + pid, -1)


@triton.jit
def _prefill_state_kernel(kv_ptr, sc_ptr, cu_ptr, start_ptr, slot_ptr, skv_ptr, ssc_ptr, ape_ptr,
                          n_tok, num_slots, CW: tl.constexpr, R: tl.constexpr, OVERLAP: tl.constexpr):
    """Residue j of sequence b: row cur+j <- latest new token at a position = j (mod R) (if any);
    overlap and a block completed: row j <- token (end//R - 1)*R + j (new token or old row R+j)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    lo = tl.load(cu_ptr + b)
    hi = tl.load(cu_ptr + b + 1)
    start = tl.load(start_ptr + b)
    slot = tl.load(slot_ptr + b)
    end = start + hi - lo
    ok = (slot >= 0) & (slot < num_slots) & (start >= 0) & (hi >= lo) & (lo >= 0) & (hi <= n_tok)
    cc = tl.arange(0, CW)
    CUR: tl.constexpr = R if OVERLAP else 0
    C: tl.constexpr = 2 if OVERLAP else 1
    srow = slot.to(tl.int64) * (C * R)
    d = end - 1 - j
    qn = end - 1 - (d % R)                       # latest position = j (mod R) below end (if d >= 0)
    has_new = ok & (d >= 0) & (qn >= start)
    ap = tl.load(ape_ptr + j * CW + cc)
    if OVERLAP:
        blk_e = end // R
        qq = (blk_e - 1) * R + j                 # token j of the last complete block
        shift = ok & (blk_e > start // R)
        qq_new = qq >= start
        tok = (lo + qq - start).to(tl.int64) * CW
        old = (srow + R + j) * CW
        pk = tl.where(qq_new, tl.load(kv_ptr + tok + cc, mask=shift & qq_new, other=0.0),
                      tl.load(skv_ptr + old + cc, mask=shift & (qq < start), other=0.0))
        ps = tl.where(qq_new, tl.load(sc_ptr + tok + cc, mask=shift & qq_new, other=0.0) + ap,
                      tl.load(ssc_ptr + old + cc, mask=shift & (qq < start), other=0.0))
        tl.debug_barrier()   # the old row R + j is read before it is overwritten below
        tl.store(skv_ptr + (srow + j) * CW + cc, pk, mask=shift)
        tl.store(ssc_ptr + (srow + j) * CW + cc, ps, mask=shift)
    tok_n = (lo + qn - start).to(tl.int64) * CW
    nk = tl.load(kv_ptr + tok_n + cc, mask=has_new, other=0.0)
    ns = tl.load(sc_ptr + tok_n + cc, mask=has_new, other=0.0) + ap
    tl.store(skv_ptr + (srow + CUR + j) * CW + cc, nk, mask=has_new)
    tl.store(ssc_ptr + (srow + CUR + j) * CW + cc, ns, mask=has_new)


@triton.jit
def _decode_kernel(kv_ptr, sc_ptr, pos_ptr, slot_ptr, skv_ptr, ssc_ptr, ape_ptr, w_ptr, cos_ptr, sin_ptr,
                   cache_ptr, cache_bf_ptr, bt_ptr, B, num_slots, max_pos, bt_stride, bt_width, num_pages,
                   page_size, page_bytes,
                   HD: tl.constexpr, R: tl.constexpr, OVERLAP: tl.constexpr, CHUNK: tl.constexpr,
                   MAIN: tl.constexpr, EPS: tl.constexpr):
    """Token b at position p: state row cur + p%R <- (kv, score + ape[p%R]); if (p+1)%R == 0 emit entry
    p//R (same pooling as the prefill with one new token), and for overlap rows [0,R) <- rows [R,2R)."""
    b = tl.program_id(0)
    p = tl.load(pos_ptr + b)
    slot = tl.load(slot_ptr + b)
    valid = (p >= 0) & (slot >= 0) & (slot < num_slots)
    C: tl.constexpr = 2 if OVERLAP else 1
    CW: tl.constexpr = C * HD
    CUR: tl.constexpr = R if OVERLAP else 0
    j = p % R
    cc = tl.arange(0, CW)
    srow = slot.to(tl.int64) * (C * R)
    if valid:
        i = p // R
        tok_k = tl.load(kv_ptr + b.to(tl.int64) * CW + cc)
        tok_s = tl.load(sc_ptr + b.to(tl.int64) * CW + cc) + tl.load(ape_ptr + j * CW + cc)
        if j == R - 1:
            e = _pool(kv_ptr, sc_ptr, skv_ptr, ssc_ptr, ape_ptr, b, B, p, i, slot, HD, R, OVERLAP, CHUNK)
            if OVERLAP:
                # rows R..2R-2 move to 0..R-2 (row R-1 gets this token, the last of the block)
                rr = tl.arange(0, R)
                mrow = rr < R - 1
                src = (srow + R + rr).to(tl.int64)[:, None] * CW + cc[None, :]
                mk = tl.load(skv_ptr + src, mask=mrow[:, None], other=0.0)
                ms = tl.load(ssc_ptr + src, mask=mrow[:, None], other=0.0)
            tl.debug_barrier()   # every state read above happens before the writes below
            tl.store(skv_ptr + (srow + CUR + j) * CW + cc, tok_k)
            tl.store(ssc_ptr + (srow + CUR + j) * CW + cc, tok_s)
            if OVERLAP:
                dst = (srow + rr).to(tl.int64)[:, None] * CW + cc[None, :]
                tl.store(skv_ptr + dst, mk, mask=mrow[:, None])
                tl.store(ssc_ptr + dst, ms, mask=mrow[:, None])
                tl.store(skv_ptr + (srow + R - 1) * CW + cc, tok_k)
                tl.store(ssc_ptr + (srow + R - 1) * CW + cc, tok_s)
            _finish(e, b, i, valid, w_ptr, cos_ptr, sin_ptr, max_pos, cache_ptr, cache_bf_ptr, bt_ptr, bt_stride,
                    bt_width, num_pages, page_size, page_bytes, cache_bf_ptr, 0, HD, R, MAIN, True, EPS)
        else:
            tl.store(skv_ptr + (srow + CUR + j) * CW + cc, tok_k)
            tl.store(ssc_ptr + (srow + CUR + j) * CW + cc, tok_s)


# ----------------------------------------------------------------------------- launchers
def _cfg(hd, ratio):
    """(num_warps, CHUNK): 8 warps for the 512-d main compressor, 16-slot chunks for ratio 128."""
    return (8 if hd >= 512 else 4), (16 if ratio > 4 else 2 * ratio)


def _bf16_view(cache):
    return cache.view(torch.bfloat16)


def _launch_prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight,
                    cos, sin, ratio, kind, cache, block_table, page_size, out, oseq, opos):
    hd, c, overlap = dims(ratio, kind)
    B = start_pos.shape[0]
    n_tok = kv.shape[0]
    warps, chunk = _cfg(hd, ratio)
    write_cache = cache is not None
    kvc, scc = kv.contiguous(), score.contiguous()
    if write_cache:
        fmt = formats.FORMATS["kv584" if kind == "main" else "idx_fp4"]
        cache_bf = _bf16_view(cache) if kind == "main" else cache
        bt = block_table.contiguous()
        bt_args = (bt, bt.stride(0), bt.shape[1], cache.shape[0], page_size, fmt.page_bytes(page_size))
        outs = (out if out is not None else cache_bf, cu_seqlens, cu_seqlens)
    else:
        cache, cache_bf = out, out
        bt_args = (cu_seqlens, 0, 0, 0, 1, 0)
        outs = (out, oseq, opos)
    if B == 0:
        return
    grid = (n_tok // ratio + B,)
    _prefill_entries_kernel[grid](
        kvc, scc, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight, cos, sin,
        cache, cache_bf, bt_args[0], outs[0], outs[1], outs[2],
        B, n_tok, state_kv.shape[0], cos.shape[0], *bt_args[1:],
        HD=hd, R=ratio, OVERLAP=overlap, CHUNK=chunk, BLOCK_B=max(16, triton.next_power_of_2(B + 1)),
        MAIN=kind == "main", WRITE_CACHE=write_cache, EPS=1e-6, num_warps=warps,
    )
    _prefill_state_kernel[(B, ratio)](
        kvc, scc, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, n_tok, state_kv.shape[0],
        CW=c * hd, R=ratio, OVERLAP=overlap, num_warps=4,
    )


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
    warps, chunk = _cfg(hd, ratio)
    fmt = formats.FORMATS["kv584" if kind == "main" else "idx_fp4"]
    bt = block_table.contiguous()
    _decode_kernel[(B,)](
        kv.contiguous(), score.contiguous(), positions, state_slots, state_kv, state_score, ape, norm_weight,
        cos, sin, cache, _bf16_view(cache) if kind == "main" else cache, bt, B, state_kv.shape[0], cos.shape[0],
        bt.stride(0), bt.shape[1], cache.shape[0], page_size, fmt.page_bytes(page_size),
        HD=hd, R=ratio, OVERLAP=overlap, CHUNK=chunk, MAIN=kind == "main", EPS=1e-6, num_warps=warps,
    )
