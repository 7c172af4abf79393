"""Benchmark of the MoE family (spec §8): router, MXFP4 grouped GEMMs (W4A8 / W4A16).

Expert shapes: V4-Flash (d=4096, inter=2048, E=256) and V4-Pro (d=7168, inter=3072, E=384), with a
subset of the experts active (every active expert gets the same number of rows, ``m`` = tokens per
expert) so memory stays modest. Two GEMMs per shape:

* ``grouped_w13``: fused W1/W3 + clamped SwiGLU (N = inter, K = d, two weights);
* ``grouped_w2``:  W2 (N = d, K = inter).

Minimum bytes = packed weights + e8m0 scales of the active experts + activations in (bf16, or
fp8 + 1x128 scales for W4A8) + bf16 output. FLOPs = 2*M*N*K per weight. Decode-size groups
(m <= 16) are bound by HBM (target 85% on these bytes, and >= 3x ``torch_bf16``); prefill-size
groups by the FP8 (W4A8) or BF16 (W4A16) tensor ceiling (target: 1100 TFLOP/s for W4A8).

Baseline ``torch_bf16``: the same GEMMs on dequantized bf16 weights, ``torch._grouped_mm`` when it
runs here, else a loop of ``torch.matmul`` per expert (W1 and W3 as one [2*inter, d] weight; no
SwiGLU epilogue). ``cuda`` (the sm_90a decode kernels, csrc/moe/mxfp4_decode.cu) runs on the
decode-size groups only, next to ``triton`` there. ``reference``: the float32 op reference, at small m only (it loops over 32-K
chunks). Router (``moe_route``): tokens 1..64K at both shapes.
"""
from __future__ import annotations

import torch

FAMILY = "moe"
MODELS = {"flash": dict(d=4096, inter=2048, E=256), "pro": dict(d=7168, inter=3072, E=384)}
DECODE_MAX_M = 16
W4A8_TARGET_TFLOPS = 1100.0


