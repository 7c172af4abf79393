"""Shared inputs of the MoE tests: random MXFP4 / FP8 expert weights and tolerance checks."""
import torch

from v4kernels.reference import linear as L
from v4kernels.testing import assert_close, calc_diff


def mxfp4_experts(gen, E, N, K, scale=0.05):
    """E fresh random weights [N, K] quantized to MXFP4: packed uint8 [E, N, K/2] + e8m0 [E, N, K/32].

    Scales are spread over a few binades per row so the per-32 weight scales differ."""
    ws, ss = [], []
    for _ in range(E):
        w = torch.randn(N, K, generator=gen) * scale
        w = w * torch.exp2(torch.randint(-2, 3, (N, K // 32), generator=gen).float()).repeat_interleave(32, 1)
        p, s = L.quantize_weight_mxfp4(w)
        ws.append(p)
        ss.append(s)
    return torch.stack(ws), torch.stack(ss)


def fp8_weight(gen, N, K, scale=0.05):
    return L.quantize_weight_fp8_block(torch.randn(N, K, generator=gen) * scale)


def activations(gen, M, K, scale=1.0):
    """bf16 rows whose magnitudes vary per row and per 128-block (so the 1x128 scales differ)."""
    x = torch.randn(M, K, generator=gen) * scale
    x = x * torch.exp2(torch.randint(-3, 4, (M, K // 128), generator=gen).float()).repeat_interleave(128, 1)
    return x.bfloat16()


def offsets_from_counts(counts, pad=1):
    c = torch.tensor([(n + pad - 1) // pad * pad for n in counts], dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)]).to(torch.int32)


def assert_gemm_close(out, ref, name="out", swiglu=False):
    """Kernel vs reference GEMM output (both bf16 after an fp32 accumulation).

    The sums agree up to fp32 summation order, so an element may differ by one bf16 rounding step:
    |out - ref| <= 2^-7 |ref| + 2^-8 * max|ref| (cancellation), and calc_diff < 1e-5.
    swiglu: the output is bf16(silu(bf16(g)) * bf16(u) * w); g and u may each be one step off, so h
    may be two (2^-6 |ref|; seen on the H100: 2 of 788k outputs at 2 steps, calc_diff 1.7e-7)."""
    ref_f = ref.float()
    amax = float(ref_f.abs().max()) if ref.numel() else 0.0
    rtol = 2.0 ** -6 if swiglu else 2.0 ** -7
    assert_close(out.float(), ref_f, atol=2.0 ** -8 * amax + 1e-30, rtol=rtol, name=name)
    if ref.numel() and amax > 0:
        assert calc_diff(out.float(), ref_f) < 1e-5, f"{name}: calc_diff {calc_diff(out.float(), ref_f)}"
