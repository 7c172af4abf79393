"""Benchmarks of the numerics family: hadamard_transform, apply_rope(_), rms_norm, head_rms_norm,
kv584_write / idx_fp4_write (spec §2, §6) and fp8_linear (§2.3).

Elementwise ops are memory-bound: bytes = inputs read once + outputs written once (target 90% of HBM at
large sizes). fp8_linear: flops = 2MNK; bytes = x bf16 + W e4m3 + scales + out bf16; the bound is fp8 when
its arithmetic intensity exceeds the fp8 ridge point, else hbm (decode). Baselines: the eager float32
reference (backend "reference"), torch.compile of it where it compiles ("torch_compile", GPU runs only),
and for fp8_linear a bf16 torch.matmul on pre-dequantized weights ("torch_bf16").
Each kernel's output is checked against the reference on one input before timing (noted, not fatal).
"""
from __future__ import annotations

import torch

FAMILY = "numerics"
TARGET_HBM = 90.0
TARGET_FP8 = 60.0


def _check(out, ref, exact=True) -> str:
    try:
        if exact:
            same = torch.equal(out.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8))
        else:
            from v4kernels.testing import calc_diff

            same = calc_diff(out.float(), ref.float()) < 1e-5
        return "" if same else "OUTPUT DIFFERS FROM THE REFERENCE"
    except Exception as exc:  # noqa: BLE001
        return f"check failed: {exc}"


def _run_cands(ctx, op, shape, cands, sets, nbytes, flops=0, bound="hbm", target=None, note_t="", graph=True):
    for backend, fn, check in cands:
        try:
            note = check(sets[0]) if check is not None else ""
            t = ctx.time(fn, arg_sets=sets, graph=graph)
            ctx.record(FAMILY, op, backend, shape, t, flops=flops, bytes=nbytes, bound=bound,
                       target_pct=target if backend not in ("reference", "torch_compile", "torch_bf16") else None,
                       target_note=note_t, note=note)
        except Exception as exc:  # one backend failing must not hide the others
            ctx.record_failure(FAMILY, op, backend, shape, exc)


def _compile(ctx, fn):
    if ctx.cpu:
        return None
    try:
        from .harness import torch_compile

        return torch_compile(fn)
    except Exception as exc:  # noqa: BLE001
        ctx.log(f"[bench] numerics: torch.compile unavailable: {exc}")
        return None


