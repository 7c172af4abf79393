"""KV compressor (spec §3, §4, §2): softmax-gated pooling of r-token blocks, fused with RMSNorm, RoPE,
quantization and the paged-cache write. Float32 PyTorch, following the spec line by line.

Two instances per CSA layer, one per HCA layer:

==========  =====  ====  =======  ====================================================================
kind        ratio  hd    overlap  stored row
==========  =====  ====  =======  ====================================================================
"main"      4      512   yes      KV584: FP8 fake-quant of dims [0, 448) (block 64), rope dims bf16
"main"      128    512   no       KV584
"indexer"   4      128   yes      IDX_FP4: Hadamard(128) after RoPE, FP4 (e2m1, ue8m0 per 32)
==========  =====  ====  =======  ====================================================================

``c = 2`` when overlapped (ratio 4), else 1. Per token the engine supplies ``kv`` and the gate
``score`` rows, fp32 ``[c*hd]`` (its own GEMMs); the compressor adds ``ape[pos % r]`` to the score.

**Compressor state** (per sequence, fp32 ``[c*r, c*hd]`` each for kv and score; the score rows hold
``score + ape``), addressed by a per-sequence *state slot* id (``state_slots[b]``, chosen by the
engine at allocation, so a batch can be any subset of the running sequences):

* overlap (r = 4): rows ``[r, 2r)``: row ``r + j`` holds the latest token seen at a position ``≡ j
  (mod r)`` (so the pending tokens of the current block, and the rest of the last full block); rows
  ``[0, r)``: the last *complete* block (all 2*hd channels), the "previous block" of the next entry.
* non-overlap (r = 128): row ``j`` holds the latest token seen at a position ``≡ j (mod r)``.

This is exactly what the reference's decode path (§3.3: write slot, emit, shift; never clear) leaves
behind, so the state after a call is the same whatever the chunking, bit for bit. Block 0 has no
predecessor: its "previous" slots are absent (kv 0, score -inf) by construction, whatever the state
holds, so a fresh sequence needs no reset for correctness; ``reset_state`` gives the reference's
initial values (kv 0, score -inf) for tidy, comparable state.

Entry ``i`` of a sequence (one per complete block ``[i*r, (i+1)*r)``)::

    e   = sum_t softmax_t(score_t)[ch] * kv_t[ch]        per channel ch < hd, over the block's slots
          (overlap: 8 slots = block i-1 channels [0, hd) then block i channels [hd, 2hd))
    y   = RMSNorm_hd(bf16(e)) (weight fp32, eps 1e-6) -> bf16
    y   = RoPE(y[..., -64:], position i*r)  (interleaved pairs, compressed-layer table)  -> bf16
    main:    stored = [fake_quant_fp8(y[:448], 64), y[448:]]                (KV584 row)
    indexer: h = bf16(Hadamard128(y) * 128^-0.5); stored = fake_quant_fp4(h, 32)   (IDX_FP4 row)

and is written at logical position ``i`` of the sequence's compressed cache (physical row through
the block table, ``formats.positions_to_rows``).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import formats
from . import quant as q
from .hadamard import hadamard_transform
from .norm import rms_norm
from .rope import apply_rope

RATIOS = (4, 128)
KINDS = ("main", "indexer")
HEAD_DIM = {"main": formats.KV_DIM, "indexer": formats.IDX_DIM}
FORMAT = {"main": formats.KV584, "indexer": formats.IDX_FP4}
NORM_EPS = 1e-6


def dims(ratio: int, kind: str) -> Tuple[int, int, bool]:
    """(hd, c, overlap) of a compressor: hd 512 (main) / 128 (indexer); c = 2 iff ratio == 4."""
    overlap = ratio == 4
    return HEAD_DIM[kind], (2 if overlap else 1), overlap


def state_shape(num_slots: int, ratio: int, kind: str) -> Tuple[int, int, int]:
    hd, c, _ = dims(ratio, kind)
    return (num_slots, c * ratio, c * hd)


def new_state(num_slots: int, ratio: int, kind: str, device=None):
    """Fresh (state_kv, state_score): fp32 zeros and -inf of ``state_shape``."""
    shape = state_shape(num_slots, ratio, kind)
    return (torch.zeros(shape, dtype=torch.float32, device=device),
            torch.full(shape, float("-inf"), dtype=torch.float32, device=device))


def reset_state(state_kv: torch.Tensor, state_score: torch.Tensor, slots=None) -> None:
    """Reset the given slots (all when None) to the reference's initial state: kv 0, score -inf."""
    if slots is None:
        state_kv.zero_()
        state_score.fill_(float("-inf"))
    else:
        idx = torch.as_tensor(slots, device=state_kv.device).long()
        state_kv[idx] = 0.0
        state_score[idx] = float("-inf")


