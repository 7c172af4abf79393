"""GPU probe of the indexer kernels (development tool, not collected by pytest): correctness at V4 shapes
against the float32 reference, then timings of the bench shapes with the bench harness's timer.

    PYTHONPATH=python:. python3 tests/indexer/_gpu_probe.py [check] [time] [prep] [big]
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _idx_cases import make_case  # noqa: E402

from v4kernels.reference import indexer as ref  # noqa: E402
from v4kernels.testing import make_generator  # noqa: E402
from v4kernels.triton import indexer as tri  # noqa: E402

H = 64
PAGE = 64


def _check(name, case, topk, **kw):
    t = time.time()
    want = ref.indexer_topk(*case.args(topk))
    got = tri.indexer_topk(*case.args(topk), **kw)
    torch.cuda.synchronize()
    bad = [n for n, g, w in zip(("idx", "len", "rows"), got, want) if not torch.equal(g, w)]
    msg = "ok" if not bad else f"MISMATCH {bad}"
    if bad:
        g, w = got[0], want[0]
        rows = (g != w).any(dim=1).nonzero().flatten()[:3].tolist()
        for r in rows:
            d = (g[r] != w[r]).nonzero().flatten()[:5].tolist()
            msg += f"\n   row {r} slots {d}: got {g[r, d].tolist()} want {w[r, d].tolist()}"
            sg, sw_ = set(g[r].tolist()), set(w[r].tolist())
            msg += f" | set diff {len(sg ^ sw_)}"
    print(f"{name:55s} {msg}  ({time.time() - t:.1f}s)", flush=True)


def _check_random(name, case, topk, **kw):
    """Real FP4 data: selected set must be the reference's up to score ties within a tolerance."""
    lg = ref.indexer_logits(*case.args())
    want = ref.indexer_topk(*case.args(topk))
    got = tri.indexer_topk(*case.args(topk), **kw)
    ok = torch.equal(got[1], want[1])
    worst = 0.0
    for i in range(got[0].shape[0]):
        n = int(want[1][i])
        if n == 0:
            continue
        s = lg[i]
        kth = s[want[0][i, n - 1].long()]
        sel = got[0][i, :n].long()
        scale = s[torch.isfinite(s)].abs().max()
        # every selected score >= the k-th reference score (minus tolerance), and no duplicates
        worst = max(worst, float((kth - s[sel]).max() / scale))
        ok &= sel.unique().numel() == n
    print(f"{name:55s} {'ok' if ok and worst < 1e-3 else 'BAD'} worst rel shortfall {worst:.2e}", flush=True)


def check():
    g = make_generator("gpu-probe")
    for fmt in ("idx_fp4", "idx_fp8"):
        _check(f"decode B=1 n=16384 k512 {fmt}",
               make_case(g, [16384], [1], page_size=64, heads=64, fmt=fmt, device="cuda"),
               512)
    _check("decode B=3 n=40000 k512 (kv rows)", make_case(g, [40000, 33000, 5], [1, 1, 1], page_size=64, heads=64)
           .to("cuda"), 512)
    _check("decode B=1 n=262144 k512", make_case(g, [262144], [1], page_size=64, heads=64, device="cuda"), 512)
    _check("decode B=1 n=262144 k1024", make_case(g, [262144], [1], page_size=64, heads=64, device="cuda"), 1024)
    _check("decode B=64 n=16384 k512", make_case(g, [16384] * 64, [1] * 64, page_size=64, heads=64, device="cuda"), 512)
    _check("decode B=16 n=65536 k512 (one chunk list)", make_case(g, [65536] * 16, [1] * 16, page_size=64, heads=64)
           .to("cuda"), 512)
    _check("decode B=2 n=9000 page16 k512",
           make_case(g, [9000, 8000], [1, 1], page_size=16, heads=64, device="cuda"), 512)
    _check("decode B=2 n=9000 k2048", make_case(g, [9000, 8000], [1, 1], page_size=64, heads=64, device="cuda"), 2048)
    _check("decode B=2 H=128 k1024", make_case(g, [20000, 9000], [1, 1], page_size=64, heads=128, device="cuda"), 1024)
    pos = list(range(4 * 3000 - 300, 4 * 3000))
    _check("prefill T=300 n=3000 k512", make_case(g, [3000], [300], page_size=64, heads=64, positions=[pos])
           .to("cuda"), 512)
    pos = list(range(0, 4 * 3000, 7))
    _check("prefill ragged k1024", make_case(g, [3000, 900], [len(pos), 300], page_size=64, heads=64,
                                             positions=[pos, list(range(3300, 3600))], device="cuda"), 1024)
    _check("rescan forced (list 32)", make_case(g, [30000], [1], page_size=64, heads=64, device="cuda"), 512,
           chunk=2048, list_len=32)
    _check_random("random FP4 decode B=4 n=50000", make_case(g, [50000] * 4, [1] * 4, page_size=64, heads=64,
                                                             exact=False, device="cuda"), 512)
    _check_random("random FP4 prefill T=256 n=4000", make_case(g, [4000], [256], page_size=64, heads=64,
                                                               exact=False, device="cuda"), 512)
    # logits (bf16 MMA, exact)
    case = make_case(g, [3000, 500], [2, 1], page_size=64, heads=64, exact=False, device="cuda")
    w = ref.indexer_logits(*case.args())
    lg = tri.indexer_logits(*case.args())
    f = torch.isfinite(w)
    print(f"{'logits vs reference':55s} max abs err {float((lg[f] - w[f]).abs().max()):.2e} "
          f"finite-equal {torch.equal(f, torch.isfinite(lg))}", flush=True)


