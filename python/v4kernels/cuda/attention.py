"""Launcher of the CUDA attention loop (csrc/attention/sparse_attn_fwd.cu) behind the ``sparse_attn_*`` ops.

The CUDA backend shares the Triton backend's key-row kernel (token -> cache-row offsets and scale words)
and its split-KV combine kernel (``v4kernels.triton.attention.sparse_attention(..., main="cuda")``); this
module replaces the attention loop between them with the warp-specialised wgmma kernel. Inputs were
checked by the op; here q / out / lse are given the layout the kernel reads (16-byte aligned q rows,
4-byte aligned out rows, contiguous lse rows), through a copy only when the caller's views lack it.
"""
from __future__ import annotations

import torch


def _q_ok(q: torch.Tensor) -> bool:
    return q.stride(2) == 1 and q.stride(0) % 8 == 0 and q.stride(1) % 8 == 0 and q.data_ptr() % 16 == 0


def _out_ok(out: torch.Tensor) -> bool:
    return out.stride(2) == 1 and out.stride(0) % 2 == 0 and out.stride(1) % 2 == 0 and out.data_ptr() % 4 == 0


def attention_loop(q, tok_pos, base, rows, scw, nkeys, sink, cos, sin, out, lse, po, pl, num_splits):
    """q bf16 [T, H, 512]; rows / scw int64 [T, NK] and nkeys int32 [T] from the key-row kernel (offsets from
    ``base``'s data pointer); writes out bf16 [T, H, 512] and lse fp32 [T, H] (one split) or the fp32
    partials po [T, S, H, 512] / pl [T, S, H] (S = num_splits > 1) that the combine kernel reads."""
    qk = q if _q_ok(q) else q.contiguous()
    o = out if _out_ok(out) else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    ls = lse if lse.stride(1) == 1 else torch.empty(lse.shape, dtype=lse.dtype, device=lse.device)
    torch.ops.v4kernels_C.sparse_attn_fwd(
        qk, tok_pos.contiguous(), base, rows, scw, nkeys,
        None if sink is None else sink.float().contiguous(),
        None if cos is None else cos.contiguous(), None if sin is None else sin.contiguous(),
        o, ls, po if num_splits > 1 else None, pl if num_splits > 1 else None, int(num_splits),
    )
    if num_splits == 1:
        if o is not out:
            out.copy_(o)
        if ls is not lse:
            lse.copy_(ls)
