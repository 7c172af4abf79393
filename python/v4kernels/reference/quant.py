"""Float32 references of the V4 quantization formats (spec §2.2, §2.3, §8.2).

Every function here follows the spec line by line; kernels are tested against these bit for bit.

Scales are powers of two stored as e8m0 bytes (biased exponent, 0xFF = NaN):
``ue8m0_ceil(v)`` gives the biased exponent of ``2^ceil(log2(v))`` computed from the fp32 bits
(exponent field, plus one if the mantissa is non-zero), exactly as the reference kernels do. A
float ``log2``/``ceil`` would be wrong for values just above a power of two.

Non-finite input (documented behaviour, shared by all backends): a block whose amax is NaN or
±inf gets the NaN scale byte 0xFF; its quantized values are unspecified (NaN here).
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
FP4_MAX = 6.0
FP4_AMAX_FLOOR = 6.0 * 2.0 ** -126
E8M0_NAN = 0xFF

# E2M1 code -> value (sign in bit 3), spec §2.2.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e2m1_table(device=None) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def ue8m0_ceil(v: torch.Tensor) -> torch.Tensor:
    """Biased e8m0 exponent (int32) of 2^ceil(log2(v)) for positive normal fp32 ``v``.

    Non-finite ``v`` gives 0xFF (the e8m0 NaN)."""
    v = v.float()
    bits = v.view(torch.int32)
    exp = (bits >> 23) & 0xFF
    out = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return torch.where(torch.isfinite(v), out, torch.full_like(out, E8M0_NAN))


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes (uint8 or float8_e8m0fnu) -> fp32 2^(e-127); 0xFF -> NaN."""
    if e.dtype == torch.float8_e8m0fnu:
        e = e.view(torch.uint8)
    e = e.to(torch.int32)
    val = torch.exp2((e - 127).float())
    return torch.where(e == E8M0_NAN, torch.full_like(val, float("nan")), val)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block != 0:
        raise ValueError(f"x: expected the last dim to be a multiple of {block}, got {x.shape[-1]}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _amax(xb: torch.Tensor) -> torch.Tensor:
    # NaN-propagating: torch.amax propagates NaN.
    return xb.abs().amax(dim=-1, keepdim=True)


def act_quant_fp8(x: torch.Tensor, block: int = 128):
    """Real FP8 activation quantization (``act_quant(x, block, "ue8m0")``, spec §2.2).

    x: [..., K] (bf16 in V4; any float accepted), K a multiple of ``block``.
    Returns ``q`` float8_e4m3fn [..., K] and ``s`` e8m0 exponents as float8_e8m0fnu [..., K/block].
    ``amax = max(max|x_blk|, 1e-4)``; ``s = 2^ceil(log2(amax * (1/448)))``;
    ``q = e4m3_rne(clamp(x / s, -448, 448))``.
    """
    xb = _blocks(x, block)
    amax = torch.clamp_min(_amax(xb), FP8_AMAX_FLOOR)
    e = ue8m0_ceil(amax * (1.0 / FP8_MAX))
    s = e8m0_to_float(e)
    y = torch.clamp(xb / s, -FP8_MAX, FP8_MAX)
    q = y.to(torch.float8_e4m3fn).reshape(x.shape)
    return q, e.squeeze(-1).to(torch.uint8).view(torch.float8_e8m0fnu)


def dequant_fp8(q: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    """fp32(q) * s per block of ``block`` along the last dim."""
    qb = q.float().reshape(*q.shape[:-1], q.shape[-1] // block, block)
    return (qb * e8m0_to_float(s).unsqueeze(-1)).reshape(q.shape)


def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """In-place-mode FP8 act quant as a function: ``bf16(fp32(q) * s)`` (lossless into bf16)."""
    q, s = act_quant_fp8(x, block)
    return dequant_fp8(q, s, block).to(torch.bfloat16)


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``y`` (already clamped to [-6, 6]) to E2M1 codes (uint8, 0..15).

    Round-half-even on codes: ties 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
    The sign bit is kept for negative values that round to zero (code 8 = -0)."""
    a = y.abs()
    code = (
        (a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
        + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int()
    )
    sign = torch.signbit(y).int() << 3
    return (code | sign).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return e2m1_table(codes.device)[codes.long()]


def quant_fp4(x: torch.Tensor, block: int = 32):
    """MXFP4 quantization (``fp4_act_quant``, spec §2.2).

    Returns unpacked codes uint8 [..., K] and e8m0 scales float8_e8m0fnu [..., K/block].
    ``amax = max(max|x_blk|, 6*2^-126)``; ``s = 2^ceil(log2(amax / 6))``; ``q = e2m1(clamp(x/s, -6, 6))``.
    A non-finite block gets scale 0xFF (the module's documented behaviour); its codes are unspecified."""
    xb = _blocks(x, block)
    amax = torch.clamp_min(_amax(xb), FP4_AMAX_FLOOR)
    e = ue8m0_ceil(amax / FP4_MAX)
    s = e8m0_to_float(e)
    y = torch.clamp(xb / s, -FP4_MAX, FP4_MAX)
    codes = e2m1_encode(torch.nan_to_num(y)).reshape(x.shape)
    return codes, e.squeeze(-1).to(torch.uint8).view(torch.float8_e8m0fnu)


def dequant_fp4(codes: torch.Tensor, s: torch.Tensor, block: int = 32) -> torch.Tensor:
    """fp32 values ``E2M1(code) * 2^(e-127)`` of unpacked codes."""
    v = e2m1_decode(codes)
    vb = v.reshape(*v.shape[:-1], v.shape[-1] // block, block)
    return (vb * e8m0_to_float(s).unsqueeze(-1)).reshape(v.shape)


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """In-place-mode FP4 act quant as a function: ``bf16(fp32(q) * s)``."""
    codes, s = quant_fp4(x, block)
    return dequant_fp4(codes, s, block).to(torch.bfloat16)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes; element 2k in the low nibble, 2k+1 in the high nibble."""
    if codes.shape[-1] % 2 != 0:
        raise ValueError(f"codes: expected an even last dim to pack two per byte, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes (inverse of ``pack_fp4``)."""
    p = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    lo, hi = p & 0xF, p >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """MXFP4 weight ``[N, K/2]`` packed + e8m0 ``[N, K/32]`` -> dense ``[N, K]`` (exact in fp32 and bf16)."""
    return dequant_fp4(unpack_fp4(packed), scale, 32).to(dtype)


def fp4_codes_to_fp8(codes: torch.Tensor) -> torch.Tensor:
    """Exact conversion of E2M1 codes to e4m3 values (every E2M1 value is an e4m3 value).

    The per-32 e8m0 scale stays separate: W4A8 GEMMs apply ``sx * sW`` per 32-K chunk (spec §2.3)."""
    return e2m1_decode(codes).to(torch.float8_e4m3fn)
