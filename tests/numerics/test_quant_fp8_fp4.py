"""FP8 / FP4 formats (spec §2.2, §2.3): reference edge cases, fake-quant ops, MXFP4 dequant, FP4 -> e4m3."""
import pytest
import torch
from hypothesis import given, strategies as st

from v4kernels.ops import numerics as ops
from v4kernels.reference import quant as q
from v4kernels.testing import assert_bitwise_equal, kernel_backends, make_generator, run_opcheck

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SPECIAL = [0.0, -0.0, 448.0, -448.0, 464.0, 1e-30, -1e-30, 2.0 ** -10, 12.5, 13.5, 17.0, 19.0, 0.25, 0.75, 1.25, 5.0, 6.0, 3.5]


@st.composite
def blocks(draw, block, max_rows=4, nonfinite=False):
    """bf16 rows of ``block`` values mixing specials (+-0, e4m3/e2m1 ties, clamp edges, tiny) and randoms."""
    rows = draw(st.integers(1, max_rows))
    scale = 2.0 ** draw(st.integers(-30, 20))
    vals = draw(st.lists(st.one_of(st.sampled_from(SPECIAL),
                                   st.floats(-1000, 1000, allow_nan=False, width=32)),
                         min_size=rows * block, max_size=rows * block))
    x = torch.tensor(vals, dtype=torch.float32).view(rows, block) * scale
    if nonfinite:
        x[0, draw(st.integers(0, block - 1))] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return x.bfloat16()


def _fp8_by_hand(x, block):
    """Spec formula with an independent e4m3 rounding (nearest of all 256 codes, ties to the even code)."""
    xb = x.float().view(-1, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    m, e = torch.frexp(amax / 448)
    e = torch.where(m == 0.5, e - 1, e)
    s = torch.exp2(e.float())
    y = (xb / s).clamp(-448, 448)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    ok = ~torch.isnan(grid)
    codes = torch.arange(256)[ok]
    g = grid[ok]
    d = (y.reshape(-1, 1) - g[None]).abs()
    best = d.min(-1, keepdim=True).values
    cand = (d == best)
    # among equal distances: even mantissa (code even); sign must match y's sign for zero
    pick = torch.where(cand & (codes[None] % 2 == 0), 1, 0) * 2 + torch.where(cand, 1, 0)
    pick = pick + ((torch.signbit(g)[None] == torch.signbit(y.reshape(-1, 1))) & cand).int() * 4
    idx = codes[pick.argmax(-1)]
    return idx.to(torch.uint8).view(torch.float8_e4m3fn).view(x.shape), (e + 127).view(*x.shape[:-1], -1)


@given(x=blocks(64))
def test_fp8_reference_matches_independent_rounding(x):
    qv, s = q.act_quant_fp8(x, 64)
    qh, eh = _fp8_by_hand(x, 64)
    assert torch.equal(s.view(torch.uint8).long(), eh.long())
    assert_bitwise_equal(qv, qh)


def test_fp8_edge_values():
    x = torch.zeros(1, 64)
    x[0, :8] = torch.tensor([448.0, 12.5, 13.5, -0.0, 0.0, 464.0 / 2, 17.0, 19.0])  # amax 448 -> s = 1
    qv, s = q.act_quant_fp8(x.bfloat16(), 64)
    assert s.view(torch.uint8).item() == 127
    assert qv.float()[0, :8].tolist() == [448.0, 12.0, 14.0, -0.0, 0.0, 224.0, 16.0, 20.0]  # ties to even mantissa
    assert torch.signbit(qv.float()[0, 3])
    tiny = q.act_quant_fp8(torch.full((1, 64), 1e-30).bfloat16(), 64)[1]
    assert tiny.view(torch.uint8).item() == q.ue8m0_ceil(torch.tensor([1e-4 / 448])).item()  # amax floor


def test_nonfinite_documented_behaviour():
    x = torch.randn(3, 64).bfloat16()
    x[0, 5], x[1, 0] = float("nan"), float("-inf")
    qv, s = q.act_quant_fp8(x, 64)
    assert s.view(torch.uint8)[:2, 0].tolist() == [0xFF, 0xFF] and s.view(torch.uint8)[2, 0].item() != 0xFF
    fq = q.fake_quant_fp8(x, 64)
    assert bool(torch.isnan(fq[:2]).all()) and not bool(torch.isnan(fq[2]).any())
    codes, s4 = q.quant_fp4(x[:, :32], 32)
    assert s4.view(torch.uint8)[:2, 0].tolist() == [0xFF, 0xFF]


# ----------------------------------------------------------------------------- FP4
def test_e2m1_tie_rules():
    a = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.24, 0.26, 5.01, 6.0, -0.25, -0.1, -5.0])
    v = q.e2m1_decode(q.e2m1_encode(a))
    assert v.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, 0.5, 6.0, 6.0, -0.0, -0.0, -4.0]
    assert torch.signbit(v[-2]) and q.e2m1_encode(torch.tensor([-0.1])).item() == 8  # code 8 = -0
    assert q.E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _fp4_by_hand(x):
    xb = x.float().view(-1, 32)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0 ** -126)
    m, e = torch.frexp(amax / 6)
    e = torch.where(m == 0.5, e - 1, e)
    y = (xb / torch.exp2(e.float())).clamp(-6, 6)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    d = (y.abs().reshape(-1, 1) - grid).abs()
    best = d.min(-1, keepdim=True).values
    code = torch.where((d == best) & (torch.arange(8) % 2 == 0), 1, 0) * 2 + (d == best).int()
    mag = grid[code.argmax(-1)].view(y.shape)
    return torch.where(torch.signbit(y), -mag, mag) * torch.exp2(e.float())


