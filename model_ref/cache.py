"""Paged caches of a running batch of sequences: window KV, compressed KV, indexer keys, and the
per-sequence compressor states, for every layer (including the MTP block).

Conventions (those of the ops):
* window cache: a ring of ``window_ring`` KV584 rows per sequence (position t at logical slot
  t % window_ring, the attention op's ``window_ring``), ``window_ring = 128 + max_batch_tokens - 1``
  rounded up to whole pages: a batch (prefill chunk) of up to ``max_batch_tokens`` tokens never
  overwrites a row that one of its queries still reads. When ``max_context`` fits in that ring,
  the window is position-addressed (``window_ring = 0``). Per sequence and layer: 8320 rows (4.9 MB)
  at the default 8192 instead of one row per position (612 MB at 1M tokens).
* compressed cache (CSA/HCA layers): KV584 rows, entry ``i`` at logical position ``i``.
* indexer cache (CSA layers): IDX_FP4 rows (68 B), entry ``i`` at logical position ``i``.
* compressor state: fp32 ``[slots, c*r, c*hd]`` per compressor, one slot per sequence, reset to the
  reference's initial values (kv 0, score -inf) when a sequence is allocated: no state leaks
  between requests.
Pages are allocated on the host when a sequence grows (``reserve``) and returned on ``release``.

``numerics="dense"`` (the model's dense mode, no quantization simulation) keeps plain bf16 caches
instead, addressed by (state slot, position): ``dense_window`` [max_seqs, max_context, 512] (RoPE'd
KV, no FP8), ``dense_compressed`` [max_seqs, max_context // r + 1, 512] and ``dense_indexer``
[max_seqs, max_context // 4 + 1, 128] (Hadamard-rotated keys, no FP4). The compressor states are the
same in both modes. Only positions below a sequence's length are ever read, so nothing leaks from a
released sequence into the next one that gets its slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from v4kernels import formats as F
from v4kernels.reference import compressor as comp_ref

from .config import ModelConfig


NUMERICS = ("reference", "dense")
WINDOW = 128  # sliding-window keys per query (spec §5)
# bytes per cached row of each layout of sequence_bytes: (KV row, indexer key row)
LAYOUTS = {
    "v4": (F.KV584.row_bytes, F.IDX_FP4.row_bytes),       # 584-B KV + 68-B MXFP4 indexer keys (ours)
    "v4_fp8_index": (F.KV584.row_bytes, F.IDX_FP8.row_bytes),  # vLLM's default: 132-B FP8 indexer keys
    "bf16": (2 * F.KV_DIM, 2 * F.IDX_DIM),                # the reference's bf16 buffers (1024 B, 256 B)
}


@dataclass
class LayerCaches:
    ratio: int
    window: Optional[F.PagedCache] = None  # reference numerics: paged KV584 / IDX_FP4 caches
    compressed: Optional[F.PagedCache] = None
    indexer: Optional[F.PagedCache] = None
    state_kv: Optional[torch.Tensor] = None  # main compressor
    state_score: Optional[torch.Tensor] = None
    idx_state_kv: Optional[torch.Tensor] = None  # indexer compressor
    idx_state_score: Optional[torch.Tensor] = None
    dense_window: Optional[torch.Tensor] = None  # dense numerics: bf16 [slots, positions, dim]
    dense_compressed: Optional[torch.Tensor] = None
    dense_indexer: Optional[torch.Tensor] = None

    def tensors(self) -> List[torch.Tensor]:
        out = [c.data for c in (self.window, self.compressed, self.indexer) if c is not None]
        return out + [t for t in (self.state_kv, self.state_score, self.idx_state_kv, self.idx_state_score,
                                  self.dense_window, self.dense_compressed, self.dense_indexer) if t is not None]


class CacheManager:
    """All caches of a model for up to ``max_seqs`` sequences of up to ``max_context`` tokens."""

    def __init__(self, cfg: ModelConfig, device, max_seqs: int, max_context: int, page_size: int = 64,
                 numerics: str = "reference", max_batch_tokens: int = 8192):
        if numerics not in NUMERICS:
            raise ValueError(f"numerics: expected one of {NUMERICS}, got {numerics!r}")
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens: expected an int >= 1, got {max_batch_tokens!r}")
        self.numerics = numerics
        self.max_batch_tokens = max_batch_tokens
        self.window_ring = 0 if numerics == "dense" else window_ring(max_context, page_size, max_batch_tokens)
        self.cfg = cfg
        self.device = torch.device(device)
        self.page_size = page_size
        self.max_seqs = max_seqs
        self.max_context = max_context
        self._slots: Dict[int, int] = {}
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._lengths: Dict[int, int] = {}
        self._alloc_ids: Dict[int, int] = {}  # seq_id -> allocation number (tells a reallocated id apart)
        self._n_allocs = 0
        pages = lambda n_rows: max_seqs * (-(-n_rows // page_size)) + 1  # noqa: E731
        self.layers: List[LayerCaches] = []
        dense = numerics == "dense"
        bf16 = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16, device=self.device)  # noqa: E731
        for layer_id, ratio in enumerate(cfg.compress_ratios):
            lc = LayerCaches(ratio)
            if dense:
                lc.dense_window = bf16(max_seqs, max_context, F.KV_DIM)
            else:
                lc.window = F.PagedCache(F.KV584, pages(self.window_ring or max_context), page_size, self.device)
            if ratio > 0:
                n_entries = max_context // ratio + 1
                if dense:
                    lc.dense_compressed = bf16(max_seqs, n_entries, F.KV_DIM)
                else:
                    lc.compressed = F.PagedCache(F.KV584, pages(n_entries), page_size, self.device)
                lc.state_kv, lc.state_score = comp_ref.new_state(max_seqs, ratio, "main", self.device)
            if ratio == 4:
                if dense:
                    lc.dense_indexer = bf16(max_seqs, max_context // 4 + 1, F.IDX_DIM)
                else:
                    lc.indexer = F.PagedCache(F.IDX_FP4, pages(max_context // 4 + 1), page_size, self.device)
                lc.idx_state_kv, lc.idx_state_score = comp_ref.new_state(max_seqs, 4, "indexer", self.device)
            self.layers.append(lc)

    # ------------------------------------------------------------------ sequences
    def allocate(self, seq_id: int) -> int:
        """Register a new sequence; returns its state slot (states reset)."""
        if seq_id in self._slots:
            raise ValueError(f"seq_id: sequence {seq_id} is already allocated")
        if not self._free_slots:
            raise RuntimeError(f"CacheManager: all {self.max_seqs} sequence slots are in use")
        slot = self._free_slots.pop()
        self._slots[seq_id] = slot
        self._lengths[seq_id] = 0
        self._n_allocs += 1
        self._alloc_ids[seq_id] = self._n_allocs
        idx = torch.tensor([slot], device=self.device)
        for lc in self.layers:
            if lc.state_kv is not None:
                comp_ref.reset_state(lc.state_kv, lc.state_score, idx)
            if lc.idx_state_kv is not None:
                comp_ref.reset_state(lc.idx_state_kv, lc.idx_state_score, idx)
        return slot

    def release(self, seq_id: int) -> None:
        slot = self._slots.pop(seq_id)
        self._lengths.pop(seq_id, None)
        self._alloc_ids.pop(seq_id, None)
        self._free_slots.append(slot)
        for lc in self.layers:
            for c in (lc.window, lc.compressed, lc.indexer):
                if c is not None:
                    c.release(seq_id)

    def slot(self, seq_id: int) -> int:
        return self._slots[seq_id]

    def length(self, seq_id: int) -> int:
        return self._lengths[seq_id]

    def allocation_id(self, seq_id: int) -> int:
        """A number unique to this allocation of ``seq_id`` (None once released): a sequence id
        released and allocated again gets a new one."""
        return self._alloc_ids.get(seq_id)

    def rows_held(self, layer_id: int, length: int) -> Dict[str, int]:
        """Rows each paged cache of a layer holds for a sequence of ``length`` tokens (window: the
        ring's rows at most; compressed: one per complete block; indexer: one per 4 tokens)."""
        lc = self.layers[layer_id]
        rows = {"window": min(length, self.window_ring) if self.window_ring else length,
                "compressed": length // lc.ratio if lc.ratio else 0, "indexer": length // 4}
        return {k: rows[k] for k in self.paged(layer_id)}

    def max_pages(self, layer_id: int) -> Dict[str, int]:
        """Block-table width per paged cache of a layer that holds any sequence at ``max_context``."""
        return {k: -(-n // self.page_size) for k, n in self.rows_held(layer_id, self.max_context).items()}

    def paged(self, layer_id: int) -> Dict[str, F.PagedCache]:
        """The paged caches of a layer by block-table name (window, compressed, indexer)."""
        lc = self.layers[layer_id]
        named = {"window": lc.window, "compressed": lc.compressed, "indexer": lc.indexer}
        return {k: c for k, c in named.items() if c is not None}

    def check_length(self, seq_id: int, new_len: int) -> None:
        """Raise ValueError if sequence ``seq_id`` cannot grow to ``new_len`` tokens."""
        if new_len > self.max_context:
            raise ValueError(f"sequence {seq_id}: {new_len} tokens exceed max_context {self.max_context}")

    def reserve(self, seq_id: int, new_len: int) -> None:
        """Grow a sequence to ``new_len`` tokens: pages for its window rows and compressed entries."""
        self.check_length(seq_id, new_len)
        for layer_id in range(len(self.layers)):  # dense caches: nothing paged, all allocated up front
            paged = self.paged(layer_id)
            for name, rows in self.rows_held(layer_id, new_len).items():
                paged[name].reserve(seq_id, rows)
        self._lengths[seq_id] = new_len

    def block_tables(self, layer_id: int, seq_ids: List[int]) -> Dict[str, torch.Tensor]:
        """Block tables of a layer's paged caches for ``seq_ids`` (as wide as the longest sequence);
        empty for dense caches (addressed by state slot)."""
        return {k: c.block_table(seq_ids) for k, c in self.paged(layer_id).items()}

    # ------------------------------------------------------------------ sizes
    def bytes_per_token(self, context: int) -> float:
        return sequence_bytes(self.cfg, context) / max(context, 1)

    def allocated_bytes(self) -> int:
        """Device bytes this manager holds (pages, dense buffers and compressor states, all slots)."""
        return sum(t.numel() * t.element_size() for lc in self.layers for t in lc.tensors())


def window_ring(max_context: int, page_size: int, max_batch_tokens: int) -> int:
    """Window ring rows per sequence (0 = position-addressed, when max_context fits in the ring)."""
    ring = -(-(WINDOW + max_batch_tokens - 1) // page_size) * page_size
    return 0 if max_context <= ring else ring


def manager_bytes(cfg: ModelConfig, max_seqs: int, max_context: int, page_size: int = 64,
                  numerics: str = "reference", max_batch_tokens: int = 8192) -> int:
    """Device bytes ``CacheManager(cfg, ..., max_seqs, max_context, page_size, numerics,
    max_batch_tokens)`` allocates (``allocated_bytes`` of the built manager), without allocating:
    to check that a size fits."""
    pages = lambda n_rows: max_seqs * (-(-n_rows // page_size)) + 1  # noqa: E731
    dense = numerics == "dense"
    ring = 0 if dense else window_ring(max_context, page_size, max_batch_tokens)
    total = 0
    for ratio in cfg.compress_ratios:
        rows = [(ring or max_context, F.KV584, F.KV_DIM)]
        if ratio > 0:
            rows.append((max_context // ratio + 1, F.KV584, F.KV_DIM))
            total += 2 * 4 * math.prod(comp_ref.state_shape(max_seqs, ratio, "main"))
        if ratio == 4:
            rows.append((max_context // 4 + 1, F.IDX_FP4, F.IDX_DIM))
            total += 2 * 4 * math.prod(comp_ref.state_shape(max_seqs, 4, "indexer"))
        for n, fmt, dim in rows:
            total += max_seqs * n * dim * 2 if dense else pages(n) * fmt.page_bytes(page_size)
    return total


def sequence_bytes(cfg: ModelConfig, context: int, layout: str = "v4") -> int:
    """Cache bytes of one sequence at ``context`` tokens as a production engine stores them: a
    128-row window, the compressed rows and the indexer keys of every layer (MTP included).

    ``layout``: "v4" (584-B KV rows + 68-B MXFP4 indexer keys, what v4kernels stores), "v4_fp8_index"
    (132-B FP8 indexer keys, vLLM's default) or "bf16" (the reference's bf16 buffers); spec §6.4 gives
    Flash 3.69 / 4.04 / 7.22 GB and Pro 5.28 / 5.78 / 10.33 GB at 1,048,576 tokens.
    (model_ref's own window cache is a ring of ``128 + max_batch_tokens - 1`` rows, page-rounded:
    ``CacheManager.allocated_bytes`` counts what it really holds.)"""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {tuple(LAYOUTS)}, got {layout!r}")
    kv_row, idx_row = LAYOUTS[layout]
    total = 0
    for ratio in cfg.compress_ratios:
        total += min(context, cfg.window_size) * kv_row
        if ratio > 0:
            total += (context // ratio) * kv_row
        if ratio == 4:
            total += (context // 4) * idx_row
    return total
