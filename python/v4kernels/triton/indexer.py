"""Triton kernels of the lightning indexer (reference: v4kernels/reference/indexer.py, spec §4).

Three kernels:

* ``_prepare_q_kernel``: RoPE (last 64 dims) -> Hadamard 128 (radix-2 butterflies in the
  reference's order) -> FP4 fake-quant; bitwise equal to the reference.
* ``_score_kernel``: scores ``I[t] = sum_h relu(q_h . k_t) * w_h`` over the paged key cache, keys
  decoded from FP4 (or FP8) in registers and multiplied with ``tl.dot`` (bf16 in, fp32 accumulate).
  In LOGITS mode it writes the fp32 scores (-inf where invisible). In top-k mode a program owns
  CHUNK consecutive entries of one query block, keeps their packed (score, index) keys in registers
  and writes only its local top-KP candidates: scores never reach HBM.
* ``_merge_kernel``: merges G candidate lists per query (a tree of launches when there are many),
  the last level writes the indices, the lengths and the physical rows of the main KV cache.

Ordering key: ``(monotone_int32(score) << 32) | (2^32 - 1 - t)`` as int64, sorted descending, so
a higher score wins and, on equal scores, the lower entry index wins (the reference's stable sort).
Invisible entries carry ``SENT`` (below every real key). NaN scores count as -inf, -0.0 as +0.0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import exp2_int, round_bf16, ue8m0_exponent

SENT = tl.constexpr(-9223372036854775807)  # INT64_MIN + 1: below the key of any visible entry (even score -inf)
HEAD_DIM = 128


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
def _prepare_q_kernel(q_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, H, max_pos,
                      R: tl.constexpr, RN: tl.constexpr):
    """out[row] = FP4(Hadamard128(RoPE(q[row], pos[row // H]))) for R rows of 128 (one head each).

    RoPE: pair j of the last 64 dims (a, b) -> (a*c - b*s, a*s + b*c) in fp32, rounded to bf16.
    Hadamard: stages h = 1..64: (u, v) -> (u + v, u - v) on elements i, i + h of each 2h-block,
    then * 128^-0.5, rounded to bf16. FP4: per 32 values s = 2^ceil(log2(max(amax, 6*2^-126) / 6)),
    e2m1 RNE of clamp(x / s, -6, 6), result E2M1 * s (exact in bf16)."""
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    rmask = rows < n_rows
    tok = rows // H
    pos = tl.load(pos_ptr + tok, mask=rmask, other=0).to(tl.int64)
    pok = rmask & (pos >= 0) & (pos < max_pos)  # an out-of-table position is not rotated (never read)
    d = tl.arange(0, 128)
    x = tl.load(q_ptr + rows.to(tl.int64)[:, None] * 128 + d[None, :], mask=rmask[:, None], other=0.0)
    x = x.to(tl.float32)
    a, b = tl.split(tl.reshape(x, [R, 64, 2]))  # pair i = (x[2i], x[2i+1]); pairs 32..63 are the rope dims
    i = tl.arange(0, 64)
    is_rope = i >= 32
    tab = pos[:, None] * 32 + (i - 32)[None, :]
    tmask = pok[:, None] & is_rope[None, :]
    c = tl.load(cos_ptr + tab, mask=tmask, other=1.0)
    s = tl.load(sin_ptr + tab, mask=tmask, other=0.0)
    ar = round_bf16(_mul_rn(a, c, RN) - _mul_rn(b, s, RN))
    br = round_bf16(_mul_rn(a, s, RN) + _mul_rn(b, c, RN))
    a = tl.where(is_rope[None, :], ar, a)
    b = tl.where(is_rope[None, :], br, b)
    x = tl.reshape(tl.join(a, b), [R, 128])
    # Hadamard butterflies, stage by stage in the reference's order
    # (block size 1 << st; no constexpr local: a constexpr name cannot be re-bound per unrolled stage)
    for st in tl.static_range(7):
        y = tl.permute(tl.reshape(x, [R, 64 >> st, 2, 1 << st]), (0, 1, 3, 2))
        u, v = tl.split(y)
        y = tl.permute(tl.join(u + v, u - v), (0, 1, 3, 2))
        x = tl.reshape(y, [R, 128])
    x = round_bf16(x * 0.08838834764831845)
    # FP4 fake-quant, blocks of 32
    xb = tl.reshape(x, [R, 4, 32])
    ax = tl.abs(xb)
    amax = tl.max(ax, axis=2)
    bad = (tl.max((ax != ax).to(tl.int32), axis=2) > 0) | (amax > 3.0e38)
    amax = tl.maximum(amax, 6.0 * 2.0 ** -126)
    e = ue8m0_exponent(tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)))
    e = tl.minimum(tl.maximum(e, 1), 253)
    inv_s = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 2^(127 - e)
    y = tl.minimum(tl.maximum(xb * inv_s[:, :, None], -6.0), 6.0)
    ay = tl.abs(y)
    code = ((ay > 0.25).to(tl.int32) + (ay >= 0.75).to(tl.int32) + (ay > 1.25).to(tl.int32)
            + (ay >= 1.75).to(tl.int32) + (ay > 2.5).to(tl.int32) + (ay >= 3.5).to(tl.int32)
            + (ay > 5.0).to(tl.int32))
    ex = code >> 1
    mant = tl.where(ex > 0, 2 + (code & 1), code & 1).to(tl.float32)
    p2 = tl.where(ex == 0, 0.5, tl.where(ex == 1, 0.5, tl.where(ex == 2, 1.0, 2.0)))
    val = mant * p2 * exp2_int(e)[:, :, None]
    sign = xb.to(tl.uint32, bitcast=True) & 0x80000000
    val = (val.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    val = tl.where(bad[:, :, None], float("nan"), val)
    out = tl.reshape(val, [R, 128])
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * 128 + d[None, :], out.to(tl.bfloat16), mask=rmask[:, None])


def indexer_prepare_q(q: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    T, H, D = q.shape
    qc = q.contiguous()
    out = torch.empty_like(qc)
    n_rows = T * H
    if n_rows:
        R = 16 if _interpret() else 32
        _prepare_q_kernel[(triton.cdiv(n_rows, R),)](
            qc, positions.contiguous(), cos.contiguous(), sin.contiguous(), out, n_rows, H, cos.shape[0],
            R=R, RN=not _interpret(), num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------- key decoding
@triton.jit
def _fp4_vals(c, sc):
    """E2M1 code c (int32 0..15) times 2^(sc - 127) (sc int32 e8m0 in [2, 253]), exact fp32."""
    mag = c & 7
    e = mag >> 1
    mant = tl.where(e > 0, 2 + (mag & 1), mag & 1)
    p2 = ((tl.maximum(e, 1) - 2 + sc).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
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


# ----------------------------------------------------------------------------- scoring (+ local top-k)
@triton.jit
def _score_kernel(q_ptr, w_ptr, cache_ptr, cache32_ptr, bt_ptr, seq_ptr, pos_ptr, out_ptr,
                  T, B, max_pages, num_pages, page_bytes, page_size, n_entries, n_splits,
                  H: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr,
                  KP: tl.constexpr, FP8: tl.constexpr, LOGITS: tl.constexpr, DOT_BF16: tl.constexpr):
    """I[tok, t] = sum_h relu(q[tok, h] . K[seq[tok], t]) * w[tok, h] for t in this program's CHUNK.

    visible(tok, t) = t < clamp((pos[tok] + 1) // 4, 0, n_entries), 0 <= seq < B, and the page
    bt[seq, t // page_size] in [0, num_pages) (no other page is read). Program (pid_q, pid_s) owns
    query tokens [pid_q*BQ, +BQ) and entries [pid_s*CHUNK, +CHUNK). LOGITS: out[tok, t] = I or -inf.
    Otherwise out[tok, pid_s, :KP] = the KP largest ordering keys of the chunk (SENT padded)."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    q0 = pid_q * BQ
    rq = q0 + tl.arange(0, BQ)
    rmask = rq < T
    seq = tl.load(seq_ptr + rq, mask=rmask, other=-1).to(tl.int32)
    pos = tl.load(pos_ptr + rq, mask=rmask, other=-1).to(tl.int32)
    lim = tl.minimum(tl.maximum((pos + 1) // 4, 0), n_entries)
    lim = tl.where(rmask & (seq >= 0) & (seq < B), lim, 0)
    c_lo = pid_s * CHUNK
    c_hi = tl.minimum(c_lo + CHUNK, n_entries)
    active = tl.max(lim, axis=0) > c_lo
    if LOGITS:
        active = c_lo >= 0  # the logits path writes every column, visible or not
    if active:
        # q operand [M = BQ*H, 128] as even / odd halves (element 2k pairs with the low nibble of byte k)
        m = tl.arange(0, BQ * H)
        tok = q0 + m // H
        head = m % H
        mmask = tok < T
        qrow = tok.to(tl.int64) * (H * 128) + head * 128
        d = tl.arange(0, 128)
        d2 = tl.arange(0, 64)
        qf = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=mmask[:, None], other=0.0)
        if not DOT_BF16:
            qf = qf.to(tl.float32)
        qe, qo = tl.split(tl.reshape(qf, [BQ * H, 64, 2]))
        w = tl.load(w_ptr + tok.to(tl.int64) * H + head, mask=mmask, other=0.0).to(tl.float32)
        NT: tl.constexpr = CHUNK // BN
        buf = tl.full([BQ, NT, BN], SENT, tl.int64)
        # the rows of a query block may belong to several sequences: one pass per run of equal ids
        for r in range(0, BQ):
            qi = q0 + r
            seq_r = tl.load(seq_ptr + qi, mask=qi < T, other=-1).to(tl.int32)
            prev = tl.load(seq_ptr + qi - 1, mask=(r > 0) & (qi < T), other=-1).to(tl.int32)
            start = (qi < T) & ((r == 0) | (seq_r != prev))
            in_run = rmask & (seq == seq_r)
            if LOGITS:
                t_hi = c_hi
            else:
                t_hi = tl.minimum(c_hi, tl.max(tl.where(in_run, lim, 0), axis=0))
            t_hi = tl.where(start, t_hi, c_lo)
            seq_ok = (seq_r >= 0) & (seq_r < B)
            bt_row = bt_ptr + seq_r.to(tl.int64) * max_pages
            for t0 in range(c_lo, t_hi, BN):
                t = t0 + tl.arange(0, BN)
                pidx = t // page_size
                off = t - pidx * page_size
                tmask = (t < t_hi) & seq_ok & (pidx < max_pages)
                page = tl.load(bt_row + pidx, mask=tmask, other=-1)
                present = tmask & (page >= 0) & (page < num_pages)
                pbase = page.to(tl.int64) * page_bytes
                if FP8:
                    kb = tl.load(cache_ptr + (pbase + off * 128)[:, None] + d[None, :], mask=present[:, None], other=0)
                    ks = tl.load(cache32_ptr + (pbase + page_size * 128 + off * 4) // 4, mask=present, other=0.0)
                    kv = _e4m3_vals(kb.to(tl.int32)) * ks[:, None]  # e4m3 * 2^k: exact in bf16
                    if DOT_BF16:
                        kv = kv.to(tl.bfloat16)
                    acc = tl.dot(qf, tl.trans(kv))
                else:
                    kb = tl.load(cache_ptr + (pbase + off * 64)[:, None] + d2[None, :], mask=present[:, None], other=0)
                    kb = kb.to(tl.int32)
                    sw = tl.load(cache32_ptr + (pbase + page_size * 64 + off * 4) // 4, mask=present,
                                 other=0x7F7F7F7F)  # absent keys decode to finite zeros
                    sc = (sw[:, None] >> ((d2 // 16) * 8)[None, :]) & 0xFF  # e8m0 of byte k's block (k // 16)
                    lo = _fp4_vals(kb & 15, sc)
                    hi = _fp4_vals(kb >> 4, sc)
                    if DOT_BF16:
                        lo = lo.to(tl.bfloat16)
                        hi = hi.to(tl.bfloat16)
                    acc = tl.dot(qe, tl.trans(lo))
                    acc = tl.dot(qo, tl.trans(hi), acc)
                    # a NaN scale byte (0xFF) makes the key's score NaN, as in the reference
                    nan_key = (((sw & 0xFF) == 0xFF) | (((sw >> 8) & 0xFF) == 0xFF) | (((sw >> 16) & 0xFF) == 0xFF)
                               | (((sw >> 24) & 0xFF) == 0xFF))
                    acc = tl.where(nan_key[None, :], float("nan"), acc)
                # relu that keeps NaN (the reference's torch.relu): the default maximum lowers to
                # max.f32 on the GPU, which returns 0 for a NaN input (the interpreter keeps NaN)
                p = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL) * w[:, None]
                score = tl.sum(tl.reshape(p, [BQ, H, BN]), axis=1)  # [BQ, BN]
                vis = in_run[:, None] & present[None, :] & (t[None, :] < lim[:, None])
                if LOGITS:
                    val = tl.where(vis, score, float("-inf"))
                    optr = out_ptr + rq.to(tl.int64)[:, None] * n_entries + t[None, :]
                    tl.store(optr, val, mask=in_run[:, None] & (t < t_hi)[None, :])
                else:
                    score = tl.where(score != score, float("-inf"), score)
                    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0
                    bits = score.to(tl.int32, bitcast=True)
                    skey = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
                    key = (skey.to(tl.int64) << 32) | ((~t).to(tl.int64) & 0xFFFFFFFF)[None, :]
                    key = tl.where(vis, key, SENT)
                    ti = (t0 - c_lo) // BN
                    sel = (tl.arange(0, NT) == ti)[None, :, None] & in_run[:, None, None]
                    buf = tl.where(sel, key[:, None, :], buf)
        if not LOGITS:
            top = tl.topk(tl.reshape(buf, [BQ, CHUNK]), KP)  # [BQ, KP], descending
            kk = tl.arange(0, KP)
            optr = out_ptr + (rq.to(tl.int64) * n_splits + pid_s)[:, None] * KP + kk[None, :]
            tl.store(optr, top, mask=rmask[:, None])


# ----------------------------------------------------------------------------- candidate merge
@triton.jit
def _merge_kernel(in_ptr, out_ptr, idx_ptr, len_ptr, rows_ptr, seq_ptr, pos_ptr, kvbt_ptr,
                  T, B, n_entries, n_in, n_out, span_in, topk, kv_B, kv_max_pages, kv_page_size,
                  CHUNK: tl.constexpr, G: tl.constexpr, KP: tl.constexpr, RB: tl.constexpr,
                  FINAL: tl.constexpr, HAS_KV: tl.constexpr):
    """Top-KP of lists [g*G, g*G + G) of query tokens [pid*RB, +RB). List j covers span_in chunks of
    CHUNK entries and exists iff j * span_in < ceil(limit / CHUNK) (else it was never written: SENT).
    FINAL: idx[r, :topk] = entry ids (-1 past the valid ones), len[r], rows[r] = kv page rows."""
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    g = tl.program_id(1)
    rmask = r < T
    seq = tl.load(seq_ptr + r, mask=rmask, other=-1).to(tl.int32)
    pos = tl.load(pos_ptr + r, mask=rmask, other=-1).to(tl.int32)
    lim = tl.minimum(tl.maximum((pos + 1) // 4, 0), n_entries)
    lim = tl.where((seq >= 0) & (seq < B), lim, 0)
    nsp = (lim + CHUNK - 1) // CHUNK  # [RB]
    j = g * G + tl.arange(0, G)
    jok = (j < n_in)[None, :] & (j[None, :] * span_in < nsp[:, None])  # [RB, G]
    kk = tl.arange(0, KP)
    ptr = in_ptr + ((r.to(tl.int64) * n_in)[:, None, None] + j[None, :, None]) * KP + kk[None, None, :]
    x = tl.load(ptr, mask=jok[:, :, None], other=SENT)  # [RB, G, KP]
    top = tl.topk(tl.reshape(x, [RB, G * KP]), KP)  # [RB, KP]
    kk2 = kk[None, :]
    r2 = r.to(tl.int64)[:, None]
    if FINAL:
        valid = (top != SENT) & (kk2 < topk)
        idx = tl.where(valid, 0xFFFFFFFF - (top & 0xFFFFFFFF), -1).to(tl.int32)
        omask = rmask[:, None] & (kk2 < topk)
        tl.store(idx_ptr + r2 * topk + kk2, idx, mask=omask)
        tl.store(len_ptr + r, tl.sum(valid.to(tl.int32), axis=1), mask=rmask)
        if HAS_KV:
            pidx = tl.where(valid, idx // kv_page_size, 0)
            ok = valid & (pidx < kv_max_pages) & ((seq >= 0) & (seq < kv_B))[:, None]
            page = tl.load(kvbt_ptr + seq.to(tl.int64)[:, None] * kv_max_pages + pidx, mask=ok, other=-1)
            ok = ok & (page >= 0)
            row = tl.where(ok, page * kv_page_size + (idx - pidx * kv_page_size), -1)
            tl.store(rows_ptr + r2 * topk + kk2, row.to(tl.int32), mask=omask)
    else:
        active = rmask & (g * G * span_in < nsp)
        tl.store(out_ptr + (r2 * n_out + g) * KP + kk2, top, mask=active[:, None] & (kk2 >= 0))


# ----------------------------------------------------------------------------- launchers
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _common(q, key_cache, block_table, page_size, n_entries, fmt):
    T, H, _ = q.shape
    max_pages = block_table.shape[1]
    n = max_pages * page_size if n_entries < 0 else n_entries
    cache = key_cache.contiguous()
    # int32/fp32 view for the scale words (pages are 576-byte multiples, so 4-byte aligned)
    cache32 = cache.view(torch.float32 if fmt == "idx_fp8" else torch.int32)
    return T, H, n, cache, cache32


def _launch_score(q, weights, cache, cache32, block_table, seq_ids, positions, out, T, H, n, page_size,
                  fmt, logits, block_q, chunk, block_n, kp, n_splits):
    interp = _interpret()
    grid = (triton.cdiv(T, block_q), n_splits)
    _score_kernel[grid](
        q.contiguous(), weights.contiguous(), cache, cache32, block_table.contiguous(), seq_ids.contiguous(),
        positions.contiguous(), out, T, block_table.shape[0], block_table.shape[1], cache.shape[0], cache.shape[1],
        page_size, n, n_splits,
        H=H, BQ=block_q, BN=block_n, CHUNK=chunk, KP=kp, FP8=fmt == "idx_fp8", LOGITS=logits,
        DOT_BF16=not interp, num_warps=4 if block_q * H <= 64 else 8,
    )


def indexer_logits(q, weights, key_cache, block_table, seq_ids, positions, page_size, n_entries=-1, fmt="idx_fp4",
                   *, block_q=None, block_n=None, chunk=None):
    T, H, n, cache, cache32 = _common(q, key_cache, block_table, page_size, n_entries, fmt)
    out = torch.empty((T, n), dtype=torch.float32, device=q.device)
    if T == 0 or n == 0:
        return out
    interp = _interpret()
    bn = block_n or (16 if interp else 64)
    bq = block_q or (4 if interp else (1 if H > 64 else (2 if T >= 512 else 1)))
    ch = chunk or (bn * 4 if interp else 1024)
    _launch_score(q, weights, cache, cache32, block_table, seq_ids, positions, out, T, H, n, page_size, fmt,
                  True, bq, ch, bn, 1, triton.cdiv(n, ch))
    return out


def indexer_topk(q, weights, key_cache, block_table, seq_ids, positions, topk, page_size, n_entries=-1,
                 fmt="idx_fp4", kv_block_table=None, kv_page_size=0,
                 *, block_q=None, block_n=None, chunk=None, group=None):
    """Fused scoring + top-k. ``chunk`` (entries per program), ``group`` (lists per merge program),
    ``block_q`` and ``block_n`` override the heuristics (tests use them to force merge trees)."""
    T, H, n, cache, cache32 = _common(q, key_cache, block_table, page_size, n_entries, fmt)
    dev = q.device
    idx = torch.empty((T, topk), dtype=torch.int32, device=dev)
    lengths = torch.empty((T,), dtype=torch.int32, device=dev)
    rows = torch.empty((T, topk if kv_block_table is not None else 0), dtype=torch.int32, device=dev)
    if T == 0:
        return idx, lengths, rows
    interp = _interpret()
    kp = _next_pow2(topk)
    bn = block_n or (16 if interp else 64)
    bq = block_q or (4 if interp else (1 if H > 64 else (2 if T >= 1024 else 1)))
    if chunk is None:
        # largest chunk in [max(KP, BN), 4*KP] that still gives one program per SM
        chunk = max(4 * kp, bn)
        n_qb = triton.cdiv(T, bq)
        while chunk > max(kp, bn) and n_qb * triton.cdiv(max(n, 1), chunk) < _num_sms(dev):
            chunk //= 2
    if chunk % bn or chunk < kp or chunk & (chunk - 1):
        raise ValueError(f"chunk: expected a power of two >= max(topk_pow2={kp}, block_n={bn}), got {chunk}")
    n_splits = triton.cdiv(n, chunk)
    ws = torch.empty((T, max(n_splits, 1), kp), dtype=torch.int64, device=dev)
    if n_splits:
        _launch_score(q, weights, cache, cache32, block_table, seq_ids, positions, ws, T, H, n, page_size, fmt,
                      False, bq, chunk, bn, kp, n_splits)
    g = group or max(2, min(8, 4096 // kp))
    seq_c, pos_c = seq_ids.contiguous(), positions.contiguous()
    has_kv = kv_block_table is not None
    kvbt = kv_block_table.contiguous() if has_kv else block_table
    B = block_table.shape[0]
    cur, n_in, span = ws, n_splits, 1
    # query tokens per merge program: one on the GPU (T x groups programs fill it), several under
    # the interpreter, whose cost is per operation, not per element
    rb = 8 if interp else 1
    while n_in > g:
        n_out = triton.cdiv(n_in, g)
        nxt = torch.empty((T, n_out, kp), dtype=torch.int64, device=dev)
        _merge_kernel[(triton.cdiv(T, rb), n_out)](
            cur, nxt, idx, lengths, rows, seq_c, pos_c, kvbt, T, B, n, n_in, n_out, span, topk,
            kvbt.shape[0], kvbt.shape[1], max(kv_page_size, 1),
            CHUNK=chunk, G=g, KP=kp, RB=rb, FINAL=False, HAS_KV=False, num_warps=8 if g * kp >= 2048 else 4,
        )
        cur, n_in, span = nxt, n_out, span * g
    gf = _next_pow2(max(n_in, 1))
    _merge_kernel[(triton.cdiv(T, rb), 1)](
        cur, cur, idx, lengths, rows, seq_c, pos_c, kvbt, T, B, n, n_in, 1, span, topk,
        kvbt.shape[0], kvbt.shape[1], max(kv_page_size, 1),
        CHUNK=chunk, G=gf, KP=kp, RB=rb, FINAL=True, HAS_KV=has_kv, num_warps=8 if gf * kp >= 2048 else 4,
    )
    return idx, lengths, rows