@given(x=blocks(32))
def test_fp4_reference_matches_independent_rounding(x):
    want = _fp4_by_hand(x).view(x.shape)
    got = q.dequant_fp4(*q.quant_fp4(x, 32), 32)
    assert_bitwise_equal(got, want)


@given(k=st.integers(1, 8).map(lambda v: 32 * v), seed=st.integers(0, 2**31))
def test_pack_unpack(k, seed):
    codes = torch.randint(0, 16, (3, k), generator=make_generator(seed), dtype=torch.uint8)
    p = q.pack_fp4(codes)
    assert p.shape == (3, k // 2)
    assert torch.equal(p & 0xF, codes[:, 0::2]) and torch.equal(p >> 4, codes[:, 1::2])
    assert torch.equal(q.unpack_fp4(p), codes)


def test_pack_odd_k_raises():
    with pytest.raises(ValueError, match="codes: expected an even last dim"):
        q.pack_fp4(torch.zeros(2, 33, dtype=torch.uint8))


def test_fp4_to_e4m3_is_exact():
    codes = torch.arange(16, dtype=torch.uint8)
    f8 = q.fp4_codes_to_fp8(codes)
    assert f8.dtype == torch.float8_e4m3fn
    assert_bitwise_equal(f8.float(), q.e2m1_decode(codes))
    assert f8.view(torch.uint8).tolist()[:8] == [0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C]
    assert f8.view(torch.uint8)[8].item() == 0x80  # -0


# ----------------------------------------------------------------------------- ops
@pytest.mark.parametrize("backend", kernel_backends("fake_quant_fp8"))
@pytest.mark.parametrize("block", [32, 64, 128])
def test_fake_quant_fp8_kernel(backend, block, gen, device):
    x = (torch.randn(5, 3, 448 if block == 64 else 256, generator=gen) * torch.logspace(-6, 4, 5)[:, None, None])
    x = x.bfloat16()
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 12.5, 13.5])
    assert_bitwise_equal(ops.fake_quant_fp8(x.to(device), block, backend=backend).cpu(), q.fake_quant_fp8(x, block))


@pytest.mark.parametrize("backend", kernel_backends("fake_quant_fp8"))
@given(x=blocks(64, max_rows=6))
def test_fake_quant_fp8_hypothesis(backend, x):
    assert_bitwise_equal(ops.fake_quant_fp8(x.to(DEV), 64, backend=backend).cpu(), q.fake_quant_fp8(x, 64))


