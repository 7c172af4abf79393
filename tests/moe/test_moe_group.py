"""Token grouping (sort by expert, stable) and the deterministic weighted combine."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from v4kernels.ops import moe as ops
from v4kernels.reference import moe as ref
from v4kernels.testing import assert_bitwise_equal, assert_close, kernel_backends, make_generator, poisoned, run_opcheck

COMBINE_BACKENDS = kernel_backends("moe_combine")


def _check_grouping(ids, E, pad):
    pairs, off, rows = ref.moe_group(ids, E, pad)
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    assert off[0] == 0 and bool((off[1:] >= off[:-1]).all())
    assert pairs.shape[0] == ref.grouped_rows_bound(T * k, E, pad)
    for e in range(E):
        g = pairs[off[e]:off[e + 1]].long()
        want = torch.nonzero(flat == e).flatten()  # stable: increasing (token, k)
        assert (off[e + 1] - off[e]) % pad == 0
        assert torch.equal(g[: want.numel()], want), f"expert {e}"
        assert bool((g[want.numel():] == -1).all())
    assert bool((pairs[off[E]:] == -1).all())
    # pair_rows is the inverse permutation; dropped pairs -> -1
    rr = rows.reshape(-1).long()
    ok = (flat >= 0) & (flat < E)
    assert bool((rr[~ok] == -1).all())
    assert torch.equal(pairs[rr[ok]].long(), torch.nonzero(ok).flatten())
    return pairs, off, rows


@pytest.mark.parametrize("pad", [1, 4, 16])
def test_group_basic(pad, gen):
    ids = torch.stack([torch.randperm(16, generator=gen)[:6] for _ in range(13)]).int()
    _check_grouping(ids, 16, pad)


def test_group_edge_cases():
    _check_grouping(torch.tensor([[3, 0, 5]], dtype=torch.int32), 8, 1)  # one token
    _check_grouping(torch.full((20, 1), 2, dtype=torch.int32), 8, 8)  # all tokens to one expert
    _check_grouping(torch.tensor([[1, -1], [-1, 1]], dtype=torch.int64), 4, 2)  # dropped slots
    pairs, off, rows = ref.moe_group(torch.zeros(0, 6, dtype=torch.int32), 4)
    assert pairs.numel() == 0 and off.tolist() == [0] * 5 and rows.shape == (0, 6)


@settings(max_examples=25)
@given(T=st.integers(1, 70), E=st.integers(1, 40), k=st.integers(1, 6), pad=st.sampled_from([1, 2, 16]),
       seed=st.integers(0, 2**31))
def test_group_hypothesis(T, E, k, pad, seed):
    g = make_generator(seed)
    skew = torch.rand(E, generator=g) ** 4 + 1e-3  # uneven loads: many empty experts
    ids = torch.multinomial(skew.expand(T, E), min(k, E), generator=g).int()
    ids[torch.rand(ids.shape, generator=g) < 0.05] = -1
    _check_grouping(ids, E, pad)
    pairs, off, rows = ops.moe_group(ids, E, pad)  # the registered op gives the same
    assert torch.equal(pairs, ref.moe_group(ids, E, pad)[0])


def test_group_bad_inputs():
    with pytest.raises(TypeError, match="topk_ids: expected dtype"):
        ops.moe_group(torch.zeros(2, 6), 8)
    with pytest.raises(ValueError, match=r"topk_ids: expected values in \[-1, 7\], got 8"):
        ops.moe_group(torch.tensor([[0, 8]], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="pad_multiple: expected a value in"):
        ops.moe_group(torch.zeros(2, 6, dtype=torch.int32), 8, 0)


def test_group_opcheck(gen, device):
    ids = torch.stack([torch.randperm(16, generator=gen)[:6] for _ in range(5)]).int().to(device)
    run_opcheck(torch.ops.v4kernels.moe_group.default, (ids, 16, 4))


# ------------------------------------------------------------------------------------------ combine
def _combine_inputs(gen, T, k, N, E=12, dtype=torch.bfloat16):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).int()
    ids[0, -1] = -1  # one dropped slot
    pairs, off, rows = ref.moe_group(ids, E, 4)
    y = torch.randn(pairs.shape[0], N, generator=gen).to(dtype)
    w = torch.rand(pairs.shape[0], generator=gen)
    shared = torch.randn(T, N, generator=gen).bfloat16()
    return y, rows, w, shared, ids


def test_combine_reference_is_expert_ordered_sum(gen):
    y, rows, w, shared, ids = _combine_inputs(gen, 7, 6, 32)
    out = ref.moe_combine(y, rows, w, shared, fp32_out=True)
    for t in range(7):
        acc = torch.zeros(32)
        for j in torch.argsort(ids[t].long().masked_fill(ids[t] < 0, 99)).tolist():  # increasing expert id
            if rows[t, j] >= 0:
                acc = acc + y[rows[t, j]].float() * w[rows[t, j]]
        assert_bitwise_equal(out[t], acc + shared[t].float())


@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
@pytest.mark.parametrize("T,k,N", [(1, 6, 64), (9, 6, 300), (5, 3, 1024)], ids=["one-token", "N-not-pow2", "k3"])
def test_combine_kernel_bitwise(backend, T, k, N, gen, device):
    from v4kernels.triton import moe as tri

    y, rows, w, shared, _ = _combine_inputs(gen, T, k, N)
    for rw, sh, f32 in [(w, shared, False), (None, None, True), (w, None, True)]:
        want = ref.moe_combine(y, rows, rw, sh, f32)
        out = poisoned((T, N), torch.float32 if f32 else torch.bfloat16, device)
        tri.moe_combine(y.to(device), rows.to(device), None if rw is None else rw.to(device),
                        None if sh is None else sh.to(device), f32, out=out)
        assert_bitwise_equal(out.cpu(), want)
        again = ops.moe_combine(y.to(device), rows.to(device), None if rw is None else rw.to(device),
                                None if sh is None else sh.to(device), f32, backend=backend)
        assert_bitwise_equal(again.cpu(), want)


def test_combine_bad_inputs(gen):
    y, rows, w, shared, _ = _combine_inputs(gen, 3, 6, 32)
    with pytest.raises(ValueError, match="pair_rows: expected values in"):
        ops.moe_combine(y, rows + 1000)
    with pytest.raises(ValueError, match="row_weights: expected shape"):
        ops.moe_combine(y, rows, w[:-1])
    with pytest.raises(ValueError, match="shared: expected shape"):
        ops.moe_combine(y, rows, None, shared[:, :16])
    with pytest.raises(TypeError, match="y: expected dtype"):
        ops.moe_combine(y.half(), rows)


def test_combine_opcheck(gen, device):
    y, rows, w, shared, _ = _combine_inputs(gen, 3, 6, 32)
    run_opcheck(torch.ops.v4kernels.moe_combine.default, (y.to(device), rows.to(device), w.to(device),
                                                          shared.to(device), False))
