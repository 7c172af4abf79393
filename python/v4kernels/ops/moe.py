"""MoE ops (spec §8, §2.3): router, token grouping, MXFP4 grouped GEMMs, combine, and the layer.

Data flow of one MoE layer (``moe_forward``)::

    ids, w          = moe_route(x, gate_weight, gate_bias | tid2eid+token_ids)   # [T,k] int32 / fp32
    pairs, off, inv = moe_group(ids, E)            # pairs sorted by expert (stable), offsets [E+1]
    xq, sx          = act_quant_fp8(x, 128)        # W4A8: each token quantized once
    h   = moe_grouped_swiglu_mxfp4(xq, sx, w1, s1, w3, s3, off, row_ids=pairs//k, row_weights=w[pairs])
    y   = moe_grouped_gemm_mxfp4(act_quant_fp8(h), w2, s2, off)        # bf16 per (token, k) row
    out = moe_combine(y, inv, shared=shared_expert(x))   # fp32 sum in expert order, + shared, bf16

Validation of index values (ids, offsets, row ids, token ids) needs their contents: it runs when
they are on the CPU. On a GPU it would cost a host synchronisation, so it is skipped there; the
kernels then treat any out-of-range index as "no row" (masked), never reading out of bounds.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_choice, check_multiple, check_range, check_same_device, check_tensor
from .._dispatch import define_op
from ..cuda import moe as cm  # imports on CPU machines: it touches torch.ops.v4kernels_C only when called
from ..reference import moe as ref
from ..triton import moe as tri

_FLOAT = (torch.bfloat16, torch.float16, torch.float32)
_INT = (torch.int32, torch.int64)
_E8M0 = (torch.uint8, torch.float8_e8m0fnu)
_PACKED = tuple(d for d in (torch.uint8, torch.int8, getattr(torch, "float4_e2m1fn_x2", None)) if d is not None)
MODES = ref.MODES


def _on_cpu(t) -> bool:
    """A real (not fake/traced) non-empty CPU tensor whose values can be read without a sync."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.numel() == 0:
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t) and not torch.compiler.is_compiling()


def _check_values(name, t, lo, hi):
    """lo <= t <= hi elementwise (CPU tensors only; see the module docstring)."""
    if _on_cpu(t):
        mn, mx = int(t.min()), int(t.max())
        if mn < lo or mx > hi:
            bad = mn if mn < lo else mx
            raise ValueError(f"{name}: expected values in [{lo}, {hi}], got {bad}")


# ---------------------------------------------------------------------------------------------
# moe_route
# ---------------------------------------------------------------------------------------------
def _check_route(x, gate_weight, gate_bias=None, tid2eid=None, token_ids=None, topk=6, route_scale=1.0):
    check_tensor("x", x, dtype=_FLOAT, dim=2)
    check_tensor("gate_weight", gate_weight, dtype=_FLOAT, shape=(None, x.shape[1]))
    E = gate_weight.shape[0]
    check_range("topk", topk, 1, min(E, 32))
    if gate_bias is not None:
        check_tensor("gate_bias", gate_bias, dtype=torch.float32, shape=(E,))
    if (tid2eid is None) != (token_ids is None):
        raise ValueError(
            f"tid2eid/token_ids: expected both (hash routing) or neither, got tid2eid={'set' if tid2eid is not None else None}"
            f", token_ids={'set' if token_ids is not None else None}"
        )
    if tid2eid is not None:
        check_tensor("tid2eid", tid2eid, dtype=_INT, shape=(None, topk))
        check_tensor("token_ids", token_ids, dtype=_INT, shape=(x.shape[0],))
        _check_values("token_ids", token_ids, 0, tid2eid.shape[0] - 1)
        _check_values("tid2eid", tid2eid, 0, E - 1)
    check_same_device(x=x, gate_weight=gate_weight, gate_bias=gate_bias, tid2eid=tid2eid, token_ids=token_ids)


