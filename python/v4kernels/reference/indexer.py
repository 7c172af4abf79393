"""Lightning indexer (spec §4, with §2.2 FP4, §2.4 Hadamard, §2.5 RoPE, §6.3 key cache): float32 reference.

Query preparation (per query token, 64 heads x 128)::

    q[..., 64:] = RoPE(q[..., 64:], pos)      # fp32 math, bf16 result (compressed-layer table)
    q = Hadamard128(q)                        # fp32 butterflies, bf16 result
    q = FP4_fakequant(q, block=32, ue8m0)     # bf16, FP4-exact

Scoring of compressed entry t for a query token at position p of sequence b::

    S[h, t] = q[h, :] . K[b, t, :]            # K decoded from the paged key cache (FP4 or FP8 rows)
    I[t]    = sum_h relu(S[h, t]) * w[h]      # w = bf16(weights_proj(x) * 128^-0.5 * 64^-0.5)
    visible(t) = t < (p + 1) // 4  and  t < n_entries  and  the page of t is allocated

Numerics: the model computes S as a bf16 einsum result and the head sum as a bf16 reduction. This
reference computes S, the relu-weighted products and the head sum in **float32** (like the kernels);
``indexer_logits(..., bf16_scores=True)`` reproduces the model's bf16 rounding for comparisons.

Top-k rule (shared by every backend): among the visible entries, order by score descending; **on
equal scores the lower entry index wins** (a stable sort, not ``torch.topk``). A NaN score counts as
``-inf``, and ``-0.0`` as ``+0.0``. The first ``min(topk, n_visible)`` entries are returned; the
remaining slots hold -1. Entries on pages that are not allocated (block-table entry < 0, or a page id
>= the number of pages in the cache) are invisible and never read. A token whose sequence id lies
outside ``[0, B)`` or whose position is negative sees no entry.

Shapes: T query tokens, B sequences, H heads (64), D = 128.
- ``q``: bf16 [T, H, 128] (already prepared); ``weights``: bf16/fp32 [T, H].
- ``key_cache``: uint8 [num_pages, page_bytes] in ``formats.IDX_FP4`` or ``formats.IDX_FP8`` layout.
- ``block_table``: int32 [B, max_pages] (-1 = no page); ``seq_ids``: int [T] (row of block_table
  of each token); ``positions``: int [T] (token position p).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import formats
from .hadamard import hadamard_transform
from .quant import fake_quant_fp4
from .rope import apply_rope

N_HEADS = 64
HEAD_DIM = 128
ROPE_DIM = 64
COMPRESS_RATIO = 4
FMT_NAMES = ("idx_fp4", "idx_fp8")


def weight_scale(n_heads: int = N_HEADS, head_dim: int = HEAD_DIM) -> float:
    """The constant that multiplies ``weights_proj(x)``: ``head_dim^-0.5 * n_heads^-0.5``."""
    return head_dim ** -0.5 * n_heads ** -0.5


def indexer_weights(x: torch.Tensor, weights_proj: torch.Tensor) -> torch.Tensor:
    """``w = weights_proj(x) * (128^-0.5 * 64^-0.5)`` as bf16 ops (spec §4). x [T, d], W [H, d] -> [T, H]."""
    w = torch.nn.functional.linear(x.to(torch.bfloat16), weights_proj.to(torch.bfloat16))
    return w * weight_scale(weights_proj.shape[0], HEAD_DIM)


def indexer_prepare_q(q: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (last 64 dims) -> Hadamard 128 -> FP4 fake-quant (block 32, ue8m0).

    q: bf16 [T, H, 128]; positions: int [T]; cos/sin: fp32 [max_pos, 32] (compressed-layer table,
    ``rope_table(max_pos, 160000, YarnConfig())``). Returns bf16 [T, H, 128], every value FP4-exact.
    """
    x = apply_rope(q.to(torch.bfloat16), positions, cos, sin)  # fp32 math, bf16 result
    x = hadamard_transform(x)  # fp32 butterflies, bf16 result
    return fake_quant_fp4(x, 32)


