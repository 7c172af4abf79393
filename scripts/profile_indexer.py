"""Indexer top-k on the GPU: a quick correctness smoke, then timings at benchmark decode shapes (or one for ncu).

    python scripts/profile_indexer.py --smoke                      # CUDA vs reference on small exact cases
    python scripts/profile_indexer.py --ctx 1048576 --batch 1,64 --backend cuda,triton [--chunk 2048]
    ncu --set full -k regex:indexer_topk_fp4 -c 1 python scripts/profile_indexer.py --ctx 262144 --batch 64 --once

Timings: median of 10 replays of a CUDA graph of 10 calls, per backend, on the benchmark's case
(bench/bench_indexer.py: random FP4 codes, scale bytes 122..129, shuffled pages of 64); the CUDA rows also
say how many of the Triton backend's indices they share (the two differ only on near-ties). Run the smoke
under `timeout` (a pipeline hang shows up as one)."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "indexer"))

import v4kernels.ops.indexer as ops  # noqa: E402


def smoke():
    from _idx_cases import make_case
    from v4kernels.cuda import indexer as cu
    from v4kernels.reference import indexer as ref
    from v4kernels.testing import make_generator

    for lens, ps, H, topk, chunk in [([300], 64, 64, 16, None), ([700, 90], 16, 16, 40, 64),
                                     ([2000], 8, 128, 300, 256), ([5000, 1], 96, 64, 512, None)]:
        case = make_case(make_generator("smoke"), lens, [2] * len(lens), page_size=ps, heads=H)
        want = ref.indexer_topk(*case.args(topk))
        got = cu.indexer_topk(*case.to("cuda").args(topk), chunk=chunk)
        torch.cuda.synchronize()
        same = [torch.equal(g.cpu(), w) for g, w in zip(got, want)]
        bad = (got[0].cpu() != want[0]).sum().item()
        print(f"smoke lens={lens} page={ps} heads={H} topk={topk} chunk={chunk}: equal={same} "
              f"differing idx={bad}", flush=True)
    # a binding check fails: a Python exception, not a crash
    try:
        c = case.to("cuda")
        lists = torch.empty((c.q.shape[0], 64, 16), dtype=torch.int64, device="cuda")
        torch.ops.v4kernels_C.indexer_topk_fp4(c.q, c.weights, c.cache, c.block_table, c.seq_ids, c.positions, 6,
                                               c.n_entries, 64, lists)
        print("bad page_size: no error raised", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"bad page_size: {type(exc).__name__}: {str(exc)[:120]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ctx", type=int, default=1048576)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--backend", default="cuda,triton")
    ap.add_argument("--chunk", type=int, default=None, help="CUDA entries per CTA (default: the plan's)")
    ap.add_argument("--once", action="store_true", help="one warm-up call and one profiled call per backend")
    a = ap.parse_args()
    if a.smoke:
        smoke()
        return
    from bench.bench_indexer import PAGE, _cache, _queries
    from v4kernels.cuda import indexer as cu

    class Ctx:
        device = torch.device("cuda")

    g = torch.Generator(device="cuda").manual_seed(0)
    n = a.ctx // 4
    for B in [int(b) for b in a.batch.split(",")]:
        cache, bt = _cache(Ctx, B, n, g)
        q, w = _queries(Ctx, B, g, a.heads)
        pos = torch.full((B,), 4 * n - 1, dtype=torch.int64, device="cuda")
        seq = torch.arange(B, dtype=torch.int32, device="cuda")
        args = (q, w, cache, bt, seq, pos, a.topk, PAGE, n)
        outs = {}
        bes = a.backend.split(",")
        if "cuda" in bes:
            bes.insert(bes.index("cuda") + 1, "cuda-kernel")  # the scoring kernel alone (the rest: the merge)
        for be in bes:
            if be == "cuda":
                def fn():
                    return cu.indexer_topk(*args, chunk=a.chunk)
            elif be == "cuda-kernel":
                pl = cu.plan(B, a.heads, n, a.topk, PAGE, torch.cuda.get_device_properties(0).multi_processor_count,
                             a.chunk)
                lists = torch.empty((B, pl["splits"], pl["M"]), dtype=torch.int64, device="cuda")
                ws = torch.empty((B, n), dtype=torch.int32, device="cuda") if pl["ws"] else None

                def fn(pl=pl, lists=lists, ws=ws):
                    torch.ops.v4kernels_C.indexer_topk_fp4(q, w, cache, bt, seq, pos, PAGE, n, pl["chunk"], lists, ws)
                    return None
            else:
                def fn(be=be):
                    return ops.indexer_topk(*args, backend=be)
            out = fn()
            if out is not None:
                outs[be] = out
            torch.cuda.synchronize()
            if a.once:
                fn()
                torch.cuda.synchronize()
                continue
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(10):
                    fn()
            times = []
            for _ in range(10):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                graph.replay()
                e1.record()
                torch.cuda.synchronize()
                times.append(e0.elapsed_time(e1) * 100.0)  # us per call
            us = sorted(times)[len(times) // 2]
            gbs = B * n * 68 / us / 1e3
            extra = ""
            if be == "cuda":
                pl = cu.plan(B, a.heads, n, a.topk, PAGE, torch.cuda.get_device_properties(0).multi_processor_count,
                             a.chunk)
                extra = f" chunk={pl['chunk']} splits={pl['splits']} M={pl['M']}"
            print(f"ctx={a.ctx} batch={B} heads={a.heads} topk={a.topk} {be}: {us:.1f} us, {gbs:.0f} GB/s of keys"
                  f"{extra}", flush=True)
        if "cuda" in outs and "triton" in outs:
            i_c, i_t = outs["cuda"][0], outs["triton"][0]
            shared = sum(len(set(i_c[r].tolist()) & set(i_t[r].tolist())) for r in range(B)) / (B * a.topk)
            print(f"  cuda vs triton: lengths equal {torch.equal(outs['cuda'][1], outs['triton'][1])}, "
                  f"shared indices {shared:.4f}", flush=True)


if __name__ == "__main__":
    main()
