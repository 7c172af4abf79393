"""Lightning indexer ops (spec §4, §2.2, §2.4, §2.5, §6.3): query preparation, scores, fused top-k.

Batch description shared by the scoring ops (decode and prefill alike, no host sync, fixed shapes):
every query token ``i`` carries ``seq_ids[i]`` (its row of ``block_table``) and ``positions[i]`` (its
token position ``p``). Entry ``t`` of the sequence's indexer key cache is visible to the token iff
``t < (p + 1) // 4``, ``t < n_entries`` and its page is allocated. A ragged prefill batch given by
``cu_seqlens`` maps to ``seq_ids`` with :func:`seq_ids_from_cu_seqlens`.

Holes: an entry whose block-table slot is -1 (or holds a page id >= the cache's page count) is
treated as invisible; its page is never read. On CPU tensors the checks reject page ids outside
[-1, num_pages), sequence ids outside [0, B) and negative positions; on CUDA tensors (no host sync)
the kernels mask such values instead: bad pages are invisible, a bad sequence id or negative
position sees no entry.

Tie-breaking: equal scores -> the lower entry index first (every backend).

Numerics of the Triton top-k on the GPU: Hopper has no FP4 MMA, so the fused kernel multiplies in FP8
(twice the bf16 tensor rate, needed to keep up with 68-byte keys): each FP4 key is re-encoded as e4m3
``e2m1 * 2^(6 - (m - e_b))`` (m = its largest block exponent, e_b the block's) and each query head is
scaled by a power of two into e4m3; the powers of two are applied outside the relu in fp32. This is
exact (every product, and the fp32 head sum) when (a) the query is FP4-exact, as
:func:`indexer_prepare_q` makes it, and (b) a key's four block scales lie within 2^11 of each other
(a block further below is flushed to zero; after the Hadamard rotation block scales differ by a few
binades at most). What differs from the float32 reference is the accumulation of the 128 products by
the FP8 tensor core, which keeps fewer mantissa bits than fp32 on Hopper (DeepSeek-V3 report): scores
can differ in their low bits, so near-ties may order differently (the GPU tests allow 1e-3 of the
score scale); inputs whose partial sums need few bits (the exact test cases) select identically.
``V4K_INDEXER_MMA=bf16`` makes the kernel use exact bf16 products (half the MMA rate) instead. The
logits op always uses the exact bf16 path.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import formats
from .._checks import check_choice, check_range, check_same_device, check_tensor
from .._dispatch import define_op
from ..reference import indexer as ref

_INT = (torch.int32, torch.int64)
MAX_TOPK = 2048


def _triton():
    from ..triton import indexer as tri  # lazy: importing triton kernels is not free

    return tri


def _concrete_cpu(t) -> bool:
    """Real CPU data (value checks cost no sync there); not a fake/meta tensor under tracing."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not is_fake(t)


def _check_heads(name, q):
    check_tensor(name, q, dtype=torch.bfloat16, dim=3)
    H, D = q.shape[1], q.shape[2]
    if D != ref.HEAD_DIM:
        raise ValueError(f"{name}: expected head dim {ref.HEAD_DIM} (shape [T, H, 128]), got shape {tuple(q.shape)}")
    if H not in (16, 32, 64, 128):
        raise ValueError(f"{name}: expected 16, 32, 64 or 128 heads, got {H} (shape {tuple(q.shape)})")


