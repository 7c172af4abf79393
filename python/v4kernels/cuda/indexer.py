"""Launcher of the CUDA indexer scoring kernel (csrc/indexer/indexer_topk_fp4.cu) behind ``indexer_topk``.

Two sm_90a kernels: the first scores a chunk of a query token's entries (FP8 wgmma on the FP4 keys,
relu-weighted head sum) and keeps the chunk's best M in a sorted list; the second (one CTA per token) merges
the lists into the indices, lengths and KV rows. The scores reach memory only when the lists are shorter than
the top-k (M < top-k; small batches and long contexts): then the first kernel also writes them (4 bytes per
entry) to a workspace from which the merge re-reads a chunk whose list may hide more winners. Numerics: the Triton top-k kernel's FP8 factorisation (module doc of
``v4kernels.ops.indexer``), with its own fp32 accumulation order.

Handles the FP4 key cache (``idx_fp4``) with page sizes that are multiples of 4 (16-byte aligned bulk copies)
and 16 / 32 / 64 / 128 heads; other inputs run on the Triton backend.
"""
from __future__ import annotations

import torch

from .._ext import cuda_extension_loaded

MIN_CHUNK = 512    # entries per CTA at least (when there are that many): per-CTA setup and selection amortised
SMEM_LIMIT = 227 * 1024
_STAGES, _BN = 8, 64


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def supported(q, weights, key_cache, block_table, seq_ids, positions, topk, page_size, n_entries=-1,
              fmt="idx_fp4", kv_block_table=None, kv_page_size=0) -> bool:
    return (fmt == "idx_fp4" and page_size % 4 == 0 and q.shape[1] in (16, 32, 64, 128)
            and key_cache.data_ptr() % 16 == 0)


def smem_bytes(heads: int, chunk: int, page_size: int) -> int:
    """Dynamic shared memory of one CTA (``make_layout`` in the .cu, plus 1024 B of alignment slack)."""
    npt = chunk // page_size + 2
    end_pt = heads * 128 + _STAGES * _BN * 68 + chunk * 4 + npt * 4
    return (end_pt + 7) // 8 * 8 + 3 * _STAGES * 8 + heads * 4 + 256 * 4 + 64 + 1024


def _ctas_per_sm(heads: int) -> int:
    return 3 if heads <= 64 else 2  # the kernel's __launch_bounds__ (registers)