def visible_limit(seq_ids: torch.Tensor, positions: torch.Tensor, num_seqs: int, n_entries: int) -> torch.Tensor:
    """Per token: entries t < limit are causally visible: ``clamp((p + 1) // 4, 0, n_entries)``, 0 for a bad seq id."""
    p = positions.long()
    lim = torch.clamp(torch.div(p + 1, COMPRESS_RATIO, rounding_mode="floor"), 0, n_entries)
    s = seq_ids.long()
    return torch.where((s >= 0) & (s < num_seqs), lim, torch.zeros_like(lim))


def gather_keys(key_cache: torch.Tensor, block_table: torch.Tensor, page_size: int, fmt: str, n_entries: int):
    """Decode entries [0, n_entries) of every sequence: (keys fp32 [B, n, 128], present bool [B, n]).

    An entry is present when its page index is inside the block table and the page id is in
    ``[0, num_pages)``; absent entries decode to 0 and are never read."""
    rf = formats.FORMATS[fmt]
    B = block_table.shape[0]
    num_rows = key_cache.shape[0] * page_size
    t = torch.arange(n_entries, device=block_table.device)
    seq = torch.arange(B, device=block_table.device)[:, None].expand(B, n_entries)
    rows = formats.positions_to_rows(block_table, seq.reshape(-1), t.repeat(B), page_size).view(B, n_entries)
    present = (rows >= 0) & (rows < num_rows)
    keys = torch.zeros(B, n_entries, HEAD_DIM, dtype=torch.float32, device=key_cache.device)
    if bool(present.any()):
        r = rows[present]
        keys[present] = formats.read_rows(key_cache, rf, page_size, r).float()
    return keys, present


def indexer_logits(
    q: torch.Tensor,
    weights: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    page_size: int,
    n_entries: int = -1,
    fmt: str = "idx_fp4",
    bf16_scores: bool = False,
) -> torch.Tensor:
    """Scores I fp32 [T, n_entries] (-inf where invisible). ``n_entries=-1``: max_pages * page_size.

    ``bf16_scores=True`` rounds like the model (bf16 einsum result, bf16 relu*w, bf16 head sum)."""
    if n_entries < 0:
        n_entries = block_table.shape[1] * page_size
    T, H, _ = q.shape
    B = block_table.shape[0]
    out = torch.full((T, n_entries), float("-inf"), dtype=torch.float32, device=q.device)
    if T == 0 or n_entries == 0:
        return out
    keys, present = gather_keys(key_cache, block_table, page_size, fmt, n_entries)
    lim = visible_limit(seq_ids, positions, B, n_entries)
    t = torch.arange(n_entries, device=q.device)
    for b in torch.unique(seq_ids.long()).tolist():  # one einsum per sequence: its tokens share keys
        if b < 0 or b >= B:
            continue
        sel = (seq_ids.long() == b).nonzero().flatten()
        qs, ws, kb = q[sel].float(), weights[sel].float(), keys[b]
        if bf16_scores:
            s = torch.einsum("thd,nd->thn", qs.bfloat16(), kb.bfloat16())  # bf16 result
            i = (torch.relu(s) * ws.bfloat16()[:, :, None]).sum(dim=1).float()
        else:
            s = torch.einsum("thd,nd->thn", qs, kb)  # [t, H, n] fp32
            i = (torch.relu(s) * ws[:, :, None]).sum(dim=1)
        vis = present[b][None, :] & (t[None, :] < lim[sel][:, None])
        out[sel] = torch.where(vis, i, torch.full_like(i, float("-inf")))
    return out