# ----------------------------------------------------------------------------- per-entry math
def pool(kv_slots: torch.Tensor, score_slots: torch.Tensor) -> torch.Tensor:
    """Softmax-gated pooling: kv/score [E, S, hd] -> e [E, hd] = sum_s softmax_s(score)[ch] * kv[ch]."""
    w = torch.softmax(score_slots, dim=1)
    return (w * kv_slots).sum(dim=1)


def finish(e: torch.Tensor, positions: torch.Tensor, norm_weight, cos, sin, kind: str) -> torch.Tensor:
    """Pooled fp32 e [E, hd] -> the bf16 row handed to the cache encoder [E, hd].

    ``RMSNorm(bf16(e))`` -> RoPE at ``positions`` (= i*r) -> (indexer only) bf16 Hadamard. The encoder
    (``formats.encode_kv584`` / ``encode_idx_fp4``) then quantizes exactly as the fake-quant does.
    A position outside the RoPE table (only possible on CUDA tensors, where the ops skip their host
    checks) gets no rotation (cos 1, sin 0), as in the kernels; such an entry is never written to a
    cache (``_write_entries``)."""
    y = rms_norm(e.to(torch.bfloat16), norm_weight, NORM_EPS)
    # gather the table rows with clamped indices (an out-of-range gather is a device-side assert on CUDA)
    pos = positions.long()
    inside = ((pos >= 0) & (pos < cos.shape[0]))[:, None]
    if cos.shape[0]:
        idx = pos.clamp(0, cos.shape[0] - 1)
        c_rows = torch.where(inside, cos[idx], torch.ones((), dtype=cos.dtype, device=cos.device))
        s_rows = torch.where(inside, sin[idx], torch.zeros((), dtype=sin.dtype, device=sin.device))
    else:
        c_rows = torch.ones(pos.shape[0], cos.shape[1], dtype=cos.dtype, device=cos.device)
        s_rows = torch.zeros(pos.shape[0], sin.shape[1], dtype=sin.dtype, device=sin.device)
    y = apply_rope(y, torch.arange(pos.shape[0], device=pos.device), c_rows, s_rows)
    if kind == "indexer":
        y = hadamard_transform(y)  # fp32 butterflies, * 128^-0.5, bf16 out
    return y


def stored_values(v: torch.Tensor, kind: str) -> torch.Tensor:
    """The bf16 values the reference keeps in its cache (= decode(encode(v)))."""
    if kind == "main":
        nope = q.fake_quant_fp8(v[:, : formats.KV_NOPE], formats.KV_QUANT_BLOCK)
        return torch.cat((nope, v[:, formats.KV_NOPE:]), dim=1)
    return q.fake_quant_fp4(v, 32)


def _write_entries(cache, block_table, page_size, kind, seq, ent, ratio, max_pos, v) -> None:
    """Write entry rows ``v`` [E, hd] of (sequence ``seq``, entry ``ent``) into the paged cache.

    Entries whose page is missing (table column out of range, page < 0 or >= num_pages) or whose
    position ``ent * ratio`` lies outside the RoPE table are not written, like in the kernels: on CUDA
    tensors the ops do not check these values (no host sync), and every index used here is clamped
    first so that the gathers never go out of bounds."""
    if v.shape[0] == 0 or block_table.shape[1] == 0:
        return
    seq, ent = seq.long(), ent.long()
    width = block_table.shape[1]
    pidx = ent // page_size
    page = block_table[seq, pidx.clamp(0, width - 1)].long()
    ok = (ent >= 0) & (pidx < width) & (page >= 0) & (page < cache.shape[0]) & (ent * ratio < max_pos)
    rows = page * page_size + ent % page_size
    if not bool(ok.all()):
        rows, v = rows[ok], v[ok]
        if rows.numel() == 0:
            return
    formats.write_rows(cache, FORMAT[kind], page_size, rows, v)


