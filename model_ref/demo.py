"""The demo behind ``python -m v4kernels.model_ref demo`` (see __main__.py for the options)."""
from __future__ import annotations

import time

import torch

from . import config as C
from .weights import init_weights

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def _progress(it, total, desc):
    if tqdm is None:
        return it
    return tqdm(it, total=total, desc=desc, leave=False)


def _config(args, on_gpu):
    name = args.config or ("flash" if on_gpu else "tiny")
    if name.endswith(".json"):
        cfg = C.from_hf_config(name)
    elif name == "tiny":
        cfg = C.tiny()
    else:
        cfg = C.preset(name, args.layers or 4)
    return cfg


def _run(cfg, weights, device, backend, prompts, steps, moe_mode, timed):
    from .model import Transformer

    ctx = max(len(p) for p in prompts) + steps + 1
    model = Transformer(cfg, weights, device, backend=backend, max_seqs=len(prompts), max_context=ctx,
                        moe_mode=moe_mode)
    model.timer.enabled = timed
    ids = list(range(len(prompts)))
    for s in ids:
        model.new_sequence(s)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    logits = [model.prefill(ids, prompts)]
    sync()
    t_prefill = time.perf_counter() - t0
    nxt = logits[0].argmax(-1).tolist()
    t0 = time.perf_counter()
    for _ in _progress(range(steps), steps, f"decode ({backend or 'auto'})"):
        lg = model.decode(ids, nxt)
        logits.append(lg)
        nxt = lg.argmax(-1).tolist()
    sync()
    t_decode = time.perf_counter() - t0
    stats = {"bytes_per_token": model.caches.bytes_per_token, "timer": dict(model.timer.totals)}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return logits, t_prefill, t_decode, stats


def run_demo(args):
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(args.device or ("cuda" if on_gpu else "cpu"))
    cfg = _config(args, device.type == "cuda")
    context = args.context or (4096 if device.type == "cuda" else 300)
    steps = args.decode_steps if args.decode_steps is not None else (32 if device.type == "cuda" else 4)
    print(f"v4kernels model_ref demo: {cfg.name} (dim {cfg.dim}, {cfg.n_layers} layers "
          f"{''.join(cfg.layer_kind(i)[0].upper() for i in range(cfg.n_layers))}, {cfg.n_heads} heads, "
          f"{cfg.n_routed_experts} experts) on {device}, batch {args.batch}, prompt ~{context}, {steps} decode steps")
    t0 = time.perf_counter()
    weights = init_weights(cfg, args.seed, device=device)
    print(f"random weights: {sum(v.numel() * v.element_size() for v in weights.values()) / 1e9:.2f} GB "
          f"in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, cfg.vocab_size, (max(1, context - 3 * b),), generator=g).tolist()
               for b in range(args.batch)]
    n_prompt = sum(len(p) for p in prompts)

    # warm-up run (Triton compilation), then the timed run, then a run with per-family timing
    _run(cfg, weights, device, args.backend, [p[:64] for p in prompts], 1, args.moe_mode, timed=False)
    logits, tp, td, stats = _run(cfg, weights, device, args.backend, prompts, steps, args.moe_mode, timed=False)
    _, _, _, tstats = _run(cfg, weights, device, args.backend, prompts, min(steps, 4), args.moe_mode, timed=True)
    print(f"\nprefill: {n_prompt} tokens in {tp * 1e3:.1f} ms = {n_prompt / tp:,.0f} tokens/s")
    if steps:
        print(f"decode:  {steps} steps x {args.batch} sequences in {td * 1e3:.1f} ms = "
              f"{td / steps * 1e3:.2f} ms/step, {steps * args.batch / td:,.0f} tokens/s")
    tot = sum(tstats["timer"].values()) or 1.0
    print("\ntime per op family (prefill + 4 decode steps, synchronized around each family):")
    for k, v in sorted(tstats["timer"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:12s} {v * 1e3:9.1f} ms  {100 * v / tot:5.1f}%")

    from v4kernels._dispatch import OPS

    used = sorted({op.last_backend for op in OPS.values() if op.last_backend})
    print(f"\nbackends that ran: {', '.join(used)}")
    if not args.no_check:
        if args.backend == "reference" or (args.backend is None and device.type == "cpu"):
            print("validation: the kernel path is the reference path here (CPU, backend auto); "
                  "run with --backend triton to check the Triton kernels under the interpreter")
        else:
            ref_logits, _, _, _ = _run(cfg, weights, device, "reference", prompts, steps, args.moe_mode, timed=False)
            errs, agree, total = [], 0, 0
            for a, b in zip(logits, ref_logits):
                errs.append((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6))
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += a.shape[0]
            print(f"validation vs reference path: max relative logit error {max(errs):.3e}, "
                  f"top-1 agreement {agree}/{total} ({100 * agree / total:.1f}%)")
    bpt = stats["bytes_per_token"](context)
    gqa = cfg.n_layers * 8 * 128 * 2 * 2  # 8 KV heads x 128 dims x (K, V) x bf16
    v32 = cfg.n_layers * (656 + 132)  # V3.2: 656-B MLA row + 132-B FP8 indexer key, every token, every layer
    print(f"\nKV cache at {context} tokens: {bpt:,.0f} B/token ({cfg.n_layers} layers + MTP) vs GQA-8 bf16 "
          f"{gqa:,} B/token ({gqa / bpt:.1f}x) vs V3.2 layout {v32:,} B/token ({v32 / bpt:.1f}x)")
    from .cache import sequence_bytes

    for full in (C.flash(), C.pro()):
        print(f"{full.name} at 1M context: {sequence_bytes(full, 1 << 20) / 1e9:.2f} GB per sequence "
              f"(spec §6.4: Flash 3.69 GB, Pro 5.28 GB)")
