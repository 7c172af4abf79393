"""Rounding helpers shared by the Triton kernels.

Each returns fp32 values that lie exactly on the target grid, rounded to nearest even, so the
final ``.to(fp8/bf16)`` is exact. On the GPU this costs a few integer ops; it also makes the
kernels bit-exact under ``TRITON_INTERPRET=1``, whose own fp8 conversion rounds incorrectly and
whose fp32->bf16 store truncates (measured with triton 3.6).
"""
import triton
import triton.language as tl


@triton.jit
def round_e4m3(y):
    """fp32 ``y`` in [-448, 448] -> the nearest e4m3 value (RNE), as fp32 (sign of zero kept)."""
    bits = y.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    e = tl.maximum(e, -6)  # below 2^-6 the e4m3 grid is the subnormal spacing 2^-9
    # adding then subtracting 1.5 * 2^(e - 3 + 23) rounds |y| to a multiple of 2^(e-3), ties to even
    magic = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (tl.abs(y) + magic) - magic
    # sign by OR-ing the bit back: Triton's unary minus is 0 - r, which loses the sign of zero
    return (r.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(x):
    """fp32 -> nearest bf16 value (RNE), as fp32; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def ue8m0_exponent(v):
    """Biased e8m0 exponent (uint32) of 2^ceil(log2(v)) for positive normal fp32 ``v``."""
    bits = v.to(tl.uint32, bitcast=True)
    return ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.uint32)


@triton.jit
def exp2_int(e):
    """2^(e - 127) for a biased exponent e in [1, 254], exact, as fp32."""
    return (e.to(tl.uint32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_bits(r):
    """Bit pattern (uint8) of an fp32 value already on the e4m3 grid (|r| <= 448); NaN -> 0x7F.

    Built from integer ops rather than ``.to(tl.float8e4nv)`` so the sign of zero survives the
    interpreter; on the GPU it costs a few integer instructions in memory-bound kernels."""
    b = r.to(tl.uint32, bitcast=True)
    sign = (b >> 31) << 7
    e = ((b >> 23) & 0xFF).to(tl.int32) - 127
    normal = (((e + 7) << 3).to(tl.uint32) | ((b >> 20) & 7))
    sub = (tl.abs(r) * 512.0).to(tl.uint32)  # multiples of 2^-9 below 2^-6
    code = tl.where(e >= -6, normal, sub) | sign
    code = tl.where(r != r, 0x7F, code)
    return code.to(tl.uint8)
