"""mHC ops (spec §7, used as in §9): ``mhc_pre``, ``mhc_post``, ``mhc_head``.

The residual of a V4 block is 4 streams per token, ``x [T, 4, d]`` (bf16 in the model; fp32 also
accepted). ``d`` must be a multiple of 16 (4096 Flash, 7168 Pro, small sizes in tests); T may be 0.

Exactness of the Triton kernels against the float32 reference (``v4kernels.reference.mhc``)
--------------------------------------------------------------------------------------------
Bitwise equal:
  * ``mhc_post``: X_new. Each output element is ``post[j]*out + (((C0j X0 + C1j X1) + C2j X2) + C3j X3)``
    in fp32, one rounding per operation (no FMA contraction: the kernels are compiled with
    ``enable_fp_fusion=False``), then RNE to x's dtype: the same operations in the same order as
    the reference (and as the model's ``torch.sum(..., dim=stream)`` on the CPU).
  * ``y`` of ``mhc_pre`` / ``mhc_head`` *given the same pre weights*: ``bf16(((p0 X0 + p1 X1) + p2 X2) + p3 X3)``,
    same argument. The tests check it against ``reference.weighted_sum(x, pre_kernel)``.
The CUDA kernel of ``mhc_pre`` (csrc/mhc/mhc_pre.cu; bf16 streams, backend "auto" takes it at
every T) has the same properties: y bitwise given its pre, weights within the tolerance below,
repeated calls bitwise equal, and a token's outputs independent of T (its sums are cut by channel
slices fixed by d and the GPU's SM count: per CTA and stream pair a tensor-core sum, then the CTAs'
partials added in CTA order).
Within a tolerance (not bitwise):
  * ``pre`` (hence ``y``), ``post`` and ``comb``. They are functions of the 24 logits
    ``mix = (fn @ flatten(x)) * rsqrt(mean(x^2) + eps)``, i.e. of dot products 4d = 16384 / 28672
    long. The reference sums them in BLAS order; the kernel in tensor-core tile order (fp32
    accumulation of exact products: fn is split into three bf16 parts that sum exactly to it),
    with K-slice partials added in a fixed order (split-K path for T < 512; for T >= 512 the
    one-pass streaming kernel, 1024-wide K slices). Different summation orders give
    logits that differ by a few fp32 ulps of the sum of |terms|; sigmoid/exp/division ulps add to
    that. Tested bounds: post/pre/comb within 1e-5 absolute at small widths and 2e-5 at the V4
    widths (4d = 16384 / 28672 products per logit); y within one bf16 ulp plus 1e-6 absolute at
    small widths, plus 1e-3 absolute at the V4 widths (a pre difference of ~1e-6 times |X_i| ~ 4
    where the 4-stream sum cancels). bench/bench_mhc.py checks the V4 bounds and notes the measured
    deviations on each row.
Determinism: no atomics on data (the streaming kernel's counters only order work); the tiling
(block sizes, number of K splits) is a fixed function of (T, d, device), so the same call gives
the same bytes on every run. For T >= 512 the tiling depends on d only, so a token's outputs do
not depend on T or on the other tokens; below that a token's post/comb may differ in the last
bits between calls with different T (the split-K choice depends on T).
"""
from __future__ import annotations

import torch

from .._checks import check_multiple, check_range, check_same_device, check_tensor
from .._dispatch import define_op
from ..cuda import mhc as cu  # imports on CPU machines: it touches torch.ops.v4kernels_C only when called
from ..reference import mhc as ref
from ..triton import mhc as tri

HC = ref.HC
NMIX = ref.NMIX
_STREAM_DTYPES = (torch.bfloat16, torch.float32)


def _check_streams(x):
    check_tensor("x", x, dtype=_STREAM_DTYPES, dim=3)
    if x.shape[1] != HC:
        raise ValueError(f"x: expected shape (T, {HC}, d) (4 residual streams), got {tuple(x.shape)}")
    if x.shape[2] <= 0:
        raise ValueError(f"x: expected d > 0, got shape {tuple(x.shape)}")
    check_multiple("x.shape[2] (d)", x.shape[2], 16)


