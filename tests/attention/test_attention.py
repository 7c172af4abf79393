"""V4 attention over paged FP8 caches (spec §5.2-§5.4, §6.2): reference vs a naive loop, kernels vs the
reference (FlashMLA-style tolerances), invalid indices, corner cases, invariances, bad inputs, opcheck."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from v4kernels import formats as F
from v4kernels.ops import attention as A
from v4kernels.reference import attention as R
from v4kernels.reference.rope import apply_rope, rope_table
from v4kernels.testing import assert_all_written, assert_close, calc_diff, kernel_backends, make_generator, \
    poisoned, run_opcheck

from _attn_build import decode_view, make_case

BACKENDS = kernel_backends("sparse_attn_decode")
INT_MIN, INT_MAX = -(2 ** 31), 2 ** 31 - 1


def check_attn(out, lse, ref_out, ref_lse, name=""):
    """FlashMLA-style: per-element bf16 tolerance, a global calc_diff bound, lse close, inf where empty."""
    out, lse = out.cpu(), lse.cpu()
    assert not torch.isnan(out).any(), f"{name}: NaN in out"
    assert_close(out.float(), ref_out.float(), atol=8e-3, rtol=2.01 / 128, name=f"{name} out")
    assert calc_diff(out, ref_out) < 2e-5, f"{name}: calc_diff {calc_diff(out, ref_out)}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), f"{name}: lse=+inf pattern differs"
    assert_close(lse[~empty], ref_lse[~empty], atol=1e-4, rtol=1e-5, name=f"{name} lse")


def _naive(case):
    """Per token, per head loop in float64 over explicitly listed keys (independent of R.key_lists)."""
    q, cu, sl = case["q"], case["cu_seqlens"].tolist(), case["seq_lens"].tolist()
    kind, ring = case["kind"], case["window_ring"]
    wc, wbt, wps = case["window_cache"], case["window_block_table"], case["window_page_size"]
    T, H, _ = q.shape
    out = torch.zeros(T, H, 512, dtype=torch.float64)
    lse = torch.full((T, H), math.inf, dtype=torch.float64)

    def row_of(bt, ps, b, slot, npages):
        col = slot // ps
        if col >= bt.shape[1] or bt[b, col] < 0 or bt[b, col] >= npages:
            return None
        return int(bt[b, col]) * ps + slot % ps

    for b in range(len(sl)):
        n_q = cu[b + 1] - cu[b]
        for j in range(n_q):
            t = cu[b] + j
            p = sl[b] - n_q + j
            keys = []
            for pos in range(max(0, p - 127), p + 1):
                r = row_of(wbt, wps, b, pos % ring if ring else pos, wc.shape[0])
                if r is not None:
                    keys.append(F.read_rows(wc, F.KV584, wps, torch.tensor([r]))[0])
            if kind != "swa":
                cc, cbt, cps = case["compressed_cache"], case["compressed_block_table"], case["compressed_page_size"]
                ratio = 4 if kind == "csa" else 128
                nvis = (p + 1) // ratio
                ids = case["indices"][t].tolist() if kind == "csa" else list(range(nvis))
                if kind == "csa" and case.get("topk_lens") is not None:
                    ids = ids[: int(case["topk_lens"][t])]
                for i in ids:
                    if 0 <= i < nvis:
                        r = row_of(cbt, cps, b, i, cc.shape[0])
                        if r is not None:
                            keys.append(F.read_rows(cc, F.KV584, cps, torch.tensor([r]))[0])
            if not keys:
                continue
            kv = torch.stack(keys).double()
            s = q[t].double() @ kv.T / math.sqrt(512)
            m = s.max(-1, keepdim=True).values
            e = torch.exp(s - m)
            den = e.sum(-1)
            lse[t] = m[:, 0] + torch.log(den)
            if case["attn_sink"] is not None:
                den = den + torch.exp(case["attn_sink"].double() - m[:, 0])
            out[t] = (e @ kv) / den[:, None]
    return out, lse


def _ref_prefill(case):
    return A.sparse_attn_prefill(**case, backend="reference")


@pytest.mark.parametrize("kind", ["csa", "hca", "swa"])
@pytest.mark.parametrize("ring", [0, 160])
def test_reference_matches_naive_loop(kind, ring, gen):
    # lengths around the window (128) and the HCA ratio; chunked prefill queries at the end of each sequence
    case = make_case(gen, kind, [300, 131, 5], [3, 2, 1], 4, wps=7, cps=3, ring=ring)
    out, lse = _ref_prefill(case)
    n_out, n_lse = _naive(case)
    assert_close(out.float(), n_out.float(), atol=4e-3, rtol=8e-3, name="out")
    assert_close(lse, n_lse.float(), atol=1e-5, rtol=1e-5, name="lse")


def test_reference_sink_convention(gen):
    # FlashMLA convention: out_with_sink = out_no_sink * exp(lse) / (exp(lse) + exp(sink))
    case = make_case(gen, "hca", [260], [2], 4)
    out_s, lse_s = _ref_prefill(case)
    out_n, lse_n = _ref_prefill({**case, "attn_sink": None})
    assert torch.equal(lse_s, lse_n)
    f = torch.exp(lse_n) / (torch.exp(lse_n) + torch.exp(case["attn_sink"]))
    assert_close(out_s.float(), out_n.float() * f[..., None], atol=4e-3, rtol=8e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,H,splits,wps,cps", [
    ("csa", 16, 1, 7, 5),      # direct path, odd page sizes
    ("csa", 16, 3, 64, 3),     # split-KV + combine, page size 3
    ("hca", 16, 1, 100, 3),
    ("hca", 16, 4, 3, 2),      # more splits than tiles for some queries: empty splits
    ("swa", 16, 2, 100, 1),
    ("csa", 64, 2, 64, 64),    # V4-Flash head count
    ("csa", 20, 1, 7, 5),      # H not a multiple of the 16-head tile: masked heads
], ids=["csa-direct", "csa-split", "hca-direct", "hca-split4", "swa-split", "csa-h64", "csa-h20"])
def test_kernel_decode_matches_reference(backend, kind, H, splits, wps, cps, gen, device):
    case = make_case(gen, kind, [400, 133, 9], [2, 2, 2], H, wps=wps, cps=cps, device=device)
    d = decode_view(case, 2)
    ref_out, ref_lse = A.sparse_attn_decode(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()},
                                            backend="reference")
    out, lse = A.sparse_attn_decode(**d, num_splits=splits, backend=backend)
    check_attn(out, lse, ref_out, ref_lse, f"{kind} H{H} splits{splits}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [1, 2])
def test_kernel_fused_inverse_rope_and_out(backend, splits, gen, device):
    case = make_case(gen, "csa", [200, 50], [3, 1], 16, device=device)
    cos, sin = rope_table(256, 160000.0)
    case.update(rope_cos=cos.to(device), rope_sin=sin.to(device))
    ref_out, ref_lse = _ref_prefill({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()})
    # the reference applies the inverse rope after the bf16 cast (spec §5.4)
    plain, _ = _ref_prefill({**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()},
                             "rope_cos": None, "rope_sin": None})
    _, tok_pos = R.prefill_positions(case["cu_seqlens"].cpu(), case["seq_lens"].cpu(), 4)
    assert torch.equal(ref_out, apply_rope(plain, tok_pos, cos, sin, inverse=True))
    out = poisoned((4, 16, 512), torch.bfloat16, device)
    lse = poisoned((4, 16), torch.float32, device)
    A.sparse_attn_prefill(**case, num_splits=splits, out=out, lse_out=lse, backend=backend)
    assert_all_written(out)
    assert_all_written(lse, "lse")
    check_attn(out, lse, ref_out, ref_lse, "rope")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_invalid_indices_are_ignored(backend, gen, device):
    case = make_case(gen, "csa", [200, 90], [1, 1], 16, topk=16, device=device, invalid_frac=0.0)
    nvis = [200 // 4, 90 // 4]
    bad = case["indices"].clone()
    specials = [-1, nvis[0], INT_MIN, INT_MAX, 10 ** 6, -7]
    bad[0, : len(specials)] = torch.tensor(specials, dtype=torch.int32)
    bad[1, :3] = torch.tensor([nvis[1], INT_MAX, INT_MIN], dtype=torch.int32)
    clean = bad.clone()
    clean[0, : len(specials)] = -1
    clean[1, :3] = -1
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    ref_out, ref_lse = _ref_prefill({**cpu, "indices": clean.cpu()})
    out, lse = A.sparse_attn_prefill(**{**case, "indices": bad}, num_splits=2, backend=backend)
    check_attn(out, lse, ref_out, ref_lse, "invalid")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_topk_lens_shorter_than_row(backend, gen, device):
    case = make_case(gen, "csa", [200, 90], [2, 2], 16, topk=16, device=device)
    tkl = torch.tensor([3, 0, 16, 40], dtype=torch.int32, device=device)  # 40 > topk: clamped to the row
    cut = case["indices"].clone()
    for t, n in enumerate(tkl.tolist()):
        cut[t, n:] = -1
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    ref_out, ref_lse = _ref_prefill({**cpu, "indices": cut.cpu()})
    out, lse = A.sparse_attn_prefill(**case, topk_lens=tkl, backend=backend)
    check_attn(out, lse, ref_out, ref_lse, "topk_lens")
    d = decode_view(case, 2)
    out_d, lse_d = A.sparse_attn_decode(**d, topk_lens=tkl[::2].contiguous(), backend=backend)
    cut_d = case["indices"].clone()
    for t, n in enumerate([3, 3, 16, 16]):
        cut_d[t, n:] = -1
    r_d = _ref_prefill({**cpu, "indices": cut_d.cpu()})
    check_attn(out_d.flatten(0, 1), lse_d.flatten(0, 1), *r_d, "topk_lens decode")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("splits", [1, 3])
def test_query_without_keys_gives_zero_and_inf(backend, splits, gen, device):
    case = make_case(gen, "hca", [300, 40], [1, 1], 16, device=device)
    case["window_block_table"][1] = -1          # no window page for sequence 1 (freed / missing)
    case["compressed_block_table"][1] = -1
    out, lse = A.sparse_attn_prefill(**case, num_splits=splits, backend=backend)
    assert torch.equal(out[1].cpu(), torch.zeros(16, 512, dtype=torch.bfloat16))
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()
    assert torch.isfinite(lse[0]).all()
    # pages outside [0, num_pages) in the block table are ignored as well
    case["window_block_table"][0, 0] = case["window_cache"].shape[0] + 5
    case["window_block_table"][0, 1] = INT_MIN
    ref = _ref_prefill({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()})
    check_attn(*A.sparse_attn_prefill(**case, num_splits=splits, backend=backend), *ref, "bad pages")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ring_window_equals_position_addressed(backend, device):
    g1, g2 = make_generator(7), make_generator(7)
    lin = make_case(g1, "swa", [300, 129], [3, 3], 16, wps=7, device=device)
    ring = make_case(g2, "swa", [300, 129], [3, 3], 16, wps=7, ring=130, device=device)
    assert torch.equal(lin["q"], ring["q"])
    a = A.sparse_attn_decode(**decode_view(lin, 3), backend=backend)
    b = A.sparse_attn_decode(**decode_view(ring, 3), backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_permutation_invariance(backend, gen, device):
    case = make_case(gen, "csa", [150, 77, 260], [1, 1, 1], 16, device=device)
    out, lse = A.sparse_attn_decode(**decode_view(case, 1), backend=backend)
    perm = torch.tensor([2, 0, 1])
    pc = dict(case)
    for k in ("q", "window_block_table", "compressed_block_table", "indices", "seq_lens"):
        pc[k] = case[k][perm.to(device)]
    out_p, lse_p = A.sparse_attn_decode(**decode_view(pc, 1), backend=backend)
    assert torch.equal(out_p, out[perm.to(device)]) and torch.equal(lse_p, lse[perm.to(device)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_decode_token_equals_prefill_row(backend, kind, gen, device):
    # a prefill chunk of 5 tokens; decode of its last token (s_q = 1) must give the same row
    case = make_case(gen, kind, [260], [5], 16, device=device)
    out_p, lse_p = A.sparse_attn_prefill(**case, num_splits=1, backend=backend)
    sub = {**case, "q": case["q"][4:]}
    if kind == "csa":
        sub["indices"] = case["indices"][4:]
    d = decode_view(sub, 1)
    out_d, lse_d = A.sparse_attn_decode(**d, num_splits=1, backend=backend)
    assert torch.equal(out_d[0, 0], out_p[4]) and torch.equal(lse_d[0, 0], lse_p[4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_reused_and_deterministic(backend, gen, device):
    case = make_case(gen, "hca", [400, 200], [2, 2], 16, device=device)
    d = decode_view(case, 2)
    plan = A.attention_plan(case["seq_lens"], 16, s_q=2, hca_capacity=8, num_splits={"hca": 2, "swa": 1})
    assert plan.tokens.tolist() == [[0, 0, 1, 1], [398, 399, 198, 199]]
    a = A.sparse_attn_decode(**d, plan=plan, backend=backend)
    b = A.sparse_attn_decode(**d, plan=plan, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ref = A.sparse_attn_decode(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()},
                               backend="reference")
    check_attn(a[0], a[1], *ref, "plan")
    pp = A.attention_plan(case["seq_lens"], 16, cu_seqlens=case["cu_seqlens"], num_tokens=4)
    assert torch.equal(pp.tokens, plan.tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    kind=st.sampled_from(["csa", "hca", "swa"]),
    lens=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    qn=st.integers(1, 3),
    wps=st.sampled_from([1, 3, 64, 100]),
    cps=st.sampled_from([1, 3, 64]),
    topk=st.integers(1, 40),
    splits=st.sampled_from([0, 1, 2, 5]),
    seed=st.integers(0, 2 ** 31),
)
def test_kernel_matches_reference_hypothesis(backend, kind, lens, qn, wps, cps, topk, splits, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = make_generator(seed)
    lens = [max(L, qn) for L in lens]
    case = make_case(g, kind, lens, [qn] * len(lens), 16, wps=wps, cps=cps, topk=topk, device=dev)
    ref = _ref_prefill({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()})
    out, lse = A.sparse_attn_prefill(**case, num_splits=splits, backend=backend)
    check_attn(out, lse, *ref, f"{kind} {lens}")


def test_bad_inputs_raise_typed_errors(gen):
    case = make_case(gen, "csa", [20], [1], 16)
    d = decode_view(case, 1)
    with pytest.raises(TypeError, match="q: expected dtype"):
        A.sparse_attn_decode(**{**d, "q": d["q"].float()})
    with pytest.raises(ValueError, match="q: expected shape"):
        A.sparse_attn_decode(**{**d, "q": d["q"][..., :256]})
    with pytest.raises(ValueError, match="kind: expected one of"):
        A.sparse_attn_decode(**{**d, "kind": "mla"})
    with pytest.raises(ValueError, match="indices: kind 'csa' needs"):
        A.sparse_attn_decode(**{**d, "indices": None})
    with pytest.raises(TypeError, match="indices: expected dtype torch.int32"):
        A.sparse_attn_decode(**{**d, "indices": d["indices"].long()})
    with pytest.raises(ValueError, match="window_cache: expected .* bytes per page"):
        A.sparse_attn_decode(**{**d, "window_page_size": 8})
    with pytest.raises(ValueError, match="window_ring: expected 0"):
        A.sparse_attn_decode(**{**d, "window_ring": 100})
    with pytest.raises(ValueError, match="attn_sink: expected shape"):
        A.sparse_attn_decode(**{**d, "attn_sink": torch.zeros(8)})
    with pytest.raises(ValueError, match="seq_lens: expected shape"):
        A.sparse_attn_decode(**{**d, "seq_lens": torch.zeros(3, dtype=torch.int32)})
    with pytest.raises(ValueError, match="indices: expected None for kind 'swa'"):
        A.sparse_attn_decode(**{**d, "kind": "swa"})
    with pytest.raises(ValueError, match="out: expected shape"):
        A.sparse_attn_decode(**d, out=torch.empty(1, 1, 16, 256, dtype=torch.bfloat16), lse_out=torch.empty(1, 1, 16))
    with pytest.raises(ValueError, match="num_splits"):
        A.sparse_attn_decode(**d, num_splits=1000)
    with pytest.raises(ValueError, match="rope_cos/rope_sin"):
        A.sparse_attn_decode(**d, rope_cos=torch.zeros(4, 32))
    with pytest.raises(ValueError, match="cu_seqlens: expected B"):
        A.sparse_attn_prefill(**{**case, "cu_seqlens": torch.zeros(1, dtype=torch.int32)})


def test_opcheck(gen, device):
    case = make_case(gen, "csa", [40, 9], [1, 1], 16, device=device)
    d = decode_view(case, 1)
    args = (d["q"], d["window_cache"], d["window_block_table"], d["compressed_cache"], d["compressed_block_table"],
            d["indices"], None, d["seq_lens"], d["attn_sink"], "csa", 7, 5, 0, None, None, None, 0)
    run_opcheck(torch.ops.v4kernels.sparse_attn_decode.default, args)
    out, lse = torch.empty(2, 1, 16, 512, dtype=torch.bfloat16, device=device), torch.empty(2, 1, 16, device=device)
    run_opcheck(torch.ops.v4kernels.sparse_attn_decode_out.default, args + (out, lse))
    pargs = (case["q"], case["cu_seqlens"], case["seq_lens"], case["window_cache"], case["window_block_table"],
             case["compressed_cache"], case["compressed_block_table"], case["indices"], None, case["attn_sink"],
             "csa", 7, 5, 0, None, None, None, 0)
    run_opcheck(torch.ops.v4kernels.sparse_attn_prefill.default, pargs)
    run_opcheck(torch.ops.v4kernels.sparse_attn_prefill_out.default, pargs + (out.view(2, 16, 512), lse.view(2, 16)))


# ----------------------------------------------------------------------------- GPU only
def _poisoned_run(fn, oshape, case_name):
    out = poisoned(oshape, torch.bfloat16, "cuda")
    lse = poisoned(oshape[:-1], torch.float32, "cuda")
    fn(out, lse)
    assert_all_written(out, f"{case_name} out")
    assert_all_written(lse, f"{case_name} lse")
    return out, lse


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,H,topk,ctx,B", [
    ("csa", 64, 512, 8192, 4), ("csa", 128, 1024, 8192, 2), ("hca", 64, 0, 65536, 1), ("hca", 128, 0, 32768, 2),
    ("swa", 64, 0, 1000, 8),
], ids=["flash-csa", "pro-csa", "flash-hca64K", "pro-hca32K", "flash-swa"])
def test_cuda_v4_shapes(backend, kind, H, topk, ctx, B):
    """Two query tokens per sequence at V4 shapes: auto splits, the direct path and forced splits."""
    g = make_generator(f"cuda-{kind}-{H}")
    case = make_case(g, kind, [ctx - 17 * b for b in range(B)], [2] * B, H, wps=64, cps=64, topk=max(topk, 1),
                     device="cuda", invalid_frac=0.05)
    ref = _ref_prefill({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()})
    for splits in (0, 1, 7):
        out, lse = _poisoned_run(
            lambda o, l: A.sparse_attn_prefill(**case, num_splits=splits, out=o, lse_out=l, backend=backend),
            tuple(case["q"].shape), f"{kind} H{H} splits{splits}")
        check_attn(out, lse, *ref, f"{kind} H{H} splits{splits}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,H,topk,ctx,B", [
    ("csa", 64, 512, 2100, 1), ("csa", 64, 512, 2100, 64), ("csa", 128, 1024, 4200, 1), ("csa", 128, 1024, 4200, 16),
    ("hca", 64, 0, 70000, 1), ("swa", 64, 0, 300, 64),
], ids=["flash-csa-b1", "flash-csa-b64", "pro-csa-b1", "pro-csa-b16", "flash-hca70K-b1", "flash-swa-b64"])
def test_cuda_decode_batch(backend, kind, H, topk, ctx, B):
    """Decode (s_q = 1) with the plan's split factor at the benchmark's batch sizes (batch 1: split-KV +
    combine; batch 64: direct path), fused inverse RoPE, NaN-poisoned outputs."""
    g = make_generator(f"cuda-decode-{kind}-{H}-{B}")
    case = make_case(g, kind, [ctx - 3 * b for b in range(B)], [1] * B, H, wps=64, cps=64, topk=max(topk, 1),
                     device="cuda", invalid_frac=0.02)
    cos, sin = rope_table(ctx + 1, 160000.0)
    case.update(rope_cos=cos.cuda(), rope_sin=sin.cuda())
    d = decode_view(case, 1)
    cap = case["compressed_block_table"].shape[1] * 64 if kind == "hca" else 0
    plan = A.attention_plan(d["seq_lens"], H, s_q=1, csa_topk=topk, hca_capacity=cap)
    out, lse = _poisoned_run(lambda o, l: A.sparse_attn_decode(**d, plan=plan, out=o, lse_out=l, backend=backend),
                             (B, 1, H, 512), f"decode {kind} H{H} B{B}")
    ref = A.sparse_attn_decode(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()},
                               backend="reference")
    check_attn(out.flatten(0, 1), lse.flatten(0, 1), ref[0].flatten(0, 1), ref[1].flatten(0, 1),
               f"decode {kind} H{H} B{B} splits{plan.num_splits[kind]}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,H,topk", [("csa", 64, 512), ("hca", 128, 0)], ids=["flash-csa", "pro-hca"])
def test_cuda_prefill_chunk(backend, kind, H, topk):
    """A 384-token prefill chunk at the end of a 9000-token sequence (direct path, one program per token and
    head block), next to a second sequence of 5 tokens from position 0 (keys fewer than one tile)."""
    g = make_generator(f"cuda-prefill-{kind}-{H}")
    case = make_case(g, kind, [9000, 5], [384, 5], H, wps=64, cps=64, topk=max(topk, 1), device="cuda",
                     invalid_frac=0.02)
    ref = _ref_prefill({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()})
    out, lse = _poisoned_run(lambda o, l: A.sparse_attn_prefill(**case, out=o, lse_out=l, backend=backend),
                             tuple(case["q"].shape), f"prefill {kind} H{H}")
    check_attn(out, lse, *ref, f"prefill {kind} H{H}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_decode(backend):
    g = make_generator("graph")
    case = make_case(g, "csa", [3000, 700], [1, 1], 64, wps=64, cps=64, topk=512, device="cuda")
    d = decode_view(case, 1)
    plan = A.attention_plan(d["seq_lens"], 64, s_q=1, csa_topk=512)
    out = torch.empty(2, 1, 64, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(2, 1, 64, device="cuda")
    A.sparse_attn_decode(**d, plan=plan, out=out, lse_out=lse, backend=backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        A.sparse_attn_decode(**d, plan=plan, out=out, lse_out=lse, backend=backend)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = A.sparse_attn_decode(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()},
                               backend="reference")
    check_attn(out, lse, *ref, "graph")


# ----------------------------------------------------------------------------- kernel variants
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn,kind,splits,H", [
    (16, "csa", 1, 20),   # direct path + fused inverse RoPE, tiles straddling window/compressed keys
    (64, "hca", 3, 20),   # the GPU's tile size, split-KV partials
    (32, "csa", 2, 80),   # two head blocks of 64 (Pro runs 2), the second one partly masked
])
def test_kernel_tile_sizes_match_reference(backend, bn, kind, splits, H, gen, device, monkeypatch):
    monkeypatch.setenv("V4K_ATTN_BN", str(bn))
    case = make_case(gen, kind, [260, 40], [2, 1], H, wps=64, cps=3, device=device)
    cos, sin = rope_table(300, 160000.0)
    case.update(rope_cos=cos.to(device), rope_sin=sin.to(device))
    ref = _ref_prefill({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()})
    out = poisoned(tuple(case["q"].shape), torch.bfloat16, device)
    lse = poisoned(tuple(case["q"].shape[:2]), torch.float32, device)
    A.sparse_attn_prefill(**case, num_splits=splits, out=out, lse_out=lse, backend=backend)
    assert_all_written(out)
    assert_all_written(lse, "lse")
    check_attn(out, lse, *ref, f"bn{bn} {kind} splits{splits}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_chunks_bound_the_row_workspace(backend, gen, device, monkeypatch):
    """Launches cover at most ROWS_WORKSPACE_BYTES of key rows: 2 tokens per launch here, same result."""
    from v4kernels.triton import attention as T

    case = make_case(gen, "csa", [200, 90, 40], [2, 2, 1], 16, topk=16, device=device)
    tkl = torch.tensor([3, 16, 0, 9, 16], dtype=torch.int32, device=device)
    full = A.sparse_attn_prefill(**case, topk_lens=tkl, num_splits=2, backend=backend)
    monkeypatch.setattr(T, "ROWS_WORKSPACE_BYTES", (128 + 16) * 16 * 2)
    chunked = A.sparse_attn_prefill(**case, topk_lens=tkl, num_splits=2, backend=backend)
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])