def _fake_route(x, gate_weight, gate_bias=None, tid2eid=None, token_ids=None, topk=6, route_scale=1.0):
    T = x.shape[0]
    return x.new_empty((T, topk), dtype=torch.int32), x.new_empty((T, topk), dtype=torch.float32)


moe_route_op = define_op(
    "moe_route(Tensor x, Tensor gate_weight, Tensor? gate_bias=None, Tensor? tid2eid=None, Tensor? token_ids=None, "
    "int topk=6, float route_scale=1.0, *, str? backend=None) -> (Tensor, Tensor)",
    check=_check_route,
    reference=ref.moe_route,
    fake=_fake_route,
    triton=tri.moe_route,
)


def moe_route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: Optional[torch.Tensor] = None,
    tid2eid: Optional[torch.Tensor] = None,
    token_ids: Optional[torch.Tensor] = None,
    topk: int = 6,
    route_scale: float = 1.0,
    *,
    backend: Optional[str] = None,
):
    """MoE router (spec §8.1), fused: fp32 gate GEMM, sqrtsoftplus, biased top-k or hash, normalisation.

    ``s = sqrt(softplus(x_f32 @ gate_weight_f32^T))``; ``ids = topk(s + gate_bias)`` or
    ``ids = tid2eid[token_ids]``; ``w = s[ids] / sum(s[ids]) * route_scale``.

    Parameters
    ----------
    x : [T, d] bf16 (fp16/fp32 accepted).
    gate_weight : [E, d] bf16 or fp32 (used as fp32).
    gate_bias : [E] fp32 or None; steers the selection only (non-hash layers).
    tid2eid, token_ids : [V, topk] int32/int64 and [T] int32/int64 for hash layers (both or neither).
    topk : number of experts per token (6 in V4), 1 <= topk <= min(E, 32).
    route_scale : 1.5 (V4-Flash) or 2.5 (V4-Pro).

    Returns
    -------
    topk_ids : int32 [T, topk], by decreasing biased score; ties go to the lower expert index.
    topk_weights : fp32 [T, topk].
    """
    return moe_route_op(x, gate_weight, gate_bias, tid2eid, token_ids, topk, route_scale, backend=backend)


# ---------------------------------------------------------------------------------------------
# moe_group
# ---------------------------------------------------------------------------------------------
def _check_group(topk_ids, num_experts, pad_multiple=1):
    check_tensor("topk_ids", topk_ids, dtype=_INT, dim=2)
    check_range("num_experts", num_experts, 1, None)
    check_range("pad_multiple", pad_multiple, 1, 4096)
    _check_values("topk_ids", topk_ids, -1, num_experts - 1)


def _fake_group(topk_ids, num_experts, pad_multiple=1):
    T, k = topk_ids.shape
    M = ref.grouped_rows_bound(T * k, num_experts, pad_multiple)
    return (
        topk_ids.new_empty((M,), dtype=torch.int32),
        topk_ids.new_empty((num_experts + 1,), dtype=torch.int32),
        topk_ids.new_empty((T, k), dtype=torch.int32),
    )


# The grouping is integer bookkeeping (stable sort, scatter-add counts, cumsum, scatter) with exact results
# on every device and no host synchronisation; its GPU path is these same tensor ops.
moe_group_op = define_op(
    "moe_group(Tensor topk_ids, int num_experts, int pad_multiple=1, *, str? backend=None) -> (Tensor, Tensor, Tensor)",
    check=_check_group,
    reference=ref.moe_group,
    fake=_fake_group,
    triton=ref.moe_group,
)


def moe_group(topk_ids: torch.Tensor, num_experts: int, pad_multiple: int = 1, *, backend: Optional[str] = None):
    """Group the (token, k) pairs by expert, stable in token order.

    Parameters
    ----------
    topk_ids : int32/int64 [T, k]; -1 marks a dropped slot (not routed).
    num_experts : E.
    pad_multiple : each expert's group is padded with empty rows to a multiple of this (1: none).

    Returns
    -------
    sorted_pairs : int32 [M], M = T*k + min(E, T*k) * (pad_multiple - 1): flat pair index t*k + j of
        each grouped row; -1 for padding rows and for the unused tail after ``expert_offsets[E]``.
    expert_offsets : int32 [E+1]; expert e owns rows [expert_offsets[e], expert_offsets[e+1]).
    pair_rows : int32 [T, k]: the grouped row of each pair (-1 if dropped).
    """
    return moe_group_op(topk_ids, num_experts, pad_multiple, backend=backend)


