"""RMSNorm variants of V4 (spec §2.1, §5.1, §7)."""
from __future__ import annotations

import torch

NORM_EPS = 1e-6


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Weighted RMSNorm: ``(w_f32 * (x_f32 * rsqrt(mean(x_f32^2, -1) + eps))).to(x.dtype)``."""
    xf = x.float()
    return (weight.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)


def head_rms_norm_bf16(q: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Unweighted per-head query norm with the reference's bf16 op order (spec §5.1).

    ``q *= rsqrt(mean(q^2, -1) + eps)`` on bf16 tensors: q^2 rounded to bf16, the mean accumulated
    in fp32 and returned as bf16, +eps and rsqrt in bf16, then a bf16 multiply."""
    if q.dtype != torch.bfloat16:
        raise TypeError(f"q: expected dtype torch.bfloat16, got {q.dtype}")
    return q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)


def stream_rms(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """mHC statistic: ``rsqrt(mean(flatten(X)^2) + eps)`` over all 4*d values of a token, fp32 [T]."""
    xf = x.float().flatten(1)
    return torch.rsqrt(xf.square().mean(-1) + eps)


def head_rms_norm_bf16_rn(q: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``head_rms_norm_bf16`` with every step IEEE-rounded, written out (what the kernels compute).

    q^2 -> bf16; fp32 sum / D -> bf16; + bf16(eps) (torch casts the scalar to the tensor's dtype) -> bf16;
    rsqrt as the correctly rounded ``1 / sqrt`` in fp32 -> bf16; q * r -> bf16. It equals
    ``head_rms_norm_bf16`` except where torch's vectorized bf16 rsqrt (not correctly rounded on CPU,
    ~4e-5 of values measured on AVX2) lands on the other side of a bf16 rounding midpoint: then r,
    and so the row, differs by one bf16 ulp. The fp32 sum order is also free (rarely visible after
    the bf16 rounding of the mean)."""
    if q.dtype != torch.bfloat16:
        raise TypeError(f"q: expected dtype torch.bfloat16, got {q.dtype}")
    sq = (q.float() * q.float()).bfloat16().float()
    mean = (sq.sum(-1, keepdim=True) / q.shape[-1]).bfloat16().float()
    v = (mean + torch.tensor(eps).bfloat16().float()).bfloat16().float()
    r = (1.0 / torch.sqrt(v)).bfloat16().float()
    return (q.float() * r).bfloat16()
