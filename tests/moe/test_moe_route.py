"""MoE router (spec §8.1): indices exact (biased and hash, with constructed ties), weights to ~1e-6."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from v4kernels.ops import moe as ops
from v4kernels.reference import moe as ref
from v4kernels.testing import assert_close, kernel_backends, make_generator, poisoned, run_opcheck

BACKENDS = kernel_backends("moe_route")


def _gate(gen, T, d, E, dtype=torch.bfloat16):
    x = torch.randn(T, d, generator=gen).to(dtype)
    w = (torch.randn(E, d, generator=gen) * d ** -0.5).to(dtype)
    b = torch.randn(E, generator=gen) * 0.1
    return x, w, b


def test_reference_matches_spec_formula(gen):
    x, w, b = _gate(gen, 9, 64, 16)
    ids, wts = ref.moe_route(x, w, b, topk=6, route_scale=2.5)
    logits = F.linear(x.float(), w.float())
    s = F.softplus(logits).sqrt()
    want = torch.topk(s + b, 6).indices  # no ties in random data
    assert torch.equal(ids.long(), want)
    ws = s.gather(1, want)
    assert_close(wts, ws / ws.sum(-1, keepdim=True) * 2.5, atol=1e-7, rtol=1e-6)
    assert ids.dtype == torch.int32 and wts.dtype == torch.float32


def test_bias_steers_selection_only(gen):
    x, w, _ = _gate(gen, 4, 64, 16)
    b = torch.zeros(16)
    b[[3, 11]] = 100.0  # force experts 3 and 11 in
    ids, wts = ref.moe_route(x, w, b, topk=4)
    assert (ids[:, :2].sort(1).values == torch.tensor([3, 11], dtype=torch.int32)).all()
    s = ref.sqrtsoftplus(x.float() @ w.float().T)
    sel = s.gather(1, ids.long())
    assert_close(wts, sel / sel.sum(-1, keepdim=True), atol=1e-7, rtol=1e-6)  # unbiased scores


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_ties_go_to_lower_expert_index(backend, gen):
    # Experts 2, 5, 9 and 12 have identical gate rows and bias, so their scores tie exactly.
    x, w, b = _gate(gen, 5, 64, 16)
    w[[5, 9, 12]] = w[2].clone()
    b[[5, 9, 12]] = b[2].clone()
    b[2] += 50.0
    b[[5, 9, 12]] += 50.0  # the four tied experts are the top 4
    ids, _ = ops.moe_route(x, w, b, topk=3, backend=backend)
    assert ids.tolist() == [[2, 5, 9]] * 5
    # a full tie of every score: ids 0..k-1
    ids, wts = ops.moe_route(torch.zeros(3, 64, dtype=torch.bfloat16), w, torch.zeros(16), topk=6, backend=backend)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 3
    assert_close(wts, torch.full((3, 6), 1 / 6), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "T,d,E,topk,dtype",
    [(1, 128, 16, 6, torch.bfloat16), (37, 256, 64, 6, torch.bfloat16), (20, 192, 48, 4, torch.float32)],
    ids=["decode-one-token", "batch-odd", "fp32-non-pow2-experts"],
)
def test_kernel_matches_reference(backend, T, d, E, topk, dtype, gen, device):
    x, w, b = _gate(gen, T, d, E, dtype)
    ids_r, w_r = ref.moe_route(x, w, b, topk=topk, route_scale=1.5)
    out = (poisoned((T, topk), torch.int32, device), poisoned((T, topk), torch.float32, device))
    from v4kernels.triton import moe as tri

    ids, wts = tri.moe_route(x.to(device), w.to(device), b.to(device), topk=topk, route_scale=1.5, out=out)
    assert torch.equal(ids.cpu(), ids_r)
    assert_close(wts.cpu(), w_r, atol=1e-6, rtol=1e-5)
    ids2, wts2 = ops.moe_route(x.to(device), w.to(device), None, topk=topk, backend=backend)  # no bias
    ids2_r, wts2_r = ref.moe_route(x, w, None, topk=topk)
    assert torch.equal(ids2.cpu(), ids2_r)
    assert_close(wts2.cpu(), wts2_r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_k_partials(backend, gen, device):
    from v4kernels.triton import moe as tri

    x, w, b = _gate(gen, 3, 512, 32)
    ids_r, w_r = ref.moe_route(x, w, b)
    ids, wts = tri.moe_route(x.to(device), w.to(device), b.to(device), split=4)
    assert torch.equal(ids.cpu(), ids_r)
    assert_close(wts.cpu(), w_r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("tid_dtype", [torch.int32, torch.int64])
def test_hash_routing(backend, tid_dtype, gen, device):
    T, d, E, V = 11, 64, 32, 50
    x, w, _ = _gate(gen, T, d, E)
    tid2eid = torch.stack([torch.randperm(E, generator=gen)[:6] for _ in range(V)]).to(tid_dtype)
    tok = torch.randint(0, V, (T,), generator=gen)
    ids, wts = ops.moe_route(x.to(device), w.to(device), None, tid2eid.to(device), tok.to(device), 6, 1.5,
                             backend=backend)
    want = tid2eid[tok].to(torch.int32)
    assert torch.equal(ids.cpu(), want)  # the table order is kept
    s = ref.sqrtsoftplus(x.float() @ w.float().T).gather(1, want.long())
    assert_close(wts.cpu(), s / s.sum(-1, keepdim=True) * 1.5, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8)
@given(T=st.integers(1, 40), E=st.sampled_from([8, 24, 64]), topk=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_kernel_matches_reference_hypothesis(backend, T, E, topk, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = make_generator(seed)
    x, w, b = _gate(g, T, 128, E)
    ids_r, w_r = ref.moe_route(x, w, b, topk=topk)
    ids, wts = ops.moe_route(x.to(dev), w.to(dev), b.to(dev), topk=topk, backend=backend)
    assert torch.equal(ids.cpu(), ids_r)
    assert_close(wts.cpu(), w_r, atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise_typed_errors(gen):
    x, w, b = _gate(gen, 4, 64, 16)
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.moe_route(x.int(), w)
    with pytest.raises(ValueError, match="gate_weight: expected shape"):
        ops.moe_route(x, w[:, :32])
    with pytest.raises(ValueError, match="gate_bias: expected shape"):
        ops.moe_route(x, w, b[:8])
    with pytest.raises(ValueError, match="topk: expected a value in"):
        ops.moe_route(x, w, b, topk=17)
    tid = torch.zeros(10, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="tid2eid/token_ids: expected both"):
        ops.moe_route(x, w, None, tid)
    with pytest.raises(ValueError, match=r"token_ids: expected values in \[0, 9\], got 10"):
        ops.moe_route(x, w, None, tid, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"tid2eid: expected values in \[0, 15\], got 16"):
        ops.moe_route(x, w, None, tid + 16, torch.tensor([0, 1, 2, 3]))


def test_opcheck(gen, device):
    x, w, b = _gate(gen, 5, 64, 16)
    run_opcheck(torch.ops.v4kernels.moe_route.default, (x.to(device), w.to(device), b.to(device), None, None, 6, 1.5))
    tid = torch.randint(0, 16, (10, 6), generator=gen, dtype=torch.int64)
    run_opcheck(torch.ops.v4kernels.moe_route.default,
                (x.to(device), w.to(device), None, tid.to(device), torch.arange(5).to(device), 6, 1.5))
