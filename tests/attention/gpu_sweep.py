"""GPU tuning sweep of the attention kernel (not a test; one call of the device fits in ~1 min per config):
``PYTHONPATH=python:. python tests/attention/gpu_sweep.py [CFG ...]``.

CFG = ``BN:STAGES[:WARPS]`` (V4K_ATTN_BN / _STAGES / _WARPS; default: the launcher's table). For each config: a
correctness check against the reference at Flash/Pro shapes (CSA, HCA, SWA; auto, 1 and 3 splits), then
CUDA-graph timings (cold L2, rotating inputs, as bench/bench_attention.py) of the bench shapes; the split factor
the plan picked is printed next to each time. Env: SWEEP_ONLY=name,substrings; SWEEP_CHECK=0 skips the check;
V4K_ATTN_MIN_TILES sets the split policy's minimum tiles per split."""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from _attn_build import decode_view, make_case  # noqa: E402

import v4kernels.ops.attention as A  # noqa: E402
from bench.bench_attention import PAGE, _make_case, _random_cache, _tables  # noqa: E402
from bench.harness import BenchContext  # noqa: E402
from v4kernels.testing import calc_diff, make_generator  # noqa: E402

DEC = [  # name, kind, H, topk, ctx, B
    ("flash csa b1", "csa", 64, 512, 32768, 1),
    ("flash csa b64", "csa", 64, 512, 32768, 64),
    ("pro csa b1", "csa", 128, 1024, 32768, 1),
    ("pro csa b64", "csa", 128, 1024, 32768, 64),
    ("flash hca1M b1", "hca", 64, 0, 1048576, 1),
    ("flash hca64K b64", "hca", 64, 0, 65536, 64),
    ("pro hca64K b64", "hca", 128, 0, 65536, 64),
    ("flash swa b64", "swa", 64, 0, 8192, 64),
    ("flash hca1M b64", "hca", 64, 0, 1048576, 64),
    ("flash csa b32", "csa", 64, 512, 32768, 32),
    ("flash hca64K b32", "hca", 64, 0, 65536, 32),
    ("flash swa b32", "swa", 64, 0, 8192, 32),
]
PRE = [("flash csa pre4096", "csa", 64, 512, 32768, 4096), ("pro csa pre4096", "csa", 128, 1024, 32768, 4096),
       ("flash hca pre4096", "hca", 64, 0, 32768, 4096)]


def check(tag):
    worst = 0.0
    for kind, H, topk in (("csa", 64, 512), ("csa", 128, 1024), ("hca", 64, 0), ("swa", 128, 0)):
        g = make_generator(f"sweep-{kind}-{H}")
        case = make_case(g, kind, [6000, 3001], [2, 2], H, wps=64, cps=64, topk=max(topk, 1), device="cuda",
                         invalid_frac=0.05)
        cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
        ref, rl = A.sparse_attn_prefill(**cpu, backend="reference")
        for splits in (0, 1, 3):
            out, lse = A.sparse_attn_prefill(**case, num_splits=splits, backend="triton")
            d = calc_diff(out.float().cpu(), ref.float())
            e = (lse.cpu() - rl).abs().max().item()
            bad = torch.isnan(out).any().item() or d > 2e-5 or e > 1e-3
            worst = max(worst, d)
            if bad:
                print(f"  [{tag}] FAIL {kind} H{H} splits{splits}: calc_diff {d:.2e} lse err {e:.2e}", flush=True)
    print(f"  [{tag}] check done, worst calc_diff {worst:.2e}", flush=True)


