"""The demo behind ``python -m v4kernels.model_ref demo`` (see __main__.py for the options).

Steps: random weights (on the device), a warm-up run on a GPU (Triton compilation), the timed run (prefill of
``batch`` prompts of ~``context`` tokens, then ``decode_steps`` greedy decode steps), a run timed per
op family (prefill + 4 decode steps, synchronized around each family), and the validation run: the
reference path (float32 references of every op) against the kernel path on the first ``check_tokens``
tokens of each prompt, decode teacher-forced with the kernel path's tokens for ``check_steps`` steps,
compared logit by logit. Then the summary.
"""
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(cfg, weights, device, backend, prompts, steps, moe_mode, numerics, timed=False, forced=None,
         graph=False):
    """Prefill + ``steps`` decode steps (greedy, or the tokens of ``forced[step]``); ``graph``: the
    decode steps replayed from a CUDA graph (graph.py; the first step runs eagerly and captures, so
    the decode time covers the steps after it). Returns (logits per step: [B, vocab] each, decoded
    tokens per step, prefill s, decode s, timed decode steps, stats)."""
    from .graph import DecodeGraph
    from .model import Transformer

    ctx = max(len(p) for p in prompts) + steps + 1
    model = Transformer(cfg, weights, device, backend=backend, max_seqs=len(prompts), max_context=ctx,
                        moe_mode=moe_mode, numerics=numerics)
    model.timer.enabled = timed
    ids = list(range(len(prompts)))
    for s in ids:
        model.new_sequence(s)
    _sync(device)
    t0 = time.perf_counter()
    logits = [model.prefill(ids, prompts)]
    _sync(device)
    t_prefill = time.perf_counter() - t0
    tokens = []
    g = DecodeGraph(model, ids) if graph and steps else None
    t0, timed_steps = time.perf_counter(), steps
    for step in _progress(range(steps), steps, f"decode ({backend or 'auto'}{', CUDA graph' if g else ''})"):
        nxt = forced[step] if forced is not None else logits[-1].argmax(-1).tolist()
        tokens.append(nxt)
        logits.append(g.step(nxt) if g else model.decode(ids, nxt))
        if g and step == 0 and steps > 1:  # eager step + capture: not timed
            _sync(device)
            t0, timed_steps = time.perf_counter(), steps - 1
    _sync(device)
    t_decode = time.perf_counter() - t0
    del g
    stats = {"bytes_per_token": model.caches.bytes_per_token, "timer": dict(model.timer.totals),
             "cache_allocated": model.caches.allocated_bytes()}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return logits, tokens, t_prefill, t_decode, timed_steps, stats


def _compare(logits, ref_logits):
    """Max relative logit error (per row, vs the row's max |logit|), calc_diff and top-1 agreement."""
    from v4kernels.testing import calc_diff

    errs, agree, total = [], 0, 0
    for a, b in zip(logits, ref_logits):
        errs.append(((a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-6)).max().item())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return max(errs), calc_diff(torch.cat(logits), torch.cat(ref_logits)), agree, total