def _elementwise(ctx, kern):
    from v4kernels.ops import numerics as ops
    from v4kernels.reference import hadamard as rh, norm as rn, rope as rr

    dev = ctx.device
    big = ctx.pick(full=4096, quick=4096, cpu=4)
    tokens = ctx.pick(full=(1, 64, 4096), quick=(64, 4096), cpu=(2,))
    note = f">= {TARGET_HBM:g}% of HBM bandwidth at {big} tokens"
    cos, sin = rr.rope_table(65536 if not ctx.cpu else 512, 160000.0, rr.YarnConfig())
    cos, sin = cos.to(dev), sin.to(dev)
    c_had, c_rope, c_rms = _compile(ctx, rh.hadamard_transform), _compile(ctx, rr.apply_rope), _compile(ctx, rn.rms_norm)

    for t in tokens:
        target = TARGET_HBM if t >= big else None
        # Hadamard over the indexer's 64 query heads x 128
        m = t * 64
        nb = 2 * 2 * m * 128
        sets = ctx.make_arg_sets(lambda: (torch.randn(m, 128, device=dev).bfloat16(),), nb)
        ref0 = rh.hadamard_transform(sets[0][0])
        cands = [("reference", rh.hadamard_transform, None)]
        if c_had is not None:
            cands.append(("torch_compile", c_had, None))
        cands += [(be, lambda x, be=be: ops.hadamard_transform(x, backend=be),
                   lambda s, be=be: _check(ops.hadamard_transform(s[0], backend=be), ref0)) for be in kern("hadamard_transform")]
        _run_cands(ctx, "hadamard_transform", {"rows": m, "n": 128}, cands, sets, nb, target=target, note_t=note)

        # RoPE on q [T, 64, 512] (out of place: all bytes; in place: the 64 rope dims only)
        pos_max = cos.shape[0]
        mk = lambda: (torch.randn(t, 64, 512, device=dev).bfloat16(), torch.randint(0, pos_max, (t,), device=dev))  # noqa: E731
        nb = 2 * t * 64 * 512 * 2 + 8 * t
        sets = ctx.make_arg_sets(mk, nb)
        ref0 = rr.apply_rope(sets[0][0], sets[0][1], cos, sin)
        cands = [("reference", lambda x, p: rr.apply_rope(x, p, cos, sin), None)]
        if c_rope is not None:
            cands.append(("torch_compile", lambda x, p: c_rope(x, p, cos, sin), None))
        cands += [(be, lambda x, p, be=be: ops.apply_rope(x, p, cos, sin, backend=be),
                   lambda s, be=be: _check(ops.apply_rope(s[0], s[1], cos, sin, backend=be), ref0)) for be in kern("apply_rope")]
        _run_cands(ctx, "apply_rope", {"tokens": t, "heads": 64, "D": 512}, cands, sets, nb, target=target, note_t=note)
        nb_in = 2 * t * 64 * 64 * 2 + 8 * t
        cands = [(be, lambda x, p, be=be: ops.apply_rope_(x, p, cos, sin, backend=be), None) for be in kern("apply_rope_")]
        _run_cands(ctx, "apply_rope_", {"tokens": t, "heads": 64, "D": 512}, cands, sets, nb_in, target=target,
                   note_t=note + " (bytes: the rope dims only)")

        # RMSNorm over d = 4096 (weighted) and the per-head query norm [T, 64, 512]
        w = torch.rand(4096, device=dev) + 0.5
        nb = 2 * t * 4096 * 2 + 4 * 4096
        sets = ctx.make_arg_sets(lambda: (torch.randn(t, 4096, device=dev).bfloat16(),), nb)
        ref0 = rn.rms_norm(sets[0][0], w)
        cands = [("reference", lambda x: rn.rms_norm(x, w), None)]
        if c_rms is not None:
            cands.append(("torch_compile", lambda x: c_rms(x, w), None))
        cands += [(be, lambda x, be=be: ops.rms_norm(x, w, backend=be),
                   lambda s, be=be: _check(ops.rms_norm(s[0], w, backend=be), ref0, exact=False)) for be in kern("rms_norm")]
        _run_cands(ctx, "rms_norm", {"tokens": t, "D": 4096}, cands, sets, nb, target=target, note_t=note)

        nb = 2 * t * 64 * 512 * 2
        sets = ctx.make_arg_sets(lambda: (torch.randn(t, 64, 512, device=dev).bfloat16(),), nb)
        ref0 = rn.head_rms_norm_bf16_rn(sets[0][0])
        cands = [("reference", rn.head_rms_norm_bf16, None)]
        cands += [(be, lambda x, be=be: ops.head_rms_norm(x, backend=be),
                   lambda s, be=be: _check(ops.head_rms_norm(s[0], backend=be), ref0)) for be in kern("head_rms_norm")]
        _run_cands(ctx, "head_rms_norm", {"tokens": t, "heads": 64, "D": 512}, cands, sets, nb, target=target, note_t=note)