# ----------------------------------------------------------------------------- prepare_q
def _check_prepare_q(q, positions, cos, sin):
    _check_heads("q", q)
    T = q.shape[0]
    check_tensor("positions", positions, dtype=_INT, shape=(T,))
    check_tensor("cos", cos, dtype=torch.float32, shape=(None, ref.ROPE_DIM // 2))
    check_tensor("sin", sin, dtype=torch.float32, shape=tuple(cos.shape))
    check_same_device(q=q, positions=positions, cos=cos, sin=sin)
    if _concrete_cpu(positions) and positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= cos.shape[0]:
            raise ValueError(f"positions: expected values in [0, {cos.shape[0]}) (rows of cos/sin), got [{lo}, {hi}]")


def _fake_prepare_q(q, positions, cos, sin):
    return torch.empty_like(q)


def _tri_prepare_q(q, positions, cos, sin):
    return _triton().indexer_prepare_q(q, positions, cos, sin)


indexer_prepare_q_op = define_op(
    "indexer_prepare_q(Tensor q, Tensor positions, Tensor cos, Tensor sin, *, str? backend=None) -> Tensor",
    check=_check_prepare_q,
    reference=ref.indexer_prepare_q,
    fake=_fake_prepare_q,
    triton=_tri_prepare_q,
)


def indexer_prepare_q(q, positions, cos, sin, *, backend: Optional[str] = None) -> torch.Tensor:
    """Indexer query preparation: ``FP4(Hadamard128(RoPE(q)))``, bitwise equal on every backend.

    Parameters
    ----------
    q : bf16 [T, H, 128], ``indexer.wq_b(qr)`` viewed per head (H = 64 in V4).
    positions : int32/int64 [T], token positions (rows of ``cos``/``sin``).
    cos, sin : fp32 [max_pos, 32], the compressed-layer table
        (``reference.rope.rope_table(max_pos, 160000, YarnConfig())``).

    Returns
    -------
    bf16 [T, H, 128]: RoPE on dims 64..127 (interleaved pairs, fp32 math, bf16), Hadamard over the 128
    dims (scale 128^-0.5, bf16), then FP4 fake-quant per 32 (ue8m0): every value is E2M1 * 2^k.
    """
    return indexer_prepare_q_op(q, positions, cos, sin, backend=backend)


# ----------------------------------------------------------------------------- scoring
def _check_scoring(q, weights, key_cache, block_table, seq_ids, positions, page_size, n_entries=-1, fmt="idx_fp4"):
    _check_heads("q", q)
    T, H = q.shape[0], q.shape[1]
    check_tensor("weights", weights, dtype=(torch.bfloat16, torch.float32), shape=(T, H))
    check_choice("fmt", fmt, ref.FMT_NAMES)
    if page_size < 1:
        raise ValueError(f"page_size: expected >= 1, got {page_size}")
    formats.check_cache("key_cache", key_cache, formats.FORMATS[fmt], page_size)
    check_tensor("block_table", block_table, dtype=torch.int32, dim=2)
    check_tensor("seq_ids", seq_ids, dtype=_INT, shape=(T,))
    check_tensor("positions", positions, dtype=_INT, shape=(T,))
    check_same_device(q=q, weights=weights, key_cache=key_cache, block_table=block_table, seq_ids=seq_ids,
                      positions=positions)
    cap = block_table.shape[1] * page_size
    if n_entries != -1:
        check_range("n_entries", n_entries, 0, cap)
    if _concrete_cpu(q) and _concrete_cpu(block_table):  # value checks only where they cost no device sync
        B = block_table.shape[0]
        if block_table.numel():
            lo, hi = int(block_table.min()), int(block_table.max())
            if lo < -1 or hi >= key_cache.shape[0]:
                raise ValueError(
                    f"block_table: expected page ids in [-1, {key_cache.shape[0]}) (-1 = no page), got [{lo}, {hi}]")
        if T:
            lo, hi = int(seq_ids.min()), int(seq_ids.max())
            if lo < 0 or hi >= B:
                raise ValueError(f"seq_ids: expected values in [0, {B}) (rows of block_table), got [{lo}, {hi}]")
            if int(positions.min()) < 0:
                raise ValueError(f"positions: expected values >= 0, got min {int(positions.min())}")


def _n(block_table, page_size, n_entries):
    return block_table.shape[1] * page_size if n_entries < 0 else n_entries


def _fake_logits(q, weights, key_cache, block_table, seq_ids, positions, page_size, n_entries=-1, fmt="idx_fp4"):
    return q.new_empty((q.shape[0], _n(block_table, page_size, n_entries)), dtype=torch.float32)


def _tri_logits(*args, **kwargs):
    return _triton().indexer_logits(*args, **kwargs)


indexer_logits_op = define_op(
    "indexer_logits(Tensor q, Tensor weights, Tensor key_cache, Tensor block_table, Tensor seq_ids, "
    "Tensor positions, int page_size, int n_entries=-1, str fmt=\"idx_fp4\", *, str? backend=None) -> Tensor",
    check=_check_scoring,
    reference=ref.indexer_logits,
    fake=_fake_logits,
    triton=_tri_logits,
)


def indexer_logits(q, weights, key_cache, block_table, seq_ids, positions, page_size, n_entries=-1, fmt="idx_fp4",
                   *, backend: Optional[str] = None) -> torch.Tensor:
    """Unfused indexer scores over a paged key cache (for tests and engines that want the scores).

    ``I[i, t] = sum_h relu(q[i, h] . K[seq_ids[i], t]) * weights[i, h]`` in fp32 (the model rounds S and
    the head sum to bf16; every backend here stays in fp32), ``-inf`` where entry t is invisible.

    Parameters
    ----------
    q : bf16 [T, H, 128], prepared queries (:func:`indexer_prepare_q`).
    weights : bf16/fp32 [T, H], ``weights_proj(x) * 128^-0.5 * H^-0.5``.
    key_cache : uint8 [num_pages, page_bytes], ``formats.IDX_FP4`` (68 B rows) or ``IDX_FP8`` (132 B).
    block_table : int32 [B, max_pages], physical page of each logical page (-1 = none).
    seq_ids : int [T], block-table row of each token. positions : int [T], token positions.
    page_size : rows per page. n_entries : columns of the result (-1: max_pages * page_size).
    fmt : "idx_fp4" | "idx_fp8".

    Returns
    -------
    fp32 [T, n_entries].
    """
    return indexer_logits_op(q, weights, key_cache, block_table, seq_ids, positions, page_size, n_entries, fmt,
                             backend=backend)


def _check_topk(q, weights, key_cache, block_table, seq_ids, positions, topk, page_size, n_entries=-1,
                fmt="idx_fp4", kv_block_table=None, kv_page_size=0):
    _check_scoring(q, weights, key_cache, block_table, seq_ids, positions, page_size, n_entries, fmt)
    check_range("topk", topk, 1, MAX_TOPK)
    if kv_block_table is not None:
        check_tensor("kv_block_table", kv_block_table, dtype=torch.int32, dim=2)
        check_same_device(q=q, kv_block_table=kv_block_table)
        if kv_block_table.shape[0] != block_table.shape[0]:
            raise ValueError(f"kv_block_table: expected {block_table.shape[0]} rows (one per sequence, like "
                             f"block_table), got {kv_block_table.shape[0]}")
        if kv_page_size < 1:
            raise ValueError(f"kv_page_size: expected >= 1 with a kv_block_table, got {kv_page_size}")


def _fake_topk(q, weights, key_cache, block_table, seq_ids, positions, topk, page_size, n_entries=-1,
               fmt="idx_fp4", kv_block_table=None, kv_page_size=0):
    T = q.shape[0]
    idx = q.new_empty((T, topk), dtype=torch.int32)
    lengths = q.new_empty((T,), dtype=torch.int32)
    rows = q.new_empty((T, topk if kv_block_table is not None else 0), dtype=torch.int32)
    return idx, lengths, rows


def _tri_topk(*args, **kwargs):
    return _triton().indexer_topk(*args, **kwargs)


def _cuda_topk(*args, **kwargs):
    from ..cuda import indexer as cu

    return cu.indexer_topk(*args, **kwargs)


def _cuda_topk_supported(*args, **kwargs):
    from ..cuda import indexer as cu

    return cu.supported(*args, **kwargs)


indexer_topk_op = define_op(
    "indexer_topk(Tensor q, Tensor weights, Tensor key_cache, Tensor block_table, Tensor seq_ids, "
    "Tensor positions, int topk, int page_size, int n_entries=-1, str fmt=\"idx_fp4\", "
    "Tensor? kv_block_table=None, int kv_page_size=0, *, str? backend=None) -> (Tensor, Tensor, Tensor)",
    check=_check_topk,
    reference=ref.indexer_topk,
    fake=_fake_topk,
    triton=_tri_topk,
    cuda=_cuda_topk,  # FP4 keys, page sizes % 4 == 0 (v4kernels/cuda/indexer.py)
    cuda_supported=_cuda_topk_supported,
)


def indexer_topk(q, weights, key_cache, block_table, seq_ids, positions, topk, page_size, n_entries=-1,
                 fmt="idx_fp4", kv_block_table=None, kv_page_size=0, *, backend: Optional[str] = None):
    """Fused indexer scores + top-k over the paged key cache (decode and prefill).

    Scores as :func:`indexer_logits` (fp32; the module doc says how the GPU kernel multiplies). The
    Triton kernel splits each query's entries over programs (about two per SM), streams each tile's
    scores through a threshold filter into a per-chunk selector and writes only the chunk's best keys
    (all of a query's top-k when one program covers it, as in prefill); a second small kernel merges
    the chunk lists. The scores themselves never reach memory, except at small decode batches, where
    each chunk keeps only its best 32-64 candidates and the 4-byte scores stay in an L2-resident
    workspace for the rare chunk holding more winners. Selection: the ``topk`` visible entries with the
    highest scores, sorted by score descending; equal scores -> lower entry index first.

    Backends: "cuda" (sm_90a, FP4 keys with page sizes % 4 == 0; what "auto" picks there, decode and prefill:
    faster than Triton at every benchmark shape): the same FP8 factorisation in a warp-specialised wgmma kernel
    that keeps each chunk's best keys in shared memory, then a CUDA merge kernel (v4kernels/cuda/indexer.py);
    "triton" (every input, and "auto" for FP8 keys or other page sizes); "reference".

    Parameters
    ----------
    (as :func:`indexer_logits`), plus
    topk : slots per token (512 Flash, 1024 Pro; at most 2048).
    kv_block_table : optional int32 [B, kv_max_pages], block table of the main compressed KV cache.
    kv_page_size : its page size.

    Returns
    -------
    indices : int32 [T, topk], logical entry ids (score descending), -1 after the valid ones.
    lengths : int32 [T], valid slots = min(topk, visible entries).
    kv_rows : int32 [T, topk], ``kv_block_table[seq, i // kv_page_size] * kv_page_size + i % kv_page_size``
        for each valid id (-1 elsewhere or where the page is missing); [T, 0] without ``kv_block_table``.
    """
    return indexer_topk_op(q, weights, key_cache, block_table, seq_ids, positions, topk, page_size, n_entries, fmt,
                           kv_block_table, kv_page_size, backend=backend)


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Ragged batch (``cu_seqlens`` int [B+1]) -> int32 [num_tokens] sequence id per token (no host sync)."""
    check_tensor("cu_seqlens", cu_seqlens, dtype=_INT, dim=1)
    return ref.seq_ids_from_cu_seqlens(cu_seqlens, num_tokens)
