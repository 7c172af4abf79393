"""Indexer query preparation (spec §4, §2.2, §2.4, §2.5): RoPE -> Hadamard -> FP4, kernels bitwise."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import v4kernels.ops.indexer as ops
from v4kernels.reference import indexer as ref
from v4kernels.reference import quant as qref
from v4kernels.reference.hadamard import hadamard_matrix
from v4kernels.reference.rope import YarnConfig, apply_rope, rope_table
from v4kernels.testing import assert_bitwise_equal, kernel_backends, make_generator, run_opcheck

BACKENDS = kernel_backends("indexer_prepare_q")
MAX_POS = 4096
COS, SIN = rope_table(MAX_POS, 160000.0, YarnConfig())


def _q(gen, T, H=64, scale=1.0):
    return (torch.randn(T, H, 128, generator=gen) * scale).bfloat16()


def test_reference_follows_the_spec_steps(gen):
    q = _q(gen, 3)
    pos = torch.tensor([0, 17, 4095])
    out = ref.indexer_prepare_q(q, pos, COS, SIN)
    # step by step: RoPE on the last 64 dims only, Hadamard (close to x @ H / sqrt(128)), FP4
    r = apply_rope(q, pos, COS, SIN)
    assert torch.equal(r[..., :64], q[..., :64])
    h = (r.float() @ hadamard_matrix(128)) / math.sqrt(128)
    assert (out.float() - qref.fake_quant_fp4(h.bfloat16(), 32).float()).abs().max() <= 0.5 * h.abs().max()
    # FP4-exact: fake-quant is idempotent on the result; at most 8 distinct magnitudes per block scale
    assert torch.equal(qref.fake_quant_fp4(out, 32), out)
    # dot products survive the rotation (orthonormal) up to the FP4 error
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(1), h.flatten(1), dim=1)
    assert bool((cos > 0.97).all()), cos


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H", [(1, 64), (5, 64), (3, 16)], ids=["decode1", "odd-T", "16-heads"])
def test_kernel_bitwise_equal_to_reference(backend, T, H, gen, device):
    q = _q(gen, T, H, scale=3.0)
    pos = torch.randint(0, MAX_POS, (T,), generator=gen)
    want = ref.indexer_prepare_q(q, pos, COS, SIN)
    got = ops.indexer_prepare_q(q.to(device), pos.to(device), COS.to(device), SIN.to(device), backend=backend)
    assert_bitwise_equal(got.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@given(T=st.integers(1, 4), seed=st.integers(0, 2**31), exp=st.integers(-12, 12))
def test_kernel_matches_reference_hypothesis(backend, T, seed, exp):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = make_generator(seed)
    q = _q(g, T, 16, scale=2.0 ** exp)
    q[0, 0, :32] = 0  # an all-zero block: amax floor
    pos = torch.randint(0, MAX_POS, (T,), generator=g, dtype=torch.int32)
    want = ref.indexer_prepare_q(q, pos, COS, SIN)
    got = ops.indexer_prepare_q(q.to(dev), pos.to(dev), COS.to(dev), SIN.to(dev), backend=backend)
    assert_bitwise_equal(got.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_nan_blocks(backend, gen, device):
    q = _q(gen, 2, 16)
    q[1, 3, 5] = float("nan")
    pos = torch.tensor([1, 2])
    want = ref.indexer_prepare_q(q, pos, COS, SIN)
    got = ops.indexer_prepare_q(q.to(device), pos.to(device), COS.to(device), SIN.to(device), backend=backend).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert_bitwise_equal(got[0], want[0])


def test_bad_inputs():
    q = torch.zeros(2, 64, 128, dtype=torch.bfloat16)
    pos = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="q: expected dtype"):
        ops.indexer_prepare_q(q.float(), pos, COS, SIN)
    with pytest.raises(ValueError, match="q: expected head dim 128"):
        ops.indexer_prepare_q(torch.zeros(2, 64, 64, dtype=torch.bfloat16), pos, COS, SIN)
    with pytest.raises(ValueError, match="positions: expected shape"):
        ops.indexer_prepare_q(q, torch.zeros(3, dtype=torch.int64), COS, SIN)
    with pytest.raises(TypeError, match="positions: expected dtype"):
        ops.indexer_prepare_q(q, pos.float(), COS, SIN)
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 4096\)"):
        ops.indexer_prepare_q(q, torch.tensor([0, 4096]), COS, SIN)
    with pytest.raises(ValueError, match="cos: expected shape"):
        ops.indexer_prepare_q(q, pos, COS[:, :16], SIN)


def test_opcheck(gen, device):
    q = _q(gen, 2, 16).to(device)
    run_opcheck(torch.ops.v4kernels.indexer_prepare_q.default,
                (q, torch.tensor([3, 9], device=device), COS.to(device), SIN.to(device)))
