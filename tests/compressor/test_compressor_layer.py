"""Compressor decode of a whole layer (``compress_kv_decode_layer``: the CSA layer's main and indexer
compressors in one launch), the ratio-128 kernel's decode == prefill, its self-resetting counters, and
GPU checks at the benchmark's shapes (V4-Flash and V4-Pro share the compressor shapes)."""
import pytest
import torch

from v4kernels.ops import compressor as ops
from v4kernels.testing import assert_bitwise_equal, calc_diff, kernel_backends, make_generator, run_opcheck

from _compressor_inputs import (block_table, cache, cu_of, i32, problem, random_state, read_entries, tokens,
                               unwritten_bytes)

BACKENDS = kernel_backends("compress_kv")
PS = 4


def _csa_layer(gen, device, pos, num_slots, npg=40, page_size=PS):
    """Main + indexer compressors (ratio 4) of one CSA layer with random states and NaN-poisoned caches."""
    B = len(pos)
    comps = []
    for kind in ("main", "indexer"):
        pb = problem(kind, 4, gen, device)
        kv, sc = tokens(pb, B, gen, device)
        skv, ssc = random_state(pb, num_slots, gen, device)
        bt = block_table(B, 6, npg, gen, device)
        comps.append((pb, [kv, sc, skv, ssc, pb.ape, pb.w, cache(pb, npg, page_size, device), bt, page_size, 4, kind]))
    return comps


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_layer_pair_equals_single_decodes(backend, gen, device):
    """One launch for main + indexer == compress_kv_decode per compressor (bitwise), and == the reference
    (tolerance rules of test_compressor_kernels: bitwise on the CPU for ratio 4)."""
    pos = [3, 9, -1, 6, 0, 7]
    B = len(pos)
    slots = i32([2, 0, 5, 1, 3, 4], device)
    comps = _csa_layer(gen, device, pos, 6)
    p = i32(pos, device)
    pb0 = comps[0][0]
    out = {}
    for mode in ("layer", "single", "reference"):
        args = [_clone(a) for _, a in comps]
        if mode == "layer":
            ops.compress_kv_decode_layer(p, pb0.cos, pb0.sin, [ops.DecodeCompressor(*a) for a in args],
                                         state_slots=slots, backend=backend)
        else:
            for a in args:
                kv, sc, skv, ssc, ape, w, cch, bt, ps, r, kind = a
                ops.compress_kv_decode(kv, sc, p, skv, ssc, ape, w, pb0.cos, pb0.sin, cch, bt, ps, r, kind,
                                       state_slots=slots, backend=backend if mode == "single" else "reference")
        out[mode] = [(a[2].cpu(), a[3].cpu(), a[6].cpu()) for a in args]
    for (pb, a), lay, one, ref in zip(comps, out["layer"], out["single"], out["reference"]):
        for x, y, what in zip(lay, one, ("state_kv", "state_score", "cache")):
            assert_bitwise_equal(x, y, f"{pb.kind} {what}: layer vs single")
        assert_bitwise_equal(lay[0], ref[0], f"{pb.kind} state_kv")
        assert_bitwise_equal(lay[1], ref[1], f"{pb.kind} state_score")
        seqs = [b for b in range(B) if pos[b] >= 0 and (pos[b] + 1) % 4 == 0]
        ids = [pos[b] // 4 for b in seqs]
        bt = a[7].cpu()
        e_out = read_entries(lay[2], pb, PS, bt, seqs, ids)
        e_ref = read_entries(ref[2], pb, PS, bt, seqs, ids)
        if torch.cuda.is_available():
            assert calc_diff(e_out.float(), e_ref.float()) < 1e-4
        else:
            assert_bitwise_equal(e_out, e_ref, f"{pb.kind} entries")
        # no byte outside the written rows changed
        mask = unwritten_bytes(ref[2], pb, PS, bt, seqs, ids)
        assert torch.equal(lay[2].cpu()[mask], ref[2].cpu()[mask])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_layer_single_compressor(backend, gen, device):
    """An HCA layer has one compressor (ratio 128): the layer call is compress_kv_decode."""
    pb = problem("main", 128, gen, device)
    pos = i32([127, 5, -1], device)
    kv, sc = tokens(pb, 3, gen, device)
    init = random_state(pb, 3, gen, device)
    bt = block_table(3, 4, 12, gen, device)
    res = []
    for layer in (True, False):
        skv, ssc, cch = init[0].clone(), init[1].clone(), cache(pb, 12, PS, device)
        args = (kv, sc, skv, ssc, pb.ape, pb.w, cch, bt, PS, 128, "main")
        if layer:
            ops.compress_kv_decode_layer(pos, pb.cos, pb.sin, [args], backend=backend)
        else:
            ops.compress_kv_decode(kv, sc, pos, skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch, bt, PS, 128, "main",
                                   backend=backend)
        res.append((skv.cpu(), ssc.cpu(), cch.cpu()))
    for x, y in zip(*res):
        assert_bitwise_equal(x, y)


def test_decode_pair_opcheck_and_errors(gen):
    comps = _csa_layer(gen, "cpu", [3, 5], 3)
    args = (i32([3, 5]), i32([0, 1]), comps[0][0].cos, comps[0][0].sin, *comps[0][1], *comps[1][1])
    run_opcheck(torch.ops.v4kernels.compress_kv_decode_pair.default, args)
    a, b = comps[0][1], _clone(comps[1][1])
    with pytest.raises(ValueError, match="compressors: expected 1 or 2"):
        ops.compress_kv_decode_layer(i32([3, 5]), comps[0][0].cos, comps[0][0].sin, [a, b, a])
    # both compressors on one state tensor
    same = _clone(a)
    with pytest.raises(ValueError, match="state_kv_a, state_kv_b: expected two different tensors"):
        ops.compress_kv_decode_layer(i32([3, 5]), comps[0][0].cos, comps[0][0].sin, [a, same[:2] + a[2:]])
    b[1] = b[1][:1]   # indexer score with the wrong batch size
    with pytest.raises(ValueError, match="score: expected shape"):
        ops.compress_kv_decode_layer(i32([3, 5]), comps[0][0].cos, comps[0][0].sin, [a, b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_ratio128_decode_equals_prefill(backend, gen, device):
    """Kernel-only, bitwise: entry 0 pooled by the decode path (token 127 completes the block) == pooled by
    a one-shot prefill; same state after both."""
    pb = problem("main", 128, gen, device)
    n = 131
    kv, sc = tokens(pb, n, gen, device)
    bt = block_table(1, 2, 4, gen, device)
    outs = []
    for split in (n, 124):
        skv, ssc = (t.to(device) for t in ops.new_compressor_state(1, 128, "main"))
        cch = cache(pb, 4, PS, device)
        ops.compress_kv(kv[:split], sc[:split], cu_of([split], device), i32([0], device), skv, ssc, pb.ape, pb.w,
                        pb.cos, pb.sin, cch, bt, PS, 128, "main", backend=backend)
        for p in range(split, n):
            ops.compress_kv_decode(kv[p:p + 1].contiguous(), sc[p:p + 1].contiguous(), i32([p], device), skv, ssc,
                                   pb.ape, pb.w, pb.cos, pb.sin, cch, bt, PS, 128, "main", backend=backend)
        outs.append((cch.cpu(), skv.cpu(), ssc.cpu()))
    for a, b, what in zip(*outs, ("cache", "state_kv", "state_score")):
        assert_bitwise_equal(b, a, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_ratio128_counters_reset(backend, gen, device):
    """The ratio-128 kernel's arrival counters are zero again after every launch (prefill, functional form and
    decode), and a repeated call gives the same bytes."""
    from v4kernels.triton import compressor as tri

    pb = problem("main", 128, gen, device)
    kv, sc = tokens(pb, 200, gen, device)
    bt = block_table(2, 3, 8, gen, device)
    init = random_state(pb, 2, gen, device)
    cu, st = cu_of([140, 60], device), i32([60, 68], device)      # one entry each (blocks 0 and 0)
    res = []
    for rep in range(2):
        skv, ssc, cch = init[0].clone(), init[1].clone(), cache(pb, 8, PS, device)
        ops.compress_kv(kv, sc, cu, st, skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch, bt, PS, 128, "main",
                        backend=backend)
        res.append((cch.cpu().clone(), skv.cpu().clone(), ssc.cpu().clone()))
    ops.compress_kv_decode(kv[:2].contiguous(), sc[:2].contiguous(), i32([255, 127], device), skv, ssc, pb.ape, pb.w,
                           pb.cos, pb.sin, cch, bt, PS, 128, "main", backend=backend)
    ops.compress_kv_entries(kv, sc, cu, st, init[0].clone(), init[1].clone(), pb.ape, pb.w, pb.cos, pb.sin, 128,
                            "main", backend=backend)
    for a, b in zip(*res):
        assert_bitwise_equal(a, b)
    for buf in tri._COUNTERS.values():
        assert int(buf.count_nonzero()) == 0


# ----------------------------------------------------------------------------- GPU, benchmark shapes
def _bench_like_prefill(kind, ratio, T, layout, dev, g):
    if layout == "single":
        lens, starts = [T], [0]
    else:
        lens, starts = [T // 8] * 8, [(97 * b) % (4 * ratio) for b in range(8)]
    end = max(s + n for s, n in zip(starts, lens))
    pb = problem(kind, ratio, g, dev, max_pos=end + ratio)
    kv, sc = tokens(pb, sum(lens), g, dev)
    B = len(lens)
    init = random_state(pb, B, g, dev)
    pages = -(-(end // ratio) // 64)
    bt = block_table(B, pages, B * pages, g, dev)
    return pb, lens, starts, kv, sc, init, bt, B * pages


@pytest.mark.cuda
@pytest.mark.parametrize("kind,ratio", [("main", 4), ("indexer", 4), ("main", 128)], ids=["main-r4", "indexer-r4",
                                                                                          "main-r128"])
@pytest.mark.parametrize("layout", ["single", "batch8"])
def test_cuda_prefill_bench_shapes(kind, ratio, layout):
    """GPU, the benchmark's 4096-token prefill (one sequence from 0, or 8 at mixed starts; 64-row pages):
    kernel vs reference (tolerance), state bitwise, every written row decodes to finite values, and the
    same call twice gives the same bytes."""
    dev = torch.device("cuda")
    g = make_generator(f"cuda-bench-{kind}-{ratio}-{layout}")
    pb, lens, starts, kv, sc, init, bt, npg = _bench_like_prefill(kind, ratio, 4096, layout, dev, g)
    cu, st = cu_of(lens, dev), i32(starts, dev)
    res = []
    for be in ("reference", "triton", "triton"):
        skv, ssc = init[0].clone(), init[1].clone()
        cch = cache(pb, npg, 64, dev)
        ops.compress_kv(kv, sc, cu, st, skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch, bt, 64, ratio, kind, backend=be)
        res.append((cch, skv, ssc))
    assert torch.equal(res[1][0], res[2][0]) and torch.equal(res[1][1], res[2][1]), "not deterministic"
    seqs, ids = [], []
    for b in range(len(lens)):
        for i in range(starts[b] // ratio, (starts[b] + lens[b]) // ratio):
            seqs.append(b); ids.append(i)
    from v4kernels import formats
    rows = formats.positions_to_rows(bt.cpu(), torch.tensor(seqs), torch.tensor(ids), 64)
    e_ref = formats.read_rows(res[0][0].cpu(), pb.fmt, 64, rows)
    e_out = formats.read_rows(res[1][0].cpu(), pb.fmt, 64, rows)
    assert torch.isfinite(e_out.float()).all()
    assert calc_diff(e_out.float(), e_ref.float()) < 1e-4
    assert (e_out.view(torch.int16) != e_ref.view(torch.int16)).float().mean() < 0.02
    assert torch.equal(res[0][1], res[1][1]) and torch.equal(res[0][2], res[1][2])


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["emit_all", "mixed"])
def test_cuda_decode_layers_batch64(mode):
    """GPU, batch 64: the CSA layer step (main + indexer, one launch) and the HCA layer step (ratio 128) vs the
    reference; every sequence completing a block (worst case) or random positions."""
    dev = torch.device("cuda")
    g = make_generator(f"cuda-decode-{mode}")
    B = 64
    blocks = torch.randint(1, 256, (B,), generator=torch.Generator().manual_seed(7))
    for layer, ratios in (("CSA", (("main", 4), ("indexer", 4))), ("HCA", (("main", 128),))):
        r = ratios[0][1]
        if mode == "emit_all":
            pos = blocks * r + r - 1
        else:
            pos = blocks * r + torch.randint(0, r, (B,), generator=torch.Generator().manual_seed(8))
        pos[5] = -1   # a padding row
        pbs, comps = [], []
        for kind, ratio in ratios:
            pb = problem(kind, ratio, g, dev, max_pos=256 * ratio + ratio)
            kv, sc = tokens(pb, B, g, dev)
            skv, ssc = random_state(pb, B, g, dev)
            pages = -(-(256 + 1) // 64)
            bt = block_table(B, pages, B * pages, g, dev)
            pbs.append(pb)
            comps.append([kv, sc, skv, ssc, pb.ape, pb.w, cache(pb, B * pages, 64, dev), bt, 64, ratio, kind])
        p = pos.to(torch.int32).to(dev)
        res = []
        for be in ("reference", "triton"):
            args = [_clone(a) for a in comps]
            ops.compress_kv_decode_layer(p, pbs[0].cos, pbs[0].sin, [ops.DecodeCompressor(*a) for a in args],
                                         backend=be)
            res.append(args)
        emit = [b for b in range(B) if pos[b] >= 0 and (pos[b] + 1) % r == 0]
        for pb, ref, out in zip(pbs, *res):
            assert torch.equal(ref[2], out[2]) and torch.equal(ref[3], out[3]), f"{layer} {pb.kind} state"
            if emit:
                ids = [int(pos[b]) // r for b in emit]
                e_ref = read_entries(ref[6], pb, 64, ref[7], emit, ids)
                e_out = read_entries(out[6], pb, 64, out[7], emit, ids)
                assert calc_diff(e_out.float(), e_ref.float()) < 1e-4, f"{layer} {pb.kind}"
                assert (e_out.view(torch.int16) != e_ref.view(torch.int16)).float().mean() < 0.02
