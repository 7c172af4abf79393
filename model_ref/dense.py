"""The ``dense`` numerics mode of model_ref: the V4 forward without quantization simulation.

``Transformer(..., numerics="dense")`` keeps the model's weights (FP8 / MXFP4 values, dequantized
exactly to bf16) and every non-quantizing step of the reference mode, and drops the fake-quant
points of spec §9.1. What differs from ``numerics="reference"``, point by point:

====================================  ======================================  =========================================
step                                  reference                               dense
====================================  ======================================  =========================================
FP8 linears (wq_a, wq_b, wkv, wo_b,   activation FP8 e4m3 1x128 (ue8m0),      bf16 GEMM (fp32 accumulate) of the bf16
indexer wq_b, shared expert,          block-scaled FP8 GEMM -> bf16           activation with the dequantized weight
MTP e_proj / h_proj)                                                          -> bf16
routed experts                        W4A8: activation FP8 1x128              W4A16: bf16 activation, same FP4 weights
                                                                              (``moe`` ops, mode "w4a16")
window KV cache                       KV584: nope dims FP8 (block 64)         bf16 (RoPE'd kv as computed)
compressed KV cache                   KV584: nope dims FP8 (block 64)         bf16
indexer queries                       RoPE, Hadamard, FP4 (block 32)          RoPE, Hadamard (bf16)
indexer key cache                     IDX_FP4 (after Hadamard)                bf16 (after Hadamard)
====================================  ======================================  =========================================

Identical in both modes: embedding, mHC (fp32), RMSNorms, q head-norm, RoPE tables, compressor
projections and pooling (fp32), the router, SwiGLU clamp, ``wo_a`` (bf16, as the reference), the
fp32 head; the attention math (fp32 scores and P, sink in the denominator, inverse RoPE of the
output: ``reference.attention.attend``) and the indexer scoring rule (fp32 scores, relu-weighted
head sum, stable top-k of ``reference.indexer.topk_from_logits``).

The attention ops of v4kernels read only the 584-byte FP8 layout, so in dense mode the attention,
the indexer scoring and the compressor run here, in PyTorch (the reference math on unquantized
K/V), whatever the backend; linears, norms, RoPE, mHC and MoE still go through the v4kernels ops
with the model's backend.
"""
from __future__ import annotations

from typing import Sequence

import torch

from v4kernels.reference import attention as attn_ref
from v4kernels.reference import compressor as comp_ref
from v4kernels.reference import indexer as idx_ref
from v4kernels.reference.rope import apply_rope

WINDOW = 128
# query tokens per step of the PyTorch attention / indexer (bounds the gathered [tokens, keys, 512] fp32)
TOKEN_CHUNK = 256


# ----------------------------------------------------------------------------- compressor
def _sequence(kv_b, sc_b, start, skv, ssc, ape, r, hd, c, overlap):
    """New tokens (positions start .. start+n-1) of one sequence -> pooled fp32 e [E, hd], entry ids [E].

    The state layout and update of ``v4kernels.reference.compressor`` (its module docstring): rows
    ``[(c-1)*r, c*r)`` hold the latest token of each position mod r, rows ``[0, r)`` (overlap) the last
    complete block. ``skv``/``ssc`` [c*r, c*hd] are updated in place."""
    n = kv_b.shape[0]
    pos = start + torch.arange(n, device=kv_b.device)
    sc_b = sc_b + ape[pos % r]
    cur = (c - 1) * r
    pend = start % r  # tokens of the current block seen by earlier calls
    kvx = torch.cat((skv[cur: cur + pend], kv_b))  # positions (start // r) * r .. start + n - 1
    scx = torch.cat((ssc[cur: cur + pend], sc_b))
    n_ent = kvx.shape[0] // r
    X = kvx[: n_ent * r].view(n_ent, r, c * hd)
    S = scx[: n_ent * r].view(n_ent, r, c * hd)
    blk0 = start // r
    if overlap:
        if blk0 == 0:  # block 0 has no predecessor: its slots are absent (kv 0, score -inf)
            pk = torch.zeros(r, c * hd, device=kv_b.device)
            ps = torch.full((r, c * hd), float("-inf"), device=kv_b.device)
        else:
            pk, ps = skv[0:r], ssc[0:r]
        PX = torch.cat((pk[None], X))[:n_ent]  # block i-1 of each entry i
        PS = torch.cat((ps[None], S))[:n_ent]
        e = comp_ref.pool(torch.cat((PX[:, :, :hd], X[:, :, hd:]), 1), torch.cat((PS[:, :, :hd], S[:, :, hd:]), 1))
        if n_ent:
            last_kv, last_sc = X[n_ent - 1].clone(), S[n_ent - 1].clone()
    else:
        e = comp_ref.pool(X, S)
    end = start + n
    for p in range(max(end - r, start), end):
        skv[cur + p % r] = kv_b[p - start]
        ssc[cur + p % r] = sc_b[p - start]
    if overlap and n_ent:
        skv[0:r], ssc[0:r] = last_kv, last_sc
    return e, blk0 + torch.arange(n_ent, device=kv_b.device)


