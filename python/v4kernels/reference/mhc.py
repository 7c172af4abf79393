"""Float32 references of mHC, manifold-constrained hyper-connections (spec §7; use in §9).

The residual is ``hc = 4`` streams per token, ``x [T, 4, d]`` (bf16 in the model). Shapes below use
``K = 4 * d`` (one token's flattened streams) and ``NMIX = (2 + hc) * hc = 24``.

Every function follows the spec line by line, in float32. The few-term sums (``Σ_i pre_i X_i`` and
``Σ_i C[i][j] X_i``) are written out in a fixed order, left to right over ``i = 0..3``, one rounding
per multiply and per add (no FMA). On the CPU this is exactly what the model's
``torch.sum(w.unsqueeze(-1) * x, dim=<stream dim>)`` computes (tested), and the Triton kernels
compute the same sequence, which is what makes them bitwise equal to these functions.
"""
from __future__ import annotations

import torch

HC = 4
NMIX = (2 + HC) * HC  # 24: 4 pre + 4 post + 16 comb logits
NORM_EPS = 1e-6  # rsqrt(mean(x^2) + norm_eps): the RMS statistic (NOT hc_eps)
HC_EPS = 1e-6  # added after the sigmoid of pre and inside every Sinkhorn normalisation
SINKHORN_ITERS = 20  # V4 config hc_sinkhorn_iters (1 softmax + 20 column + 19 row normalisations)


def mix_logits(x: torch.Tensor, fn: torch.Tensor, norm_eps: float = NORM_EPS) -> torch.Tensor:
    """RMS-normalised mixing logits of each token.

    x  : [T, 4, d] any float dtype (read as fp32)
    fn : [n, 4d] fp32 (n = 24 at the block sites, 4 at the head)
    returns mix [T, n] fp32 = (fn @ flatten(x)) * rsqrt(mean(flatten(x)^2) + norm_eps)
    """
    xf = x.flatten(1).float()  # [T, 4d]
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)  # [T, 1], one statistic over 4d
    return torch.nn.functional.linear(xf, fn.float()) * r  # [T, n]


