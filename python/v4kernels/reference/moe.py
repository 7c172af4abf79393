"""MoE float32 references (spec §8, §2.3): router, token grouping, MXFP4 grouped GEMMs, combine.

Router (spec §8.1), per token t (x bf16 [T, d], gate weight [E, d] used in fp32)::

    logits = x_f32 @ gate_f32^T                         # [T, E], fp32
    s      = sqrt(softplus(logits))                      # softplus as torch (threshold 20)
    ids    = tid2eid[token_ids]        (hash layers)     # fixed experts, no bias
           | top-k of (s + bias)       (other layers)    # bias steers selection only
    w      = s.gather(ids); w = w / sum(w); w = w * route_scale

Top-k order and ties: ids are listed by decreasing biased score; equal scores are broken by the
lower expert index (a stable descending sort). ``torch.topk`` gives no such promise.

Experts (spec §8.2), per routed (token, expert) pair with routing weight w_route::

    g = fp32(bf16(W1 x)); u = fp32(bf16(W3 x))           # each GEMM output rounded to bf16
    h = silu(min(g, limit)) * clamp(u, -limit, limit)    # fp32, limit = swiglu_limit = 10
    h = h * w_route                                      # fp32, before W2
    y = bf16(W2 bf16(h))
    out = bf16( sum_{experts in increasing id} fp32(y_e) + fp32(shared(x)) )

GEMM modes (weights MXFP4: E2M1 packed two per byte along K, low nibble first, e8m0 per 32 K):

* ``"w4a8"`` (the reference model): the activation is quantized to FP8 e4m3 with one ue8m0 scale
  per 1x128 (``act_quant_fp8``), and per 32-K chunk ``acc += (sum_32 xq * Wq)_fp32 * sx * sW``,
  chunks added in increasing order.
* ``"w4a16"`` (a faster approximation): ``bf16(a_f32 @ dequant(W)^T)``; the weights are exact in
  bf16, the activation is not quantized.

Token grouping: the (token, k) pairs are sorted by expert, stably (token order, then k);
``expert_offsets[e]:expert_offsets[e+1]`` are the rows of expert e, each group optionally padded
with empty rows (``-1``) to a multiple of ``pad_multiple``. Grouped GEMMs read activation row
``row_ids[r]`` for grouped row ``r`` (``-1`` = empty row, output zero); every output row outside
the expert groups is zero.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import quant as q

FP4_BLOCK = 32
ACT_BLOCK = 128
MODES = ("w4a8", "w4a16")


# ---------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------
def sqrtsoftplus(logits: torch.Tensor) -> torch.Tensor:
    """``sqrt(softplus(logits))`` in fp32 (torch softplus: beta 1, threshold 20)."""
    return torch.sqrt(F.softplus(logits.float()))


def topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, by decreasing score, ties to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def moe_route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: Optional[torch.Tensor] = None,
    tid2eid: Optional[torch.Tensor] = None,
    token_ids: Optional[torch.Tensor] = None,
    topk: int = 6,
    route_scale: float = 1.0,
):
    """Router of spec §8.1.

    x: [T, d] bf16 (any float). gate_weight: [E, d] (bf16/fp32, used as fp32). gate_bias: [E] fp32
    or None. tid2eid: [V, topk] int (hash layers) with token_ids [T] int, or both None.
    Returns topk_ids int32 [T, topk] and topk_weights fp32 [T, topk]. A hash id outside [0, E)
    (or a token id outside [0, V)) gives id -1 and weight 0 (the ops reject them on CPU inputs).
    """
    E = gate_weight.shape[0]
    logits = x.float() @ gate_weight.float().T
    s = sqrtsoftplus(logits)
    if tid2eid is not None:
        V = tid2eid.shape[0]
        tok = token_ids.long()
        tok_ok = (tok >= 0) & (tok < V)
        ids = tid2eid.long()[tok.clamp(0, V - 1)]
        ok = tok_ok[:, None] & (ids >= 0) & (ids < E)
        ids = torch.where(ok, ids, torch.full_like(ids, -1))
    else:
        biased = s if gate_bias is None else s + gate_bias.float()
        ids = topk_stable(biased, topk)
        ok = torch.ones_like(ids, dtype=torch.bool)
    w = torch.where(ok, s.gather(1, ids.clamp_min(0)), torch.zeros((), dtype=torch.float32))
    w = w / w.sum(dim=-1, keepdim=True)
    w = w * route_scale
    return ids.to(torch.int32), w


# ---------------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------------
def grouped_rows_bound(num_pairs: int, num_experts: int, pad_multiple: int) -> int:
    """Static row count of the grouped layout: every pair plus the worst-case padding."""
    return num_pairs + min(num_experts, num_pairs) * (pad_multiple - 1)


def moe_group(topk_ids: torch.Tensor, num_experts: int, pad_multiple: int = 1):
    """Sort the (token, k) pairs by expert, stable in (token, k) order.

    topk_ids: int [T, k]; ids outside [0, num_experts) are dropped (not routed).
    Returns
      sorted_pairs int32 [M]: flat pair index t*k + j of each grouped row, -1 for empty rows
        (group padding and the unused tail); M = T*k + min(E, T*k) * (pad_multiple - 1).
      expert_offsets int32 [E+1]: group e is rows [off[e], off[e+1]); each group size is a multiple
        of pad_multiple; its first count_e rows are real, the rest empty.
      pair_rows int32 [T, k]: grouped row of each pair (-1 when dropped). Increasing row order within
        a token is increasing expert order.
    Pure integer tensor ops (sort, scatter-add counts, cumsum, scatter): no host synchronisation.
    """
    T, k = topk_ids.shape
    E, p = num_experts, pad_multiple
    dev = topk_ids.device
    n = T * k
    M = grouped_rows_bound(n, E, p)
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, torch.full_like(flat, E))  # dropped pairs sort last
    order = torch.sort(key, stable=True).indices
    # scatter_add, not torch.bincount: CUDA bincount reads the max on the host (a sync, and no
    # CUDA-graph capture); integer adds are exact in any order
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts[E:].zero_()  # not counts[E] = 0: a host scalar copied in (no CUDA-graph capture)
    padded = (counts + p - 1) // p * p
    off = torch.zeros(E + 2, dtype=torch.long, device=dev)
    off[1:] = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts  # first sorted position of each expert (unpadded)
    skey = key[order]
    rank = torch.arange(n, device=dev) - start[skey]
    dest = off[skey] + rank
    dest = torch.where(skey < E, dest, torch.full_like(dest, M))  # dropped -> dummy slot M
    sorted_pairs = torch.full((M + 1,), -1, dtype=torch.long, device=dev)
    sorted_pairs.scatter_(0, dest, order)
    pair_rows = torch.empty(n, dtype=torch.long, device=dev)
    pair_rows.scatter_(0, order, torch.where(dest < M, dest, torch.full_like(dest, -1)))
    return (
        sorted_pairs[:M].to(torch.int32),
        off[: E + 1].to(torch.int32),
        pair_rows.view(T, k).to(torch.int32),
    )


# ---------------------------------------------------------------------------------------------
# Grouped GEMMs
# ---------------------------------------------------------------------------------------------
def _segments(expert_offsets: torch.Tensor, M: int):
    off = expert_offsets.long().clamp(0, M).tolist()
    return [(e, off[e], max(off[e], off[e + 1])) for e in range(len(off) - 1) if off[e + 1] > off[e]]


def _gather_rows(a: torch.Tensor, a_scale, row_ids, r0: int, r1: int):
    """Activation rows of grouped rows [r0, r1) and a validity mask (row id in range)."""
    if row_ids is None:
        idx = torch.arange(r0, r1, device=a.device)
    else:
        idx = row_ids[r0:r1].long()
    ok = (idx >= 0) & (idx < a.shape[0])
    idx = idx.clamp(0, max(a.shape[0] - 1, 0))
    return a[idx], (None if a_scale is None else a_scale[idx]), ok


def quantize_act(a: torch.Tensor, a_scale: Optional[torch.Tensor], mode: str):
    """Activation operand of a grouped GEMM: (values fp32, scales fp32 per 128 or None).

    w4a8: FP8 e4m3 values + e8m0 scales, from ``act_quant_fp8(a, 128)`` when ``a`` is bf16.
    w4a16: the bf16 values (no scale)."""
    if mode == "w4a16":
        return a.float(), None
    if a.dtype != torch.float8_e4m3fn:
        a, a_scale = q.act_quant_fp8(a, ACT_BLOCK)
    return a.float(), q.e8m0_to_float(a_scale)


def mxfp4_matmul(av: torch.Tensor, asc: Optional[torch.Tensor], w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [m, N] = one expert's GEMM before the bf16 rounding.

    av: [m, K] fp32 activation values; asc: [m, K/128] fp32 scales (w4a8) or None (w4a16).
    w: uint8 [N, K/2] packed E2M1; w_scale: e8m0 [N, K/32].
    w4a8: ``acc += (sum_32 xq*Wq) * sx[m, c//4] * sW[n, c]`` chunk by chunk (spec §2.3);
    w4a16: ``av @ dequant(W)^T``."""
    N = w.shape[0]
    m, K = av.shape
    codes = q.unpack_fp4(w.view(torch.uint8))
    if asc is None:
        wd = q.dequant_fp4(codes, w_scale, FP4_BLOCK)  # exact in fp32 (and in bf16)
        return av @ wd.T
    nch = K // FP4_BLOCK
    wv = q.e2m1_decode(codes).view(N, nch, FP4_BLOCK)
    sw = q.e8m0_to_float(w_scale)  # [N, K/32]
    xv = av.view(m, nch, FP4_BLOCK)
    acc = torch.zeros(m, N, dtype=torch.float32, device=av.device)
    for c in range(nch):
        part = xv[:, c, :] @ wv[:, c, :].T
        acc = acc + part * asc[:, c // (ACT_BLOCK // FP4_BLOCK), None] * sw[None, :, c]
    return acc


def moe_grouped_gemm_mxfp4(a, a_scale, w, w_scale, expert_offsets, row_ids=None, mode="w4a8"):
    """Grouped MXFP4 GEMM: ``out[r] = bf16(A[row_ids[r]] @ W_e^T)`` for grouped rows r of expert e.

    a: [Ma, K] bf16 (w4a16; w4a8 quantizes it 1x128) or float8_e4m3fn with a_scale e8m0 [Ma, K/128].
    w: uint8 [E, N, K/2]; w_scale: e8m0 [E, N, K/32]; expert_offsets: int [E+1];
    row_ids: int [M] or None (then row r reads a[r], M = Ma). Returns bf16 [M, N]."""
    M = a.shape[0] if row_ids is None else row_ids.shape[0]
    N = w.shape[1]
    out = torch.zeros(M, N, dtype=torch.bfloat16, device=a.device)
    for e, r0, r1 in _segments(expert_offsets, M):
        ar, sr, ok = _gather_rows(a, a_scale, row_ids, r0, r1)
        av, asc = quantize_act(ar, sr, mode)
        y = mxfp4_matmul(av, asc, w[e], w_scale[e]).to(torch.bfloat16)
        out[r0:r1] = torch.where(ok[:, None], y, torch.zeros((), dtype=y.dtype))
    return out


def swiglu_clamp(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """``silu(min(g, limit)) * clamp(u, -limit, limit)`` in fp32 (spec §8.2)."""
    g = torch.clamp(g.float(), max=limit)
    u = torch.clamp(u.float(), min=-limit, max=limit)
    return F.silu(g) * u


def moe_grouped_swiglu_mxfp4(
    a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids=None, row_weights=None, mode="w4a8", swiglu_limit=10.0
):
    """Fused W1/W3 grouped GEMM + clamped SwiGLU + routing weight (spec §8.2), bf16 [M, I].

    ``g = fp32(bf16(A W1_e^T)); u = fp32(bf16(A W3_e^T)); h = bf16(silu(min(g, L)) * clamp(u, -L, L) * w_r)``
    with ``w_r = row_weights[r]`` (1 when None). Shapes as ``moe_grouped_gemm_mxfp4``; row_weights fp32 [M]."""
    M = a.shape[0] if row_ids is None else row_ids.shape[0]
    N = w1.shape[1]
    out = torch.zeros(M, N, dtype=torch.bfloat16, device=a.device)
    for e, r0, r1 in _segments(expert_offsets, M):
        ar, sr, ok = _gather_rows(a, a_scale, row_ids, r0, r1)
        av, asc = quantize_act(ar, sr, mode)
        g = mxfp4_matmul(av, asc, w1[e], w1_scale[e]).to(torch.bfloat16).float()
        u = mxfp4_matmul(av, asc, w3[e], w3_scale[e]).to(torch.bfloat16).float()
        h = swiglu_clamp(g, u, swiglu_limit)
        if row_weights is not None:
            h = h * row_weights[r0:r1, None].float()
        h = h.to(torch.bfloat16)
        out[r0:r1] = torch.where(ok[:, None], h, torch.zeros((), dtype=h.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# Combine
# ---------------------------------------------------------------------------------------------
def moe_combine(y, pair_rows, row_weights=None, shared=None, fp32_out=False):
    """Un-permute and reduce: ``out[t] = sum_{r in sorted(pair_rows[t]), r != -1} fp32(y[r]) * w[r]
    (+ fp32(shared[t]))``, summed in increasing row order (= increasing expert id, the reference's
    loop order), then bf16 (fp32 when ``fp32_out``).

    y: [M, N] bf16/fp32; pair_rows int [T, k]; row_weights fp32 [M] or None; shared [T, N] or None."""
    T, k = pair_rows.shape
    M, N = y.shape
    rows = pair_rows.long()
    rows = torch.where((rows >= 0) & (rows < M), rows, torch.full_like(rows, M))  # invalid -> last
    rows = torch.sort(rows, dim=1).values
    acc = torch.zeros(T, N, dtype=torch.float32, device=y.device)
    for j in range(k):
        r = rows[:, j]
        ok = r < M
        rc = r.clamp(max=max(M - 1, 0))
        v = y[rc].float() if M else torch.zeros(T, N, device=y.device)
        if row_weights is not None and M:
            v = v * row_weights.float()[rc][:, None]
        acc = acc + torch.where(ok[:, None], v, torch.zeros((), dtype=torch.float32))
    if shared is not None:
        acc = acc + shared.float()
    return acc if fp32_out else acc.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Whole layer: the reference's per-expert loop, literally
# ---------------------------------------------------------------------------------------------
def _fp8_linear(x, w, s):
    try:
        from .linear import fp8_linear
    except ImportError:  # pragma: no cover - reference/linear.py is another engineer's module
        return _fp8_linear_private(x, w, s)
    return fp8_linear(x, w, s)


def _fp8_linear_private(x, w, s):
    """Minimal FP8 block-scaled linear (spec §2.3), used only if reference/linear.py is absent."""
    K = x.shape[-1]
    xq, sx = q.act_quant_fp8(x.reshape(-1, K), ACT_BLOCK)
    N = w.shape[0]
    kb = K // ACT_BLOCK
    xf, wf = xq.float().view(-1, kb, ACT_BLOCK), w.float().view(N, kb, ACT_BLOCK)
    sxf = q.e8m0_to_float(sx)
    swf = q.e8m0_to_float(s).repeat_interleave(ACT_BLOCK, 0)[:N]
    acc = torch.zeros(xf.shape[0], N)
    for b in range(kb):
        acc = acc + (xf[:, b] @ wf[:, b].T) * sxf[:, b, None] * swf[None, :, b]
    return acc.to(torch.bfloat16).reshape(*x.shape[:-1], N)


def shared_expert(x, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit=10.0):
    """Shared expert (FP8 weights, 128x128 e8m0 blocks, with the clamp): bf16 [T, d]."""
    g = _fp8_linear(x, w1, w1_scale).float()
    u = _fp8_linear(x, w3, w3_scale).float()
    h = swiglu_clamp(g, u, swiglu_limit)
    return _fp8_linear(h.to(torch.bfloat16), w2, w2_scale)


def routed_expert(x, w1, w1_scale, w3, w3_scale, w2, w2_scale, weights, mode="w4a8", swiglu_limit=10.0):
    """One routed expert on its tokens (spec §8.2): x bf16 [m, d], weights fp32 [m] -> bf16 [m, d]."""
    av, asc = quantize_act(x, None, mode)
    g = mxfp4_matmul(av, asc, w1, w1_scale).to(torch.bfloat16).float()
    u = mxfp4_matmul(av, asc, w3, w3_scale).to(torch.bfloat16).float()
    h = swiglu_clamp(g, u, swiglu_limit) * weights[:, None].float()
    hv, hsc = quantize_act(h.to(torch.bfloat16), None, mode)
    return mxfp4_matmul(hv, hsc, w2, w2_scale).to(torch.bfloat16)


def moe_forward(
    x, gate_weight, gate_bias, w1, w1_scale, w3, w3_scale, w2, w2_scale,
    shared_w1=None, shared_w1_scale=None, shared_w3=None, shared_w3_scale=None, shared_w2=None, shared_w2_scale=None,
    *, tid2eid=None, token_ids=None, topk=6, route_scale=1.0, swiglu_limit=10.0, mode="w4a8",
):
    """The MoE layer as the reference writes it (spec §8): route, loop over experts in increasing
    id adding each expert's bf16 output into an fp32 accumulator, add the shared expert, bf16.

    x bf16 [T, d]; w1/w3 uint8 [E, I, d/2] + e8m0 [E, I, d/32]; w2 uint8 [E, d, I/2] + e8m0 [E, d, I/32];
    shared_* e4m3 [I, d] / [d, I] + e8m0 [ceil(N/128), K/128]. Returns bf16 [T, d]."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    ids, wts = moe_route(x, gate_weight, gate_bias, tid2eid, token_ids, topk, route_scale)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    E = w1.shape[0]
    for i in range(E):
        tok, slot = torch.where(ids == i)
        if tok.numel() == 0:
            continue
        y[tok] += routed_expert(
            x[tok], w1[i], w1_scale[i], w3[i], w3_scale[i], w2[i], w2_scale[i], wts[tok, slot], mode, swiglu_limit
        ).float()
    if shared_w1 is not None:
        y = y + shared_expert(x, shared_w1, shared_w1_scale, shared_w3, shared_w3_scale, shared_w2, shared_w2_scale,
                              swiglu_limit).float()
    return y.to(torch.bfloat16).reshape(shape)
