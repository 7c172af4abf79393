"""The CUDA indexer scoring kernel (csrc/indexer/indexer_topk_fp4.cu) behind ``indexer_topk``'s "cuda" backend.

The shared tests of test_indexer_topk.py run it too (parametrized over the backends); here: what only the CUDA
launcher has (its chunk plan, many small chunks vs the reference over random shapes, poisoned outputs, the
inputs it declines, NaN keys; masked bad indices are test_indexer_topk.py's) and, on the CPU, that the kernel compiles without ptxas
serialising its wgmma pipeline.
"""
import os
import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st

import v4kernels.ops.indexer as ops
from v4kernels.reference import indexer as ref
from v4kernels.testing import kernel_backends, make_generator, sm90a_ptxas_spills

from _idx_cases import make_case

HAS_CUDA_KERNEL = "cuda" in kernel_backends("indexer_topk")
needs_cuda_kernel = pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="needs the CUDA indexer kernel (sm_90 + _C)")
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _poison_allocator(nbytes=256 << 20):
    """Fill memory the caching allocator hands out next with garbage (outputs not written show up)."""
    x = torch.full((nbytes // 4,), -123456789, dtype=torch.int32, device="cuda")
    del x


def _cuda_topk(case, topk, chunk=None):
    from v4kernels.cuda import indexer as cu

    _poison_allocator()
    return cu.indexer_topk(*case.args(topk), chunk=chunk)


def _assert_same(got, want):
    for name, g, w in zip(("indices", "lengths", "kv_rows"), got, want):
        g = g.cpu()
        if not torch.equal(g, w.cpu()):
            bad = (g != w.cpu()).nonzero()[:6].tolist()
            raise AssertionError(f"{name} differ at {bad}:\n got {g[:3]}\n want {w[:3]}")


# ----------------------------------------------------------------------------- plan (CPU)
def test_plan_v4_shapes():
    from v4kernels.cuda import indexer as cu

    for T, H, n, topk in [(1, 64, 262144, 512), (64, 64, 262144, 512), (128, 128, 262144, 1024),
                          (1, 64, 1000, 512), (4096, 64, 16384, 512), (3, 16, 5, 8)]:
        p = cu.plan(T, H, n, topk, 64, 132)
        assert p["chunk"] % 64 == 0 and p["splits"] * p["chunk"] >= n and (p["splits"] - 1) * p["chunk"] < max(n, 1)
        assert cu.smem_bytes(H, p["chunk"], 64) <= cu.SMEM_LIMIT
        assert p["M"] >= 16 and p["M"] & (p["M"] - 1) == 0 and p["M"] <= p["KP"]
        assert p["ws"] or p["M"] >= min(p["KP"], p["chunk"])  # a list holds its chunk's top-k, or re-reads
    p = cu.plan(1, 64, 262144, 512, 64, 132)
    assert p["splits"] >= 2 * 132 and p["ws"] and p["M"] < 64  # batch 1 at 1M entries: short lists
    p = cu.plan(64, 64, 262144, 512, 64, 132)
    ctas = p["splits"] * 64  # whole waves of 3 CTAs per SM (at most 4096 entries each, so 3 fit in shared memory)
    assert p["chunk"] <= 4096 and ctas <= 11 * 3 * 132 and ctas > 10 * 3 * 132
    p = cu.plan(4096, 64, 16384, 512, 64, 132)  # prefill: long chunks, lists of the whole top-k
    assert p["M"] == 512 and not p["ws"]
    p = cu.plan(2, 128, 65536, 1024, 4, 132, chunk=8192)  # page size 4: the page table shrinks the chunk
    assert cu.smem_bytes(128, p["chunk"], 4) <= cu.SMEM_LIMIT


# ----------------------------------------------------------------------------- compile (CPU, nvcc)
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_ptxas_keeps_the_wgmma_pipeline(tmp_path):
    """No wgmma serialisation or injected waits (the next tile's fragments are converted while one runs); no
    spills in any kernel."""
    spills = sm90a_ptxas_spills(os.path.join(ROOT, "csrc", "indexer", "indexer_topk_fp4.cu"), str(tmp_path))
    assert len(spills) == 5 and max(spills) == 0, spills  # scoring (16 / 32 / 64 / 128 heads) + merge


# ----------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@needs_cuda_kernel
@settings(max_examples=40)
@given(
    lens=st.lists(st.integers(0, 700), min_size=1, max_size=4),
    tps=st.integers(1, 3),
    page_size=st.sampled_from([4, 8, 16, 64, 128, 96]),
    heads=st.sampled_from([16, 32, 64, 128]),
    topk=st.sampled_from([1, 8, 13, 64, 300]),
    chunk=st.sampled_from([64, 128, 192, 1024, None]),
    seed=st.integers(0, 2**31),
)
def test_cuda_many_chunks_vs_reference(lens, tps, page_size, heads, topk, chunk, seed):
    """Exact inputs (every score exact in fp32 whatever the order): indices, lengths and KV rows equal the
    reference's, ties included, for any chunking (chunks below and above the top-k, pages across tiles)."""
    g = make_generator(seed)
    case = make_case(g, lens, [tps] * len(lens), page_size=page_size, heads=heads)
    want = ref.indexer_topk(*case.args(topk))
    got = _cuda_topk(case.to("cuda"), topk, chunk)
    _assert_same(got, want)


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("heads,page_size,chunk", [(64, 64, None), (128, 16, 128), (16, 96, 64), (32, 4, 256)])
def test_cuda_scores_vs_reference_logits(heads, page_size, chunk):
    """The scores the kernel ranks (its test output of the ordering keys): equal to the reference's logits on
    exact inputs; within 1e-3 of the score scale on real FP4 quantization (FP8 tensor-core accumulation)."""
    from v4kernels.cuda import indexer as cu

    for exact in (True, False):
        g = make_generator(f"scores-{heads}-{page_size}-{exact}")
        case = make_case(g, [900, 130, 0], [2, 1, 1], page_size=page_size, heads=heads, exact=exact,
                         holes=[[1], [], []])
        want = ref.indexer_logits(*case.args())
        want = torch.where(torch.isnan(want), torch.full_like(want, float("-inf")), want)
        got = cu.scores(*case.to("cuda").args()[:8], chunk=chunk).cpu()
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        f = torch.isfinite(want)
        if exact:
            assert torch.equal(got[f], want[f])
        else:
            scale = want[f].abs().max()
            assert float((got[f] - want[f]).abs().max()) <= 1e-3 * float(scale)


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("chunk,topk", [(64, 600), (256, 600), (None, 600), (256, 64), (128, 40)])
def test_cuda_all_scores_tie_across_chunks(chunk, topk):
    # every key identical: the cut falls inside a run of equal keys in every chunk; the lowest ids win. With
    # chunk 256 / top-k 64 (and 128 / 40) the lists are shorter than the top-k (32 / 16) and the first chunk
    # holds every winner: the merge re-reads it from the score workspace
    from v4kernels.cuda import indexer as cu

    case = make_case(make_generator("tie"), [3000], [2], page_size=16, heads=64, same_keys=True).to("cuda")
    if chunk in (128, 256) and topk < 100:
        assert cu.plan(2, 64, case.n_entries, topk, 16, 132, chunk)["ws"]
    got = _cuda_topk(case, topk, chunk)
    assert got[0][0].tolist() == list(range(topk)) and got[0][1].tolist() == list(range(topk))
    _assert_same(got, ref.indexer_topk(*case.to("cpu").args(topk)))


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_nan_scale_key_ranks_last():
    from v4kernels import formats

    case = make_case(make_generator("nan"), [100], [1], page_size=4, heads=64)
    row = int(formats.positions_to_rows(case.block_table, torch.zeros(1, dtype=torch.long), torch.tensor([5]), 4))
    page, off = divmod(row, 4)
    case.cache[page, 4 * 64 + off * 4 + 2] = 0xFF  # e8m0 NaN scale: NaN score, ordered as -inf
    want = ref.indexer_topk(*case.args(100))
    got = _cuda_topk(case.to("cuda"), 100)
    _assert_same(got, want)
    assert int(got[0][0, 99]) == 5


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_backend_choice():
    from v4kernels._dispatch import OPS

    case = make_case(make_generator("choice"), [200], [1], page_size=16, heads=64).to("cuda")
    ops.indexer_topk(*case.args(16))
    assert OPS["indexer_topk"].last_backend == "cuda"  # "auto" on sm_90 with FP4 keys
    fp8 = make_case(make_generator("choice8"), [200], [1], page_size=16, heads=64, fmt="idx_fp8").to("cuda")
    with pytest.raises(NotImplementedError, match="backend 'cuda' cannot run"):
        ops.indexer_topk(*fp8.args(16), backend="cuda")
    ops.indexer_topk(*fp8.args(16))
    assert OPS["indexer_topk"].last_backend == "triton"


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_int32_positions_fp32_weights_strided_q():
    case = make_case(make_generator("dtypes"), [500, 64], [2, 1], page_size=64, heads=64)
    want = ref.indexer_topk(*case.args(32))
    c = case.to("cuda")
    c.positions = c.positions.int()
    c.seq_ids = c.seq_ids.long()
    c.weights = c.weights.float()
    c.q = torch.cat([c.q, c.q], dim=2)[:, :, :128]  # a strided view: the launcher copies it
    _assert_same(_cuda_topk(c, 32, chunk=128), want)
