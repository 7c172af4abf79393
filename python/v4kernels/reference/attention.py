"""Float32 reference of V4 attention over the paged FP8 caches (spec §5.2, §5.3, §5.4, §6.2).

One MQA head of 512 dims (K = V), H query heads, softmax scale ``512^-0.5``, a per-head sink logit.
Each query token attends, in ONE softmax, the union of two key sources:

* the **window**: the last 128 raw tokens of its sequence, positions ``max(0, p-127) .. p``, read
  from the window cache;
* the **compressed entries** (kind "csa": the indexer's top-k logical entry ids, ``-1`` empty;
  kind "hca": every entry ``i < (p+1) // 128``; kind "swa": none), read from the compressed cache.

Addressing conventions (shared by every backend, see ``v4kernels.ops.attention``):

* window cache, ``window_ring == 0``: position-addressed, logical slot of position ``t`` is ``t``;
  ``window_ring = R > 0``: a ring, slot ``t % R`` (R must be >= 128 + queries per step - 1).
  Physical row of slot ``s``: ``window_block_table[b, s // wps] * wps + s % wps``.
* compressed cache: entry ``i`` of sequence ``b`` is at row
  ``compressed_block_table[b, i // cps] * cps + i % cps``.
* A key is **ignored** (never dereferenced) when its position is negative, its compressed id is
  outside ``[0, (p+1) // ratio)`` (ratio 4 for CSA, 128 for HCA: causality), its top-k slot is
  ``>= topk_len``, its block-table column is past the table or the table entry is outside
  ``[0, num_pages)``.

Math per (query token, head h), over the valid keys j (``kv_j`` = dequantized bf16 cache row, fp32):
``s_j = (q_h . kv_j) * 512^-0.5``; ``m = max_j s_j``; ``l = sum_j exp(s_j - m)``;
``o_h = sum_j exp(s_j - m) kv_j / (l + exp(sink_h - m))``; ``lse_h = m + log(l)`` (natural log,
without the sink). No valid key: ``o_h = 0``, ``lse_h = +inf`` (FlashMLA's convention).
This reference keeps P in fp32 (the spec's kernel casts P to bf16 before P.V; the tests use
tolerances for that). Output bf16; the optional inverse RoPE (``rope_cos``/``rope_sin`` given)
rotates ``o[..., 448:]`` by ``conj(freqs_cis[p])`` in fp32 after the bf16 cast, as spec §5.4 does.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import formats as F
from .rope import apply_rope

HEAD_DIM = 512
WINDOW = 128
RATIOS = {"csa": 4, "hca": 128, "swa": 0}
SM_SCALE = HEAD_DIM ** -0.5


def decode_positions(seq_lens: torch.Tensor, s_q: int):
    """Decode token layout: token t = b * s_q + i sits at position ``seq_lens[b] - s_q + i``.

    Returns (tok_seq int64 [B*s_q], tok_pos int64 [B*s_q])."""
    B = seq_lens.shape[0]
    dev = seq_lens.device
    tok_seq = torch.arange(B, device=dev).repeat_interleave(s_q)
    i = torch.arange(s_q, device=dev).repeat(B)
    return tok_seq, seq_lens.long()[tok_seq] - s_q + i


def prefill_positions(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int):
    """Ragged layout: token t of sequence b (``cu[b] <= t < cu[b+1]``) sits at position
    ``seq_lens[b] - (cu[b+1] - cu[b]) + (t - cu[b])``. Returns (tok_seq, tok_pos) int64 [T]."""
    cu = cu_seqlens.long()
    t = torch.arange(num_tokens, device=cu.device)
    tok_seq = torch.searchsorted(cu[1:].contiguous(), t, right=True).clamp(max=max(cu.numel() - 2, 0))
    tok_pos = seq_lens.long()[tok_seq] - cu[tok_seq + 1] + t
    return tok_seq, tok_pos


def _rows(block_table: torch.Tensor, num_pages: int, seq: torch.Tensor, slot: torch.Tensor, valid, page_size: int):
    """Logical slots -> (physical rows, valid) with every invalid case masked (never dereferenced)."""
    col = torch.where(valid, slot // page_size, torch.zeros_like(slot))
    valid = valid & (col < block_table.shape[1])
    col = col.clamp(max=block_table.shape[1] - 1)
    page = block_table.long()[seq, col]
    valid = valid & (page >= 0) & (page < num_pages)
    row = torch.where(valid, page * page_size + slot % page_size, torch.zeros_like(slot))
    return row, valid


def _gather(cache: torch.Tensor, page_size: int, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Dequantize rows [...] of a KV584 cache -> fp32 [..., 512]; invalid rows give 0 (not read)."""
    data, scales = F._row_views(cache, F.KV584, page_size)
    r = rows[valid]
    kv = F.decode_kv584(data[r // page_size, r % page_size], scales[r // page_size, r % page_size])
    out = torch.zeros(*rows.shape, HEAD_DIM, dtype=torch.float32, device=cache.device)
    out[valid] = kv.float()
    return out


def key_lists(
    tok_seq, tok_pos, window_cache, window_block_table, compressed_cache, compressed_block_table, indices,
    topk_lens, kind: str, window_page_size: int, compressed_page_size: int, window_ring: int = 0,
):
    """Per query token: the keys it attends, as dequantized fp32 [T, N, 512] and a mask [T, N].

    Keys 0..127 are the window (position ``p - 127 + k``), then the compressed keys in index order.
    ``indices`` [T, topk] (CSA) and ``topk_lens`` [T] or None are per token."""
    T = tok_seq.shape[0]
    dev = tok_pos.device
    k = torch.arange(WINDOW, device=dev)
    wpos = tok_pos[:, None] - (WINDOW - 1) + k[None, :]  # [T, 128]
    wvalid = wpos >= 0
    wslot = torch.where(wvalid, wpos % window_ring if window_ring > 0 else wpos, torch.zeros_like(wpos))
    seq2 = tok_seq[:, None].expand_as(wpos)
    wrow, wvalid = _rows(window_block_table, window_cache.shape[0], seq2, wslot, wvalid, window_page_size)
    kv = _gather(window_cache, window_page_size, wrow, wvalid)
    valid = wvalid
    ratio = RATIOS[kind]
    if ratio:
        nvis = (tok_pos + 1) // ratio  # [T]
        if kind == "csa":
            ids = indices.long()
            slot = torch.arange(ids.shape[1], device=dev)[None, :]
            lens = topk_lens.long()[:, None] if topk_lens is not None else torch.full_like(nvis[:, None], ids.shape[1])
            cvalid = (ids >= 0) & (ids < nvis[:, None]) & (slot < lens)
        else:
            width = compressed_block_table.shape[1] * compressed_page_size
            n = int(nvis.max()) if T else 0
            n = max(0, min(n, width))
            ids = torch.arange(n, device=dev)[None, :].expand(T, n)
            cvalid = ids < nvis[:, None]
        ids = torch.where(cvalid, ids, torch.zeros_like(ids))
        seq2 = tok_seq[:, None].expand_as(ids)
        crow, cvalid = _rows(compressed_block_table, compressed_cache.shape[0], seq2, ids, cvalid, compressed_page_size)
        kv = torch.cat((kv, _gather(compressed_cache, compressed_page_size, crow, cvalid)), dim=1)
        valid = torch.cat((valid, cvalid), dim=1)
    return kv, valid


def attend(q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor, attn_sink: Optional[torch.Tensor], p_bf16=False):
    """Softmax with sink over the valid keys. q [T, H, 512] (any float), kv fp32 [T, N, 512],
    valid bool [T, N] -> (o fp32 [T, H, 512], lse fp32 [T, H]). ``p_bf16`` rounds P to bf16 before P.V
    (the spec kernel's cast, with the global max instead of the running max)."""
    s = torch.einsum("thd,tnd->thn", q.float(), kv) * SM_SCALE
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # [T, H, 1]
    any_valid = valid.any(dim=-1)[:, None]  # [T, 1]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m_safe)
    l = p.sum(dim=-1)  # [T, H]
    pv = p.to(torch.bfloat16).float() if p_bf16 else p
    o = torch.einsum("thn,tnd->thd", pv, kv)
    denom = l
    if attn_sink is not None:
        denom = denom + torch.exp(attn_sink.float()[None, :] - m_safe[..., 0])
    o = torch.where(any_valid[..., None], o / denom.clamp_min(1e-38)[..., None], torch.zeros_like(o))
    lse = torch.where(any_valid, m_safe[..., 0] + torch.log(l), torch.full_like(l, float("inf")))
    return o, lse


def sparse_attention(
    q: torch.Tensor, tok_seq, tok_pos, window_cache, window_block_table, compressed_cache, compressed_block_table,
    indices, topk_lens, attn_sink, kind: str, window_page_size: int, compressed_page_size: int,
    window_ring: int = 0, rope_cos=None, rope_sin=None, p_bf16: bool = False,
):
    """Token-major core: q [T, H, 512] -> (out bf16 [T, H, 512], lse fp32 [T, H])."""
    kv, valid = key_lists(
        tok_seq, tok_pos, window_cache, window_block_table, compressed_cache, compressed_block_table, indices,
        topk_lens, kind, window_page_size, compressed_page_size, window_ring,
    )
    o, lse = attend(q, kv, valid, attn_sink, p_bf16)
    out = o.to(torch.bfloat16)
    if rope_cos is not None:
        out = apply_rope(out, tok_pos, rope_cos, rope_sin, inverse=True)
    return out, lse


def sparse_attn_decode(
    q, window_cache, window_block_table, compressed_cache, compressed_block_table, indices, topk_lens, seq_lens,
    attn_sink, kind: str, window_page_size: int, compressed_page_size: int = 1, window_ring: int = 0,
    rope_cos=None, rope_sin=None, num_splits: int = 0,
):
    """Decode: q [B, s_q, H, 512]; indices [B, s_q, topk] (CSA); topk_lens [B] or None; seq_lens [B]
    (position + 1 of each sequence's last query). Returns out bf16 [B, s_q, H, 512], lse fp32 [B, s_q, H].
    ``num_splits`` is a scheduling hint of the kernels and has no effect here."""
    B, s_q, H, D = q.shape
    tok_seq, tok_pos = decode_positions(seq_lens, s_q)
    idx = indices.reshape(B * s_q, -1) if indices is not None else None
    tl_ = topk_lens.long()[tok_seq] if topk_lens is not None else None
    out, lse = sparse_attention(
        q.reshape(B * s_q, H, D), tok_seq, tok_pos, window_cache, window_block_table, compressed_cache,
        compressed_block_table, idx, tl_, attn_sink, kind, window_page_size, compressed_page_size, window_ring,
        rope_cos, rope_sin,
    )
    return out.view(B, s_q, H, D), lse.view(B, s_q, H)


def sparse_attn_prefill(
    q, cu_seqlens, seq_lens, window_cache, window_block_table, compressed_cache, compressed_block_table, indices,
    topk_lens, attn_sink, kind: str, window_page_size: int, compressed_page_size: int = 1, window_ring: int = 0,
    rope_cos=None, rope_sin=None, num_splits: int = 0,
):
    """Ragged prefill: q [T, H, 512]; cu_seqlens [B+1]; seq_lens [B] (position + 1 of each sequence's
    last query); indices [T, topk] (CSA); topk_lens [T] or None. Returns out [T, H, 512], lse [T, H]."""
    tok_seq, tok_pos = prefill_positions(cu_seqlens, seq_lens, q.shape[0])
    return sparse_attention(
        q, tok_seq, tok_pos, window_cache, window_block_table, compressed_cache, compressed_block_table, indices,
        topk_lens, attn_sink, kind, window_page_size, compressed_page_size, window_ring, rope_cos, rope_sin,
    )


def torch_bf16_attention(q, kv_bf16, valid, attn_sink):
    """Plain bf16 PyTorch baseline on an already gathered KV (benchmarks): bf16 matmuls, fp32 softmax."""
    s = torch.einsum("thd,tnd->thn", q, kv_bf16).float() * SM_SCALE
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    s = torch.cat((s, attn_sink.float()[None, :, None].expand(s.shape[0], -1, 1)), dim=-1)
    p = torch.softmax(s, dim=-1)[..., :-1].to(torch.bfloat16)
    return torch.einsum("thn,tnd->thd", p, kv_bf16)