def weighted_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Σ_i w[:, i] * x[:, i]`` in fp32, in the fixed order i = 0, 1, 2, 3.

    x : [T, 4, d] (read as fp32), w : [T, 4] fp32 -> [T, d] fp32 (not rounded)
    """
    xf = x.float()
    acc = w[:, 0:1] * xf[:, 0]
    for i in range(1, x.shape[1]):
        acc = acc + w[:, i : i + 1] * xf[:, i]
    return acc


def sinkhorn(logits: torch.Tensor, iters: int = SINKHORN_ITERS, hc_eps: float = HC_EPS) -> torch.Tensor:
    """Sinkhorn-Knopp projection of [T, 4, 4] logits (row-major, C[t, i, j]) to ~doubly stochastic.

    C = softmax(logits, rows) + eps; C /= colsum + eps; then (iters - 1) x (C /= rowsum + eps;
    C /= colsum + eps). All fp32. The last step is a column normalisation, so column sums are
    1 - eps/(colsum + eps) ~ 1 up to ~1e-6, and row sums converge with the iterations.
    """
    c = torch.softmax(logits.float(), dim=-1) + hc_eps
    c = c / (c.sum(-2, keepdim=True) + hc_eps)  # column sums (over i)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + hc_eps)  # row sums (over j)
        c = c / (c.sum(-2, keepdim=True) + hc_eps)
    return c


def split_mix(mix, base, scale, iters: int = SINKHORN_ITERS, hc_eps: float = HC_EPS):
    """Turn the 24 logits into (pre [T,4], post [T,4], comb [T,4,4]), all fp32 (spec §7).

    pre  = sigmoid(mix[0:4] * scale[0] + base[0:4]) + hc_eps
    post = 2 * sigmoid(mix[4:8] * scale[1] + base[4:8])
    comb = sinkhorn(mix[8:24] * scale[2] + base[8:24]) viewed [4, 4] row-major: C[i][j] = mix[8+4i+j]
    """
    t = mix.shape[0]
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(mix[:, 0:HC] * scale[0] + base[0:HC]) + hc_eps
    post = 2 * torch.sigmoid(mix[:, HC : 2 * HC] * scale[1] + base[HC : 2 * HC])
    logits = mix[:, 2 * HC :] * scale[2] + base[2 * HC :]
    comb = sinkhorn(logits.view(t, HC, HC), iters, hc_eps)
    return pre, post, comb


def mhc_pre(x, fn, base, scale, norm_eps: float = NORM_EPS, hc_eps: float = HC_EPS, sinkhorn_iters: int = SINKHORN_ITERS):
    """hc_pre (spec §7): collapse the 4 streams into the sublayer input.

    x [T, 4, d] bf16/fp32, fn [24, 4d] fp32, base [24] fp32, scale [3] fp32 ->
    y [T, d] bf16 = bf16(Σ_i pre_i X_i), post [T, 4] fp32, comb [T, 4, 4] fp32.
    """
    mix = mix_logits(x, fn, norm_eps)
    pre, post, comb = split_mix(mix, base, scale, sinkhorn_iters, hc_eps)
    y = weighted_sum(x, pre).to(torch.bfloat16)
    return y, post, comb


def mhc_pre_weights(x, fn, base, scale, norm_eps: float = NORM_EPS, hc_eps: float = HC_EPS):
    """The ``pre`` weights [T, 4] fp32 of hc_pre (for tests: y is a function of them)."""
    return split_mix(mix_logits(x, fn, norm_eps), base, scale, 1, hc_eps)[0]


def mhc_post(out, x, post, comb):
    """hc_post (spec §7): X_new[j] = post[j] * out + Σ_i C[i][j] X[i]  (note the transpose).

    out [T, d] (bf16 sublayer output, fp32 accepted), x [T, 4, d], post [T, 4] fp32, comb [T, 4, 4]
    fp32 -> X_new [T, 4, d] in x's dtype. fp32 math: a = post[j] * out; s = Σ_i C[i][j] X[i]
    (i = 0..3 in order); X_new[j] = a + s, then rounded (RNE) to x's dtype.
    """
    of = out.float()
    xf = x.float()
    comb = comb.float()
    streams = []
    for j in range(HC):
        s = comb[:, 0, j : j + 1] * xf[:, 0]
        for i in range(1, HC):
            s = s + comb[:, i, j : j + 1] * xf[:, i]
        streams.append(post[:, j : j + 1].float() * of + s)
    return torch.stack(streams, dim=1).to(x.dtype)


def mhc_head(x, fn, base, scale, norm_eps: float = NORM_EPS, hc_eps: float = HC_EPS):
    """hc_head (spec §7, final collapse): sigmoid mixing only, no post, no Sinkhorn.

    x [T, 4, d], fn [4, 4d] fp32, base [4] fp32, scale [1] fp32 -> y [T, d] bf16
    mix = (fn @ flatten(x)) * rsqrt(mean(flatten(x)^2) + norm_eps); pre = sigmoid(mix * scale + base) + hc_eps
    y = bf16(Σ_i pre_i X_i)
    """
    mix = mix_logits(x, fn, norm_eps)
    pre = torch.sigmoid(mix * scale.float()[0] + base.float()) + hc_eps
    return weighted_sum(x, pre).to(torch.bfloat16)


def mhc_head_weights(x, fn, base, scale, norm_eps: float = NORM_EPS, hc_eps: float = HC_EPS):
    """The ``pre`` weights [T, 4] of hc_head (for tests)."""
    mix = mix_logits(x, fn, norm_eps)
    return torch.sigmoid(mix * scale.float()[0] + base.float()) + hc_eps
