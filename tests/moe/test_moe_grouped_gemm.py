"""MXFP4 grouped GEMMs (spec §2.3, §8.2): reference checks, kernels vs reference on ragged groups.

Weights are fresh random values quantized to MXFP4 (so the reference is exact on them) and the
W4A8 activations are FP8-quantized 1x128 by the same act_quant as the reference. Tolerance: the
kernel and the reference differ only in fp32 summation order, so an output may differ by one bf16
rounding step (|d| <= 2^-7 |ref| + 2^-8 max|ref|; calc_diff < 1e-5); see _moe_helpers."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from _moe_helpers import activations, assert_gemm_close, mxfp4_experts, offsets_from_counts
from v4kernels.ops import moe as ops
from v4kernels.reference import linear as L
from v4kernels.reference import moe as ref
from v4kernels.reference import quant as q
from v4kernels.testing import assert_all_written, calc_diff, kernel_backends, make_generator, poisoned, run_opcheck

BACKENDS = kernel_backends("moe_grouped_gemm_mxfp4")
MODES = ["w4a8", "w4a16"]
# W4A8 runs one of two Triton paths chosen by group size: "fold" (FP8 MMA on e4m3 weights with the
# per-32 scales folded in, prefill) or "bf16" (exactly dequantized activations on the W4A16
# kernel, decode). The tests force each in turn (the CPU test shapes are decode-sized).
A8_PATHS = ["fold", "bf16"]


@pytest.fixture(params=A8_PATHS)
def a8_path(request, monkeypatch):
    from v4kernels.triton import moe as tri

    monkeypatch.setattr(tri, "A8_PATH", request.param)
    return request.param


def test_reference_w4a8_matches_fp4_linear(gen):
    w, s = mxfp4_experts(gen, 3, 32, 256)
    x = activations(gen, 10, 256)
    off = offsets_from_counts([4, 0, 6])
    out = ref.moe_grouped_gemm_mxfp4(x, None, w, s, off, None, "w4a8")
    assert_gemm_close(out[:4], L.fp4_linear(x[:4], w[0], s[0]))
    assert_gemm_close(out[4:], L.fp4_linear(x[4:], w[2], s[2]))


def test_reference_w4a16_is_dequantized_matmul(gen):
    w, s = mxfp4_experts(gen, 2, 32, 128)
    x = activations(gen, 5, 128)
    off = offsets_from_counts([2, 3])
    out = ref.moe_grouped_gemm_mxfp4(x, None, w, s, off, None, "w4a16")
    wd = q.dequant_mxfp4(w[1], s[1])
    assert torch.equal(out[2:], (x[2:].float() @ wd.T).bfloat16())


def test_reference_swiglu_clamp_and_weight(gen):
    w1, s1 = mxfp4_experts(gen, 1, 32, 128, scale=2.0)  # large outputs: the clamp bites
    w3, s3 = mxfp4_experts(gen, 1, 32, 128, scale=2.0)
    x = activations(gen, 4, 128)
    rw = torch.rand(4, generator=gen)
    h = ref.moe_grouped_swiglu_mxfp4(x, None, w1, s1, w3, s3, offsets_from_counts([4]), None, rw, "w4a8", 10.0)
    g = L.fp4_linear(x, w1[0], s1[0]).float()
    u = L.fp4_linear(x, w3[0], s3[0]).float()
    assert g.abs().max() > 10 and u.abs().max() > 10
    want = (torch.nn.functional.silu(g.clamp(max=10)) * u.clamp(-10, 10) * rw[:, None]).bfloat16()
    assert_gemm_close(h, want)


# counts per expert: ragged with empty experts, one token, all tokens to one expert
CASES = {
    "ragged-with-empty": [3, 0, 5, 1, 0, 17, 2, 0],
    "one-token": [0, 0, 1, 0],
    "all-to-one": [0, 0, 21, 0],
}


def _gemm_case(gen, counts, K, N, pad=1, holes=False):
    E = len(counts)
    off = offsets_from_counts(counts, pad)
    M = int(off[-1]) + 3  # 3 tail rows outside every group: must come out 0
    Ma = 9
    a = activations(gen, Ma, K)
    rid = torch.randint(0, Ma, (M,), generator=gen, dtype=torch.int32)
    if holes:
        rid[torch.rand(M, generator=gen) < 0.2] = -1
    w, s = mxfp4_experts(gen, E, N, K)
    return a, w, s, off, rid


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_gemm_kernel(backend, mode, case, gen, device, a8_path):
    if mode == "w4a16" and a8_path != A8_PATHS[0]:
        pytest.skip("the W4A8 path choice does not apply to w4a16")
    from v4kernels.triton import moe as tri

    a, w, s, off, rid = _gemm_case(gen, CASES[case], 256, 48, pad=2, holes=True)
    want = ref.moe_grouped_gemm_mxfp4(a, None, w, s, off, rid, mode)
    out = poisoned((rid.shape[0], 48), torch.bfloat16, device)
    tri.moe_grouped_gemm_mxfp4(a.to(device), None, w.to(device), s.to(device), off.to(device), rid.to(device), mode,
                               out=out)
    assert_all_written(out)
    assert_gemm_close(out.cpu(), want)
    assert bool((out[int(off[-1]):] == 0).all()) and bool((out.cpu()[rid < 0] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_gemm_prequantized_fp8_and_no_row_ids(backend, gen, device):
    a, w, s, off, _ = _gemm_case(gen, [4, 0, 3], 128, 32)
    a = activations(gen, int(off[-1]), 128)
    aq, sa = q.act_quant_fp8(a, 128)
    want = ref.moe_grouped_gemm_mxfp4(a, None, w, s, off, None, "w4a8")
    for scale in (sa, sa.view(torch.uint8)):  # float8_e8m0fnu or uint8 scales
        out = ops.moe_grouped_gemm_mxfp4(aq.to(device), scale.to(device), w.to(device), s.view(torch.uint8).to(device),
                                         off.to(device), None, "w4a8", backend=backend)
        assert_gemm_close(out.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_grouped_swiglu_kernel(backend, mode, gen, device, a8_path):
    if mode == "w4a16" and a8_path != A8_PATHS[0]:
        pytest.skip("the W4A8 path choice does not apply to w4a16")
    from v4kernels.triton import moe as tri

    counts = [2, 0, 6, 1]
    a, w1, s1, off, rid = _gemm_case(gen, counts, 128, 32, holes=True)
    w1, s1 = mxfp4_experts(gen, 4, 32, 128, scale=1.0)  # outputs beyond +-10: the clamp is exercised
    w3, s3 = mxfp4_experts(gen, 4, 32, 128, scale=1.0)
    rw = torch.rand(rid.shape[0], generator=gen)
    want = ref.moe_grouped_swiglu_mxfp4(a, None, w1, s1, w3, s3, off, rid, rw, mode, 10.0)
    out = poisoned((rid.shape[0], 32), torch.bfloat16, device)
    tri.moe_grouped_swiglu_mxfp4(a.to(device), None, w1.to(device), s1.to(device), w3.to(device), s3.to(device),
                                 off.to(device), rid.to(device), rw.to(device), mode, 10.0, out=out)
    assert_all_written(out)
    assert_gemm_close(out.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=5)
@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=6), mode=st.sampled_from(MODES),
       pad=st.sampled_from([1, 8]), seed=st.integers(0, 2**31))
def test_grouped_gemm_hypothesis_group_sizes(backend, counts, mode, pad, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = make_generator(seed)
    a, w, s, off, rid = _gemm_case(g, counts, 128, 32, pad=pad, holes=True)
    want = ref.moe_grouped_gemm_mxfp4(a, None, w, s, off, rid, mode)
    out = ops.moe_grouped_gemm_mxfp4(a.to(dev), None, w.to(dev), s.to(dev), off.to(dev), rid.to(dev), mode,
                                     backend=backend)
    assert_gemm_close(out.cpu(), want)


def test_fold_flushes_only_far_below_the_row_scale(gen, device, monkeypatch):
    """The FP8 path folds the per-32 weight scales into e4m3 values relative to the largest scale R
    of each weight row: exact for blocks with scale >= R - 11, blocks further below are flushed to
    zero (documented). Here one block per row sits 20 binades down: the kernel equals the
    reference on weights with those blocks zeroed, bit for bit after bf16 up to summation order."""
    from v4kernels.triton import moe as tri

    monkeypatch.setattr(tri, "A8_PATH", "fold")
    E, N, K = 2, 32, 256
    w, s = mxfp4_experts(gen, E, N, K)
    s = s.view(torch.uint8).clone()
    far = torch.randint(0, K // 32, (E, N), generator=gen)
    ref_max = s.amax(dim=2)
    s.scatter_(2, far[..., None], (ref_max[..., None].int() - 20).clamp(min=0).to(torch.uint8))
    a = activations(gen, 12, K)
    off = offsets_from_counts([5, 7])
    out = tri.moe_grouped_gemm_mxfp4(a.to(device), None, w.to(device), s.to(device), off.to(device), None, "w4a8")
    # the same weights with the far blocks' codes zeroed
    codes = q.unpack_fp4(w).view(E, N, K // 32, 32)
    codes.scatter_(2, far[..., None, None].expand(E, N, 1, 32), 0)
    w0 = q.pack_fp4(codes.view(E, N, K))
    want = ref.moe_grouped_gemm_mxfp4(a, None, w0, s, off, None, "w4a8")
    assert_gemm_close(out.cpu(), want)
    # and the full reference differs by no more than the flushed blocks can contribute
    full = ref.moe_grouped_gemm_mxfp4(a, None, w, s, off, None, "w4a8")
    assert calc_diff(out.cpu().float(), full.float()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, gen, device):
    a, w, s, off, rid = _gemm_case(gen, [3, 5], 128, 32)
    args = (a.to(device), None, w.to(device), s.to(device), off.to(device), rid.to(device), "w4a8")
    o1 = ops.moe_grouped_gemm_mxfp4(*args, backend=backend)
    o2 = ops.moe_grouped_gemm_mxfp4(*args, backend=backend)
    assert torch.equal(o1.view(torch.int16), o2.view(torch.int16))


def test_bad_inputs(gen):
    a, w, s, off, rid = _gemm_case(gen, [3, 5], 128, 32)
    f = ops.moe_grouped_gemm_mxfp4
    with pytest.raises(ValueError, match=r"w K \(= 2 \* w.shape\[2\]\): expected a multiple of 128, got 96"):
        f(a[:, :96], None, w[:, :, :48], s[:, :, :3], off)
    with pytest.raises(ValueError, match="w_scale: expected shape"):
        f(a, None, w, s[:, :, :2], off)
    with pytest.raises(TypeError, match="w_scale: expected dtype"):
        f(a, None, w, s.float(), off)
    with pytest.raises(ValueError, match="a: expected shape"):
        f(a[:, :64], None, w, s, off)
    with pytest.raises(ValueError, match="expert_offsets: expected shape"):
        f(a, None, w, s, off[:-1])
    with pytest.raises(ValueError, match="expert_offsets: expected non-decreasing"):
        f(a, None, w, s, off.flip(0), rid)
    with pytest.raises(ValueError, match=r"row_ids: expected values in \[-1, 8\], got 9"):
        f(a, None, w, s, off, torch.full_like(rid, 9))
    with pytest.raises(ValueError, match="mode: expected one of"):
        f(a, None, w, s, off, rid, "w4a4")
    with pytest.raises(ValueError, match="a_scale: expected e8m0 scales"):
        f(q.act_quant_fp8(a, 128)[0], None, w, s, off, rid)
    with pytest.raises(TypeError, match="a: expected dtype"):
        f(a.float(), None, w, s, off, rid)
    w3, s3 = mxfp4_experts(gen, 2, 16, 128)
    with pytest.raises(ValueError, match="w3: expected shape"):
        ops.moe_grouped_swiglu_mxfp4(a, None, w, s, w3, s3, off, rid)
    with pytest.raises(ValueError, match="row_weights: expected shape"):
        ops.moe_grouped_swiglu_mxfp4(a, None, w, s, w, s, off, rid, torch.ones(3))


def test_opcheck(gen, device):
    a, w, s, off, rid = _gemm_case(gen, [3, 5], 128, 32)
    s = s.view(torch.uint8)  # opcheck's schema test cannot compare float8_e8m0fnu tensors
    d = lambda t: t.to(device)  # noqa: E731
    run_opcheck(torch.ops.v4kernels.moe_grouped_gemm_mxfp4.default, (d(a), None, d(w), d(s), d(off), d(rid), "w4a16"))
    run_opcheck(torch.ops.v4kernels.moe_grouped_swiglu_mxfp4.default,
                (d(a), None, d(w), d(s), d(w), d(s), d(off), d(rid), d(torch.rand(rid.shape[0])), "w4a8", 10.0))
