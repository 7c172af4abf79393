"""Indexer scores and fused top-k over the paged FP4/FP8 key cache (spec §4, §6.3).

Exact cases (E2M1 queries/keys, weights k/8): every backend computes the same fp32 scores, so the
selected sets, their order (ties -> lower index) and the lengths must be identical. Random cases
(real FP4 quantization): logits within tolerance, selected sets overlap.
"""
import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import v4kernels.ops.indexer as ops
from v4kernels.reference import indexer as ref
from v4kernels.testing import assert_close, kernel_backends, make_generator, run_opcheck

from _idx_cases import make_case

BACKENDS = kernel_backends("indexer_topk")
LOGIT_BACKENDS = kernel_backends("indexer_logits")
FMTS = ["idx_fp4", "idx_fp8"]


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_handles(case) -> bool:
    """The CUDA backend's inputs (FP4 keys, page sizes % 4 == 0); it raises NotImplementedError on others."""
    return case.fmt == "idx_fp4" and case.page_size % 4 == 0


def _skip_unsupported(case, backend):
    if backend == "cuda" and not _cuda_handles(case):
        pytest.skip("CUDA indexer kernel: FP4 keys with page sizes % 4 == 0 only (others run on Triton)")


def _check_topk(case, topk, backend, **tri_kwargs):
    _skip_unsupported(case, backend)
    want = ref.indexer_topk(*case.args(topk))
    dev = _dev()
    c = case.to(dev)
    if tri_kwargs and backend == "cuda":  # force many chunks through the CUDA launcher (its only knob)
        from v4kernels.cuda import indexer as cu

        got = cu.indexer_topk(*c.args(topk), chunk=tri_kwargs.get("chunk") or 64)
    elif tri_kwargs:  # force the chunk / merge-tree shape through the Triton launcher
        from v4kernels.triton import indexer as tri

        got = tri.indexer_topk(*c.args(topk), **tri_kwargs)
    else:
        got = ops.indexer_topk(*c.args(topk), backend=backend)
    case.to("cpu")
    for name, g, w in zip(("indices", "lengths", "kv_rows"), got, want):
        if not torch.equal(g.cpu(), w):
            bad = (g.cpu() != w).nonzero()[:6].tolist()
            raise AssertionError(f"{name} differ at {bad}:\n got {g.cpu()[:4]}\n want {w[:4]}")
    return want


def _properties(case, idx, lengths, topk):
    """Independent of any backend: visibility rule, -1 padding, no duplicates, lengths."""
    lim = ref.visible_limit(case.seq_ids, case.positions, case.block_table.shape[0], case.n_entries)
    for i in range(idx.shape[0]):
        n = int(lengths[i])
        row = idx[i]
        assert bool((row[n:] == -1).all()), f"token {i}: slots past length {n} must be -1: {row}"
        v = row[:n]
        assert bool((v >= 0).all()) and bool((v < lim[i]).all()), f"token {i}: invisible entry in {v}"
        assert v.unique().numel() == n


# ----------------------------------------------------------------------------- exact selections
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("page_size", [4, 16])
def test_topk_identical_on_exact_scores(backend, fmt, page_size, gen):
    # contexts below, at and above topk; ties are frequent (integer-ish scores) and must resolve alike
    case = make_case(gen, [5, 16, 45], [1, 2, 3], page_size=page_size, heads=16, fmt=fmt)
    want = _check_topk(case, 16, backend)
    _properties(case, want[0], want[1], 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk,list_len,topk", [(16, None, 8), (32, 16, 40), (64, 16, 100)],
                         ids=["lists", "lists+rereads", "many-rereads"])
