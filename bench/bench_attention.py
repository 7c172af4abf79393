"""Benchmark of V4 attention over the paged FP8 caches (v4kernels.ops.attention, spec §5-§6).

Cases (V4-Flash: H=64, top-k 512; V4-Pro: H=128, top-k 1024), s_q = 1 decode unless noted:
  * CSA decode, batch 1/8/64/128 (window 128 + top-k keys per query);
  * HCA decode at 64K/256K/1M context (128 + ctx/128 keys), batch 1 and 64;
  * SWA-only decode (128 keys), batch 1 and 64;
  * prefill: a chunk of query tokens at the end of an 8K-64K context (CSA and HCA).
FLOP = 2*H*n*(512+512) per query for n attended keys. Minimum bytes = n*584 per (sequence, step)
(MQA: the KV is read once for all heads and the s_q queries) + q + o (bf16) + lse (fp32).
Bound: HBM for Flash decode and SWA, bf16 tensor for Pro decode and prefill (ANCHORS.md §3-§4).
Baselines: the eager float32 reference (small shapes only) and "torch_bf16": a gather from a bf16
copy of the cache + bf16 matmuls + fp32 softmax (the index -> row translation is not timed).
The window cache is a 256-slot ring per sequence (``window_ring=256``), the engine layout.
"""
from __future__ import annotations

import torch

FAMILY = "attention"
PAGE = 64
RING = 256
ROW = 584


def _random_cache(num_pages, page_size, device, gen):
    """A KV584 cache of random valid rows, built directly on the device (no CPU encode)."""
    from v4kernels import formats as F

    cache = torch.zeros(num_pages, F.KV584.page_bytes(page_size), dtype=torch.uint8, device=device)
    dv, sv = F._row_views(cache, F.KV584, page_size)
    nope = torch.randint(0, 256, (num_pages, page_size, 448), device=device, dtype=torch.int32, generator=gen)
    dv[..., :448] = (nope & 0xF7).to(torch.uint8)  # exponent field <= 14: never the e4m3 NaN code
    rope = torch.randn(num_pages, page_size, 64, device=device, generator=gen).to(torch.bfloat16)
    dv[..., 448:] = rope.view(torch.uint8).view(num_pages, page_size, 128)
    sv[..., :7] = torch.randint(118, 124, (num_pages, page_size, 7), device=device, dtype=torch.int32,
                                generator=gen).to(torch.uint8)
    return cache


def _tables(B, rows_per_seq, page_size, device, gen):
    n = -(-rows_per_seq // page_size)
    perm = torch.randperm(B * n, device=device, generator=gen).int()
    return perm.view(B, n), B * n


def _make_case(kind, H, topk, ctx, B, s_q, device, gen):
    """Decode-form case: q [B, s_q, H, 512]; all sequences at context ``ctx``."""
    wbt, wpages = _tables(B, RING, PAGE, device, gen)
    case = dict(
        q=torch.randn(B, s_q, H, 512, device=device, generator=gen).to(torch.bfloat16),
        window_cache=_random_cache(wpages, PAGE, device, gen), window_block_table=wbt,
        seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=device),
        kind=kind, window_page_size=PAGE, window_ring=RING,
        attn_sink=torch.randn(H, device=device, generator=gen),
    )
    if kind != "swa":
        ratio = 4 if kind == "csa" else 128
        ent = ctx // ratio
        cbt, cpages = _tables(B, ent, PAGE, device, gen)
        case.update(compressed_cache=_random_cache(cpages, PAGE, device, gen), compressed_block_table=cbt,
                    compressed_page_size=PAGE)
        if kind == "csa":
            case["indices"] = torch.randint(0, ent, (B, s_q, topk), device=device, dtype=torch.int32, generator=gen)
    return case


