"""Where a model_ref decode step spends its time (GPU): the bench_model layer slice (Flash
dimensions, layers CSA / HCA / SWA, 256 experts, full vocabulary), one sequence after a synthetic
history, kernel path (backend auto).

    python scripts/profile_model_decode.py [--contexts 4096,65536] [--steps 5] [--prefill N] [--out DIR]

Prints, per context: the step's wall time, eager and replayed from a CUDA graph (model_ref/graph.py);
the host synchronizations of one eager step (``torch.cuda.set_sync_debug_mode``: each call site in
v4kernels / model_ref, with its count); model_ref's own per-family timer (it synchronizes around
each region, so its sum exceeds the unsynchronized step); and a torch.profiler table of two steps:
kernel launches per step, GPU busy time vs wall time (a step far longer than its GPU time is bound by
the host: Python, launch overhead, syncs), the top CUDA kernels and the top host-side ops.
With --prefill N, per context also a prefill chunk of N tokens after a history of C - N: its wall
time, the per-family timer and the top CUDA kernels. With --out, the same text goes to
DIR/profile_model_decode.txt.
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


def _sync_sites(fn) -> dict:
    """{innermost v4kernels / model_ref frame of each host synchronization in fn(): count}
    (torch.cuda.set_sync_debug_mode("warn") warns at each; the Python stack is taken in showwarning)."""
    import traceback
    import warnings

    stacks = []
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: stacks.append(traceback.extract_stack())
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sites = {}
    for st in stacks:
        mine = [f for f in st if ("v4kernels" in f.filename or "model_ref" in f.filename)
                and "profile_model_decode" not in f.filename]
        key = f"{mine[-1].filename.split('python/')[-1]}:{mine[-1].lineno} {mine[-1].line}" if mine else "?"
        sites[key] = sites.get(key, 0) + 1
    return sites


def _profile_prefill(m, cfg, C, n, gen, say, profile, ProfilerActivity):
    """One prefill chunk of n tokens after a history of C - n: wall time, per-family timer, top kernels."""
    toks = BM._tokens(cfg, n, gen)

    def once(timed=False, prof=None):
        m.new_sequence(0)
        BM._fill_history(m, 0, C - n, gen)
        torch.cuda.synchronize()
        m.timer.enabled = timed
        t0 = time.perf_counter()
        if prof is None:
            m.prefill([0], [toks])
        else:
            with prof:
                m.prefill([0], [toks])
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        m.timer.enabled = False
        m.release(0)
        return t

    once()  # warm-up (compilation of the prefill shapes)
    t = min(once() for _ in range(2))
    say(f"\n=== context {C}: prefill chunk of {n} tokens {t * 1e3:.2f} ms ({n / t:,.0f} tokens/s)")
    m.timer.totals.clear()
    once(timed=True)
    tot = sum(m.timer.totals.values())
    say(f"model_ref timer (synchronized regions, ms; sum {tot * 1e3:.2f}):")
    for k, v in sorted(m.timer.totals.items(), key=lambda kv: -kv[1]):
        say(f"  {k:20s} {v * 1e3:8.2f}")
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    once(prof=prof)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    say(f"profiled: GPU kernel time {sum(e.self_device_time_total for e in kernels) / 1e3:.2f} ms, "
        f"{sum(e.count for e in kernels):.0f} kernels")
    say(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,65536")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--prefill", type=int, default=0,
                    help="also profile a prefill chunk of this many tokens after the history (0: no)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_model_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    from v4kernels.model_ref.graph import DecodeGraph
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
        sites = _sync_sites(lambda: m.decode([0], tok))
        say(f"host synchronizations in one eager step: {sum(sites.values())}")
        for site, n in sorted(sites.items(), key=lambda kv: -kv[1]):
            say(f"  {n:3d}  {site}")
        g = DecodeGraph(m, [0])
        try:
            g.step(tok)  # eager first step, then capture
            gw = [BM._wall(lambda: g.step(tok), dev) for _ in range(args.steps)]
            say(f"CUDA-graph decode step {statistics.median(gw) * 1e3:.3f} ms (median of {args.steps}; "
                f"{statistics.median(walls) / statistics.median(gw):.1f}x the eager step)")
        except Exception as exc:  # report and go on with the eager profile
            say(f"CUDA-graph decode failed: {type(exc).__name__}: {exc}")
        del g
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
        if args.prefill:
            _profile_prefill(m, cfg, C, args.prefill, gen, say, profile, ProfilerActivity)
        del m
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_model_decode.txt"), "w") as f:
            f.write(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
