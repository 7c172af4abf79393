"""RoPE (spec §2.5): interleaved pairs on the trailing 64 dims, fp32 tables, optional YaRN.

The frequency table is built exactly as the reference (``precompute_freqs_cis``): base frequencies in
fp32, YaRN correction range in Python floats, ``smooth = 1 - ramp`` blend, then ``outer(t, f)`` in
fp32 and ``polar``. Kernels take the resulting ``cos``/``sin`` tables ([max_pos, 32] fp32) as inputs,
so every backend rotates with the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

ROPE_DIM = 64


@dataclass(frozen=True)
class YarnConfig:
    """YaRN of the compressed layers (spec §1.1): no magnitude scaling in V4."""

    factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(dim: int, base: float, yarn: YarnConfig) -> tuple:
    """(low, high) pair indices of the YaRN ramp: 15 and 25 for theta 160000, dim 64."""
    low = math.floor(_correction_dim(yarn.beta_fast, dim, base, yarn.original_seq_len))
    high = math.ceil(_correction_dim(yarn.beta_slow, dim, base, yarn.original_seq_len))
    return max(low, 0), min(high, dim - 1)


def rope_freqs(theta: float, yarn: Optional[YarnConfig] = None, dim: int = ROPE_DIM) -> torch.Tensor:
    """Per-pair frequencies f_j = theta^(-2j/dim), j < dim/2, with YaRN blending if given (fp32)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is not None:
        low, high = yarn_correction_range(dim, theta, yarn)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / yarn.factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_table(max_pos: int, theta: float, yarn: Optional[YarnConfig] = None, dim: int = ROPE_DIM):
    """(cos, sin) fp32 [max_pos, dim/2] of ``polar(1, outer(t, f))`` with ``t*f`` in fp32."""
    freqs = rope_freqs(theta, yarn, dim)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)
    return cis.real.contiguous(), cis.imag.contiguous()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """Rotate the last ``2*cos.shape[1]`` dims of ``x`` by ``exp(±i*pos*f)``; other dims pass through.

    x: [T, ..., D] (bf16 or fp32); positions: int [T]; cos/sin: fp32 [max_pos, R/2].
    Pair j = (x[D-R+2j], x[D-R+2j+1]) is one complex number (GPT-J interleaving, not NeoX halves).
    fp32 math ``re' = a*c - b*s``, ``im' = a*s + b*c`` (``s`` negated for ``inverse``), result in x's dtype.
    """
    half = cos.shape[1]
    rd = 2 * half
    c = cos[positions.long()]
    s = sin[positions.long()]
    if inverse:
        s = -s
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c, s = c.view(shape), s.view(shape)
    xr = x[..., -rd:].float().unflatten(-1, (half, 2))
    a, b = xr[..., 0], xr[..., 1]
    rot = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return torch.cat((x[..., :-rd], rot.to(x.dtype)), dim=-1)
