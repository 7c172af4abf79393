"""The DeepSeek-V4 forward pass (spec §5, §7, §8, §9) on v4kernels ops, with paged caches.

``Transformer(cfg, weights, device, backend=..., numerics=...)`` runs prefill (ragged batch, any start
positions: chunked prefill) and decode (one token per sequence, each at its own position). Every hot
step goes through a ``v4kernels`` op; ``backend="reference"`` runs the float32 references,
``"auto"`` the fastest kernels.

Numerics modes:
* ``"reference"`` (default): DeepSeek's reference numerics, every fake-quantization point of spec §9.1
  (FP8 activations of every FP8/FP4 linear, FP8 KV caches, FP4 indexer queries and keys).
* ``"dense"``: no quantization simulation: the same weights dequantized (exactly) to bf16, bf16
  activations into every GEMM, bf16 caches. The attention, indexer scoring and compressor then run in
  PyTorch on the unquantized K/V (the v4kernels attention ops read only the FP8 cache layout); the
  point-by-point list is in ``model_ref/dense.py``.

Per block (spec §9): ``X = hc_post(Attn(attn_norm(hc_pre(X))), X)`` then the same with the MoE.
Attention (spec §5): q/kv projections (FP8 linears), q head-norm and RoPE, window-KV write (FP8 nope
quantization in the 584-byte row), indexer (CSA) and compressors updating their caches before the
attention reads them, sparse attention with sinks and fused inverse RoPE, grouped ``wo_a`` (bf16)
and ``wo_b`` (FP8).
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F_
from torch.utils.weak import WeakIdKeyDictionary

import v4kernels.ops.attention as attn_ops
import v4kernels.ops.compressor as comp_ops
import v4kernels.ops.indexer as idx_ops
from v4kernels.ops import formats as fmt_ops
from v4kernels.ops import mhc as mhc_ops
from v4kernels.ops import moe as moe_ops
from v4kernels.ops.linear import fp8_linear
from v4kernels.ops.numerics import apply_rope, hadamard_transform, head_rms_norm, rms_norm
from v4kernels.reference.linear import dequant_weight_fp8_block
from v4kernels.reference.moe import swiglu_clamp
from v4kernels.reference.rope import rope_table

from . import dense
from .cache import NUMERICS, CacheManager
from .config import ModelConfig
from .weights import Weights, expert_stack


@dataclass
class Batch:
    """One forward step: ``lens[b]`` new tokens of sequence ``seq_ids[b]`` starting at ``starts[b]``."""

    seq_ids: List[int]
    starts: List[int]  # host copies, read by the dense path only (empty in a graph.py batch)
    lens: List[int]
    tokens: torch.Tensor  # int64 [T], sequence-major
    cu_seqlens: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B] = start + len
    start_pos: torch.Tensor  # int32 [B]
    positions: torch.Tensor  # int32 [T]
    tok_seq: torch.Tensor  # int32 [T], batch row of each token
    slots: torch.Tensor  # int32 [B], compressor state slots
    is_decode: bool
    # per layer {cache name: int32 [B, pages]}; None: built from the CacheManager at each layer
    # (graph.py passes fixed-width device tables that it keeps up to date itself)
    block_tables: Optional[List[Dict[str, torch.Tensor]]] = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


class Timer:
    """Wall time per op family (synchronizes the device around each region when enabled)."""

    def __init__(self, device):
        self.enabled = False
        self.device = device
        self.totals: Dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[name] += time.perf_counter() - t0


# Tensors derived from weights (fp32 head, stacked experts, dequantized wo_a / dense weights), kept
# per source tensor: two models built from the same weights (kernel path and reference path) share
# them instead of holding two copies (10+ GB at V4-Flash dimensions); freed with the weights. Weights
# must therefore not be modified in place once a model was built from them.
_DERIVED = WeakIdKeyDictionary()


def _derived(src: torch.Tensor, tag: str, make):
    d = _DERIVED.get(src)
    if d is None:
        d = _DERIVED[src] = {}
    if tag not in d:
        v = make()
        if v is src:  # nothing derived (e.g. already fp32): a self-reference would keep src alive
            return v
        d[tag] = v
    return d[tag]


def release_derived() -> None:
    """Drop every cached derived tensor (models alive keep theirs): frees memory between benchmarks."""
    _DERIVED.clear()


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: Weights, device="cpu", backend: Optional[str] = None,
                 max_seqs: int = 4, max_context: Optional[int] = None, page_size: int = 64,
                 moe_mode: str = "w4a8", numerics: str = "reference", max_batch_tokens: int = 8192):
        if numerics not in NUMERICS:
            raise ValueError(f"numerics: expected one of {NUMERICS}, got {numerics!r}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.backend = backend
        self.numerics = numerics
        # dense numerics: no FP8 activations for the routed experts either
        self.moe_mode = "w4a16" if numerics == "dense" else moe_mode
        self.w = {k: v.to(self.device) for k, v in weights.items()}
        self.has_mtp = cfg.n_mtp_layers > 0 and any(k.startswith("mtp.0.") for k in self.w)
        max_context = max_context or min(cfg.max_seq_len, 4096)
        self.max_context = max_context
        self.caches = CacheManager(cfg, self.device, max_seqs, max_context, page_size, numerics, max_batch_tokens)
        self.timer = Timer(self.device)
        # RoPE tables: SWA layers (theta 10000, no YaRN) and compressed layers (160000 + YaRN).
        self.rope = {}
        for lid in range(len(cfg.compress_ratios)):
            theta, yarn = cfg.rope_params(lid)
            key = (theta, yarn)
            if key not in self.rope:
                c, s = rope_table(max_context + 1, theta, yarn)
                self.rope[key] = (c.to(self.device), s.to(self.device))
        # wo_a is used in bf16 (convert.py dequantizes it), the head in fp32 (spec §1.3: upcast at load).
        self.wo_a = {}
        self.experts = {}
        for lid in range(len(cfg.compress_ratios)):
            p = self._prefix(lid)
            if p + "attn.wo_a.weight" not in self.w:
                continue
            self.wo_a[lid] = self._dense_weight(p + "attn.wo_a").view(cfg.o_groups, cfg.o_lora_rank, -1)
        self.head_w = self._fp32("head.weight")

    # ------------------------------------------------------------------ helpers
    def _prefix(self, layer_id: int) -> str:
        if layer_id < self.cfg.n_layers:
            return f"layers.{layer_id}."
        return f"mtp.{layer_id - self.cfg.n_layers}."

    def _experts(self, lid: int):
        """[(w1, s1), (w3, s3), (w2, s2)] stacked for the grouped GEMMs, built on first use (an unused
        MTP block costs no second copy)."""
        if lid not in self.experts:
            p = self._prefix(lid) + "ffn."
            e0 = self.w[p + "experts.0.w1.weight"]
            E = self.cfg.n_routed_experts
            self.experts[lid] = [_derived(e0, "stack_" + n, lambda n=n: expert_stack(self.w, p, E, n))
                                 for n in ("w1", "w3", "w2")]
        return self.experts[lid]

    def _dense_weight(self, name: str) -> torch.Tensor:
        """An FP8 linear's weight dequantized to bf16 (exact: e4m3 times a power of two)."""
        w = self.w[name + ".weight"]
        return _derived(w, "bf16", lambda: dequant_weight_fp8_block(w, self.w[name + ".scale"], torch.bfloat16))

    def _lin(self, x, name):
        if self.numerics == "dense":  # bf16 GEMM, fp32 accumulation, no activation quantization
            return F_.linear(x.to(torch.bfloat16), self._dense_weight(name))
        return fp8_linear(x, self.w[name + ".weight"], self.w[name + ".scale"], backend=self.backend)

    def _rms(self, x, name):
        return rms_norm(x, self._fp32(name), self.cfg.norm_eps, backend=self.backend)

    def _fp32(self, name: str) -> torch.Tensor:
        """A weight in fp32, converted once (not at every step: the compressor projections alone would
        copy ~60 MB per decode step of a CSA+HCA pair of V4-Flash layers)."""
        w = self.w[name]
        return _derived(w, "fp32", lambda: w.float())

    # ------------------------------------------------------------------ sequences
    def new_sequence(self, seq_id: int) -> None:
        self.caches.allocate(seq_id)

    def release(self, seq_id: int) -> None:
        self.caches.release(seq_id)

    def make_batch(self, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> Batch:
        """New tokens for each sequence, appended at its current length (reserves pages)."""
        starts, lens, toks = self.reserve_batch(seq_ids, token_lists)
        dev = self.device
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        positions = [st + j for st, n in zip(starts, lens) for j in range(n)]
        tok_seq = [b for b, n in enumerate(lens) for _ in range(n)]
        i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
        return Batch(
            list(seq_ids), starts, lens, torch.tensor(toks, dtype=torch.int64, device=dev), i32(cu),
            i32([st + n for st, n in zip(starts, lens)]), i32(starts), i32(positions), i32(tok_seq),
            i32([self.caches.slot(s) for s in seq_ids]), all(n == 1 for n in lens),
        )

    def reserve_batch(self, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]]):
        """Check a batch and grow its sequences (pages reserved, lengths advanced), on the host only:
        returns (starts, lens, flat token list). A rejected batch leaves the caches as they were."""
        if len(seq_ids) != len(token_lists):
            raise ValueError(f"token_lists: expected {len(seq_ids)} lists, got {len(token_lists)}")
        starts, lens, toks = [], [], []
        for s, t in zip(seq_ids, token_lists):
            if len(t) == 0:
                raise ValueError(f"token_lists: sequence {s} has no new tokens")
            starts.append(self.caches.length(s))
            lens.append(len(t))
            toks.extend(int(v) for v in t)
        # every check before the first reserve: a rejected batch leaves the caches as they were
        if self.caches.window_ring and len(toks) > self.caches.max_batch_tokens:
            raise ValueError(f"token_lists: expected at most max_batch_tokens = {self.caches.max_batch_tokens} "
                             f"tokens in one batch (the window ring is sized for it), got {len(toks)}")
        if toks and (min(toks) < 0 or max(toks) >= self.cfg.vocab_size):
            raise ValueError(f"tokens: expected ids in [0, {self.cfg.vocab_size}), got [{min(toks)}, {max(toks)}]")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids: expected distinct sequences, got {list(seq_ids)}")
        for s, st, n in zip(seq_ids, starts, lens):
            self.caches.check_length(s, st + n)
        for s, st, n in zip(seq_ids, starts, lens):
            self.caches.reserve(s, st + n)
        return starts, lens, toks

    # ------------------------------------------------------------------ attention sub-layer
    def _attention(self, lid: int, x: torch.Tensor, bt: Dict[str, torch.Tensor], batch: Batch, plan) -> torch.Tensor:
        cfg, be = self.cfg, self.backend
        a = self._prefix(lid) + "attn."
        T, H = x.shape[0], cfg.n_heads
        cos, sin = self.rope[cfg.rope_params(lid)]
        pos = batch.positions
        with self.timer("linear"):
            qr = self._rms(self._lin(x, a + "wq_a"), a + "q_norm.weight")
            q = self._lin(qr, a + "wq_b").view(T, H, cfg.head_dim)
            kv = self._rms(self._lin(x, a + "wkv"), a + "kv_norm.weight")
        with self.timer("norm_rope"):
            q = apply_rope(head_rms_norm(q, cfg.norm_eps, backend=be), pos, cos, sin, backend=be)
            kv = apply_rope(kv, pos, cos, sin, backend=be)
        if self.numerics == "dense":
            o = self._attention_dense(lid, x, qr, q, kv, batch, cos, sin)
        else:
            o = self._attention_cached(lid, x, qr, q, kv, bt, batch, plan, cos, sin)
        with self.timer("linear"):
            G = cfg.o_groups
            z = torch.einsum("tgd,grd->tgr", o.reshape(T, G, -1), self.wo_a[lid])  # bf16, as the reference
            return self._lin(z.flatten(1), a + "wo_b")

    def _attention_cached(self, lid, x, qr, q, kv, bt, batch: Batch, plan, cos, sin) -> torch.Tensor:
        """Reference numerics: FP8/FP4 paged caches and the v4kernels attention, indexer, compressor ops."""
        cfg, p, be = self.cfg, self._prefix(lid), self.backend
        a = p + "attn."
        T, H = x.shape[0], cfg.n_heads
        ratio = cfg.compress_ratios[lid]
        kind = cfg.layer_kind(lid)
        lc = self.caches.layers[lid]
        ps = self.caches.page_size
        pos = batch.positions
        with self.timer("cache_write"):
            wrows = _rows(bt["window"], batch.tok_seq, pos, ps, self.caches.window_ring)
            fmt_ops.kv584_write(lc.window.data, wrows, kv, ps, backend=be)
        indices = topk_lens = None
        xf = None
        if ratio > 0:
            xf = x.float()
        if ratio == 4:
            with self.timer("indexer"):
                ic = a + "indexer."
                qi = self._lin(qr, ic + "wq_b").view(T, cfg.index_n_heads, cfg.index_head_dim)
                qi = idx_ops.indexer_prepare_q(qi, pos, cos, sin, backend=be)
                wts = F_.linear(x, self.w[ic + "weights_proj.weight"]) * (
                    cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5)
            with self.timer("compressor"):
                self._compress(lid, "indexer", ic + "compressor.", xf, batch, lc.indexer, bt["indexer"],
                               lc.idx_state_kv, lc.idx_state_score, cos, sin)
            with self.timer("indexer"):
                indices, topk_lens, _ = idx_ops.indexer_topk(
                    qi, wts, lc.indexer.data, bt["indexer"], batch.tok_seq, pos, cfg.index_topk, ps, backend=be)
        if ratio > 0:
            with self.timer("compressor"):
                self._compress(lid, "main", a + "compressor.", xf, batch, lc.compressed, bt["compressed"],
                               lc.state_kv, lc.state_score, cos, sin)
        with self.timer("attention"):
            common = dict(
                kind=kind, window_page_size=ps, window_ring=self.caches.window_ring,
                compressed_cache=lc.compressed.data if lc.compressed is not None else None,
                compressed_block_table=bt.get("compressed"), compressed_page_size=ps,
                attn_sink=self._fp32(a + "attn_sink"), rope_cos=cos, rope_sin=sin, plan=plan, backend=be,
            )
            if batch.is_decode:
                o, _ = attn_ops.sparse_attn_decode(
                    q.view(T, 1, H, -1), lc.window.data, bt["window"], batch.seq_lens,
                    indices=indices.view(T, 1, -1) if indices is not None else None,
                    topk_lens=topk_lens, **common)
                o = o.view(T, H, -1)
            else:
                o, _ = attn_ops.sparse_attn_prefill(
                    q, batch.cu_seqlens, batch.seq_lens, lc.window.data, bt["window"], indices=indices,
                    topk_lens=topk_lens, **common)
        return o

    def _attention_dense(self, lid, x, qr, q, kv, batch: Batch, cos, sin) -> torch.Tensor:
        """Dense numerics: bf16 caches, no FP8/FP4 anywhere; attention/indexer/compressor in PyTorch (dense.py)."""
        cfg, be = self.cfg, self.backend
        a = self._prefix(lid) + "attn."
        T = x.shape[0]
        ratio = cfg.compress_ratios[lid]
        lc = self.caches.layers[lid]
        pos = batch.positions
        tok_slot = batch.slots.long()[batch.tok_seq.long()]
        slots = [self.caches.slot(s) for s in batch.seq_ids]  # host ints (no device sync)
        with self.timer("cache_write"):
            lc.dense_window[tok_slot, pos.long()] = kv
        indices = None
        xf = x.float() if ratio > 0 else None
        if ratio == 4:
            with self.timer("indexer"):
                ic = a + "indexer."
                qi = self._lin(qr, ic + "wq_b").view(T, cfg.index_n_heads, cfg.index_head_dim)
                qi = hadamard_transform(apply_rope(qi, pos, cos, sin, backend=be), backend=be)  # no FP4
                wts = F_.linear(x, self.w[ic + "weights_proj.weight"]) * (
                    cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5)
            with self.timer("compressor"):
                self._compress_dense(lid, "indexer", ic + "compressor.", xf, batch, slots, lc.dense_indexer,
                                     lc.idx_state_kv, lc.idx_state_score, cos, sin)
            with self.timer("indexer"):
                indices = dense.indexer_topk(qi, wts, lc.dense_indexer, tok_slot, pos, cfg.index_topk)
        if ratio > 0:
            with self.timer("compressor"):
                self._compress_dense(lid, "main", a + "compressor.", xf, batch, slots, lc.dense_compressed,
                                     lc.state_kv, lc.state_score, cos, sin)
        with self.timer("attention"):
            return dense.attention(q, pos, tok_slot, lc.dense_window, lc.dense_compressed, cfg.layer_kind(lid),
                                   indices, self._fp32(a + "attn_sink"), cos, sin)

    def _compress_dense(self, lid, kind, prefix, xf, batch, slots, cache, state_kv, state_score, cos, sin):
        kv = F_.linear(xf, self._fp32(prefix + "wkv.weight"))
        score = F_.linear(xf, self._fp32(prefix + "wgate.weight"))
        ratio = 4 if kind == "indexer" else self.cfg.compress_ratios[lid]
        vals, rows, ids = dense.compress(kv, score, batch.starts, batch.lens, slots, state_kv, state_score,
                                         self.w[prefix + "ape"], self._fp32(prefix + "norm.weight"), cos, sin,
                                         ratio, kind)
        dense.write_rows(cache, batch.slots.long()[rows], ids, vals)

    def _compress(self, lid, kind, prefix, xf, batch, cache, block_table, state_kv, state_score, cos, sin):
        kv = F_.linear(xf, self._fp32(prefix + "wkv.weight"))
        score = F_.linear(xf, self._fp32(prefix + "wgate.weight"))
        ratio = 4 if kind == "indexer" else self.cfg.compress_ratios[lid]
        args = (self.w[prefix + "ape"], self._fp32(prefix + "norm.weight"), cos, sin, cache.data, block_table,
                self.caches.page_size, ratio, kind)
        if batch.is_decode:
            comp_ops.compress_kv_decode(kv, score, batch.positions, state_kv, state_score, *args,
                                        state_slots=batch.slots, backend=self.backend)
        else:
            comp_ops.compress_kv(kv, score, batch.cu_seqlens, batch.start_pos, state_kv, state_score, *args,
                                 state_slots=batch.slots, backend=self.backend)

    # ------------------------------------------------------------------ MoE sub-layer
    def _moe(self, lid: int, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        cfg, f = self.cfg, self._prefix(lid) + "ffn."
        (w1, s1), (w3, s3), (w2, s2) = self._experts(lid)
        hash_layer = f + "gate.tid2eid" in self.w
        if self.numerics == "dense":
            return self._moe_dense(lid, x, batch, hash_layer)
        return moe_ops.moe_forward(
            x, self.w[f + "gate.weight"], None if hash_layer else self.w[f + "gate.bias"],
            w1, s1, w3, s3, w2, s2,
            self.w[f + "shared_experts.w1.weight"], self.w[f + "shared_experts.w1.scale"],
            self.w[f + "shared_experts.w3.weight"], self.w[f + "shared_experts.w3.scale"],
            self.w[f + "shared_experts.w2.weight"], self.w[f + "shared_experts.w2.scale"],
            tid2eid=self.w[f + "gate.tid2eid"] if hash_layer else None,
            token_ids=batch.tokens if hash_layer else None,
            topk=cfg.n_activated_experts, route_scale=cfg.route_scale, swiglu_limit=cfg.swiglu_limit,
            mode=self.moe_mode, backend=self.backend,
        )

    def _moe_dense(self, lid: int, x: torch.Tensor, batch: Batch, hash_layer: bool) -> torch.Tensor:
        """``moe_forward`` with bf16 activations: W4A16 routed experts, shared expert on dequantized
        weights (the same route, grouping and fp32 combine)."""
        cfg, f, be = self.cfg, self._prefix(lid) + "ffn.", self.backend
        (w1, s1), (w3, s3), (w2, s2) = self._experts(lid)
        k = cfg.n_activated_experts
        ids, wts = moe_ops.moe_route(x, self.w[f + "gate.weight"], None if hash_layer else self.w[f + "gate.bias"],
                                     self.w[f + "gate.tid2eid"] if hash_layer else None,
                                     batch.tokens if hash_layer else None, k, cfg.route_scale, backend=be)
        pairs, offsets, pair_rows = moe_ops.moe_group(ids, cfg.n_routed_experts, 1, backend=be)
        valid = pairs >= 0
        row_ids = torch.where(valid, pairs // k, -1).to(torch.int32)
        row_w = torch.where(valid, wts.reshape(-1)[pairs.clamp_min(0).long()], torch.zeros((), device=x.device))
        h = moe_ops.moe_grouped_swiglu_mxfp4(x, None, w1, s1, w3, s3, offsets, row_ids, row_w, "w4a16",
                                             cfg.swiglu_limit, backend=be)
        y = moe_ops.moe_grouped_gemm_mxfp4(h, None, w2, s2, offsets, None, "w4a16", backend=be)
        se = f + "shared_experts."
        hs = swiglu_clamp(self._lin(x, se + "w1"), self._lin(x, se + "w3"), cfg.swiglu_limit).to(torch.bfloat16)
        return moe_ops.moe_combine(y, pair_rows, None, self._lin(hs, se + "w2"), False, backend=be)

    # ------------------------------------------------------------------ block
    def _block(self, lid: int, X: torch.Tensor, batch: Batch, plan) -> torch.Tensor:
        p, be, cfg = self._prefix(lid), self.backend, self.cfg
        bt = batch.block_tables[lid] if batch.block_tables is not None else \
            self.caches.block_tables(lid, batch.seq_ids)
        hc = dict(norm_eps=cfg.norm_eps, hc_eps=cfg.hc_eps, sinkhorn_iters=cfg.hc_sinkhorn_iters, backend=be)
        with self.timer("mhc"):
            y, post, comb = mhc_ops.mhc_pre(X, self.w[p + "hc_attn_fn"], self.w[p + "hc_attn_base"],
                                            self.w[p + "hc_attn_scale"], **hc)
            x = self._rms(y, p + "attn_norm.weight")
        out = self._attention(lid, x, bt, batch, plan)
        with self.timer("mhc"):
            X = mhc_ops.mhc_post(out, X, post, comb, backend=be)
            y, post, comb = mhc_ops.mhc_pre(X, self.w[p + "hc_ffn_fn"], self.w[p + "hc_ffn_base"],
                                            self.w[p + "hc_ffn_scale"], **hc)
            x = self._rms(y, p + "ffn_norm.weight")
        with self.timer("moe"):
            out = self._moe(lid, x, batch)
        with self.timer("mhc"):
            return mhc_ops.mhc_post(out, X, post, comb, backend=be)

    def _head(self, X: torch.Tensor, prefix: str, norm: str) -> torch.Tensor:
        cfg = self.cfg
        with self.timer("mhc"):
            h = mhc_ops.mhc_head(X, self.w[prefix + "hc_head_fn"], self.w[prefix + "hc_head_base"],
                                 self.w[prefix + "hc_head_scale"], cfg.norm_eps, cfg.hc_eps, backend=self.backend)
        with self.timer("head"):
            return F_.linear(self._rms(h, norm).float(), self.head_w)

    def _plan(self, batch: Batch):
        H = self.cfg.n_heads
        cap = max(1, self.max_context // 128)
        if batch.is_decode:
            return attn_ops.attention_plan(batch.seq_lens, H, s_q=1, csa_topk=self.cfg.index_topk, hca_capacity=cap)
        return attn_ops.attention_plan(batch.seq_lens, H, cu_seqlens=batch.cu_seqlens, num_tokens=batch.num_tokens,
                                       csa_topk=self.cfg.index_topk, hca_capacity=cap)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def run_layers(self, batch: Batch) -> torch.Tensor:
        """Embedding and the main stack: the residual streams X bf16 [T, 4, d] (no head)."""
        cfg = self.cfg
        h = self.w["embed.weight"][batch.tokens]  # bf16 [T, d]
        X = h[:, None, :].expand(-1, cfg.hc_mult, -1).contiguous()
        plan = self._plan(batch) if self.numerics == "reference" else None
        for lid in range(cfg.n_layers):
            X = self._block(lid, X, batch, plan)
        return X

    @torch.no_grad()
    def forward(self, batch: Batch, all_logits: bool = False, return_streams: bool = False):
        """Run the main stack on a batch; logits fp32 [T, vocab] (all) or [B, vocab] (last of each)."""
        X = self.run_layers(batch)
        sel = X if all_logits else X[batch.cu_seqlens[1:].long() - 1]
        logits = self._head(sel, "", "norm.weight")
        return (logits, X) if return_streams else logits

    @torch.no_grad()
    def mtp_forward(self, batch: Batch, X_main: torch.Tensor, next_tokens: torch.Tensor, all_logits: bool = False):
        """The MTP block (spec §9): main stream state at position t and the token at t+1 predict t+2.

        ``next_tokens`` int64 [T] are the tokens at positions t+1 of the batch's tokens; the MTP
        layer keeps its own caches (same positions as the main model)."""
        if not self.has_mtp:
            raise RuntimeError("mtp_forward: the weights have no mtp.0.* tensors")
        cfg, p, lid = self.cfg, "mtp.0.", cfg_mtp_layer(self.cfg)
        e = self._rms(self.w["embed.weight"][next_tokens], p + "enorm.weight")
        Xn = self._rms(X_main, p + "hnorm.weight")  # per stream over d
        X = (self._lin(e, p + "e_proj")[:, None, :] + self._lin(Xn, p + "h_proj")).contiguous()
        X = self._block(lid, X, batch, self._plan(batch) if self.numerics == "reference" else None)
        sel = X if all_logits else X[batch.cu_seqlens[1:].long() - 1]
        return self._head(sel, p, p + "norm.weight")

    def prefill(self, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]], all_logits: bool = False):
        return self.forward(self.make_batch(seq_ids, token_lists), all_logits)

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int]):
        return self.forward(self.make_batch(seq_ids, [[t] for t in tokens]))


def cfg_mtp_layer(cfg: ModelConfig) -> int:
    return cfg.n_layers


def _rows(block_table: torch.Tensor, tok_seq: torch.Tensor, positions: torch.Tensor, page_size: int,
          ring: int = 0) -> torch.Tensor:
    """Physical window rows of the batch's tokens (int64 [T]; every page was reserved); ``ring`` > 0:
    position t at logical slot t % ring."""
    pos = positions.long()
    if ring:
        pos = pos % ring
    page = block_table.long()[tok_seq.long(), pos // page_size]
    return page * page_size + pos % page_size
