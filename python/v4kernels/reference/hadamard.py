"""Hadamard rotation (spec §2.4): Sylvester order, scale n^-1/2, fp32 inside, bf16 out.

The reference's fast_hadamard_transform sums in fp32 through butterflies. We define the summation
order as the radix-2 butterfly below (stage h = 1, 2, 4, ...: (a, b) -> (a + b, a - b) on elements
i and i + h of each 2h-block), then one multiply by n^-1/2. Kernels follow the same order, so they
are bitwise equal to this reference; the result equals ``x @ H_n * n^-1/2`` up to fp32 summation order.
"""
from __future__ import annotations

import math

import torch


def hadamard_matrix(n: int, dtype=torch.float32) -> torch.Tensor:
    """Sylvester H_n: H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]] (unnormalised)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n: expected a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard over the last dim (a power of two), fp32 butterflies, result in x's dtype."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"x: expected the last dim to be a power of two, got {n}")
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).view(x.shape).to(x.dtype)