def compress(kv, score, starts: Sequence[int], lens: Sequence[int], slots: Sequence[int], state_kv, state_score,
             ape, norm_weight, cos, sin, ratio: int, kind: str):
    """Compressor of a ragged batch without quantization (prefill, chunked prefill and decode alike).

    kv, score: fp32 [N, c*hd] (sequence-major, ``lens[b]`` rows from position ``starts[b]``).
    Returns (values bf16 [E, hd], batch row int64 [E], entry id int64 [E]): ``finish`` of the pooled
    entries (RMSNorm, RoPE at i*r, and for the indexer the Hadamard rotation), not quantized."""
    hd, c, overlap = comp_ref.dims(ratio, kind)
    es, rows, ids = [], [], []
    lo = 0
    for b, (st, n, sl) in enumerate(zip(starts, lens, slots)):
        e, ent = _sequence(kv[lo: lo + n].float(), score[lo: lo + n].float(), st, state_kv[sl], state_score[sl],
                           ape.float(), ratio, hd, c, overlap)
        lo += n
        if e.shape[0]:
            es.append(e)
            ids.append(ent)
            rows.append(torch.full_like(ent, b))
    if not es:
        z = torch.zeros(0, dtype=torch.long, device=kv.device)
        return kv.new_zeros(0, hd, dtype=torch.bfloat16), z, z
    ent = torch.cat(ids)
    return comp_ref.finish(torch.cat(es), ent * ratio, norm_weight, cos, sin, kind), torch.cat(rows), ent


# ----------------------------------------------------------------------------- indexer
def indexer_topk(q, weights, keys, tok_slot, positions, topk: int) -> torch.Tensor:
    """Top-k compressed entries per query token from unquantized keys.

    q bf16 [T, H, 128] (RoPE'd, Hadamard-rotated, not FP4), weights [T, H], keys bf16 [slots, n, 128],
    tok_slot / positions int [T]. Scores ``I[t] = sum_h relu(q_h . k_t) * w_h`` in fp32 over the visible
    entries ``t < (p + 1) // 4``; the stable top-k rule of ``reference.indexer``. Returns int32 [T, topk]
    (logical entry ids, -1 padded)."""
    T = q.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    lim = torch.div(positions.long() + 1, 4, rounding_mode="floor")
    for t0 in range(0, T, TOKEN_CHUNK):
        sl = slice(t0, min(T, t0 + TOKEN_CHUNK))
        n = int(lim[sl].max())
        if n == 0:
            continue
        k = keys[tok_slot[sl].long(), :n].float()  # [t, n, 128]
        s = torch.einsum("thd,tnd->thn", q[sl].float(), k)
        logits = (torch.relu(s) * weights[sl].float()[:, :, None]).sum(dim=1)
        valid = torch.arange(n, device=q.device)[None, :] < lim[sl, None]
        out[sl], _ = idx_ref.topk_from_logits(logits, valid, topk)
    return out


# ----------------------------------------------------------------------------- attention
def attention(q, positions, tok_slot, window, compressed, kind: str, indices, attn_sink, cos, sin) -> torch.Tensor:
    """Sparse attention with sink on unquantized K=V (spec §5.2-§5.4), the reference math.

    q bf16 [T, H, 512]; window bf16 [slots, positions, 512]; compressed bf16 [slots, entries, 512] or
    None; indices int32 [T, topk] (CSA). Keys: the window ``max(0, p-127) .. p``, then the compressed
    entries (CSA: ``indices``; HCA: all ``i < (p + 1) // 128``). Returns bf16 [T, H, 512] with the
    inverse RoPE of the output's rope dims at the query position."""
    T, H, D = q.shape
    out = torch.empty(T, H, D, dtype=torch.bfloat16, device=q.device)
    pos_all = positions.long()
    k = torch.arange(WINDOW, device=q.device)
    for t0 in range(0, T, TOKEN_CHUNK):
        sl = slice(t0, min(T, t0 + TOKEN_CHUNK))
        pos, slot = pos_all[sl], tok_slot[sl].long()
        wpos = pos[:, None] - (WINDOW - 1) + k[None, :]
        valid = wpos >= 0
        kv = window[slot[:, None], wpos.clamp_min(0)]  # [t, 128, 512]
        if kind != "swa":
            if kind == "csa":
                ids = indices[sl].long()
                cvalid = (ids >= 0) & (ids < torch.div(pos + 1, 4, rounding_mode="floor")[:, None])
            else:
                nvis = torch.div(pos + 1, 128, rounding_mode="floor")
                ids = torch.arange(int(nvis.max()), device=q.device)[None, :].expand(pos.shape[0], -1)
                cvalid = ids < nvis[:, None]
            ids = torch.where(cvalid, ids, torch.zeros_like(ids))
            kv = torch.cat((kv, compressed[slot[:, None], ids]), dim=1)
            valid = torch.cat((valid, cvalid), dim=1)
        o, _ = attn_ref.attend(q[sl], kv.float(), valid, attn_sink)
        out[sl] = o.to(torch.bfloat16)
    return apply_rope(out, pos_all, cos, sin, inverse=True)


def write_rows(cache: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
    """``cache[slots[i], ids[i]] = values[i]`` (bf16 dense cache rows)."""
    if values.shape[0]:
        cache[slots.long(), ids.long()] = values.to(cache.dtype)

