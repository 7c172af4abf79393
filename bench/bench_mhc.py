"""Benchmark of the mHC ops (spec §7): mhc_pre, mhc_head and mhc_post at V4-Flash (d=4096) and V4-Pro (d=7168).

Memory-bound. Minimum bytes (each input read once, each output written once), X bf16 [T, 4, d]:
  mhc_pre : X (8 T d) + fn (24 * 4d * 4) + base/scale (27 * 4) + y (2 T d) + post (16 T) + comb (64 T)
  mhc_head: X (8 T d) + fn (4 * 4d * 4) + base/scale (5 * 4) + y (2 T d)
  mhc_post: out (2 T d) + X (8 T d) + post (16 T) + comb (64 T) + X_new (8 T d)
Backends: the eager float32 reference (through the op), torch.compile of the reference function,
and the kernels that can run here (mhc_head: the kernels only). Before timing, each kernel's output
is checked against the reference on one input (mhc_post bitwise; mhc_pre / mhc_head within the
V4-width tolerance stated in ops/mhc.py, the measured deviations in the row's note); a mismatch is
noted on the row, not fatal. The 85% target applies to T >= 1024 (smaller T is latency-bound: at
T = 1 the op reads 1.5 MB of fn for 32 KB of X).
"""
from __future__ import annotations

import math

import torch

FAMILY = "mhc"
TARGET_PCT = 85.0
TARGET_MIN_TOKENS = 1024


def _shapes(ctx):
    tokens = ctx.pick(full=(1, 64, 1024, 8192, 65536), quick=(1, 1024, 8192), cpu=(1, 16))
    widths = ctx.pick(full=(4096, 7168), quick=(4096, 7168), cpu=(256,))
    return [(d, t) for d in widths for t in tokens]


def _pre_bytes(t, d):
    return 8 * t * d + 24 * 4 * d * 4 + 27 * 4 + 2 * t * d + 16 * t + 64 * t


def _head_bytes(t, d):
    return 8 * t * d + 4 * 4 * d * 4 + 5 * 4 + 2 * t * d


def _post_bytes(t, d):
    return 2 * t * d + 8 * t * d + 16 * t + 64 * t + 8 * t * d


# The tolerance stated in ops/mhc.py for V4 widths (tests/mhc: W_V4, y_atol 1e-3, one bf16 ulp).
W_TOL = 2e-5
Y_ATOL, Y_RTOL = 1e-3, 2.0 ** -7


def _pre_check(got, want):
    """(within the stated tolerance?, note with the measured deviations from the reference)."""
    y, post, comb = got
    yr, pr, cr = want
    dp = (post - pr).abs().max().item() if post.numel() else 0.0
    dc = (comb - cr).abs().max().item() if comb.numel() else 0.0
    return _y_check(y, yr, dp <= W_TOL and dc <= W_TOL, f"post / comb max |diff| {dp:.1e} / {dc:.1e}")


def _y_check(y, yr, ok, note):
    yd = (y.float() - yr.float()).abs()
    excess = (yd - Y_ATOL - Y_RTOL * yr.float().abs()).max().item() if y.numel() else -1.0
    ok = ok and excess <= 0
    note = f"{note + ', ' if note else ''}y max |diff| {yd.max().item() if y.numel() else 0.0:.1e} vs the reference"
    return ok, note if ok else "OUTPUT OUTSIDE THE STATED TOLERANCE: " + note


