"""Where a model_ref decode step spends its time (GPU): the bench_model layer slice (Flash
dimensions, layers CSA / HCA / SWA, 256 experts, full vocabulary), one sequence after a synthetic
history, kernel path (backend auto).

    python scripts/profile_model_decode.py [--contexts 4096,65536] [--steps 5] [--out DIR]

Prints, per context: the step's wall time; model_ref's own per-family timer (it synchronizes around
each region, so its sum exceeds the unsynchronized step); and a torch.profiler table of two steps:
kernel launches per step, GPU busy time vs wall time (a step far longer than its GPU time is bound by
the host: Python, launch overhead, syncs), the top CUDA kernels and the top host-side ops.
With --out, the same text goes to DIR/profile_model_decode.txt.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import bench_model as BM  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,65536")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_model_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    from v4kernels.model_ref.weights import init_weights

    buf = io.StringIO()

    def say(*a):
        print(*a)
        print(*a, file=buf)

    dev = torch.device("cuda")
    cfg = BM.slice_config(False)
    gen = torch.Generator().manual_seed(7)
    w = init_weights(cfg, seed=0, device=dev)
    say(f"{cfg.name}: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for C in (int(c) for c in args.contexts.split(",")):
        m = BM._model(cfg, w, dev, None, C)
        m.new_sequence(0)
        BM._fill_history(m, 0, C, gen)
        tok = BM._tokens(cfg, 1, gen)
        for _ in range(3):  # warm-up: Triton compilation, allocator
            m.decode([0], tok)
        walls = [BM._wall(lambda: m.decode([0], tok), dev) for _ in range(args.steps)]
        say(f"\n=== context {C}: decode step {statistics.median(walls) * 1e3:.2f} ms (median of {args.steps})")
        m.timer.enabled = True
        m.timer.totals.clear()
        for _ in range(args.steps):
            m.decode([0], tok)
        m.timer.enabled = False
        tot = sum(m.timer.totals.values())
        say(f"model_ref timer (synchronized regions, ms per step; sum {tot * 1e3 / args.steps:.2f}):")
        for k, v in sorted(m.timer.totals.items(), key=lambda kv: -kv[1]):
            say(f"  {k:20s} {v * 1e3 / args.steps:8.2f}")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(2):
                m.decode([0], tok)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 2
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_us = sum(e.self_device_time_total for e in kernels) / 2
        launches = sum(e.count for e in kernels) / 2
        say(f"profiled: wall {wall * 1e3:.2f} ms/step, GPU kernel time {gpu_us / 1e3:.2f} ms/step, "
            f"{launches:.0f} kernels/step")
        say(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
        say(events.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))
        m.release(0)
        del m
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_model_decode.txt"), "w") as f:
            f.write(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