def _grouped_mm_available(device) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
        b = torch.randn(2, 64, 32, device=device, dtype=torch.bfloat16)
        torch._grouped_mm(a, b, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
        return True
    except Exception:
        return False


def _random_mxfp4(E, N, K, device, gen):
    """Random packed E2M1 codes and e8m0 scales around 2^-8 (any bytes are valid MXFP4)."""
    w = torch.randint(0, 256, (E, N, K // 2), device=device, dtype=torch.uint8, generator=gen)
    s = torch.randint(119, 124, (E, N, K // 32), device=device, dtype=torch.uint8, generator=gen)
    return w, s


def _dequant_bf16(w, s):
    from v4kernels.reference import quant as q

    return torch.stack([q.dequant_mxfp4(w[e], s[e], torch.bfloat16) for e in range(w.shape[0])])


def _bf16_baseline(a, wd_t, offs_end, use_grouped):
    """a [M, K] bf16 grouped rows, wd_t [E, K, N] bf16 -> [M, N]."""
    if use_grouped:
        return lambda: torch._grouped_mm(a, wd_t, offs=offs_end)
    bounds = [0] + offs_end.tolist()

    def loop():
        return torch.cat([a[bounds[e]:bounds[e + 1]] @ wd_t[e] for e in range(wd_t.shape[0])])

    return loop


def _bench_gemms(ctx, name, cfg, kernels, use_grouped, gen):
    from v4kernels.ops import moe as ops
    from v4kernels.ops.quant import act_quant_fp8

    dev = ctx.device
    d, inter = cfg["d"], cfg["inter"]
    if ctx.cpu:
        d, inter = 256, 128
    n_exp = ctx.pick(full=64, quick=32, cpu=2)
    ms = ctx.pick(full=(1, 4, 16, 64, 256, 1024, 4096), quick=(1, 16, 256, 4096), cpu=(1, 4))
    w1, s1 = _random_mxfp4(n_exp, inter, d, dev, gen)
    w3, s3 = _random_mxfp4(n_exp, inter, d, dev, gen)
    w2, s2 = _random_mxfp4(n_exp, d, inter, dev, gen)
    w13_t = torch.cat([_dequant_bf16(w1, s1), _dequant_bf16(w3, s3)], dim=1).transpose(1, 2).contiguous()
    w2_t = _dequant_bf16(w2, s2).transpose(1, 2).contiguous()
    ceil_fp8 = ctx.ceilings.get("fp8_tflops")

    for m in ms:
        M = m * n_exp
        off = torch.arange(0, M + 1, m, device=dev, dtype=torch.int32)
        a13 = (torch.randn(M, d, device=dev, generator=gen) * 0.5).bfloat16()
        a2 = (torch.randn(M, inter, device=dev, generator=gen) * 0.5).bfloat16()
        q13, sq13 = act_quant_fp8(a13, 128)
        q2, sq2 = act_quant_fp8(a2, 128)
        rw = torch.rand(M, device=dev, generator=gen)
        decode = m <= DECODE_MAX_M
        for gemm, (N, K, nw) in (("grouped_w13", (inter, d, 2)), ("grouped_w2", (d, inter, 1))):
            shape = {"model": name, "experts": n_exp, "tokens_per_expert": m, "rows": M, "N": N, "K": K}
            wbytes = nw * n_exp * N * (K // 2 + K // 32)
            flops = 2.0 * M * N * K * nw
            cands = []
            for mode in ("w4a8", "w4a16"):
                if gemm == "grouped_w13":
                    a, sa = (q13, sq13) if mode == "w4a8" else (a13, None)
                    fn = (lambda a=a, sa=sa, mode=mode, be=None: ops.moe_grouped_swiglu_mxfp4(
                        a, sa, w1, s1, w3, s3, off, None, rw, mode, 10.0, backend=be))
                else:
                    a, sa = (q2, sq2) if mode == "w4a8" else (a2, None)
                    fn = (lambda a=a, sa=sa, mode=mode, be=None: ops.moe_grouped_gemm_mxfp4(
                        a, sa, w2, s2, off, None, mode, backend=be))
                abytes = M * K * (1 + 1 / 128) if mode == "w4a8" else 2 * M * K
                nbytes = wbytes + abytes + 2 * M * N
                if decode:
                    bound, target, note = "hbm", 85.0, ">= 85% of HBM bandwidth on weight bytes; >= 3x torch_bf16"
                elif mode == "w4a8":
                    bound = "fp8"
                    target = 100.0 * W4A8_TARGET_TFLOPS / ceil_fp8 if ceil_fp8 else None
                    note = f">= {W4A8_TARGET_TFLOPS:g} TFLOP/s (FP8 wgmma)"
                else:
                    bound, target, note = "bf16", None, ""
                for be in kernels:
                    if be == "cuda" and not decode:  # the CUDA kernels are decode kernels (cm.decode_supported)
                        continue
                    cands.append((f"{be}_{mode}", lambda fn=fn, be=be: fn(be=be), nbytes, bound, target, note))
                if ctx.cpu or m <= 4:
                    cands.append((f"reference_{mode}" if mode == "w4a16" else "reference",
                                  lambda fn=fn: fn(be="reference"), nbytes, bound, None, ""))
            a_bf = a13 if gemm == "grouped_w13" else a2
            wt = w13_t if gemm == "grouped_w13" else w2_t
            base = _bf16_baseline(a_bf, wt, off[1:], use_grouped)
            bbytes = 2 * n_exp * nw * N * K + 2 * M * K + 2 * M * N * nw
            cands.append(("torch_bf16", base, bbytes, "hbm" if decode else "bf16", None,
                          "torch._grouped_mm" if use_grouped else "matmul loop per expert"))
            for backend, fn, nbytes, bound, target, note in cands:
                try:
                    t = ctx.time(fn, graph=decode and not backend.startswith("reference") and not ctx.cpu)
                    ctx.record(FAMILY, gemm, backend, shape, t, flops=flops, bytes=nbytes, bound=bound,
                               target_pct=target, target_note=note if target else "",
                               note=note if backend == "torch_bf16" else "")
                except Exception as exc:
                    ctx.record_failure(FAMILY, gemm, backend, shape, exc)
        del a13, a2, q13, q2
    del w13_t, w2_t


def _bench_router(ctx, name, cfg, kernels, gen):
    from v4kernels.ops import moe as ops

    dev = ctx.device
    d, E = (256, 16) if ctx.cpu else (cfg["d"], cfg["E"])
    tokens = ctx.pick(full=(1, 16, 128, 1024, 8192, 65536), quick=(1, 128, 8192, 65536), cpu=(1, 16))
    gw = (torch.randn(E, d, device=dev, generator=gen) * d ** -0.5).bfloat16()
    gb = torch.randn(E, device=dev, generator=gen) * 0.05
    for T in tokens:
        x = torch.randn(T, d, device=dev, generator=gen).bfloat16()
        shape = {"model": name, "tokens": T, "d": d, "E": E}
        nbytes = 2 * T * d + 2 * E * d + 4 * E + 8 * T * 6
        flops = 2.0 * T * E * d
        bound = "hbm" if T <= 128 else "bf16"
        cands = [("reference", lambda: ops.moe_route(x, gw, gb, None, None, 6, 1.5, backend="reference"))]
        for be in kernels:
            cands.append((be, lambda be=be: ops.moe_route(x, gw, gb, None, None, 6, 1.5, backend=be)))
        for backend, fn in cands:
            if backend == "reference" and T > 8192 and not ctx.cpu:
                continue
            try:
                t = ctx.time(fn, graph=T <= 1024 and backend != "reference" and not ctx.cpu)
                ctx.record(FAMILY, "moe_route", backend, shape, t, flops=flops, bytes=nbytes, bound=bound)
            except Exception as exc:
                ctx.record_failure(FAMILY, "moe_route", backend, shape, exc)


def run(ctx):
    import v4kernels.ops.moe  # noqa: F401  (registers the ops)
    from v4kernels.testing import kernel_backends

    kernels = kernel_backends("moe_grouped_gemm_mxfp4")
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(4321)
    use_grouped = _grouped_mm_available(ctx.device)
    models = ctx.pick(full=("flash", "pro"), quick=("flash", "pro"), cpu=("flash",))
    for name in models:
        _bench_router(ctx, name, MODELS[name], kernel_backends("moe_route"), gen)
        _bench_gemms(ctx, name, MODELS[name], kernels, use_grouped, gen)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