def _n_keys(kind, topk, ctx):
    return 128 + (topk if kind == "csa" else ctx // 128 if kind == "hca" else 0)


def _bf16_baseline(case):
    """(fn, args): bf16 gather from a dequantized copy of the caches + dense bf16 attention."""
    from v4kernels.reference import attention as R

    B, s_q, H, _ = case["q"].shape
    ts, tp = R.decode_positions(case["seq_lens"], s_q)
    # translate indices to rows once (not timed): build one bf16 table of every row of both caches
    def table(cache):
        from v4kernels import formats as F

        dv, sv = F._row_views(cache, F.KV584, PAGE)
        n = dv.shape[0] * PAGE
        nope = dv[..., :448].reshape(n, 448).view(torch.float8_e4m3fn).float()
        sc = torch.exp2(sv[..., :7].reshape(n, 7).float() - 127)
        nope = (nope.view(n, 7, 64) * sc[..., None]).view(n, 448)
        rope = dv[..., 448:].reshape(n, 128).view(torch.bfloat16).float()
        return torch.cat((nope, rope), 1).to(torch.bfloat16)

    wt = table(case["window_cache"])
    k = torch.arange(128, device=ts.device)
    wpos = (tp[:, None] - 127 + k).clamp_min(0) % RING
    wrows = case["window_block_table"].long()[ts[:, None], wpos // PAGE] * PAGE + wpos % PAGE
    kvt, rows = wt, wrows
    if case["kind"] != "swa":
        ct = table(case["compressed_cache"])
        if case["kind"] == "csa":
            ids = case["indices"].reshape(B * s_q, -1).long()
        else:
            ids = torch.arange(int(case["seq_lens"][0]) // 128, device=ts.device)[None].expand(B * s_q, -1)
        crows = case["compressed_block_table"].long()[ts[:, None], ids // PAGE] * PAGE + ids % PAGE
        kvt = torch.cat((wt, ct))
        rows = torch.cat((wrows, crows + wt.shape[0]), 1)
    valid = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    q = case["q"].reshape(B * s_q, H, 512)
    sink = case["attn_sink"]

    def fn(q, kvt, rows, valid, sink):
        return R.torch_bf16_attention(q, kvt[rows], valid, sink)

    return fn, (q, kvt, rows, valid, sink)


def _bench_decode(ctx, name, kind, H, topk, ctx_len, B, gen, bound, target, note, with_ref):
    import v4kernels.ops.attention as A
    from v4kernels.testing import calc_diff, kernel_backends

    dev = ctx.device
    s_q = 1
    n = _n_keys(kind, topk, ctx_len)
    shape = {"model": name, "kind": kind, "H": H, "topk": topk if kind == "csa" else 0, "ctx": ctx_len,
             "batch": B, "s_q": s_q, "keys": n}
    flops = 2.0 * H * n * 1024 * B * s_q
    nbytes = B * (n * ROW + s_q * H * 512 * 2 * 2 + s_q * H * 4)
    try:
        case = _make_case(kind, H, topk, ctx_len, B, s_q, dev, gen)
    except Exception as exc:  # out of memory for the largest shapes
        ctx.record_failure(FAMILY, f"{kind}_decode", "triton", shape, exc)
        return
    case_bytes = sum(v.numel() * v.element_size() for v in case.values() if isinstance(v, torch.Tensor))
    op = f"{kind}_decode"
    ref_out = None
    if with_ref:
        try:
            ref_out = A.sparse_attn_decode(**case, backend="reference")[0]
            t = ctx.time(lambda: A.sparse_attn_decode(**case, backend="reference"))
            ctx.record(FAMILY, op, "reference", shape, t, flops=flops, bytes=nbytes, bound=bound)
        except Exception as exc:
            ctx.record_failure(FAMILY, op, "reference", shape, exc)
    try:
        fn, args = _bf16_baseline(case)
        t = ctx.time(fn, arg_sets=[args], graph=True)
        ctx.record(FAMILY, op, "torch_bf16", shape, t, flops=flops, bytes=nbytes, bound=bound)
        del args
    except Exception as exc:
        ctx.record_failure(FAMILY, op, "torch_bf16", shape, exc)
    for be in kernel_backends("sparse_attn_decode"):
        try:
            plan = A.attention_plan(case["seq_lens"], H, s_q=s_q, csa_topk=topk,
                                    hca_capacity=case.get("compressed_block_table", case["window_block_table"]).shape[1] * PAGE)
            out = torch.empty(B, s_q, H, 512, dtype=torch.bfloat16, device=dev)
            lse = torch.empty(B, s_q, H, dtype=torch.float32, device=dev)
            sets = ctx.make_arg_sets(lambda: (_make_case(kind, H, topk, ctx_len, B, s_q, dev, gen),),
                                     bytes_per_set=case_bytes, max_sets=8)
            fn = lambda c: A.sparse_attn_decode(**c, plan=plan, out=out, lse_out=lse, backend=be)  # noqa: E731
            bnote = ""
            if ref_out is not None:
                fn(case)
                d = calc_diff(out.float().cpu(), ref_out.float().cpu())
                bnote = f"calc_diff vs reference {d:.2e}"
            t = ctx.time(fn, arg_sets=sets, graph=True)
            ctx.record(FAMILY, op, be, shape, t, flops=flops, bytes=nbytes, bound=bound, target_pct=target,
                       target_note=note + f" (splits {plan.num_splits[kind]}, {_impl(H, dev)})", note=bnote)
            del sets
        except Exception as exc:
            ctx.record_failure(FAMILY, op, be, shape, exc)


def _impl(H, dev):
    """Tiles the Triton launcher picks (heads per program, keys per tile, warps, pipeline stages)."""
    from v4kernels.triton import attention as T

    bh, bn, w, st = T.attn_config(H, dev)
    return f"BH{bh} x {-(-H // bh)} BN{bn} w{w} s{st}"


def _bench_prefill(ctx, name, kind, H, topk, ctx_len, T, gen, target, note):
    import v4kernels.ops.attention as A
    from v4kernels.testing import kernel_backends

    dev = ctx.device
    n = _n_keys(kind, topk, ctx_len)
    shape = {"model": name, "kind": kind, "H": H, "topk": topk if kind == "csa" else 0, "ctx": ctx_len,
             "tokens": T, "keys_per_query": n}
    flops = 2.0 * H * n * 1024 * T
    ent = ctx_len // (4 if kind == "csa" else 128)
    # compressed entries read once (CSA: at most T*topk distinct), window rows T + 127, q + o, lse
    nbytes = (min(ent, T * topk) if kind == "csa" else ent) * ROW + (T + 127) * ROW + T * H * 512 * 4 + T * H * 4
    op = f"{kind}_prefill"
    try:
        wbt, wpages = _tables(1, ctx_len, PAGE, dev, gen)
        cbt, cpages = _tables(1, max(ent, 1), PAGE, dev, gen)
        case = dict(
            q=torch.randn(T, H, 512, device=dev, generator=gen).to(torch.bfloat16),
            cu_seqlens=torch.tensor([0, T], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([ctx_len], dtype=torch.int32, device=dev),
            window_cache=_random_cache(wpages, PAGE, dev, gen), window_block_table=wbt, window_page_size=PAGE,
            compressed_cache=_random_cache(cpages, PAGE, dev, gen), compressed_block_table=cbt,
            compressed_page_size=PAGE, kind=kind, attn_sink=torch.randn(H, device=dev, generator=gen),
        )
        if kind == "csa":
            pos = torch.arange(ctx_len - T, ctx_len, device=dev)
            nvis = ((pos + 1) // 4).clamp_min(1)
            r = torch.rand(T, topk, device=dev, generator=gen)
            case["indices"] = (r * nvis[:, None]).long().int()
    except Exception as exc:
        ctx.record_failure(FAMILY, op, "triton", shape, exc)
        return
    for be in kernel_backends("sparse_attn_prefill"):
        try:
            plan = A.attention_plan(case["seq_lens"], H, cu_seqlens=case["cu_seqlens"], num_tokens=T, csa_topk=topk,
                                    hca_capacity=cbt.shape[1] * PAGE)
            out = torch.empty(T, H, 512, dtype=torch.bfloat16, device=dev)
            lse = torch.empty(T, H, dtype=torch.float32, device=dev)
            t = ctx.time(lambda: A.sparse_attn_prefill(**case, plan=plan, out=out, lse_out=lse, backend=be))
            ctx.record(FAMILY, op, be, shape, t, flops=flops, bytes=nbytes, bound="bf16", target_pct=target,
                       target_note=note + f" ({_impl(H, dev)})")
        except Exception as exc:
            ctx.record_failure(FAMILY, op, be, shape, exc)


def run(ctx):
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(4321)
    flash_pct = 85.0
    bf16 = ctx.ceilings.get("bf16_tflops") or 0.0
    if bf16 < 100.0:  # CPU smoke run or a failed measurement: use the H100 figure of ANCHORS §1
        bf16 = 785.0
    pro_pct = 100.0 * 450.0 / bf16
    prefill_pct = 100.0 * 600.0 / bf16
    models = [("flash", 64, 512, "hbm", flash_pct, ">= 85% of HBM roofline (ANCHORS §4)"),
              ("pro", 128, 1024, "bf16", pro_pct, ">= 450 TFLOP/s (ANCHORS §4)")]
    # CSA decode
    batches = ctx.pick(full=(1, 8, 64, 128), quick=(1, 64), cpu=(1,))
    csa_ctx = ctx.pick(full=32768, quick=32768, cpu=256)
    for name, H, topk, bound, pct, note in models:
        H_, topk_ = (16, 16) if ctx.cpu else (H, topk)
        for B in batches:
            _bench_decode(ctx, name, "csa", H_, topk_, csa_ctx, B, gen, bound, pct, note, with_ref=B <= 8)
    # HCA decode
    hca_ctx = ctx.pick(full=(65536, 262144, 1048576), quick=(65536, 1048576), cpu=(512,))
    for name, H, topk, bound, pct, note in models:
        H_ = 16 if ctx.cpu else H
        for c in hca_ctx:
            for B in ctx.pick(full=(1, 64), quick=(1, 64), cpu=(1,)):
                tgt, nt = (80.0, ">= 80% of HBM roofline at batch 1 (ANCHORS §4)") if (B == 1 and name == "flash") \
                    else (pct, note)
                _bench_decode(ctx, name, "hca", H_, 0, c, B, gen, "hbm" if B == 1 or name == "flash" else bound,
                              tgt, nt, with_ref=(B == 1 and c <= 65536))
    # SWA-only decode
    for B in ctx.pick(full=(1, 64), quick=(64,), cpu=(1,)):
        _bench_decode(ctx, "flash", "swa", 16 if ctx.cpu else 64, 0, ctx.pick(full=8192, quick=8192, cpu=256), B,
                      gen, "hbm", flash_pct, ">= 85% of HBM roofline", with_ref=B == 1)
    # prefill
    pre = ctx.pick(full=((8192, 2048), (32768, 4096), (65536, 4096)), quick=((32768, 4096),), cpu=((256, 4),))
    for name, H, topk, _, _, _ in models:
        H_, topk_ = (16, 16) if ctx.cpu else (H, topk)
        for c, T in pre:
            for kind in ("csa", "hca"):
                _bench_prefill(ctx, name, kind, H_, topk_, c, T, gen, prefill_pct,
                               ">= 600 TFLOP/s reading the FP8 cache directly (ANCHORS §4)")
