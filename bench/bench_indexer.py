"""Benchmark of the lightning indexer (spec §4): fused scores + top-k over the paged FP4 key cache.

Decode: one query token per sequence at context C (C/4 compressed entries, all visible), 64 heads,
top-k 512 (Flash) / 1024 (Pro: 128 heads, full runs). Memory-bound on the keys: minimum bytes = 68 B
per visible key + q (64x128 bf16) + weights + indices. Backends: "cuda" (the sm_90a scoring + chunk
top-k kernel, then the Triton merge), "triton" (fused, FP8 MMA; logits never in HBM), "triton_bf16mma" (the same kernel with exact bf16 products, full runs), "unfused_topk"
(Triton ``indexer_logits`` to HBM, then ``torch.topk``) and "reference" (float32 eager, small
contexts only). The shape dict records the Triton kernel's plan (programs per query, list length).

Prefill: Q query tokens at the end of a context C (positions C-Q .. C-1, ragged-free single sequence),
FLOP = 2*64*128 per (query, visible key); bound fp8 (target 60% of the FP8 ceiling).
"""
from __future__ import annotations

import torch

FAMILY = "indexer"
H = 64
PAGE = 64
ROW = 68  # IDX_FP4 bytes per key


def _cache(ctx, batch, n_entries, gen):
    """A random FP4 key cache (valid codes, scale bytes near 127) and a shuffled block table."""
    from v4kernels import formats

    dev = ctx.device
    pages_per_seq = -(-n_entries // PAGE)
    num_pages = batch * pages_per_seq
    pb = formats.IDX_FP4.page_bytes(PAGE)
    cache = torch.randint(0, 256, (num_pages, pb), dtype=torch.uint8, device=dev, generator=gen)
    scales = cache[:, PAGE * 64: PAGE * 68]
    scales.copy_(torch.randint(122, 130, scales.shape, dtype=torch.uint8, device=dev, generator=gen))
    bt = torch.randperm(num_pages, device=dev, generator=gen).to(torch.int32).view(batch, pages_per_seq)
    return cache, bt


def _queries(ctx, T, gen, heads=H):
    from v4kernels.reference.quant import fake_quant_fp4

    q = fake_quant_fp4(torch.randn(T, heads, 128, device=ctx.device, generator=gen), 32)
    w = (torch.randn(T, heads, device=ctx.device, generator=gen) * 0.05).bfloat16()
    return q, w


def _plan(ctx, T, heads, n, topk):
    """The fused kernel's work split (recorded with the shape; empty on a CPU run)."""
    if ctx.cpu:
        return {}
    from v4kernels.triton import indexer as tri

    p = tri.plan_topk(T, heads, n, topk, ctx.device)
    return {"programs_per_query": p["splits"], "list_len": p["M"]}


def _decode(ctx, gen, topk):
    import v4kernels.ops.indexer as ops
    from v4kernels.testing import kernel_backends
    from v4kernels.triton import indexer as tri

    heads = H if topk <= 512 else 2 * H  # Flash: 64 heads, top-k 512; Pro: 128 heads, top-k 1024
    contexts = ctx.pick(full=(65536, 262144, 1048576), quick=(65536, 1048576), cpu=(4096,))
    batches = ctx.pick(full=(1, 8, 32, 64, 128), quick=(1, 32, 128), cpu=(1, 2))
    backends = ["triton", "unfused_topk"] if not ctx.cpu else []
    if not ctx.cpu and not ctx.quick:
        backends.insert(1, "triton_bf16mma")
    if not ctx.cpu and "cuda" in kernel_backends("indexer_topk"):
        backends.insert(0, "cuda")
    for C in contexts:
        n = C // 4
        for B in batches:
            shape = {"phase": "decode", "context": C, "entries": n, "batch": B, "heads": heads, "topk": topk}
            shape.update(_plan(ctx, B, heads, n, topk))
            key_bytes = B * n * ROW
            nbytes = key_bytes + B * heads * 128 * 2 + B * heads * 2 + B * topk * 4 * 2
            flops = 2 * heads * 128 * n * B
            pos = torch.full((B,), 4 * n - 1, dtype=torch.int64, device=ctx.device)
            seq = torch.arange(B, dtype=torch.int32, device=ctx.device)

            def factory():
                cache, bt = _cache(ctx, B, n, gen)
                q, w = _queries(ctx, B, gen, heads)
                return (q, w, cache, bt, seq, pos)

            try:
                sets = ctx.make_arg_sets(factory, bytes_per_set=nbytes, max_sets=16)
            except Exception as exc:  # out of memory at the largest shapes
                ctx.record_failure(FAMILY, "indexer_topk", "triton", shape, exc)
                continue
            cands = []
            for be in backends:
                if be == "unfused_topk":
                    def fn(q, w, cache, bt, s, p, n=n):
                        lg = ops.indexer_logits(q, w, cache, bt, s, p, PAGE, n, backend="triton")
                        return torch.topk(lg, min(topk, n), dim=1)
                elif be == "triton_bf16mma":
                    def fn(q, w, cache, bt, s, p, n=n):
                        return tri.indexer_topk(q, w, cache, bt, s, p, topk, PAGE, n, mma="bf16")
                else:
                    def fn(q, w, cache, bt, s, p, n=n, be=be):
                        return ops.indexer_topk(q, w, cache, bt, s, p, topk, PAGE, n, backend=be)
                cands.append((be, fn))
            if n * B <= 16384 * 8 or ctx.cpu:
                cands.append(("reference", lambda q, w, cache, bt, s, p, n=n: ops.indexer_topk(
                    q, w, cache, bt, s, p, topk, PAGE, n, backend="reference")))
            ref_out = None
            for be, fn in cands:
                try:
                    note = ""
                    if be in ("triton", "cuda") and n * B <= 16384 * 8:
                        ref_out = ops.indexer_topk(*sets[0][:6], topk, PAGE, n, backend="reference")
                        got = fn(*sets[0])
                        if not torch.equal(got[1], ref_out[1]):
                            note = "LENGTHS DIFFER FROM THE REFERENCE"
                    t = ctx.time(fn, arg_sets=sets, graph=be != "reference")
                    ctx.record(FAMILY, "indexer_topk", be, shape, t, flops=flops, bytes=nbytes, bound="hbm",
                               target_pct=85 if be in ("triton", "cuda") else None,
                               target_note=">= 85% of HBM bandwidth on the 68-B FP4 keys", note=note)
                except Exception as exc:
                    ctx.record_failure(FAMILY, "indexer_topk", be, shape, exc)
            del sets, ref_out


def _prefill(ctx, gen, topk):
    import v4kernels.ops.indexer as ops
    from v4kernels.testing import kernel_backends

    cases = ctx.pick(full=((4096, 16384), (4096, 65536)), quick=((4096, 32768),), cpu=((32, 512),))
    for Q, C in cases:
        n = C // 4
        shape = {"phase": "prefill", "queries": Q, "context": C, "entries": n, "heads": H, "topk": topk}
        shape.update(_plan(ctx, Q, H, n, topk))
        pos = torch.arange(C - Q, C, dtype=torch.int64, device=ctx.device)
        seq = torch.zeros(Q, dtype=torch.int32, device=ctx.device)
        visible = int(((pos + 1) // 4).clamp(max=n).sum())
        flops = 2 * H * 128 * visible
        nbytes = n * ROW + Q * H * 128 * 2 + Q * H * 2 + Q * topk * 8

        def factory():
            cache, bt = _cache(ctx, 1, n, gen)
            q, w = _queries(ctx, Q, gen)
            return (q, w, cache, bt, seq, pos)

        sets = ctx.make_arg_sets(factory, bytes_per_set=nbytes, max_sets=4)
        cands = [] if ctx.cpu else [
            (be, lambda q, w, c, bt, s, p, be=be: ops.indexer_topk(q, w, c, bt, s, p, topk, PAGE, n, backend=be))
            for be in kernel_backends("indexer_topk")
        ] + [
            ("unfused_topk", lambda q, w, c, bt, s, p: torch.topk(
                ops.indexer_logits(q, w, c, bt, s, p, PAGE, n, backend="triton"), topk, dim=1)),
        ]
        if ctx.cpu:
            cands.append(("reference", lambda q, w, c, bt, s, p: ops.indexer_topk(
                q, w, c, bt, s, p, topk, PAGE, n, backend="reference")))
        for be, fn in cands:
            try:
                t = ctx.time(fn, arg_sets=sets, graph=False)
                ctx.record(FAMILY, "indexer_topk", be, shape, t, flops=flops, bytes=nbytes, bound="fp8",
                           target_pct=60 if be in ("triton", "cuda") else None,
                           target_note=">= 60% of the FP8 tensor ceiling (FLOP = 2*64*128 per visible pair)")
            except Exception as exc:
                ctx.record_failure(FAMILY, "indexer_topk", be, shape, exc)
        del sets


def _prepare_q(ctx, gen):
    import v4kernels.ops.indexer as ops
    from v4kernels.reference.rope import YarnConfig, rope_table

    cos, sin = rope_table(65536, 160000.0, YarnConfig())
    cos, sin = cos.to(ctx.device), sin.to(ctx.device)
    for T in ctx.pick(full=(1, 128, 4096), quick=(128, 4096), cpu=(4,)):
        shape = {"tokens": T, "heads": H}
        nbytes = 2 * T * H * 128 * 2 + T * 8
        sets = ctx.make_arg_sets(lambda: (torch.randn(T, H, 128, device=ctx.device, generator=gen).bfloat16(),
                                          torch.randint(0, 65536, (T,), device=ctx.device, generator=gen)),
                                 bytes_per_set=nbytes)
        bes = ["reference"] + ([] if ctx.cpu else ["triton"])
        for be in bes:
            try:
                t = ctx.time(lambda x, p, be=be: ops.indexer_prepare_q(x, p, cos, sin, backend=be), arg_sets=sets,
                             graph=be != "reference")
                ctx.record(FAMILY, "indexer_prepare_q", be, shape, t, bytes=nbytes, bound="hbm",
                           target_pct=90 if (be == "triton" and T >= 4096) else None,
                           target_note=">= 90% of HBM bandwidth at 4096 tokens")
            except Exception as exc:
                ctx.record_failure(FAMILY, "indexer_prepare_q", be, shape, exc)


def run(ctx):
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(4321)
    _prepare_q(ctx, gen)
    for topk in ctx.pick(full=(512, 1024), quick=(512,), cpu=(32,)):
        _decode(ctx, gen, topk)
        _prefill(ctx, gen, topk)
