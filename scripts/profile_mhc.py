"""Where mhc_pre's streaming kernel loses bandwidth (GPU): variants timed side by side.

    python scripts/profile_mhc.py [--out DIR] [--tokens 1024,8192,65536] [--widths 4096,7168]

Per (d, T): the minimum bytes of mhc_pre (X read once, y written once) and, for each variant, the
median time (triton.testing.do_bench, L2 flushed before each call; at T = 1024 the host launch
time shows, bench/bench_mhc.py times CUDA-graph replays) and the % of a measured device copy.
Variants: the Triton streaming kernel as shipped, other K slices and consumer tiles, the split-K path,
the CUDA kernel when v4kernels._C is built, and
a torch.add of two streams (what a plain elementwise kernel reaches on the same bytes). Each
variant's post/comb are checked against the reference (first 64 tokens) and the shipped kernel.
With --out, the table also goes to DIR/profile_mhc.txt.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from v4kernels.reference import mhc as ref  # noqa: E402
from v4kernels.triton import mhc as tri  # noqa: E402


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # us


TRACE_EVENTS = ("loads issued", "MMA start", "partials stored", "released", "reducer sees cnt1", "pre published",
                "Sinkhorn done", "y has pre", "y done")


def _smoke(dev) -> int:
    """CUDA kernel vs the reference on small shapes (2 and 3 ring stages too); prints and returns 1 on a mismatch."""
    from v4kernels.cuda import mhc as cu
    from v4kernels.testing import kernel_backends

    if "cuda" not in kernel_backends("mhc_pre"):  # also loads v4kernels._C
        print("v4kernels._C not available")
        return 1
    bad = 0
    for T, d in ((300, 64), (130, 4096), (70, 7168), (5, 48)):
        g = torch.Generator(device="cpu").manual_seed(T + d)
        x = torch.randn(T, 4, d, generator=g).to(torch.bfloat16)
        fn = torch.randn(24, 4 * d, generator=g) * (2 / math.sqrt(4 * d))
        base, scale = torch.randn(24, generator=g), torch.randn(3, generator=g)
        want = ref.mhc_pre(x, fn, base, scale)
        for stages in (None, 2, 3):
            got = cu.mhc_pre(x.to(dev), fn.to(dev), base.to(dev), scale.to(dev), stages=stages)
            err = max((a.cpu().float() - b.float()).abs().max().item() for a, b in zip(got[1:], want[1:]))
            yerr = (got[0].cpu().float() - want[0].float()).abs().max().item()
            ok = err <= 2e-5 and yerr <= 2e-2
            bad += not ok
            print(f"T={T} d={d} stages={stages}: post/comb max err {err:.2e}, y {yerr:.2e}" + ("" if ok else "  MISMATCH"))
    torch.cuda.synchronize()
    return 1 if bad else 0


def _trace(args, dev) -> int:
    """CUDA kernel timeline: per tile, globaltimer stamps of CTA 0's steps and of the first token's reducer."""
    from v4kernels.cuda import mhc as cu
    from v4kernels.testing import kernel_backends

    if "cuda" not in kernel_backends("mhc_pre"):
        print("v4kernels._C not available")
        return 1
    for d in (int(v) for v in args.widths.split(",")):
        for T in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(T, 4, d, device=dev).to(torch.bfloat16)
            fn = torch.randn(24, 4 * d, device=dev) * (2 / math.sqrt(4 * d))
            base, scale = torch.randn(24, device=dev), torch.randn(3, device=dev)
            nt = -(-T // cu.TILE)
            ch, nc, _ = cu.plan(d, torch.cuda.get_device_properties(dev).multi_processor_count)
            tr = torch.zeros((nt, len(TRACE_EVENTS) + 2 * nc), dtype=torch.int64, device=dev)
            for _ in range(3):  # warm, then keep the last call's stamps
                cu.mhc_pre(x, fn, base, scale, trace=tr)
            torch.cuda.synchronize()
            t = tr.cpu().double()
            per_cta = t[:, len(TRACE_EVENTS):].view(nt, nc, 2)
            t = t[:, :len(TRACE_EVENTS)]
            t0 = t[0, 0].item()
            steady = t[nt // 4: max(nt // 4 + 1, 3 * nt // 4)]
            rel = (steady - steady[:, :1]) / 1e3
            period = (t[1:, 0] - t[:-1, 0]).median().item() / 1e3 if nt > 1 else float("nan")
            print(f"d={d} T={T}: {nt} tiles, kernel span {(t.max().item() - t0) / 1e3:.1f} us, "
                  f"loads issued every {period:.2f} us (median)")
            print(f"  tile 0 (us from its loads): " + ", ".join(
                f"{n} {(t[0, i].item() - t0) / 1e3:.1f}" for i, n in enumerate(TRACE_EVENTS)))
            print(f"  steady tiles, median us after the tile's loads: " + ", ".join(
                f"{n} {rel[:, i].median().item():.1f}" for i, n in enumerate(TRACE_EVENTS)))
            if nt >= 8:  # how far apart the CTAs run: per tile, loads issued and released, across CTAs
                mid = per_cta[nt // 4: 3 * nt // 4]
                for k, name in ((0, "loads issued"), (1, "released")):
                    v = mid[:, :, k]
                    med = v.median(dim=1).values.unsqueeze(1)
                    late = (v - med) / 1e3  # us after the tile's median CTA
                    print(f"  {name} across CTAs, per tile (median over tiles): max - median "
                          f"{late.max(dim=1).values.median().item():.1f} us, median - min "
                          f"{(-late).max(dim=1).values.median().item():.1f} us; slowest CTAs on average: "
                          + ", ".join(str(int(c)) for c in late.mean(dim=0).argsort(descending=True)[:6]))
                rel_issue = (per_cta[nt // 4: 3 * nt // 4, :, 1] - per_cta[nt // 4: 3 * nt // 4, :, 0]) / 1e3
                print(f"  loads issued -> released, per CTA: median {rel_issue.median().item():.1f} us, "
                      f"p90 {rel_issue.quantile(0.9).item():.1f}, max {rel_issue.max().item():.1f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,8192,65536")
    ap.add_argument("--widths", default="4096,7168")
    ap.add_argument("--out", default=None)
    ap.add_argument("--once", action="store_true",
                    help="for a profiler: one call (ncu -k regex:_mhc_stream for triton, regex:mhc_pre_kernel for cuda)")
    ap.add_argument("--shipped-only", action="store_true",
                    help="time only the shipped Triton kernel and the CUDA kernel's variants")
    ap.add_argument("--smoke", action="store_true",
                    help="the CUDA kernel on small shapes vs the reference, nothing timed (for compute-sanitizer)")
    ap.add_argument("--trace", action="store_true",
                    help="the CUDA kernel's per-tile timeline (median step times over the tiles) instead of timings")
    ap.add_argument("--backend", default="triton", choices=("triton", "cuda"), help="the kernel --once runs")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.once:
        d, T = int(args.widths.split(",")[0]), int(args.tokens.split(",")[0])
        x = torch.randn(T, 4, d, device=dev).to(torch.bfloat16)
        fn = torch.randn(24, 4 * d, device=dev) * (2 / math.sqrt(4 * d))
        base, scale = torch.randn(24, device=dev), torch.randn(3, device=dev)
        if args.backend == "cuda":
            from v4kernels.ops import mhc as ops
            ops.mhc_pre(x, fn, base, scale, backend="cuda")  # through the op: it loads v4kernels._C
        else:
            tri.mhc_pre(x, fn, base, scale, stream=True)
        torch.cuda.synchronize()
        return 0
    if args.trace:
        return _trace(args, dev)
    if args.smoke:
        return _smoke(dev)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    buf = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    t_copy = _bench(lambda: buf[: 1 << 27].copy_(buf[1 << 27:]))
    hbm = 2 * (1 << 27) / t_copy / 1e3  # GB/s
    del buf
    say(f"{torch.cuda.get_device_name(dev)}: device copy {hbm:,.0f} GB/s (read + write)")
    orig_cfg = tri._stream_config
    for d in (int(v) for v in args.widths.split(",")):
        for T in (int(v) for v in args.tokens.split(",")):
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(T, 4, d, device=dev, generator=g).to(torch.bfloat16)
            fn = torch.randn(24, 4 * d, device=dev, generator=g) * (2 / math.sqrt(4 * d))
            base = torch.randn(24, device=dev, generator=g)
            scale = torch.randn(3, device=dev, generator=g)
            nbytes = 10 * T * d + 24 * 4 * d * 4 + 80 * T
            want = ref.mhc_pre(x[:64], fn, base, scale)
            say(f"\nd={d} T={T}: minimum bytes {nbytes / 1e6:.1f} MB, {nbytes / hbm / 1e3:.1f} us at the copy rate")

            shipped = tri.mhc_pre(x, fn, base, scale, stream=True)

            def row(name, f, check=True):
                try:
                    if check:  # the reference on the first 64 tokens, the shipped kernel on all
                        got = f()
                        ok = (got[1][:64] - want[1]).abs().max().item() <= 1e-5 and \
                             (got[2][:64] - want[2]).abs().max().item() <= 1e-5 and \
                             (got[1] - shipped[1]).abs().max().item() <= 1e-5 and \
                             (got[2] - shipped[2]).abs().max().item() <= 1e-5
                    t = _bench(f)
                    say(f"  {name:<44s} {t:9.1f} us  {nbytes / t / 1e3:8,.0f} GB/s  {100 * nbytes / t / 1e3 / hbm:5.1f}%"
                        + ("" if not check or ok else "  MISMATCH"))
                except Exception as exc:  # noqa: BLE001
                    say(f"  {name:<44s} failed: {type(exc).__name__}: {str(exc)[:160]}")

            variants = [  # (name, KS, BTB, BDB); None = the shipped choice
                ("stream (shipped)", None, None, None),
                ("stream, KS=512", 512, None, None),
                ("stream, KS=2048", 2048, None, None),
                ("stream, 2-token consumer tiles, BDB=2048", None, 2, 2048),
                ("stream, 8-token consumer tiles, BDB=512", None, 8, 512),
            ]
            if args.shipped_only:
                variants = variants[:1]
            for name, ks, btb, bdb in variants:
                def cfg(T_, D_, dev_, ks_=None, btb=btb, bdb=bdb):
                    c = list(orig_cfg(T_, D_, dev_, ks_))
                    if btb:
                        c[4], c[5] = btb, bdb
                    return tuple(c)
                tri._stream_config = cfg
                row(name, lambda ks=ks: tri.mhc_pre(x, fn, base, scale, stream=True, ks=ks))
                tri._stream_config = orig_cfg
            if not args.shipped_only:
                row("split-K path", lambda: tri.mhc_pre(x, fn, base, scale, stream=False))
            try:
                from v4kernels.cuda import mhc as cu
                from v4kernels.testing import kernel_backends
                if "cuda" in kernel_backends("mhc_pre"):
                    ch, nc, r = cu.plan(d, torch.cuda.get_device_properties(dev).multi_processor_count)
                    row(f"CUDA kernel (csrc/mhc/mhc_pre.cu), {nc} CTAs x {ch} ch, {r} stages",
                        lambda: cu.mhc_pre(x, fn, base, scale))
                    for rs in sorted({2, 4, min(r, 8)} - {r}):
                        row(f"CUDA kernel, {rs} stages", lambda rs=rs: cu.mhc_pre(x, fn, base, scale, stages=rs))
            except ImportError:
                pass
            xf = x.view(-1)
            yb = torch.empty(T * d, dtype=torch.bfloat16, device=dev)
            t = _bench(lambda: torch.add(xf[: T * d], xf[T * d: 2 * T * d], out=yb))
            say(f"  {'torch.add of 2 streams (reference copy)':<44s} {t:9.1f} us  {6 * T * d / t / 1e3:8,.0f} GB/s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_mhc.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
