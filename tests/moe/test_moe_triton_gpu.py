"""Triton MXFP4 grouped GEMMs on the GPU at V4 shapes (the CPU tests run them under the interpreter,
with fp32 dots and without the inline PTX of the W4A8 FP8 kernel).

* W4A8 prefill: the FP8-MMA kernel (``_w4a8_fold_kernel``: e4m3 weights with the per-32 scales
  folded in, byte-permute LUT in inline PTX, promotion per 128-K block) at both tile configs
  (groups of ~64 rows and of >= 128 rows), fused W1/W3 + SwiGLU with row ids / routing weights and
  plain W2.
* W4A8 decode on Triton: exactly dequantized activations on the W4A16 kernel.

Tolerance as the CPU tests (``assert_gemm_close``: one bf16 step, two after SwiGLU, calc_diff < 1e-5): the FP8 MMA
sums each 128-K block with its own (lower-than-fp32) accumulation before the fp32 promotion, the
reference sums 32-K chunks in fp32; measured on H100: calc_diff ~2e-7, ~95% of outputs bit-equal.
"""
import pytest
import torch

from _moe_helpers import assert_gemm_close, offsets_from_counts
from v4kernels.reference import linear as L
from v4kernels.reference import moe as ref
from v4kernels.testing import assert_all_written, make_generator, poisoned

SHAPES = {"flash-w13": (4096, 2048), "flash-w2": (2048, 4096), "pro-w13": (7168, 3072), "pro-w2": (3072, 7168)}


def _experts(E, N, K, dev, seed, scale):
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    w = torch.randn(E * N, K, device=dev, generator=g) * scale
    w = w * torch.exp2(torch.randint(-2, 3, (E * N, K // 32), device=dev, generator=g).float()).repeat_interleave(32, 1)
    p, s = L.quantize_weight_mxfp4(w)
    return p.view(E, N, K // 2), s.view(E, N, K // 32)


def _acts(gen, M, K, dev):
    x = torch.randn(M, K, generator=gen)
    x = x * torch.exp2(torch.randint(-3, 4, (M, K // 128), generator=gen).float()).repeat_interleave(128, 1)
    return x.bfloat16().to(dev)


def _case(name, counts, path, monkeypatch, swiglu):
    from v4kernels.triton import moe as tri

    monkeypatch.setattr(tri, "A8_PATH", path)
    dev = torch.device("cuda")
    K, N = SHAPES[name]
    gen = make_generator(f"{name}-{counts}-{path}-{swiglu}")
    off = offsets_from_counts(counts).to(dev)
    M = int(off[-1]) + 5  # rows after the groups: 0
    Ma = max(int(off[-1]), 1)
    x = _acts(gen, Ma, K, dev)
    rid = torch.randint(0, Ma, (M,), generator=gen, dtype=torch.int32)
    rid[torch.rand(M, generator=gen) < 0.1] = -1
    rid = rid.to(dev)
    out = poisoned((M, N), torch.bfloat16, dev)
    if swiglu:
        w1, s1 = _experts(len(counts), N, K, dev, 1, 4.0 / K ** 0.5)
        w3, s3 = _experts(len(counts), N, K, dev, 2, 4.0 / K ** 0.5)
        rw = (torch.rand(M, generator=gen) * 2).to(dev)
        want = ref.moe_grouped_swiglu_mxfp4(x, None, w1, s1, w3, s3, off, rid, rw, "w4a8", 10.0)
        tri.moe_grouped_swiglu_mxfp4(x, None, w1, s1, w3, s3, off, rid, rw, "w4a8", 10.0, out=out)
    else:
        w, s = _experts(len(counts), N, K, dev, 3, 0.05)
        want = ref.moe_grouped_gemm_mxfp4(x, None, w, s, off, rid, "w4a8")
        tri.moe_grouped_gemm_mxfp4(x, None, w, s, off, rid, "w4a8", out=out)
    assert_all_written(out)
    assert_gemm_close(out, want, swiglu=swiglu)
    assert (out[int(off[-1]):] == 0).all() and (out[rid.long() < 0] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("counts", [[150, 0, 230], [40, 70, 0, 55]], ids=["tiles128", "tiles64"])
def test_w4a8_fp8_kernel_vs_reference(name, counts, monkeypatch):
    _case(name, counts, "fold", monkeypatch, swiglu=name.endswith("w13"))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["flash-w13", "pro-w2"])
def test_w4a8_fp8_kernel_plain_and_fused_both(name, monkeypatch):
    """The other epilogue at the same shape (plain W1 on a w13 shape, fused on a w2 shape)."""
    _case(name, [130, 3, 129], "fold", monkeypatch, swiglu=not name.endswith("w13"))


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SHAPES))
def test_w4a8_decode_path_vs_reference(name, monkeypatch):
    _case(name, [1, 0, 16, 3, 7, 0, 2, 16], "bf16", monkeypatch, swiglu=name.endswith("w13"))
