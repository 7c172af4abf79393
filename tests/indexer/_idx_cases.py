"""Input builders for the indexer tests (paged key caches, query batches).

``exact=True`` builds inputs on which every backend computes the scores exactly (so selected sets must
be identical, ties included): queries and keys are E2M1 values with unit scales, weights are
multiples of 1/8, so every product and every partial sum is exact in fp32 whatever the order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from v4kernels import formats
from v4kernels.reference import quant as qref

E2M1 = torch.tensor(qref.E2M1_VALUES)


@dataclass
class Case:
    q: torch.Tensor
    weights: torch.Tensor
    cache: torch.Tensor
    block_table: torch.Tensor
    seq_ids: torch.Tensor
    positions: torch.Tensor
    page_size: int
    n_entries: int
    fmt: str
    kv_block_table: torch.Tensor
    kv_page_size: int

    def args(self, topk=None):
        a = (self.q, self.weights, self.cache, self.block_table, self.seq_ids, self.positions)
        if topk is None:
            return a + (self.page_size, self.n_entries, self.fmt)
        return a + (topk, self.page_size, self.n_entries, self.fmt, self.kv_block_table, self.kv_page_size)

    def to(self, device):
        for f in ("q", "weights", "cache", "block_table", "seq_ids", "positions", "kv_block_table"):
            setattr(self, f, getattr(self, f).to(device))
        return self


def e2m1_values(gen, *shape):
    return E2M1[torch.randint(0, 16, shape, generator=gen)]


def make_case(
    gen,
    seq_lens: List[int],
    tokens_per_seq: List[int],
    *,
    page_size: int = 16,
    heads: int = 64,
    fmt: str = "idx_fp4",
    exact: bool = True,
    holes: Optional[List[List[int]]] = None,
    n_entries: Optional[int] = None,
    positions: Optional[List[List[int]]] = None,
    spare_pages: int = 2,
    device=None,
    same_keys: bool = False,
):
    """``seq_lens[b]``: entries written for sequence b; ``tokens_per_seq[b]`` query tokens of b at the last
    positions that see exactly those entries (4*len - 4 + 3 .. backwards) unless ``positions`` is given.
    ``holes[b]``: logical pages of b left unallocated (-1 in the table). Unwritten bytes are 0xFF, so
    an entry read from a wrong place gives NaN scores. ``device``: build the cache there (quantizing millions
    of keys is slow on a CPU); ``same_keys``: every key of a sequence is the same vector (all scores tie)."""
    rf = formats.FORMATS[fmt]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    B = len(seq_lens)
    max_pages = max([-(-n // page_size) for n in seq_lens] + [1]) + 1
    num_pages = B * max_pages + spare_pages
    cache = torch.full((num_pages, rf.page_bytes(page_size)), 0xFF, dtype=torch.uint8, device=dev)
    perm = torch.randperm(num_pages, generator=gen)
    bt = torch.full((B, max_pages), -1, dtype=torch.int32)
    kv_bt = torch.full((B, max_pages), -1, dtype=torch.int32)
    k = 0
    for b, n in enumerate(seq_lens):
        for lp in range(-(-n // page_size)):
            if holes and lp in holes[b]:
                continue
            bt[b, lp] = int(perm[k])
            kv_bt[b, lp] = 1000 + 7 * k  # any ids: only translated, never read
            k += 1
    for b, n in enumerate(seq_lens):
        if n == 0:
            continue
        if same_keys:
            keys = e2m1_values(gen, 1, 128).expand(n, 128)
        elif exact:
            keys = e2m1_values(gen, n, 128)
        else:
            keys = torch.randn(n, 128, generator=gen) * torch.exp2(torch.randint(-3, 4, (n, 1), generator=gen).float())
        t = torch.arange(n)
        rows = formats.positions_to_rows(bt, torch.full_like(t, b), t, page_size)
        ok = rows >= 0
        if bool(ok.any()):
            formats.write_rows(cache, rf, page_size, rows[ok].to(dev), keys[ok].to(dev).bfloat16())
    seq_ids, pos = [], []
    for b, (n, m) in enumerate(zip(seq_lens, tokens_per_seq)):
        if positions is not None:
            ps = positions[b]
        else:
            last = 4 * n + 2  # (p + 1) // 4 == n for p in [4n - 1, 4n + 2]
            ps = [max(0, last - 4 * (m - 1 - j) - (j % 4)) for j in range(m)]  # every residue mod 4
        seq_ids += [b] * len(ps)
        pos += ps
    T = len(pos)
    if exact:
        q = e2m1_values(gen, T, heads, 128).bfloat16()
        w = (torch.randint(-3, 5, (T, heads), generator=gen).float() / 8).bfloat16()
    else:
        q = qref.fake_quant_fp4(torch.randn(T, heads, 128, generator=gen), 32)
        w = (torch.randn(T, heads, generator=gen) * 0.1).bfloat16()
    n_ent = bt.shape[1] * page_size if n_entries is None else n_entries
    case = Case(q, w, cache, bt, torch.tensor(seq_ids, dtype=torch.int32), torch.tensor(pos, dtype=torch.int64),
                page_size, n_ent, fmt, kv_bt, 8)
    return case.to(dev) if device is not None else case
