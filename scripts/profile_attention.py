"""Profile the attention decode kernels at one benchmark shape (for ncu / nsys, or plain timings).

    python scripts/profile_attention.py --kind csa --heads 64 --topk 512 --ctx 32768 --batch 64 --backend cuda
    ncu --set full -k regex:sparse_attn_fwd -c 1 python scripts/profile_attention.py ... --once

Without --once it prints the median time of the whole op (CUDA graph of 20 calls) for each backend given.
The case is the benchmark's (bench/bench_attention.py: random valid FP8 rows, 256-slot window ring, random
top-k rows); one case, so repeated calls see a warm L2 for the smaller shapes."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.bench_attention import PAGE, _make_case  # noqa: E402
import v4kernels.ops.attention as A  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="csa")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backend", default="cuda,triton")
    ap.add_argument("--splits", type=int, default=None, help="force the split-KV factor (default: the plan's)")
    ap.add_argument("--once", action="store_true", help="one warm-up call and one profiled call per backend")
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    case = _make_case(a.kind, a.heads, a.topk, a.ctx, a.batch, 1, "cuda", g)
    cap = case.get("compressed_block_table", case["window_block_table"]).shape[1] * PAGE
    plan = A.attention_plan(case["seq_lens"], a.heads, s_q=1, csa_topk=a.topk, hca_capacity=cap)
    out = torch.empty(a.batch, 1, a.heads, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(a.batch, 1, a.heads, dtype=torch.float32, device="cuda")
    for be in a.backend.split(","):
        def fn():
            A.sparse_attn_decode(**case, plan=plan, out=out, lse_out=lse, backend=be, num_splits=a.splits)
        fn()
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
            for _ in range(20):
                fn()
        times = []
        for _ in range(10):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            graph.replay()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) * 1000 / 20)
        times.sort()
        splits = a.splits if a.splits is not None else plan.num_splits[a.kind]
        print(f"{be}: {a.kind} H={a.heads} topk={a.topk} ctx={a.ctx} B={a.batch} splits={splits} "
              f"median {times[len(times) // 2]:.2f} us per call", flush=True)


if __name__ == "__main__":
    main()