def _check_mix_params(x, fn, base, scale, nmix, nscale, norm_eps, hc_eps):
    _check_streams(x)
    k = HC * x.shape[2]
    check_tensor("fn", fn, dtype=torch.float32, shape=(nmix, k))
    check_tensor("base", base, dtype=torch.float32, shape=(nmix,))
    check_tensor("scale", scale, dtype=torch.float32, shape=(nscale,))
    check_same_device(x=x, fn=fn, base=base, scale=scale)
    check_range("norm_eps", norm_eps, 0.0, None)
    check_range("hc_eps", hc_eps, 0.0, None)


def _check_pre(x, fn, base, scale, norm_eps=ref.NORM_EPS, hc_eps=ref.HC_EPS, sinkhorn_iters=ref.SINKHORN_ITERS):
    _check_mix_params(x, fn, base, scale, NMIX, 3, norm_eps, hc_eps)
    check_range("sinkhorn_iters", sinkhorn_iters, 1, None)


def _check_head(x, fn, base, scale, norm_eps=ref.NORM_EPS, hc_eps=ref.HC_EPS):
    _check_mix_params(x, fn, base, scale, HC, 1, norm_eps, hc_eps)


def _check_post(out, x, post, comb):
    _check_streams(x)
    t, _, d = x.shape
    check_tensor("out", out, dtype=_STREAM_DTYPES, shape=(t, d))
    check_tensor("post", post, dtype=torch.float32, shape=(t, HC))
    check_tensor("comb", comb, dtype=torch.float32, shape=(t, HC, HC))
    check_same_device(out=out, x=x, post=post, comb=comb)


def _fake_pre(x, fn, base, scale, norm_eps=ref.NORM_EPS, hc_eps=ref.HC_EPS, sinkhorn_iters=ref.SINKHORN_ITERS):
    t, _, d = x.shape
    return (x.new_empty((t, d), dtype=torch.bfloat16), x.new_empty((t, HC), dtype=torch.float32),
            x.new_empty((t, HC, HC), dtype=torch.float32))


def _fake_head(x, fn, base, scale, norm_eps=ref.NORM_EPS, hc_eps=ref.HC_EPS):
    return x.new_empty((x.shape[0], x.shape[2]), dtype=torch.bfloat16)


def _fake_post(out, x, post, comb):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


mhc_pre_op = define_op(
    "mhc_pre(Tensor x, Tensor fn, Tensor base, Tensor scale, float norm_eps=1e-06, float hc_eps=1e-06, "
    "int sinkhorn_iters=20, *, str? backend=None) -> (Tensor, Tensor, Tensor)",
    check=_check_pre,
    reference=ref.mhc_pre,
    fake=_fake_pre,
    triton=tri.mhc_pre,
    cuda=cu.mhc_pre,  # one-pass warp-specialized sm_90a kernel (bf16 streams)
    cuda_supported=cu.pre_supported,
    # "auto" takes the CUDA kernel wherever it is supported (H100 bench: faster than Triton at T = 1 .. 65536)
)

mhc_post_op = define_op(
    "mhc_post(Tensor out, Tensor x, Tensor post, Tensor comb, *, str? backend=None) -> Tensor",
    check=_check_post,
    reference=ref.mhc_post,
    fake=_fake_post,
    triton=tri.mhc_post,
)

mhc_head_op = define_op(
    "mhc_head(Tensor x, Tensor fn, Tensor base, Tensor scale, float norm_eps=1e-06, float hc_eps=1e-06, "
    "*, str? backend=None) -> Tensor",
    check=_check_head,
    reference=ref.mhc_head,
    fake=_fake_head,
    triton=tri.mhc_head,
)


