"""FP8 activation quantization (spec §2.2): reference formulas, and kernels bit-exact against them."""
import pytest
import torch
from hypothesis import given, strategies as st

import v4kernels
from v4kernels.reference import quant as ref
from v4kernels.testing import assert_bitwise_equal, kernel_backends, make_generator, run_opcheck

BACKENDS = kernel_backends("act_quant_fp8")


def _inputs(gen, rows, cols, device, spread=True):
    x = torch.randn(rows, cols, generator=gen)
    if spread:  # magnitudes from 1e-6 to 1e4 so tiny-amax floors and big scales are exercised
        x = x * torch.logspace(-6, 4, rows)[:, None]
    return x.bfloat16().to(device)


def test_reference_matches_spec_formula(gen):
    x = _inputs(gen, 16, 256, "cpu")
    q, s = ref.act_quant_fp8(x, 128)
    xb = x.float().view(16, 2, 128)
    amax = xb.abs().amax(-1).clamp_min(1e-4)
    # exponent from frexp: 2^ceil(log2(v)) for v = amax/448 computed as the spec multiplies
    v = amax * (1 / 448)
    mant, ex = torch.frexp(v)  # v = mant * 2^ex, mant in [0.5, 1)
    want = torch.where(mant == 0.5, ex - 1, ex) + 127
    assert torch.equal(s.view(torch.uint8).long(), want.long())
    sf = torch.exp2((want - 127).float())
    qq = (xb / sf[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(16, 256)
    assert_bitwise_equal(q, qq)


def test_scale_exponent_just_above_power_of_two():
    # amax/448 = 2^-10 * (1 + 2^-23): float log2 would round to -10; the exponent bits give -9.
    v = torch.tensor([2.0 ** -10 * (1 + 2.0 ** -23)], dtype=torch.float32)
    assert ref.ue8m0_ceil(v).item() == 127 - 9
    assert ref.ue8m0_ceil(torch.tensor([2.0 ** -10])).item() == 127 - 10


def test_tiny_amax_floor_and_clamp():
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    x[0, 0] = 1e-6
    q, s = ref.act_quant_fp8(x, 128)
    assert s.view(torch.uint8).item() == ref.ue8m0_ceil(torch.tensor([1e-4 * (1 / 448)])).item()
    y = torch.full((1, 64), 448.0, dtype=torch.bfloat16)
    q, s = ref.act_quant_fp8(y, 64)
    assert q.float().max().item() == 448.0


def test_fake_quant_is_lossless_round_trip(gen):
    x = _inputs(gen, 8, 448, "cpu")
    fq = ref.fake_quant_fp8(x, 64)
    assert fq.dtype == torch.bfloat16
    # values already on the grid quantize to themselves
    assert torch.equal(ref.fake_quant_fp8(fq, 64), fq)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("shape", [(1, 128), (7, 512), (3, 5, 256)], ids=["one-row", "odd-rows", "3d"])
def test_kernel_bitwise_equal_to_reference(backend, block, shape, gen, device):
    x = _inputs(gen, int(torch.tensor(shape[:-1]).prod()), shape[-1], device).view(shape)
    q_ref, s_ref = ref.act_quant_fp8(x.cpu(), block)
    q, s = v4kernels.act_quant_fp8(x, block, backend=backend)
    assert_bitwise_equal(s.cpu(), s_ref, "scales")
    assert_bitwise_equal(q.cpu(), q_ref, "values")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_nonfinite_blocks_get_nan_scale(backend, gen, device):
    x = _inputs(gen, 4, 256, device)
    x[0, 3] = float("nan")
    x[2, 200] = float("inf")
    q, s = v4kernels.act_quant_fp8(x, 128, backend=backend)
    s_ref = ref.act_quant_fp8(x.cpu(), 128)[1]
    assert_bitwise_equal(s.cpu(), s_ref, "scales")
    assert s.view(torch.uint8)[0, 0].item() == 0xFF and s.view(torch.uint8)[2, 1].item() == 0xFF
    finite = ref.act_quant_fp8(x.cpu(), 128)[0]
    assert_bitwise_equal(q.cpu()[1], finite[1])


@pytest.mark.parametrize("backend", BACKENDS)
@given(rows=st.integers(1, 9), nblk=st.integers(1, 4), block=st.sampled_from([64, 128]), seed=st.integers(0, 2**31))
def test_kernel_matches_reference_hypothesis(backend, rows, nblk, block, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = make_generator(seed)
    scale = torch.exp2(torch.randint(-20, 20, (rows, 1), generator=g).float())
    x = (torch.randn(rows, nblk * block, generator=g) * scale).bfloat16()
    q_ref, s_ref = ref.act_quant_fp8(x, block)
    q, s = v4kernels.act_quant_fp8(x.to(dev), block, backend=backend)
    assert_bitwise_equal(s.cpu(), s_ref, "scales")
    assert_bitwise_equal(q.cpu(), q_ref, "values")


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(TypeError, match="x: expected dtype"):
        v4kernels.act_quant_fp8(torch.zeros(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x.shape\[-1\].*multiple of 128, got 100"):
        v4kernels.act_quant_fp8(torch.zeros(2, 100, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="block: expected one of"):
        v4kernels.act_quant_fp8(torch.zeros(2, 128, dtype=torch.bfloat16), 48)


def test_opcheck(device, gen):
    x = _inputs(gen, 4, 256, device)
    run_opcheck(torch.ops.v4kernels.act_quant_fp8.default, (x, 128))


@pytest.mark.cuda
def test_cuda_graph_and_compile():
    x = torch.randn(64, 1024, device="cuda").bfloat16()
    q_ref, s_ref = ref.act_quant_fp8(x.cpu(), 128)
    for backend in kernel_backends("act_quant_fp8"):
        v4kernels.act_quant_fp8(x, backend=backend)  # warm up (compile) outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            q, s = v4kernels.act_quant_fp8(x, backend=backend)
        g.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(q.cpu(), q_ref)
        f = torch.compile(lambda t: v4kernels.act_quant_fp8(t, backend=backend), fullgraph=True)
        q2, s2 = f(x)
        assert_bitwise_equal(s2.cpu(), s_ref)
