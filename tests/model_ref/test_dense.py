"""The dense numerics mode (model_ref/dense.py): its parts against the reference ops, and the model.

Parts: on inputs that are exactly representable in the quantized formats, each dense part must
reproduce the reference op (the only difference between the modes is the quantization itself):
* compressor: ``stored_values(dense entries)`` == ``compress_kv_entries`` (bitwise), any chunking;
* attention over FP8-exact K/V == ``sparse_attn_prefill`` (reference backend), SWA / HCA / CSA;
* indexer top-k on FP4-exact queries and keys == ``indexer_topk`` (reference backend).

Model level (tiny config, CPU): dense vs reference logits. They differ by the quantization noise of
the reference mode (FP8 e4m3 activations: relative step 2^-3, ~2-3% RMS noise per element into every
FP8/FP4 GEMM; FP8 KV; FP4 indexer), and router / top-k flips change single positions a lot. Measured
on the tiny config (200 tokens): overall calc_diff 0.023, median per position 0.0041 (max 0.27),
top-1 agreement 74%; reference numerics with only the routed experts switched to W4A16 already
differ from reference by 0.021. For scale, the reference mode against itself with the
embeddings perturbed by 2^-8 relative noise (bf16 rounding level) gives 0.034 / 0.0061 / 70%: the
two modes differ by less than the model's own sensitivity to bf16-level noise. Bounds (3x the
measured values, loose: gross errors only; the part tests above are the precise ones): overall
calc_diff < 0.08, median per-position calc_diff < 0.012, top-1 agreement >= 60%.
"""
import pytest
import torch

from v4kernels import formats as F
from v4kernels.model_ref import config as C
from v4kernels.model_ref import dense
from v4kernels.model_ref.model import Transformer
from v4kernels.model_ref.weights import init_weights
from v4kernels.ops import attention as attn_ops
from v4kernels.ops import compressor as comp_ops
from v4kernels.ops import formats as fmt_ops
from v4kernels.ops import indexer as idx_ops
from v4kernels.reference import compressor as comp_ref
from v4kernels.reference.rope import YarnConfig, rope_table
from v4kernels.testing import calc_diff

COS, SIN = rope_table(1024, 160000.0, YarnConfig())


# ----------------------------------------------------------------------------- parts
@pytest.mark.parametrize("ratio,kind", [(4, "main"), (128, "main"), (4, "indexer")])
def test_dense_compressor_quantized_equals_reference_entries(ratio, kind):
    """Two sequences fed in chunks (prefill, one-token decode steps, chunks across block edges)."""
    g = torch.Generator().manual_seed(ratio + len(kind))
    hd, c, _ = comp_ref.dims(ratio, kind)
    ape = torch.randn(ratio, c * hd, generator=g)
    norm_w = 1 + 0.1 * torch.randn(hd, generator=g)
    states = [comp_ref.new_state(2, ratio, kind) for _ in range(2)]  # dense, reference
    chunks = [(5, 7), (1, 130), (1, 1), (261, 3), (1, 2)] if ratio == 128 else [(5, 7), (1, 2), (1, 1), (13, 3)]
    starts = [0, 0]
    for lens in chunks:
        n = sum(lens)
        kv = torch.randn(n, c * hd, generator=g)
        score = torch.randn(n, c * hd, generator=g)
        slots = [1, 0]
        vals, rows, ids = dense.compress(kv, score, starts, list(lens), slots, *states[0], ape, norm_w, COS, SIN,
                                         ratio, kind)
        cu = torch.tensor([0, lens[0], n], dtype=torch.int32)
        want, wseq, wpos = comp_ops.compress_kv_entries(
            kv, score, cu, torch.tensor(starts, dtype=torch.int32), *states[1], ape, norm_w, COS, SIN, ratio, kind,
            state_slots=torch.tensor(slots, dtype=torch.int32), trim=True, backend="reference")
        assert torch.equal(rows, wseq.long()) and torch.equal(ids, wpos.long())
        assert torch.equal(comp_ref.stored_values(vals, kind), want)
        for a, b in zip(states[0], states[1]):
            assert torch.equal(a, b)
        starts = [s + n_ for s, n_ in zip(starts, lens)]