def run_demo(args):
    t_start = time.perf_counter()
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(args.device or ("cuda" if on_gpu else "cpu"))
    cfg = _config(args, device.type == "cuda")
    gpu = device.type == "cuda"
    context = args.context or (4096 if gpu else 300)
    steps = args.decode_steps if args.decode_steps is not None else (32 if gpu else 4)
    check_steps = min(steps, args.check_steps if args.check_steps is not None else 4)
    numerics = args.numerics
    print(f"v4kernels model_ref demo: {cfg.name} (dim {cfg.dim}, {cfg.n_layers} layers "
          f"{''.join(cfg.layer_kind(i)[0].upper() for i in range(cfg.n_layers))}, {cfg.n_heads} heads, "
          f"{cfg.n_routed_experts} experts) on {device}, batch {args.batch}, prompt ~{context}, {steps} decode "
          f"steps, numerics {numerics}, backend {args.backend or 'auto'}")
    t0 = time.perf_counter()
    weights = init_weights(cfg, args.seed, device=device)
    _sync(device)
    print(f"random weights: {sum(v.numel() * v.element_size() for v in weights.values()) / 1e9:.2f} GB "
          f"in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, cfg.vocab_size, (max(1, context - 3 * b),), generator=g).tolist()
               for b in range(args.batch)]
    n_prompt = sum(len(p) for p in prompts)
    run = dict(cfg=cfg, weights=weights, device=device, backend=args.backend, moe_mode=args.moe_mode,
               numerics=numerics)

    # warm-up on the same shapes (Triton compiles per shape class), then the timed run, then a run
    # timed per op family. On a CPU nothing is compiled (reference ops, or the Triton interpreter).
    graph = gpu and numerics == "reference" and not args.no_graph
    if gpu:
        t0 = time.perf_counter()
        _run(prompts=prompts, steps=2, **run)
        print(f"warm-up (kernel compilation): {time.perf_counter() - t0:.1f} s")
    logits, tokens, tp, td, n_td, stats = _run(prompts=prompts, steps=steps, graph=graph, **run)
    *_, tstats = _run(prompts=prompts, steps=min(steps, 4), timed=True, forced=tokens, **run)
    print(f"\nprefill: {n_prompt} tokens in {tp * 1e3:.1f} ms = {n_prompt / tp:,.0f} tokens/s")
    if n_td:
        how = (f"replayed from a CUDA graph (steps 2..{steps}; the first runs eagerly and captures)" if graph and
               n_td < steps else "eager" + (" (one step: nothing replayed)" if graph else ""))
        print(f"decode:  {n_td} steps x {args.batch} sequences in {td * 1e3:.1f} ms = "
              f"{td / n_td * 1e3:.2f} ms/step, {n_td * args.batch / td:,.0f} tokens/s, {how}")
    tot = sum(tstats["timer"].values()) or 1.0
    print(f"\ntime per op family (prefill + {min(steps, 4)} decode steps, synchronized around each family):")
    for k, v in sorted(tstats["timer"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:12s} {v * 1e3:9.1f} ms  {100 * v / tot:5.1f}%")

    from v4kernels._dispatch import OPS

    used = sorted({op.last_backend for op in OPS.values() if op.last_backend})
    print(f"\nbackends that ran: {', '.join(used)}")
    if args.no_check:
        print("validation: skipped (--no-check)")
    elif args.backend == "reference" or (args.backend is None and device.type == "cpu"):
        print("validation: the kernel path is the reference path here (CPU, backend auto); "
              "run with --backend triton to check the Triton kernels under the interpreter")
    else:
        # both paths on the first check_tokens tokens of each prompt (the reference path is slow and
        # memory-hungry at long prompts), decode teacher-forced with the kernel path's tokens
        t0 = time.perf_counter()
        vp = [p[: args.check_tokens] for p in prompts]
        k_logits, k_tokens, *_ = _run(prompts=vp, steps=check_steps, graph=graph, **run)
        ref_logits, *_ = _run(prompts=vp, steps=check_steps, forced=k_tokens, **{**run, "backend": "reference"})
        err, cd, agree, total = _compare(k_logits, ref_logits)
        print(f"validation vs the reference path ({len(vp)} prompts of <= {args.check_tokens} tokens: last-position "
              f"logits + {check_steps} teacher-forced decode steps, {total} logit rows, "
              f"{time.perf_counter() - t0:.1f} s): max relative logit error {err:.3e}, calc_diff {cd:.2e}, "
              f"top-1 agreement {agree}/{total} ({100 * agree / total:.1f}%)")
        print("  (the FP8 activation quantization of the reference numerics turns last-bit differences of the "
              "accumulation order into FP8-step differences: expect calc_diff ~1e-3..1e-2 and a few top-1 flips "
              "where logits are nearly tied; tests/model_ref/test_model_gpu.py states the bounds)")
    bpt = stats["bytes_per_token"](context)
    n_kv = len(cfg.compress_ratios)
    gqa = n_kv * 8 * 128 * 2 * 2  # 8 KV heads x 128 dims x (K, V) x bf16, every layer
    v32 = n_kv * (656 + 132)  # V3.2: 656-B MLA row + 132-B FP8 indexer key, every token, every layer
    print(f"\nKV cache at {context} tokens ({cfg.n_layers} layers + {cfg.n_mtp_layers} MTP): {bpt:,.0f} B/token "
          f"vs GQA-8 bf16 {gqa:,} B/token ({gqa / bpt:.1f}x) vs V3.2 layout {v32:,} B/token ({v32 / bpt:.1f}x); "
          f"model_ref holds {stats['cache_allocated'] / 1e6:,.1f} MB of cache buffers for this run")
    from .cache import sequence_bytes

    for full in (C.flash(), C.pro()):
        print(f"{full.name} at 1M context: {sequence_bytes(full, 1 << 20) / 1e9:.2f} GB per sequence "
              f"(spec §6.4: Flash 3.69 GB, Pro 5.28 GB)")
    if gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB")
    print(f"demo done in {time.perf_counter() - t_start:.1f} s")