def _timing_ctx():
    from bench.harness import BenchContext

    return BenchContext(device="cuda", quick=True)


def _cache(n, batch, gen):
    from v4kernels import formats

    pages = -(-n // PAGE)
    num_pages = batch * pages
    pb = formats.IDX_FP4.page_bytes(PAGE)
    cache = torch.randint(0, 256, (num_pages, pb), dtype=torch.uint8, device="cuda", generator=gen)
    cache[:, PAGE * 64: PAGE * 68] = torch.randint(122, 130, (num_pages, PAGE * 4), dtype=torch.uint8,
                                                   device="cuda", generator=gen)
    bt = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32).view(batch, pages)
    return cache, bt


def _queries(T, gen):
    from v4kernels.reference.quant import fake_quant_fp4

    q = fake_quant_fp4(torch.randn(T, H, 128, device="cuda", generator=gen), 32)
    w = (torch.randn(T, H, device="cuda", generator=gen) * 0.05).bfloat16()
    return q, w


def timing(big=False):
    ctx = _timing_ctx()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1)
    rows = []
    cases = [(65536, 1, 512), (65536, 32, 512), (65536, 128, 512), (1048576, 1, 512), (1048576, 32, 512),
             (1048576, 1, 1024)]
    if big:
        cases += [(1048576, 128, 512), (262144, 8, 512), (262144, 64, 512)]
    for C, B, topk in cases:
        n = C // 4
        nbytes = B * n * 68 + B * H * 130 * 2 + B * topk * 8
        pos = torch.full((B,), 4 * n - 1, dtype=torch.int64, device="cuda")
        seq = torch.arange(B, dtype=torch.int32, device="cuda")

        def factory():
            cache, bt = _cache(n, B, gen)
            q, w = _queries(B, gen)
            return (q, w, cache, bt, seq, pos)

        sets = ctx.make_arg_sets(factory, bytes_per_set=nbytes, max_sets=16)
        pl = tri.plan_topk(B, H, n, topk, torch.device("cuda"))
        for be in ("fused", "logits"):
            if be == "fused":
                fn = lambda q, w, c, bt, s, p: tri.indexer_topk(q, w, c, bt, s, p, topk, PAGE, n)  # noqa: E731
            else:
                fn = lambda q, w, c, bt, s, p: tri.indexer_logits(q, w, c, bt, s, p, PAGE, n)  # noqa: E731
            t = ctx.time(fn, arg_sets=sets, graph=True)
            gbs = nbytes / t / 1e3
            print(f"decode C={C:8d} B={B:4d} k={topk:5d} {be:7s} {t:9.1f} us  {gbs:7.0f} GB/s "
                  f"{100 * gbs / 2960:5.1f}%  plan: splits={pl['splits']} chunk={pl['chunk']} M={pl['M']}", flush=True)
        del sets
    for Q, C in ((4096, 32768),):
        n = C // 4
        pos = torch.arange(C - Q, C, dtype=torch.int64, device="cuda")
        seq = torch.zeros(Q, dtype=torch.int32, device="cuda")
        visible = int(((pos + 1) // 4).clamp(max=n).sum())
        flops = 2 * H * 128 * visible

        def factory():
            cache, bt = _cache(n, 1, gen)
            q, w = _queries(Q, gen)
            return (q, w, cache, bt, seq, pos)

        sets = ctx.make_arg_sets(factory, bytes_per_set=Q * H * 256, max_sets=4)
        for be in ("fused", "logits"):
            if be == "fused":
                fn = lambda q, w, c, bt, s, p: tri.indexer_topk(q, w, c, bt, s, p, 512, PAGE, n)  # noqa: E731
            else:
                fn = lambda q, w, c, bt, s, p: tri.indexer_logits(q, w, c, bt, s, p, PAGE, n)  # noqa: E731
            t = ctx.time(fn, arg_sets=sets, graph=False)
            print(f"prefill Q={Q} C={C} {be:7s} {t:9.1f} us  {flops / t / 1e6:7.1f} TFLOP/s "
                  f"{100 * flops / t / 1e6 / 1420:5.1f}% of fp8", flush=True)
        del sets


def prep():
    from v4kernels.reference.rope import YarnConfig, rope_table

    ctx = _timing_ctx()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(2)
    cos, sin = rope_table(65536, 160000.0, YarnConfig())
    cos, sin = cos.cuda(), sin.cuda()
    for T in (128, 4096):
        nbytes = 2 * T * H * 128 * 2 + T * 8
        sets = ctx.make_arg_sets(lambda: (torch.randn(T, H, 128, device="cuda", generator=gen).bfloat16(),
                                          torch.randint(0, 65536, (T,), device="cuda", generator=gen)),
                                 bytes_per_set=nbytes)
        x, p = sets[0]
        ok = torch.equal(tri.indexer_prepare_q(x, p, cos, sin), ref.indexer_prepare_q(x, p, cos, sin))
        t = ctx.time(lambda x, p: tri.indexer_prepare_q(x, p, cos, sin), arg_sets=sets, graph=True)
        print(f"prepare_q T={T:5d} {t:8.2f} us {nbytes / t / 1e3:7.0f} GB/s {100 * nbytes / t / 1e3 / 2960:5.1f}%"
              f"  bitwise {'ok' if ok else 'MISMATCH'}", flush=True)


if __name__ == "__main__":
    what = sys.argv[1:] or ["check", "time", "prep"]
    print(torch.cuda.get_device_name(), flush=True)
    if "prep" in what:
        prep()
    if "check" in what:
        check()
    if "time" in what:
        timing(big="big" in what)
