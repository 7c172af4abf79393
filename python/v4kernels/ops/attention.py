"""V4 attention over the paged FP8 caches (spec §5, §6.2): CSA, HCA and SWA-only layers.

One shared 512-d K=V head (MQA), H query heads (any H >= 1; the Triton kernel runs blocks of 64 heads
and masks the rest), softmax scale 512^-0.5, a per-head sink logit in the denominator only. Each query
token attends, in ONE softmax, its window (positions ``max(0, p-127) .. p``) and its compressed
entries (CSA: top-k logical ids; HCA: all ``i < (p+1)//128``; SWA: none).

=========================  ===============================================================  =====================
op                         inputs                                                           outputs
=========================  ===============================================================  =====================
``attention_plan``         seq_lens [B], num_heads, s_q (decode) or cu_seqlens + num_tokens  ``AttentionPlan``
``sparse_attn_decode``     q bf16 [B, s_q, H, 512], caches + block tables, seq_lens [B],     out bf16 [B,s_q,H,512],
                           indices int32 [B, s_q, topk] (CSA), topk_lens int32 [B]           lse fp32 [B, s_q, H]
``sparse_attn_prefill``    q bf16 [T, H, 512], cu_seqlens int32 [B+1], seq_lens [B],         out bf16 [T, H, 512],
                           indices int32 [T, topk] (CSA), topk_lens int32 [T]                lse fp32 [T, H]
=========================  ===============================================================  =====================

Both ops accept ``out=``/``lse_out=`` (preallocated, written in place through the ``*_out`` op) and
``plan=`` (computed once per batch by ``attention_plan`` and reused by every layer: token -> (sequence,
position) map and split-KV factors per layer kind, from host ints only).

Conventions
-----------
* **Positions**: ``seq_lens[b]`` = position + 1 of sequence b's last query token. Decode token i of
  sequence b sits at ``seq_lens[b] - s_q + i``; prefill token ``cu[b] + j`` at
  ``seq_lens[b] - (cu[b+1] - cu[b]) + j`` (chunked prefill at any start position). The KV of the
  query tokens is already in the caches (the caller writes the window and compressor first, §5.5).
* **Caches**: KV584 paged caches (``v4kernels.formats``), uint8 [num_pages, page_bytes].
* **Window cache** (``window_ring`` = 0, the default): addressed by logical position; position t is
  at row ``window_block_table[b, t // wps] * wps + t % wps``. Only the last 128 positions are read,
  so an engine may free older pages (table entry -1). ``window_ring = R > 0``: a ring of R slots,
  position t at logical slot ``t % R``; needs ``R >= 128 + s_q - 1`` (decode) so that no query's
  window was overwritten by a later query of the same step (prefill chunks need the position-
  addressed form or a ring that covers the chunk plus 127).
* **Compressed cache**: logical entry i of sequence b at ``compressed_block_table[b, i // cps] * cps +
  i % cps``. CSA ``indices`` are **logical entry ids** (the indexer's output), ``-1`` = empty.
* **Ignored keys** (never dereferenced, whatever their value): window positions < 0; compressed ids
  outside ``[0, (p+1) // ratio)`` (ratio 4 CSA, 128 HCA: causality, so ``-1``, INT_MIN, INT_MAX and
  the row count are all ignored); CSA slots ``>= topk_lens``; block-table columns past the table;
  table entries outside ``[0, num_pages)``.
* **Results**: ``lse`` = natural-log log-sum-exp of the real keys' scaled logits, without the sink
  (FlashMLA: ``out = softmax-without-sink-out * exp(lse) / (exp(lse) + exp(sink))``). A query with no
  valid key: out = 0, lse = +inf. ``rope_cos``/``rope_sin`` ([max_pos, 32] fp32, reference/rope.py)
  fuse the inverse RoPE of ``out[..., 448:]`` at the query position; positions outside the table
  are left unrotated.
* **Numerics**: the Triton kernel accumulates q.k in fp32 from bf16 inputs, casts P to bf16 for
  P.V and sums P in fp32 (spec §5.3); the float32 reference keeps P in fp32. Tests: FlashMLA-style
  per-element tolerance plus a global ``calc_diff`` bound.
* **CUDA graphs**: with ``plan=`` (or none), decode runs without host syncs and with fixed shapes;
  the key-row and split-KV workspaces are allocated per call from the caching allocator. The Triton
  backend makes 2 launches per call (key rows, attention) plus the combine when it splits the keys,
  and needs 16-byte aligned caches (any tensor from the allocator, or a whole-page slice of one).
* **Backends**: "cuda" (sm_90a, v4kernels._C; what "auto" picks on an H100/H200) runs the same key-row
  and combine kernels with the warp-specialised wgmma attention loop of csrc/attention/sparse_attn_fwd.cu
  in the middle (v4kernels/cuda/attention.py); same numerics as the Triton kernel up to the order of fp32
  sums and its 32-key tiles (the online softmax rescales at other points, so bf16(P) can differ by an ulp).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .. import formats as F
from .._checks import check_choice, check_same_device, check_tensor
from .._dispatch import define_op
from ..reference import attention as ref
from ..triton import attention as tri

KINDS = ("csa", "hca", "swa")
MAX_SPLITS = 256


# ----------------------------------------------------------------------------- plan
@dataclass
class AttentionPlan:
    """Per-batch scheduling metadata, reused by every attention layer of one step.

    ``tokens``: int32 [2, T] = (sequence id, position) of each query token (token-major).
    ``num_splits``: split-KV factor per layer kind ("swa", "csa", "hca"); 1 = direct path."""

    tokens: torch.Tensor
    num_heads: int
    num_splits: Dict[str, int] = field(default_factory=dict)
    s_q: Optional[int] = None  # decode: queries per sequence; None for prefill


def attention_plan(
    seq_lens: torch.Tensor,
    num_heads: int,
    *,
    s_q: Optional[int] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    num_tokens: Optional[int] = None,
    csa_topk: int = 0,
    hca_capacity: int = 0,
    num_splits: Optional[Dict[str, int]] = None,
) -> AttentionPlan:
    """Plan one batch (no host sync: everything is computed from shapes and host ints).

    Decode: ``s_q`` queries per sequence. Prefill: ``cu_seqlens`` [B+1] and ``num_tokens`` (= T, a host
    int). ``csa_topk``: the index row width of CSA layers; ``hca_capacity``: the most compressed entries
    an HCA layer's block table can address (``compressed_block_table.shape[1] * page_size``); both
    only size the split-KV factor. ``num_splits`` overrides the factor per kind."""
    check_tensor("seq_lens", seq_lens, dtype=(torch.int32, torch.int64), dim=1)
    if (s_q is None) == (cu_seqlens is None):
        raise ValueError("attention_plan: expected exactly one of s_q (decode) and cu_seqlens (prefill)")
    if s_q is not None:
        if s_q < 1:
            raise ValueError(f"s_q: expected >= 1, got {s_q}")
        tok_seq, tok_pos = ref.decode_positions(seq_lens, s_q)
    else:
        if num_tokens is None:
            raise ValueError("num_tokens: expected the total query tokens T (host int) with cu_seqlens")
        tok_seq, tok_pos = ref.prefill_positions(cu_seqlens, seq_lens, num_tokens)
    tokens = torch.stack((tok_seq, tok_pos)).to(torch.int32)
    T = tokens.shape[1]
    splits = {}
    for kind in KINDS:
        if num_splits and kind in num_splits:
            splits[kind] = int(num_splits[kind])
        else:
            splits[kind] = tri.choose_num_splits(T, num_heads, kind, csa_topk, hca_capacity, seq_lens.device)
    return AttentionPlan(tokens, num_heads, splits, s_q)


# ----------------------------------------------------------------------------- checks
def _check_common(q, H, window_cache, window_block_table, compressed_cache, compressed_block_table, indices,
                  topk_lens, seq_lens, attn_sink, kind, window_page_size, compressed_page_size, window_ring,
                  rope_cos, rope_sin, plan_tokens, num_splits, B, T, s_q_max, idx_shape, tkl_shape):
    check_choice("kind", kind, KINDS)
    if window_page_size < 1:
        raise ValueError(f"window_page_size: expected >= 1, got {window_page_size}")
    F.check_cache("window_cache", window_cache, F.KV584, window_page_size)
    check_tensor("window_block_table", window_block_table, dtype=torch.int32, shape=(B, None))
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, shape=(B,))
    if window_ring != 0 and window_ring < 128 + s_q_max - 1:
        raise ValueError(
            f"window_ring: expected 0 (position-addressed) or >= {128 + s_q_max - 1} (128 + s_q - 1), got {window_ring}"
        )
    if window_ring < 0:
        raise ValueError(f"window_ring: expected >= 0, got {window_ring}")
    if kind in ("csa", "hca"):
        if compressed_cache is None or compressed_block_table is None:
            raise ValueError(f"compressed_cache: kind {kind!r} needs compressed_cache and compressed_block_table, got None")
        if compressed_page_size < 1:
            raise ValueError(f"compressed_page_size: expected >= 1, got {compressed_page_size}")
        F.check_cache("compressed_cache", compressed_cache, F.KV584, compressed_page_size)
        check_tensor("compressed_block_table", compressed_block_table, dtype=torch.int32, shape=(B, None))
    if kind == "csa":
        if indices is None:
            raise ValueError("indices: kind 'csa' needs the top-k logical entry ids, got None")
        check_tensor("indices", indices, dtype=torch.int32, shape=idx_shape, last_dim_contiguous=True)
        if topk_lens is not None:
            check_tensor("topk_lens", topk_lens, dtype=torch.int32, shape=tkl_shape)
    else:
        if indices is not None:
            raise ValueError(f"indices: expected None for kind {kind!r} (only 'csa' takes indices)")
        if topk_lens is not None:
            raise ValueError(f"topk_lens: expected None for kind {kind!r}")
    if attn_sink is not None:
        check_tensor("attn_sink", attn_sink, dtype=torch.float32, shape=(H,), contiguous=True)
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos/rope_sin: expected both or neither")
    if rope_cos is not None:
        check_tensor("rope_cos", rope_cos, dtype=torch.float32, shape=(None, 32), contiguous=True)
        check_tensor("rope_sin", rope_sin, dtype=torch.float32, shape=tuple(rope_cos.shape), contiguous=True)
    if plan_tokens is not None:
        check_tensor("plan_tokens", plan_tokens, dtype=torch.int32, shape=(2, T), contiguous=True)
    if not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected 0 (auto) .. {MAX_SPLITS}, got {num_splits}")
    check_same_device(q=q, window_cache=window_cache, window_block_table=window_block_table,
                      compressed_cache=compressed_cache, compressed_block_table=compressed_block_table,
                      indices=indices, topk_lens=topk_lens, seq_lens=seq_lens, attn_sink=attn_sink,
                      rope_cos=rope_cos, rope_sin=rope_sin, plan_tokens=plan_tokens)


def _check_out(out, lse, oshape, lshape, device):
    check_tensor("out", out, dtype=torch.bfloat16, shape=oshape, contiguous=True)
    check_tensor("lse_out", lse, dtype=torch.float32, shape=lshape, contiguous=True)
    check_same_device(q=torch.empty(0, device=device), out=out, lse_out=lse)


def _check_decode(q, window_cache, window_block_table, compressed_cache, compressed_block_table, indices, topk_lens,
                  seq_lens, attn_sink, kind, window_page_size, compressed_page_size=1, window_ring=0, rope_cos=None,
                  rope_sin=None, plan_tokens=None, num_splits=0):
    check_tensor("q", q, dtype=torch.bfloat16, shape=(None, None, None, 512), last_dim_contiguous=True)
    B, s_q, H, _ = q.shape
    if s_q < 1 or H < 1:
        raise ValueError(f"q: expected s_q >= 1 and H >= 1, got shape {tuple(q.shape)}")
    topk = indices.shape[-1] if isinstance(indices, torch.Tensor) and indices.dim() == 3 else None
    _check_common(q, H, window_cache, window_block_table, compressed_cache, compressed_block_table, indices,
                  topk_lens, seq_lens, attn_sink, kind, window_page_size, compressed_page_size, window_ring,
                  rope_cos, rope_sin, plan_tokens, num_splits, B, B * s_q, s_q, (B, s_q, topk), (B,))


def _check_prefill(q, cu_seqlens, seq_lens, window_cache, window_block_table, compressed_cache,
                   compressed_block_table, indices, topk_lens, attn_sink, kind, window_page_size,
                   compressed_page_size=1, window_ring=0, rope_cos=None, rope_sin=None, plan_tokens=None,
                   num_splits=0):
    check_tensor("q", q, dtype=torch.bfloat16, shape=(None, None, 512), last_dim_contiguous=True)
    T, H, _ = q.shape
    if H < 1:
        raise ValueError(f"q: expected H >= 1, got shape {tuple(q.shape)}")
    check_tensor("cu_seqlens", cu_seqlens, dtype=torch.int32, dim=1)
    B = cu_seqlens.shape[0] - 1
    if B < 1:
        raise ValueError(f"cu_seqlens: expected B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    topk = indices.shape[-1] if isinstance(indices, torch.Tensor) and indices.dim() == 2 else None
    # a chunk longer than the ring would read overwritten slots: bound by T (host int)
    _check_common(q, H, window_cache, window_block_table, compressed_cache, compressed_block_table, indices,
                  topk_lens, seq_lens, attn_sink, kind, window_page_size, compressed_page_size, window_ring,
                  rope_cos, rope_sin, plan_tokens, num_splits, B, T, T, (T, topk), (T,))


# ----------------------------------------------------------------------------- implementations
def _tokens_decode(seq_lens, s_q, plan_tokens):
    if plan_tokens is not None:
        return plan_tokens[0], plan_tokens[1]
    ts, tp = ref.decode_positions(seq_lens, s_q)
    return ts.int(), tp.int()


def _tokens_prefill(cu_seqlens, seq_lens, T, plan_tokens):
    if plan_tokens is not None:
        return plan_tokens[0], plan_tokens[1]
    ts, tp = ref.prefill_positions(cu_seqlens, seq_lens, T)
    return ts.int(), tp.int()


def _ref_decode(q, wc, wbt, cc, cbt, idx, tkl, seq_lens, sink, kind, wps, cps=1, ring=0, cos=None, sin=None,
                plan_tokens=None, num_splits=0):
    return ref.sparse_attn_decode(q, wc, wbt, cc, cbt, idx, tkl, seq_lens, sink, kind, wps, cps, ring, cos, sin)


def _ref_prefill(q, cu, seq_lens, wc, wbt, cc, cbt, idx, tkl, sink, kind, wps, cps=1, ring=0, cos=None, sin=None,
                 plan_tokens=None, num_splits=0):
    return ref.sparse_attn_prefill(q, cu, seq_lens, wc, wbt, cc, cbt, idx, tkl, sink, kind, wps, cps, ring, cos, sin)


def _tri_decode_into(q, wc, wbt, cc, cbt, idx, tkl, seq_lens, sink, kind, wps, cps, ring, cos, sin, plan_tokens,
                     num_splits, out, lse, main="triton"):
    B, s_q, H, D = q.shape
    ts, tp = _tokens_decode(seq_lens, s_q, plan_tokens)
    # topk_lens is per sequence: the kernel indexes it by the token's sequence (no gather launch)
    tri.sparse_attention(
        q.view(B * s_q, H, D), ts, tp, wc, wbt, cc, cbt, idx.view(B * s_q, -1) if idx is not None else None,
        tkl, sink, kind, wps, cps, ring, cos, sin, num_splits, out.view(B * s_q, H, D), lse.view(B * s_q, H),
        topk_lens_per_seq=True, main=main,
    )


def _tri_decode(q, wc, wbt, cc, cbt, idx, tkl, seq_lens, sink, kind, wps, cps=1, ring=0, cos=None, sin=None,
                plan_tokens=None, num_splits=0, main="triton"):
    out, lse = _fake_decode(q)
    _tri_decode_into(q, wc, wbt, cc, cbt, idx, tkl, seq_lens, sink, kind, wps, cps, ring, cos, sin, plan_tokens,
                     num_splits, out, lse, main)
    return out, lse


def _tri_prefill_into(q, cu, seq_lens, wc, wbt, cc, cbt, idx, tkl, sink, kind, wps, cps, ring, cos, sin,
                      plan_tokens, num_splits, out, lse, main="triton"):
    ts, tp = _tokens_prefill(cu, seq_lens, q.shape[0], plan_tokens)
    tri.sparse_attention(q, ts, tp, wc, wbt, cc, cbt, idx, tkl, sink, kind, wps, cps, ring, cos, sin, num_splits,
                         out, lse, main=main)


def _tri_prefill(q, cu, seq_lens, wc, wbt, cc, cbt, idx, tkl, sink, kind, wps, cps=1, ring=0, cos=None, sin=None,
                 plan_tokens=None, num_splits=0, main="triton"):
    out, lse = _fake_prefill(q)
    _tri_prefill_into(q, cu, seq_lens, wc, wbt, cc, cbt, idx, tkl, sink, kind, wps, cps, ring, cos, sin,
                      plan_tokens, num_splits, out, lse, main)
    return out, lse


# CUDA backend: the same launcher with the sm_90a attention loop (v4kernels/cuda/attention.py)
def _cuda_decode(*args, **kwargs):
    return _tri_decode(*args, **kwargs, main="cuda")


def _cuda_prefill(*args, **kwargs):
    return _tri_prefill(*args, **kwargs, main="cuda")


def _cuda_decode_into(*args):
    _tri_decode_into(*args, main="cuda")


def _cuda_prefill_into(*args):
    _tri_prefill_into(*args, main="cuda")


def _fake_decode(q, *args, **kwargs):
    B, s_q, H, D = q.shape
    return q.new_empty((B, s_q, H, D)), q.new_empty((B, s_q, H), dtype=torch.float32)


def _fake_prefill(q, *args, **kwargs):
    T, H, D = q.shape
    return q.new_empty((T, H, D)), q.new_empty((T, H), dtype=torch.float32)


_DECODE_ARGS = (
    "Tensor q, Tensor window_cache, Tensor window_block_table, Tensor? compressed_cache, "
    "Tensor? compressed_block_table, Tensor? indices, Tensor? topk_lens, Tensor seq_lens, Tensor? attn_sink, "
    "str kind, int window_page_size, int compressed_page_size=1, int window_ring=0, Tensor? rope_cos=None, "
    "Tensor? rope_sin=None, Tensor? plan_tokens=None, int num_splits=0"
)
_PREFILL_ARGS = (
    "Tensor q, Tensor cu_seqlens, Tensor seq_lens, Tensor window_cache, Tensor window_block_table, "
    "Tensor? compressed_cache, Tensor? compressed_block_table, Tensor? indices, Tensor? topk_lens, "
    "Tensor? attn_sink, str kind, int window_page_size, int compressed_page_size=1, int window_ring=0, "
    "Tensor? rope_cos=None, Tensor? rope_sin=None, Tensor? plan_tokens=None, int num_splits=0"
)

sparse_attn_decode_op = define_op(
    f"sparse_attn_decode({_DECODE_ARGS}, *, str? backend=None) -> (Tensor, Tensor)",
    check=_check_decode, reference=_ref_decode, fake=_fake_decode, triton=_tri_decode, cuda=_cuda_decode,
)
sparse_attn_prefill_op = define_op(
    f"sparse_attn_prefill({_PREFILL_ARGS}, *, str? backend=None) -> (Tensor, Tensor)",
    check=_check_prefill, reference=_ref_prefill, fake=_fake_prefill, triton=_tri_prefill, cuda=_cuda_prefill,
)


def _out_variant(check, ref_fn, tri_into, oshape_fn):
    def _check(*args):
        args, out, lse = args[:-2], args[-2], args[-1]
        check(*args)
        o_s, l_s = oshape_fn(args[0])
        _check_out(out, lse, o_s, l_s, args[0].device)

    def _ref(*args):
        o, l = ref_fn(*args[:-2])
        args[-2].copy_(o)
        args[-1].copy_(l)

    def _tri(*args):
        tri_into(*args)

    return _check, _ref, _tri


def _shapes_decode(q):
    return tuple(q.shape), tuple(q.shape[:3])


def _shapes_prefill(q):
    return tuple(q.shape), tuple(q.shape[:2])


_cd, _rd, _td = _out_variant(_check_decode, _ref_decode, _tri_decode_into, _shapes_decode)
_cp, _rp, _tp = _out_variant(_check_prefill, _ref_prefill, _tri_prefill_into, _shapes_prefill)

_DECODE_OUT_ARGS = _DECODE_ARGS.replace(", Tensor? plan_tokens=None, int num_splits=0", ", Tensor? plan_tokens, int num_splits")
_PREFILL_OUT_ARGS = _PREFILL_ARGS.replace(", Tensor? plan_tokens=None, int num_splits=0", ", Tensor? plan_tokens, int num_splits")
for _a in ("int compressed_page_size=1", "int window_ring=0", "Tensor? rope_cos=None", "Tensor? rope_sin=None"):
    _DECODE_OUT_ARGS = _DECODE_OUT_ARGS.replace(_a, _a.split("=")[0])
    _PREFILL_OUT_ARGS = _PREFILL_OUT_ARGS.replace(_a, _a.split("=")[0])

sparse_attn_decode_out_op = define_op(
    f"sparse_attn_decode_out({_DECODE_OUT_ARGS}, Tensor(a!) out, Tensor(b!) lse, *, str? backend=None) -> ()",
    check=_cd, reference=_rd, fake=lambda *a, **k: None, triton=_td, cuda=_cuda_decode_into,
)
sparse_attn_prefill_out_op = define_op(
    f"sparse_attn_prefill_out({_PREFILL_OUT_ARGS}, Tensor(a!) out, Tensor(b!) lse, *, str? backend=None) -> ()",
    check=_cp, reference=_rp, fake=lambda *a, **k: None, triton=_tp, cuda=_cuda_prefill_into,
)


# ----------------------------------------------------------------------------- public API
def _plan_args(plan: Optional[AttentionPlan], kind: str, num_splits: Optional[int]):
    tokens = plan.tokens if plan is not None else None
    if num_splits is None:
        num_splits = plan.num_splits.get(kind, 0) if plan is not None else 0
    return tokens, int(num_splits)


def sparse_attn_decode(
    q: torch.Tensor,
    window_cache: torch.Tensor,
    window_block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    kind: str,
    window_page_size: int,
    compressed_cache: Optional[torch.Tensor] = None,
    compressed_block_table: Optional[torch.Tensor] = None,
    compressed_page_size: int = 1,
    indices: Optional[torch.Tensor] = None,
    topk_lens: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    window_ring: int = 0,
    rope_cos: Optional[torch.Tensor] = None,
    rope_sin: Optional[torch.Tensor] = None,
    plan: Optional[AttentionPlan] = None,
    num_splits: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    lse_out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """Decode attention of one layer: each sequence has ``s_q`` (1..4) new query tokens.

    ``o[b,i,h] = sum_j exp(s_j - m) kv_j / (sum_j exp(s_j - m) + exp(sink_h - m))``,
    ``s_j = q[b,i,h] . kv_j * 512^-0.5`` over the valid keys j of the token at position
    ``p = seq_lens[b] - s_q + i``: window positions ``max(0, p-127) .. p`` then the compressed entries.

    Parameters
    ----------
    q : bf16 [B, s_q, H, 512] (last dim contiguous).
    window_cache : uint8 [P_w, page_bytes(window_page_size)] KV584 cache; window_block_table int32 [B, *].
    seq_lens : int32 [B], position + 1 of each sequence's last query token.
    kind : "csa" (window + top-k), "hca" (window + all visible entries), "swa" (window only).
    compressed_cache, compressed_block_table, compressed_page_size : the compressed KV584 cache (csa/hca).
    indices : int32 [B, s_q, topk], logical compressed entry ids (csa), -1 = empty.
    topk_lens : int32 [B] or None: only the first ``topk_lens[b]`` index slots are used (csa).
    attn_sink : fp32 [H] or None (no sink).
    window_ring : 0 = position-addressed window cache; R >= 128 + s_q - 1: ring of R slots.
    rope_cos, rope_sin : fp32 [max_pos, 32] or None: fused inverse RoPE of ``out[..., 448:]``.
    plan : AttentionPlan from ``attention_plan(seq_lens, H, s_q=s_q, ...)``, reused across layers.
    num_splits : split-KV factor override (0 = auto); default from ``plan``.
    out, lse_out : preallocated bf16 [B, s_q, H, 512] and fp32 [B, s_q, H] (contiguous), written in place.

    Returns
    -------
    (out bf16 [B, s_q, H, 512], lse fp32 [B, s_q, H]); lse = +inf and out = 0 where no key is valid.
    """
    tokens, ns = _plan_args(plan, kind, num_splits)
    args = (q, window_cache, window_block_table, compressed_cache, compressed_block_table, indices, topk_lens,
            seq_lens, attn_sink, kind, window_page_size, compressed_page_size, window_ring, rope_cos, rope_sin,
            tokens, ns)
    if out is None and lse_out is None:
        return sparse_attn_decode_op(*args, backend=backend)
    if out is None or lse_out is None:
        raise ValueError("out/lse_out: expected both or neither")
    sparse_attn_decode_out_op(*args, out, lse_out, backend=backend)
    return out, lse_out


def sparse_attn_prefill(
    q: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    window_cache: torch.Tensor,
    window_block_table: torch.Tensor,
    *,
    kind: str,
    window_page_size: int,
    compressed_cache: Optional[torch.Tensor] = None,
    compressed_block_table: Optional[torch.Tensor] = None,
    compressed_page_size: int = 1,
    indices: Optional[torch.Tensor] = None,
    topk_lens: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    window_ring: int = 0,
    rope_cos: Optional[torch.Tensor] = None,
    rope_sin: Optional[torch.Tensor] = None,
    plan: Optional[AttentionPlan] = None,
    num_splits: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    lse_out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """Ragged (chunked) prefill attention of one layer; same math as ``sparse_attn_decode``.

    Parameters
    ----------
    q : bf16 [T, H, 512]; token ``cu_seqlens[b] + j`` belongs to sequence b.
    cu_seqlens : int32 [B+1], cumulative query counts (cu[0] = 0, cu[B] = T).
    seq_lens : int32 [B], position + 1 of each sequence's last query token (start = seq_lens - len).
    indices : int32 [T, topk] (csa); topk_lens : int32 [T] or None.
    Other parameters as ``sparse_attn_decode``; plan from ``attention_plan(seq_lens, H,
    cu_seqlens=cu_seqlens, num_tokens=T, ...)``.

    Returns
    -------
    (out bf16 [T, H, 512], lse fp32 [T, H]).
    """
    tokens, ns = _plan_args(plan, kind, num_splits)
    args = (q, cu_seqlens, seq_lens, window_cache, window_block_table, compressed_cache, compressed_block_table,
            indices, topk_lens, attn_sink, kind, window_page_size, compressed_page_size, window_ring, rope_cos,
            rope_sin, tokens, ns)
    if out is None and lse_out is None:
        return sparse_attn_prefill_op(*args, backend=backend)
    if out is None or lse_out is None:
        raise ValueError("out/lse_out: expected both or neither")
    sparse_attn_prefill_out_op(*args, out, lse_out, backend=backend)
    return out, lse_out