def run(ctx):
    from v4kernels.ops import mhc as ops
    from v4kernels.reference import mhc as ref
    from v4kernels.testing import kernel_backends

    from .harness import torch_compile

    dev = ctx.device
    kernels_pre = kernel_backends("mhc_pre")
    kernels_post = kernel_backends("mhc_post")
    c_pre = c_post = None
    if not ctx.cpu:  # compiling on the CPU costs more than the whole smoke run
        try:
            c_pre = torch_compile(ref.mhc_pre)
            c_post = torch_compile(ref.mhc_post)
        except Exception as exc:
            ctx.log(f"[bench] mhc: torch.compile unavailable: {exc}")
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen).mul_(scale)

    for d, t in _shapes(ctx):
        shape = {"tokens": t, "d": d, "hc": 4, "x_dtype": "bf16"}
        target = TARGET_PCT if t >= TARGET_MIN_TOKENS else None
        note_t = f">= {TARGET_PCT:g}% of HBM bandwidth for tokens >= {TARGET_MIN_TOKENS}"

        # ---- mhc_pre
        nbytes = _pre_bytes(t, d)
        sets = ctx.make_arg_sets(
            lambda: (rn(t, 4, d).to(torch.bfloat16), rn(24, 4 * d, scale=2 / math.sqrt(4 * d)), rn(24),
                     rn(3).abs_().add_(0.5)),
            bytes_per_set=nbytes,
        )
        want = ops.mhc_pre(*sets[0], backend="reference")
        cands = [("reference", lambda *a: ops.mhc_pre(*a, backend="reference"))]
        if c_pre is not None:
            cands.append(("torch_compile", c_pre))
        cands += [(be, lambda *a, be=be: ops.mhc_pre(*a, backend=be)) for be in kernels_pre]
        for backend, fn in cands:
            try:
                note = ""
                if backend != "reference":
                    ok, note = _pre_check(fn(*sets[0]), want)
                    if not ok:
                        ctx.log(f"[bench] mhc_pre {backend} {shape}: {note}")
                tm = ctx.time(fn, arg_sets=sets, graph=True)
                ctx.record(FAMILY, "mhc_pre", backend, shape, tm, flops=2 * 24 * 4 * d * t + 8 * t * d, bytes=nbytes,
                           bound="hbm", target_pct=target, target_note=note_t if target else "", note=note)
            except Exception as exc:  # one backend failing must not hide the others
                ctx.record_failure(FAMILY, "mhc_pre", backend, shape, exc)
        # ---- mhc_head (the final collapse: same X pass, 4 mixes, no Sinkhorn), Triton only
        hbytes = _head_bytes(t, d)
        hsets = [(a[0], a[1][:4].contiguous(), a[2][:4].contiguous(), a[3][:1].contiguous()) for a in sets]
        hwant = ops.mhc_head(*hsets[0], backend="reference")
        for backend in [be for be in kernel_backends("mhc_head")]:
            try:
                ok, note = _y_check(ops.mhc_head(*hsets[0], backend=backend), hwant, True, "")
                if not ok:
                    ctx.log(f"[bench] mhc_head {backend} {shape}: {note}")
                tm = ctx.time(lambda *a, be=backend: ops.mhc_head(*a, backend=be), arg_sets=hsets, graph=True)
                ctx.record(FAMILY, "mhc_head", backend, shape, tm, flops=2 * 4 * 4 * d * t + 8 * t * d, bytes=hbytes,
                           bound="hbm", target_pct=target, target_note=note_t if target else "", note=note)
            except Exception as exc:
                ctx.record_failure(FAMILY, "mhc_head", backend, shape, exc)
        del hsets, hwant

        x0 = sets[0][0]
        _, post0, comb0 = want
        del sets, want

        # ---- mhc_post
        nbytes = _post_bytes(t, d)
        sets = ctx.make_arg_sets(
            lambda: (rn(t, d).to(torch.bfloat16), rn(t, 4, d).to(torch.bfloat16), post0.clone(), comb0.clone()),
            bytes_per_set=nbytes,
        )
        out0 = sets[0][0]
        want = ops.mhc_post(out0, x0, post0, comb0, backend="reference")
        cands = [("reference", lambda *a: ops.mhc_post(*a, backend="reference"))]
        if c_post is not None:
            cands.append(("torch_compile", c_post))
        cands += [(be, lambda *a, be=be: ops.mhc_post(*a, backend=be)) for be in kernels_post]
        for backend, fn in cands:
            try:
                note = ""
                if backend != "reference" and not torch.equal(fn(out0, x0, post0, comb0).view(torch.int16),
                                                              want.view(torch.int16)):
                    note = "OUTPUT DIFFERS FROM THE REFERENCE"
                    ctx.log(f"[bench] mhc_post {backend} {shape}: output differs from the reference")
                tm = ctx.time(fn, arg_sets=sets, graph=True)
                ctx.record(FAMILY, "mhc_post", backend, shape, tm, flops=t * 4 * d * 10, bytes=nbytes,
                           bound="hbm", target_pct=target, target_note=note_t if target else "", note=note)
            except Exception as exc:
                ctx.record_failure(FAMILY, "mhc_post", backend, shape, exc)
        del sets, want, x0, out0, post0, comb0