def _paged(fmt, rows_per_seq, values):
    """One sequence's rows 0..n-1 in a paged cache (page size 16): (cache, block table [1, P])."""
    ps = 16
    pages = -(-rows_per_seq // ps)
    cache = torch.zeros(pages + 1, fmt.page_bytes(ps), dtype=torch.uint8)
    bt = torch.arange(pages, dtype=torch.int32).flip(0)[None] + 1  # non-trivial page order
    rows = F.positions_to_rows(bt, torch.zeros(rows_per_seq, dtype=torch.long), torch.arange(rows_per_seq), ps)
    (fmt_ops.kv584_write if fmt is F.KV584 else fmt_ops.idx_fp4_write)(cache, rows, values, ps, backend="reference")
    read = (fmt_ops.kv584_read if fmt is F.KV584 else fmt_ops.idx_fp4_read)(cache, rows, ps, backend="reference")
    return cache, bt, ps, read


@pytest.mark.parametrize("kind", ["swa", "hca", "csa"])
def test_dense_attention_equals_reference_op_on_fp8_exact_kv(kind):
    g = torch.Generator().manual_seed(len(kind))
    L, H, T = 700, 16, 40
    win_cache, wbt, ps, win = _paged(F.KV584, L, torch.randn(L, 512, generator=g).bfloat16())
    n_c = L // (4 if kind == "csa" else 128) + 1
    comp_cache, cbt, _, comp = _paged(F.KV584, n_c, torch.randn(n_c, 512, generator=g).bfloat16())
    q = torch.randn(T, H, 512, generator=g).bfloat16()
    seq_len = 650  # queries at positions 610..649 (HCA: 4-5 visible entries; CSA: up to 162)
    pos = torch.arange(seq_len - T, seq_len)
    sink = torch.randn(H, generator=g)
    idx = None
    if kind == "csa":
        idx = torch.randint(-1, 170, (T, 24), generator=g, dtype=torch.int32)  # some invalid / not visible
    kw = {} if kind == "swa" else dict(compressed_cache=comp_cache, compressed_block_table=cbt, compressed_page_size=ps)
    want, _ = attn_ops.sparse_attn_prefill(
        q, torch.tensor([0, T], dtype=torch.int32), torch.tensor([seq_len], dtype=torch.int32), win_cache, wbt,
        kind=kind, window_page_size=ps, indices=idx, attn_sink=sink, rope_cos=COS, rope_sin=SIN,
        backend="reference", **kw)
    got = dense.attention(q, pos, torch.zeros(T, dtype=torch.long), win[None], comp[None] if kind != "swa" else None,
                          kind, idx, sink, COS, SIN)
    # same math on the same values; only the fp32 summation length may differ (masked keys)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-6, rtol=2 ** -8)


def test_dense_indexer_topk_equals_reference_op_on_fp4_exact_inputs():
    g = torch.Generator().manual_seed(7)
    n, H, T, topk = 150, 16, 24, 32
    cache, bt, ps, keys = _paged(F.IDX_FP4, n, torch.randn(n, 128, generator=g))
    pos = torch.tensor(sorted(torch.randint(0, 4 * n, (T,), generator=g).tolist()))
    q = idx_ops.indexer_prepare_q(torch.randn(T, H, 128, generator=g).bfloat16(), pos, COS, SIN, backend="reference")
    w = torch.randn(T, H, generator=g).bfloat16()
    seq = torch.zeros(T, dtype=torch.int32)
    want, _, _ = idx_ops.indexer_topk(q, w, cache, bt, seq, pos.int(), topk, ps, n_entries=n, backend="reference")
    got = dense.indexer_topk(q, w, keys[None], seq.long(), pos, topk)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tiny():
    cfg = C.tiny()
    return cfg, init_weights(cfg, seed=0)


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C.tiny().vocab_size, (n,), generator=g).tolist()


def _logits(tiny, numerics, toks, ctx=320):
    cfg, w = tiny
    m = Transformer(cfg, w, "cpu", backend="reference", max_seqs=2, max_context=ctx, numerics=numerics)
    m.new_sequence(0)
    return m.prefill([0], [toks], all_logits=True)


def test_dense_vs_reference_logits(tiny):
    """Tolerance: module docstring (quantization noise amplified by router/top-k flips)."""
    toks = _prompt(200, 2)
    d, r = _logits(tiny, "dense", toks), _logits(tiny, "reference", toks)
    per_pos = torch.tensor([calc_diff(d[i], r[i]) for i in range(d.shape[0])])
    agree = (d.argmax(-1) == r.argmax(-1)).float().mean().item()
    msg = f"calc_diff {calc_diff(d, r):.4f}, median per position {per_pos.median():.5f}, top-1 {agree:.3f}"
    assert calc_diff(d, r) < 0.08, msg
    assert per_pos.median() < 0.012, msg
    assert agree >= 0.6, msg
    assert calc_diff(d, r) > 1e-6, "dense and reference modes gave the same logits: no quantization point differs"


def test_dense_is_deterministic_and_chunking_invariant(tiny):
    """Same call twice: identical bytes. Chunked prefill (61 + 3 + 70, across 4- and 128-blocks) and
    decode steps after a prefill reproduce the one-shot logits (bf16 GEMMs of other row counts may
    round differently: calc_diff < 1e-3; measured 0 and 4e-6)."""
    cfg, w = tiny
    toks = _prompt(134, 3)
    full = _logits(tiny, "dense", toks)
    assert torch.equal(full, _logits(tiny, "dense", toks))
    m = Transformer(cfg, w, "cpu", backend="reference", max_seqs=2, max_context=320, numerics="dense")
    m.new_sequence(0)
    parts, pos = [], 0
    for n in (61, 3, 70):
        parts.append(m.prefill([0], [toks[pos:pos + n]], all_logits=True))
        pos += n
    assert calc_diff(torch.cat(parts), full) < 1e-3
    m.release(0)
    m.new_sequence(1)  # reuses the slot: nothing of sequence 0 may leak in
    got = [m.prefill([1], [toks[:130]])]
    got += [m.decode([1], [t]) for t in toks[130:]]
    assert calc_diff(torch.cat(got), full[129:]) < 1e-3


def test_dense_model_holds_no_fp8_caches(tiny):
    cfg, w = tiny
    m = Transformer(cfg, w, "cpu", max_seqs=2, max_context=64, numerics="dense")
    lc = m.caches.layers[1]  # CSA
    assert lc.window is None and lc.compressed is None and lc.indexer is None
    assert lc.dense_window.dtype == torch.bfloat16 and lc.dense_indexer.shape == (2, 64 // 4 + 1, 128)
    with pytest.raises(ValueError, match="numerics"):
        Transformer(cfg, w, "cpu", numerics="fp8")