def _cache_writes(ctx, kern):
    from v4kernels import formats as F
    from v4kernels.ops import formats as ops

    dev = ctx.device
    ps = 64
    big = ctx.pick(full=4096, quick=4096, cpu=4)
    for n in ctx.pick(full=(64, 4096, 65536), quick=(64, 65536), cpu=(4,)):
        for name, fmt, dim, write in (("kv584_write", F.KV584, 512, ops.kv584_write),
                                      ("idx_fp4_write", F.IDX_FP4, 128, ops.idx_fp4_write)):
            pages = -(-n // ps) * 2
            cache = torch.zeros(pages, fmt.page_bytes(ps), dtype=torch.uint8, device=dev)
            nb = n * (2 * dim + fmt.row_bytes + 8)
            sets = ctx.make_arg_sets(
                lambda: (torch.randn(n, dim, device=dev).bfloat16(), torch.randperm(pages * ps, device=dev)[:n]), nb)
            shape = {"rows": n, "page_size": ps}
            target = TARGET_HBM if n >= big else None
            cands = [("reference", lambda x, r: write(cache, r, x, ps, backend="reference"), None)]
            for be in kern(name):
                def chk(s, be=be):
                    c2 = cache.clone()
                    write(c2, s[1], s[0], ps, backend=be)
                    c1 = cache.clone()
                    write(c1, s[1], s[0], ps, backend="reference")
                    return _check(c2, c1)
                # no host range check in the timed loop: only the kernel (the op checks rows on the host)
                from v4kernels.triton import formats as tf

                raw = tf.kv584_write if name == "kv584_write" else tf.idx_fp4_write
                cands.append((be, lambda x, r, raw=raw: raw(cache, r, x, ps), chk))
            _run_cands(ctx, name, shape, cands, sets, nb, target=target,
                       note_t=f">= {TARGET_HBM:g}% of HBM bandwidth at >= {big} rows")


def _linear(ctx, kern):
    from v4kernels.ops import linear as ops
    from v4kernels.reference import linear as rl

    dev = ctx.device
    ms = ctx.pick(full=(1, 16, 128, 4096), quick=(1, 128, 4096), cpu=(1, 16))
    nks = ctx.pick(full=((1024, 4096), (512, 4096), (4096, 8192), (2048, 4096)),
                   quick=((1024, 4096), (4096, 8192)), cpu=((256, 256),))
    ridge = (ctx.ceilings.get("fp8_tflops") or 1420) * 1e12 / ((ctx.ceilings.get("hbm_gbs") or 3000) * 1e9)
    for n, k in nks:
        w = torch.randn(n, k, device=dev) * 0.02
        wq, ws = rl.quantize_weight_fp8_block(w)
        wbf = rl.dequant_weight_fp8_block(wq, ws, torch.bfloat16)
        for m in ms:
            flops = 2.0 * m * n * k
            nb = 2 * m * k + n * k + wq.numel() // 16384 + m * k // 128 + 2 * m * n
            bound = "fp8" if flops / nb > ridge else "hbm"
            target = TARGET_FP8 if bound == "fp8" else TARGET_HBM
            sets = ctx.make_arg_sets(lambda: (torch.randn(m, k, device=dev).bfloat16(),), 2 * m * k + n * k)
            ref0 = rl.fp8_linear(sets[0][0], wq, ws)
            cands = [("reference", lambda x: rl.fp8_linear(x, wq, ws), None),
                     ("torch_bf16", lambda x: x @ wbf.T, None)]
            cands += [(be, lambda x, be=be: ops.fp8_linear(x, wq, ws, backend=be),
                       lambda s, be=be: _check(ops.fp8_linear(s[0], wq, ws, backend=be), ref0, exact=False))
                      for be in kern("fp8_linear")]
            _run_cands(ctx, "fp8_linear", {"M": m, "N": n, "K": k}, cands, sets, nb, flops=flops, bound=bound,
                       target=target, note_t=f">= {target:g}% of the {bound} ceiling")


def run(ctx):
    import v4kernels.ops.formats  # noqa: F401  (registers the ops)
    import v4kernels.ops.linear  # noqa: F401
    import v4kernels.ops.numerics  # noqa: F401
    from v4kernels.testing import kernel_backends

    for part in (_elementwise, _cache_writes, _linear):
        try:
            part(ctx, kernel_backends)
        except Exception as exc:  # noqa: BLE001
            ctx.log(f"[bench] numerics: {part.__name__} failed: {exc!r}")