# ---------------------------------------------------------------------------------------------
# grouped GEMMs
# ---------------------------------------------------------------------------------------------
def _check_weight(name, w, sname, s, E=None, N=None, K=None):
    check_tensor(name, w, dtype=_PACKED, dim=3)
    E = w.shape[0] if E is None else E
    N = w.shape[1] if N is None else N
    K = 2 * w.shape[2] if K is None else K
    check_tensor(name, w, shape=(E, N, K // 2))
    check_multiple(f"{name} K (= 2 * {name}.shape[2])", K, 128)
    check_tensor(sname, s, dtype=_E8M0, shape=(E, N, K // 32))
    return E, N, K


def _check_act(a, a_scale, K, mode, expert_offsets, row_ids, E):
    check_choice("mode", mode, MODES)
    if mode == "w4a16":
        check_tensor("a", a, dtype=torch.bfloat16, shape=(None, K))
        if a_scale is not None:
            raise ValueError("a_scale: expected None in mode 'w4a16' (bf16 activations), got a tensor")
    else:
        check_tensor("a", a, dtype=(torch.bfloat16, torch.float8_e4m3fn), shape=(None, K))
        if a.dtype == torch.float8_e4m3fn:
            if a_scale is None:
                raise ValueError("a_scale: expected e8m0 scales [rows, K/128] with float8_e4m3fn activations, got None")
            check_tensor("a_scale", a_scale, dtype=_E8M0, shape=(a.shape[0], K // 128))
        elif a_scale is not None:
            raise ValueError("a_scale: expected None with bf16 activations (they are quantized 1x128 inside), got a tensor")
    check_tensor("expert_offsets", expert_offsets, dtype=_INT, shape=(E + 1,))
    M = a.shape[0]
    if row_ids is not None:
        check_tensor("row_ids", row_ids, dtype=_INT, dim=1)
        M = row_ids.shape[0]
        _check_values("row_ids", row_ids, -1, a.shape[0] - 1)
    if _on_cpu(expert_offsets):
        off = expert_offsets.long()
        if int(off[0]) != 0 or bool((off[1:] < off[:-1]).any()) or int(off[-1]) > M:
            raise ValueError(
                f"expert_offsets: expected non-decreasing values from 0 to at most {M} (the row count), "
                f"got {expert_offsets.tolist() if expert_offsets.numel() <= 16 else '[...]'}"
            )
    return M


def _check_gemm(a, a_scale, w, w_scale, expert_offsets, row_ids=None, mode="w4a8"):
    E, N, K = _check_weight("w", w, "w_scale", w_scale)
    _check_act(a, a_scale, K, mode, expert_offsets, row_ids, E)
    check_same_device(a=a, a_scale=a_scale, w=w, w_scale=w_scale, expert_offsets=expert_offsets, row_ids=row_ids)


def _fake_gemm(a, a_scale, w, w_scale, expert_offsets, row_ids=None, mode="w4a8"):
    M = a.shape[0] if row_ids is None else row_ids.shape[0]
    return a.new_empty((M, w.shape[1]), dtype=torch.bfloat16)


moe_grouped_gemm_mxfp4_op = define_op(
    "moe_grouped_gemm_mxfp4(Tensor a, Tensor? a_scale, Tensor w, Tensor w_scale, Tensor expert_offsets, "
    "Tensor? row_ids=None, str mode=\"w4a8\", *, str? backend=None) -> Tensor",
    check=_check_gemm,
    reference=ref.moe_grouped_gemm_mxfp4,
    fake=_fake_gemm,
    triton=tri.moe_grouped_gemm_mxfp4,
    cuda=cm.moe_grouped_gemm_mxfp4,  # sm_90a decode kernel (few rows per expert); Triton otherwise
    cuda_supported=cm.decode_supported,
)


def moe_grouped_gemm_mxfp4(
    a, a_scale, w, w_scale, expert_offsets, row_ids=None, mode: str = "w4a8", *, backend: Optional[str] = None
):
    """Ragged grouped GEMM on MXFP4 expert weights: ``out[r] = bf16(A[row_ids[r]] @ W_e^T)``.

    Rows ``expert_offsets[e] <= r < expert_offsets[e+1]`` use expert e; other rows, and rows with
    ``row_ids[r] == -1``, are 0. Experts with no rows cost nothing.

    Parameters
    ----------
    a : [Ma, K] bf16, or (w4a8) float8_e4m3fn already quantized 1x128 with ``a_scale``.
    a_scale : e8m0 (float8_e8m0fnu or uint8) [Ma, K/128] with fp8 ``a``; else None.
    w : [E, N, K/2] uint8 (int8 / float4_e2m1fn_x2 accepted): E2M1 codes, low nibble = even k.
    w_scale : e8m0 [E, N, K/32]. K must be a multiple of 128.
    expert_offsets : int32/int64 [E+1], non-decreasing from 0.
    row_ids : int [M] or None (row r reads ``a[r]``, M = Ma).
    mode : "w4a8" (the reference: FP8 1x128 activations, per 32-K chunk
        ``acc += dot32(xq, Wq) * sx * sW``) or "w4a16" (bf16 activations, dequantized weights).

    Numerics of the kernels (all sum the reference's exact products in another order):
    the CUDA decode kernel (sm_90a; K a multiple of 512, at most 1024 experts, few rows per expert)
    sums each 32-K chunk on the tensor cores and the chunks of a 128-K block before the activation
    scale; the Triton W4A8 prefill
    kernel writes each weight as the e4m3 value ``E2M1 * 2^(sW - R + 6)`` (R = the largest
    e8m0 scale of the weight row) and sums a 128-K block per FP8 MMA before the fp32 promotion
    ``acc += block * sx``. That is exact for every 32-block whose scale is >= R - 11; blocks
    further below their row's largest scale (never seen in real checkpoints) are flushed to 0.
    Triton W4A8 decode (<= 16 rows per expert) runs the W4A16 kernel on ``bf16(xq * sx)`` (exact).
    Results agree with the reference to about one bf16 rounding step (calc_diff ~1e-7).

    Returns
    -------
    out : bf16 [M, N].
    """
    return moe_grouped_gemm_mxfp4_op(a, a_scale, w, w_scale, expert_offsets, row_ids, mode, backend=backend)


def _check_swiglu(a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids=None, row_weights=None,
                  mode="w4a8", swiglu_limit=10.0):
    E, N, K = _check_weight("w1", w1, "w1_scale", w1_scale)
    _check_weight("w3", w3, "w3_scale", w3_scale, E, N, K)
    M = _check_act(a, a_scale, K, mode, expert_offsets, row_ids, E)
    if row_weights is not None:
        check_tensor("row_weights", row_weights, dtype=torch.float32, shape=(M,))
    if not swiglu_limit > 0:
        raise ValueError(f"swiglu_limit: expected a positive value, got {swiglu_limit}")
    check_same_device(a=a, a_scale=a_scale, w1=w1, w1_scale=w1_scale, w3=w3, w3_scale=w3_scale,
                      expert_offsets=expert_offsets, row_ids=row_ids, row_weights=row_weights)


def _fake_swiglu(a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids=None, row_weights=None,
                 mode="w4a8", swiglu_limit=10.0):
    M = a.shape[0] if row_ids is None else row_ids.shape[0]
    return a.new_empty((M, w1.shape[1]), dtype=torch.bfloat16)


moe_grouped_swiglu_mxfp4_op = define_op(
    "moe_grouped_swiglu_mxfp4(Tensor a, Tensor? a_scale, Tensor w1, Tensor w1_scale, Tensor w3, Tensor w3_scale, "
    "Tensor expert_offsets, Tensor? row_ids=None, Tensor? row_weights=None, str mode=\"w4a8\", "
    "float swiglu_limit=10.0, *, str? backend=None) -> Tensor",
    check=_check_swiglu,
    reference=ref.moe_grouped_swiglu_mxfp4,
    fake=_fake_swiglu,
    triton=tri.moe_grouped_swiglu_mxfp4,
    cuda=cm.moe_grouped_swiglu_mxfp4,
    cuda_supported=cm.decode_supported,
)


def moe_grouped_swiglu_mxfp4(
    a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids=None, row_weights=None, mode: str = "w4a8",
    swiglu_limit: float = 10.0, *, backend: Optional[str] = None,
):
    """W1 and W3 grouped GEMMs in one pass with the clamped SwiGLU and routing weight (spec §8.2).

    ``g = fp32(bf16(A W1_e^T)); u = fp32(bf16(A W3_e^T))``;
    ``out[r] = bf16(silu(min(g, L)) * clamp(u, -L, L) * row_weights[r])`` with L = swiglu_limit.

    Parameters as ``moe_grouped_gemm_mxfp4`` (w1, w3: [E, I, K/2] + e8m0 [E, I, K/32]), plus
    row_weights : fp32 [M] or None (1), swiglu_limit : 10 in V4.

    Returns
    -------
    h : bf16 [M, I]; 0 on rows outside the expert groups and on empty rows.
    """
    return moe_grouped_swiglu_mxfp4_op(
        a, a_scale, w1, w1_scale, w3, w3_scale, expert_offsets, row_ids, row_weights, mode, swiglu_limit,
        backend=backend,
    )


# ---------------------------------------------------------------------------------------------
# moe_combine
# ---------------------------------------------------------------------------------------------
def _check_combine(y, pair_rows, row_weights=None, shared=None, fp32_out=False):
    check_tensor("y", y, dtype=(torch.bfloat16, torch.float32), dim=2)
    check_tensor("pair_rows", pair_rows, dtype=_INT, dim=2)
    check_range("pair_rows.shape[1]", pair_rows.shape[1], 1, 32)
    _check_values("pair_rows", pair_rows, -1, y.shape[0] - 1)
    if row_weights is not None:
        check_tensor("row_weights", row_weights, dtype=torch.float32, shape=(y.shape[0],))
    if shared is not None:
        check_tensor("shared", shared, dtype=(torch.bfloat16, torch.float32), shape=(pair_rows.shape[0], y.shape[1]))
    check_same_device(y=y, pair_rows=pair_rows, row_weights=row_weights, shared=shared)


def _fake_combine(y, pair_rows, row_weights=None, shared=None, fp32_out=False):
    return y.new_empty((pair_rows.shape[0], y.shape[1]), dtype=torch.float32 if fp32_out else torch.bfloat16)


moe_combine_op = define_op(
    "moe_combine(Tensor y, Tensor pair_rows, Tensor? row_weights=None, Tensor? shared=None, bool fp32_out=False, "
    "*, str? backend=None) -> Tensor",
    check=_check_combine,
    reference=ref.moe_combine,
    fake=_fake_combine,
    triton=tri.moe_combine,
)


def moe_combine(y, pair_rows, row_weights=None, shared=None, fp32_out: bool = False, *, backend: Optional[str] = None):
    """Weighted un-permute and reduce, deterministic (no atomics).

    ``out[t] = sum_{r in pair_rows[t], r != -1, increasing r} fp32(y[r]) * row_weights[r] + fp32(shared[t])``,
    then bf16 (or fp32 with ``fp32_out``, e.g. before a tensor-parallel all-reduce). With the rows
    of ``moe_group`` the order is increasing expert id, the reference's loop order.

    Parameters
    ----------
    y : bf16/fp32 [M, N] grouped rows. pair_rows : int [T, k]. row_weights : fp32 [M] or None.
    shared : bf16/fp32 [T, N] or None.

    Returns
    -------
    out : bf16 (fp32) [T, N].
    """
    return moe_combine_op(y, pair_rows, row_weights, shared, fp32_out, backend=backend)


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------
def shared_expert(x, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit: float = 10.0, *,
                  backend: Optional[str] = None):
    """Shared expert (FP8 e4m3 weights [N, K] + e8m0 [ceil(N/128), K/128], with the clamp): bf16 [T, d].

    ``g, u = fp8_linear(x, W1), fp8_linear(x, W3)`` (bf16); ``h = silu(min(g, L)) * clamp(u, -L, L)``
    (fp32); ``out = fp8_linear(bf16(h), W2)``. The linears are ``v4kernels.ops.linear.fp8_linear``
    (the float32 reference ``reference.linear.fp8_linear`` if that module is absent)."""
    try:
        from .linear import fp8_linear
    except ImportError:  # pragma: no cover
        return ref.shared_expert(x, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit)
    g = fp8_linear(x, w1, w1_scale, backend=backend)
    u = fp8_linear(x, w3, w3_scale, backend=backend)
    h = ref.swiglu_clamp(g, u, swiglu_limit).to(torch.bfloat16)
    return fp8_linear(h, w2, w2_scale, backend=backend)


def moe_forward(
    x, gate_weight, gate_bias, w1, w1_scale, w3, w3_scale, w2, w2_scale,
    shared_w1=None, shared_w1_scale=None, shared_w3=None, shared_w3_scale=None, shared_w2=None, shared_w2_scale=None,
    *, tid2eid=None, token_ids=None, topk: int = 6, route_scale: float = 1.0, swiglu_limit: float = 10.0,
    mode: str = "w4a8", backend: Optional[str] = None,
):
    """One V4 MoE layer (spec §8): routed MXFP4 experts summed in fp32, shared expert added, bf16.

    Parameters
    ----------
    x : bf16 [..., d].
    gate_weight, gate_bias : [E, d], [E] fp32 or None. tid2eid, token_ids : hash layers (token_ids
        with x's leading shape).
    w1, w3 : [E, I, d/2] packed E2M1 + e8m0 [E, I, d/32]; w2 : [E, d, I/2] + e8m0 [E, d, I/32].
    shared_* : FP8 e4m3 [I, d], [I, d], [d, I] + e8m0 block scales, or None (no shared expert).
    mode : "w4a8" (the reference numerics) or "w4a16".

    Returns
    -------
    bf16 [..., d].
    """
    shape = x.shape
    d = shape[-1]
    x2 = x.reshape(-1, d)
    E = w1.shape[0]
    tok = token_ids.reshape(-1) if token_ids is not None else None
    ids, wts = moe_route(x2, gate_weight, gate_bias, tid2eid, tok, topk, route_scale, backend=backend)
    pairs, offsets, pair_rows = moe_group(ids, E, 1, backend=backend)
    valid = pairs >= 0
    pc = pairs.clamp_min(0).long()
    row_ids = torch.where(valid, pairs // topk, -1).to(torch.int32)
    row_w = torch.where(valid, wts.reshape(-1)[pc], torch.zeros((), dtype=torch.float32, device=x.device))
    from .quant import act_quant_fp8

    if mode == "w4a8":
        xa, sxa = act_quant_fp8(x2, 128, backend=backend)  # each token quantized once, not per pair
    else:
        xa, sxa = x2, None
    h = moe_grouped_swiglu_mxfp4(xa, sxa, w1, w1_scale, w3, w3_scale, offsets, row_ids, row_w, mode, swiglu_limit,
                                 backend=backend)
    if mode == "w4a8":
        ha, sha = act_quant_fp8(h, 128, backend=backend)
    else:
        ha, sha = h, None
    y = moe_grouped_gemm_mxfp4(ha, sha, w2, w2_scale, offsets, None, mode, backend=backend)
    shared = None
    if shared_w1 is not None:
        shared = shared_expert(x2, shared_w1, shared_w1_scale, shared_w3, shared_w3_scale, shared_w2, shared_w2_scale,
                               swiglu_limit, backend=backend)
    out = moe_combine(y, pair_rows, None, shared, False, backend=backend)
    return out.reshape(shape)
