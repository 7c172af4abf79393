"""Compressor kernels vs the float32 reference (spec §3), under TRITON_INTERPRET=1 on the CPU.

Tolerance: ratio 4 (main and indexer) gives the same cache bytes, state and stored entries as the
reference on these inputs (pooling over 8 slots in the same formula; asserted bitwise). Ratio 128 uses an
online softmax over 16-slot chunks, so the pooled fp32 value can differ from the reference's in the last
ulps; after the bf16 cast that rarely flips one bf16 / e4m3 rounding: we assert the state bitwise (it is
copied, never computed), and for the entries calc_diff < 1e-4 with < 2% of the values differing. On a GPU
``tl.exp`` and the fp32 reduction order differ from torch's, so GPU tests use the same tolerance for every
configuration. The kernels agree with themselves bitwise across chunkings and decode (same pooling code).
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from v4kernels.ops import compressor as ops
from v4kernels.testing import assert_bitwise_equal, calc_diff, kernel_backends, make_generator
from v4kernels.testing import test_device as _test_device

from _compressor_inputs import (CONFIG_IDS, CONFIGS, block_table, cache, cu_of, i32, problem, random_state,
                                read_entries, tokens, unwritten_bytes)

BACKENDS = kernel_backends("compress_kv")
PS = 4


def _exact(pb):
    return pb.ratio == 4 and not torch.cuda.is_available()


def _compare_entries(out, ref, pb, name):
    if _exact(pb):
        assert_bitwise_equal(out, ref, name)
    else:
        assert out.shape == ref.shape
        diff = (out.view(torch.int16) != ref.view(torch.int16)).float().mean().item() if out.numel() else 0.0
        assert calc_diff(out.float(), ref.float()) < 1e-4, name
        assert diff < 0.02, f"{name}: {diff:.3%} of values differ"


def _compare_cache(c_out, c_ref, pb, bt, seqs, ids, name="cache"):
    if _exact(pb):
        assert_bitwise_equal(c_out.cpu(), c_ref.cpu(), name)
        return
    # rows nobody writes stay identical (poison); written rows compared as decoded values
    _compare_entries(read_entries(c_out, pb, PS, bt, seqs, ids), read_entries(c_ref, pb, PS, bt, seqs, ids), pb, name)
    mask = unwritten_bytes(c_ref, pb, PS, bt, seqs, ids)
    assert torch.equal(c_out.cpu()[mask], c_ref.cpu()[mask]), "bytes outside the written rows changed"


def _batch_case(kind, ratio, gen, device):
    pb = problem(kind, ratio, gen, device)
    r = ratio
    starts = [0, 5, 2 * r - 1, 3] if r == 4 else [0, 125]
    lens = [2 * r + 3, r + 2, 1, 0] if r == 4 else [130, 5]
    B, npg = len(starts), 24
    kv, sc = tokens(pb, sum(lens), gen, device)
    init = random_state(pb, B + 1, gen, device)
    slots = i32([2, 0, 4, 1][:B] if r == 4 else [2, 0], device)
    bt = block_table(B, 6, npg, gen, device)
    seqs, ids = [], []
    for b in range(B):
        for i in range(starts[b] // r, (starts[b] + lens[b]) // r):
            seqs.append(b); ids.append(i)
    return pb, starts, lens, kv, sc, init, slots, bt, npg, seqs, ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,ratio", CONFIGS, ids=CONFIG_IDS)
def test_prefill_kernel_vs_reference(backend, kind, ratio, gen, device):
    pb, starts, lens, kv, sc, init, slots, bt, npg, seqs, ids = _batch_case(kind, ratio, gen, device)
    res = {}
    for be in ("reference", backend):
        skv, ssc = init[0].clone(), init[1].clone()
        cch = cache(pb, npg, PS, device)
        ops.compress_kv(kv, sc, cu_of(lens, device), i32(starts, device), skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch,
                        bt, PS, ratio, kind, state_slots=slots, backend=be)
        res[be] = (cch, skv, ssc)
    _compare_cache(res[backend][0], res["reference"][0], pb, bt.cpu(), seqs, ids)
    assert_bitwise_equal(res[backend][1].cpu(), res["reference"][1].cpu(), "state_kv")
    assert_bitwise_equal(res[backend][2].cpu(), res["reference"][2].cpu(), "state_score")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,ratio", CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_entries_kernel_vs_reference(backend, kind, ratio, gen, device):
    pb, starts, lens, kv, sc, init, slots, bt, npg, seqs, ids = _batch_case(kind, ratio, gen, device)
    res = {}
    for be in ("reference", backend):
        skv, ssc = init[0].clone(), init[1].clone()
        res[be] = ops.compress_kv_entries(kv, sc, cu_of(lens, device), i32(starts, device), skv, ssc, pb.ape, pb.w,
                                          pb.cos, pb.sin, ratio, kind, state_slots=slots, backend=be)
    ref, out = res["reference"], res[backend]
    assert out[0].shape == (kv.shape[0] // ratio + len(lens), pb.hd)
    assert ref[1].tolist() == out[1].cpu().tolist() and ref[2].tolist() == out[2].cpu().tolist()
    assert ref[2].tolist()[: len(ids)] == ids and ref[1].tolist()[: len(seqs)] == seqs
    _compare_entries(out[0].cpu(), ref[0].cpu(), pb, "entries")
    # the functional values are what the cache holds
    cch = cache(pb, npg, PS, device)
    ops.compress_kv(kv, sc, cu_of(lens, device), i32(starts, device), init[0].clone(), init[1].clone(), pb.ape, pb.w,
                    pb.cos, pb.sin, cch, bt, PS, ratio, kind, state_slots=slots, backend=backend)
    assert_bitwise_equal(read_entries(cch, pb, PS, bt, seqs, ids), out[0].cpu()[: len(ids)], "cache vs functional")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,ratio", CONFIGS, ids=CONFIG_IDS)
def test_decode_kernel_vs_reference(backend, kind, ratio, gen, device):
    """One launch for a batch mixing emitting, non-emitting, block-0 and padding (-1) rows."""
    pb = problem(kind, ratio, gen, device)
    pos = [3, 9, -1, 6, 0] if ratio == 4 else [127, 5, 255, -1]
    B, npg = len(pos), 40
    kv, sc = tokens(pb, B, gen, device)
    init = random_state(pb, 6, gen, device)
    slots = i32([2, 0, 5, 1, 3][:B], device)
    bt = block_table(B, 6, npg, gen, device)
    seqs = [b for b, p in enumerate(pos) if p >= 0 and (p + 1) % ratio == 0]
    ids = [pos[b] // ratio for b in seqs]
    res = {}
    for be in ("reference", backend):
        skv, ssc = init[0].clone(), init[1].clone()
        cch = cache(pb, npg, PS, device)
        ops.compress_kv_decode(kv, sc, i32(pos, device), skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch, bt, PS, ratio,
                               kind, state_slots=slots, backend=be)
        res[be] = (cch, skv, ssc)
    _compare_cache(res[backend][0], res["reference"][0], pb, bt.cpu(), seqs, ids)
    assert_bitwise_equal(res[backend][1].cpu(), res["reference"][1].cpu(), "state_kv")
    assert_bitwise_equal(res[backend][2].cpu(), res["reference"][2].cpu(), "state_score")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,n", [("main", 11), ("indexer", 7)])
def test_kernel_oneshot_chunked_decode_agree(backend, kind, n, gen, device):
    """Kernel-only: one-shot == chunked == token-by-token decode, bitwise (cache bytes and state)."""
    pb = problem(kind, 4, gen, device)
    kv, sc = tokens(pb, n, gen, device)
    bt = block_table(1, 4, 8, gen, device)
    outs = []
    for mode in ("oneshot", "chunked", "decode"):
        skv, ssc = (t.to(device) for t in ops.new_compressor_state(1, 4, kind))
        cch = cache(pb, 8, PS, device)
        if mode == "decode":
            for p in range(n):
                ops.compress_kv_decode(kv[p:p + 1], sc[p:p + 1], i32([p], device), skv, ssc, pb.ape, pb.w, pb.cos,
                                       pb.sin, cch, bt, PS, 4, kind, backend=backend)
        else:
            chunks = [n] if mode == "oneshot" else [3, 2, n - 5]
            p = 0
            for m in chunks:
                ops.compress_kv(kv[p:p + m], sc[p:p + m], cu_of([m], device), i32([p], device), skv, ssc, pb.ape,
                                pb.w, pb.cos, pb.sin, cch, bt, PS, 4, kind, backend=backend)
                p += m
        outs.append((cch.cpu(), skv.cpu(), ssc.cpu()))
    for other, name in zip(outs[1:], ("chunked", "decode")):
        for a, b, what in zip(outs[0], other, ("cache", "state_kv", "state_score")):
            assert_bitwise_equal(b, a, f"{name} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_ratio128_chunked_equals_oneshot(backend, gen, device):
    pb = problem("main", 128, gen, device)
    kv, sc = tokens(pb, 260, gen, device)
    bt = block_table(1, 2, 4, gen, device)
    outs = []
    for chunks in ([260], [100, 60, 100]):
        skv, ssc = (t.to(device) for t in ops.new_compressor_state(1, 128, "main"))
        cch = cache(pb, 4, PS, device)
        p = 0
        for m in chunks:
            ops.compress_kv(kv[p:p + m], sc[p:p + m], cu_of([m], device), i32([p], device), skv, ssc, pb.ape, pb.w,
                            pb.cos, pb.sin, cch, bt, PS, 128, "main", backend=backend)
            p += m
        outs.append((cch.cpu(), skv.cpu(), ssc.cpu()))
    for a, b in zip(*outs):
        assert_bitwise_equal(b, a)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6)
@given(kind=st.sampled_from(["main", "indexer"]), lens=st.lists(st.integers(0, 9), min_size=1, max_size=3),
       starts=st.lists(st.integers(0, 40), min_size=3, max_size=3), seed=st.integers(0, 2 ** 31))
def test_prefill_kernel_hypothesis(backend, kind, lens, starts, seed):
    dev = _test_device()
    g = make_generator(seed)
    pb = problem(kind, 4, g, dev)
    B = len(lens)
    starts = starts[:B]
    kv, sc = tokens(pb, sum(lens), g, dev)
    init = random_state(pb, B, g, dev)
    bt = block_table(B, 13, 40, g, dev)
    res = []
    for be in ("reference", backend):
        skv, ssc = init[0].clone(), init[1].clone()
        cch = cache(pb, 40, PS, dev)
        ops.compress_kv(kv, sc, cu_of(lens, dev), i32(starts, dev), skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch, bt,
                        PS, 4, kind, backend=be)
        res.append((cch.cpu(), skv.cpu(), ssc.cpu()))
    seqs, ids = [], []
    for b in range(B):
        for i in range(starts[b] // 4, (starts[b] + lens[b]) // 4):
            seqs.append(b); ids.append(i)
    _compare_cache(res[1][0], res[0][0], pb, bt.cpu(), seqs, ids)
    assert_bitwise_equal(res[1][1], res[0][1])
    assert_bitwise_equal(res[1][2], res[0][2])


@pytest.mark.cuda
@pytest.mark.parametrize("kind,ratio", CONFIGS, ids=CONFIG_IDS)
def test_cuda_large_prefill_and_decode(kind, ratio):
    """GPU: 4K tokens over 8 sequences, kernel vs reference on the same device (tolerance, see module doc)."""
    dev = torch.device("cuda")
    g = make_generator(f"cuda-{kind}-{ratio}")
    lens = [512] * 8
    starts = [0, 3, 128, 1000, 4, 77, 130, 0]
    # size the RoPE table and the block table for the largest position (1000 + 512): on CUDA tensors the op
    # does not check them (no host sync), and entries past either would silently not be written
    end = max(s + n for s, n in zip(starts, lens))
    pb = problem(kind, ratio, g, dev, max_pos=end)
    kv, sc = tokens(pb, sum(lens), g, dev)
    init = random_state(pb, 8, g, dev)
    pages = -(-(end // ratio) // PS)
    npg = 8 * pages
    bt = block_table(8, pages, npg, g, dev)
    res = []
    for be in ("reference", "triton"):
        skv, ssc = init[0].clone(), init[1].clone()
        cch = cache(pb, npg, PS, dev)
        ops.compress_kv(kv, sc, cu_of(lens, dev), i32(starts, dev), skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch, bt,
                        PS, ratio, kind, backend=be)
        res.append((cch, skv, ssc))
    seqs, ids = [], []
    for b in range(8):
        for i in range(starts[b] // ratio, (starts[b] + lens[b]) // ratio):
            seqs.append(b); ids.append(i)
    e_ref = read_entries(res[0][0], pb, PS, bt, seqs, ids)
    e_out = read_entries(res[1][0], pb, PS, bt, seqs, ids)
    assert calc_diff(e_out.float(), e_ref.float()) < 1e-4
    assert (e_out.view(torch.int16) != e_ref.view(torch.int16)).float().mean() < 0.02
    assert torch.equal(res[0][1], res[1][1]) and torch.equal(res[0][2], res[1][2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio128_absent_leading_chunks(backend, gen, device):
    """A fresh (-inf) state under a mid-block start: whole 16-slot chunks are absent; they must add nothing
    (no NaN from -inf - -inf in the online softmax)."""
    pb = problem("main", 128, gen, device)
    kv, sc = tokens(pb, 90, gen, device)
    bt = block_table(1, 2, 4, gen, device)
    res = []
    for be in ("reference", backend):
        skv, ssc = (t.to(device) for t in ops.new_compressor_state(1, 128, "main"))
        res.append(ops.compress_kv_entries(kv, sc, cu_of([90], device), i32([40], device), skv, ssc, pb.ape, pb.w,
                                           pb.cos, pb.sin, 128, "main", backend=be, trim=True)[0].cpu())
    assert res[1].shape == (1, 512) and not torch.isnan(res[1].float()).any()
    _compare_entries(res[1], res[0], pb, "entries")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["main", "indexer"])
def test_unchecked_bad_indices_reference_and_kernel_agree(backend, kind, gen, device):
    """What the ops run on CUDA tensors, where they skip their host-side index checks: both backends,
    called directly, skip a sequence with a bad slot / start / offsets, do not write an entry whose page is
    missing (-1, >= num_pages, past the table) or whose position is past the RoPE table, and never index out
    of bounds (on a GPU that is a device-side assert that kills the CUDA context)."""
    from v4kernels.reference import compressor as ref_mod
    from v4kernels.triton import compressor as tri_mod
    impl = {"reference": ref_mod, "triton": tri_mod}
    pb = problem(kind, 4, gen, device)
    cos, sin = pb.cos[:24].contiguous(), pb.sin[:24].contiguous()      # entry positions >= 24 are off the table
    #          ok+missing-pos   bad slot  page -1   page 99   past table  start < 0
    starts = [14, 0, 3, 16, 30, -3]
    lens = [14, 5, 6, 4, 6, 2]
    slots = i32([0, 9, 1, 2, 3, 4], device)
    bt = i32([[0, 1], [2, 3], [-1, 4], [5, 99], [6, 7], [3, 2]], device)
    kv, sc = tokens(pb, sum(lens), gen, device)
    init = random_state(pb, 5, gen, device)
    res = {}
    for be in ("reference", backend):
        skv, ssc = init[0].clone(), init[1].clone()
        cch = cache(pb, 8, PS, device)
        impl[be].compress_kv(kv, sc, cu_of(lens, device), i32(starts, device), slots, skv, ssc, pb.ape, pb.w, cos,
                             sin, cch, bt, PS, 4, kind)
        ent = impl[be].compress_kv_entries(kv, sc, cu_of(lens, device), i32(starts, device), slots,
                                           init[0].clone(), init[1].clone(), pb.ape, pb.w, cos, sin, 4, kind)
        res[be] = (cch.cpu(), skv.cpu(), ssc.cpu()) + tuple(t.cpu() for t in ent)
    for a, b, what in zip(res[backend], res["reference"], ("cache", "state_kv", "state_score", "entries", "seq",
                                                          "pos")):
        assert_bitwise_equal(a, b, what)
    # written: seq 0 entries 3, 4, 5 (pages 0, 1, 1); entry 6 (position 24) is off the RoPE table
    assert res["reference"][4].tolist()[:6] == [0, 0, 0, 0, 2, 2] and res["reference"][5].tolist()[:6] == [3, 4, 5,
                                                                                                            6, 0, 1]
    written = (res["reference"][0] != 0xFF).any(dim=1).nonzero().flatten().tolist()
    assert written == [0, 1]
    # decode: bad slot, padding, missing page, position off the table, page >= num_pages
    pos = [3, 7, -1, 11, 27, 23]
    dslots = i32([0, 9, 1, 2, 3, 4], device)
    dbt = i32([[0, 1], [2, 3], [4, 5], [-1, 6], [6, 7], [5, 99]], device)
    kv, sc = tokens(pb, len(pos), gen, device)
    res = {}
    for be in ("reference", backend):
        skv, ssc = init[0].clone(), init[1].clone()
        cch = cache(pb, 8, PS, device)
        impl[be].compress_kv_decode(kv, sc, i32(pos, device), dslots, skv, ssc, pb.ape, pb.w, cos, sin, cch, dbt, PS,
                                    4, kind)
        res[be] = (cch.cpu(), skv.cpu(), ssc.cpu())
    for a, b, what in zip(res[backend], res["reference"], ("cache", "state_kv", "state_score")):
        assert_bitwise_equal(a, b, what)
    assert (res["reference"][0] != 0xFF).any(dim=1).nonzero().flatten().tolist() == [0]


@pytest.mark.cuda
@pytest.mark.parametrize("kind,ratio", CONFIGS, ids=CONFIG_IDS)
def test_cuda_graph_decode_steps(kind, ratio):
    """The decode op captured once in a CUDA graph, replayed for 2 * ratio + 3 steps with new tokens
    and positions copied into its inputs (entries emitted inside replays, block ends crossed) == the
    same steps run eagerly: cache bytes and state bitwise."""
    dev = torch.device("cuda")
    g = make_generator(f"cuda-graph-{kind}-{ratio}")
    pb = problem(kind, ratio, g, dev)
    B, npg, steps = 3, 24, 2 * ratio + 3
    start = [0, 5, ratio - 2]
    slots = i32([1, 0, 2], dev)
    bt = block_table(B, npg // B, npg, g, dev)
    toks = [tokens(pb, B, g, dev) for _ in range(steps)]
    init = random_state(pb, 3, g, dev)
    eager = (init[0].clone(), init[1].clone(), cache(pb, npg, PS, dev))
    for s in range(steps):
        ops.compress_kv_decode(*toks[s], i32([p + s for p in start], dev), eager[0], eager[1], pb.ape, pb.w, pb.cos,
                               pb.sin, eager[2], bt, PS, ratio, kind, state_slots=slots)
    skv, ssc, cch = init[0].clone(), init[1].clone(), cache(pb, npg, PS, dev)
    kv, sc, pos = toks[0][0].clone(), toks[0][1].clone(), i32(start, dev)

    def step():
        ops.compress_kv_decode(kv, sc, pos, skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch, bt, PS, ratio, kind,
                               state_slots=slots)

    warm = (skv.clone(), ssc.clone(), cch.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the capture, then undone
        step()
    torch.cuda.current_stream().wait_stream(side)
    for t, w in zip((skv, ssc, cch), warm):
        t.copy_(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for s in range(steps):
        kv.copy_(toks[s][0])
        sc.copy_(toks[s][1])
        pos.copy_(i32([p + s for p in start], dev))
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(cch, eager[2]), "cache bytes"
    assert torch.equal(skv, eager[0]) and torch.equal(ssc, eager[1]), "state"
