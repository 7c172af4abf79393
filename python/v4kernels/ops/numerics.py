"""Numerics ops (spec §2.1, §2.2, §2.4, §2.5, §5.1): Hadamard, RoPE, RMSNorm, FP8/FP4 fake-quant, MXFP4 dequant.

Each op's CPU implementation is its float32 reference (``v4kernels.reference.*``); the Triton kernels
(``v4kernels.triton.numerics``) are bitwise equal to it except where stated (rms_norm: fp32 sum order).
head_rms_norm's reference is the spec's bf16 op order with every step correctly rounded
(``head_rms_norm_bf16_rn``): torch's own CPU bf16 rsqrt is not correctly rounded and, worse, takes a
vectorized or a scalar path depending on where a row falls in the tensor, so its result changed with
the batch size (found by model_ref's batch-invariance test).
"""
from __future__ import annotations

import torch

from .._checks import check_choice, check_multiple, check_same_device, check_tensor
from .._dispatch import define_op
from ..reference import hadamard as ref_had
from ..reference import norm as ref_norm
from ..reference import quant as ref_quant
from ..reference import rope as ref_rope
from ..triton import numerics as tri

_FLOAT = (torch.bfloat16, torch.float16, torch.float32)
_IDX = (torch.int32, torch.int64)


def _capturing(t: torch.Tensor) -> bool:
    """True where values cannot be read on the host: fake/meta tensors (tracing) or CUDA-graph capture."""
    from torch._subclasses.fake_tensor import is_fake

    if t.device.type == "meta" or is_fake(t):
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------- Hadamard
def _check_hadamard(x):
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float32))
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dim, got a 0-d tensor")
    n = x.shape[-1]
    if n < 2 or n > 4096 or n & (n - 1):
        raise ValueError(f"x.shape[-1]: expected a power of two in [2, 4096], got {n}")


hadamard_transform_op = define_op(
    "hadamard_transform(Tensor x, *, str? backend=None) -> Tensor",
    check=_check_hadamard,
    reference=ref_had.hadamard_transform,
    fake=lambda x: torch.empty_like(x),
    triton=tri.hadamard_transform,
)


