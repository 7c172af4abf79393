"""Paged caches of a running batch of sequences: window KV, compressed KV, indexer keys, and the
per-sequence compressor states, for every layer (including the MTP block).

Conventions (those of the ops):
* window cache: KV584 rows addressed by token position (``window_ring = 0`` of the attention op);
  the raw KV of every position is written, and the attention reads the last 128.
* compressed cache (CSA/HCA layers): KV584 rows, entry ``i`` at logical position ``i``.
* indexer cache (CSA layers): IDX_FP4 rows (68 B), entry ``i`` at logical position ``i``.
* compressor state: fp32 ``[slots, c*r, c*hd]`` per compressor, one slot per sequence, reset to the
  reference's initial values (kv 0, score -inf) when a sequence is allocated: no state leaks
  between requests.
Pages are allocated on the host when a sequence grows (``reserve``) and returned on ``release``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from v4kernels import formats as F
from v4kernels.reference import compressor as comp_ref

from .config import ModelConfig


@dataclass
class LayerCaches:
    ratio: int
    window: F.PagedCache
    compressed: Optional[F.PagedCache] = None
    indexer: Optional[F.PagedCache] = None
    state_kv: Optional[torch.Tensor] = None  # main compressor
    state_score: Optional[torch.Tensor] = None
    idx_state_kv: Optional[torch.Tensor] = None  # indexer compressor
    idx_state_score: Optional[torch.Tensor] = None


class CacheManager:
    """All caches of a model for up to ``max_seqs`` sequences of up to ``max_context`` tokens."""

    def __init__(self, cfg: ModelConfig, device, max_seqs: int, max_context: int, page_size: int = 64):
        self.cfg = cfg
        self.device = torch.device(device)
        self.page_size = page_size
        self.max_seqs = max_seqs
        self.max_context = max_context
        self._slots: Dict[int, int] = {}
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._lengths: Dict[int, int] = {}
        pages = lambda n_rows: max_seqs * (-(-n_rows // page_size)) + 1  # noqa: E731
        self.layers: List[LayerCaches] = []
        for layer_id, ratio in enumerate(cfg.compress_ratios):
            lc = LayerCaches(ratio, F.PagedCache(F.KV584, pages(max_context), page_size, self.device))
            if ratio > 0:
                n_entries = max_context // ratio + 1
                lc.compressed = F.PagedCache(F.KV584, pages(n_entries), page_size, self.device)
                lc.state_kv, lc.state_score = comp_ref.new_state(max_seqs, ratio, "main", self.device)
            if ratio == 4:
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
        self._free_slots.append(slot)
        for lc in self.layers:
            for c in (lc.window, lc.compressed, lc.indexer):
                if c is not None:
                    c.release(seq_id)

    def slot(self, seq_id: int) -> int:
        return self._slots[seq_id]

    def length(self, seq_id: int) -> int:
        return self._lengths[seq_id]

    def reserve(self, seq_id: int, new_len: int) -> None:
        """Grow a sequence to ``new_len`` tokens: pages for its window rows and compressed entries."""
        if new_len > self.max_context:
            raise ValueError(f"sequence {seq_id}: {new_len} tokens exceed max_context {self.max_context}")
        for lc in self.layers:
            lc.window.reserve(seq_id, new_len)
            if lc.compressed is not None:
                lc.compressed.reserve(seq_id, new_len // lc.ratio)
            if lc.indexer is not None:
                lc.indexer.reserve(seq_id, new_len // 4)
        self._lengths[seq_id] = new_len

    def block_tables(self, layer_id: int, seq_ids: List[int]) -> Dict[str, torch.Tensor]:
        lc = self.layers[layer_id]
        out = {"window": lc.window.block_table(seq_ids)}
        if lc.compressed is not None:
            out["compressed"] = lc.compressed.block_table(seq_ids)
        if lc.indexer is not None:
            out["indexer"] = lc.indexer.block_table(seq_ids)
        return out

    # ------------------------------------------------------------------ sizes
    def bytes_per_token(self, context: int) -> float:
        return sequence_bytes(self.cfg, context) / max(context, 1)


def sequence_bytes(cfg: ModelConfig, context: int) -> int:
    """Cache bytes of one sequence at ``context`` tokens as a production engine stores them: a
    128-row window, the compressed rows and the FP4 indexer keys of every layer (MTP included)."""
    total = 0
    for ratio in cfg.compress_ratios:
        total += min(context, cfg.window_size) * F.KV584.row_bytes
        if ratio > 0:
            total += (context // ratio) * F.KV584.row_bytes
        if ratio == 4:
            total += (context // 4) * F.IDX_FP4.row_bytes
    return total