def _slot_ok(slot: int, state_kv) -> bool:
    return 0 <= slot < state_kv.shape[0]


# ----------------------------------------------------------------------------- prefill (any start)
def _absent(shape, like):
    return torch.zeros(shape, dtype=torch.float32, device=like.device), torch.full(
        shape, float("-inf"), dtype=torch.float32, device=like.device)


def _sequence(kv_b, score_b, start, skv, ssc, ape, ratio, hd, c, overlap):
    """One sequence's new tokens (positions start..start+n-1) -> pooled e [E, hd], entry ids [E].

    Updates this sequence's state views ``skv``/``ssc`` [c*r, c*hd] in place."""
    r = ratio
    n = kv_b.shape[0]
    pos = start + torch.arange(n, device=kv_b.device)
    sc_b = score_b + ape[pos % r]                      # score_t = Wgate x_t + ape[t mod r]
    cur = (c - 1) * r                                  # first state row of the current block
    pend = start % r                                   # tokens of the current block already seen
    blk0 = start // r
    kvx = torch.cat((skv[cur: cur + pend], kv_b))      # positions blk0*r ... start+n-1
    scx = torch.cat((ssc[cur: cur + pend], sc_b))
    n_ent = kvx.shape[0] // r                          # complete blocks blk0 ... blk0+E-1
    X = kvx[: n_ent * r].view(n_ent, r, c * hd)
    S = scx[: n_ent * r].view(n_ent, r, c * hd)
    if overlap:
        if blk0 == 0:                                  # block 0 has no predecessor (kv 0, score -inf)
            pk, ps = _absent((r, c * hd), kv_b)
        else:
            pk, ps = skv[0:r], ssc[0:r]
        PX = torch.cat((pk[None], X))[:n_ent]          # block i-1 of each entry
        PS = torch.cat((ps[None], S))[:n_ent]
        slots_kv = torch.cat((PX[:, :, :hd], X[:, :, hd:]), dim=1)   # [E, 2r, hd]
        slots_sc = torch.cat((PS[:, :, :hd], S[:, :, hd:]), dim=1)
    else:
        slots_kv, slots_sc = X, S
    e = pool(slots_kv, slots_sc)
    # state: row cur + (q mod r) <- latest token q; overlap: rows [0, r) <- last complete block
    new_last = X[n_ent - 1].clone() if (overlap and n_ent > 0) else None
    new_last_s = S[n_ent - 1].clone() if (overlap and n_ent > 0) else None
    end = start + n
    for qpos in range(max(end - r, start), end):
        skv[cur + qpos % r] = kv_b[qpos - start]
        ssc[cur + qpos % r] = sc_b[qpos - start]
    if new_last is not None:
        skv[0:r] = new_last
        ssc[0:r] = new_last_s
    return e, blk0 + torch.arange(n_ent, device=kv_b.device)


def _prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight,
             cos, sin, ratio, kind):
    hd, c, overlap = dims(ratio, kind)
    cu = cu_seqlens.tolist()
    starts = start_pos.tolist()
    slots = state_slots.tolist()
    es, seqs, ids = [], [], []
    for b in range(len(starts)):
        lo, hi = cu[b], cu[b + 1]
        # invalid indices (unchecked on CUDA tensors): the kernels skip such a sequence
        if not _slot_ok(slots[b], state_kv) or starts[b] < 0 or lo < 0 or hi < lo or hi > kv.shape[0]:
            continue
        e, ent = _sequence(kv[lo:hi].float(), score[lo:hi].float(), starts[b], state_kv[slots[b]],
                           state_score[slots[b]], ape.float(), ratio, hd, c, overlap)
        es.append(e)
        ids.append(ent)
        seqs.append(torch.full_like(ent, b))
    e = torch.cat(es) if es else kv.new_zeros(0, hd)
    ent = torch.cat(ids).long() if ids else torch.zeros(0, dtype=torch.long, device=kv.device)
    seq = torch.cat(seqs).long() if seqs else torch.zeros(0, dtype=torch.long, device=kv.device)
    v = finish(e, ent * ratio, norm_weight, cos, sin, kind)   # entry i sits at position i*r
    return v, seq, ent