def hadamard_transform(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Orthonormal Hadamard rotation of the last dim (spec §2.4).

    Parameters
    ----------
    x : Tensor [..., n], bf16 or fp32, n a power of two (128 in V4; 2..4096 accepted).

    Returns
    -------
    Tensor [..., n], x's dtype: ``y = x @ H_n * n^-1/2`` (Sylvester order), computed in fp32 by radix-2
    butterflies h = 1, 2, 4, ... (the reference's order: bitwise equal on every backend), rounded once.
    """
    return hadamard_transform_op(x, backend=backend)


# ----------------------------------------------------------------------------- RoPE
def _check_rope(x, positions, cos, sin, inverse=False):
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float32))
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected [T, D] or [T, H, D], got shape {tuple(x.shape)}")
    check_tensor("cos", cos, dtype=torch.float32, dim=2)
    check_tensor("sin", sin, dtype=torch.float32, shape=tuple(cos.shape))
    check_tensor("positions", positions, dtype=_IDX, shape=(x.shape[0],))
    check_same_device(x=x, positions=positions, cos=cos, sin=sin)
    rot = 2 * cos.shape[1]
    if rot < 2 or rot > x.shape[-1]:
        raise ValueError(f"cos: expected 1 <= cos.shape[1] <= x.shape[-1] / 2 = {x.shape[-1] // 2}, got {cos.shape[1]}")
    if positions.numel() and not _capturing(positions):
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= cos.shape[0]:
            raise ValueError(f"positions: expected values in [0, {cos.shape[0]}) (rows of cos), got [{lo}, {hi}]")


def _ref_rope_(x, positions, cos, sin, inverse=False):
    x.copy_(ref_rope.apply_rope(x, positions, cos, sin, inverse))


def _check_rope_(x, positions, cos, sin, inverse=False):
    _check_rope(x, positions, cos, sin, inverse)
    if not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous tensor (written in place), got strides {tuple(x.stride())}")


apply_rope_op = define_op(
    "apply_rope(Tensor x, Tensor positions, Tensor cos, Tensor sin, bool inverse=False, *, str? backend=None) -> Tensor",
    check=_check_rope,
    reference=ref_rope.apply_rope,
    fake=lambda x, positions, cos, sin, inverse=False: torch.empty_like(x),
    triton=tri.apply_rope,
)

apply_rope_inplace_op = define_op(
    "apply_rope_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin, bool inverse=False, *, str? backend=None) -> ()",
    check=_check_rope_,
    reference=_ref_rope_,
    fake=lambda x, positions, cos, sin, inverse=False: None,
    triton=tri.apply_rope_,
)


def apply_rope(x, positions, cos, sin, inverse: bool = False, *, backend: str | None = None) -> torch.Tensor:
    """Interleaved (GPT-J) RoPE on the last ``2 * cos.shape[1]`` (= 64) dims (spec §2.5).

    Parameters
    ----------
    x : Tensor [T, D] or [T, H, D], bf16 or fp32.
    positions : int32/int64 [T], each in [0, cos.shape[0]) (checked on the host; ValueError otherwise).
    cos, sin : fp32 [max_pos, R/2], from ``reference.rope.rope_table`` (YaRN for compressed layers).
    inverse : rotate by ``conj`` (the output path's inverse RoPE).

    Returns
    -------
    Tensor like x: pair j = (x[D-R+2j], x[D-R+2j+1]) -> (a*c - b*s, a*s + b*c) in fp32 (s negated for
    the inverse), rounded to x's dtype; the first D - R dims are copied. Bitwise equal to the reference.
    """
    return apply_rope_op(x, positions, cos, sin, inverse, backend=backend)


def apply_rope_(x, positions, cos, sin, inverse: bool = False, *, backend: str | None = None) -> None:
    """In-place ``apply_rope`` (x contiguous): reads and writes only the rope dims."""
    apply_rope_inplace_op(x, positions, cos, sin, inverse, backend=backend)


# ----------------------------------------------------------------------------- RMSNorm
def _check_rms_norm(x, weight, eps=1e-6):
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float32))
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected [..., D] with D >= 1, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, dtype=(torch.float32, torch.bfloat16), shape=(x.shape[-1],))
    check_same_device(x=x, weight=weight)
    if x.shape[-1] > 65536:
        raise ValueError(f"x.shape[-1]: expected at most 65536, got {x.shape[-1]}")


rms_norm_op = define_op(
    "rms_norm(Tensor x, Tensor weight, float eps=1e-06, *, str? backend=None) -> Tensor",
    check=_check_rms_norm,
    reference=ref_norm.rms_norm,
    fake=lambda x, weight, eps=1e-6: torch.empty_like(x),
    triton=tri.rms_norm,
)


def rms_norm(x, weight, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """Weighted RMSNorm (spec §2.1): ``(w_f32 * (x_f32 * rsqrt(mean(x_f32^2) + eps))).to(x.dtype)``.

    Parameters
    ----------
    x : Tensor [..., D], bf16 or fp32.  weight : fp32 (or bf16) [D].  eps : 1e-6 in V4.

    Tolerance: the fp32 mean depends on the summation order (kernel: tree sum). Measured: bf16
    outputs equal the reference except at rare bf16 rounding midpoints (1 ulp); fp32 outputs
    within ~4 fp32 ulps (rtol 1e-6).
    """
    return rms_norm_op(x, weight, eps, backend=backend)


def _check_head_norm(q, eps=1e-6):
    check_tensor("q", q, dtype=torch.bfloat16)
    if q.dim() < 1 or q.shape[-1] == 0 or q.shape[-1] > 8192:
        raise ValueError(f"q: expected [..., D] with 1 <= D <= 8192, got shape {tuple(q.shape)}")


head_rms_norm_op = define_op(
    "head_rms_norm(Tensor q, float eps=1e-06, *, str? backend=None) -> Tensor",
    check=_check_head_norm,
    reference=ref_norm.head_rms_norm_bf16_rn,
    fake=lambda q, eps=1e-6: torch.empty_like(q),
    triton=tri.head_rms_norm,
)


def head_rms_norm(q, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """Per-head query RMS norm without weight, in the reference's bf16 op order (spec §5.1).

    q : bf16 [..., D] (D = 512). Returns bf16 like q:
    ``q * rsqrt(mean(q^2) + eps)`` with q^2 -> bf16, fp32 mean -> bf16, + bf16(eps) -> bf16, rsqrt -> bf16,
    bf16 multiply, each step correctly rounded (``reference.norm.head_rms_norm_bf16_rn``, every backend
    bit for bit). The literal torch expression (``head_rms_norm_bf16``) differs by one bf16 ulp of the
    rsqrt in ~4e-5 of rows on the CPU, and depends on the batch size there.
    """
    return head_rms_norm_op(q, eps, backend=backend)


# ----------------------------------------------------------------------------- fake quant
def _check_fq8(x, block=64):
    check_tensor("x", x, dtype=_FLOAT)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dim, got a 0-d tensor")
    check_choice("block", block, (32, 64, 128))
    check_multiple("x.shape[-1]", x.shape[-1], block)


def _check_fq4(x, block=32):
    check_tensor("x", x, dtype=_FLOAT)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dim, got a 0-d tensor")
    check_choice("block", block, (32,))
    check_multiple("x.shape[-1]", x.shape[-1], block)


def _fake_bf16(x, block=0):
    return torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)


fake_quant_fp8_op = define_op(
    "fake_quant_fp8(Tensor x, int block=64, *, str? backend=None) -> Tensor",
    check=_check_fq8,
    reference=lambda x, block=64: ref_quant.fake_quant_fp8(x, block),
    fake=_fake_bf16,
    triton=tri.fake_quant_fp8,
)

fake_quant_fp4_op = define_op(
    "fake_quant_fp4(Tensor x, int block=32, *, str? backend=None) -> Tensor",
    check=_check_fq4,
    reference=ref_quant.fake_quant_fp4,
    fake=_fake_bf16,
    triton=tri.fake_quant_fp4,
)


def fake_quant_fp8(x, block: int = 64, *, backend: str | None = None) -> torch.Tensor:
    """FP8 fake-quant, the in-place mode of ``act_quant`` as a function (spec §2.2).

    x : [..., K] bf16 (fp16/fp32 accepted), K a multiple of ``block`` (64 for the KV nope dims, 128, 32).
    Returns bf16 [..., K] = ``bf16(fp32(e4m3(clamp(x/s, +-448))) * s)``, ``s = 2^ceil(log2(max(amax,1e-4)/448))``
    per block (lossless into bf16). Bitwise equal to the reference; a block with NaN/inf gives NaN.
    """
    return fake_quant_fp8_op(x, block, backend=backend)


def fake_quant_fp4(x, block: int = 32, *, backend: str | None = None) -> torch.Tensor:
    """FP4 (E2M1, ue8m0 per 32) fake-quant (``fp4_act_quant(x, 32, inplace=True)``, spec §2.2).

    x : [..., K], K a multiple of 32. Returns bf16 = ``bf16(e2m1(clamp(x/s, +-6)) * s)``,
    ``s = 2^ceil(log2(max(amax, 6*2^-126)/6))``; ties round half to even on codes. Bitwise equal to the
    reference; a block with NaN/inf gives NaN.
    """
    return fake_quant_fp4_op(x, block, backend=backend)


# ----------------------------------------------------------------------------- MXFP4 dequant
def _check_mxfp4(packed, scale, dtype=None):
    check_tensor("packed", packed, dtype=(torch.uint8, torch.int8), dim=2)
    if packed.shape[1] % 16 != 0:
        raise ValueError(f"packed.shape[1]: expected K/2 with K a multiple of 32 (a multiple of 16), got {packed.shape[1]}")
    check_tensor("scale", scale, dtype=(torch.float8_e8m0fnu, torch.uint8), shape=(packed.shape[0], packed.shape[1] // 16))
    check_same_device(packed=packed, scale=scale)
    if dtype is not None:
        check_choice("dtype", dtype, (torch.float32, torch.bfloat16))


def _ref_mxfp4(packed, scale, dtype=None):
    return ref_quant.dequant_mxfp4(packed, scale, dtype or torch.float32)


def _tri_mxfp4(packed, scale, dtype=None):
    return tri.dequant_mxfp4(packed, scale, dtype or torch.float32)


dequant_mxfp4_op = define_op(
    "dequant_mxfp4(Tensor packed, Tensor scale, ScalarType? dtype=None, *, str? backend=None) -> Tensor",
    check=_check_mxfp4,
    reference=_ref_mxfp4,
    fake=lambda packed, scale, dtype=None: packed.new_empty((packed.shape[0], 2 * packed.shape[1]),
                                                              dtype=dtype or torch.float32),
    triton=_tri_mxfp4,
)


def dequant_mxfp4(packed, scale, dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Dequantize an MXFP4 weight (spec §2.3, §8.2).

    packed : uint8/int8 [N, K/2], byte k = element 2k (low nibble) | element 2k+1 (high nibble).
    scale : e8m0 (float8_e8m0fnu or uint8) [N, K/32].  dtype : fp32 (default) or bf16.
    Returns [N, K] ``E2M1(code) * 2^(e-127)`` (exact in both dtypes; e = 0xFF gives NaN).
    """
    return dequant_mxfp4_op(packed, scale, dtype, backend=backend)
