"""Where the MXFP4 decode GEMMs lose bandwidth (GPU): kernels and copies of the same bytes, timed side by side.

    python scripts/profile_moe_decode.py [--out DIR] [--models flash,pro] [--m 1,4,16] [--experts 64,6]
    python scripts/profile_moe_decode.py --once [--backend cuda] [--gemm w13|w2]   (for ncu)

Per (model, active experts, GEMM, tokens per expert m): the minimum bytes (packed weights + e8m0 scales of the active
experts, activations, output), and for each variant the median time of CUDA-graph replays of 20 calls
(L2 not flushed: at these sizes, 137-1000 MB of weights, L2 holds nothing useful between calls) and the
% of the measured device-copy bandwidth. Variants: the ``cuda`` and ``triton`` W4A8 ops as shipped,
and ``copy``: a device-to-device copy of the weight bytes (read + write counted, as the HBM ceiling of
the benchmarks) -- the best a streaming kernel can hope for. Each kernel output is checked against
the other backend (same numerics) before timing.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

MODELS = {"flash": dict(d=4096, inter=2048), "pro": dict(d=7168, inter=3072)}


def _graph_time_us(fn, calls: int = 20, reps: int = 15) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    times.sort()
    return times[len(times) // 2]


def _copy_gbps() -> float:
    x = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")  # as bench/harness.py
    y = torch.empty_like(x)
    t = _graph_time_us(lambda: y.copy_(x), calls=5, reps=7)
    return 2 * x.numel() / t / 1e3


def _case(model, gemm, m, n_exp, gen):
    from v4kernels.ops.quant import act_quant_fp8

    d, inter = MODELS[model]["d"], MODELS[model]["inter"]
    N, K, nw = (inter, d, 2) if gemm == "w13" else (d, inter, 1)
    M = m * n_exp
    ws = [torch.randint(0, 256, (n_exp, N, K // 2), device="cuda", dtype=torch.uint8, generator=gen)
          for _ in range(nw)]
    ss = [torch.randint(119, 124, (n_exp, N, K // 32), device="cuda", dtype=torch.uint8, generator=gen)
          for _ in range(nw)]
    off = torch.arange(0, M + 1, m, device="cuda", dtype=torch.int32)
    a = (torch.randn(M, K, device="cuda", generator=gen) * 0.5).bfloat16()
    q, sq = act_quant_fp8(a, 128)
    rw = torch.rand(M, device="cuda", generator=gen)
    wbytes = nw * n_exp * N * (K // 2 + K // 32)
    nbytes = wbytes + M * K * (1 + 1 / 128) + 2 * M * N
    return dict(N=N, K=K, nw=nw, M=M, ws=ws, ss=ss, off=off, q=q, sq=sq, rw=rw, wbytes=wbytes, nbytes=nbytes)


def _op(c, gemm, backend):
    from v4kernels.ops import moe as ops

    if gemm == "w13":
        return lambda: ops.moe_grouped_swiglu_mxfp4(c["q"], c["sq"], c["ws"][0], c["ss"][0], c["ws"][1], c["ss"][1],
                                                    c["off"], None, c["rw"], "w4a8", 10.0, backend=backend)
    return lambda: ops.moe_grouped_gemm_mxfp4(c["q"], c["sq"], c["ws"][0], c["ss"][0], c["off"], None, "w4a8",
                                              backend=backend)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="flash,pro")
    ap.add_argument("--m", default="1,4,16")
    ap.add_argument("--experts", default="64,6",
                    help="active experts (6: one token of decode batch 1; the kernel then takes 16-column slots)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--once", action="store_true", help="one call of each GEMM of the first model and m (for ncu)")
    ap.add_argument("--backend", default="cuda", choices=("cuda", "triton"))
    ap.add_argument("--widths", action="store_true", help="also time every slot width of the CUDA kernel")
    args = ap.parse_args()
    import v4kernels.ops.moe  # noqa: F401  (registers the ops, loads v4kernels._C)

    gen = torch.Generator(device="cuda")
    gen.manual_seed(7)
    models = args.models.split(",")
    ms = [int(x) for x in args.m.split(",")]
    if args.once:
        for gemm in ("w13", "w2"):
            c = _case(models[0], gemm, ms[0], int(args.experts.split(",")[0]), gen)
            _op(c, gemm, args.backend)()
        torch.cuda.synchronize()
        return 0

    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    copy = _copy_gbps()
    say(f"# {torch.cuda.get_device_name(0)}; device copy {copy:,.0f} GB/s (read + write)")
    say("| model | experts | gemm | m | rows | weight MB | variant | time (us) | GB/s (min bytes) | % of copy | "
        "max |diff| vs triton |")
    say("|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|")
    cases = [(model, n_exp, m) for n_exp in (int(x) for x in args.experts.split(",")) for model in models
             for m in (ms if n_exp > 8 else ms[:1])]
    for model, n_exp, m in cases:
        for gemm in ("w13", "w2"):
            c = _case(model, gemm, m, n_exp, gen)
            ref = _op(c, gemm, "triton")().float()
            wflat = torch.cat([w.reshape(-1) for w in c["ws"]] + [s.reshape(-1) for s in c["ss"]])
            wcopy = torch.empty_like(wflat)
            variants = {"cuda": _op(c, gemm, "cuda"), "triton": _op(c, gemm, "triton"),
                        "copy": lambda: wcopy.copy_(wflat)}
            if args.widths:  # the slot widths of the CUDA kernel side by side (V4K_MOE_DECODE_BN)
                for bn in (48, 64):
                    variants[f"cuda_bn{bn}"] = variants["cuda"]
            for name, fn in variants.items():
                diff = "-"
                os.environ.pop("V4K_MOE_DECODE_BN", None)
                if name.startswith("cuda_bn"):
                    os.environ["V4K_MOE_DECODE_BN"] = name[len("cuda_bn"):]
                if name != "copy":
                    out = fn().float()
                    diff = f"{(out - ref).abs().max().item():.3g}"
                t = _graph_time_us(fn)
                os.environ.pop("V4K_MOE_DECODE_BN", None)
                nbytes = 2 * wflat.numel() if name == "copy" else c["nbytes"]
                gbps = nbytes / t / 1e3
                say(f"| {model} | {n_exp} | {gemm} | {m} | {c['M']} | {c['wbytes'] / 1e6:.0f} | {name} | {t:.1f} | "
                    f"{gbps:,.0f} | {100 * gbps / copy:.1f} | {diff} |")
            del c, wflat, wcopy
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_moe_decode.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