@pytest.mark.parametrize("backend", kernel_backends("fake_quant_fp4"))
@given(x=blocks(32, max_rows=8), f32=st.booleans())
def test_fake_quant_fp4_hypothesis(backend, x, f32):
    x = x.float() if f32 else x
    assert_bitwise_equal(ops.fake_quant_fp4(x.to(DEV), backend=backend).cpu(), q.fake_quant_fp4(x, 32))


@pytest.mark.parametrize("op", ["fake_quant_fp8", "fake_quant_fp4"])
@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("fake_quant_fp4"))
@given(x=blocks(64, nonfinite=True))
def test_fake_quant_nonfinite_blocks_are_nan(op, backend, x):
    fn = getattr(ops, op)
    y = fn(x.to(DEV), backend=backend).cpu()
    want = getattr(q, op)(x, 64 if op == "fake_quant_fp8" else 32)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert torch.equal(y[fin], want[fin])


@pytest.mark.parametrize("backend", kernel_backends("dequant_mxfp4"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, None])
def test_dequant_mxfp4_kernel(backend, dtype, gen, device):
    packed = torch.randint(0, 256, (37, 96), generator=gen, dtype=torch.uint8)
    scale = torch.randint(60, 190, (37, 6), generator=gen, dtype=torch.uint8)
    scale[0, 0], scale[1, 1] = 0, 255  # 2^-127 (subnormal) and NaN
    want = q.dequant_mxfp4(packed, scale.view(torch.float8_e8m0fnu), dtype or torch.float32)
    y = ops.dequant_mxfp4(packed.to(device), scale.view(torch.float8_e8m0fnu).to(device), dtype, backend=backend).cpu()
    assert y.shape == (37, 192)
    assert_bitwise_equal(torch.nan_to_num(y), torch.nan_to_num(want))
    assert torch.equal(torch.isnan(y), torch.isnan(want))


def test_dequant_mxfp4_semantics():
    packed = torch.tensor([[0x72] + [0] * 15], dtype=torch.uint8)  # element 0 = code 2 (1.0), element 1 = code 7 (6.0)
    scale = torch.tensor([[128]], dtype=torch.uint8)  # 2^1
    y = ops.dequant_mxfp4(packed, scale)
    assert y[0, :2].tolist() == [2.0, 12.0] and y.dtype == torch.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"x.shape\[-1\]: expected a multiple of 64, got 100"):
        ops.fake_quant_fp8(torch.zeros(2, 100, dtype=torch.bfloat16), 64)
    with pytest.raises(ValueError, match="block: expected one of"):
        ops.fake_quant_fp4(torch.zeros(2, 64, dtype=torch.bfloat16), 64)
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.fake_quant_fp4(torch.zeros(2, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"packed.shape\[1\]"):
        ops.dequant_mxfp4(torch.zeros(2, 17, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scale: expected shape"):
        ops.dequant_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="packed: expected dtype"):
        ops.dequant_mxfp4(torch.zeros(2, 16), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="dtype: expected one of"):
        ops.dequant_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8), torch.float16)


def test_opcheck(gen, device):
    x = torch.randn(3, 128, generator=gen).bfloat16().to(device)
    run_opcheck(torch.ops.v4kernels.fake_quant_fp8.default, (x, 64))
    run_opcheck(torch.ops.v4kernels.fake_quant_fp4.default, (x, 32))
    packed = torch.randint(0, 256, (4, 32), generator=gen, dtype=torch.uint8).to(device)
    scale = torch.randint(100, 150, (4, 2), generator=gen, dtype=torch.uint8).to(device)
    run_opcheck(torch.ops.v4kernels.dequant_mxfp4.default, (packed, scale, torch.bfloat16))


@pytest.mark.parametrize("backend", kernel_backends("fake_quant_fp4"))
def test_fake_quant_fp4_subnormal_inputs(backend, gen, device):
    x = (torch.randn(4, 64, generator=gen) * 1e-38).bfloat16()  # bf16 subnormals: scale floor 2^-126
    assert_bitwise_equal(ops.fake_quant_fp4(x.to(device), backend=backend).cpu(), q.fake_quant_fp4(x, 32))