def mhc_pre(x, fn, base, scale, norm_eps: float = 1e-6, hc_eps: float = 1e-6, sinkhorn_iters: int = 20, *,
            backend: str | None = None):
    """hc_pre: collapse the 4 residual streams into the sublayer input, plus the post/comb weights.

    Per token (all fp32)::

        xf   = flatten(x) [4d];  mix = (fn @ xf) * rsqrt(mean(xf^2) + norm_eps)        # [24]
        pre  = sigmoid(mix[0:4] * scale[0] + base[0:4]) + hc_eps
        post = 2 * sigmoid(mix[4:8] * scale[1] + base[4:8])
        C    = softmax_rows(mix[8:24].view(4, 4) * scale[2] + base[8:24].view(4, 4)) + hc_eps
        C    = C / (colsum(C) + hc_eps);  (sinkhorn_iters - 1) x [rows, then columns]
        y    = bf16(Σ_i pre[i] * x[i])

    Parameters
    ----------
    x : Tensor [T, 4, d] or [..., 4, d], bf16 or fp32, d a multiple of 16.
    fn : Tensor [24, 4d] fp32.  base : Tensor [24] fp32.  scale : Tensor [3] fp32.
    norm_eps, hc_eps : 1e-6 in V4.  sinkhorn_iters : 20 in V4 (>= 1).
    backend : "reference" | "triton" | "cuda" | "auto" (default: ``V4K_BACKEND`` or auto).

    Returns
    -------
    y : bf16 [..., d];  post : fp32 [..., 4];  comb : fp32 [..., 4, 4] (C[i][j], row-major).
    """
    lead = x.shape[:-2]
    if x.dim() != 3 and x.dim() >= 2:
        x = x.reshape(-1, *x.shape[-2:])
    y, post, comb = mhc_pre_op(x, fn, base, scale, float(norm_eps), float(hc_eps), int(sinkhorn_iters),
                               backend=backend)
    if len(lead) != 1:
        y, post, comb = y.view(*lead, y.shape[-1]), post.view(*lead, HC), comb.view(*lead, HC, HC)
    return y, post, comb


def mhc_post(out, x, post, comb, *, backend: str | None = None):
    """hc_post: X_new[j] = post[j] * out + Σ_i C[i][j] * x[i]  (stream j takes column j of C).

    fp32 math, the 4-term sum in the order i = 0..3, then rounded (RNE) to x's dtype.

    Parameters
    ----------
    out : Tensor [T, d] (or [..., d]), bf16 or fp32: the sublayer output.
    x : Tensor [T, 4, d] (or [..., 4, d]), bf16 or fp32: the streams that went into mhc_pre.
    post : Tensor [T, 4] fp32.  comb : Tensor [T, 4, 4] fp32 (both from mhc_pre).
    backend : as in ``mhc_pre``.

    Returns
    -------
    X_new : Tensor [T, 4, d] (same leading dims as x), x's dtype.
    """
    lead = x.shape[:-2]
    if x.dim() != 3 and x.dim() >= 2:
        x = x.reshape(-1, *x.shape[-2:])
        out = out.reshape(-1, out.shape[-1])
        post = post.reshape(-1, post.shape[-1])
        comb = comb.reshape(-1, *comb.shape[-2:])
    xn = mhc_post_op(out, x, post, comb, backend=backend)
    return xn.view(*lead, *xn.shape[-2:]) if len(lead) != 1 else xn


def mhc_head(x, fn, base, scale, norm_eps: float = 1e-6, hc_eps: float = 1e-6, *, backend: str | None = None):
    """hc_head (final collapse): sigmoid mixing only, no post and no Sinkhorn.

    mix = (fn @ flatten(x)) * rsqrt(mean(flatten(x)^2) + norm_eps); pre = sigmoid(mix * scale[0] + base) + hc_eps;
    y = bf16(Σ_i pre[i] * x[i]).

    Parameters
    ----------
    x : Tensor [T, 4, d] (or [..., 4, d]), bf16 or fp32, d a multiple of 16.
    fn : Tensor [4, 4d] fp32.  base : Tensor [4] fp32.  scale : Tensor [1] fp32.
    backend : as in ``mhc_pre``.

    Returns
    -------
    y : Tensor [..., d] bf16.
    """
    lead = x.shape[:-2]
    if x.dim() != 3 and x.dim() >= 2:
        x = x.reshape(-1, *x.shape[-2:])
    y = mhc_head_op(x, fn, base, scale, float(norm_eps), float(hc_eps), backend=backend)
    return y.view(*lead, y.shape[-1]) if len(lead) != 1 else y