def topk_from_logits(logits: torch.Tensor, valid: torch.Tensor, topk: int):
    """Stable top-k: (indices int32 [T, topk] (-1 padded), lengths int32 [T]).

    ``valid`` bool [T, n]: visible entries. Order: score descending, lower index first on ties, every
    valid entry before every invalid one; NaN scores count as -inf, -0.0 as +0.0."""
    T, n = logits.shape
    s = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    s = torch.where(s == 0, torch.zeros_like(s), s)
    # stable sort by score, then stable sort by validity: valid first, and inside each group the
    # score order with ties kept in index order
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    v_sorted = torch.gather(valid, 1, order)
    order2 = torch.sort(v_sorted.to(torch.int8), dim=1, descending=True, stable=True).indices
    order = torch.gather(order, 1, order2)
    lengths = torch.clamp(valid.sum(dim=1), max=topk).to(torch.int32)
    k = min(topk, n)
    idx = torch.full((T, topk), -1, dtype=torch.int32, device=logits.device)
    if k:
        top = order[:, :k].to(torch.int32)
        keep = torch.arange(k, device=logits.device)[None, :] < lengths[:, None]
        idx[:, :k] = torch.where(keep, top, torch.full_like(top, -1))
    return idx, lengths


def indices_to_rows(indices: torch.Tensor, block_table: torch.Tensor, seq_ids: torch.Tensor, page_size: int,
                    num_pages: Optional[int] = None) -> torch.Tensor:
    """Logical entry ids [T, k] -> physical rows ``bt[seq, i // ps] * ps + i % ps`` (int32; -1 for -1 ids,
    missing pages, page ids >= num_pages or bad seq ids)."""
    T, k = indices.shape
    B, max_pages = block_table.shape
    i = indices.long()
    s = seq_ids.long()[:, None].expand(T, k)
    page_idx = torch.where(i >= 0, torch.div(i, page_size, rounding_mode="floor"), torch.zeros_like(i))
    ok = (i >= 0) & (page_idx < max_pages) & (s >= 0) & (s < B)
    page = block_table[s.clamp(0, max(B - 1, 0)), page_idx.clamp(0, max(max_pages - 1, 0))].long() if B and max_pages else torch.full_like(i, -1)
    ok &= page >= 0
    if num_pages is not None:
        ok &= page < num_pages
    return torch.where(ok, page * page_size + i % page_size, torch.full_like(i, -1)).to(torch.int32)


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    topk: int,
    page_size: int,
    n_entries: int = -1,
    fmt: str = "idx_fp4",
    kv_block_table: Optional[torch.Tensor] = None,
    kv_page_size: int = 0,
):
    """Top-k visible entries per query token (module doc for the rule).

    Returns ``indices`` int32 [T, topk] (logical entry ids, score descending, -1 padded),
    ``lengths`` int32 [T] (= number of valid slots = min(topk, visible entries)) and ``kv_rows`` int32
    [T, topk]: the ids translated to physical rows of the main compressed KV cache through
    ``kv_block_table`` with ``kv_page_size`` ([T, 0] when no table is given)."""
    if n_entries < 0:
        n_entries = block_table.shape[1] * page_size
    logits = indexer_logits(q, weights, key_cache, block_table, seq_ids, positions, page_size, n_entries, fmt)
    B = block_table.shape[0]
    keys_present = gather_keys(key_cache, block_table, page_size, fmt, n_entries)[1] if n_entries else None
    lim = visible_limit(seq_ids, positions, B, n_entries)
    t = torch.arange(n_entries, device=q.device)
    valid = t[None, :] < lim[:, None]
    if n_entries and B:
        s = seq_ids.long().clamp(0, B - 1)
        valid &= keys_present[s]
    idx, lengths = topk_from_logits(logits, valid, topk)
    if kv_block_table is None:
        rows = torch.empty((q.shape[0], 0), dtype=torch.int32, device=q.device)
    else:
        rows = indices_to_rows(idx, kv_block_table, seq_ids, kv_page_size)
    return idx, lengths, rows


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Ragged batch -> per-token sequence id: tokens [cu[b], cu[b+1]) belong to sequence b (int32 [T])."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.arange(counts.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, counts, output_size=num_tokens).to(torch.int32)


def flops(n_heads: int, visible_pairs: int) -> int:
    """FLOP of the scoring: 2 * H * 128 per (query token, visible key)."""
    return 2 * n_heads * HEAD_DIM * visible_pairs

