"""Hadamard (spec §2.4), RoPE + YaRN tables (§2.5), RMSNorm and the bf16 head norm (§2.1, §5.1)."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from v4kernels.ops import numerics as ops
from v4kernels.reference import hadamard as rh
from v4kernels.reference import norm as rn
from v4kernels.reference import rope as rr
from v4kernels.testing import (assert_bitwise_equal, assert_close, kernel_backends, make_generator,
                               run_opcheck)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- Hadamard
def test_hadamard_reference_is_orthonormal_sylvester(gen):
    x = torch.randn(6, 128, generator=gen)
    y = rh.hadamard_transform(x)
    H = rh.hadamard_matrix(128)
    assert torch.allclose(y.double(), x.double() @ H.double() / math.sqrt(128), atol=1e-5)
    assert torch.allclose(rh.hadamard_transform(y), x, atol=1e-5)  # H is its own inverse (orthonormal, symmetric)
    assert torch.allclose((y * y).sum(-1), (x * x).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends("hadamard_transform"))
@pytest.mark.parametrize("n", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hadamard_kernel_bitwise(backend, n, dtype, gen, device):
    x = (torch.randn(3, 7, n, generator=gen) * 10).to(dtype)
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, -3e38])
    want = rh.hadamard_transform(x)
    y = ops.hadamard_transform(x.to(device), backend=backend).cpu()
    assert_bitwise_equal(y, want)


@pytest.mark.parametrize("backend", kernel_backends("hadamard_transform"))
@given(rows=st.integers(1, 40), logn=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_hadamard_hypothesis(backend, rows, logn, seed):
    x = torch.randn(rows, 2 ** logn, generator=make_generator(seed)).bfloat16()
    assert_bitwise_equal(ops.hadamard_transform(x.to(DEV), backend=backend).cpu(), rh.hadamard_transform(x))


# ----------------------------------------------------------------------------- RoPE tables
def test_yarn_range_and_table_determinism():
    y = rr.YarnConfig()
    assert rr.yarn_correction_range(64, 160000.0, y) == (15, 25)
    assert rr.yarn_correction_range(64, 10000.0, y) == (20, 33)
    f = rr.rope_freqs(160000.0, y)
    base = 1.0 / (160000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    # spec: f_j <- f_j/16 * ramp_j + f_j * (1 - ramp_j), ramp = clamp((j - 15) / 10, 0, 1)
    assert torch.equal(f[:16], base[:16])        # ramp 0: high frequencies untouched
    assert torch.equal(f[25:], base[25:] / 16)   # ramp 1: low frequencies interpolated by the factor
    ramp = ((torch.arange(32, dtype=torch.float32) - 15) / 10).clamp(0, 1)
    assert torch.allclose(f, base / 16 * ramp + base * (1 - ramp), rtol=1e-6, atol=0)
    c1, s1 = rr.rope_table(4096, 160000.0, y)
    c2, s2 = rr.rope_table(4096, 160000.0, y)
    assert torch.equal(c1, c2) and torch.equal(s1, s2) and c1.dtype == torch.float32 and c1.shape == (4096, 32)
    # angles t*f in fp32 (torch.outer), as the reference builds them
    ang = torch.outer(torch.arange(4096, dtype=torch.float32), f)
    cis = torch.polar(torch.ones_like(ang), ang)
    assert torch.equal(c1, cis.real) and torch.equal(s1, cis.imag)
    assert torch.equal(rr.rope_freqs(10000.0), 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)))


def _tables():
    return rr.rope_table(300, 160000.0, rr.YarnConfig())


def test_rope_reference_rotates_interleaved_pairs(gen):
    cos, sin = _tables()
    x = torch.randn(5, 2, 512, generator=gen)
    pos = torch.tensor([0, 1, 7, 100, 299])
    y = rr.apply_rope(x, pos, cos, sin)
    assert torch.equal(y[..., :448], x[..., :448])
    z = torch.view_as_complex(x[..., 448:].reshape(5, 2, 32, 2).contiguous())
    w = z * torch.polar(torch.ones(5, 1, 32), (pos.float()[:, None] * rr.rope_freqs(160000.0, rr.YarnConfig()))[:, None])
    assert torch.allclose(y[..., 448:], torch.view_as_real(w).flatten(-2), atol=1e-5)
    assert torch.equal(rr.apply_rope(x, torch.zeros(5, dtype=torch.long), cos, sin), x)  # position 0: identity
    back = rr.apply_rope(y, pos, cos, sin, inverse=True)
    assert torch.allclose(back, x, atol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends("apply_rope"))
@pytest.mark.parametrize("shape", [(6, 512), (5, 3, 512), (4, 2, 128), (3, 64)], ids=["2d", "3d-heads", "indexer", "rope-only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_kernel_bitwise(backend, shape, dtype, gen, device):
    cos, sin = _tables()
    x = (torch.randn(*shape, generator=gen) * 4).to(dtype)
    pos = torch.randint(0, 300, (shape[0],), generator=gen).int()
    for inverse in (False, True):
        want = rr.apply_rope(x, pos, cos, sin, inverse)
        y = ops.apply_rope(x.to(device), pos.to(device), cos.to(device), sin.to(device), inverse, backend=backend)
        assert_bitwise_equal(y.cpu(), want)
        xi = x.clone().to(device)
        ops.apply_rope_(xi, pos.to(device), cos.to(device), sin.to(device), inverse, backend=backend)
        assert_bitwise_equal(xi.cpu(), want)


@pytest.mark.parametrize("backend", kernel_backends("apply_rope"))
@given(t=st.integers(1, 9), h=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_rope_inverse_hypothesis(backend, t, h, seed):
    g = make_generator(seed)
    cos, sin = _tables()
    x = torch.randn(t, h, 512, generator=g).bfloat16()
    pos = torch.randint(0, 300, (t,), generator=g)
    y = ops.apply_rope(x.to(DEV), pos.to(DEV), cos.to(DEV), sin.to(DEV), backend=backend)
    assert_bitwise_equal(y.cpu(), rr.apply_rope(x, pos, cos, sin))
    back = ops.apply_rope(y, pos.to(DEV), cos.to(DEV), sin.to(DEV), True, backend=backend).cpu()
    assert_close(back.float(), x.float(), atol=2e-2, rtol=1.6e-2)  # two bf16 roundings


def test_rope_bad_inputs():
    cos, sin = _tables()
    x = torch.zeros(3, 512, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 300\) \(rows of cos\), got \[0, 300\]"):
        ops.apply_rope(x, torch.tensor([0, 1, 300]), cos, sin)
    with pytest.raises(ValueError, match="positions: expected values"):
        ops.apply_rope(x, torch.tensor([0, -1, 3]), cos, sin)
    with pytest.raises(TypeError, match="positions: expected dtype"):
        ops.apply_rope(x, torch.zeros(3), cos, sin)
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.apply_rope(x.half(), torch.zeros(3, dtype=torch.long), cos, sin)
    with pytest.raises(ValueError, match="positions: expected shape"):
        ops.apply_rope(x, torch.zeros(4, dtype=torch.long), cos, sin)
    with pytest.raises(TypeError, match="cos: expected dtype"):
        ops.apply_rope(x, torch.zeros(3, dtype=torch.long), cos.double(), sin)
    with pytest.raises(ValueError, match="contiguous"):
        ops.apply_rope_(torch.zeros(512, 3, dtype=torch.bfloat16).T, torch.zeros(3, dtype=torch.long), cos, sin)


# ----------------------------------------------------------------------------- norms
@pytest.mark.parametrize("backend", kernel_backends("rms_norm"))
@pytest.mark.parametrize("d", [512, 1024, 4096, 7168, 100])
def test_rms_norm_kernel(backend, d, gen, device):
    w = torch.randn(d, generator=gen) * 0.5 + 1
    x = (torch.randn(5, d, generator=gen) * torch.logspace(-3, 3, 5)[:, None]).bfloat16()
    want = rn.rms_norm(x, w)
    y = ops.rms_norm(x.to(device), w.to(device), backend=backend).cpu()
    assert y.dtype == torch.bfloat16
    # fp32 mean: summation order differs -> at most 1 bf16 ulp, rarely
    assert_close(y.float(), want.float(), atol=0, rtol=2 ** -7)
    assert (y != want).float().mean().item() < 1e-2
    xf = x.float()
    yf = ops.rms_norm(xf.to(device), w.to(device), backend=backend).cpu()
    assert_close(yf, rn.rms_norm(xf, w), atol=1e-6, rtol=1e-6)


def test_rms_norm_reference_formula(gen):
    x = torch.randn(3, 256, generator=gen).bfloat16()
    w = torch.rand(256, generator=gen)
    want = (w.double() * x.double() / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-6))
    assert_close(rn.rms_norm(x, w).float(), want.float(), atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("backend", kernel_backends("head_rms_norm"))
def test_head_rms_norm_kernel(backend, gen, device):
    q = (torch.randn(6, 4, 512, generator=gen) * torch.logspace(-3, 3, 6)[:, None, None]).bfloat16()
    y = ops.head_rms_norm(q.to(device), backend=backend).cpu()
    assert_bitwise_equal(y, rn.head_rms_norm_bf16_rn(q))
    want = rn.head_rms_norm_bf16(q)
    assert_close(y.float(), want.float(), atol=0, rtol=2 ** -6)  # torch CPU rsqrt: r 1 ulp off, then the product rounds


def test_head_rms_norm_rn_matches_torch_op_order(gen):
    q = (torch.randn(64, 8, 512, generator=gen) * 3).bfloat16()
    a, b = rn.head_rms_norm_bf16_rn(q), rn.head_rms_norm_bf16(q)
    rows_differ = (a != b).any(-1).float().mean().item()
    assert rows_differ < 0.01  # only rows where torch's rsqrt crosses a bf16 midpoint
    assert_close(a.float(), b.float(), atol=0, rtol=2 ** -6)


@pytest.mark.parametrize("backend", kernel_backends("head_rms_norm"))
@given(t=st.integers(1, 6), d=st.sampled_from([64, 128, 512]), seed=st.integers(0, 2**31))
def test_head_rms_norm_hypothesis(backend, t, d, seed):
    q = (torch.randn(t, 2, d, generator=make_generator(seed)) * 5).bfloat16()
    assert_bitwise_equal(ops.head_rms_norm(q.to(DEV), backend=backend).cpu(), rn.head_rms_norm_bf16_rn(q))


def test_norm_bad_inputs():
    with pytest.raises(ValueError, match=r"weight: expected shape \(64\)"):
        ops.rms_norm(torch.zeros(2, 64, dtype=torch.bfloat16), torch.ones(65))
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.rms_norm(torch.zeros(2, 64, dtype=torch.int32), torch.ones(64))
    with pytest.raises(TypeError, match="q: expected dtype torch.bfloat16"):
        ops.head_rms_norm(torch.zeros(2, 64))
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.hadamard_transform(torch.zeros(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="power of two"):
        ops.hadamard_transform(torch.zeros(2, 96))


def test_opcheck(gen, device):
    cos, sin = _tables()
    x = torch.randn(4, 2, 512, generator=gen).bfloat16().to(device)
    pos = torch.tensor([0, 5, 9, 299], device=device)
    run_opcheck(torch.ops.v4kernels.hadamard_transform.default, (x[..., :128].contiguous(),))
    run_opcheck(torch.ops.v4kernels.apply_rope.default, (x, pos, cos.to(device), sin.to(device), True))
    run_opcheck(torch.ops.v4kernels.apply_rope_.default, (x.clone(), pos, cos.to(device), sin.to(device)))
    run_opcheck(torch.ops.v4kernels.rms_norm.default, (x, torch.rand(512, device=device), 1e-6))
    run_opcheck(torch.ops.v4kernels.head_rms_norm.default, (x,))