def plan(T: int, heads: int, n: int, topk: int, page_size: int, num_sms: int, chunk=None) -> dict:
    """Chunking: CTAs (token x chunk) in whole waves of the resident slots (3 per SM up to 64 heads, else 2),
    chunks of MIN_CHUNK entries at least and at most what keeps that occupancy in shared memory (4096 / 8192
    entries; a multiple of 64). Each chunk keeps its best M: the whole top-k when chunks are long, else ~4x the expected
    winners per chunk (at least 16) plus the score workspace ``ws`` for the merge to re-read the rare chunk
    holding more (as the Triton kernel does)."""
    kp = max(_next_pow2(topk), 16)
    slots = _ctas_per_sm(heads) * num_sms
    max_chunk = 4096 if heads <= 64 else 8192
    if chunk is None:
        # as many splits as fill whole waves of resident CTAs (a last partial wave idles most SMs), chunks of
        # MIN_CHUNK .. max_chunk entries
        n1, T1 = max(n, 1), max(T, 1)
        waves = -(-T1 * -(-n1 // max_chunk) // slots)
        splits = max(1, waves * slots // T1)
        chunk = min(max(-(-n1 // splits), min(MIN_CHUNK, n1)), max_chunk)
    chunk = max(_BN, -(-int(chunk) // _BN) * _BN)
    while smem_bytes(heads, chunk, page_size) > SMEM_LIMIT and chunk > _BN:
        chunk = max(_BN, (chunk // 2) // _BN * _BN)
    splits = max(1, -(-n // chunk))
    if splits == 1:
        m = min(kp, _next_pow2(chunk))
    else:
        m = min(kp, _next_pow2(chunk), max(16, _next_pow2(-(-4 * kp * chunk // max(n, 1)))))
    return dict(chunk=chunk, splits=splits, M=m, KP=kp, ws=m < min(kp, _next_pow2(chunk)))


def _num_sms(device: torch.device) -> int:
    cuda_extension_loaded()  # imports v4kernels._C (registers torch.ops.v4kernels_C) when called directly
    return torch.cuda.get_device_properties(device).multi_processor_count


def _ws_to_scores(ws: torch.Tensor) -> torch.Tensor:
    """Score workspace (int32 signed monotone keys, INT32_MIN = not visible) -> fp32 scores (-inf there)."""
    k = ws.long() & 0xFFFFFFFF ^ 0x80000000  # the unsigned ordering key
    bits = torch.where(k >= 2**31, k - 2**31, (~k) & 0xFFFFFFFF)
    s = bits.to(torch.int32).view(torch.float32)
    return torch.where(k == 0, torch.full_like(s, float("-inf")), s)


def scores(q, weights, key_cache, block_table, seq_ids, positions, page_size, n_entries=-1, *, chunk=None):
    """fp32 [T, n_entries]: the scores the kernel ranks (-inf where invisible; a NaN score reads -inf, -0.0
    reads +0.0), from its score workspace. For tests; the op itself writes scores only to that L2-sized
    workspace, and only when its per-chunk lists are shorter than the top-k."""
    T, H = q.shape[0], q.shape[1]
    n = block_table.shape[1] * page_size if n_entries < 0 else n_entries
    pl = plan(T, H, n, 16, page_size, _num_sms(q.device), chunk)
    lists = torch.empty((T, pl["splits"], pl["M"]), dtype=torch.int64, device=q.device)
    ws = torch.full((T, n), -2**31, dtype=torch.int32, device=q.device)
    if T and n:
        torch.ops.v4kernels_C.indexer_topk_fp4(q.contiguous(), weights.contiguous(), key_cache,
                                               block_table.contiguous(), seq_ids.contiguous(), positions.contiguous(),
                                               page_size, n, pl["chunk"], lists, ws)
    return _ws_to_scores(ws)


def indexer_topk(q, weights, key_cache, block_table, seq_ids, positions, topk, page_size, n_entries=-1,
                 fmt="idx_fp4", kv_block_table=None, kv_page_size=0, *, chunk=None):
    """As :func:`v4kernels.ops.indexer.indexer_topk` (inputs checked there); ``chunk`` overrides the plan's
    entries per CTA (tests use it to force many chunks, short lists and workspace re-reads)."""
    T, H = q.shape[0], q.shape[1]
    n = block_table.shape[1] * page_size if n_entries < 0 else n_entries
    dev = q.device
    idx = torch.empty((T, topk), dtype=torch.int32, device=dev)
    lengths = torch.empty((T,), dtype=torch.int32, device=dev)
    rows = torch.empty((T, topk if kv_block_table is not None else 0), dtype=torch.int32, device=dev)
    if T == 0:
        return idx, lengths, rows
    pl = plan(T, H, n, topk, page_size, _num_sms(dev), chunk)
    lists = torch.empty((T, pl["splits"], pl["M"]), dtype=torch.int64, device=dev)
    ws = torch.empty((T, n), dtype=torch.int32, device=dev) if pl["ws"] else None
    bt = block_table.contiguous()
    seq_c, pos_c = seq_ids.contiguous(), positions.contiguous()
    if n > 0:
        qc = q if (q.is_contiguous() and q.data_ptr() % 16 == 0) else q.contiguous().clone()
        torch.ops.v4kernels_C.indexer_topk_fp4(qc, weights.contiguous(), key_cache, bt, seq_c, pos_c, page_size, n,
                                               pl["chunk"], lists, ws)
    kvbt = kv_block_table.contiguous() if kv_block_table is not None else None
    torch.ops.v4kernels_C.indexer_merge(lists, ws, pl["chunk"], n, topk, seq_c, pos_c, bt.shape[0], kvbt,
                                        max(kv_page_size, 1), idx, lengths, rows)
    return idx, lengths, rows