def compress_kv_entries(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape,
                        norm_weight, cos, sin, ratio: int, kind: str):
    """Functional prefill/chunked prefill on a ragged batch (updates the state in place).

    kv, score: fp32 [N, c*hd]; cu_seqlens int32 [B+1]; start_pos, state_slots int32 [B];
    state_kv/state_score fp32 [num_slots, c*r, c*hd]; ape fp32 [r, c*hd]; norm_weight fp32 [hd];
    cos/sin fp32 [max_pos, 32].
    Returns (entries bf16 [N//r + B, hd], entry_seq int32 [N//r + B], entry_pos int32 [N//r + B]):
    the stored (fake-quantized) value of every emitted entry, sequence-major and in position order,
    then padding rows (zeros, seq -1, pos -1). ``entry_pos`` is the entry index i (logical cache row).
    """
    hd = dims(ratio, kind)[0]
    B = start_pos.shape[0]
    rows = kv.shape[0] // ratio + B
    v, seq, ent = _prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape,
                           norm_weight, cos, sin, ratio, kind)
    out = torch.zeros(rows, hd, dtype=torch.bfloat16, device=kv.device)
    oseq = torch.full((rows,), -1, dtype=torch.int32, device=kv.device)
    opos = torch.full((rows,), -1, dtype=torch.int32, device=kv.device)
    E = v.shape[0]
    out[:E] = stored_values(v, kind)
    oseq[:E] = seq.to(torch.int32)
    opos[:E] = ent.to(torch.int32)
    return out, oseq, opos


def compress_kv(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight,
                cos, sin, cache, block_table, page_size: int, ratio: int, kind: str) -> None:
    """Prefill/chunked prefill: updates the state and writes the emitted entries into ``cache``
    (uint8 [num_pages, page_bytes], KV584 for "main", IDX_FP4 for "indexer") at logical position i
    of sequence b (``block_table`` int32 [B, max_pages])."""
    v, seq, ent = _prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape,
                           norm_weight, cos, sin, ratio, kind)
    _write_entries(cache, block_table, page_size, kind, seq, ent, ratio, cos.shape[0], v)


# ----------------------------------------------------------------------------- decode (§3.3)
def compress_kv_decode(kv, score, positions, state_slots, state_kv, state_score, ape, norm_weight, cos,
                       sin, cache, block_table, page_size: int, ratio: int, kind: str) -> None:
    """One token per sequence, §3.3 literally. kv/score fp32 [B, c*hd]; positions int32 [B]
    (position p of the token; p < 0 marks a padding row: nothing happens); block_table [B, max_pages].

    score += ape[p mod r]; slot (c-1)*r + p mod r <- token; if (p+1) mod r == 0 emit entry p//r:
    overlap pools [state[0:r, :hd]; state[r:2r, hd:]] then shifts state[0:r] <- state[r:2r];
    non-overlap pools state[0:r]."""
    hd, c, overlap = dims(ratio, kind)
    r = ratio
    es, seqs, ids = [], [], []
    for b, (p, slot) in enumerate(zip(positions.tolist(), state_slots.tolist())):
        if p < 0 or not _slot_ok(slot, state_kv):   # padding row / bad slot (the kernel skips it too)
            continue
        skv, ssc = state_kv[slot], state_score[slot]
        j = p % r
        skv[(c - 1) * r + j] = kv[b].float()
        ssc[(c - 1) * r + j] = score[b].float() + ape[j].float()
        if (p + 1) % r != 0:
            continue
        i = p // r
        if overlap:
            if i == 0:  # block 0 has no predecessor
                pk, ps = _absent((r, hd), kv)
            else:
                pk, ps = skv[0:r, :hd], ssc[0:r, :hd]
            slots_kv = torch.cat((pk, skv[r:2 * r, hd:]))
            slots_sc = torch.cat((ps, ssc[r:2 * r, hd:]))
            e = pool(slots_kv[None], slots_sc[None])
            skv[0:r] = skv[r:2 * r].clone()
            ssc[0:r] = ssc[r:2 * r].clone()
        else:
            e = pool(skv[None], ssc[None])
        es.append(e)
        ids.append(i)
        seqs.append(b)
    if not es:
        return
    ent = torch.tensor(ids, dtype=torch.long, device=kv.device)
    v = finish(torch.cat(es), ent * r, norm_weight, cos, sin, kind)   # position p + 1 - r = i*r
    _write_entries(cache, block_table, page_size, kind, torch.tensor(seqs, device=kv.device), ent, r, cos.shape[0],
                   v)
