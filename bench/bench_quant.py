"""Benchmark of v4kernels.act_quant_fp8 (spec §2.2): bf16 [M, K] -> e4m3 [M, K] + e8m0 [M, K/block].

Memory-bound: minimum bytes = 2*M*K (bf16 in) + M*K (fp8 out) + M*K/block (scales).
Backends: the eager float32 reference (through the op), torch.compile of the reference function,
and the kernels that can run here (triton, cuda). Each kernel's output is checked bitwise against
the reference on one input before it is timed (a mismatch is noted on the row, not fatal).
"""
from __future__ import annotations

import torch

FAMILY = "quant"
OP = "act_quant_fp8"
TARGET_PCT = 90.0
TARGET_MIN_TOKENS = 4096  # the 90% target applies to large M; small M is latency-bound


def _shapes(ctx):
    blocks = (128, 64)
    tokens = ctx.pick(full=(1, 64, 4096, 32768), quick=(1, 4096, 32768), cpu=(1, 64))
    ks = ctx.pick(full=(4096, 7168), quick=(7168,), cpu=(256,))
    return [(b, m, k) for b in blocks for k in ks for m in tokens]


def _same(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def run(ctx):
    import v4kernels
    from v4kernels.reference import quant as ref
    from v4kernels.testing import kernel_backends

    from .harness import torch_compile

    kernels = kernel_backends(OP)
    compiled = None
    if not ctx.cpu:  # compiling on the CPU costs more than the whole smoke run
        try:
            compiled = torch_compile(ref.act_quant_fp8)
        except Exception as exc:
            ctx.log(f"[bench] quant: torch.compile unavailable: {exc}")
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(1234)

    for block, m, k in _shapes(ctx):
        shape = {"tokens": m, "K": k, "block": block}
        nbytes = 2 * m * k + m * k + m * k // block
        sets = ctx.make_arg_sets(
            lambda: (torch.randn(m, k, device=ctx.device, dtype=torch.float32, generator=gen).mul_(3).to(torch.bfloat16),),
            bytes_per_set=nbytes,
        )
        x0 = sets[0][0]
        q_ref, s_ref = v4kernels.act_quant_fp8(x0, block, backend="reference")
        target = TARGET_PCT if m >= TARGET_MIN_TOKENS else None
        note_t = f">= {TARGET_PCT:g}% of HBM bandwidth for tokens >= {TARGET_MIN_TOKENS}"

        cands = [("reference", lambda x, b=block: v4kernels.act_quant_fp8(x, b, backend="reference"))]
        if compiled is not None:
            cands.append(("torch_compile", lambda x, b=block: compiled(x, b)))
        for be in kernels:
            cands.append((be, lambda x, b=block, be=be: v4kernels.act_quant_fp8(x, b, backend=be)))

        for backend, fn in cands:
            try:
                note = ""
                if backend != "reference":
                    q, s = fn(x0)
                    if not (_same(q, q_ref) and _same(s, s_ref)):
                        note = "OUTPUT DIFFERS FROM THE REFERENCE"
                        ctx.log(f"[bench] quant {backend} {shape}: output differs from the reference")
                t = ctx.time(fn, arg_sets=sets, graph=True)
                ctx.record(FAMILY, OP, backend, shape, t, flops=0, bytes=nbytes, bound="hbm",
                           target_pct=target, target_note=note_t if target else "", note=note)
            except Exception as exc:  # one backend failing must not hide the others
                ctx.record_failure(FAMILY, OP, backend, shape, exc)
        del sets, x0, q_ref, s_ref