def time_decode(ctx, name, kind, H, topk, c, B, gen):
    plan = None
    case = _make_case(kind, H, topk, c, B, 1, ctx.device, gen)
    nbytes = sum(v.numel() * v.element_size() for v in case.values() if isinstance(v, torch.Tensor))
    sets = ctx.make_arg_sets(lambda: (_make_case(kind, H, topk, c, B, 1, ctx.device, gen),), bytes_per_set=nbytes,
                             max_sets=8)
    cap = case.get("compressed_block_table", case["window_block_table"]).shape[1] * PAGE
    plan = A.attention_plan(case["seq_lens"], H, s_q=1, csa_topk=topk, hca_capacity=cap)
    out = torch.empty(B, 1, H, 512, dtype=torch.bfloat16, device=ctx.device)
    lse = torch.empty(B, 1, H, dtype=torch.float32, device=ctx.device)
    fn = lambda cs: A.sparse_attn_decode(**cs, plan=plan, out=out, lse_out=lse, backend="triton")  # noqa: E731
    t = ctx.time(fn, arg_sets=sets, graph=True)
    return t, plan.num_splits[kind]


def time_prefill(ctx, name, kind, H, topk, c, T, gen):
    dev = ctx.device
    ent = c // (4 if kind == "csa" else 128)
    wbt, wpages = _tables(1, c, PAGE, dev, gen)
    cbt, cpages = _tables(1, max(ent, 1), PAGE, dev, gen)
    case = dict(q=torch.randn(T, H, 512, device=dev, generator=gen).to(torch.bfloat16),
                cu_seqlens=torch.tensor([0, T], dtype=torch.int32, device=dev),
                seq_lens=torch.tensor([c], dtype=torch.int32, device=dev),
                window_cache=_random_cache(wpages, PAGE, dev, gen), window_block_table=wbt, window_page_size=PAGE,
                compressed_cache=_random_cache(cpages, PAGE, dev, gen), compressed_block_table=cbt,
                compressed_page_size=PAGE, kind=kind, attn_sink=torch.randn(H, device=dev, generator=gen))
    if kind == "csa":
        pos = torch.arange(c - T, c, device=dev)
        nvis = ((pos + 1) // 4).clamp_min(1)
        case["indices"] = (torch.rand(T, topk, device=dev, generator=gen) * nvis[:, None]).long().int()
    out = torch.empty(T, H, 512, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(T, H, dtype=torch.float32, device=dev)
    fn = lambda: A.sparse_attn_prefill(**case, out=out, lse_out=lse, backend="triton")  # noqa: E731
    return ctx.time(fn, warmup_ms=10, rep_ms=60), 1


def main():
    cfgs = sys.argv[1:] or [""]
    only = os.environ.get("SWEEP_ONLY", "")
    ctx = BenchContext("cuda", quick=True)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1)
    table = {}
    for cfg in cfgs:
        parts = cfg.split(":") if cfg else []
        for key, val in zip(("V4K_ATTN_BN", "V4K_ATTN_STAGES", "V4K_ATTN_WARPS"), parts):
            os.environ[key] = val
        tag = cfg or "default"
        t0 = time.time()
        try:
            if os.environ.get("SWEEP_CHECK", "1") == "1":
                check(tag)
            for name, kind, H, topk, c, B in DEC + PRE:
                if only and not any(o in name for o in only.split(",")):
                    continue
                try:
                    f = time_prefill if "pre" in name else time_decode
                    t, sp = f(ctx, name, kind, H, topk, c, B, gen)
                    table[(name, tag)] = f"{t:9.1f} ({sp})"
                except Exception as exc:  # noqa: BLE001
                    table[(name, tag)] = f"ERR {type(exc).__name__}"
                    print(f"  [{tag}] {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                print(f"  [{tag}] {name}: {table[(name, tag)]}", flush=True)
        finally:
            for key in ("V4K_ATTN_BN", "V4K_ATTN_STAGES", "V4K_ATTN_WARPS"):
                os.environ.pop(key, None)
        print(f"[{tag}] {time.time() - t0:.0f} s", flush=True)
    names = [n[0] for n in DEC + PRE if not only or any(o in n[0] for o in only.split(","))]
    tags = [c or "default" for c in cfgs]
    print("time us (splits)".ljust(20) + "".join(t.rjust(16) for t in tags))
    for n in names:
        print(n.ljust(20) + "".join(table.get((n, t), "-").rjust(16) for t in tags))


if __name__ == "__main__":
    main()