def test_topk_chunk_lists(backend, chunk, list_len, topk, gen):
    # several chunks per query, each keeping its top list_len (< topk: a chunk holding more winners is
    # re-read from the score workspace); topk 100 of 200 keys saturates most lists
    case = make_case(gen, [200, 90], [2, 1], page_size=8, heads=16)
    _check_topk(case, topk, backend, chunk=chunk, list_len=list_len, block_n=16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("list_len", [None, 16])
def test_topk_all_scores_tie(backend, list_len, gen):
    # every key identical: every score ties, the lowest entry ids win; the radix cut has to go through
    # the index bits of the ordering key
    case = make_case(gen, [150], [2], page_size=4, heads=16, same_keys=True)
    want = _check_topk(case, 40, backend, chunk=32, list_len=list_len, block_n=16)
    assert want[0][0].tolist() == list(range(40))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 2048], ids=["lists", "one-chunk"])
def test_topk_long_rows(backend, chunk, gen):
    # top-k 300 of 1500: the selector rows (4 x 512 keys) are cut in blocks of 1024
    case = make_case(gen, [1500], [1], page_size=16, heads=16)
    _check_topk(case, 300, backend, chunk=chunk, block_n=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_prefill_block_of_two_queries(backend, gen):
    # two query tokens per program (the prefill tiling), of two sequences within one block
    case = make_case(gen, [40, 30], [3, 2], page_size=8, heads=16)
    _check_topk(case, 13, backend, block_q=2, block_n=16)


def test_plan_topk():
    """Work split of the fused kernel at V4 shapes (132 SMs): enough programs, short lists at batch 1."""
    from v4kernels.triton import indexer as tri

    dev = torch.device("meta")
    old = tri._interpret, tri._num_sms
    tri._interpret, tri._num_sms = (lambda: False), (lambda d: 132)
    try:
        p = tri.plan_topk(1, 64, 262144, 512, dev)  # Flash decode at 1M context, batch 1
        assert p["splits"] >= 132 and p["M"] < p["KP"] and p["ws"] and not p["final"]
        p = tri.plan_topk(128, 64, 262144, 512, dev)  # batch 128: lists of the full top-k, no workspace
        assert p["splits"] * p["n_qb"] >= 132 and p["M"] == 512 and not p["ws"]
        p = tri.plan_topk(4096, 64, 8192, 512, dev)  # prefill: one chunk, the final indices in one kernel
        assert p["final"] and p["BQ"] == 2 and p["splits"] == 1
        p = tri.plan_topk(1, 128, 65536, 1024, dev)  # Pro
        assert p["KP"] == 1024 and p["CAPF"] >= 2 * 1024 + p["CB"]
    finally:
        tri._interpret, tri._num_sms = old


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_64_heads_non_pow2_topk(backend, gen):
    case = make_case(gen, [30, 7], [1, 1], page_size=16, heads=64)
    _check_topk(case, 12, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_visibility_rule_at_every_position_mod_4(backend, gen):
    # one sequence with 24 entries; queries at every position 0..40: counts (p+1)//4 below/above topk
    pos = list(range(0, 41, 3)) + [1, 2, 3, 4, 5, 6, 7, 94, 95, 96, 97, 98]
    case = make_case(gen, [24], [len(pos)], page_size=4, heads=16, positions=[pos])
    want = _check_topk(case, 8, backend)
    idx, lengths = want[0], want[1]
    for i, p in enumerate(pos):
        vis = min((p + 1) // 4, 24)
        assert int(lengths[i]) == min(8, vis), (p, lengths[i])
    _properties(case, idx, lengths, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_holes_and_empty_sequences(backend, gen):
    # seq 0: pages 1 and 3 missing; seq 1: length 0 (no pages); seq 2: every page missing
    case = make_case(gen, [40, 0, 20], [2, 1, 1], page_size=8, heads=16, holes=[[1, 3], [], [0, 1, 2]])
    want = _check_topk(case, 16, backend)
    idx, lengths = want[0], want[1]
    pages = torch.where(idx >= 0, idx // 8, -1)
    assert not bool(((pages == 1) | (pages == 3))[:2].any()), "entries on missing pages were selected"
    assert int(lengths[0]) == 16 and int(lengths[2]) == 0 and int(lengths[3]) == 0
    # the logits of missing pages are -inf (never read: the unwritten bytes there would give NaN)
    for be in ["reference"] + LOGIT_BACKENDS:
        c = case.to(_dev())
        lg = ops.indexer_logits(*c.args(), backend=be).cpu()
        case.to("cpu")
        assert bool(torch.isinf(lg[:2, 8:16]).all()) and bool(torch.isinf(lg[3]).all())
        assert not bool(torch.isnan(lg).any())


def _hypothesis_case(backend, lens, tps, page_size, topk, fmt, seed):
    from hypothesis import assume

    assume(backend != "cuda" or (fmt == "idx_fp4" and page_size % 4 == 0))
    g = make_generator(seed)
    case = make_case(g, lens, [tps] * len(lens), page_size=page_size, heads=16, fmt=fmt)
    want = _check_topk(case, topk, backend)
    _properties(case, want[0], want[1], topk)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8)  # the interpreter's tl.topk costs seconds per call
@given(
    lens=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    tps=st.integers(1, 3),
    page_size=st.sampled_from([1, 4, 16, 64]),
    topk=st.sampled_from([4, 8, 13]),
    fmt=st.sampled_from(FMTS),
    seed=st.integers(0, 2**31),
)
def test_topk_hypothesis(backend, lens, tps, page_size, topk, fmt, seed):
    _hypothesis_case(backend, lens, tps, page_size, topk, fmt, seed)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40)
@given(
    lens=st.lists(st.integers(0, 200), min_size=1, max_size=5),
    tps=st.integers(1, 4),
    page_size=st.sampled_from([1, 4, 16, 64]),
    topk=st.sampled_from([4, 8, 13, 32]),
    fmt=st.sampled_from(FMTS),
    seed=st.integers(0, 2**31),
)
def test_topk_hypothesis_large(backend, lens, tps, page_size, topk, fmt, seed):
    _hypothesis_case(backend, lens, tps, page_size, topk, fmt, seed)


# ----------------------------------------------------------------------------- random (quantized) inputs
@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
@pytest.mark.parametrize("fmt", FMTS)
def test_logits_kernel_vs_reference(backend, fmt, gen):
    case = make_case(gen, [37, 50], [2, 1], page_size=16, heads=64, fmt=fmt, exact=False)
    want = ref.indexer_logits(*case.args())
    got = ops.indexer_logits(*case.to(_dev()).args(), backend=backend).cpu()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    scale = want[finite].abs().max()
    assert_close(got[finite], want[finite], atol=1e-5 * float(scale), rtol=1e-5, name="logits")


def test_reference_fp32_vs_model_bf16_scores(gen):
    case = make_case(gen, [60], [2], page_size=16, heads=64, exact=False)
    a = ref.indexer_logits(*case.args())
    b = ref.indexer_logits(*case.args(), bf16_scores=True)
    f = torch.isfinite(a)
    assert torch.equal(f, torch.isfinite(b))
    assert (a[f] - b[f]).abs().max() <= 0.02 * a[f].abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_overlap_on_random_inputs(backend, gen):
    case = make_case(gen, [70, 33], [2, 1], page_size=16, heads=64, exact=False)
    want = ref.indexer_topk(*case.args(16))
    got = ops.indexer_topk(*case.to(_dev()).args(16), backend=backend)
    assert torch.equal(got[1].cpu(), want[1])
    for i in range(want[0].shape[0]):
        a = set(want[0][i].tolist()) - {-1}
        b = set(got[0][i].cpu().tolist()) - {-1}
        assert len(a & b) >= 0.9 * len(a), (i, a ^ b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, gen):
    case = make_case(gen, [50], [2], page_size=16, heads=16, exact=False).to(_dev())
    a = ops.indexer_topk(*case.args(8), backend=backend)
    b = ops.indexer_topk(*case.args(8), backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- out-of-bounds safety
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_masks_bad_indices(backend, gen):
    """Past the CPU checks (as on CUDA, where values are not checked): bad page ids, sequence ids and
    positions are masked, never dereferenced, and mean 'invisible'."""
    from v4kernels.triton import indexer as tri

    case = make_case(gen, [30, 30], [1, 1], page_size=8, heads=16)
    n_pages = case.cache.shape[0]
    bt = case.block_table.clone()
    bt[0, 1] = n_pages + 5       # page id past the cache
    bt[1, 0] = 2**31 - 1         # huge page id
    case.block_table = bt
    seq = torch.tensor([0, 1, 7, -3], dtype=torch.int32)  # two bad sequence ids
    pos = torch.tensor([200, 119, 50, 50])
    case.seq_ids, case.positions = seq, pos
    case.q = torch.cat([case.q, case.q])
    case.weights = torch.cat([case.weights, case.weights])
    ref_bt = bt.clone()
    ref_bt[0, 1] = -1
    ref_bt[1, 0] = -1
    good = torch.tensor([0, 1, 0, 0], dtype=torch.int32)
    want = ref.indexer_topk(case.q, case.weights, case.cache, ref_bt, good, pos, 8, 8, case.n_entries)
    dev = _dev()
    c = case.to(dev)
    if backend == "cuda":  # the launcher itself (the op would check nothing more on CUDA tensors either)
        from v4kernels.cuda import indexer as cu

        topk_fn = functools.partial(cu.indexer_topk, chunk=64)
    else:
        topk_fn = tri.indexer_topk
    got = topk_fn(*c.args(8))
    assert torch.equal(got[0][:2].cpu(), want[0][:2]) and torch.equal(got[1][:2].cpu(), want[1][:2])
    assert bool((got[0][2:].cpu() == -1).all()) and bool((got[1][2:].cpu() == 0).all())
    if backend == "triton":
        lg = tri.indexer_logits(*c.args()).cpu()
        assert bool(torch.isinf(lg[0, 8:16]).all()) and bool(torch.isinf(lg[2:]).all())
    pos_neg = torch.tensor([-5, -1, 0, 2], device=dev)
    got = topk_fn(c.q, c.weights, c.cache, c.block_table, torch.zeros(4, dtype=torch.int32, device=dev), pos_neg, 8, 8,
                  c.n_entries)
    assert bool((got[0].cpu() == -1).all()) and bool((got[1].cpu() == 0).all())


def test_bad_inputs(gen):
    case = make_case(gen, [20], [1], page_size=8, heads=16)
    a = list(case.args(8))

    def call(i, v, exc, match):
        b = list(a)
        b[i] = v
        with pytest.raises(exc, match=match):
            ops.indexer_topk(*b)

    call(0, case.q.float(), TypeError, "q: expected dtype")
    call(0, case.q[:, :, :64], ValueError, "q: expected head dim 128")
    call(0, torch.zeros(1, 24, 128, dtype=torch.bfloat16), ValueError, "q: expected 16, 32, 64 or 128 heads")
    call(1, case.weights[:, :8], ValueError, "weights: expected shape")
    call(2, case.cache[:, :-1], ValueError, "key_cache: expected .* bytes per page")
    call(2, case.cache.view(torch.int8), TypeError, "key_cache: expected dtype")
    call(3, case.block_table.long(), TypeError, "block_table: expected dtype torch.int32")
    call(3, torch.full_like(case.block_table, 99), ValueError, r"block_table: expected page ids in \[-1,")
    call(4, torch.tensor([3], dtype=torch.int32), ValueError, r"seq_ids: expected values in \[0, 1\)")
    call(5, torch.tensor([-1]), ValueError, "positions: expected values >= 0")
    call(5, torch.tensor([1.0]), TypeError, "positions: expected dtype")
    call(6, 0, ValueError, r"topk: expected a value in \[1, 2048\]")
    call(7, 0, ValueError, "page_size: expected >= 1")
    call(8, 10**6, ValueError, "n_entries: expected a value in")
    call(9, "fp4", ValueError, "fmt: expected one of")
    call(10, case.kv_block_table[:, :0].expand(2, 0).contiguous(), ValueError, "kv_block_table: expected 1 rows")
    call(11, 0, ValueError, "kv_page_size: expected >= 1")
    with pytest.raises(TypeError, match="weights: expected dtype"):
        ops.indexer_logits(case.q, case.weights.half(), *case.args()[2:])


def test_opcheck(gen, device):
    case = make_case(gen, [20, 9], [1, 2], page_size=8, heads=16).to(device)
    run_opcheck(torch.ops.v4kernels.indexer_topk.default, case.args(8))
    args = list(case.args(8))
    args[10] = None  # no kv table: kv_rows is [T, 0]
    run_opcheck(torch.ops.v4kernels.indexer_topk.default, tuple(args))
    run_opcheck(torch.ops.v4kernels.indexer_logits.default, case.args())


def test_seq_ids_from_cu_seqlens():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    assert ops.seq_ids_from_cu_seqlens(cu, 7).tolist() == [0, 0, 0, 2, 2, 2, 2]


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_graph_decode_long_context(backend, fmt):
    g = make_generator("cuda-graph")
    case = make_case(g, [5000, 20000, 1], [1, 2, 1], page_size=64, heads=64, fmt=fmt).to("cuda")
    _skip_unsupported(case, backend)
    want = ref.indexer_topk(*case.args(512))
    ops.indexer_topk(*case.args(512), backend=backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.indexer_topk(*case.args(512), backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    for o, w in zip(out, want):
        assert torch.equal(o.cpu(), w.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_prefill_ragged(backend):
    g = make_generator("cuda-prefill")
    n = 3000
    pos = list(range(0, 4 * n, 7))
    case = make_case(g, [n, 900], [len(pos), 300], page_size=64, heads=64,
                     positions=[pos, list(range(3300, 3600))]).to("cuda")
    want = ref.indexer_topk(*case.args(1024))
    out = ops.indexer_topk(*case.args(1024), backend=backend)
    for o, w in zip(out, want):
        assert torch.equal(o.cpu(), w.cpu())


# V4 shapes: the plan changes with them (short per-chunk lists + workspace re-reads at small batch,
# full lists at large batch, the final indices in the scoring kernel for prefill), so each path runs
@pytest.mark.cuda
@pytest.mark.parametrize("n,batch,heads,topk", [
    (4096, 1, 64, 512),      # Flash decode, 16K context
    (65536, 1, 64, 512),     # 256K context
    (262144, 1, 64, 512),    # 1M context, batch 1: 264 chunks, lists of 32
    (4096, 64, 64, 512),     # batch 64
    (16384, 64, 64, 512),    # batch 64, 64K context
    (65536, 2, 128, 1024),   # Pro: 128 heads, top-k 1024
    (262144, 1, 128, 1024),  # Pro at 1M context
], ids=lambda v: str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_decode_v4_shapes(backend, n, batch, heads, topk):
    g = make_generator(f"cuda-decode-{n}-{batch}-{heads}")
    case = make_case(g, [n] * batch, [1] * batch, page_size=64, heads=heads, device="cuda")
    want = ref.indexer_topk(*case.args(topk))
    out = ops.indexer_topk(*case.args(topk), backend=backend)
    for name, o, w in zip(("indices", "lengths", "kv_rows"), out, want):
        assert torch.equal(o, w), f"{name} differ in {int((o != w).any(dim=-1).sum()) if o.dim() > 1 else -1} rows"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_prefill_v4_shape(backend, fmt):
    # 512 query tokens at the end of a 32K context (8192 entries): 256 programs of two tokens
    g = make_generator(f"cuda-prefill-{fmt}")
    n, T = 8192, 512
    pos = list(range(4 * n - T, 4 * n))
    case = make_case(g, [n], [T], page_size=64, heads=64, fmt=fmt, positions=[pos], device="cuda")
    _skip_unsupported(case, backend)
    want = ref.indexer_topk(*case.args(512))
    out = ops.indexer_topk(*case.args(512), backend=backend)
    for o, w in zip(out, want):
        assert torch.equal(o, w)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,batch,T", [(262144, 1, 1), (16384, 32, 1), (8192, 1, 256)], ids=str)
def test_cuda_random_fp4_inputs(backend, n, batch, T):
    """Real FP4 quantization (block scales differ): the FP8 MMA path (whose tensor-core accumulation keeps
    fewer bits than fp32) must select the reference's set up to near-ties: every selected score >= the
    reference's k-th score minus 1e-3 of the largest score, sorted up to the same tolerance."""
    g = make_generator(f"cuda-random-{n}-{batch}-{T}")
    pos = [list(range(4 * n - T, 4 * n))] * batch if T > 1 else None
    case = make_case(g, [n] * batch, [T] * batch, page_size=64, heads=64, exact=False, positions=pos,
                     device="cuda")
    topk = 512
    lg = ref.indexer_logits(*case.args())
    want = ref.indexer_topk(*case.args(topk))
    got = ops.indexer_topk(*case.args(topk), backend=backend)
    assert torch.equal(got[1], want[1])
    for i in range(got[0].shape[0]):
        k = int(want[1][i])
        s = lg[i]
        kth = s[want[0][i, k - 1].long()]
        sel = got[0][i, :k].long()
        assert sel.unique().numel() == k
        scale = s[torch.isfinite(s)].abs().max()
        assert float((kth - s[sel]).max()) <= 1e-3 * float(scale), i
        assert bool((got[0][i, k:] == -1).all())
        # sorted by score, descending
        assert bool((s[sel][1:] <= s[sel][:-1] + 1e-3 * scale).all())


@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
def test_nan_scale_key_is_nan_logit_and_last_in_topk(backend, gen):
    # a key whose scale byte is the e8m0 NaN (0xFF): NaN score in the logits, ranked as -inf in top-k
    from v4kernels import formats

    case = make_case(gen, [12], [1], page_size=4, heads=16)
    row = int(formats.positions_to_rows(case.block_table, torch.zeros(1, dtype=torch.long), torch.tensor([5]), 4))
    page, off = divmod(row, 4)
    case.cache[page, 4 * 64 + off * 4 + 2] = 0xFF
    want = ref.indexer_logits(*case.args())
    assert bool(torch.isnan(want[0, 5]))
    got = ops.indexer_logits(*case.to(_dev()).args(), backend=backend).cpu()
    assert bool(torch.isnan(got[0, 5])) and torch.equal(torch.isnan(got), torch.isnan(want))
    idx, lengths, _ = ops.indexer_topk(*case.args(16), backend=backend)
    w_idx, w_len, _ = ref.indexer_topk(*case.to("cpu").args(16))
    assert torch.equal(idx.cpu(), w_idx) and int(w_len[0]) == 12 and int(w_idx[0, 11]) == 5


@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
def test_nan_fp8_key_byte_is_nan_logit(backend, gen):
    # an e4m3fn NaN byte (0x7F / 0xFF) in an FP8 key decodes to NaN (as torch's float8_e4m3fn view does), and
    # relu keeps it NaN on every backend (on the GPU a plain tl.maximum(x, 0) would turn NaN into 0)
    from v4kernels import formats

    case = make_case(gen, [12], [1], page_size=4, heads=16, fmt="idx_fp8")
    for t, byte in ((5, 0x7F), (9, 0xFF)):
        row = int(formats.positions_to_rows(case.block_table, torch.zeros(1, dtype=torch.long), torch.tensor([t]), 4))
        page, off = divmod(row, 4)
        case.cache[page, off * 128 + 17] = byte
    want = ref.indexer_logits(*case.args())
    assert bool(torch.isnan(want[0, 5])) and bool(torch.isnan(want[0, 9]))
    got = ops.indexer_logits(*case.to(_dev()).args(), backend=backend).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    f = ~torch.isnan(want)
    assert torch.equal(got[f], want[f])
