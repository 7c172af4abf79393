"""Builders of paged KV584 caches and attention cases for the tests and the benchmark.

Unused pages and rows are 0xFF bytes (e4m3 0xFF and bf16 0xFFFF are NaN), so a stray read shows."""
from __future__ import annotations

from typing import List, Optional

import torch

from v4kernels import formats as F


def make_paged(gen, rows_per_seq, page_size, *, extra_pages=1, poison=True, device="cpu", scale=1.0,
               values: Optional[List[torch.Tensor]] = None):
    """A KV584 cache holding ``rows_per_seq[b]`` rows (logical slots 0..n-1) per sequence, random
    bf16 values (or ``values[b]`` [n, 512]). Pages are assigned in a random order.
    Returns (cache uint8 [P, page_bytes], block_table int32 [B, max_pages], -1 padded)."""
    npages = [-(-int(n) // page_size) for n in rows_per_seq]
    total = sum(npages) + extra_pages
    perm = torch.randperm(total, generator=gen)
    width = max(npages + [1])
    bt = torch.full((len(rows_per_seq), width), -1, dtype=torch.int32)
    cache = torch.full((total, F.KV584.page_bytes(page_size)), 0xFF if poison else 0, dtype=torch.uint8)
    k = 0
    for b, n in enumerate(rows_per_seq):
        n = int(n)
        bt[b, : npages[b]] = perm[k : k + npages[b]].int()
        k += npages[b]
        if n:
            vals = values[b] if values is not None else (torch.randn(n, 512, generator=gen) * scale).bfloat16()
            rows = F.positions_to_rows(bt, torch.full((n,), b), torch.arange(n), page_size)
            F.write_rows(cache, F.KV584, page_size, rows, vals)
    return cache.to(device), bt.to(device)


def ring_values(pos_values: torch.Tensor, ring: int) -> torch.Tensor:
    """Ring slots of a sequence whose positions 0..L-1 hold ``pos_values`` [L, 512]: slot s holds the
    latest position t < L with t % ring == s (slots never written hold the first value: unused)."""
    L = pos_values.shape[0]
    out = pos_values[:1].expand(ring, -1).clone() if L else torch.zeros(ring, 512, dtype=torch.bfloat16)
    for t in range(max(0, L - ring), L):
        out[t % ring] = pos_values[t]
    return out


def make_case(gen, kind, seq_lens, q_lens, H, *, wps=7, cps=5, topk=12, ring=0, device="cpu", sink=True,
              invalid_frac=0.2):
    """A random attention case. ``seq_lens[b]``: tokens in sequence b (its last query at seq_lens-1);
    ``q_lens[b]``: query tokens of b (the last q_lens[b] positions). Returns a dict with q (token-major
    [T, H, 512]), cu_seqlens, seq_lens, caches, block tables, token-major indices [T, topk] (CSA), sink."""
    B = len(seq_lens)
    T = sum(q_lens)
    pos_vals = [torch.randn(L, 512, generator=gen).bfloat16() for L in seq_lens]
    q = torch.randn(T, H, 512, generator=gen).bfloat16()
    sink_t = (torch.randn(H, generator=gen) * 2) if sink else None
    if ring:
        wc, wbt = make_paged(gen, [ring] * B, wps, values=[ring_values(v, ring) for v in pos_vals])
    else:
        wc, wbt = make_paged(gen, seq_lens, wps, values=pos_vals)
    case = dict(
        q=q,
        cu_seqlens=torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        window_cache=wc, window_block_table=wbt, window_page_size=wps, window_ring=ring, kind=kind,
        attn_sink=sink_t,
    )
    if kind in ("csa", "hca"):
        ratio = 4 if kind == "csa" else 128
        cc, cbt = make_paged(gen, [L // ratio for L in seq_lens], cps)
        case.update(compressed_cache=cc, compressed_block_table=cbt, compressed_page_size=cps)
    if kind == "csa":
        rows = []
        for b in range(B):
            for j in range(q_lens[b]):
                p = seq_lens[b] - q_lens[b] + j
                nvis = (p + 1) // 4
                perm = torch.randperm(max(nvis, 1), generator=gen)[:topk].int()
                if nvis == 0:
                    perm = perm[:0]
                row = torch.full((topk,), -1, dtype=torch.int32)
                row[: perm.numel()] = perm
                drop = torch.rand(topk, generator=gen) < invalid_frac
                rows.append(torch.where(drop, torch.full_like(row, -1), row))
        case["indices"] = torch.stack(rows) if rows else torch.zeros(0, topk, dtype=torch.int32)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def decode_view(case, s_q):
    """The decode form of a case whose q_lens are all ``s_q``: q [B, s_q, H, 512], indices [B, s_q, topk]."""
    B = case["seq_lens"].shape[0]
    c = dict(case)
    c.pop("cu_seqlens")
    c["q"] = case["q"].view(B, s_q, *case["q"].shape[1:])
    if case.get("indices") is not None:
        c["indices"] = case["indices"].view(B, s_q, -1)
    return c
