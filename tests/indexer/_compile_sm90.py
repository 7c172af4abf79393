"""Compile every Triton kernel of v4kernels/triton/indexer.py for a Hopper GPU (sm_90) on a CPU-only machine.

The interpreter (``TRITON_INTERPRET=1``, how the CPU tests run kernels) accepts code the compiler
rejects (non-constexpr globals, reassigned constexpr names, bad casts or dot shapes...). This script
drives the real launchers with ``meta`` tensors and the GPU heuristics (``_interpret() -> False``,
132 SMs), records each kernel launch instead of running it (argument types, the JIT's 1-specialization
and 16-divisibility attributes, constexprs, num_warps), then compiles each distinct specialization with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` down to a cubin (ptxas included).

Must run in a process without TRITON_INTERPRET (``@triton.jit`` builds interpreter functions otherwise).
Usage: ``python tests/indexer/_compile_sm90.py [--full] [--jobs N]``. Exit codes: 0 all compiled,
1 some failed, 3 compiling for sm_90 does not work on this machine (probe kernel failed: skip).
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8",
        torch.int8: "*i8", torch.int32: "*i32", torch.int64: "*i64"}


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records the specialization."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def __getitem__(self, grid):
        def launch(*args, **kw):
            names = [p.name for p in self.fn.params]
            bound = dict(zip(names, args))
            options = {k: v for k, v in kw.items() if k not in names}
            bound.update({k: v for k, v in kw.items() if k in names})
            sig, cx, attrs = {}, {}, {}
            for i, p in enumerate(self.fn.params):
                v = bound[p.name]
                if p.is_constexpr:
                    sig[p.name], cx[p.name] = "constexpr", v
                elif isinstance(v, torch.Tensor):
                    sig[p.name] = _PTR[v.dtype]
                    attrs[str(i)] = True  # torch allocations are 16-byte aligned
                elif isinstance(v, bool):
                    sig[p.name] = "i1"
                elif isinstance(v, int) and v == 1 and not p.do_not_specialize:
                    sig[p.name], cx[p.name] = "constexpr", 1  # the JIT turns 1 into a constant
                elif isinstance(v, int):
                    sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
                    if v % 16 == 0 and not p.do_not_specialize:
                        attrs[str(i)] = True
                else:
                    raise TypeError(f"{p.name}: unsupported argument {type(v).__name__}")
            rec = {"kernel": self.fn.__name__, "signature": sig, "constexprs": cx, "attrs": attrs,
                   "options": options}
            self.out.setdefault(json.dumps(rec, sort_keys=True), rec)

        return launch


def _cases(full: bool):
    """(kind, kwargs) launcher calls with the GPU heuristics. Quick: the V4 decode/prefill shapes at topk 512
    (FP4 and FP8, with a kv table), logits, 128 heads, the tests' 16-head/page-1/int64-id shapes and a forced
    merge tree. Full: also topk 1024/2048, 16/32/128 heads, block_q 1/2, pages 1..64, 1M entries."""
    base = dict(H=64, page_size=64, fmt="idx_fp4", wdt=torch.bfloat16, idt=torch.int32)
    cases = [("prepare_q", dict(T=4096, H=64))]
    cases.append(("topk", dict(base, T=1, n=16384, topk=512, kv=True)))                 # decode, 1 sequence
    cases.append(("topk", dict(base, T=32, n=16384, topk=512, fmt="idx_fp8")))          # decode batch, FP8
    cases.append(("topk", dict(base, T=2048, n=16384, topk=512)))                       # prefill (block_q 2)
    cases.append(("logits", dict(base, T=4, n=4096)))
    cases.append(("logits", dict(base, T=600, n=4096, fmt="idx_fp8", wdt=torch.float32, idt=torch.int64)))
    cases.append(("topk", dict(base, H=128, T=4, n=4096, topk=512)))
    cases.append(("topk", dict(H=16, T=3, n=12, page_size=1, fmt="idx_fp4", topk=13, wdt=torch.float32,
                               idt=torch.int64, kv=True)))
    cases.append(("topk", dict(base, H=16, T=2, n=96, page_size=8, topk=8, block_n=16, chunk=16)))
    cases.append(("topk", dict(base, T=1, n=262144, topk=512)))               # 1M context, batch 1: short lists
    cases.append(("topk", dict(base, T=128, n=262144, topk=512, kv=True)))    # batch 128: full lists, 168 regs
    cases.append(("topk", dict(base, T=4096, n=8192, topk=512)))              # prefill, one chunk: final in-kernel
    if not full:
        return cases
    cases += [("prepare_q", dict(T=T, H=H)) for T, H in ((1, 64), (3, 16), (5, 128))]
    shapes = [dict(T=1, n=16384), dict(T=32, n=16384), dict(T=2048, n=16384)]
    for topk in (512, 1024, 2048):
        for s in shapes:
            for fmt in ("idx_fp4", "idx_fp8"):
                cases.append(("topk", dict(base, topk=topk, fmt=fmt, kv=True, **s)))
    cases.append(("topk", dict(base, T=1, n=1 << 20, topk=1024, page_size=256)))  # 1M entries
    for s in shapes[:2] + [dict(T=600, n=4096)]:
        for fmt in ("idx_fp4", "idx_fp8"):
            cases.append(("logits", dict(base, fmt=fmt, **s)))
    for ps in (1, 4, 8, 16, 64):  # the test suite's shapes
        for fmt in ("idx_fp4", "idx_fp8"):
            for topk in (4, 8, 13, 16, 32):
                cases.append(("topk", dict(H=16, T=3, n=ps * 12, page_size=ps, fmt=fmt, topk=topk,
                                           wdt=torch.bfloat16, idt=torch.int64, kv=True)))
            cases.append(("logits", dict(H=16, T=3, n=ps * 12, page_size=ps, fmt=fmt, wdt=torch.float32,
                                         idt=torch.int64)))
    for chunk, list_len in ((32, 16), (64, 32)):
        cases.append(("topk", dict(base, H=16, T=2, n=96, page_size=8, topk=64, block_n=16, chunk=chunk,
                                   list_len=list_len)))
    for H in (16, 32):
        cases.append(("topk", dict(base, H=H, T=4, n=4096, topk=512)))
        cases.append(("logits", dict(base, H=H, T=4, n=4096)))
    for bq in (1, 2):
        cases.append(("topk", dict(base, T=64, n=16384, topk=1024, block_q=bq)))
        cases.append(("logits", dict(base, T=64, n=16384, block_q=bq)))
    return cases


def record(full: bool):
    from v4kernels import formats
    from v4kernels.triton import indexer as tri

    recs = {}
    orig = (tri._prepare_q_kernel, tri._score_kernel, tri._merge_kernel, tri._interpret, tri._num_sms)
    tri._prepare_q_kernel = _Recorder(orig[0], recs)
    tri._score_kernel = _Recorder(orig[1], recs)
    tri._merge_kernel = _Recorder(orig[2], recs)
    tri._interpret = lambda: False
    tri._num_sms = lambda dev: 132
    try:
        meta = torch.device("meta")
        for kind, c in _cases(full):
            T, H = c["T"], c["H"]
            q = torch.empty((T, H, 128), dtype=torch.bfloat16, device=meta)
            if kind == "prepare_q":
                tri.indexer_prepare_q(q, torch.empty(T, dtype=torch.int32, device=meta),
                                      torch.empty((4096, 32), device=meta), torch.empty((4096, 32), device=meta))
                continue
            ps, n = c["page_size"], c["n"]
            max_pages = -(-n // ps)
            pb = formats.FORMATS[c["fmt"]].page_bytes(ps)
            args = (q, torch.empty((T, H), dtype=c["wdt"], device=meta),
                    torch.empty((max_pages * max(1, T if T < 64 else 1), pb), dtype=torch.uint8, device=meta),
                    torch.empty((max(T, 1), max_pages), dtype=torch.int32, device=meta),
                    torch.empty(T, dtype=c["idt"], device=meta), torch.empty(T, dtype=c["idt"], device=meta))
            kw = {k: c[k] for k in ("block_q", "block_n", "chunk", "list_len") if k in c}
            if kind == "logits":
                tri.indexer_logits(*args, ps, n, c["fmt"], **{k: v for k, v in kw.items() if k != "list_len"})
            else:
                kvbt = torch.empty((max(T, 1), max_pages), dtype=torch.int32, device=meta) if c.get("kv") else None
                tri.indexer_topk(*args, c["topk"], ps, n, c["fmt"], kvbt, 64 if kvbt is not None else 0, **kw)
    finally:
        tri._prepare_q_kernel, tri._score_kernel, tri._merge_kernel, tri._interpret, tri._num_sms = orig
    return list(recs.values())


def compile_one(rec):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from v4kernels.triton import indexer as tri

    fn = getattr(tri, rec["kernel"])
    attrs = {(int(i),): [["tt.divisibility", 16]] for i in rec["attrs"]}
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=rec["signature"], constexprs=rec["constexprs"], attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(rec["options"]))
    except Exception as exc:  # report every failure, not only the first
        msg = str(exc).strip()
        return False, f"FAIL {rec['kernel']} {rec['constexprs']} {rec['options']}: {type(exc).__name__}\n{msg[-2500:]}"
    spills = _spills(k)
    return True, (f"ok   {rec['kernel']} {rec['constexprs']} {rec['options']} {time.time() - t0:.1f}s"
                  f" smem={k.metadata.shared}" + (f" spills={spills}" if spills else ""))


def _spills(k):
    """Register spill bytes from the cubin (cuobjdump -res-usage), or None when unavailable."""
    import re
    import shutil
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not tool or "cubin" not in k.asm:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+)", out)
    regs = re.search(r"REG:(\d+)", out)
    stack = int(m.group(1)) if m else 0
    return f"stack {stack} B (regs {regs.group(1) if regs else '?'})" if stack else None


def probe() -> str:
    """'' when a trivial kernel compiles for sm_90 here, else the reason."""
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        @triton.jit
        def _probe(x_ptr, n, B: tl.constexpr):
            o = tl.arange(0, B)
            tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1, mask=o < n)

        k = triton.compile(ASTSource(fn=_probe, signature={"x_ptr": "*fp32", "n": "i32", "B": "constexpr"},
                                     constexprs={"B": 128}), target=GPUTarget("cuda", 90, 32))
        if "cubin" not in k.asm:
            return "triton.compile produced no cubin for sm_90"
        return ""
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="every V4 topk (512/1024/2048) and head count")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    why = probe()
    if why:
        print(f"cannot compile for sm_90 on this machine: {why}")
        return 3
    recs = record(a.full)
    t0 = time.time()
    print(f"compiling {len(recs)} indexer kernel specializations for sm_90", flush=True)
    results = []
    if a.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(a.jobs) as ex:
            for res in ex.map(compile_one, recs):
                results.append(res)
                print(res[1], flush=True)
    else:
        for r in recs:
            results.append(compile_one(r))
            print(results[-1][1], flush=True)
    bad = sum(not ok for ok, _ in results)
    print(f"sm90 compile: {len(recs) - bad}/{len(recs)} indexer kernel specializations compiled "
          f"in {time.time() - t0:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
